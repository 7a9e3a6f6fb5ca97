/*
 * pg.c - the PostgreSQL store: the session and what happens to it.
 *
 * A dropped session (server restart, pg_terminate_backend, network) makes
 * the failing call return ES_CONNECTION; the next call reconnects and
 * prepares its statements again. Statements are prepared lazily because a
 * fresh session has none and most programs use only a few.
 *
 * Behind a transaction pooler (pooler = "transaction") each transaction may
 * run on another server session, so nothing is kept in one: statements go
 * as unnamed extended-protocol queries (parameters still bound), timeouts
 * are set per transaction (see send_params for a statement outside one),
 * and LISTEN is refused.
 */
#include "pg.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The pipeline of a wrapped statement (see pg_pipe_open), read to its
 * Sync: BEGIN's and/or set_config's result, the statement's, then the
 * Sync's. Two NULLs
 * in a row mean nothing more is coming (a broken pipeline): then the
 * session is dropped rather than left in pipeline mode. */
static void drain_pipeline(pg_store *p)
{
    int nulls = 0;
    p->wrapped = 0;
    p->prefix = 0;
    while (nulls < 2 && PQstatus(p->conn) == CONNECTION_OK) {
        PGresult *r = PQgetResult(p->conn);
        ExecStatusType st;
        if (!r) {
            nulls++;
            continue;
        }
        nulls = 0;
        st = PQresultStatus(r);
        PQclear(r);
        if (st == PGRES_PIPELINE_SYNC)
            break;
    }
    if (PQstatus(p->conn) == CONNECTION_OK && !PQexitPipelineMode(p->conn)) {
        PQfinish(p->conn);
        p->conn = NULL;
    }
}

void pg_drain(pg_store *p)
{
    PGresult *r;
    if (p->conn && p->wrapped) {
        drain_pipeline(p);
        return;
    }
    while (p->conn && (r = PQgetResult(p->conn)) != NULL)
        PQclear(r);
}

PGresult *pg_take_result(pg_store *p)
{
    for (int k = 1; p->prefix > 0; k++) {
        PGresult *pre = PQgetResult(p->conn), *end;
        p->prefix--;
        if (!pre || (PQresultStatus(pre) != PGRES_TUPLES_OK &&
                     PQresultStatus(pre) != PGRES_COMMAND_OK)) {
            p->prefix = 0;  /* the rest is aborted: pg_drain reads it */
            if (p->early.state == PG_EARLY_SENT && k == p->early.at) {
                /* the query ahead itself failed: a prepared statement
                 * the server refuses (0A000) leaves the query cache as
                 * when query() meets it, and the error says whose it is */
                if (pre)
                    pg_qcache_check(p, p->early.sql, pre);
                p->early.failed = 1;
            }
            pg_early_settle(p);   /* a query ahead's error is this one */
            return pre;
        }
        if (p->early.state == PG_EARLY_SENT && k == p->early.at) {
            p->early.res = pre;     /* kept for es_ahead_rows */
            p->early.state = PG_EARLY_HELD;
        } else
            PQclear(pre);
        if ((end = PQgetResult(p->conn)) != NULL)
            PQclear(end);   /* not expected: one result per statement */
    }
    pg_early_settle(p);
    return PQgetResult(p->conn);
}

void pg_settle(pg_store *p)
{
    pg_copy_join(p);      /* the session is the copy thread's until then */
    pg_prefetch_join(p);  /* or the prefetch thread's */
    if (p->ahead.state != 1)
        return;
    p->ahead.res = p->conn ? pg_take_result(p) : NULL;
    p->ahead.rows = NULL;
    pg_drain(p);
    p->ahead.state = 2;
}

void pg_settle_wire(pg_store *p)
{
    if (p->page) {
        pg_drain(p);
        p->page->broken = 1;
        p->page = NULL;
    }
    pg_settle(p);
}

/* The session died inside a transaction: the server rolled it back. Until
 * the caller says rollback (or commit, which reports the loss), calls fail
 * instead of carrying on in autocommit on a new session, which would
 * commit half of what the caller meant as one. */
static void note_session_loss(pg_store *p)
{
    /* a deferred BEGIN not sent yet: no transaction to lose, the next
     * statement reconnects and sends it */
    if (p->in_tx && !p->begin_pending) {
        p->tx_lost = 1;
        p->in_tx = 0;
    }
}

void pg_prefetch_drop(pg_store *p)
{
    pg_settle(p);
    PQclear(p->ahead.res);
    p->ahead.res = NULL;
    p->ahead.rows = NULL;
    p->ahead.state = 0;
}

