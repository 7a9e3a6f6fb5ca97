/*
 * pg.h - internals shared by the PostgreSQL store's files:
 *   pg.c          the session: connection, reconnects, error mapping,
 *                 statements, transactions, LISTEN, status
 *   pg_conninfo.c the library's own option inside a connection string
 *   pg_schema.c   migrations (schema versions, advisory lock): pg_schema.h
 *   pg_events.c   append, version, read and read_all cursors: pg_events.h
 *   pg_store.c    the operations table and es_pg_open, which tie them up
 *   pg_citus.c    the schema laid out on Citus; pg_citus_read.c its read_all
 *   pg_copy.c     bulk loads into tables (COPY FROM STDIN)
 *   pg_pipeline.c a statement and COMMIT in one round trip (commit_with)
 * Calls go one way: pg_store.c -> pg_schema.c, pg_events.c -> pg.c.
 */
#ifndef ES_PG_H
#define ES_PG_H

#include "store.h"
#include "buf.h"

#include <libpq-fe.h>
#include <sys/types.h>

/* Microseconds from 1970-01-01 to PostgreSQL's epoch 2000-01-01. */
#define PG_EPOCH_USEC INT64_C(946684800000000)

/* A binary int8 / timestamptz result field (network byte order). */
static inline uint64_t pg_be64(const char *v)
{
    const unsigned char *u = (const unsigned char *)v;
    uint64_t x = 0;
    for (int i = 0; i < 8; i++)
        x = (x << 8) | u[i];
    return x;
}

/* Prepared statements, made on first use in each session. */
enum {
    PG_APPEND,
    PG_APPEND_ONE,        /* one event, id made here: no function call */
    PG_APPEND_STRICT,     /* the same, a refusal an error (append_commit) */
    PG_VERSION,
    PG_LAST,              /* the stream's last version and event id */
    PG_READ_FORWARD,
    PG_READ_BACKWARD,
    PG_SNAPSHOT_SAVE,
    PG_SNAPSHOT_LOAD,
    PG_READ_ALL,          /* + 0..15: category filter bit 1, types bit 2,
                             partitions bit 4, upper bound bit 8 */
    PG_NSTMT = PG_READ_ALL + 16
};

/* A stream cursor's page on the wire (fold reads ahead). Any other
 * statement collects and discards it first and marks the cursor broken:
 * its next call then fails instead of reading someone else's rows. */
typedef struct pg_page_claim {
    int broken;
} pg_page_claim;

/* A read_all batch asked for ahead of time (see es_read_all_opts). */
typedef struct pg_prefetch {
    int state;                /* 0 none, 1 on the wire, 2 result held */
    PGresult *res;
    /* res's rows decoded by the thread that collected it (memory of res,
     * PQresultAlloc), or NULL: set and cleared with res */
    struct pg_row *rows;
    es_buf key;               /* the request it answers */
    struct pg_fetch_job *job; /* state 1: a thread collecting the result */
} pg_prefetch;

/* What sits between us and PostgreSQL (es_open_opts.pooler). */
enum { PG_POOLER_NONE, PG_POOLER_SESSION, PG_POOLER_TRANSACTION };

/* query(): a statement prepared on the session by its text (pg_qcache.c) */
#define PG_QCACHE 32
#define PG_QNAME 32           /* room for a qcache statement's name */
typedef struct pg_qslot {
    char *sql;                /* NULL: free */
    unsigned long used;       /* last use, for eviction */
    unsigned long gen;        /* its statement is es_q<gen> (see pg_qcache.c) */
} pg_qslot;

/* A query sent ahead (store:query_ahead, pg_pipeline.c): it waits for the
 * transaction's next statement and goes in that statement's pipeline, in
 * front of it, so it costs no round trip of its own. */
enum { PG_EARLY_NONE, PG_EARLY_QUEUED, PG_EARLY_SENT, PG_EARLY_HELD,
       PG_EARLY_LOST };
