/*
 * memory.c - the in-memory store: the PostgreSQL store's semantics without
 * a database, for tests and tools.
 *
 * "memory:" and "memory:NAME" both open a new, empty, private store: NAME
 * is only a label. Nothing is shared between opens and there is no global
 * state, so different stores may be used from different threads (one
 * store by one thread at a time, like a PostgreSQL connection).
 *
 * Layout, kept compact for millions of events:
 * - events live in fixed-size chunks (never moved, so growth copies no
 *   event), position p is events[p - 1]; each holds its 16-byte id, stream
 *   and type indexes, version, recorded_at and a pointer into the arena;
 * - data and metadata JSON text (as given; metadata NULL is "{}") live in
 *   an append-only arena as "data\0metadata\0";
 * - streams keep an array of their events' positions (version v at
 *   pos[v - 1]); stream names, event types and event ids are found through
 *   open-addressing hash tables of 32-bit indexes.
 * Appends are O(1) amortized. An append validates everything and reserves
 * all the memory it needs before it changes anything: all or nothing.
 *
 * recorded_at is es_time_now() at the append, never earlier than the
 * previous append's (a clock stepping back does not reorder the store), so
 * `before` bounds are found by binary search.
 *
 * Snapshots behave like the PostgreSQL table: one per (stream, version),
 * saving the same version again replaces it; load picks the newest with
 * version <= max_version and the same schema_version.
 *
 * read_all checkpoints are "0:<position>" (the PostgreSQL store's are
 * "<txid>:<position>"; there are no concurrent transactions here). With
 * category/types filters a batch scans until it holds `limit` events or
 * reaches the end of the store as of the read_all call; the checkpoint is
 * then that of the last event returned (batch full) or of the last event
 * scanned (end reached), so filtered-out events are not scanned again.
 */
#include "store.h"
#include "es_time.h"
#include "es_uuid.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uuid.h>

#define CHUNK_SHIFT 12
#define CHUNK_EVENTS (1u << CHUNK_SHIFT)
#define CHUNK_MASK (CHUNK_EVENTS - 1)
#define ARENA_BLOCK ((size_t)1 << 20)
#define MAX_EVENTS 0xfffffff0u       /* positions and versions are 32-bit */
#define MAX_PAYLOAD 0xfffffff0u
#define SMALL_BATCH 8

typedef struct mevent {
    uint8_t id[16];
    uint32_t stream;        /* index into streams */
    uint32_t version;
    uint32_t type;          /* index into types */
    uint32_t data_len;
    uint32_t meta_len;
    int64_t recorded_at;
    const char *data;       /* "data\0metadata\0" in the arena */
} mevent;

typedef struct msnap {
    int64_t version, schema_version, recorded_at;
    char *state;
    size_t state_len;
} msnap;

typedef struct mstream {
    char *name;
    uint64_t hash;
    uint32_t cat_len;       /* bytes before the first '-' (or all) */
    uint32_t n, cap;
    uint32_t *pos;          /* pos[v - 1]: position of version v */
    msnap *snaps;           /* by version, ascending */
    uint32_t nsnaps, snaps_cap;
} mstream;

typedef struct mtype {
    char *name;
    uint64_t hash;
} mtype;

typedef struct ablock {
    struct ablock *next;
    size_t used, cap;
    char data[];
} ablock;

/* An open-addressing set of indexes + 1 (0 = empty slot). */
typedef struct itab {
    uint32_t *slot;
    uint32_t cap;           /* a power of two, or 0 */
} itab;

typedef struct mstore {
    es_store base;
    mevent **chunks;
    uint32_t nchunks, chunks_cap;
    uint32_t nevents;
    itab ids;               /* positions, by event id */
    mstream *streams;
    uint32_t nstreams, streams_cap;
    itab stab;              /* stream indexes + 1, by name */
    mtype *types;
    uint32_t ntypes, types_cap;
    itab ttab;              /* type indexes + 1, by name */
    ablock *arena;
    int64_t last_time;
    char snap_time[32];     /* recorded_at of the last snapshot loaded */
} mstore;

/* ---- helpers ------------------------------------------------------------ */