static int connect_now(pg_store *p, es_error *err)
{
    pg_prefetch_drop(p);     /* whatever was on the wire goes with it */
    pg_early_settle(p);
    if (p->conn)
        PQfinish(p->conn);
    p->prepared = 0;
    pg_qcache_reset(p);
    if (!p->begin_pending)
        p->in_tx = 0;
    p->wrapped = 0;
    p->prefix = 0;
    p->conn = PQconnectdb(p->conninfo);
    if (!p->conn)
        return es_fail(err, ES_CONNECTION, "out of memory connecting");
    if (PQstatus(p->conn) != CONNECTION_OK) {
        char msg[ES_MESSAGE_MAX];
        snprintf(msg, sizeof msg, "%s", PQerrorMessage(p->conn));
        msg[strcspn(msg, "\n")] = '\0';
        PQfinish(p->conn);
        p->conn = NULL;
        return es_fail(err, ES_CONNECTION, "cannot connect: %s", msg);
    }
    p->owner = getpid();
    return 0;
}

/* Notices (e.g. "schema already exists, skipping") are not errors and
 * must not reach the host's stderr. */
static void notice_ignore(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

static int exec_raw(pg_store *p, const char *sql, es_error *err);

/* LISTEN; raw: on the new session as it is (a reconnect), else as any
 * statement (after a deferred BEGIN, inside the caller's transaction). */
static int listen_now(pg_store *p, int raw, es_error *err)
{
    char sql[96];
    if (p->pooler == PG_POOLER_TRANSACTION)
        return es_fail(err, ES_INVALID, "listen: LISTEN needs a session of "
                       "its own, which the store opened with pooler = "
                       "\"transaction\" does not keep: poll instead, or "
                       "listen on a store opened directly (no pooler)");
    snprintf(sql, sizeof sql, "LISTEN \"%s_events\"", p->schema);
    return raw ? exec_raw(p, sql, err) : pg_exec_simple(p, sql, err);
}

int pg_ready(pg_store *p, es_error *err)
{
    pg_settle_wire(p);
    if (pg_copy_failure(p, err) < 0)   /* a copy sent without waiting */
        return -1;
    if (p->conn && PQstatus(p->conn) != CONNECTION_OK)
        note_session_loss(p);
    if (p->tx_lost)
        return es_fail(err, ES_CONNECTION, "the connection was lost inside a "
                       "transaction, which the server rolled back: call "
                       "rollback() before going on");
    if (p->conn && PQstatus(p->conn) == CONNECTION_OK)
        return 0;
    if (connect_now(p, err) < 0)
        return -1;
    PQsetNoticeProcessor(p->conn, notice_ignore, NULL);
    if (p->session_sql[0] && exec_raw(p, p->session_sql, err) < 0)
        return -1;
    if (p->listening && listen_now(p, 1, err) < 0)
        return -1;
    return 0;
}

/* Sends a deferred BEGIN on its own: for statements that do not go in a
 * pipeline (DDL, COPY, migrations), as begin() did before deferring. */
static int begin_now(pg_store *p, es_error *err)
{
    char sql[176];
    p->begin_pending = 0;
    /* pooler: the timeouts go with the transaction, in the same trip */
    snprintf(sql, sizeof sql, "BEGIN%s%s", p->local_sql[0] ? "; " : "",
             p->local_sql);
    return exec_raw(p, sql, err);
}

int pg_ensure(pg_store *p, es_error *err)
{
    if (pg_ready(p, err) < 0)
        return -1;
    return p->begin_pending ? begin_now(p, err) : 0;
}

int pg_set_timeouts(es_store *s, int64_t statement_ms,
                    int64_t lock_ms, es_error *err)
{
    pg_store *p = (pg_store *)s;
    if (p->pooler == PG_POOLER_TRANSACTION) {
        /* a SET would stay on whichever server session ran it */
        if (statement_ms == 0 && lock_ms == 0)
            p->local_sql[0] = '\0';
        else
            snprintf(p->local_sql, sizeof p->local_sql,
                     "SET LOCAL statement_timeout = %lld; "
                     "SET LOCAL lock_timeout = %lld",
                     (long long)statement_ms, (long long)lock_ms);
        snprintf(p->timeouts[0], sizeof p->timeouts[0], "%lld",
                 (long long)statement_ms);
        snprintf(p->timeouts[1], sizeof p->timeouts[1], "%lld",
                 (long long)lock_ms);
        return 0;
    }
    snprintf(p->session_sql, sizeof p->session_sql,
             "SET statement_timeout = %lld; SET lock_timeout = %lld",
             (long long)statement_ms, (long long)lock_ms);
    return pg_exec_simple(p, p->session_sql, err);
}

int pg_listen(es_store *s, es_error *err)
{
    pg_store *p = (pg_store *)s;
    if (listen_now(p, 0, err) < 0)
        return -1;
    p->listening = 1;
    return 0;
}

/* Drains pending notifications; returns how many there were. */
static int drain_notifies(PGconn *conn)
{
    PGnotify *n;
    int count = 0;
    while ((n = PQnotifies(conn)) != NULL) {
        PQfreemem(n);
        count++;
    }
    return count;
}

int pg_wait(es_store *s, int timeout_ms, es_error *err)
{
    pg_store *p = (pg_store *)s;
    struct pollfd pfd;
    int rc;

    if (pg_ensure(p, err) < 0)
        return -1;
    if (!p->listening && pg_listen(s, err) < 0)
        return -1;
    if (!PQconsumeInput(p->conn))
        return pg_fail(p, NULL, "wait", err);
    if (drain_notifies(p->conn))
        return 1;
    pfd.fd = PQsocket(p->conn);
    pfd.events = POLLIN;
    pfd.revents = 0;
    rc = poll(&pfd, 1, timeout_ms);
    if (rc < 0)
        return errno == EINTR ? 0 : es_fail(err, ES_CONNECTION, "wait: %s",
                                            strerror(errno));
    if (rc == 0)
        return 0;
    if (!PQconsumeInput(p->conn))
        return pg_fail(p, NULL, "wait", err);
    return drain_notifies(p->conn) ? 1 : 0;
}

/* The reason code may act on (es_reason), from the SQLSTATE and, for the
 * append function's stream-order rule, the constraint name it raises
 * with. A server error inside the caller's transaction has aborted it:
 * that is what the caller must act on first. */
static es_reason reason_of(const pg_store *p, const char *state,
                           const char *constraint, es_kind kind)
{
    if (strcmp(state, "40001") == 0 && strcmp(constraint, "stream_order") == 0)
        return ES_REASON_ORDER;
    if (p->in_tx && state[0] && kind != ES_CONNECTION)
        return ES_REASON_TX_ABORTED;
    if (strcmp(state, "40001") == 0 || strcmp(state, "40P01") == 0)
        return ES_REASON_SERIALIZATION;
    if (strcmp(state, "57014") == 0 || strcmp(state, "55P03") == 0)
        return ES_REASON_TIMEOUT;
    return ES_REASON_NONE;
}

/* Maps a failed result to the contract's kinds. */
int pg_fail(pg_store *p, PGresult *res, const char *what, es_error *err)
{
    const char *field;
    char msg[ES_MESSAGE_MAX], state[6] = "", constraint[64] = "", whose[96];
    es_kind kind = ES_DATABASE;

    if (p->early.failed) {      /* the query ahead's error, not what's */
        p->early.failed = 0;
        snprintf(whose, sizeof whose, "query ahead (sent with %s)", what);
        what = whose;
    }

    /* Copy what we need: the fields point into res. */
    field = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (field)
        snprintf(state, sizeof state, "%s", field);
    field = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!field)
        field = p->conn ? PQerrorMessage(p->conn) : "no connection";
    snprintf(msg, sizeof msg, "%s", field);
    msg[strcspn(msg, "\n")] = '\0';
    field = res ? PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME) : NULL;
    if (field)
        snprintf(constraint, sizeof constraint, "%s", field);
    if (res)
        PQclear(res);

    /* Every error the server reports has a SQLSTATE; one without it was
     * made by libpq itself: the connection broke under the statement
     * ("server closed the connection unexpectedly"), sometimes before
     * libpq marks the connection bad. */
    if (!p->conn || PQstatus(p->conn) != CONNECTION_OK || state[0] == '\0' ||
        strncmp(state, "08", 2) == 0 || strncmp(state, "57P", 3) == 0) {
        kind = ES_CONNECTION;
        note_session_loss(p);
    } else if (strncmp(state, "22", 2) == 0 || strcmp(state, "23514") == 0) {
        kind = ES_INVALID;
    }
    if (strcmp(state, "40001") == 0)
        kind = ES_CONFLICT;
    if (strcmp(state, "42P01") == 0 || strcmp(state, "42883") == 0 ||
        strcmp(state, "3F000") == 0)
        es_fail(err, kind, "%s: %s (has store:migrate() been run for schema "
                "'%s'? read model and workflow tables: es.migrate(store, app) "
                "or `eventsourcing migrate --app FILE`)", what, msg, p->schema);
    else if (strcmp(state, "25P02") == 0)
        es_fail(err, kind, "%s: the transaction was aborted by an earlier "
                "error; roll it back", what);
    else if (strcmp(state, "42P05") == 0 || strcmp(state, "26000") == 0) {
        /* our statements are named per session: another session answered
         * (a transaction pooler); forget them all, the error says why */
        p->prepared = 0;
        pg_qcache_reset(p);
        es_fail(err, kind, "%s: %s (the server session changed under this "
                "connection: behind a transaction pooler such as PgBouncer "
                "open the store with { pooler = \"transaction\" } or "
                "?pooler=transaction)", what, msg);
    }
    else
        es_fail(err, kind, "%s: %s", what, msg);
    memcpy(err->sqlstate, state, sizeof state);
    memcpy(p->fail_constraint, constraint, sizeof constraint);
    err->reason = reason_of(p, state, constraint, kind);
    return -1;
}

