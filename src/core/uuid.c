/*
 * uuid.c - event ids. Version 7 layout (RFC 9562): 48 bits of Unix time in
 * milliseconds, then 74 bits that are random for the first id of each
 * millisecond (from the kernel) and counted up from there for the next ones
 * (RFC 9562 6.2, method 2). Ids made one after the other therefore sort
 * together and keep the unique index's inserts local, and making one costs
 * an increment instead of a trip to the kernel's random source. Debian 12's
 * libuuid predates uuid_generate_time_v7, so the layout is done here.
 *
 * The state is per thread: nginx runs store calls on several pool threads.
 */
#include "es_uuid.h"
#include "eventsourcing.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <uuid.h>

#if defined(__GNUC__)
#define ES_THREAD_LOCAL __thread
#else
#define ES_THREAD_LOCAL
#endif

static ES_THREAD_LOCAL uint64_t last_ms;
static ES_THREAD_LOCAL unsigned char last[16];

/* A forked child inherits last_ms and last: within the same millisecond
 * parent and child would count up from the same id. Each fork moves a
 * generation on (in the child, pthread_atfork), and a thread whose state
 * is from an older one starts its next id from fresh random bits. glibc
 * drops the handler when this library is unloaded. */
static volatile unsigned fork_gen;
static ES_THREAD_LOCAL unsigned seen_gen;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void uuid_forked(void) { fork_gen++; }
static void uuid_watch_forks(void) { pthread_atfork(NULL, NULL, uuid_forked); }

/* 16 random bytes from the kernel. libuuid's uuid_generate_random
 * reseeds libc's random() (srandom) on every call besides asking the
 * kernel: 6% of a client's instructions per order-service command under
 * callgrind, for the same bytes. */
static void random_bytes(unsigned char out[16])
{
    size_t got = 0;
    while (got < 16) {
        ssize_t n = getrandom(out + got, 16 - got, 0);
        if (n > 0) {
            got += (size_t)n;
        } else if (n == 0 || errno != EINTR) {
            uuid_generate_random(out);   /* no getrandom(): libuuid's way */
            return;
        }
    }
}

/* Adds one to the 74 counted bits (bytes 6..15 less the version and
 * variant bits); returns 0 when they overflow. */
static int counter_next(unsigned char u[16])
{
    for (int i = 15; i >= 6; i--) {
        unsigned mask = i == 6 ? 0x0f : i == 8 ? 0x3f : 0xff;
        unsigned v = (u[i] & mask) + 1;
        u[i] = (unsigned char)((u[i] & ~mask) | (v & mask));
        if (v <= mask)
            return 1;
    }
    return 0;
}

void es_uuid_v7_bytes(unsigned char out[16])
{
    struct timespec ts;
    uint64_t ms;

    pthread_once(&fork_once, uuid_watch_forks);
    if (seen_gen != fork_gen) {
        seen_gen = fork_gen;
        last_ms = 0;             /* a forked child: nothing inherited */
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    /* A clock that steps back keeps the last millisecond: ids stay in
     * order. */
    if (ms <= last_ms && last_ms != 0 && counter_next(last)) {
        ms = last_ms;
    } else {
        if (ms <= last_ms)
            ms = last_ms + 1;    /* counter overflowed: borrow a tick */
        random_bytes(last);
        last[6] = (unsigned char)((last[6] & 0x0f) | 0x70);   /* version 7 */
        last[8] = (unsigned char)((last[8] & 0x3f) | 0x80);   /* variant */
        /* Leave headroom so a millisecond can count up a long way. */
        last[9] &= 0x7f;
        for (int i = 0; i < 6; i++)
            last[i] = (unsigned char)(ms >> (8 * (5 - i)));
        last_ms = ms;
    }
    memcpy(out, last, 16);
}

/* The two lower-case hex digits of each byte value. */
static const char HEX_PAIRS[513] =
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
    "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
    "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
    "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
    "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
    "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
    "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";

void es_uuid_format(const unsigned char u[16], char out[37])
{
    /* a byte's two digits in one copy, spelled out (no loop, no test for
     * the dashes): libuuid's uuid_unparse_lower takes about 250
     * instructions a UUID, and a read formats one for every event */
#define PAIR(i, at) memcpy(out + (at), HEX_PAIRS + 2 * u[i], 2)
    PAIR(0, 0); PAIR(1, 2); PAIR(2, 4); PAIR(3, 6); PAIR(4, 9);
    PAIR(5, 11); PAIR(6, 14); PAIR(7, 16); PAIR(8, 19); PAIR(9, 21);
    PAIR(10, 24); PAIR(11, 26); PAIR(12, 28); PAIR(13, 30); PAIR(14, 32);
    PAIR(15, 34);
#undef PAIR
    out[8] = out[13] = out[18] = out[23] = '-';
    out[36] = '\0';
}

void es_uuid_v7(char out[37])
{
    unsigned char u[16];
    es_uuid_v7_bytes(u);
    uuid_unparse_lower(u, out);
}

int es_uuid5(const char *namespace_text, const char *name, size_t len,
             char out[37])
{
    uuid_t ns, u;
    if (!es_uuid_valid(namespace_text) || uuid_parse(namespace_text, ns) != 0)
        return -1;
    uuid_generate_sha1(u, ns, name, len);
    uuid_unparse_lower(u, out);
    return 0;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* By hand: libuuid's uuid_parse calls strtoul for each group, which was
 * most of what checking an id cost a command (callgrind: over 1,300
 * instructions an id). */
int es_uuid_parse(const char *text, unsigned char out[16])
{
    int j = 0;
    for (int i = 0; i < 36;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (text[i] != '-')
                return -1;
            i++;
            continue;
        }
        int hi = hex_value(text[i]);
        if (hi < 0)
            return -1;
        int lo = hex_value(text[i + 1]);
        if (lo < 0)
            return -1;
        out[j++] = (unsigned char)(hi << 4 | lo);
        i += 2;
    }
    return text[36] == '\0' ? 0 : -1;
}

int es_uuid_valid(const char *text)
{
    unsigned char u[16];
    return text && es_uuid_parse(text, u) == 0;
}