static int oom(es_error *err)
{
    return es_fail(err, ES_DATABASE, "memory store: out of memory");
}

/* An array `old` of *cap elements of `elem` bytes, with room for `need`:
 * old itself when it has it, else reallocated at double (from `first`)
 * until it does, *cap updated. NULL when out of memory (nothing changed). */
static void *grow(void *old, uint32_t *cap, uint64_t need, size_t elem,
                  uint32_t first)
{
    uint64_t c = *cap ? *cap : first;
    void *p;
    if (need <= *cap)
        return old;
    while (c < need)
        c *= 2;
    if (c > UINT32_MAX || !(p = realloc(old, (size_t)c * elem)))
        return NULL;
    *cap = (uint32_t)c;
    return p;
}

static uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t hash_str(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return mix64(h);
}

static uint64_t hash_id(const uint8_t id[16])
{
    uint64_t a, b;
    memcpy(&a, id, 8);
    memcpy(&b, id + 8, 8);
    return mix64(a ^ mix64(b));
}

static mevent *ev_at(const mstore *m, uint32_t pos)
{
    uint32_t i = pos - 1;
    return &m->chunks[i >> CHUNK_SHIFT][i & CHUNK_MASK];
}

/* Grows t so that `count` entries fit at a load of at most 3/4; entries
 * are re-inserted from rehash(ctx, i) for i in [0, count_now). */
static int itab_reserve(itab *t, uint32_t count, uint32_t count_now,
                        uint64_t (*hash)(const void *ctx, uint32_t i),
                        const void *ctx)
{
    uint32_t cap = t->cap ? t->cap : 16, *slot;
    if ((uint64_t)count * 4 <= (uint64_t)t->cap * 3)
        return 0;
    while ((uint64_t)count * 4 > (uint64_t)cap * 3) {
        if (cap >= 0x80000000u)
            return -1;
        cap *= 2;
    }
    slot = calloc(cap, sizeof *slot);
    if (!slot)
        return -1;
    for (uint32_t i = 0; i < count_now; i++) {
        uint32_t k = (uint32_t)hash(ctx, i) & (cap - 1);
        while (slot[k])
            k = (k + 1) & (cap - 1);
        slot[k] = i + 1;
    }
    free(t->slot);
    t->slot = slot;
    t->cap = cap;
    return 0;
}

static uint64_t id_rehash(const void *ctx, uint32_t i)
{
    return hash_id(ev_at(ctx, i + 1)->id);
}

static uint64_t stream_rehash(const void *ctx, uint32_t i)
{
    return ((const mstore *)ctx)->streams[i].hash;
}

static uint64_t type_rehash(const void *ctx, uint32_t i)
{
    return ((const mstore *)ctx)->types[i].hash;
}

static void itab_insert(itab *t, uint64_t h, uint32_t value)
{
    uint32_t k = (uint32_t)h & (t->cap - 1);
    while (t->slot[k])
        k = (k + 1) & (t->cap - 1);
    t->slot[k] = value;
}

/* Position of the event with this id, or 0. */
static uint32_t id_find(const mstore *m, const uint8_t id[16])
{
    if (!m->ids.cap)
        return 0;
    uint32_t mask = m->ids.cap - 1, k = (uint32_t)hash_id(id) & mask;
    for (; m->ids.slot[k]; k = (k + 1) & mask)
        if (memcmp(ev_at(m, m->ids.slot[k])->id, id, 16) == 0)
            return m->ids.slot[k];
    return 0;
}

/* Stream index + 1, or 0. */
static uint32_t stream_find(const mstore *m, const char *name, uint64_t h)
{
    if (!m->stab.cap)
        return 0;
    uint32_t mask = m->stab.cap - 1, k = (uint32_t)h & mask;
    for (; m->stab.slot[k]; k = (k + 1) & mask) {
        const mstream *s = &m->streams[m->stab.slot[k] - 1];
        if (s->hash == h && strcmp(s->name, name) == 0)
            return m->stab.slot[k];
    }
    return 0;
}

