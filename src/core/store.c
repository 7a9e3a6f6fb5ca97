/*
 * store.c - the public store API: argument checks shared by every
 * implementation, dispatch through the vtable, and reference counting so a
 * cursor never outlives the store it reads from.
 */
#include "store.h"
#include "json_syntax.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

static int store_usable(es_store *s, es_error *err)
{
    if (!s)
        return es_fail(err, ES_INVALID, "no store");
    if (s->closed)
        return es_fail(err, ES_INVALID, "store is closed");
    return 0;
}

static void store_unref(es_store *s)
{
    if (--s->refs == 0)
        s->ops->destroy(s);
}

es_store *es_open(const char *target, es_error *err)
{
    return es_open_schema(target, NULL, err);
}

es_store *es_open_schema(const char *target, const char *schema,
                         es_error *err)
{
    es_open_opts o = { schema, NULL };
    return es_open_with(target, &o, err);
}

es_store *es_open_with(const char *target, const es_open_opts *o,
                       es_error *err)
{
    es_store *s;
    es_error_clear(err);
    if (!target) {
        es_fail(err, ES_INVALID, "no store target given");
        return NULL;
    }
    if (o && o->pooler && strcmp(o->pooler, "none") != 0 &&
        strcmp(o->pooler, "session") != 0 &&
        strcmp(o->pooler, "transaction") != 0) {
        es_fail(err, ES_INVALID, "pooler must be \"none\", \"session\" or "
                "\"transaction\", not '%.40s'", o->pooler);
        return NULL;
    }
    if (strncmp(target, "memory:", 7) == 0)
        s = es_memory_open(target + 7, err);
    else
        s = es_pg_open(target, o, err);
    if (s) {
        s->refs = 1;
        s->closed = 0;
    }
    return s;
}

void es_close(es_store *s)
{
    if (!s || s->closed)
        return;
    s->closed = 1;
    s->ops->disconnect(s);
    store_unref(s);
}

int es_close_checked(es_store *s, es_error *err)
{
    int64_t copied;
    int rc = 0;
    es_error_clear(err);
    if (!s || s->closed)
        return 0;
    /* the copy thread still owns the session: wait for it, and take the
     * outcome no call has reported yet (a rollback already dropped one
     * that failed inside its transaction) */
    if (s->ops->copy_wait)
        rc = s->ops->copy_wait(s, &copied, err);
    es_close(s);
    return rc;
}

int es_is_closed(const es_store *s) { return s->closed; }

const char *es_store_kind(const es_store *s) { return s->ops->kind; }

const char *es_store_schema(const es_store *s) { return s->schema; }

const char *es_store_pooler(const es_store *s)
{
    return s->pooler ? s->pooler : "none";
}

int es_in_transaction(const es_store *s)
{
    return s->ops->in_transaction ? s->ops->in_transaction(s) : 0;
}

int es_migrate(es_store *s, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return -1;
    return s->ops->migrate(s, err);
}

int es_distribute(es_store *s, int shards, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return -1;
    if (!s->ops->distribute)
        return es_fail(err, ES_INVALID, "%s stores cannot be distributed "
                       "(PostgreSQL with Citus only)", s->ops->kind);
    return s->ops->distribute(s, shards, err);
}

int es_store_info_get(es_store *s, es_store_info *out, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return -1;
    memset(out, 0, sizeof *out);
    out->kind = s->ops->kind;
    return s->ops->info ? s->ops->info(s, out, err) : 0;
}

/* Names are stored as PostgreSQL text: valid UTF-8 (the server refuses
 * anything else, so the memory store must too), printable, bounded. */
static int valid_name(const char *name, const char *what, size_t max,
                      es_error *err)
{
    size_t n, at;
    const char *why;
    if (!name || !*name)
        return es_fail(err, ES_INVALID, "%s must be a non-empty string", what);
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        if (*p < 0x20 || *p == 0x7f)
            return es_fail(err, ES_INVALID,
                           "%s must not contain control characters", what);
    n = strlen(name);
    if (n > max)
        return es_fail(err, ES_INVALID, "%s longer than %zu bytes", what, max);
    if (!es_utf8_valid(name, n, &at, &why))
        return es_fail(err, ES_INVALID, "%s is not valid UTF-8 (%s at byte "
                       "%zu)", what, why, at + 1);
    return 0;
}

int es_valid_stream(const char *stream, es_error *err)
{
    return valid_name(stream, "stream name", 1000, err);
}

int es_valid_event_type(const char *type, es_error *err)
{
    return valid_name(type, "event type", 200, err);
}

