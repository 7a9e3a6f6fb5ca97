/*
 * pg_pipeline.c - a transaction's last statement and its COMMIT in one
 * round trip (store:commit_with).
 *
 * An inline read model's write is the last statement of the command's
 * transaction; sent on its own and then COMMIT, it costs two round trips
 * where one carries both: libpq's pipeline mode sends the statement,
 * COMMIT and one Sync together (behind BEGIN too when the transaction has
 * sent nothing yet, see pg_pipe_open). When the statement fails the server
 * skips COMMIT, and the transaction is rolled back here: like commit(),
 * commit_with() ends the transaction whatever happens, and reports the
 * first error with the kinds and reasons a query would have had.
 *
 * An append can end its transaction the same way (store:append's
 * commit_with, pg_exec_commit): the append, the statement and COMMIT go
 * in one pipeline, so a command whose read model row is known before its
 * append costs one round trip in all.
 *
 * A query ahead (store:query_ahead) is the same idea at the other end: a
 * read the transaction needs before its next statement (an inline read
 * model's rows, loaded in front of the append) waits and goes in that
 * statement's pipeline, in front of it, instead of in a round trip of its
 * own. Its result is kept (pg_take_result) until es_ahead_rows asks.
 */
#include "pg.h"

#include <stdlib.h>
#include <string.h>

static int ok(const PGresult *res)
{
    return res && (PQresultStatus(res) == PGRES_TUPLES_OK ||
                   PQresultStatus(res) == PGRES_COMMAND_OK);
}

/* Enters pipeline mode with what goes in front ([BEGIN,] ...). 0, or -1
 * when libpq refused. */
static int pipe_enter(pg_store *p)
{
    int piped = pg_pipe_open(p);
    if (piped < 0)
        return -1;
    if (!piped) {
        if (!PQenterPipelineMode(p->conn))
            return -1;
        p->wrapped = 1;
        p->prefix = 0;
    }
    return 0;
}

/* Sends a statement by name (prepared on the session) or by its text. */
static int send_one(pg_store *p, const char *name, const char *sql,
                    int nparams, const char *const *params, int binary_result)
{
    return name ? PQsendQueryPrepared(p->conn, name, nparams, params, NULL,
                                      NULL, binary_result)
                : PQsendQueryParams(p->conn, sql, nparams, NULL, params, NULL,
                                    NULL, binary_result);
}

static int send_commit(pg_store *p)
{
    return PQsendQueryParams(p->conn, "COMMIT", 0, NULL, NULL, NULL, NULL,
                             0) && PQpipelineSync(p->conn);
}

/* Sends [BEGIN,] the statement, COMMIT and a Sync. 0, or -1 when libpq
 * refused. */
static int send_all(pg_store *p, const char *name, const char *sql,
                    int nparams, const char *const *params)
{
    return pipe_enter(p) == 0 &&
           send_one(p, name, sql, nparams, params, 0) && send_commit(p)
               ? 0 : -1;
}

/* The result after the one just taken: the end of that statement's
 * results (NULL) is passed first. */
static PGresult *next_result(pg_store *p)
{
    PGresult *end = PQgetResult(p->conn);
    if (end != NULL)
        PQclear(end);   /* not expected: one result per statement */
    return PQgetResult(p->conn);
}

/* The statement's result (or what failed before it), and COMMIT's when
 * the statement ran; the pipeline is read to its end. */
static PGresult *receive_all(pg_store *p, PGresult **commit)
{
    PGresult *res = pg_take_result(p);
    *commit = NULL;
    if (ok(res))
        *commit = next_result(p);
    if (!res)       /* libpq's message, before the drain may drop it */
        res = PQmakeEmptyPGresult(p->conn, PGRES_FATAL_ERROR);
    pg_drain(p);
    return res;
}

/* A statement failed: the server skipped COMMIT and holds the aborted
 * transaction open; roll it back so it ends as commit() ends it. */