/* Type index + 1, or 0. */
static uint32_t type_find(const mstore *m, const char *name, uint64_t h)
{
    if (!m->ttab.cap)
        return 0;
    uint32_t mask = m->ttab.cap - 1, k = (uint32_t)h & mask;
    for (; m->ttab.slot[k]; k = (k + 1) & mask) {
        const mtype *t = &m->types[m->ttab.slot[k] - 1];
        if (t->hash == h && strcmp(t->name, name) == 0)
            return m->ttab.slot[k];
    }
    return 0;
}

/* Type index of name, adding it when new (harmless if the append fails
 * later: an unused type is invisible). -1 on ENOMEM. */
static int64_t type_intern(mstore *m, const char *name)
{
    uint64_t h = hash_str(name);
    uint32_t t = type_find(m, name, h);
    char *copy;
    if (t)
        return t - 1;
    mtype *types = grow(m->types, &m->types_cap, (uint64_t)m->ntypes + 1,
                        sizeof *types, 16);
    if (!types)
        return -1;
    m->types = types;
    if (itab_reserve(&m->ttab, m->ntypes + 1, m->ntypes, type_rehash, m) < 0)
        return -1;
    copy = strdup(name);
    if (!copy)
        return -1;
    m->types[m->ntypes].name = copy;
    m->types[m->ntypes].hash = h;
    itab_insert(&m->ttab, h, m->ntypes + 1);
    return m->ntypes++;
}

static char *arena_alloc(mstore *m, size_t n)
{
    ablock *b = m->arena;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > ARENA_BLOCK / 4 ? n : ARENA_BLOCK;
        ablock *nb = malloc(sizeof *nb + cap);
        if (!nb)
            return NULL;
        nb->used = 0;
        nb->cap = cap;
        if (b && cap != ARENA_BLOCK) {
            /* a big payload gets its own block behind the current one */
            nb->next = b->next;
            b->next = nb;
            nb->used = n;
            return nb->data;
        }
        nb->next = b;
        m->arena = b = nb;
    }
    b->used += n;
    return b->data + b->used - n;
}

/* Payloads (data, metadata, snapshot state) reach the store already
 * checked: store.c validates them for both stores alike with the shared
 * JSON syntax (json_syntax.c), so they refuse the same texts. */

/* ---- append ----------------------------------------------------------- */

typedef struct pending {
    uint8_t id[16];
    uint32_t found;     /* position of an event with this id, or 0 */
    uint32_t type;
    const char *meta;
    size_t meta_len;
} pending;

static int mem_migrate(es_store *s, es_error *err)
{
    (void)s;
    (void)err;
    return 0;
}

static int conflict(es_error *err, const char *stream, int64_t expected,
                    uint32_t actual)
{
    if (expected == ES_NO_STREAM)
        es_fail(err, ES_CONFLICT, "expected stream %.200s not to exist, "
                "found version %lu", stream, (unsigned long)actual);
    else if (expected == ES_STREAM_EXISTS)
        es_fail(err, ES_CONFLICT, "expected stream %.200s to exist, found "
                "no events", stream);
    else
        es_fail(err, ES_CONFLICT, "expected version %lld of stream %.200s, "
                "found %lu", (long long)expected, stream,
                (unsigned long)actual);
    err->expected = expected;
    err->actual = actual;
    err->reason = ES_REASON_VERSION;
    return -1;
}

/* Is the event at version cur of stream si (1-based; 0: none) the one
 * with this id (text, validated by store.c)? An empty stream has none. */
static int last_is(const mstore *m, uint32_t si, uint32_t cur,
                   const char *id)
{
    uint8_t want[16];
    if (!si || cur == 0)
        return 0;
    es_uuid_parse(id, want);
    return memcmp(ev_at(m, m->streams[si - 1].pos[cur - 1])->id, want,
                  16) == 0;
}

