/*
 * eventsourcing.h - public C API of the eventsourcing core.
 *
 * The core knows nothing of Lua. Payloads cross this boundary as JSON text.
 * Every function that can fail takes an es_error* and fills it in; it
 * returns -1 (or NULL) on failure and 0 (or an object) on success.
 *
 * Pointers inside an es_event returned by es_cursor_next are borrowed: they
 * stay valid until the next call on the same cursor or until it is freed.
 */
#ifndef EVENTSOURCING_H
#define EVENTSOURCING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ES_VERSION "0.1.0"

/* Kinds of failure; names as in the Lua contract (err.kind). */
typedef enum es_kind {
    ES_OK = 0,
    ES_CONFLICT,      /* expected version did not match */
    ES_REJECTED,      /* a business rule said no (used by upper layers) */
    ES_NOT_FOUND,
    ES_INVALID,       /* bad input: the caller can fix it */
    ES_CONNECTION,    /* the database went away; the next call reconnects */
    ES_DATABASE       /* the database refused: see sqlstate */
} es_kind;

/* Expected-version sentinels; any value >= 0 is an exact version
 * (0 meaning "the stream has no events"). */
#define ES_ANY           (-1)
#define ES_NO_STREAM     (-2)
#define ES_STREAM_EXISTS (-3)

#define ES_MESSAGE_MAX 512

/* Why an operation failed, for code that acts on it (err.reason in Lua):
 * decide from this, never from message text. ES_REASON_NONE when nothing
 * finer than the kind applies. */
typedef enum es_reason {
    ES_REASON_NONE = 0,
    ES_REASON_VERSION,        /* "version": expected version mismatch */
    ES_REASON_ID_TAKEN,       /* "id_taken": an event id is used elsewhere */
    ES_REASON_ORDER,          /* "order": the stream-order rule of append
                                 (40001); the caller's transaction is
                                 aborted: roll back, retry in a new one */
    ES_REASON_SERIALIZATION,  /* "serialization": other 40001, or 40P01 */
    ES_REASON_TX_ABORTED,     /* "tx_aborted": failed inside the caller's
                                 transaction, which must be rolled back */
    ES_REASON_TIMEOUT,        /* "timeout": 57014 statement timeout, 55P03
                                 lock timeout */
    ES_REASON_LAST_ID         /* "last_id": the stream's last event is not
                                 the one es_event_in.after names */
} es_reason;

typedef struct es_error {
    es_kind kind;
    char message[ES_MESSAGE_MAX];
    char sqlstate[6];          /* ES_DATABASE / ES_CONNECTION, else "" */
    int64_t expected;          /* ES_CONFLICT: what the caller expected */
    int64_t actual;            /* ES_CONFLICT: the stream's version */
    es_reason reason;
} es_error;