static void end_aborted(pg_store *p)
{
    pg_early_clear(p);
    if (p->conn && PQstatus(p->conn) == CONNECTION_OK &&
        PQtransactionStatus(p->conn) != PQTRANS_IDLE)
        PQclear(PQexec(p->conn, "ROLLBACK"));
    p->in_tx = 0;
    p->begin_pending = 0;
    p->tx_lost = 0;     /* reported here: the next call reconnects */
}

static int fail_stmt(pg_store *p, PGresult *res, const char *what,
                     es_error *err)
{
    pg_early_clear(p);
    pg_fail(p, res, what, err);     /* in the transaction: its reasons */
    end_aborted(p);
    return -1;
}

static int fail_statement(pg_store *p, PGresult *res, es_error *err)
{
    return fail_stmt(p, res, "query", err);
}

/* libpq refused to send (a broken session): nothing was committed. A
 * session left half way through a pipeline is dropped. */
static int fail_send(pg_store *p, es_error *err)
{
    pg_early_clear(p);
    pg_fail(p, NULL, "query", err);
    if (p->wrapped && p->conn) {
        PQfinish(p->conn);
        p->conn = NULL;
    } else if (p->conn && PQstatus(p->conn) == CONNECTION_OK &&
               PQtransactionStatus(p->conn) != PQTRANS_IDLE) {
        /* BEGIN went out earlier: end the transaction here too */
        PQclear(PQexec(p->conn, "ROLLBACK"));
    }
    p->wrapped = 0;
    p->prefix = 0;
    p->in_tx = 0;
    p->begin_pending = 0;
    p->tx_lost = 0;
    return -1;
}

/* COMMIT's own outcome, as pg_end reads it. */
static int check_commit(pg_store *p, PGresult *done, es_error *err)
{
    pg_early_clear(p);
    p->in_tx = 0;
    if (!ok(done)) {
        if (!done)
            done = PQmakeEmptyPGresult(p->conn, PGRES_FATAL_ERROR);
        pg_fail(p, done, "commit", err);
        p->tx_lost = 0;
        return -1;
    }
    /* COMMIT of an aborted transaction answers ROLLBACK */
    if (strcmp(PQcmdStatus(done), "ROLLBACK") == 0) {
        PQclear(done);
        es_fail(err, ES_DATABASE, "commit: the transaction was aborted by an "
                "earlier error and has been rolled back; nothing of it was "
                "committed");
        err->reason = ES_REASON_TX_ABORTED;
        return -1;
    }
    PQclear(done);
    return 0;
}

/* What every statement that ends the transaction checks first: 1 when
 * it may go on, 0 when commit() is the one to report (no transaction, or
 * a session lost under it), -1 when it failed (err). */
static int end_ready(pg_store *p, es_error *err)
{
    pg_settle_wire(p);
    if (pg_copy_failed_commit(p, err) < 0)
        return -1;
    if (!p->in_tx || p->tx_lost ||
        (!p->begin_pending &&
         (!p->conn || PQstatus(p->conn) != CONNECTION_OK)))
        return 0;
    /* a deferred BEGIN: nothing sent yet, so a new session may serve */
    if (p->begin_pending && pg_ready(p, err) < 0) {
        p->begin_pending = 0;
        p->in_tx = 0;
        pg_early_clear(p);
        return -1;
    }
    return 1;
}

/* pg_query_commit, keeping the statement's result in *keep when asked. */
static int query_commit(es_store *s, const char *sql, int nparams,
                        const char *const *params, PGresult **keep,
                        es_error *err)
{
    pg_store *p = (pg_store *)s;
    PGresult *res = NULL, *done;
    char name[PG_QNAME];
    int named, ready = end_ready(p, err);

    if (ready <= 0)
        return ready < 0 ? -1 : pg_commit(s, err);
    named = pg_qcache_prepare(p, sql, nparams, name, &res);
    if (named < 0)
        return fail_statement(p, res, err);
    if (send_all(p, named ? name : NULL, sql, nparams, params) < 0)
        return fail_send(p, err);
    res = receive_all(p, &done);
    if (named)
        pg_qcache_check(p, sql, res);
    if (!ok(res)) {
        PQclear(done);
        return fail_statement(p, res, err);
    }
    if (check_commit(p, done, err) < 0) {
        PQclear(res);
        return -1;
    }
    if (keep)
        *keep = res;
    else
        PQclear(res);
    return 0;
}