typedef struct pg_early {
    int state;                /* PG_EARLY_* */
    char *sql;                /* QUEUED: the query and copies of its */
    char **params;            /* parameters (NULL: SQL NULL) */
    int nparams;
    int at;                   /* SENT: its place among the prefix results */
    PGresult *res;            /* HELD: its result */
    int failed;               /* it failed in front of a statement, which
                               * reports its error (pg_fail says whose) */
} pg_early;

typedef struct pg_store {
    es_store base;
    PGconn *conn;
    char *conninfo;
    char schema[64];          /* validated: [a-z_][a-z0-9_]* */
    int in_tx;                /* inside es_begin .. es_commit/rollback */
    int begin_pending;        /* in_tx, but BEGIN not sent yet: it goes in
                                 a pipeline in front of the transaction's
                                 first statement (pg_pipe_open) */
    int tx_lost;              /* the session died inside a transaction */
    pg_page_claim *page;      /* the cursor whose page is on the wire */
    int listening;            /* LISTEN again after a reconnect */
    char session_sql[128];    /* SET ... run on every new session */
    unsigned prepared;        /* bit per statement prepared this session */
    char names[PG_NSTMT][32]; /* statement names, with the schema's hash */
    int pooler;               /* PG_POOLER_*: TRANSACTION keeps no session
                                 state: unnamed statements, SET LOCAL */
    char local_sql[160];      /* pooler: SET LOCAL timeouts, or "" */
    char timeouts[2][24];     /* pooler: the same for set_config() */
    int wrapped;              /* a statement went in a pipeline behind
                                 a deferred BEGIN and/or set_config() for
                                 the pooler's timeouts: read to its Sync */
    int prefix;               /* results of those still to read before
                                 the statement's */
    pg_early early;           /* a query ahead (store:query_ahead) */
    char *sql[PG_NSTMT];      /* pooler: statement text, made on first use */
    es_buf params;            /* parameter text of one call */
    PGresult *snapshot;       /* the last snapshot loaded */
    pg_prefetch ahead;
    char snapshot_time[32];
    int citus;                /* events distributed by Citus: 1, 0, -1 unknown */
    char citus_version[32];   /* the extension's, "" without Citus */
    struct pg_citus_nodes *nodes;  /* sessions to workers (read_all) */
    pg_qslot qcache[PG_QCACHE];
    unsigned qprepared;       /* bit per qcache slot prepared this session */
    unsigned long qclock;
    unsigned long qgen;       /* names handed out to qcache statements */
    pid_t owner;              /* the process that made the store and
                                 opened conn: a forked child has a copy
                                 it must not use */
    struct pg_copy_job *copying;  /* a COPY sending without waiting */
    int64_t copied;           /* rows of such copies since the last wait */
    char fail_constraint[64]; /* the constraint the last failed
                                 statement violated, or "" (pg_fail) */
    int copy_failed;          /* one failed: copy_err until reported */
    es_error copy_err;
} pg_store;

/* Collects a prefetched read_all result still on the wire, so the session
 * is free for another statement; drop also forgets it. */
void pg_settle(pg_store *p);
/* Waits for the thread collecting a prefetched read_all result, if one
 * runs (pg_events.c): the session is the thread's until then. pg_settle
 * calls it. */
void pg_prefetch_join(pg_store *p);
/* Settles whatever is on the wire: a read_all batch ahead is kept, a
 * cursor's page is discarded (the cursor is marked broken). */
void pg_settle_wire(pg_store *p);
/* Reads and discards whatever results are still on the wire. */
void pg_drain(pg_store *p);
void pg_prefetch_drop(pg_store *p);
/* Makes sure there is a live session, reconnecting after a drop. Settles
 * a prefetch first: every statement goes through here. */
int pg_ensure(pg_store *p, es_error *err);
/* Fills err from a failed result (or the connection) and clears the
 * result. Returns -1. */
int pg_fail(pg_store *p, PGresult *res, const char *what, es_error *err);
/* Runs a prepared statement, preparing it first when needed. Returns the
 * result (caller clears) or NULL with err filled. */
PGresult *pg_exec_prepared(pg_store *p, int stmt, int nparams,
                           const char *const *values, int binary_result,
                           es_error *err);
/* Lengths and formats (1: binary) of a statement's parameters, for
 * libpq, when some are sent in binary. */