/* Everything an append may need, reserved up front. */
static int reserve(mstore *m, uint32_t si, size_t n, es_error *err)
{
    uint64_t total = (uint64_t)m->nevents + n;
    uint32_t need = (uint32_t)((total + CHUNK_EVENTS - 1) >> CHUNK_SHIFT);

    mevent **chunks = grow(m->chunks, &m->chunks_cap, need, sizeof *chunks,
                           16);
    if (!chunks)
        return oom(err);
    m->chunks = chunks;
    while (m->nchunks < need) {
        mevent *c = malloc(CHUNK_EVENTS * sizeof *c);
        if (!c)
            return oom(err);
        m->chunks[m->nchunks++] = c;
    }
    if (itab_reserve(&m->ids, (uint32_t)total, m->nevents, id_rehash, m) < 0)
        return oom(err);
    if (si) {
        mstream *st = &m->streams[si - 1];
        uint32_t *pos = grow(st->pos, &st->cap, (uint64_t)st->n + n,
                             sizeof *pos, 4);
        if (!pos)
            return oom(err);
        st->pos = pos;
    } else {
        mstream *streams = grow(m->streams, &m->streams_cap,
                                (uint64_t)m->nstreams + 1, sizeof *streams,
                                16);
        if (!streams)
            return oom(err);
        m->streams = streams;
        if (itab_reserve(&m->stab, m->nstreams + 1, m->nstreams,
                         stream_rehash, m) < 0)
            return oom(err);
    }
    return 0;
}

