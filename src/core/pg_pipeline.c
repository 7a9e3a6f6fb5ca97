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

/* Sends [BEGIN,] the statement, COMMIT and a Sync. 0, or -1 when libpq
 * refused. */
static int send_all(pg_store *p, const char *name, const char *sql,
                    int nparams, const char *const *params)
{
    int piped = pg_pipe_open(p), sent;
    if (piped < 0)
        return -1;
    if (!piped) {
        if (!PQenterPipelineMode(p->conn))
            return -1;
        p->wrapped = 1;
        p->prefix = 0;
    }
    sent = name ? PQsendQueryPrepared(p->conn, name, nparams, params, NULL,
                                      NULL, 0)
                : PQsendQueryParams(p->conn, sql, nparams, NULL, params, NULL,
                                    NULL, 0);
    return sent && PQsendQueryParams(p->conn, "COMMIT", 0, NULL, NULL, NULL,
                                     NULL, 0) &&
           PQpipelineSync(p->conn) ? 0 : -1;
}

/* The statement's result (or what failed before it), and COMMIT's when
 * the statement ran; the pipeline is read to its end. */
static PGresult *receive_all(pg_store *p, PGresult **commit)
{
    PGresult *res = pg_take_result(p), *end;
    *commit = NULL;
    if (ok(res)) {
        if ((end = PQgetResult(p->conn)) != NULL)
            PQclear(end);   /* not expected: one result per statement */
        *commit = PQgetResult(p->conn);
    }
    if (!res)       /* libpq's message, before the drain may drop it */
        res = PQmakeEmptyPGresult(p->conn, PGRES_FATAL_ERROR);
    pg_drain(p);
    return res;
}

/* The statement failed: the server skipped COMMIT and holds the aborted
 * transaction open; roll it back so it ends as commit() ends it. */
static int fail_statement(pg_store *p, PGresult *res, es_error *err)
{
    pg_early_clear(p);
    pg_fail(p, res, "query", err);  /* in the transaction: its reasons */
    if (p->conn && PQstatus(p->conn) == CONNECTION_OK &&
        PQtransactionStatus(p->conn) != PQTRANS_IDLE)
        PQclear(PQexec(p->conn, "ROLLBACK"));
    p->in_tx = 0;
    p->begin_pending = 0;
    p->tx_lost = 0;     /* reported here: the next call reconnects */
    return -1;
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

int pg_query_commit(es_store *s, const char *sql, int nparams,
                    const char *const *params, es_error *err)
{
    pg_store *p = (pg_store *)s;
    PGresult *res = NULL, *done;
    char name[PG_QNAME];
    int named;

    pg_settle_wire(p);
    if (pg_copy_failed_commit(p, err) < 0)
        return -1;
    /* no transaction, or a session lost under it: commit() reports it */
    if (!p->in_tx || p->tx_lost ||
        (!p->begin_pending &&
         (!p->conn || PQstatus(p->conn) != CONNECTION_OK)))
        return pg_commit(s, err);
    /* a deferred BEGIN: nothing sent yet, so a new session may serve */
    if (p->begin_pending && pg_ready(p, err) < 0) {
        p->begin_pending = 0;
        p->in_tx = 0;
        pg_early_clear(p);
        return -1;
    }
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
    PQclear(res);
    return check_commit(p, done, err);
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
