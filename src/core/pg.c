/*
 * pg.c - the PostgreSQL store: the session and what happens to it.
 *
 * A dropped session (server restart, pg_terminate_backend, network) makes
 * the failing call return ES_CONNECTION; the next call reconnects and
 * prepares its statements again. Statements are prepared lazily because a
 * fresh session has none and most programs use only a few.
 */
#include "pg.h"

#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int valid_schema(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 63 || !(islower((unsigned char)s[0]) || s[0] == '_'))
        return 0;
    for (size_t i = 1; i < n; i++)
        if (!(islower((unsigned char)s[i]) || isdigit((unsigned char)s[i]) ||
              s[i] == '_'))
            return 0;
    return 1;
}

void pg_drain(pg_store *p)
{
    PGresult *r;
    while (p->conn && (r = PQgetResult(p->conn)) != NULL)
        PQclear(r);
}

void pg_settle(pg_store *p)
{
    if (p->ahead.state != 1)
        return;
    p->ahead.res = p->conn ? PQgetResult(p->conn) : NULL;
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
    if (p->in_tx) {
        p->tx_lost = 1;
        p->in_tx = 0;
    }
}

void pg_prefetch_drop(pg_store *p)
{
    pg_settle(p);
    PQclear(p->ahead.res);
    p->ahead.res = NULL;
    p->ahead.state = 0;
}

static int connect_now(pg_store *p, es_error *err)
{
    pg_prefetch_drop(p);     /* whatever was on the wire goes with it */
    if (p->conn)
        PQfinish(p->conn);
    p->prepared = 0;
    p->in_tx = 0;
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
    return 0;
}

/* Notices (e.g. "schema already exists, skipping") are not errors and
 * must not reach the host's stderr. */
