/*
 * pg_citus_read.c - read_all on Citus: one (txid, position) cursor per
 * shard, read on the shard's worker against that worker's snapshot.
 *
 * One statement on the coordinator runs the same query on every shard at
 * once (run_command_on_shards, in parallel; each shard finds its own
 * cursor by its shard id): the rows of a shard whose transactions are all
 * older than anything still running on its worker, after that shard's
 * cursor, in (txid, position) order. Shards' rows come back as JSON,
 * become columns again on the coordinator and are interleaved round robin
 * up to the limit. A batch thus holds, for every shard, a prefix of what
 * that shard has after its cursor, so the checkpoint after any event is
 * exact, and per-stream order (a stream lives on one shard) is kept.
 *
 * Checkpoints: "c1:<shard>@<group>=<txid>:<position>,..." for every shard
 * of the events table. The group is the node group the cursor was read
 * on: transaction ids are node-local, so a cursor is refused once its
 * shard has moved (see pg_citus.c and docs/scale-out.md).
 */
#include "pg.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uuid.h>

#define DEFAULT_BATCH 1000
#define PG_EPOCH_USEC INT64_C(946684800000000)

typedef struct shard_cursor {
    int64_t shard;
    int64_t group;
    uint64_t txid;
    int64_t pos;
} shard_cursor;

typedef struct citus_cursor {
    es_cursor base;
    PGresult *res;
    int row, nrows;
    shard_cursor *sh;
    int nsh;
    es_buf cp;
    char id[37];
    char recorded_at[32];
} citus_cursor;

static uint64_t be64(const char *v)
{
    const unsigned char *u = (const unsigned char *)v;
    uint64_t x = 0;
    for (int i = 0; i < 8; i++)
        x = (x << 8) | u[i];
    return x;
}

static void cc_destroy(es_cursor *c)
{
    citus_cursor *cc = (citus_cursor *)c;
    PQclear(cc->res);
    free(cc->sh);
    es_buf_free(&cc->cp);
    free(cc);
}

static const char *cc_checkpoint(es_cursor *c)
{
    citus_cursor *cc = (citus_cursor *)c;
    char one[96];
    int rc;

    es_buf_reset(&cc->cp);
    rc = es_buf_adds(&cc->cp, "c1:");
    for (int i = 0; i < cc->nsh; i++) {
        snprintf(one, sizeof one, "%s%" PRId64 "@%" PRId64 "=%" PRIu64
                 ":%" PRId64, i ? "," : "", cc->sh[i].shard, cc->sh[i].group,
                 cc->sh[i].txid, cc->sh[i].pos);
        rc |= es_buf_adds(&cc->cp, one);
    }
    return rc < 0 ? NULL : es_buf_cstr(&cc->cp);
}

static shard_cursor *find_shard(shard_cursor *sh, int n, int64_t shard)
{
    for (int i = 0; i < n; i++)
        if (sh[i].shard == shard)
            return &sh[i];
    return NULL;
}

static int cc_next(es_cursor *c, es_event *e, es_error *err)
{
    citus_cursor *cc = (citus_cursor *)c;
    PGresult *r = cc->res;
    shard_cursor *s;
    int i;

    if (cc->row >= cc->nrows)
        return 0;
    i = cc->row++;
    e->position = (int64_t)be64(PQgetvalue(r, i, 0));
    uuid_unparse_lower((const unsigned char *)PQgetvalue(r, i, 1), cc->id);
    e->id = cc->id;
    e->version = (int64_t)be64(PQgetvalue(r, i, 2));
    e->type = PQgetvalue(r, i, 3);
    e->data = PQgetvalue(r, i, 4);
    e->data_len = (size_t)PQgetlength(r, i, 4);
    e->metadata = PQgetvalue(r, i, 5);
    e->metadata_len = (size_t)PQgetlength(r, i, 5);
    es_time_format((int64_t)be64(PQgetvalue(r, i, 6)) + PG_EPOCH_USEC,
                   cc->recorded_at);
    e->recorded_at = cc->recorded_at;
    e->stream = PQgetvalue(r, i, 8);
    s = find_shard(cc->sh, cc->nsh, (int64_t)be64(PQgetvalue(r, i, 9)));
    if (!s)
        return es_fail(err, ES_DATABASE, "read_all: a row from a shard "
                       "this read did not ask");
    s->txid = be64(PQgetvalue(r, i, 7));
    s->pos = e->position;
    return 1;
}

static const es_cursor_ops cc_ops = { cc_next, cc_checkpoint, cc_destroy };

/* ---- checkpoints ---------------------------------------------------------- */

static int bad_checkpoint(const char *text, es_error *err)
{
    return es_fail(err, ES_INVALID, "checkpoint '%.60s' is not one this "
                   "store made: on Citus read_all checkpoints hold a cursor "
                   "per shard (\"c1:<shard>@<group>=<txid>:<position>,...\"); "
                   "single-node checkpoints do not carry over "
                   "(docs/scale-out.md)", text);
}

