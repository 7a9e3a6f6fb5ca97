/*
 * json_syntax.h - JSON syntax (RFC 8259) and UTF-8 validation, one
 * implementation for the whole library: the memory store's validator
 * (es_json_check) and the Lua codec's lexer (strings, numbers, whitespace)
 * both come here, so what one accepts the other accepts.
 *
 * The tables are constant data: no initialization, nothing to race on when
 * several threads (nginx's pool) open the module at once.
 */
#ifndef ES_JSON_SYNTAX_H
#define ES_JSON_SYNTAX_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Internal to the module: hidden symbols are reached directly, not through
 * the GOT/PLT a shared object otherwise uses for exported ones (these
 * tables and calls sit in the codec's innermost loops). */
#if defined(__GNUC__)
#define ES_INTERNAL __attribute__((visibility("hidden")))
#else
#define ES_INTERNAL
#endif

/* 1 for JSON whitespace (space, tab, newline, carriage return). */
ES_INTERNAL extern const unsigned char es_json_ws[256];
/* 1 for the bytes that end a plain run inside a string: '"', '\\',
 * control characters and non-ASCII bytes (which need UTF-8 validation). */
ES_INTERNAL extern const unsigned char es_json_special[256];
/* A hex digit's value + 1; 0 for other bytes. */
ES_INTERNAL extern const unsigned char es_json_hex1[256];

/* Where and why a text is not JSON. `at` points at the offending byte
 * (the end of the input for a premature end). `what` reads as a phrase
 * ("invalid escape in string"); `detail`, when not NULL, says more
 * ("overlong encoding"). When `unexpected` is set, the problem is only an
 * unexpected byte at `at` and `what` is the context (" after '-'"). */
typedef struct es_json_problem {
    const unsigned char *at;
    const char *what;
    const char *detail;
    int unexpected;
} es_json_problem;

/* Skips plain string bytes (see es_json_special), 8 at a time where it
 * can: this is the hot loop of both encode and decode. */
static inline const unsigned char *es_json_scan_plain(const unsigned char *p,
                                                      const unsigned char *end)
{
    const uint64_t k01 = 0x0101010101010101ULL, k80 = 0x8080808080808080ULL;
    while (end - p >= 8) {
        uint64_t x, y1, y2, m;
        memcpy(&x, p, 8);
        y1 = x ^ (k01 * '"');
        y2 = x ^ (k01 * '\\');
        m = ((x - k01 * 0x20) & ~x) | ((y1 - k01) & ~y1) |
            ((y2 - k01) & ~y2) | x;
        if (m & k80)
            break;
        p += 8;
    }
    while (p < end && !es_json_special[*p])
        p++;
    return p;
}

/* The value of the four hex digits at p (which must have 4 bytes), or -1. */
static inline int es_json_hex4(const unsigned char *p)
{
    int a = es_json_hex1[p[0]] - 1, b = es_json_hex1[p[1]] - 1,
        c = es_json_hex1[p[2]] - 1, d = es_json_hex1[p[3]] - 1;
    if ((a | b | c | d) < 0)
        return -1;
    return (a << 12) | (b << 8) | (c << 4) | d;
}

/* Length of the valid UTF-8 sequence at p (a byte >= 0x80; p < end), or
 * 0 with *why set: no overlongs, no encoded surrogates, nothing above
 * U+10FFFF, nothing truncated. */
ES_INTERNAL size_t es_utf8_seq(const unsigned char *p,
                               const unsigned char *end, const char **why);

/* 1 when s[0..n) is valid UTF-8 (NUL bytes included); else 0 with *at the
 * offset of the first bad byte and *why set. */
ES_INTERNAL int es_utf8_valid(const char *s, size_t n, size_t *at,
                              const char **why);

/* The string whose opening quote is at p: returns the byte after its
 * closing quote, or NULL with *pr filled. *escaped says whether it holds
 * any backslash escape (all of them valid: \u surrogates in pairs). */
ES_INTERNAL const unsigned char *es_json_string(const unsigned char *p,
                                                const unsigned char *end,
                                                int *escaped,
                                                es_json_problem *pr);

/* Fills *pr; returns NULL. With unexpected set, `what` is the context of
 * an unexpected byte at `at` (" after '-'"). */
static inline const unsigned char *es_json_fail(es_json_problem *pr,
                                                const unsigned char *at,
                                                const char *what,
                                                int unexpected)
{
    pr->at = at;
    pr->what = what;
    pr->detail = NULL;
    pr->unexpected = unexpected;
    return NULL;
}

static inline const unsigned char *es_json_digits(const unsigned char *p,
                                                  const unsigned char *end)
{
    while (p < end && *p >= '0' && *p <= '9')
        p++;
    return p;
}

/* The same from p inside the string, all bytes before p being plain ones
 * (es_json_scan_plain): decode's fast path resumes here. *escaped is only
 * ever set, so the caller starts it at 0. */
ES_INTERNAL const unsigned char *es_json_string_rest(const unsigned char *p,
                                                     const unsigned char *end,
                                                     int *escaped,
                                                     es_json_problem *pr);

/* The number starting at p ('-' or a digit expected): returns the byte
 * after it, or NULL with *pr filled. Grammar only: no range check. Inline:
 * decode runs it on every number before reading the digits. */
static inline const unsigned char *es_json_number(const unsigned char *p,
                                                  const unsigned char *end,
                                                  es_json_problem *pr)
{
    const unsigned char *s = p;
    if (p < end && *p == '-')
        p++;
    if (p >= end || *p < '0' || *p > '9')
        return es_json_fail(pr, p, p > s ? " after '-'" : "", 1);
    if (*p == '0') {
        if (++p < end && *p >= '0' && *p <= '9')
            return es_json_fail(pr, s, "number with a leading zero", 0);
    } else {
        p = es_json_digits(p, end);
    }
    if (p < end && *p == '.') {
        if (++p >= end || *p < '0' || *p > '9')
            return es_json_fail(pr, p, " in number (digit expected)", 1);
        p = es_json_digits(p, end);
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return es_json_fail(pr, p, " in number (digit expected)", 1);
        p = es_json_digits(p, end);
    }
    return p;
}

/* The first \u escape of a JSON text that jsonb cannot hold, described
 * ("\\u0000", "an unpaired surrogate escape"); NULL when there is none.
 * PostgreSQL's json input takes both; jsonb, and so read models that cast
 * payloads to it, do not. An escaped backslash followed by "u0000" is not
 * an escape. */
ES_INTERNAL const char *es_json_jsonb_unsafe(const char *text, size_t len);

/* 0 when both stores take text as a payload (an object for metadata):
 * es_json_check at ES_JSON_CHECK_MAX_DEPTH and es_json_jsonb_unsafe
 * finding nothing. store.c checks every payload with it, so the memory
 * and PostgreSQL stores refuse the same texts, and PostgreSQL never sees
 * one the memory store would refuse. Else -1 with why ("not valid JSON
 * (...)", "\\u0000 is not allowed ...") filled. */
ES_INTERNAL int es_json_payload_ok(const char *text, size_t len, int object,
                                   char *why, size_t whylen);

/* Writes "<what> at byte N" for *pr about start[0..len) into out (N is
 * 1-based, like Lua string positions and the codec's decode errors). */
ES_INTERNAL void es_json_describe(const es_json_problem *pr,
                                  const char *start, size_t len, char *out,
                                  size_t outlen);

/* The deepest nesting es_json_check accepts, whatever max_depth says (the
 * stores' limit: payloads are checked with es_json_payload_ok). */
#define ES_JSON_CHECK_MAX_DEPTH 10000

/* 0 when text[0..len) is exactly one JSON value (an object when
 * want_object) nested at most max_depth deep; else -1 with *pr filled. */
ES_INTERNAL int es_json_check(const char *text, size_t len, int want_object,
                              int max_depth, es_json_problem *pr);

#endif