typedef struct pg_binparams {
    const int *lengths;
    const int *formats;
} pg_binparams;
/* pg_exec_prepared with parameters in binary where bin says so. */
PGresult *pg_exec_prepared_bin(pg_store *p, int stmt, int nparams,
                               const char *const *values,
                               const pg_binparams *bin, int binary_result,
                               es_error *err);
/* The same in two halves, so the caller can work while the server does:
 * send, then receive (which waits for the result). */
int pg_send_prepared(pg_store *p, int stmt, int nparams,
                     const char *const *values, int binary_result,
                     es_error *err);
PGresult *pg_receive(pg_store *p, int stmt, es_error *err);
/* A prepared statement ready to send in a pipeline: *name (prepared on
 * this session) or, behind a transaction pooler, *sql (its text). */
int pg_stmt_ready(pg_store *p, int stmt, const char **name,
                  const char **sql, es_error *err);
/* What a statement is called in error messages ("append_one", ...). */
const char *pg_stmt_what(int stmt);
/* Runs a statement without parameters (DDL, BEGIN, ...). */
int pg_exec_simple(pg_store *p, const char *sql, es_error *err);
/* pg_ensure without sending a deferred BEGIN: for a caller that sends it
 * in front of its statement (pg_pipe_open). */
int pg_ready(pg_store *p, es_error *err);
/* Enters pipeline mode with what must go before the next statement: the
 * deferred BEGIN (and the pooler's timeouts for its transaction) or,
 * behind a pooler outside a transaction, the timeouts for the statement's
 * implicit one. 1: piped (send the statement, then PQpipelineSync), 0:
 * nothing to put in front, -1: libpq refused (the session is unusable). */
int pg_pipe_open(pg_store *p);
void pg_drop_pipeline(pg_store *p);
/* The next result of the statement on the wire, past what pg_pipe_open
 * put in front of it (whose failure, if it failed, is the result). */
PGresult *pg_take_result(pg_store *p);
/* Runs a statement by name (prepared on the session) or by its text with
 * parameters, behind a deferred BEGIN when one is pending. Never NULL. */
PGresult *pg_exec_stmt(pg_store *p, const char *name, const char *sql,
                       int nparams, const char *const *values,
                       int binary_result);

/* Copies target without the library's own `pooler` option (URL
 * parameter or conninfo keyword), whose value goes to pooler ("" when
 * absent). NULL when out of memory; the caller frees. */
char *pg_conninfo_take_pooler(const char *target, char *pooler, size_t plen);

/* The SQL text of a prepared statement (pg_events.c). */
const char *pg_statement_sql(const pg_store *p, int stmt, char *out,
                             size_t outlen);

/* The session's operations (pg.c), for the store's operations table. */
int pg_set_timeouts(es_store *s, int64_t statement_ms, int64_t lock_ms,
                    es_error *err);
int pg_listen(es_store *s, es_error *err);
int pg_wait(es_store *s, int timeout_ms, es_error *err);
es_rows *pg_query(es_store *s, const char *sql, int nparams,
                  const char *const *params, es_error *err);
int pg_begin(es_store *s, es_error *err);
int pg_commit(es_store *s, es_error *err);
int pg_rollback(es_store *s, es_error *err);
/* The transaction's last statement and COMMIT in one round trip
 * (pg_pipeline.c): es_query_commit, and es_query_commit_rows when rows
 * is not NULL (*rows NULL after a commit when there was no memory for
 * them: it committed all the same). */
int pg_query_commit(es_store *s, const char *sql, int nparams,
                    const char *const *params, es_rows **rows, es_error *err);
/* Statement stmt (prepared), then sql and COMMIT, in one round trip: the
 * transaction's end whatever happens. 0: committed, *first and *second
 * hold the two results (the caller clears them); 1: stmt failed, 2:
 * anything else failed (err; nothing was committed, the transaction is
 * over). */
int pg_exec_commit(pg_store *p, int stmt, int nparams,
                   const char *const *values, int binary_result,
                   const char *sql, int nq, const char *const *qparams,
                   PGresult **first, PGresult **second, es_error *err);