/* Parses `text` into *out (malloc'd, *n entries). NULL text: none. */
static int parse_checkpoint(const char *text, shard_cursor **out, int *n,
                            es_error *err)
{
    const char *s;
    int cap = 0;

    *out = NULL;
    *n = 0;
    if (!text)
        return 0;
    if (strncmp(text, "c1:", 3) != 0)
        return bad_checkpoint(text, err);
    for (s = text + 3; *s; s++)
        cap += *s == ',';
    *out = calloc((size_t)cap + 1, sizeof **out);
    if (!*out)
        return es_fail(err, ES_DATABASE, "out of memory");
    s = text + 3;
    while (*s) {
        shard_cursor *c = &(*out)[*n];
        char *end;
        if (*s < '0' || *s > '9')
            goto bad;
        c->shard = strtoll(s, &end, 10);
        if (*end != '@' || end[1] < '0' || end[1] > '9')
            goto bad;
        c->group = strtoll(end + 1, &end, 10);
        if (*end != '=' || end[1] < '0' || end[1] > '9')
            goto bad;
        c->txid = strtoull(end + 1, &end, 10);
        if (*end != ':' || end[1] < '0' || end[1] > '9')
            goto bad;
        c->pos = strtoll(end + 1, &end, 10);
        if (*end != ',' && *end != '\0')
            goto bad;
        (*n)++;
        s = *end ? end + 1 : end;
    }
    if (*n == 0)
        goto bad;
    return 0;
bad:
    free(*out);
    *out = NULL;
    *n = 0;
    return bad_checkpoint(text, err);
}

/* The events table's shards and the node group of each, as cursors at the
 * start of the shard. */