int pg_query_commit(es_store *s, const char *sql, int nparams,
                    const char *const *params, es_rows **rows, es_error *err)
{
    PGresult *res = NULL;
    es_error ignored;
    if (query_commit(s, sql, nparams, params, rows ? &res : NULL, err) < 0)
        return -1;
    /* committed: without memory for the rows it still is */
    if (rows)
        *rows = pg_rows_of(res, &ignored);
    return 0;
}

/* ---- a statement, the caller's behind it, and COMMIT ---------------------- */

/* Both statements' results and COMMIT's, each read only when the one
 * before it ran; the pipeline is read to its end. */
static void receive_three(pg_store *p, PGresult **r1, PGresult **r2,
                          PGresult **done)
{
    *r2 = *done = NULL;
    *r1 = pg_take_result(p);
    if (ok(*r1)) {
        *r2 = next_result(p);
        if (ok(*r2))
            *done = next_result(p);
    }
    if (!*r1)       /* libpq's message, before the drain may drop it */
        *r1 = PQmakeEmptyPGresult(p->conn, PGRES_FATAL_ERROR);
    pg_drain(p);
}

int pg_exec_commit(pg_store *p, int stmt, int nparams,
                   const char *const *values, int binary_result,
                   const char *sql, int nq, const char *const *qparams,
                   PGresult **first, PGresult **second, es_error *err)
{
    PGresult *r1, *r2 = NULL, *done;
    const char *name1, *text1;
    char name2[PG_QNAME];
    int named2, ready = end_ready(p, err);

    *first = *second = NULL;
    if (ready <= 0) {
        if (ready == 0 && pg_commit(&p->base, err) == 0)
            es_fail(err, ES_INVALID, "no transaction is open");
        return 2;
    }
    if (pg_stmt_ready(p, stmt, &name1, &text1, err) < 0) {
        end_aborted(p);     /* err says why already */
        return 2;
    }
    named2 = pg_qcache_prepare(p, sql, nq, name2, &r2);
    if (named2 < 0) {
        fail_statement(p, r2, err);
        return 2;
    }
    if (pipe_enter(p) < 0 ||
        !send_one(p, name1, text1, nparams, values, binary_result) ||
        !send_one(p, named2 ? name2 : NULL, sql, nq, qparams, 0) ||
        !send_commit(p)) {
        fail_send(p, err);
        return 2;
    }
    receive_three(p, &r1, &r2, &done);
    if (!ok(r1)) {
        PQclear(r2);
        PQclear(done);
        fail_stmt(p, r1, pg_stmt_what(stmt), err);
        return 1;
    }
    if (named2 && r2)
        pg_qcache_check(p, sql, r2);
    if (!ok(r2)) {
        PQclear(r1);
        PQclear(done);
        if (!r2)
            r2 = PQmakeEmptyPGresult(p->conn, PGRES_FATAL_ERROR);
        fail_statement(p, r2, err);
        return 2;
    }
    if (check_commit(p, done, err) < 0) {
        PQclear(r1);
        PQclear(r2);
        return 2;
    }
    *first = r1;
    *second = r2;
    return 0;
}

/* ---- a query ahead -------------------------------------------------------- */

void pg_early_clear(pg_store *p)
{
    pg_early *q = &p->early;
    for (int i = 0; i < q->nparams; i++)
        free(q->params[i]);
    free(q->params);
    free(q->sql);
    PQclear(q->res);
    memset(q, 0, sizeof *q);
}

void pg_early_settle(pg_store *p)
{
    if (p->early.state == PG_EARLY_SENT)
        p->early.state = PG_EARLY_LOST;
}