const char *es_kind_name(es_kind kind);
/* "version", "id_taken", ...; NULL for ES_REASON_NONE. */
const char *es_reason_name(es_reason reason);
void es_error_clear(es_error *err);
/* Fills err and returns -1, so callers can `return es_fail(...)`. */
int es_fail(es_error *err, es_kind kind, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* An event to append. data and metadata are JSON text (metadata an object,
 * or NULL for {}). id is a UUID in text form, or NULL to have one made.
 * new_id: 1 when the caller made id for this append (a new UUID, never
 * sent before): the store then skips looking for it among stored events,
 * which only a retry of an earlier append could find (the unique index
 * still refuses a duplicate; outside a transaction a refused append is
 * then checked as usual, inside one the refusal has aborted it and an id
 * already stored fails as ES_INVALID, reason ES_REASON_TX_ABORTED).
 * 0 (the default) for ids that may have been sent before.
 * after (read on the first event of an append only; NULL: no such check):
 * the id, as a UUID, that the stream's last event must have for the
 * append to go ahead; else it is refused as ES_CONFLICT, reason
 * ES_REASON_LAST_ID (actual: the stream's version). A version names a
 * place in the stream, this names what is there: a state kept from an
 * earlier read is the stream's head only if both hold (after a restore
 * from a backup, a stream may reach the same version again with other
 * events). */
typedef struct es_event_in {
    const char *id;
    const char *type;
    const char *data;
    size_t data_len;
    const char *metadata;
    size_t metadata_len;
    int new_id;
    const char *after;
} es_event_in;

typedef struct es_append_result {
    int64_t version;    /* the stream's version after the append */
    int64_t position;   /* global position of the last event appended */
    char recorded_at[32];  /* when the events were recorded (ISO-8601) */
    int idempotent;     /* 1: these very events were stored there already
                           (a retry of the same append): nothing was added */
    int one_trip;       /* es_append_commit: it went in one round trip */
} es_append_result;

/* An event read back. */
typedef struct es_event {
    const char *id;
    const char *stream;
    const char *type;
    int64_t version;
    int64_t position;
    const char *data;
    size_t data_len;
    const char *metadata;
    size_t metadata_len;
    const char *recorded_at;   /* ISO-8601 UTC, microseconds, "...Z" */
    int32_t part;              /* read_all with partitions: the stream's
                                  partition; untouched otherwise */
} es_event;

typedef struct es_read_opts {
    int64_t from;        /* first version wanted; 0 = from the start (or end
                            when backward) */
    int64_t to;          /* last version wanted (inclusive); 0 = no bound */
    int64_t limit;       /* at most this many events; 0 = no limit */
    int backward;        /* newest first */
    const char *before;  /* ISO-8601 instant: only events recorded strictly
                            before it; NULL = no bound */
    int prefetch;        /* PostgreSQL: ask for the next page while the
                            caller works through this one. The store's
                            session is busy meanwhile: make no other call
                            on the store until the cursor ends or is freed.
                            Ignored with a limit. */
} es_read_opts;

typedef struct es_read_all_opts {
    const char *after;           /* checkpoint text, NULL = from the start */
    int64_t limit;               /* batch size; 0 = 1000 */
    const char *category;        /* stream prefix before the first '-' */
    const char *const *types;    /* only these event types (ntypes of them) */
    size_t ntypes;
    int prefetch;                /* PostgreSQL: when the batch is full, ask
                                    for the next one (same filters, after
                                    this batch's checkpoint) at once; a later
                                    read_all asking exactly that gets it
                                    without waiting for the server again.
                                    Other calls meanwhile are fine. */
    const int64_t *shards;       /* Citus: read only these shards of the
                                    events table (nshards ids; NULL: all).
                                    A checkpoint covers the shards it was
                                    read with. Elsewhere ES_INVALID. */
    size_t nshards;
    int64_t partitions;          /* PostgreSQL: > 0 reads only streams with
                                    (hashtext(stream) & 0x7fffffff) %
                                    partitions in parts (nparts of them),
                                    the consumer groups' hash; each event
                                    gets its part. Elsewhere ES_INVALID. */
    const int64_t *parts;
    size_t nparts;
    const char *upto;            /* PostgreSQL: checkpoint; no event after it
                                    (a rebuild's common bound). */
} es_read_all_opts;

typedef struct es_store es_store;
typedef struct es_cursor es_cursor;

/* "memory:" (or "memory:NAME") opens an in-memory store; anything else is a
 * PostgreSQL URL or libpq conninfo string. Options after '?' or in conninfo
 * are libpq's; the schema is chosen with es_open_schema. */
es_store *es_open(const char *target, es_error *err);
es_store *es_open_schema(const char *target, const char *schema,
                         es_error *err);
/* Open options. pooler says what sits between the library and PostgreSQL:
 * "none" (default), "session" (a pooler in session mode: same as none),
 * or "transaction" (PgBouncer pool_mode=transaction and the like): then
 * the store keeps no session state (unnamed statements, SET LOCAL, no
 * LISTEN). A PostgreSQL target may carry it too, as the URL parameter
 * ?pooler=transaction or the conninfo keyword pooler=transaction (taken
 * out before libpq sees the rest); o->pooler wins over the target. */
typedef struct es_open_opts {
    const char *schema;          /* NULL: "eventsourcing" */
    const char *pooler;          /* NULL: from the target, else "none" */
} es_open_opts;
es_store *es_open_with(const char *target, const es_open_opts *o,
                       es_error *err);
/* What a store knows about its session, for status pages and checks. */
typedef struct es_store_status {
    const char *pooler;          /* "none", "session", "transaction" */
    int connected;               /* a session is open */
    int in_transaction;
    int prepared;                /* statements prepared in this session */
    int proxied;                 /* 1: a proxy (pooler) answers for the
                                    server: the backend pid libpq was told at
                                    connect is not the server's
                                    pg_backend_pid(); 0: direct; -1 unknown
                                    (memory, or no session) */
} es_store_status;
/* "none", "session" or "transaction": what the store was opened for. */
const char *es_store_pooler(const es_store *store);
/* Fills out; checks for a proxy with one query when the session is free
 * (not inside a transaction or a read). */
int es_status(es_store *store, es_store_status *out, es_error *err);
/* 1 inside es_begin .. es_commit/es_rollback, else 0; asks nothing. */
int es_in_transaction(const es_store *store);
/* PostgreSQL: statement_timeout and lock_timeout (milliseconds, 0 = none)
 * for every statement of this store, kept across reconnects. A statement
 * that runs out fails with ES_DATABASE and sqlstate 57014 or 55P03.
 * Memory stores ignore them. */
int es_set_timeouts(es_store *store, int64_t statement_ms, int64_t lock_ms,
                    es_error *err);
/* Closes the connection; the store is freed once no cursor uses it. */
void es_close(es_store *store);
/* es_close, after waiting for a copy still being sent (es_copy with count
 * NULL): -1 with err when such a copy failed and no call has reported it
 * yet (its own error, as es_copy_wait gives it), so a caller that closes
 * without es_copy_wait still learns its rows did not go in. The store is
 * closed either way; 0 otherwise (also when already closed). */
int es_close_checked(es_store *store, es_error *err);
int es_is_closed(const es_store *store);
const char *es_store_kind(const es_store *store);   /* "memory"/"postgresql" */
/* The PostgreSQL schema holding the store's objects; NULL for memory. */
const char *es_store_schema(const es_store *store);

int es_migrate(es_store *store, es_error *err);
/* PostgreSQL with Citus: lays the migrated schema out for Citus (events
 * and snapshots distributed by stream and colocated, append() delegated
 * to the worker holding the stream; docs/scale-out.md). shards: the shard
 * count, 0 for Citus' citus.shard_count. Idempotent; ES_INVALID when the
 * database has no Citus or the store is not PostgreSQL. */
int es_distribute(es_store *store, int shards, es_error *err);

/* What a store is: kind as es_store_kind; citus: the Citus extension's
 * version (NULL without Citus); distributed: the events table is
 * distributed (read_all checkpoints then hold a cursor per shard);
 * shards: how many shards it has. */
typedef struct es_store_info {
    const char *kind;
    const char *citus;
    int distributed;
    int shards;
} es_store_info;
int es_store_info_get(es_store *store, es_store_info *out, es_error *err);
int es_append(es_store *store, const char *stream, const es_event_in *events,
              size_t n, int64_t expected, es_append_result *out,
              es_error *err);
int es_stream_version(es_store *store, const char *stream, int64_t *out,
                      es_error *err);

es_cursor *es_read(es_store *store, const char *stream,
                   const es_read_opts *opts, es_error *err);
es_cursor *es_read_all(es_store *store, const es_read_all_opts *opts,
                       es_error *err);
/* 1: *out holds an event; 0: no more; -1: failure (err filled). */
int es_cursor_next(es_cursor *cur, es_event *out, es_error *err);
/* read_all: the checkpoint to pass as `after` next time (the `after` given
 * when nothing was read). NULL for stream cursors. */
const char *es_cursor_checkpoint(es_cursor *cur);
void es_cursor_free(es_cursor *cur);

/* Snapshots: a stream's folded state (JSON) as of a version, tagged with
 * the schema version of the code that made it. */
typedef struct es_snapshot {
    int64_t version;
    int64_t schema_version;
    const char *state;         /* JSON text; valid until the next call */
    size_t state_len;
    const char *recorded_at;
} es_snapshot;

int es_save_snapshot(es_store *store, const char *stream, int64_t version,
                     int64_t schema_version, const char *state,
                     size_t state_len, es_error *err);
/* The newest snapshot of the stream with version <= max_version (0 = any)
 * and the given schema_version. 1: found; 0: none; -1: failure. */
int es_load_snapshot(es_store *store, const char *stream,
                     int64_t max_version, int64_t schema_version,
                     es_snapshot *out, es_error *err);

/* Generic parameterized SQL, for the layers above (read models,
 * projections). PostgreSQL only; memory stores fail with ES_INVALID. */
typedef struct es_rows es_rows;
es_rows *es_query(es_store *store, const char *sql, int nparams,
                  const char *const *params, es_error *err);
int es_rows_count(const es_rows *rows);
int es_rows_columns(const es_rows *rows);
const char *es_rows_name(const es_rows *rows, int col);
/* Column type as PostgreSQL's type oid (16 bool, 20/21/23 ints, 700/701
 * floats, 114/3802 json/jsonb, ...); NULL values give NULL. */
unsigned es_rows_type(const es_rows *rows, int col);
const char *es_rows_value(const es_rows *rows, int row, int col,
                          size_t *len);
void es_rows_free(es_rows *rows);

/* Bulk load (PostgreSQL): COPY schema.table (columns)
 * FROM STDIN, `data` being len bytes of COPY's text format (fields
 * separated by tabs, \N for NULL, backslash escapes, one row per line).
 * One statement: a row the server refuses copies nothing (inside a
 * transaction, that transaction is aborted). *count gets the rows copied.
 * schema NULL: the store's ("pg_temp": the session's temporary tables).
 * Memory stores fail with ES_INVALID.
 * count NULL: do not wait for the server. es_copy returns once the COPY
 * has begun; a thread of the store sends the rows (a copy of data) and
 * collects the result while the caller goes on. The store's next call
 * waits for it first and fails with the copy's error if it failed;
 * es_copy_wait waits and reports it, with the rows copied since the last
 * es_copy_wait. */
int es_copy(es_store *store, const char *schema, const char *table,
            const char *const *columns,
            size_t ncolumns, const char *data, size_t len, int64_t *count,
            es_error *err);
int es_copy_wait(es_store *store, int64_t *count, es_error *err);

/* Transactions (PostgreSQL): appends inside one commit together. */
int es_begin(es_store *store, es_error *err);
int es_commit(es_store *store, es_error *err);
int es_rollback(es_store *store, es_error *err);
/* The transaction's last statement and COMMIT together (one round trip):
 * es_query's statement, then es_commit. The transaction ends either way:
 * when the statement fails it is rolled back and the statement's error is
 * reported (the reasons a query inside the transaction gets). */
int es_query_commit(es_store *store, const char *sql, int nparams,
                    const char *const *params, es_error *err);
/* The same, with the statement's rows in *rows on success (NULL only when
 * there was no memory for them). */
int es_query_commit_rows(es_store *store, const char *sql, int nparams,
                         const char *const *params, es_rows **rows,
                         es_error *err);
/* The transaction's last append, then es_query_commit's statement and
 * COMMIT: one round trip when the append is one event on a single-node
 * store (else the append's, then the commit's). The transaction ends
 * either way; nothing of it is committed unless all three succeed. A
 * refused append is the conflict es_append reports (expected, actual).
 * An idempotent success (out->idempotent: these events were stored there
 * already) runs no statement and commits nothing. On success *rows holds
 * the statement's rows (NULL after an idempotent success, or when there
 * was no memory for them). */
int es_append_commit(es_store *store, const char *stream,
                     const es_event_in *events, size_t n, int64_t expected,
                     const char *sql, int nparams, const char *const *params,
                     es_append_result *out, es_rows **rows, es_error *err);
/* A query of the open transaction sent ahead: it waits for the
 * transaction's next statement and goes in front of it, in the same round
 * trip; es_ahead_rows gives its rows then (or runs it on its own when no
 * statement took it). One at a time. When it fails, the statement it went
 * with reports its error and es_ahead_rows says it did not run; a commit
 * runs one still waiting, a rollback drops it. */
int es_query_ahead(es_store *store, const char *sql, int nparams,
                   const char *const *params, es_error *err);
es_rows *es_ahead_rows(es_store *store, es_error *err);

/* Wake-ups (PostgreSQL): every committed append notifies the store's
 * channel. es_listen subscribes this session (again after a reconnect);
 * es_wait blocks up to timeout_ms for a notification: 1 woken, 0 timed
 * out, -1 failure. A wake-up is only a hint: read to find out what is new.
 * Memory stores have nothing to wait for: es_wait sleeps and returns 0. */
int es_listen(es_store *store, es_error *err);
int es_wait(es_store *store, int timeout_ms, es_error *err);

/* UUIDs: a time-ordered version 7 UUID in text form (37 bytes with NUL). */
void es_uuid_v7(char out[37]);
int es_uuid_valid(const char *text);

#ifdef __cplusplus
}
#endif
#endif