int es_last_id_conflict(es_error *err, const char *stream, int64_t expected,
                        int64_t actual, const char *then)
{
    es_fail(err, ES_CONFLICT, "stream %.200s: its last event (version %lld) "
            "is not the one expected%s", stream, (long long)actual, then);
    err->expected = expected;
    err->actual = actual;
    err->reason = ES_REASON_LAST_ID;
    return -1;
}

/* What every append checks before the store sees it. */
static int append_valid(es_store *s, const char *stream,
                        const es_event_in *events, size_t n, int64_t expected,
                        es_error *err)
{
    char why[256];
    if (store_usable(s, err) < 0 || es_valid_stream(stream, err) < 0)
        return -1;
    if (n == 0)
        return es_fail(err, ES_INVALID, "append needs at least one event");
    if (expected < ES_STREAM_EXISTS)
        return es_fail(err, ES_INVALID, "expected version %lld is not valid",
                       (long long)expected);
    if (events[0].after && !es_uuid_valid(events[0].after))
        return es_fail(err, ES_INVALID, "expected last id '%.60s' is not a "
                       "UUID", events[0].after);
    for (size_t i = 0; i < n; i++) {
        if (es_valid_event_type(events[i].type, err) < 0)
            return -1;
        if (!events[i].data)
            return es_fail(err, ES_INVALID, "event %zu has no data", i + 1);
        if (es_json_payload_ok(events[i].data, events[i].data_len, 0, why,
                               sizeof why) < 0)
            return es_fail(err, ES_INVALID, "event %zu (%.200s): data %s",
                           i + 1, events[i].type, why);
        if (events[i].metadata &&
            es_json_payload_ok(events[i].metadata, events[i].metadata_len, 1,
                               why, sizeof why) < 0)
            return es_fail(err, ES_INVALID, "event %zu (%.200s): metadata %s",
                           i + 1, events[i].type, why);
        if (events[i].id && !es_uuid_valid(events[i].id))
            return es_fail(err, ES_INVALID, "event %zu: id '%.60s' is not a UUID",
                           i + 1, events[i].id);
        for (size_t j = 0; events[i].id && j < i; j++)
            if (events[j].id && strcmp(events[i].id, events[j].id) == 0)
                return es_fail(err, ES_INVALID,
                               "events %zu and %zu have the same id %s",
                               j + 1, i + 1, events[i].id);
    }
    return 0;
}

int es_append(es_store *s, const char *stream, const es_event_in *events,
              size_t n, int64_t expected, es_append_result *out,
              es_error *err)
{
    es_error_clear(err);
    memset(out, 0, sizeof *out);
    if (append_valid(s, stream, events, n, expected, err) < 0)
        return -1;
    return s->ops->append(s, stream, events, n, expected, out, err);
}

int es_append_commit(es_store *s, const char *stream,
                     const es_event_in *events, size_t n, int64_t expected,
                     const char *sql, int nparams, const char *const *params,
                     es_append_result *out, es_rows **rows, es_error *err)
{
    es_error_clear(err);
    memset(out, 0, sizeof *out);
    *rows = NULL;
    if (store_usable(s, err) < 0)
        return -1;
    if (!s->ops->append_commit)
        return es_fail(err, ES_INVALID, "%s stores have no transactions",
                       s->ops->kind);
    /* a refused argument ends the transaction too, as promised */
    if (append_valid(s, stream, events, n, expected, err) < 0) {
        es_error ignored;
        s->ops->rollback(s, &ignored);
        return -1;
    }
    return s->ops->append_commit(s, stream, events, n, expected, sql, nparams,
                                 params, out, rows, err);
}

int es_stream_version(es_store *s, const char *stream, int64_t *out,
                      es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0 || es_valid_stream(stream, err) < 0)
        return -1;
    return s->ops->version(s, stream, out, err);
}

static es_cursor *cursor_adopt(es_store *s, es_cursor *c)
{
    if (c) {
        c->store = s;
        s->refs++;
    }
    return c;
}

es_cursor *es_read(es_store *s, const char *stream, const es_read_opts *o,
                   es_error *err)
{
    es_read_opts def = {0};
    es_error_clear(err);
    if (store_usable(s, err) < 0 || es_valid_stream(stream, err) < 0)
        return NULL;
    if (!o)
        o = &def;
    if (o->from < 0 || o->to < 0 || o->limit < 0) {
        es_fail(err, ES_INVALID, "from, to and limit must not be negative");
        return NULL;
    }
    return cursor_adopt(s, s->ops->read(s, stream, o, err));
}