/* A query that goes in front of the transaction's next statement, in its
 * round trip; its rows are asked for later (pg_pipeline.c):
 * es_query_ahead, es_ahead_rows. */
int pg_query_ahead(es_store *s, const char *sql, int nparams,
                   const char *const *params, es_error *err);
es_rows *pg_ahead_rows(es_store *s, es_error *err);
/* pg_pipe_open's part: sends the query ahead into the open pipeline. 1
 * sent, 0 none waiting, -1 libpq refused. */
int pg_early_send(pg_store *p);
/* The query ahead's result (taken by pg_take_result), and what becomes of
 * one that will get none; pg_early_clear forgets it (the transaction
 * ends). */
void pg_early_settle(pg_store *p);
void pg_early_clear(pg_store *p);
/* A result of pg_query's shape (es_rows) around res, which it takes. */
es_rows *pg_rows_of(PGresult *res, es_error *err);
/* The slot of a cached query already prepared on this session: 1 with its
 * name, else 0 (nothing is sent). */
int pg_qcache_named(pg_store *p, const char *sql, char *name);
int pg_status(es_store *s, es_store_status *out, es_error *err);
int pg_in_transaction(const es_store *s);
/* Runs a query with parameters as a statement prepared on this session
 * (parsed and planned once), or returns NULL when it is not one to cache:
 * then the caller runs it unnamed. Never behind a transaction pooler. */
PGresult *pg_qcache_exec(pg_store *p, const char *sql, int nparams,
                         const char *const *params);
/* The slot of a query to cache, prepared: 1 with its name in name[16], 0
 * when it is not one to cache, -1 with the server's refusal in *res. */
int pg_qcache_prepare(pg_store *p, const char *sql, int nparams,
                      char *name, PGresult **res);
/* Drops the slot of sql after a result that says its plan is stale. */
void pg_qcache_check(pg_store *p, const char *sql, const PGresult *res);
/* Forgets the session's prepared queries (a new session has none). */
void pg_qcache_reset(pg_store *p);
void pg_qcache_free(pg_store *p);

void pg_disconnect(es_store *s);
void pg_destroy(es_store *s);

/* COPY ... FROM STDIN of rows in COPY's text format (pg_copy.c). count
 * NULL: a thread sends the rows; pg_copy_join waits for it (every use of
 * the session does first), pg_copy_wait also reports how it went. */
int pg_copy(es_store *s, const char *schema, const char *table,
            const char *const *columns,
            size_t ncolumns, const char *data, size_t len, int64_t *count,
            es_error *err);
int pg_copy_join(pg_store *p);
int pg_copy_wait(es_store *s, int64_t *count, es_error *err);
/* A copy sent without waiting failed: -1 with err filled (once; as a
 * database or connection error of its own, see pg_copy.c), else 0. */
int pg_copy_failure(pg_store *p, es_error *err);
/* Ending a transaction in which such a copy failed: it commits nothing.
 * -1 with err filled (the transaction rolled back), or 0: no such copy. */
int pg_copy_failed_commit(pg_store *p, es_error *err);

/* Names the prepared statements of this store's schema. */
void pg_name_statements(pg_store *p);

/* Citus (pg_citus.c): whether the events table is distributed (1/0, -1
 * with err filled), asked once per store; the distributed layout (after
 * the migration steps; shards 0 = citus.shard_count); shard count. */
int pg_citus_detect(pg_store *p, es_error *err);
int pg_citus_distribute(pg_store *p, int shards, es_error *err);
int pg_citus_renew_append(pg_store *p, es_error *err);
int pg_citus_info(pg_store *p, int *shards, es_error *err);
es_cursor *pg_citus_read_all(pg_store *p, const es_read_all_opts *o,
                             es_error *err);
/* Closes the sessions to workers, each with finish: PQfinish, or
 * pg_forsake in a forked child. */
void pg_citus_close(pg_store *p, void (*finish)(PGconn *));
/* Lets a forked child's copy of a session go without a word on it
 * (pg.c). */
void pg_forsake(PGconn *conn);

#endif