static int mem_append(es_store *s, const char *stream, const es_event_in *ev,
                      size_t n, int64_t expected, es_append_result *out,
                      es_error *err)
{
    mstore *m = (mstore *)s;
    pending small[SMALL_BATCH] = {{{0}, 0, 0, NULL, 0}}, *pend = small;
    uint64_t sh = hash_str(stream);
    uint32_t si = stream_find(m, stream, sh);
    uint32_t cur = si ? m->streams[si - 1].n : 0;
    mstream fresh = {0};
    size_t bytes = 0;
    int rc = -1, all_ids = 1;

    if (n > MAX_EVENTS - m->nevents || n > MAX_EVENTS - cur)
        return es_fail(err, ES_INVALID, "memory store: too many events");
    if (n > SMALL_BATCH && !(pend = malloc(n * sizeof *pend)))
        return oom(err);

    /* 1. payloads, types, ids */
    for (size_t i = 0; i < n; i++) {
        pending *p = &pend[i];
        p->meta = ev[i].metadata ? ev[i].metadata : "{}";
        p->meta_len = ev[i].metadata ? ev[i].metadata_len : 2;
        if (ev[i].data_len > MAX_PAYLOAD || p->meta_len > MAX_PAYLOAD) {
            es_fail(err, ES_INVALID, "event %zu (%s): payload too large",
                    i + 1, ev[i].type);
            goto done;
        }
        bytes += ev[i].data_len + p->meta_len + 2;
        int64_t t = type_intern(m, ev[i].type);
        if (t < 0) {
            oom(err);
            goto done;
        }
        p->type = (uint32_t)t;
        if (ev[i].id) {
            es_uuid_parse(ev[i].id, p->id);  /* validated by store.c */
            p->found = id_find(m, p->id);
        } else {
            all_ids = 0;
            p->found = 0;
        }
    }

    /* 2. idempotent retry: this exact batch is already in this stream */
    if (all_ids && si && pend[0].found) {
        const mevent *first = ev_at(m, pend[0].found);
        size_t i = 0;
        for (; i < n && pend[i].found; i++) {
            const mevent *e = ev_at(m, pend[i].found);
            if (e->stream != si - 1 || e->version != first->version + i)
                break;
        }
        if (i == n) {
            /* the same batch again: a success only where the caller's
             * expected version would have put it (a retry) */
            int64_t v1 = (int64_t)first->version;
            if ((expected == ES_NO_STREAM && v1 != 1) ||
                (expected == ES_STREAM_EXISTS && v1 == 1) ||
                (expected >= 0 && v1 != expected + 1)) {
                es_fail(err, ES_INVALID, "event id %s already used by stream "
                        "%.200s at version %lu", ev[0].id,
                        m->streams[first->stream].name,
                        (unsigned long)first->version);
                err->reason = ES_REASON_ID_TAKEN;
                goto done;
            }
            out->version = first->version + (int64_t)n - 1;
            out->position = pend[n - 1].found;
            out->idempotent = 1;
            es_time_format(ev_at(m, pend[n - 1].found)->recorded_at,
                           out->recorded_at);
            rc = 0;
            goto done;
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (pend[i].found) {
            const mevent *e = ev_at(m, pend[i].found);
            es_fail(err, ES_INVALID, "event id %s already used by stream "
                    "%.200s at version %lu", ev[i].id,
                    m->streams[e->stream].name, (unsigned long)e->version);
            err->reason = ES_REASON_ID_TAKEN;
            goto done;
        }
    }

    /* 3. expected version, and the last event the caller expects */
    if ((expected == ES_NO_STREAM && cur != 0) ||
        (expected == ES_STREAM_EXISTS && cur == 0) ||
        (expected >= 0 && expected != cur)) {
        conflict(err, stream, expected, cur);
        goto done;
    }
    if (ev[0].after && !last_is(m, si, cur, ev[0].after)) {
        es_last_id_conflict(err, stream, expected, cur, "");
        goto done;
    }

    /* 4. new ids, then memory: nothing visible changes until step 5 */
    for (size_t i = 0; i < n; i++) {
        if (ev[i].id)
            continue;
        for (;;) {
            size_t j = 0;
            es_uuid_v7_bytes(pend[i].id);
            for (; j < n; j++)
                if (j != i && (ev[j].id || j < i) &&
                    memcmp(pend[j].id, pend[i].id, 16) == 0)
                    break;
            if (j == n && !id_find(m, pend[i].id))
                break;
        }
    }
    if (reserve(m, si, n, err) < 0)
        goto done;
    if (!si) {
        const char *dash = strchr(stream, '-');
        fresh.name = strdup(stream);
        fresh.hash = sh;
        fresh.cat_len = (uint32_t)(dash ? (size_t)(dash - stream)
                                        : strlen(stream));
        fresh.cap = n < 4 ? 4 : (uint32_t)n;
        fresh.pos = malloc(fresh.cap * sizeof *fresh.pos);
        if (!fresh.name || !fresh.pos) {
            free(fresh.name);
            free(fresh.pos);
            oom(err);
            goto done;
        }
    }
    char *blob = arena_alloc(m, bytes);
    if (!blob) {
        free(fresh.name);
        free(fresh.pos);
        oom(err);
        goto done;
    }

    /* 5. commit: cannot fail */
    if (!si) {
        m->streams[m->nstreams] = fresh;
        itab_insert(&m->stab, sh, m->nstreams + 1);
        si = ++m->nstreams;
    }
    mstream *st = &m->streams[si - 1];
    int64_t now = es_time_now();
    if (now < m->last_time)
        now = m->last_time;
    m->last_time = now;
    for (size_t i = 0; i < n; i++) {
        uint32_t pos = ++m->nevents;
        mevent *e = ev_at(m, pos);
        memcpy(e->id, pend[i].id, 16);
        e->stream = si - 1;
        e->version = ++st->n;
        e->type = pend[i].type;
        e->data_len = (uint32_t)ev[i].data_len;
        e->meta_len = (uint32_t)pend[i].meta_len;
        e->recorded_at = now;
        e->data = blob;
        memcpy(blob, ev[i].data, ev[i].data_len);
        blob += ev[i].data_len;
        *blob++ = '\0';
        memcpy(blob, pend[i].meta, pend[i].meta_len);
        blob += pend[i].meta_len;
        *blob++ = '\0';
        st->pos[e->version - 1] = pos;
        itab_insert(&m->ids, hash_id(e->id), pos);
    }
    out->version = st->n;
    out->position = m->nevents;
    es_time_format(now, out->recorded_at);
    rc = 0;
done:
    if (pend != small)
        free(pend);
    return rc;
}

static int mem_version(es_store *s, const char *stream, int64_t *out,
                       es_error *err)
{
    mstore *m = (mstore *)s;
    uint32_t si = stream_find(m, stream, hash_str(stream));
    (void)err;
    *out = si ? m->streams[si - 1].n : 0;
    return 0;
}

/* ---- cursors ------------------------------------------------------------ */

typedef struct mcursor {
    es_cursor base;
    mstore *m;
    /* stream reads */
    uint32_t stream;
    int64_t next, last;      /* versions: next to return, last (inclusive) */
    int step;
    /* read_all */
    uint32_t scan, end;      /* last position scanned; end of the snapshot */
    int64_t limit, returned;
    int done;
    char *category;
    size_t category_len;
    uint8_t *typeset;        /* NULL = every type */
    uint32_t ntypeset;
    /* the current event's borrowed text */
    char id[37];
    char at[32];
    uint32_t cp_pos;         /* read_all: the checkpoint's position */
    char cp[32];             /* ... as text, made when asked */
} mcursor;

static void fill_event(mcursor *c, uint32_t pos, es_event *out)
{
    const mevent *e = ev_at(c->m, pos);
    uuid_unparse_lower(e->id, c->id);
    es_time_format(e->recorded_at, c->at);
    out->id = c->id;
    out->stream = c->m->streams[e->stream].name;
    out->type = c->m->types[e->type].name;
    out->version = e->version;
    out->position = pos;
    out->data = e->data;
    out->data_len = e->data_len;
    out->metadata = e->data + e->data_len + 1;
    out->metadata_len = e->meta_len;
    out->recorded_at = c->at;
}

static int stream_next(es_cursor *cur, es_event *out, es_error *err)
{
    mcursor *c = (mcursor *)cur;
    (void)err;
    if (c->step == 0 || (c->step > 0 ? c->next > c->last : c->next < c->last))
        return 0;
    if (c->limit && c->returned >= c->limit)
        return 0;
    fill_event(c, c->m->streams[c->stream].pos[c->next - 1], out);
    c->next += c->step;
    c->returned++;
    return 1;
}

static void cursor_destroy(es_cursor *cur)
{
    mcursor *c = (mcursor *)cur;
    free(c->category);
    free(c->typeset);
    free(c);
}

static const es_cursor_ops stream_cursor_ops = {.next = stream_next,
                                                .destroy = cursor_destroy};

static mcursor *cursor_new(mstore *m, es_error *err)
{
    mcursor *c = calloc(1, sizeof *c);
    if (!c) {
        oom(err);
        return NULL;
    }
    c->m = m;
    return c;
}

static es_cursor *mem_read(es_store *s, const char *stream,
                           const es_read_opts *o, es_error *err)
{
    mstore *m = (mstore *)s;
    int64_t before = 0, n, hi, lo;
    uint32_t si;
    mcursor *c;

    if (o->before && es_time_parse(o->before, &before, err) < 0)
        return NULL;
    if (!(c = cursor_new(m, err)))
        return NULL;
    c->base.ops = &stream_cursor_ops;
    c->limit = o->limit;
    si = stream_find(m, stream, hash_str(stream));
    if (!si)
        return &c->base;                  /* step 0: nothing */
    const mstream *st = &m->streams[si - 1];
    n = st->n;
    if (o->before) {
        /* recorded_at never decreases: count the events before `before` */
        int64_t a = 0, b = n;
        while (a < b) {
            int64_t mid = a + (b - a) / 2;
            if (ev_at(m, st->pos[mid])->recorded_at < before)
                a = mid + 1;
            else
                b = mid;
        }
        n = a;
    }
    c->stream = si - 1;
    if (!o->backward) {
        lo = o->from ? o->from : 1;
        hi = o->to && o->to < n ? o->to : n;
        c->step = 1;
        c->next = lo;
        c->last = hi;
    } else {
        hi = o->from && o->from < n ? o->from : n;
        lo = o->to ? o->to : 1;
        c->step = -1;
        c->next = hi;
        c->last = lo;
    }
    return &c->base;
}

/* read_all */

static int category_match(const mcursor *c, const mstream *st)
{
    return st->cat_len == c->category_len &&
           memcmp(st->name, c->category, c->category_len) == 0;
}

static int all_next(es_cursor *cur, es_event *out, es_error *err)
{
    mcursor *c = (mcursor *)cur;
    mstore *m = c->m;
    uint32_t last_stream = UINT32_MAX;
    int last_match = 0;
    (void)err;
    if (c->done)
        return 0;
    while (c->scan < c->end && c->returned < c->limit) {
        uint32_t pos = ++c->scan;
        const mevent *e = ev_at(m, pos);
        if (c->typeset && (e->type >= c->ntypeset || !c->typeset[e->type]))
            continue;
        if (c->category) {
            if (e->stream != last_stream) {
                last_stream = e->stream;
                last_match = category_match(c, &m->streams[e->stream]);
            }
            if (!last_match)
                continue;
        }
        fill_event(c, pos, out);
        c->returned++;
        c->cp_pos = pos;
        return 1;
    }
    /* batch full (checkpoint stays at the last event returned) or the
     * snapshot's end reached (checkpoint after everything scanned) */
    if (c->returned < c->limit)
        c->cp_pos = c->scan;
    c->done = 1;
    return 0;
}

static const char *all_checkpoint(es_cursor *cur)
{
    mcursor *c = (mcursor *)cur;
    snprintf(c->cp, sizeof c->cp, "0:%lu", (unsigned long)c->cp_pos);
    return c->cp;
}

static const es_cursor_ops all_cursor_ops = {.next = all_next, .checkpoint = all_checkpoint,
                                             .destroy = cursor_destroy};

/* "0:<position>", strictly. */
static int parse_checkpoint(const char *text, uint32_t *pos, es_error *err)
{
    const char *p = text + 2;
    uint64_t v = 0;
    if (text[0] != '0' || text[1] != ':' || !*p)
        goto bad;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            goto bad;
        v = v * 10 + (uint64_t)(*p - '0');
        if (v > MAX_EVENTS)
            goto bad;
    }
    *pos = (uint32_t)v;
    return 0;
bad:
    return es_fail(err, ES_INVALID, "bad checkpoint '%.80s' (a memory store's "
                   "checkpoints look like \"0:<position>\")", text);
}