static const char *const stmt_names[PG_NSTMT] = {
    "es_append", "es_append_one", "es_append_strict", "es_version",
    "es_last", "es_read_f", "es_read_b",
    "es_snapshot_save", "es_snapshot_load",
    "es_read_all0", "es_read_all1", "es_read_all2", "es_read_all3",
    "es_read_all4", "es_read_all5", "es_read_all6", "es_read_all7",
    "es_read_all8", "es_read_all9", "es_read_all10", "es_read_all11",
    "es_read_all12", "es_read_all13", "es_read_all14", "es_read_all15"
};

/* Statement names carry a hash of the schema and of the statement's
 * text, so a session that already has a name (a pooler handed us a
 * session another store prepared, maybe one of another version of this
 * library) has the very same statement, never one reading another schema
 * or taking other parameters. */
void pg_name_statements(pg_store *p)
{
    uint32_t h0 = 2166136261u;                     /* FNV-1a */
    char sql[2048];
    for (const char *c = p->schema; *c; c++)
        h0 = (h0 ^ (unsigned char)*c) * 16777619u;
    for (int i = 0; i < PG_NSTMT; i++) {
        uint32_t h = h0;
        for (const char *c = pg_statement_sql(p, i, sql, sizeof sql); *c; c++)
            h = (h ^ (unsigned char)*c) * 16777619u;
        snprintf(p->names[i], sizeof p->names[i], "%s_%08x", stmt_names[i],
                 (unsigned)h);
    }
}

