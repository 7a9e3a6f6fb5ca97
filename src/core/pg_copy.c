/*
 * pg_copy.c - bulk loads: COPY "schema"."table" (columns) FROM STDIN.
 *
 * A rebuild writes hundreds of thousands of new rows into a fresh shadow
 * table; COPY takes them in one stream, parsing plain text fields, where
 * an INSERT ... SELECT FROM json_populate_recordset parses JSON and checks
 * ON CONFLICT for every row. The caller (the Lua binding) builds the text;
 * this file only names the target safely and moves the bytes.
 *
 * Without waiting (count NULL): a rebuild that waited for each batch's
 * COPY spent 1.1-1.9 us an event there; with a thread of the store
 * sending the rows and collecting the result while the rebuild makes the
 * next batch, 0.3 us. The session is the thread's until pg_copy_join,
 * which every use of the session calls first (pg_settle), so the two
 * never touch the connection at once.
 */
#include "pg.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Pieces of at most this size go to libpq at a time. */
#define COPY_CHUNK (1 << 20)

/* Appends the quoted identifier name to b. */
static int add_ident(pg_store *p, es_buf *b, const char *name, es_error *err)
{
    char *q = PQescapeIdentifier(p->conn, name, strlen(name));
    int rc;
    if (!q)
        return es_fail(err, ES_INVALID, "copy: bad identifier '%.60s': %s",
                       name, PQerrorMessage(p->conn));
    rc = es_buf_adds(b, q);
    PQfreemem(q);
    return rc < 0 ? es_fail(err, ES_DATABASE, "out of memory") : 0;
}

/* The COPY statement into sql (caller frees the buffer). */
static int copy_sql(pg_store *p, es_buf *sql, const char *schema,
                    const char *table, const char *const *columns,
                    size_t ncolumns, es_error *err)
{
    if (add_ident(p, sql, schema, err) < 0)
        return -1;
    if (es_buf_addc(sql, '.') < 0)
        return es_fail(err, ES_DATABASE, "out of memory");
    if (add_ident(p, sql, table, err) < 0)
        return -1;
    if (es_buf_adds(sql, " (") < 0)
        return es_fail(err, ES_DATABASE, "out of memory");
    for (size_t i = 0; i < ncolumns; i++) {
        if (i && es_buf_adds(sql, ", ") < 0)
            return es_fail(err, ES_DATABASE, "out of memory");
        if (add_ident(p, sql, columns[i], err) < 0)
            return -1;
    }
    if (es_buf_adds(sql, ") FROM STDIN") < 0 || !es_buf_cstr(sql))
        return es_fail(err, ES_DATABASE, "out of memory");
    return 0;
}

/* Sends the rows and ends the copy: its result (NULL if there is none).
 * Touches nothing but conn: it may run on the copy thread. */
static PGresult *put_rows(PGconn *conn, const char *data, size_t len)
{
    PGresult *res, *extra;
    const char *why = NULL;
    for (size_t at = 0; at < len && !why; at += COPY_CHUNK) {
        size_t n = len - at < COPY_CHUNK ? len - at : COPY_CHUNK;
        if (PQputCopyData(conn, data + at, (int)n) != 1)
            why = "the rows could not be sent";
    }
    /* on a send failure, end the copy with an error: the server then
     * rolls the statement back and copies nothing */
    PQputCopyEnd(conn, why);
    res = PQgetResult(conn);
    while (res && (extra = PQgetResult(conn)) != NULL)
        PQclear(extra);
    return res;
}

/* The copy's outcome from its result (cleared here). */
static int copy_result(pg_store *p, PGresult *res, int64_t *count,
                       es_error *err)
{
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_fail(p, res, "copy", err);
        pg_drain(p);
        return -1;
    }
    if (count)
        *count = strtoll(PQcmdTuples(res), NULL, 10);
    PQclear(res);
    return 0;
}

/* ---- a copy that does not wait ------------------------------------------- */

