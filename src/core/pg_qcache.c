/*
 * pg_qcache.c - store:query's statements, prepared once per session.
 *
 * A read model's inline write (load the rows, write them) and other hot
 * queries built in Lua come as SQL text; sent unnamed, PostgreSQL parses
 * and plans them on every call, which cost more than running them (about
 * 100 us each here). So a query with parameters is prepared on the
 * session under a slot's name and executed by name afterwards; the least
 * recently used of PG_QCACHE slots is deallocated when another query needs
 * one. Queries without parameters (DDL, one-off statements) stay unnamed.
 *
 * A prepared statement names its tables by the text, as the query did:
 * when a table is replaced (a rebuild's swap renames tables) PostgreSQL
 * analyses the text again on the next execution, so it reads the new one.
 * A statement whose result columns changed is prepared again and run once
 * more when no transaction is open; inside one it fails (0A000) and its
 * slot is dropped. Not used behind a transaction pooler (no session to keep
 * statements in), nor in an aborted transaction (nothing would run).
 */
#include "pg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Each preparation gets a name never used before on this store: after
 * pg_fail forgot what was prepared (42P05/26000, see pg.c) the session
 * may still hold statements of earlier names, which a reused name would
 * collide with ("already exists") on every later prepare. */
static void slot_name(const pg_store *p, int i, char *out, size_t len)
{
    snprintf(out, len, "es_q%lu", p->qcache[i].gen);
}

static int find(const pg_store *p, const char *sql)
{
    for (int i = 0; i < PG_QCACHE; i++)
        if (p->qcache[i].sql && strcmp(p->qcache[i].sql, sql) == 0)
            return i;
    return -1;
}

/* A free slot, else the least recently used one. */
static int victim(const pg_store *p)
{
    int best = 0;
    for (int i = 0; i < PG_QCACHE; i++) {
        if (!p->qcache[i].sql)
            return i;
        if (p->qcache[i].used < p->qcache[best].used)
            best = i;
    }
    return best;
}

/* Empties slot i, deallocating its statement on the session. -1 when the
 * server refused (the slot is kept as it was). */
static int evict(pg_store *p, int i)
{
    if (p->qprepared & (1u << i)) {
        char sql[48], name[32];
        PGresult *res;
        slot_name(p, i, name, sizeof name);
        snprintf(sql, sizeof sql, "DEALLOCATE %s", name);
        res = PQexec(p->conn, sql);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            PQclear(res);
            return -1;
        }
        PQclear(res);
        p->qprepared &= ~(1u << i);
    }
    free(p->qcache[i].sql);
    p->qcache[i].sql = NULL;
    return 0;
}

/* The slot holding sql (taken now when needed), or -1. */
static int slot_for(pg_store *p, const char *sql)
{
    int i = find(p, sql);
    if (i >= 0)
        return i;
    i = victim(p);
    if (evict(p, i) < 0)
        return -1;
    if (!(p->qcache[i].sql = strdup(sql)))
        return -1;
    return i;
}

int pg_qcache_prepare(pg_store *p, const char *sql, int nparams,
                      char *name, PGresult **res)
{
    int i;
    if (nparams == 0 || p->pooler == PG_POOLER_TRANSACTION ||
        PQtransactionStatus(p->conn) == PQTRANS_INERROR)
        return 0;
    if ((i = slot_for(p, sql)) < 0)
        return 0;
    p->qcache[i].used = ++p->qclock;
    if (!(p->qprepared & (1u << i))) {
        /* A deferred BEGIN goes first: a statement that fails to prepare
         * must abort the caller's transaction, as it would inside it. */
        if (p->begin_pending) {
            es_error ignored;
            if (pg_ensure(p, &ignored) < 0)
                return 0;   /* the unnamed path reports the broken session */
        }
        p->qcache[i].gen = ++p->qgen;
        slot_name(p, i, name, PG_QNAME);
        *res = PQprepare(p->conn, name, sql, nparams, NULL);
        if (PQresultStatus(*res) != PGRES_COMMAND_OK)
            return -1;   /* the query's error (the slot stays unprepared) */
        PQclear(*res);
        *res = NULL;
        p->qprepared |= 1u << i;
    } else {
        slot_name(p, i, name, PG_QNAME);
    }
    return 1;
}

int pg_qcache_named(pg_store *p, const char *sql, char *name)
{
    int i = p->pooler == PG_POOLER_TRANSACTION ? -1 : find(p, sql);
    if (i < 0 || !(p->qprepared & (1u << i)))
        return 0;
    p->qcache[i].used = ++p->qclock;
    slot_name(p, i, name, PG_QNAME);
    return 1;
}

/* "cached plan must not change result type": a table under the statement
 * changed its columns since it was prepared. Told by the function that
 * raises it, not by the message (0A000 alone is any unsupported feature). */
static int plan_changed(const PGresult *res)
{
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *fn = PQresultErrorField(res, PG_DIAG_SOURCE_FUNCTION);
    return state && strcmp(state, "0A000") == 0 && fn &&
           strcmp(fn, "RevalidateCachedQuery") == 0;
}

void pg_qcache_check(pg_store *p, const char *sql, const PGresult *res)
{
    int i;
    /* prepare it afresh next time (outside an aborted transaction) */
    if (plan_changed(res) && (i = find(p, sql)) >= 0) {
        free(p->qcache[i].sql);
        p->qcache[i].sql = NULL;
    }
}

PGresult *pg_qcache_exec(pg_store *p, const char *sql, int nparams,
                         const char *const *params)
{
    char name[PG_QNAME];
    PGresult *res = NULL;
    int rc = pg_qcache_prepare(p, sql, nparams, name, &res);

    if (rc <= 0)
        return res;
    res = pg_exec_stmt(p, name, NULL, nparams, params, 0);
    pg_qcache_check(p, sql, res);
    /* Outside a transaction the failed statement changed nothing: run it
     * once more, prepared afresh, so that the caller never sees an error
     * the cache alone caused. Inside one, the transaction is aborted and
     * the error stands (the caller's retry starts a new one). */
    if (plan_changed(res) && !p->in_tx &&
        PQtransactionStatus(p->conn) == PQTRANS_IDLE) {
        PQclear(res);
        res = NULL;
        if ((rc = pg_qcache_prepare(p, sql, nparams, name, &res)) <= 0)
            return res;
        res = pg_exec_stmt(p, name, NULL, nparams, params, 0);
        pg_qcache_check(p, sql, res);
    }
    return res;
}

void pg_qcache_reset(pg_store *p)
{
    p->qprepared = 0;
}

void pg_qcache_free(pg_store *p)
{
    for (int i = 0; i < PG_QCACHE; i++) {
        free(p->qcache[i].sql);
        p->qcache[i].sql = NULL;
    }
    p->qprepared = 0;
}