static es_cursor *mem_read_all(es_store *s, const es_read_all_opts *o,
                               es_error *err)
{
    mstore *m = (mstore *)s;
    uint32_t after = 0;
    mcursor *c;

    if (o->after && parse_checkpoint(o->after, &after, err) < 0)
        return NULL;
    if (o->ntypes && !o->types) {
        es_fail(err, ES_INVALID, "types: %zu types but no array", o->ntypes);
        return NULL;
    }
    for (size_t i = 0; i < o->ntypes; i++)
        if (!o->types[i]) {
            es_fail(err, ES_INVALID, "types: item %zu is not a string", i + 1);
            return NULL;
        }
    if (!(c = cursor_new(m, err)))
        return NULL;
    c->base.ops = &all_cursor_ops;
    c->scan = after;
    c->end = m->nevents;
    c->limit = o->limit ? o->limit : 1000;
    c->cp_pos = after;
    if (o->category) {
        c->category_len = strlen(o->category);
        c->category = malloc(c->category_len + 1);
        if (!c->category)
            goto fail;
        memcpy(c->category, o->category, c->category_len + 1);
    }
    if (o->ntypes) {
        c->ntypeset = m->ntypes;
        c->typeset = calloc(m->ntypes + 1, 1);
        if (!c->typeset)
            goto fail;
        for (size_t i = 0; i < o->ntypes; i++) {
            uint32_t t = type_find(m, o->types[i], hash_str(o->types[i]));
            if (t)
                c->typeset[t - 1] = 1;
        }
    }
    return &c->base;
fail:
    cursor_destroy(&c->base);
    oom(err);
    return NULL;
}