/* Connects if needed and prepares the statement once per session. */
static int prepare_once(pg_store *p, int stmt, es_error *err)
{
    PGresult *res;
    char sql[2048];

    if (pg_ready(p, err) < 0)
        return -1;
    if (p->prepared & (1u << stmt))
        return 0;
    /* a deferred BEGIN goes first: a failed prepare then aborts the
     * caller's transaction, as the statement's own failure would */
    if (p->begin_pending && begin_now(p, err) < 0)
        return -1;
    pg_statement_sql(p, stmt, sql, sizeof sql);
    res = PQprepare(p->conn, p->names[stmt], sql, 0, NULL);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        return pg_fail(p, res, "prepare", err);
    PQclear(res);
    p->prepared |= 1u << stmt;
    return 0;
}

static PGresult *check_result(pg_store *p, int stmt, PGresult *res,
                              es_error *err)
{
    if (PQresultStatus(res) != PGRES_TUPLES_OK &&
        PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_fail(p, res, stmt_names[stmt] + 3, err);
        return NULL;
    }
    return res;
}

/* Pooler: the statement's text, made once per store. */
static const char *unnamed_sql(pg_store *p, int stmt, es_error *err)
{
    char sql[2048];
    if (!p->sql[stmt]) {
        pg_statement_sql(p, stmt, sql, sizeof sql);
        if (!(p->sql[stmt] = strdup(sql))) {
            es_fail(err, ES_DATABASE, "out of memory");
            return NULL;
        }
    }
    return p->sql[stmt];
}

static const char set_timeouts_sql[] =
    "SELECT set_config('statement_timeout', $1, true),"
    " set_config('lock_timeout', $2, true)";