int pg_early_send(pg_store *p)
{
    pg_early *q = &p->early;
    char name[PG_QNAME];
    int ok;
    /* by name when the query cache prepared it on this session (at
     * query_ahead or since), else by its text */
    ok = pg_qcache_named(p, q->sql, name)
             ? PQsendQueryPrepared(p->conn, name, q->nparams,
                                   (const char *const *)q->params, NULL, NULL,
                                   0)
             : PQsendQueryParams(p->conn, q->sql, q->nparams, NULL,
                                 (const char *const *)q->params, NULL, NULL,
                                 0);
    if (!ok)
        return -1;
    p->prefix++;
    q->at = p->prefix;
    q->state = PG_EARLY_SENT;
    return 1;
}

/* Copies of the query and its parameters: they wait past the caller. */
static int keep(pg_early *q, const char *sql, int nparams,
                const char *const *params)
{
    if (!(q->sql = strdup(sql)))
        return -1;
    if (nparams > 0 && !(q->params = calloc((size_t)nparams, sizeof *q->params)))
        return -1;
    q->nparams = nparams;
    for (int i = 0; i < nparams; i++)
        if (params[i] && !(q->params[i] = strdup(params[i])))
            return -1;
    return 0;
}

int pg_query_ahead(es_store *s, const char *sql, int nparams,
                   const char *const *params, es_error *err)
{
    pg_store *p = (pg_store *)s;
    PGresult *res = NULL;
    char name[PG_QNAME];

    if (!p->in_tx && !p->tx_lost)
        return es_fail(err, ES_INVALID, "query_ahead: only inside a "
                       "transaction (store:begin() first)");
    pg_settle_wire(p);      /* a thread may be taking an earlier one's result */
    if (p->early.state == PG_EARLY_QUEUED)
        return es_fail(err, ES_INVALID, "query_ahead: a query ahead is "
                       "waiting already (take its rows with ahead_rows())");
    if (pg_ready(p, err) < 0)
        return -1;
    pg_early_clear(p);      /* a result nobody took */
    /* Prepared now (by the query cache) so that it goes by name; the
     * first time on a session that costs a round trip. A query the server
     * refuses fails here, in the transaction, as query() would. */
    if (pg_qcache_prepare(p, sql, nparams, name, &res) < 0) {
        pg_fail(p, res, "query", err);
        return -1;
    }
    if (keep(&p->early, sql, nparams, params) < 0) {
        pg_early_clear(p);
        return es_fail(err, ES_DATABASE, "out of memory");
    }
    p->early.state = PG_EARLY_QUEUED;
    return 0;
}

es_rows *pg_ahead_rows(es_store *s, es_error *err)
{
    pg_store *p = (pg_store *)s;
    pg_early *q = &p->early;
    es_rows *rows;

    /* the prefetch thread may hold its result still (it went in front of
     * the next batch's read): join it before looking */
    pg_settle_wire(p);
    switch (q->state) {
    case PG_EARLY_HELD: {
        PGresult *res = q->res;
        q->res = NULL;
        pg_early_clear(p);
        return pg_rows_of(res, err);
    }
    case PG_EARLY_QUEUED: {
        /* no statement took it: it runs on its own */
        pg_early held = *q;
        memset(q, 0, sizeof *q);
        rows = pg_query(s, held.sql, held.nparams,
                        (const char *const *)held.params, err);
        *q = held;
        q->state = PG_EARLY_NONE;
        pg_early_clear(p);
        return rows;
    }
    case PG_EARLY_NONE:
        es_fail(err, ES_INVALID, "ahead_rows: no query ahead (query_ahead() "
                "first; its rows are given once)");
        return NULL;
    default:
        pg_early_clear(p);
        es_fail(err, ES_DATABASE, "ahead_rows: the query ahead did not run: "
                "the statement it went with failed first, or with it (that "
                "statement's error says why)");
        return NULL;
    }
}
