/*
 * pg_copy.c - bulk loads: COPY "schema"."table" (columns) FROM STDIN.
 *
 * A rebuild writes hundreds of thousands of new rows into a fresh shadow
 * table; COPY takes them in one stream, parsing plain text fields, where
 * an INSERT ... SELECT FROM json_populate_recordset parses JSON and checks
 * ON CONFLICT for every row. The caller (the Lua binding) builds the text;
 * this file only names the target safely and moves the bytes.
 */
#include "pg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* Sends the rows and ends the copy; the result says how it went. */
static int send_rows(pg_store *p, const char *data, size_t len,
                     int64_t *count, es_error *err)
{
    PGresult *res;
    const char *why = NULL;
    for (size_t at = 0; at < len && !why; at += COPY_CHUNK) {
        size_t n = len - at < COPY_CHUNK ? len - at : COPY_CHUNK;
        if (PQputCopyData(p->conn, data + at, (int)n) != 1)
            why = "the rows could not be sent";
    }
    /* on a send failure, end the copy with an error: the server then
     * rolls the statement back and copies nothing */
    if (PQputCopyEnd(p->conn, why) != 1 && !why)
        why = "the copy could not be ended";
    res = PQgetResult(p->conn);
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_fail(p, res, "copy", err);
        pg_drain(p);
        return -1;
    }
    *count = strtoll(PQcmdTuples(res), NULL, 10);
    PQclear(res);
    pg_drain(p);
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
    return send_rows(p, data, len, count, err);
}