static void notice_ignore(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

static int listen_now(pg_store *p, es_error *err)
{
    char sql[96];
    snprintf(sql, sizeof sql, "LISTEN \"%s_events\"", p->schema);
    return pg_exec_simple(p, sql, err);
}

int pg_ensure(pg_store *p, es_error *err)
{
    pg_settle_wire(p);
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
    if (p->session_sql[0] && pg_exec_simple(p, p->session_sql, err) < 0)
        return -1;
    if (p->listening && listen_now(p, err) < 0)
        return -1;
    return 0;
}

static int pg_set_timeouts(es_store *s, int64_t statement_ms,
                           int64_t lock_ms, es_error *err)
{
    pg_store *p = (pg_store *)s;
    snprintf(p->session_sql, sizeof p->session_sql,
             "SET statement_timeout = %lld; SET lock_timeout = %lld",
             (long long)statement_ms, (long long)lock_ms);
    return pg_exec_simple(p, p->session_sql, err);
}

static int pg_listen(es_store *s, es_error *err)
{
    pg_store *p = (pg_store *)s;
    if (listen_now(p, err) < 0)
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

static int pg_wait(es_store *s, int timeout_ms, es_error *err)
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

/* Maps a failed result to the contract's kinds. */
int pg_fail(pg_store *p, PGresult *res, const char *what, es_error *err)
{
    const char *field;
    char msg[ES_MESSAGE_MAX], state[6] = "";
    es_kind kind = ES_DATABASE;

    /* Copy what we need: the fields point into res. */
    field = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (field)
        snprintf(state, sizeof state, "%s", field);
    field = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!field)
        field = p->conn ? PQerrorMessage(p->conn) : "no connection";
    snprintf(msg, sizeof msg, "%s", field);
    msg[strcspn(msg, "\n")] = '\0';
    if (res)
        PQclear(res);

    if (!p->conn || PQstatus(p->conn) != CONNECTION_OK ||
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
                "'%s'?)", what, msg, p->schema);
    else if (strcmp(state, "25P02") == 0)
        es_fail(err, kind, "%s: the transaction was aborted by an earlier "
                "error; roll it back", what);
    else
        es_fail(err, kind, "%s: %s", what, msg);
    memcpy(err->sqlstate, state, sizeof state);
    return -1;
}

static const char *const stmt_names[PG_NSTMT] = {
    "es_append", "es_version", "es_read_f", "es_read_b",
    "es_snapshot_save", "es_snapshot_load",
    "es_read_all0", "es_read_all1", "es_read_all2", "es_read_all3"
};

/* Connects if needed and prepares the statement once per session. */
static int prepare_once(pg_store *p, int stmt, es_error *err)
{
    PGresult *res;
    char sql[2048];

    if (pg_ensure(p, err) < 0)
        return -1;
    if (p->prepared & (1u << stmt))
        return 0;
    pg_statement_sql(p, stmt, sql, sizeof sql);
    res = PQprepare(p->conn, stmt_names[stmt], sql, 0, NULL);
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

PGresult *pg_exec_prepared(pg_store *p, int stmt, int nparams,
                           const char *const *values, int binary_result,
                           es_error *err)
{
    if (prepare_once(p, stmt, err) < 0)
        return NULL;
    return check_result(p, stmt,
                        PQexecPrepared(p->conn, stmt_names[stmt], nparams,
                                       values, NULL, NULL, binary_result),
                        err);
}

int pg_send_prepared(pg_store *p, int stmt, int nparams,
                     const char *const *values, int binary_result,
                     es_error *err)
{
    if (prepare_once(p, stmt, err) < 0)
        return -1;
    if (!PQsendQueryPrepared(p->conn, stmt_names[stmt], nparams, values,
                             NULL, NULL, binary_result))
        return pg_fail(p, NULL, stmt_names[stmt] + 3, err);
    return 0;
}

PGresult *pg_receive(pg_store *p, int stmt, es_error *err)
{
    PGresult *res = PQgetResult(p->conn);
    pg_drain(p);    /* to the end of this query: the session is free again */
    if (!res) {
        pg_fail(p, NULL, stmt_names[stmt] + 3, err);
        return NULL;
    }
    return check_result(p, stmt, res, err);
}

int pg_exec_simple(pg_store *p, const char *sql, es_error *err)
{
    PGresult *res;
    if (pg_ensure(p, err) < 0)
        return -1;
    res = PQexec(p->conn, sql);
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

static es_rows *pg_query(es_store *s, const char *sql, int nparams,
                         const char *const *params, es_error *err)
{
    pg_store *p = (pg_store *)s;
    PGresult *res;
    es_rows *rows;

    if (pg_ensure(p, err) < 0)
        return NULL;
    res = PQexecParams(p->conn, sql, nparams, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK &&
        PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_fail(p, res, "query", err);
        return NULL;
    }
    rows = malloc(sizeof *rows);
    if (!rows) {
        PQclear(res);
        es_fail(err, ES_DATABASE, "out of memory");
        return NULL;
    }
    rows->res = res;
    return rows;
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

void es_rows_free(es_rows *r)
{
    if (r) {
        PQclear(r->res);
        free(r);
    }
}

/* ---- transactions --------------------------------------------------------- */

static int pg_begin(es_store *s, es_error *err)
{
    pg_store *p = (pg_store *)s;
    if (p->in_tx)
        return es_fail(err, ES_INVALID, "a transaction is already open");
    if (pg_exec_simple(p, "BEGIN", err) < 0)
        return -1;
    p->in_tx = 1;
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
    res = PQexec(p->conn, commit ? "COMMIT" : "ROLLBACK");
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_fail(p, res, what, err);
        p->in_tx = 0;
        p->tx_lost = 0;   /* reported here: the next call reconnects */
        return -1;
    }
    PQclear(res);
    p->in_tx = 0;
    return 0;
}

static int pg_commit(es_store *s, es_error *err)
{
    return pg_end(s, 1, err);
}

static int pg_rollback(es_store *s, es_error *err)
{
    return pg_end(s, 0, err);
}

/* ---- lifetime ------------------------------------------------------------- */

static void pg_disconnect(es_store *s)
{
    pg_store *p = (pg_store *)s;
    pg_prefetch_drop(p);
    pg_citus_close(p);
    if (p->conn)
        PQfinish(p->conn);
    p->conn = NULL;
}

static void pg_destroy(es_store *s)
{
    pg_store *p = (pg_store *)s;
    pg_disconnect(s);
    PQclear(p->snapshot);
    es_buf_free(&p->ahead.key);
    free(p->conninfo);
    es_buf_free(&p->params);
    free(p);
}

static int pg_distribute(es_store *s, int shards, es_error *err)
{
    return pg_citus_distribute((pg_store *)s, shards, err);
}

static int pg_info(es_store *s, es_store_info *out, es_error *err)
{
    pg_store *p = (pg_store *)s;
    if (pg_citus_info(p, &out->shards, err) < 0)
        return -1;
    out->citus = p->citus_version[0] ? p->citus_version : NULL;
    out->distributed = p->citus == 1;
    return 0;
}

static const es_store_ops pg_ops = {
    .kind = "postgresql",
    .migrate = pg_migrate,
    .append = pg_append,
    .version = pg_version,
    .read = pg_read,
    .read_all = pg_read_all,
    .save_snapshot = pg_save_snapshot,
    .load_snapshot = pg_load_snapshot,
    .query = pg_query,
    .begin = pg_begin,
    .commit = pg_commit,
    .rollback = pg_rollback,
    .set_timeouts = pg_set_timeouts,
    .listen = pg_listen,
    .wait = pg_wait,
    .disconnect = pg_disconnect,
    .destroy = pg_destroy,
    .distribute = pg_distribute,
    .info = pg_info,
};

es_store *es_pg_open(const char *conninfo, const char *schema, es_error *err)
{
    pg_store *p;
    if (!schema)
        schema = "eventsourcing";
    if (!valid_schema(schema)) {
        es_fail(err, ES_INVALID, "schema name '%.80s' must match "
                "[a-z_][a-z0-9_]* and be at most 63 bytes", schema);
        return NULL;
    }
    p = calloc(1, sizeof *p);
    if (!p || !(p->conninfo = strdup(conninfo))) {
        free(p);
        es_fail(err, ES_CONNECTION, "out of memory");
        return NULL;
    }
    p->base.ops = &pg_ops;
    snprintf(p->schema, sizeof p->schema, "%s", schema);
    p->base.schema = p->schema;
    p->citus = -1;
    es_buf_init(&p->params);
    es_buf_init(&p->ahead.key);
    if (pg_ensure(p, err) < 0) {
        pg_destroy(&p->base);
        return NULL;
    }
    return &p->base;
}