/* ---- snapshots: like the PostgreSQL table, one per (stream, version) ---- */

static int mem_save_snapshot(es_store *s, const char *stream, int64_t version,
                             int64_t schema_version, const char *state,
                             size_t state_len, es_error *err)
{
    mstore *m = (mstore *)s;
    uint64_t h = hash_str(stream);
    uint32_t si = stream_find(m, stream, h), k;
    mstream *st;
    char *copy;

    if (!(copy = malloc(state_len + 1)))
        return oom(err);
    memcpy(copy, state, state_len);
    copy[state_len] = '\0';
    if (!si) {
        /* a stream entry with no events: invisible to reads and versions */
        const char *dash = strchr(stream, '-');
        mstream fresh = {0};
        if (reserve(m, 0, 0, err) < 0 || !(fresh.name = strdup(stream))) {
            free(copy);
            return err->kind ? -1 : oom(err);
        }
        fresh.hash = h;
        fresh.cat_len = (uint32_t)(dash ? (size_t)(dash - stream)
                                        : strlen(stream));
        m->streams[m->nstreams] = fresh;
        itab_insert(&m->stab, h, m->nstreams + 1);
        si = ++m->nstreams;
    }
    st = &m->streams[si - 1];
    for (k = 0; k < st->nsnaps && st->snaps[k].version < version; k++)
        ;
    if (k < st->nsnaps && st->snaps[k].version == version) {
        free(st->snaps[k].state);
    } else {
        msnap *snaps = grow(st->snaps, &st->snaps_cap,
                            (uint64_t)st->nsnaps + 1, sizeof *snaps, 4);
        if (!snaps) {
            free(copy);
            return oom(err);
        }
        st->snaps = snaps;
        memmove(st->snaps + k + 1, st->snaps + k,
                (st->nsnaps - k) * sizeof *st->snaps);
        st->nsnaps++;
    }
    st->snaps[k].version = version;
    st->snaps[k].schema_version = schema_version;
    st->snaps[k].recorded_at = es_time_now();
    st->snaps[k].state = copy;
    st->snaps[k].state_len = state_len;
    return 0;
}