/* read_all's partition filter and upper bound: PostgreSQL stores only
 * (a memory store has no hashtext; on Citus partitions are shards). */
static int check_partitions(es_store *s, const es_read_all_opts *o,
                            es_error *err)
{
    if (!o->partitions && !o->nparts && !o->upto)
        return 0;
    if (!s->ops->distribute)
        return es_fail(err, ES_INVALID, "read_all: options partitions and "
                       "upto need a PostgreSQL store, not a %s one",
                       s->ops->kind);
    if (o->partitions < 0 || o->partitions > 4096 ||
        (o->nparts && !o->partitions))
        return es_fail(err, ES_INVALID, "read_all: option partitions must "
                       "be 1..4096");
    if (o->partitions && (!o->parts || !o->nparts))
        return es_fail(err, ES_INVALID, "read_all: option partition must "
                       "name at least one partition");
    for (size_t i = 0; i < o->nparts; i++)
        if (o->parts[i] < 0 || o->parts[i] >= o->partitions)
            return es_fail(err, ES_INVALID, "read_all: partition %lld is "
                           "not one of 0..%lld", (long long)o->parts[i],
                           (long long)o->partitions - 1);
    return 0;
}

es_cursor *es_read_all(es_store *s, const es_read_all_opts *o, es_error *err)
{
    es_read_all_opts def = {0};
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return NULL;
    if (!o)
        o = &def;
    if (o->limit < 0) {
        es_fail(err, ES_INVALID, "limit must not be negative");
        return NULL;
    }
    if (o->shards && !s->ops->distribute) {
        es_fail(err, ES_INVALID, "read_all: option shards is for stores "
                "distributed on Citus, not %s ones", s->ops->kind);
        return NULL;
    }
    if (check_partitions(s, o, err) < 0)
        return NULL;
    return cursor_adopt(s, s->ops->read_all(s, o, err));
}

int es_cursor_next(es_cursor *c, es_event *out, es_error *err)
{
    es_error_clear(err);
    if (c->store->closed)
        return es_fail(err, ES_INVALID, "store is closed");
    return c->ops->next(c, out, err);
}

const char *es_cursor_checkpoint(es_cursor *c)
{
    return c->ops->checkpoint ? c->ops->checkpoint(c) : NULL;
}

void es_cursor_free(es_cursor *c)
{
    if (!c)
        return;
    es_store *s = c->store;
    c->ops->destroy(c);
    store_unref(s);
}

int es_save_snapshot(es_store *s, const char *stream, int64_t version,
                     int64_t schema_version, const char *state,
                     size_t state_len, es_error *err)
{
    char why[256];
    es_error_clear(err);
    if (store_usable(s, err) < 0 || es_valid_stream(stream, err) < 0)
        return -1;
    if (version < 1)
        return es_fail(err, ES_INVALID, "snapshot version must be >= 1");
    if (!state)
        return es_fail(err, ES_INVALID, "snapshot has no state");
    if (es_json_payload_ok(state, state_len, 0, why, sizeof why) < 0)
        return es_fail(err, ES_INVALID, "snapshot state of stream %.200s: "
                       "%s", stream, why);
    if (!s->ops->save_snapshot)
        return es_fail(err, ES_INVALID, "%s stores keep no snapshots",
                       s->ops->kind);
    return s->ops->save_snapshot(s, stream, version, schema_version, state,
                                 state_len, err);
}

int es_load_snapshot(es_store *s, const char *stream, int64_t max_version,
                     int64_t schema_version, es_snapshot *out, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0 || es_valid_stream(stream, err) < 0)
        return -1;
    if (max_version < 0)
        return es_fail(err, ES_INVALID, "max_version must not be negative");
    if (!s->ops->load_snapshot)
        return es_fail(err, ES_INVALID, "%s stores keep no snapshots",
                       s->ops->kind);
    return s->ops->load_snapshot(s, stream, max_version, schema_version, out,
                                 err);
}

es_rows *es_query(es_store *s, const char *sql, int nparams,
                  const char *const *params, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return NULL;
    if (!s->ops->query) {
        es_fail(err, ES_INVALID, "%s stores do not run SQL", s->ops->kind);
        return NULL;
    }
    return s->ops->query(s, sql, nparams, params, err);
}