int pg_pipe_open(pg_store *p)
{
    const char *t[2] = { p->timeouts[0], p->timeouts[1] };
    int begin = p->begin_pending;
    int timeouts = p->pooler == PG_POOLER_TRANSACTION && p->local_sql[0] &&
                   (begin || !p->in_tx);
    int early = p->early.state == PG_EARLY_QUEUED && p->in_tx;
    if (!begin && !timeouts && !early)
        return 0;
    if (!PQenterPipelineMode(p->conn))
        return -1;
    p->wrapped = 1;
    p->prefix = 0;
    p->begin_pending = 0;       /* on the wire now, or the session is lost */
    if (begin && !PQsendQueryParams(p->conn, "BEGIN", 0, NULL, NULL, NULL,
                                    NULL, 0))
        return -1;
    p->prefix += begin;
    /* set_config(..., true) lasts as long as the transaction: the
     * caller's (as SET LOCAL after BEGIN did) or the statement's own */
    if (timeouts && !PQsendQueryParams(p->conn, set_timeouts_sql, 2, NULL, t,
                                       NULL, NULL, 0))
        return -1;
    p->prefix += timeouts;
    /* a query ahead last, right in front of the statement (in the
     * transaction: BEGIN went first) */
    if (early && pg_early_send(p) < 0)
        return -1;
    return 1;
}

/* Sends a statement (by name, else its text) behind what pg_pipe_open
 * puts in front of it, with one Sync after all: one round trip. A
 * deferred BEGIN makes the pipeline's transaction the caller's, which
 * stays open after the Sync; without one the statement runs in its own
 * implicit transaction, so set_config's settings end with it. pg_take_result
 * and pg_drain read the pipeline. 0, or -1 when libpq refused. */
static int put_stmt(pg_store *p, const char *name, const char *sql,
                    int nparams, const char *const *values,
                    const pg_binparams *bin, int binary_result)
{
    const int *lengths = bin ? bin->lengths : NULL;
    const int *formats = bin ? bin->formats : NULL;
    int piped = pg_pipe_open(p), ok;
    if (piped < 0)
        return -1;
    ok = name ? PQsendQueryPrepared(p->conn, name, nparams, values, lengths,
                                    formats, binary_result)
              : PQsendQueryParams(p->conn, sql, nparams, NULL, values,
                                  lengths, formats, binary_result);
    if (!ok || (piped && !PQpipelineSync(p->conn)))
        return -1;
    return 0;
}

/* A session that failed half way through a pipeline cannot be read to
 * its end (no Sync went out): it is dropped. A transaction it held (its
 * BEGIN may have gone out) is lost as on any broken session: the caller
 * must roll back before going on (note_session_loss). */
void pg_drop_pipeline(pg_store *p)
{
    if (!p->wrapped || !p->conn)
        return;
    pg_early_settle(p);
    note_session_loss(p);
    PQfinish(p->conn);
    p->conn = NULL;
    p->wrapped = 0;
    p->prefix = 0;
}

/* put_stmt, reporting a refusal in err. */
static int send_stmt(pg_store *p, const char *name, const char *sql,
                     int nparams, const char *const *values,
                     const pg_binparams *bin, int binary_result,
                     const char *what, es_error *err)
{
    if (put_stmt(p, name, sql, nparams, values, bin, binary_result) == 0)
        return 0;
    pg_fail(p, NULL, what, err);
    pg_drop_pipeline(p);
    return -1;
}

static int send_params(pg_store *p, const char *sql, int nparams,
                       const char *const *values, const pg_binparams *bin,
                       int binary_result, const char *what, es_error *err)
{
    return send_stmt(p, NULL, sql, nparams, values, bin, binary_result, what,
                     err);
}

/* pg_exec_stmt with some parameters in binary (bin, or NULL: all text). */
static PGresult *exec_stmt(pg_store *p, const char *name, const char *sql,
                           int nparams, const char *const *values,
                           const pg_binparams *bin, int binary_result)
{
    const int *lengths = bin ? bin->lengths : NULL;
    const int *formats = bin ? bin->formats : NULL;
    PGresult *res;
    if (!p->begin_pending && p->pooler != PG_POOLER_TRANSACTION &&
        p->early.state != PG_EARLY_QUEUED)
        return name ? PQexecPrepared(p->conn, name, nparams, values, lengths,
                                     formats, binary_result)
                    : PQexecParams(p->conn, sql, nparams, NULL, values,
                                   lengths, formats, binary_result);
    if (put_stmt(p, name, sql, nparams, values, bin, binary_result) < 0) {
        /* libpq's message, then the half-sent pipeline goes (nothing
         * would ever end it: no Sync went out) */
        res = PQmakeEmptyPGresult(p->conn, PGRES_FATAL_ERROR);
        pg_drop_pipeline(p);
        return res;
    }
    res = pg_take_result(p);
    if (!res)       /* libpq's message, before the drain may drop it */
        res = PQmakeEmptyPGresult(p->conn, PGRES_FATAL_ERROR);
    pg_drain(p);    /* to the end of this query: the session is free again */
    return res;
}

PGresult *pg_exec_stmt(pg_store *p, const char *name, const char *sql,
                       int nparams, const char *const *values,
                       int binary_result)
{
    return exec_stmt(p, name, sql, nparams, values, NULL, binary_result);
}