static int current_shards(pg_store *p, shard_cursor **out, int *n,
                          es_error *err)
{
    const char *param[1] = { p->schema };
    PGresult *res;

    *out = NULL;
    *n = 0;
    if (pg_ensure(p, err) < 0)
        return -1;
    res = PQexecParams(p->conn, "SELECT s.shardid, min(pl.groupid)"
                       " FROM pg_dist_shard s JOIN pg_dist_placement pl"
                       " USING (shardid) WHERE s.logicalrelid = to_regclass("
                       "quote_ident($1::text) || '.events') GROUP BY s.shardid"
                       " ORDER BY s.shardid", 1, NULL, param, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return pg_fail(p, res, "read_all", err);
    *n = PQntuples(res);
    *out = calloc((size_t)*n + 1, sizeof **out);
    if (!*out) {
        PQclear(res);
        *n = 0;
        return es_fail(err, ES_DATABASE, "out of memory");
    }
    for (int i = 0; i < *n; i++) {
        (*out)[i].shard = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        (*out)[i].group = strtoll(PQgetvalue(res, i, 1), NULL, 10);
    }
    PQclear(res);
    return 0;
}

/* Carries the checkpoint's cursors over to the current shards, refusing
 * any shard that moved, appeared or went since the checkpoint. */
static int rebase(shard_cursor *cur, int ncur, const shard_cursor *old,
                  int nold, es_error *err)
{
    if (!old)
        return 0;
    for (int i = 0; i < nold; i++) {
        shard_cursor *c = find_shard(cur, ncur, old[i].shard);
        if (!c)
            return es_fail(err, ES_INVALID, "read_all: shard %" PRId64 " of "
                           "this checkpoint no longer exists (split or "
                           "table redistributed?): followers cannot carry "
                           "their position over (docs/scale-out.md)",
                           old[i].shard);
        if (c->group != old[i].group)
            return es_fail(err, ES_INVALID, "read_all: shard %" PRId64
                           " moved from node group %" PRId64 " to %" PRId64
                           " since this checkpoint; transaction ids are "
                           "per node, so its cursor cannot be carried over "
                           "(docs/scale-out.md: shard moves)", old[i].shard,
                           old[i].group, c->group);
        c->txid = old[i].txid;
        c->pos = old[i].pos;
    }
    if (nold != ncur)
        return es_fail(err, ES_INVALID, "read_all: the events table has %d "
                       "shards, this checkpoint %d (docs/scale-out.md)", ncur,
                       nold);
    return 0;
}

/* ---- the statement --------------------------------------------------------- */

/* Adds a literal for the per-shard command, which goes through format():
 * its % signs are doubled. */
static int add_literal(pg_store *p, es_buf *b, const char *s)
{
    char *lit = PQescapeLiteral(p->conn, s, strlen(s));
    int rc = 0;
    if (!lit)
        return -1;
    for (const char *c = lit; *c; c++)
        rc |= *c == '%' ? es_buf_adds(b, "%%") : es_buf_addc(b, *c);
    PQfreemem(lit);
    return rc;
}

/* The query each shard runs (%1$s: the shard's table). */
static int shard_command(pg_store *p, es_buf *b, const shard_cursor *sh,
                         int nsh, const es_read_all_opts *o, int64_t limit)
{
    char one[96];
    int rc = 0;

    rc |= es_buf_adds(b, "SELECT coalesce(json_agg(e ORDER BY e.n), '[]')"
                      " FROM (SELECT position, id, version, type, data,"
                      " metadata, recorded_at, txid, stream, row_number()"
                      " OVER (ORDER BY txid, position) AS n FROM %1$s"
                      " WHERE (txid, position) > (SELECT c.t, c.p FROM"
                      " (VALUES ");
    for (int i = 0; i < nsh; i++) {
        snprintf(one, sizeof one, "%s(%" PRId64 "::bigint, '%" PRIu64
                 "'::xid8, %" PRId64 "::bigint)", i ? ", " : "", sh[i].shard,
                 sh[i].txid, sh[i].pos);
        rc |= es_buf_adds(b, one);
    }
    rc |= es_buf_adds(b, ") AS c(s, t, p) WHERE c.s = substring('%1$s' FROM"
                      " '(\\d+)\\D*$')::bigint)"
                      " AND txid < pg_snapshot_xmin(pg_current_snapshot())");
    if (o->category) {
        rc |= es_buf_adds(b, " AND category = ");
        rc |= add_literal(p, b, o->category);
    }
    if (o->types) {
        rc |= es_buf_adds(b, " AND type IN (");
        for (size_t i = 0; i < o->ntypes; i++) {
            if (i)
                rc |= es_buf_addc(b, ',');
            rc |= add_literal(p, b, o->types[i]);
        }
        rc |= es_buf_addc(b, ')');
    }
    snprintf(one, sizeof one, " ORDER BY txid, position LIMIT %" PRId64 ") e",
             limit);
    rc |= es_buf_adds(b, one);
    return rc;
}

static PGresult *run_batch(pg_store *p, const shard_cursor *sh, int nsh,
                           const es_read_all_opts *o, int64_t limit,
                           es_error *err)
{
    char sql[1024], lim[24];
    const char *values[2];
    es_buf cmd;
    PGresult *res;

    es_buf_init(&cmd);
    if (shard_command(p, &cmd, sh, nsh, o, limit) < 0 || !es_buf_cstr(&cmd)) {
        es_buf_free(&cmd);
        es_fail(err, ES_DATABASE, "out of memory");
        return NULL;
    }
    snprintf(sql, sizeof sql, "SELECT r.position, r.id, r.version, r.type,"
             " r.data, r.metadata, r.recorded_at, r.txid, r.stream, c.shardid"
             " FROM run_command_on_shards('\"%s\".events', $1) c,"
             " LATERAL json_to_recordset(CASE WHEN c.success THEN"
             " c.result::json ELSE \"%s\".shard_failed(c.shardid, c.result)"
             " END) AS r(position bigint, id uuid, version bigint, type text,"
             " data json, metadata json, recorded_at timestamptz, txid xid8,"
             " stream text, n bigint)"
             " ORDER BY r.n, c.shardid LIMIT $2::bigint", p->schema,
             p->schema);
    snprintf(lim, sizeof lim, "%" PRId64, limit);
    values[0] = es_buf_cstr(&cmd);
    values[1] = lim;
    res = PQexecParams(p->conn, sql, 2, NULL, values, NULL, NULL, 1);
    es_buf_free(&cmd);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        pg_fail(p, res, "read_all", err);
        return NULL;
    }
    if (PQnfields(res) != 10) {
        PQclear(res);
        es_fail(err, ES_DATABASE, "read_all: unexpected result shape");
        return NULL;
    }
    return res;
}

es_cursor *pg_citus_read_all(pg_store *p, const es_read_all_opts *o,
                             es_error *err)
{
    shard_cursor *old = NULL;
    int nold = 0;
    citus_cursor *cc;

    if (parse_checkpoint(o->after, &old, &nold, err) < 0)
        return NULL;
    cc = calloc(1, sizeof *cc);
    if (!cc) {
        free(old);
        es_fail(err, ES_DATABASE, "out of memory");
        return NULL;
    }
    cc->base.ops = &cc_ops;
    cc->base.store = &p->base;
    es_buf_init(&cc->cp);
    if (current_shards(p, &cc->sh, &cc->nsh, err) < 0 ||
        rebase(cc->sh, cc->nsh, old, nold, err) < 0)
        goto fail;
    free(old);
    old = NULL;
    cc->res = run_batch(p, cc->sh, cc->nsh, o,
                        o->limit > 0 ? o->limit : (int64_t)DEFAULT_BATCH, err);
    if (!cc->res)
        goto fail;
    cc->nrows = PQntuples(cc->res);
    return &cc->base;
fail:
    free(old);
    cc_destroy(&cc->base);
    return NULL;
}