int es_copy(es_store *s, const char *schema, const char *table,
            const char *const *columns,
            size_t ncolumns, const char *data, size_t len, int64_t *count,
            es_error *err)
{
    es_error_clear(err);
    if (count)
        *count = 0;
    if (store_usable(s, err) < 0)
        return -1;
    if (!s->ops->copy)
        return es_fail(err, ES_INVALID, "%s stores have no tables to copy "
                       "rows into", s->ops->kind);
    if (!table || !*table)
        return es_fail(err, ES_INVALID, "copy: the table name must be a "
                       "non-empty string");
    if (ncolumns == 0)
        return es_fail(err, ES_INVALID, "copy: no columns given");
    for (size_t i = 0; i < ncolumns; i++)
        if (!columns[i] || !*columns[i])
            return es_fail(err, ES_INVALID, "copy: column %zu has an empty "
                           "name", i + 1);
    return s->ops->copy(s, schema, table, columns, ncolumns, data, len, count,
                        err);
}

int es_copy_wait(es_store *s, int64_t *count, es_error *err)
{
    es_error_clear(err);
    *count = 0;
    if (store_usable(s, err) < 0)
        return -1;
    if (!s->ops->copy_wait)
        return 0;         /* no copy of this store ever goes on alone */
    return s->ops->copy_wait(s, count, err);
}

#define TX_OP(fn, op)                                                  \
    int fn(es_store *s, es_error *err)                                 \
    {                                                                  \
        es_error_clear(err);                                           \
        if (store_usable(s, err) < 0)                                  \
            return -1;                                                 \
        if (!s->ops->op)                                               \
            return es_fail(err, ES_INVALID, "%s stores have no transactions", \
                           s->ops->kind);                              \
        return s->ops->op(s, err);                                     \
    }
TX_OP(es_begin, begin)
TX_OP(es_commit, commit)
TX_OP(es_rollback, rollback)

static int query_commit(es_store *s, const char *sql, int nparams,
                        const char *const *params, es_rows **rows,
                        es_error *err)
{
    es_error_clear(err);
    if (rows)
        *rows = NULL;
    if (store_usable(s, err) < 0)
        return -1;
    if (!s->ops->query_commit)
        return es_fail(err, ES_INVALID, "%s stores have no transactions",
                       s->ops->kind);
    return s->ops->query_commit(s, sql, nparams, params, rows, err);
}

int es_query_commit(es_store *s, const char *sql, int nparams,
                    const char *const *params, es_error *err)
{
    return query_commit(s, sql, nparams, params, NULL, err);
}

int es_query_commit_rows(es_store *s, const char *sql, int nparams,
                         const char *const *params, es_rows **rows,
                         es_error *err)
{
    return query_commit(s, sql, nparams, params, rows, err);
}

int es_query_ahead(es_store *s, const char *sql, int nparams,
                   const char *const *params, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return -1;
    if (!s->ops->query_ahead)
        return es_fail(err, ES_INVALID, "%s stores have no transactions",
                       s->ops->kind);
    return s->ops->query_ahead(s, sql, nparams, params, err);
}

es_rows *es_ahead_rows(es_store *s, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return NULL;
    if (!s->ops->ahead_rows) {
        es_fail(err, ES_INVALID, "%s stores have no transactions",
                s->ops->kind);
        return NULL;
    }
    return s->ops->ahead_rows(s, err);
}

int es_set_timeouts(es_store *s, int64_t statement_ms, int64_t lock_ms,
                    es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return -1;
    if (statement_ms < 0 || lock_ms < 0 || statement_ms > INT32_MAX ||
        lock_ms > INT32_MAX)
        return es_fail(err, ES_INVALID, "timeouts must be from 0 to %d ms",
                       INT32_MAX);
    return s->ops->set_timeouts ? s->ops->set_timeouts(s, statement_ms,
                                                       lock_ms, err) : 0;
}

int es_listen(es_store *s, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return -1;
    return s->ops->listen ? s->ops->listen(s, err) : 0;
}

int es_wait(es_store *s, int timeout_ms, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return -1;
    if (timeout_ms < 0)
        return es_fail(err, ES_INVALID, "timeout must not be negative");
    if (!s->ops->wait) {
        struct timespec ts = { timeout_ms / 1000, (timeout_ms % 1000) * 1000000L };
        nanosleep(&ts, NULL);
        return 0;
    }
    return s->ops->wait(s, timeout_ms, err);
}

int es_status(es_store *s, es_store_status *out, es_error *err)
{
    es_error_clear(err);
    if (store_usable(s, err) < 0)
        return -1;
    out->pooler = "none";
    out->connected = 0;
    out->in_transaction = 0;
    out->prepared = 0;
    out->proxied = -1;
    return s->ops->status ? s->ops->status(s, out, err) : 0;
}