typedef struct pg_copy_job {
    pthread_t thread;
    pid_t pid;                /* the process whose thread it is */
    PGconn *conn;
    char *data;               /* the job's own copy of the rows' text */
    size_t len;
    PGresult *res;            /* the thread's result */
} pg_copy_job;

static void *copy_thread(void *arg)
{
    pg_copy_job *job = arg;
    job->res = put_rows(job->conn, job->data, job->len);
    return NULL;
}

static int copy_start(pg_store *p, const char *data, size_t len,
                      es_error *err)
{
    pg_copy_job *job = calloc(1, sizeof *job);
    int rc;
    if (job)
        job->data = malloc(len ? len : 1);
    if (!job || !job->data) {
        if (job)
            free(job);
        /* the server waits in COPY for rows: end it with nothing */
        PQclear(put_rows(p->conn, "", 0));
        return es_fail(err, ES_DATABASE, "out of memory");
    }
    memcpy(job->data, data, len);
    job->len = len;
    job->conn = p->conn;
    job->pid = getpid();
    rc = pthread_create(&job->thread, NULL, copy_thread, job);
    if (rc != 0) {          /* no thread: send them here, then */
        PGresult *res = put_rows(p->conn, job->data, len);
        free(job->data);
        free(job);
        return copy_result(p, res, NULL, err);
    }
    p->copying = job;
    return 0;
}

int pg_copy_join(pg_store *p)
{
    pg_copy_job *job = p->copying;
    int64_t n = 0;
    int rc;
    if (!job)
        return 0;
    p->copying = NULL;
    if (job->pid != getpid()) {
        /* a forked child: the thread and the reply are the parent's;
         * touch neither (the child must not use this session at all).
         * The job's memory is this process's own copy: freed, not leaked */
        free(job->data);
        free(job);
        return 0;
    }
    pthread_join(job->thread, NULL);
    free(job->data);
    rc = copy_result(p, job->res, &n, &p->copy_err);
    free(job);
    p->copied += n;
    if (rc < 0)
        p->copy_failed = 1;
    return rc;
}

int pg_copy_failure(pg_store *p, es_error *err)
{
    if (!p->copy_failed)
        return 0;
    p->copy_failed = 0;
    /* reported to a call that did not make it: as a plain database or
     * connection error, without the copy's SQLSTATE or reason, which that
     * call's caller would take as its own (an append retries a unique
     * violation, a repository retries a conflict) */
    es_fail(err, p->copy_err.kind == ES_CONNECTION ? ES_CONNECTION
                                                   : ES_DATABASE,
            "copy_rows (sent without waiting) failed: %s",
            p->copy_err.message);
    return -1;
}

int pg_copy_wait(es_store *s, int64_t *count, es_error *err)
{
    pg_store *p = (pg_store *)s;
    pg_copy_join(p);
    *count = p->copied;
    p->copied = 0;
    if (p->copy_failed) {
        p->copy_failed = 0;
        *err = p->copy_err;
        return -1;
    }
    return 0;
}

int pg_copy(es_store *s, const char *schema, const char *table,
            const char *const *columns,
            size_t ncolumns, const char *data, size_t len, int64_t *count,
            es_error *err)
{
    pg_store *p = (pg_store *)s;
    es_buf sql;
    PGresult *res;
    int rc;

    if (pg_ensure(p, err) < 0)
        return -1;
    es_buf_init(&sql);
    if (es_buf_adds(&sql, "COPY ") < 0) {
        es_buf_free(&sql);
        return es_fail(err, ES_DATABASE, "out of memory");
    }
    if (copy_sql(p, &sql, schema ? schema : p->schema, table, columns,
                 ncolumns, err) < 0) {
        es_buf_free(&sql);
        return -1;
    }
    res = PQexec(p->conn, sql.data);
    es_buf_free(&sql);
    if (PQresultStatus(res) != PGRES_COPY_IN) {
        rc = pg_fail(p, res, "copy", err);
        pg_drain(p);
        return rc;
    }
    PQclear(res);
    if (!count)
        return copy_start(p, data, len, err);
    return copy_result(p, put_rows(p->conn, data, len), count, err);
}