/* Pooler: connected and the statement's text in *sql. */
static int unnamed_ready(pg_store *p, int stmt, const char **sql,
                         es_error *err)
{
    if (pg_ready(p, err) < 0 || !(*sql = unnamed_sql(p, stmt, err)))
        return -1;
    return 0;
}

int pg_stmt_ready(pg_store *p, int stmt, const char **name,
                  const char **sql, es_error *err)
{
    *name = *sql = NULL;
    if (p->pooler == PG_POOLER_TRANSACTION)
        return unnamed_ready(p, stmt, sql, err);
    if (prepare_once(p, stmt, err) < 0)
        return -1;
    *name = p->names[stmt];
    return 0;
}

const char *pg_stmt_what(int stmt)
{
    return stmt_names[stmt] + 3;
}

static PGresult *exec_unnamed(pg_store *p, int stmt, int nparams,
                              const char *const *values,
                              const pg_binparams *bin, int binary_result,
                              es_error *err)
{
    const char *sql;
    if (unnamed_ready(p, stmt, &sql, err) < 0 ||
        send_params(p, sql, nparams, values, bin, binary_result,
                    stmt_names[stmt] + 3, err) < 0)
        return NULL;
    return pg_receive(p, stmt, err);
}

PGresult *pg_exec_prepared_bin(pg_store *p, int stmt, int nparams,
                               const char *const *values,
                               const pg_binparams *bin, int binary_result,
                               es_error *err)
{
    if (p->pooler == PG_POOLER_TRANSACTION)
        return exec_unnamed(p, stmt, nparams, values, bin, binary_result,
                            err);
    if (prepare_once(p, stmt, err) < 0)
        return NULL;
    return check_result(p, stmt,
                        exec_stmt(p, p->names[stmt], NULL, nparams, values,
                                  bin, binary_result),
                        err);
}

PGresult *pg_exec_prepared(pg_store *p, int stmt, int nparams,
                           const char *const *values, int binary_result,
                           es_error *err)
{
    return pg_exec_prepared_bin(p, stmt, nparams, values, NULL,
                                binary_result, err);
}

int pg_send_prepared(pg_store *p, int stmt, int nparams,
                     const char *const *values, int binary_result,
                     es_error *err)
{
    if (p->pooler == PG_POOLER_TRANSACTION) {
        const char *sql;
        if (unnamed_ready(p, stmt, &sql, err) < 0)
            return -1;
        return send_params(p, sql, nparams, values, NULL, binary_result,
                           stmt_names[stmt] + 3, err);
    }
    if (prepare_once(p, stmt, err) < 0)
        return -1;
    return send_stmt(p, p->names[stmt], NULL, nparams, values, NULL,
                     binary_result, stmt_names[stmt] + 3, err);
}

PGresult *pg_receive(pg_store *p, int stmt, es_error *err)
{
    PGresult *res = pg_take_result(p);
    pg_drain(p);    /* to the end of this query: the session is free again */
    if (!res) {
        pg_fail(p, NULL, stmt_names[stmt] + 3, err);
        return NULL;
    }
    return check_result(p, stmt, res, err);
}

int pg_exec_simple(pg_store *p, const char *sql, es_error *err)
{
    if (pg_ensure(p, err) < 0)
        return -1;
    return exec_raw(p, sql, err);
}

/* pg_exec_simple on the session as it is (no reconnect, no BEGIN). */
static int exec_raw(pg_store *p, const char *sql, es_error *err)
{
    PGresult *res = PQexec(p->conn, sql);
    if (PQresultStatus(res) != PGRES_COMMAND_OK &&
        PQresultStatus(res) != PGRES_TUPLES_OK)
        return pg_fail(p, res, "sql", err);
    PQclear(res);
    return 0;
}

/* ---- generic SQL --------------------------------------------------------- */

struct es_rows {
    PGresult *res;
};

es_rows *pg_query(es_store *s, const char *sql, int nparams,
                  const char *const *params, es_error *err)
{
    pg_store *p = (pg_store *)s;
    PGresult *res;

    if (pg_ready(p, err) < 0)
        return NULL;
    if (p->pooler != PG_POOLER_TRANSACTION) {
        res = pg_qcache_exec(p, sql, nparams, params);
        if (!res)
            res = pg_exec_stmt(p, NULL, sql, nparams, params, 0);
    } else {
        if (send_params(p, sql, nparams, params, NULL, 0, "query", err) < 0)
            return NULL;
        res = pg_take_result(p);
        pg_drain(p);
        if (!res)
            return pg_fail(p, NULL, "query", err), NULL;
    }
    if (PQresultStatus(res) != PGRES_TUPLES_OK &&
        PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_fail(p, res, "query", err);
        return NULL;
    }
    return pg_rows_of(res, err);
}