static int mem_load_snapshot(es_store *s, const char *stream,
                             int64_t max_version, int64_t schema_version,
                             es_snapshot *out, es_error *err)
{
    mstore *m = (mstore *)s;
    uint32_t si = stream_find(m, stream, hash_str(stream));
    (void)err;
    if (!si)
        return 0;
    const mstream *st = &m->streams[si - 1];
    for (uint32_t k = st->nsnaps; k-- > 0;) {
        const msnap *sn = &st->snaps[k];
        if ((max_version > 0 && sn->version > max_version) ||
            sn->schema_version != schema_version)
            continue;
        es_time_format(sn->recorded_at, m->snap_time);
        out->version = sn->version;
        out->schema_version = sn->schema_version;
        out->state = sn->state;
        out->state_len = sn->state_len;
        out->recorded_at = m->snap_time;
        return 1;
    }
    return 0;
}

/* ---- open / close ------------------------------------------------------- */

static void mem_disconnect(es_store *s)
{
    mstore *m = (mstore *)s;
    for (uint32_t i = 0; i < m->nchunks; i++)
        free(m->chunks[i]);
    free(m->chunks);
    for (uint32_t i = 0; i < m->nstreams; i++) {
        mstream *st = &m->streams[i];
        for (uint32_t k = 0; k < st->nsnaps; k++)
            free(st->snaps[k].state);
        free(st->snaps);
        free(st->name);
        free(st->pos);
    }
    free(m->streams);
    for (uint32_t i = 0; i < m->ntypes; i++)
        free(m->types[i].name);
    free(m->types);
    free(m->ids.slot);
    free(m->stab.slot);
    free(m->ttab.slot);
    while (m->arena) {
        ablock *next = m->arena->next;
        free(m->arena);
        m->arena = next;
    }
    memset((char *)m + sizeof m->base, 0, sizeof *m - sizeof m->base);
}

static void mem_destroy(es_store *s)
{
    free(s);
}

static const es_store_ops memory_ops = {
    .kind = "memory",
    .migrate = mem_migrate,
    .append = mem_append,
    .version = mem_version,
    .read = mem_read,
    .read_all = mem_read_all,
    .save_snapshot = mem_save_snapshot,
    .load_snapshot = mem_load_snapshot,
    /* query, begin/commit/rollback, listen/wait stay NULL: store.c reports
     * them as unsupported (es_wait just sleeps) */
    .disconnect = mem_disconnect,
    .destroy = mem_destroy,
};

es_store *es_memory_open(const char *name, es_error *err)
{
    mstore *m;
    (void)name;   /* a label only: every open is a new, empty store */
    m = calloc(1, sizeof *m);
    if (!m) {
        oom(err);
        return NULL;
    }
    m->base.ops = &memory_ops;
    return &m->base;
}