int es_rows_count(const es_rows *r) { return PQntuples(r->res); }
int es_rows_columns(const es_rows *r) { return PQnfields(r->res); }
const char *es_rows_name(const es_rows *r, int col)
{
    return PQfname(r->res, col);
}
unsigned es_rows_type(const es_rows *r, int col)
{
    return (unsigned)PQftype(r->res, col);
}

const char *es_rows_value(const es_rows *r, int row, int col, size_t *len)
{
    if (PQgetisnull(r->res, row, col))
        return NULL;
    if (len)
        *len = (size_t)PQgetlength(r->res, row, col);
    return PQgetvalue(r->res, row, col);
}

es_rows *pg_rows_of(PGresult *res, es_error *err)
{
    es_rows *rows = malloc(sizeof *rows);
    if (!rows) {
        PQclear(res);
        es_fail(err, ES_DATABASE, "out of memory");
        return NULL;
    }
    rows->res = res;
    return rows;
}

void es_rows_free(es_rows *r)
{
    if (r) {
        PQclear(r->res);
        free(r);
    }
}

/* ---- transactions --------------------------------------------------------- */

int pg_begin(es_store *s, es_error *err)
{
    pg_store *p = (pg_store *)s;
    if (p->in_tx)
        return es_fail(err, ES_INVALID, "a transaction is already open");
    /* a query ahead belongs to the transaction it was made in: one left
     * by a transaction that ended some other way never runs in this one
     * (the prefetch thread, which may take its result, is joined first) */
    if (p->early.state != PG_EARLY_NONE) {
        pg_prefetch_join(p);
        pg_early_clear(p);
    }
    /* connects now, as before; BEGIN itself waits for the transaction's
     * first statement and goes in the same round trip (pg_pipe_open) */
    if (pg_ready(p, err) < 0)
        return -1;
    p->in_tx = 1;
    p->begin_pending = 1;
    return 0;
}

/* COMMIT or ROLLBACK, on the session the transaction began on: never
 * through pg_ensure, which would reconnect and end nothing. */
static int pg_end(es_store *s, int commit, es_error *err)
{
    pg_store *p = (pg_store *)s;
    const char *what = commit ? "commit" : "rollback";
    PGresult *res;

    pg_settle_wire(p);
    if (commit && pg_copy_failed_commit(p, err) < 0)
        return -1;
    if (!commit && p->in_tx)
        p->copy_failed = 0;   /* its copy goes with the rollback */
    if (commit && p->early.state == PG_EARLY_QUEUED && !p->tx_lost) {
        /* it belongs to the transaction: it runs before COMMIT (which
         * reports the transaction aborted when it failed) */
        es_rows *r = pg_ahead_rows(s, err);
        if (r)
            es_rows_free(r);
        else if (err->kind == ES_CONNECTION)
            note_session_loss(p);
    }
    pg_early_clear(p);
    if (p->conn && PQstatus(p->conn) != CONNECTION_OK)
        note_session_loss(p);
    if (p->tx_lost) {
        p->tx_lost = 0;
        if (!commit)
            return 0;     /* the server rolled it back already */
        return es_fail(err, ES_CONNECTION, "commit: the connection was lost "
                       "inside the transaction; nothing of it was committed");
    }
    if (!p->in_tx)
        return es_fail(err, ES_INVALID, "%s: no transaction is open", what);
    if (p->begin_pending) {     /* nothing was sent: nothing to end */
        p->begin_pending = 0;
        p->in_tx = 0;
        return 0;
    }
    res = PQexec(p->conn, commit ? "COMMIT" : "ROLLBACK");
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        p->in_tx = 0;     /* ended either way: nothing left to roll back */
        pg_fail(p, res, what, err);
        p->tx_lost = 0;   /* reported here: the next call reconnects */
        return -1;
    }
    p->in_tx = 0;
    /* COMMIT of a transaction an earlier error aborted "succeeds" with
     * the tag ROLLBACK: the caller must not believe it committed. */
    if (commit && strcmp(PQcmdStatus(res), "ROLLBACK") == 0) {
        PQclear(res);
        es_fail(err, ES_DATABASE, "commit: the transaction was aborted by an "
                "earlier error and has been rolled back; nothing of it was "
                "committed");
        err->reason = ES_REASON_TX_ABORTED;
        return -1;
    }
    PQclear(res);
    return 0;
}

int pg_copy_failed_commit(pg_store *p, es_error *err)
{
    if (pg_copy_failure(p, err) == 0)
        return 0;
    if (p->in_tx && !p->begin_pending && p->conn &&
        PQstatus(p->conn) == CONNECTION_OK &&
        PQtransactionStatus(p->conn) != PQTRANS_IDLE)
        PQclear(PQexec(p->conn, "ROLLBACK"));
    p->in_tx = p->begin_pending = p->tx_lost = 0;
    pg_early_clear(p);      /* it went with the rollback */
    return -1;
}

int pg_commit(es_store *s, es_error *err)
{
    return pg_end(s, 1, err);
}

int pg_rollback(es_store *s, es_error *err)
{
    return pg_end(s, 0, err);
}

/* ---- status --------------------------------------------------------------- */

/* A proxy answers the startup itself and makes up the backend pid it
 * reports (PgBouncer: random cancel keys), so it differs from the pid of
 * the server session that runs our query. A direct session reports its
 * own. */
static int proxied(pg_store *p, es_error *err)
{
    PGresult *res;
    int pid;
    if (pg_ensure(p, err) < 0)
        return -1;
    res = PQexec(p->conn, "SELECT pg_backend_pid()");
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return pg_fail(p, res, "status", err);
    pid = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    return pid != PQbackendPID(p->conn);
}

int pg_status(es_store *s, es_store_status *out, es_error *err)
{
    pg_store *p = (pg_store *)s;
    int prepared = 0;
    pg_copy_join(p);
    pg_prefetch_join(p);
    out->pooler = p->base.pooler;
    out->in_transaction = p->in_tx;
    /* (not with a failed copy pending: asking would take its error) */
    if (!p->in_tx && !p->tx_lost && p->ahead.state != 1 && !p->page &&
        !p->copy_failed) {
        /* a query now would end nothing and wait for nothing */
        int r = proxied(p, err);
        if (r < 0 && err->kind != ES_CONNECTION)
            return -1;
        out->proxied = r;    /* -1: no session to ask (connected says so) */
        es_error_clear(err);
    }
    out->connected = p->conn && PQstatus(p->conn) == CONNECTION_OK;
    for (int i = 0; i < PG_NSTMT; i++)
        prepared += (p->prepared >> i) & 1;
    out->prepared = prepared;
    return 0;
}

int pg_in_transaction(const es_store *s)
{
    return ((const pg_store *)s)->in_tx;
}

/* ---- lifetime ------------------------------------------------------------- */

/* A forked child's copy of the parent's session, let go of without a
 * word on it: the parent may have a COPY, a prefetched read or a
 * transaction under way there. The child's descriptor is pointed at
 * /dev/null first, so PQfinish's Terminate (and a TLS close alert) go
 * nowhere and closing it leaves the parent's socket open (shutdown()
 * would end it for both). Without /dev/null the conn is left as it is. */
void pg_forsake(PGconn *conn)
{
    int fd = PQsocket(conn);
    int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    int moved = null >= 0 && fd >= 0 && dup2(null, fd) == fd;
    if (null >= 0)
        close(null);
    if (moved || fd < 0)
        PQfinish(conn);
}

void pg_disconnect(es_store *s)
{
    pg_store *p = (pg_store *)s;
    if (p->owner != getpid()) {
        /* finalized in a forked child (its collector): nothing of the
         * parent's is read or sent, on the store's session or a Citus
         * store's worker sessions. Every later call comes here too: a
         * child's close then its collector call this twice, and the
         * parent's way out would say goodbye on the parent's sessions. */
        pg_copy_join(p);
        pg_prefetch_join(p);        /* frees the child's copy of a job */
        PQclear(p->ahead.res);      /* this process's memory */
        p->ahead.res = NULL;
        p->ahead.rows = NULL;
        p->ahead.state = 0;
        pg_early_clear(p);          /* memory too: nothing is sent */
        pg_citus_close(p, pg_forsake);
        if (p->conn)
            pg_forsake(p->conn);
        p->conn = NULL;
        return;
    }
    pg_prefetch_drop(p);
    pg_citus_close(p, PQfinish);
    pg_early_clear(p);
    if (p->conn)
        PQfinish(p->conn);
    p->conn = NULL;
}

void pg_destroy(es_store *s)
{
    pg_store *p = (pg_store *)s;
    pg_disconnect(s);
    PQclear(p->snapshot);
    es_buf_free(&p->ahead.key);
    for (int i = 0; i < PG_NSTMT; i++)
        free(p->sql[i]);
    pg_qcache_free(p);
    free(p->conninfo);
    es_buf_free(&p->params);
    free(p);
}
