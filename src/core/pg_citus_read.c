/*
 * pg_citus_read.c - read_all on Citus: one (txid, position) cursor per
 * shard, each read on the shard's worker against that worker's snapshot.
 *
 * The coordinator says where each shard of the events table is; read_all
 * then asks every shard's table directly, on a session to its worker
 * opened with the store's own conninfo and the worker's host and port
 * (kept for later reads): the rows after that shard's cursor whose
 * transactions are older than anything still running on that worker, in
 * (txid, position) order, each shard's query its own statement, sent to
 * all workers at once (libpq pipeline mode). Each shard gets a share of
 * the limit (more while others have less), and the batch gives the rows
 * round robin, so it
 * holds a prefix of every shard's rows after its cursor and reads about
 * `limit` rows in all:
 * the checkpoint after any event is exact, and per-stream order (a stream
 * lives on one shard) is kept. Reads run outside the caller's transaction.
 *
 * Checkpoints: "c1:<shard>@<group>=<txid>:<position>,..." for every shard
 * of the events table. The group is the node group the cursor was read
 * on: transaction ids are node-local, so once its shard has moved a cursor
 * is carried over only when that skips nothing (carries_over; see
 * pg_citus.c and docs/scale-out.md).
 */
#include "pg.h"
#include "es_time.h"
#include "es_uuid.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uuid.h>

#define DEFAULT_BATCH 1000

typedef struct shard_cursor {
    int64_t shard;
    int64_t group;
    uint64_t txid;
    int64_t pos;
    char *table;              /* current shards: the shard's table, */
    char *host;               /* on this worker */
    int port;
    uint64_t rd_txid;         /* where this batch's reads of it got to */
    int64_t rd_pos;
    int done;                 /* nothing more in it for this batch */
    int jump;                 /* filtered and short: once the batch is */
    uint64_t hd_txid;         /* delivered, the cursor moves to the last */
    int64_t hd_pos;           /* row below the watermark, any type */
} shard_cursor;

/* Rows of one shard read for the batch. */
typedef struct piece {
    int shard;                /* index into sh */
    int n;                    /* its event rows (a head row may follow) */
    PGresult *res;
} piece;

typedef struct rowref {
    int piece, row;
} rowref;

/* A batch: pieces of shards' rows, each shard's in order, so that it
 * holds a prefix of every shard's rows after its cursor. */
typedef struct citus_cursor {
    es_cursor base;
    shard_cursor *sh;
    int nsh;
    piece *pieces;
    int npieces, cap;
    rowref *refs;             /* the batch's rows, in the order given */
    int nrows, row;
    es_buf cp;
    char id[37];
    char recorded_at[32];
} citus_cursor;

static void clear_shards(shard_cursor *sh, int n)
{
    for (int i = 0; sh && i < n; i++) {
        free(sh[i].table);
        free(sh[i].host);
        sh[i].table = sh[i].host = NULL;
    }
}

static void free_shards(shard_cursor *sh, int n)
{
    clear_shards(sh, n);
    free(sh);
}

static void cc_destroy(es_cursor *c)
{
    citus_cursor *cc = (citus_cursor *)c;
    free_shards(cc->sh, cc->nsh);
    for (int i = 0; i < cc->npieces; i++)
        PQclear(cc->pieces[i].res);
    free(cc->pieces);
    free(cc->refs);
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
        const shard_cursor *s = &cc->sh[i];
        /* past what the filters skipped, once every event is delivered */
        int head = s->jump && cc->row >= cc->nrows;
        snprintf(one, sizeof one, "%s%" PRId64 "@%" PRId64 "=%" PRIu64
                 ":%" PRId64, i ? "," : "", s->shard, s->group,
                 head ? s->hd_txid : s->txid, head ? s->hd_pos : s->pos);
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
    shard_cursor *s;
    PGresult *r;
    int i;

    (void)err;
    if (cc->row >= cc->nrows)
        return 0;
    s = &cc->sh[cc->pieces[cc->refs[cc->row].piece].shard];
    r = cc->pieces[cc->refs[cc->row].piece].res;
    i = cc->refs[cc->row++].row;
    e->position = (int64_t)pg_be64(PQgetvalue(r, i, 0));
    es_uuid_format((const unsigned char *)PQgetvalue(r, i, 1), cc->id);
    e->id = cc->id;
    e->version = (int64_t)pg_be64(PQgetvalue(r, i, 2));
    e->type = PQgetvalue(r, i, 3);
    e->data = PQgetvalue(r, i, 4);
    e->data_len = (size_t)PQgetlength(r, i, 4);
    e->metadata = PQgetvalue(r, i, 5);
    e->metadata_len = (size_t)PQgetlength(r, i, 5);
    es_time_format((int64_t)pg_be64(PQgetvalue(r, i, 6)) + PG_EPOCH_USEC,
                   cc->recorded_at);
    e->recorded_at = cc->recorded_at;
    e->stream = PQgetvalue(r, i, 8);
    s->txid = pg_be64(PQgetvalue(r, i, 7));
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
        if ((*end != ',' && *end != '\0') || (*end == ',' && !end[1]))
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

static int has_duplicates(const shard_cursor *sh, int n)
{
    for (int i = 1; i < n; i++)
        if (sh[i].shard == sh[i - 1].shard)
            return 1;
    return 0;
}

/* The events table's shards: each one's node group, table and worker, as
 * cursors at the start of the shard. */
static int current_shards(pg_store *p, shard_cursor **out, int *n,
                          es_error *err)
{
    const char *param[1] = { p->schema };
    PGresult *res;

    *out = NULL;
    *n = 0;
    if (pg_ensure(p, err) < 0)
        return -1;
    res = PQexecParams(p->conn, "SELECT s.shardid, pl.groupid,"
                       " shard_name(s.logicalrelid, s.shardid), n.nodename,"
                       " n.nodeport FROM pg_dist_shard s"
                       " JOIN pg_dist_placement pl USING (shardid)"
                       " JOIN pg_dist_node n ON n.groupid = pl.groupid"
                       " AND n.noderole = 'primary'"
                       " WHERE s.logicalrelid = to_regclass("
                       "quote_ident($1::text) || '.events')"
                       " ORDER BY s.shardid", 1, NULL, param, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return pg_fail(p, res, "read_all", err);
    *n = PQntuples(res);
    *out = calloc((size_t)*n + 1, sizeof **out);
    for (int i = 0; *out && i < *n; i++) {
        shard_cursor *c = &(*out)[i];
        c->shard = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        c->group = strtoll(PQgetvalue(res, i, 1), NULL, 10);
        c->table = strdup(PQgetvalue(res, i, 2));
        c->host = strdup(PQgetvalue(res, i, 3));
        c->port = atoi(PQgetvalue(res, i, 4));
        if (!c->table || !c->host) {
            free_shards(*out, *n);
            *out = NULL;
        }
    }
    PQclear(res);
    if (!*out) {
        *n = 0;
        return es_fail(err, ES_DATABASE, "out of memory");
    }
    if (has_duplicates(*out, *n))
        return es_fail(err, ES_INVALID, "read_all: a shard of the events "
                       "table has several placements (replication), which "
                       "this store does not follow (docs/scale-out.md)");
    if (*n == 0)
        return es_fail(err, ES_DATABASE, "read_all: the events table has no "
                       "shards");
    return 0;
}

/* Keeps only the shards o->shards names (all when it is NULL): a
 * consumer group's member reads its own shards. */
static int only_shards(citus_cursor *cc, const es_read_all_opts *o,
                       es_error *err)
{
    int kept = 0;

    if (!o->shards)
        return 0;
    if (o->nshards == 0)
        return es_fail(err, ES_INVALID, "read_all: option shards is empty");
    for (size_t k = 0; k < o->nshards; k++) {
        if (!find_shard(cc->sh, cc->nsh, o->shards[k]))
            return es_fail(err, ES_INVALID, "read_all: %" PRId64 " is not a "
                           "shard of the events table", o->shards[k]);
        for (size_t j = 0; j < k; j++)
            if (o->shards[j] == o->shards[k])
                return es_fail(err, ES_INVALID, "read_all: shard %" PRId64
                               " named twice", o->shards[k]);
    }
    for (int i = 0; i < cc->nsh; i++) {
        int wanted = 0;
        for (size_t k = 0; k < o->nshards && !wanted; k++)
            wanted = o->shards[k] == cc->sh[i].shard;
        if (wanted) {
            shard_cursor keep = cc->sh[i];
            cc->sh[i] = cc->sh[kept];
            cc->sh[kept++] = keep;
        }
    }
    clear_shards(cc->sh + kept, cc->nsh - kept);
    cc->nsh = kept;
    return 0;
}

static PGconn *node_session(pg_store *p, const char *host, int port,
                            es_error *err);

/* Whether a cursor read on another node group carries over to the node
 * that holds its shard now (c, after citus_move_shard_placement). A move
 * copies the rows with their txid and position, so the rows up to the
 * cursor there are the ones the follower saw, except rows appended on the
 * new node since the move whose txid (that node's) is below the cursor's:
 * those a carried cursor would skip. Rows appended on a node have txid =
 * xmin (the trigger); copied rows have the copy's xmin. So: carried over
 * when no row up to the cursor has txid = xmin; else refused (the row
 * count says how many). This holds for one move since the cursor: rows
 * appended on a node in between are copied on like the rest (aligned
 * counters before every move cover that: docs/scale-out.md).
 * -> 1 carried, 0 refused (err set), -1 error */
static int carries_over(pg_store *p, shard_cursor *c, const shard_cursor *old,
                        es_error *err)
{
    char tx[24], pos[24], sql[512];
    const char *values[2] = { tx, pos };
    PGconn *conn;
    PGresult *res;
    long below;

    if (!(conn = node_session(p, c->host, c->port, err)))
        return -1;
    snprintf(tx, sizeof tx, "%" PRIu64, old->txid);
    snprintf(pos, sizeof pos, "%" PRId64, old->pos);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s WHERE (txid, position)"
             " <= ($1::xid8, $2::bigint) AND txid::text::numeric %% 4294967296"
             " = xmin::text::numeric", c->table);
    res = PQexecParams(conn, sql, 2, NULL, values, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        es_fail(err, ES_DATABASE, "read_all: shard %" PRId64 ": %s", c->shard,
                PQresultErrorMessage(res));
        err->message[strcspn(err->message, "\n")] = '\0';
        PQclear(res);
        return -1;
    }
    below = atol(PQgetvalue(res, 0, 0));
    PQclear(res);
    if (below == 0)
        return 1;
    es_fail(err, ES_INVALID, "read_all: shard %" PRId64 " moved from node "
            "group %" PRId64 " to %" PRId64 " since this checkpoint, and %ld "
            "event(s) appended there since have transaction ids below its "
            "cursor (that node's counter was behind): the cursor cannot be "
            "carried over without skipping them (docs/scale-out.md: shard "
            "moves)", c->shard, old->group, c->group, below);
    return 0;
}

/* Carries the checkpoint's cursors over to the current shards, refusing
 * any shard that appeared or went since the checkpoint, or that moved in
 * a way its cursor cannot follow (carries_over). */
static int rebase(pg_store *p, shard_cursor *cur, int ncur,
                  const shard_cursor *old, int nold, es_error *err)
{
    if (!old)
        return 0;
    for (int i = 0; i < nold; i++) {
        shard_cursor *c = find_shard(cur, ncur, old[i].shard);
        if (!c)
            return es_fail(err, ES_INVALID, "read_all: shard %" PRId64 " of "
                           "this checkpoint is not among the shards read "
                           "(option shards) or no longer exists (split or "
                           "table redistributed?): followers cannot carry "
                           "their position over (docs/scale-out.md)",
                           old[i].shard);
        if (c->group != old[i].group && carries_over(p, c, &old[i], err) < 1)
            return -1;
        c->txid = old[i].txid;
        c->pos = old[i].pos;
    }
    if (nold != ncur)
        return es_fail(err, ES_INVALID, "read_all: the events table has %d "
                       "shards, this checkpoint %d (docs/scale-out.md)", ncur,
                       nold);
    return 0;
}

/* ---- worker sessions ------------------------------------------------------ */

/* A session per worker, opened with the store's own conninfo and the
 * worker's host and port (as Citus lists them), kept for later reads. */
typedef struct node_conn {
    char host[256];
    int port;
    PGconn *conn;
} node_conn;

struct pg_citus_nodes {
    node_conn *v;
    int n;
};

void pg_citus_close(pg_store *p, void (*finish)(PGconn *))
{
    if (!p->nodes)
        return;
    for (int i = 0; i < p->nodes->n; i++)
        if (p->nodes->v[i].conn)
            finish(p->nodes->v[i].conn);
    free(p->nodes->v);
    free(p->nodes);
    p->nodes = NULL;
}

/* The store's statement and lock timeouts, on a worker session too:
 * reads of the log run there. Worker sessions are direct (never through
 * the store's pooler), so a session SET holds. */
static int set_timeouts(const pg_store *p, PGconn *c)
{
    char sql[160];
    PGresult *res;
    int ok;

    if (p->session_sql[0])
        snprintf(sql, sizeof sql, "%s", p->session_sql);
    else if (p->timeouts[0][0])
        snprintf(sql, sizeof sql, "SET statement_timeout = %s;"
                 " SET lock_timeout = %s", p->timeouts[0], p->timeouts[1]);
    else
        return 0;
    res = PQexec(c, sql);
    ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    return ok ? 0 : -1;
}

static PGconn *connect_node(pg_store *p, const char *host, int port,
                            es_error *err)
{
    PQconninfoOption *opts, *o;
    const char *keys[64], *vals[64];
    char portstr[16], *msg = NULL;
    int k = 0;
    PGconn *c;

    opts = PQconninfoParse(p->conninfo, &msg);
    if (!opts) {
        es_fail(err, ES_CONNECTION, "read_all: conninfo: %s",
                msg ? msg : "out of memory");
        PQfreemem(msg);
        return NULL;
    }
    snprintf(portstr, sizeof portstr, "%d", port);
    for (o = opts; o->keyword && k < 60; o++) {
        if (!o->val || !strcmp(o->keyword, "host") ||
            !strcmp(o->keyword, "hostaddr") || !strcmp(o->keyword, "port"))
            continue;
        keys[k] = o->keyword;
        vals[k++] = o->val;
    }
    keys[k] = "host";
    vals[k++] = host;
    keys[k] = "port";
    vals[k++] = portstr;
    keys[k] = NULL;
    vals[k] = NULL;
    c = PQconnectdbParams(keys, vals, 0);
    PQconninfoFree(opts);
    if (PQstatus(c) != CONNECTION_OK || set_timeouts(p, c) < 0) {
        es_fail(err, ES_CONNECTION, "read_all: worker %s:%d: %s", host, port,
                PQerrorMessage(c));
        err->message[strcspn(err->message, "\n")] = '\0';
        PQfinish(c);
        return NULL;
    }
    return c;
}

/* The live session to host:port, (re)connecting when needed. */
static PGconn *node_session(pg_store *p, const char *host, int port,
                            es_error *err)
{
    node_conn *nc = NULL;

    if (!p->nodes && !(p->nodes = calloc(1, sizeof *p->nodes))) {
        es_fail(err, ES_DATABASE, "out of memory");
        return NULL;
    }
    for (int i = 0; i < p->nodes->n; i++)
        if (p->nodes->v[i].port == port && !strcmp(p->nodes->v[i].host, host))
            nc = &p->nodes->v[i];
    if (!nc) {
        node_conn *v = realloc(p->nodes->v,
                               (size_t)(p->nodes->n + 1) * sizeof *v);
        if (!v) {
            es_fail(err, ES_DATABASE, "out of memory");
            return NULL;
        }
        p->nodes->v = v;
        nc = &v[p->nodes->n++];
        memset(nc, 0, sizeof *nc);
        snprintf(nc->host, sizeof nc->host, "%s", host);
        nc->port = port;
    }
    if (nc->conn && PQstatus(nc->conn) != CONNECTION_OK) {
        PQfinish(nc->conn);
        nc->conn = NULL;
    }
    if (!nc->conn)
        nc->conn = connect_node(p, host, port, err);
    return nc->conn;
}

/* ---- one shard ------------------------------------------------------------ */

/* Adds one element of a text[] literal. */
static int add_elem(es_buf *b, const char *s, int first)
{
    int rc = first ? 0 : es_buf_addc(b, ',');
    rc |= es_buf_addc(b, '"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            rc |= es_buf_addc(b, '\\');
        rc |= es_buf_addc(b, *s);
    }
    return rc | es_buf_addc(b, '"');
}

/* Sends the query for the shard's rows after its cursor whose
 * transactions are older than anything still running on its worker, in
 * (txid, position) order (read_round reads the answer). */
static int send_shard(PGconn *c, const char *table, const shard_cursor *sh,
                      const es_read_all_opts *o, int64_t limit, es_error *err)
{
    char sql[1280], filters[128] = "", tx[24], pos[24], lim[24];
    const char *values[5];
    int n = 3, sent;
    es_buf types;

    es_buf_init(&types);
    snprintf(tx, sizeof tx, "%" PRIu64, sh->rd_txid);
    snprintf(pos, sizeof pos, "%" PRId64, sh->rd_pos);
    snprintf(lim, sizeof lim, "%" PRId64, limit);
    values[0] = tx;
    values[1] = pos;
    values[2] = lim;
    if (o->category) {
        values[n++] = o->category;
        snprintf(filters, sizeof filters, " AND category = $%d", n);
    }
    if (o->types) {
        int rc = es_buf_addc(&types, '{');
        for (size_t i = 0; i < o->ntypes; i++)
            rc |= add_elem(&types, o->types[i], i == 0);
        rc |= es_buf_addc(&types, '}');
        if (rc < 0 || !es_buf_cstr(&types)) {
            es_buf_free(&types);
            return es_fail(err, ES_DATABASE, "out of memory");
        }
        values[n++] = es_buf_cstr(&types);
        snprintf(filters + strlen(filters), sizeof filters - strlen(filters),
                 " AND type = ANY($%d::text[])", n);
    }
    /* Filtered: a last row with a NULL id names the shard's last row below
     * the watermark, any type (same statement, same snapshot), where the
     * cursor moves when this read is short, as on one PostgreSQL. */
    snprintf(sql, sizeof sql, "%sSELECT position, id, version, type, data,"
             " metadata, recorded_at, txid, stream FROM %s"
             " WHERE (txid, position) > ($1::xid8, $2::bigint)"
             " AND txid < pg_snapshot_xmin(pg_current_snapshot())%s"
             " ORDER BY txid, position LIMIT $3::bigint%s", *filters ? "(" : "",
             table, filters, *filters ? ")" : "");
    if (*filters)
        snprintf(sql + strlen(sql), sizeof sql - strlen(sql), " UNION ALL"
                 " (SELECT position, NULL, NULL, NULL, NULL, NULL, NULL, txid,"
                 " NULL FROM %s WHERE txid <"
                 " pg_snapshot_xmin(pg_current_snapshot())"
                 " ORDER BY txid DESC, position DESC LIMIT 1)", table);
    sent = PQsendQueryParams(c, sql, n, NULL, values, NULL, NULL, 1);
    es_buf_free(&types);
    if (!sent) {
        es_fail(err, ES_CONNECTION, "read_all: shard %" PRId64 ": %s",
                sh->shard, PQerrorMessage(c));
        err->message[strcspn(err->message, "\n")] = '\0';
        return -1;
    }
    return 0;
}

/* Checks the answer to send_shard: 0, or -1 with err set (res cleared). */
static int shard_result(PGconn *c, const shard_cursor *sh, PGresult *res,
                        es_error *err)
{
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != 9) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        es_fail(err, PQstatus(c) == CONNECTION_OK ? ES_DATABASE
                : ES_CONNECTION, "read_all: shard %" PRId64 ": %s", sh->shard,
                PQresultErrorMessage(res));
        err->message[strcspn(err->message, "\n")] = '\0';
        if (state) {
            snprintf(err->sqlstate, sizeof err->sqlstate, "%s", state);
            if (!strcmp(state, "57014") || !strcmp(state, "55P03"))
                err->reason = ES_REASON_TIMEOUT;    /* retry later */
        }
        PQclear(res);
        return -1;
    }
    return 0;
}

static int add_piece(citus_cursor *cc, int shard, int n, PGresult *res)
{
    if (cc->npieces == cc->cap) {
        int cap = cc->cap ? cc->cap * 2 : 16;
        piece *v = realloc(cc->pieces, (size_t)cap * sizeof *v);
        if (!v)
            return -1;
        cc->pieces = v;
        cc->cap = cap;
    }
    cc->pieces[cc->npieces].shard = shard;
    cc->pieces[cc->npieces].n = n;
    cc->pieces[cc->npieces++].res = res;
    return 0;
}

/* Orders the rows read round robin: every shard's first row, then every
 * shard's second, ... The shares read above are exactly the first rows of
 * that order, whatever the limit, so a smaller limit over the same log
 * gives a prefix of this batch (followers re-read up to an event to find
 * its checkpoint). */
static int lay_out(citus_cursor *cc, int64_t total, es_error *err)
{
    int *at = calloc((size_t)cc->nsh + 1, sizeof *at);    /* piece per shard */
    int *row = calloc((size_t)cc->nsh + 1, sizeof *row);  /* row in it */
    int progress = 1;

    cc->refs = malloc(((size_t)total + 1) * sizeof *cc->refs);
    if (!at || !row || !cc->refs) {
        free(at);
        free(row);
        return es_fail(err, ES_DATABASE, "out of memory");
    }
    for (int k = 0; k < cc->nsh; k++)
        at[k] = -1;
    while (progress && cc->nrows < total) {
        progress = 0;
        for (int k = 0; k < cc->nsh && cc->nrows < total; k++) {
            /* this shard's next row: on in its piece, or its next piece */
            while (at[k] < cc->npieces &&
                   (at[k] < 0 || cc->pieces[at[k]].shard != k ||
                    row[k] >= cc->pieces[at[k]].n)) {
                at[k]++;
                row[k] = 0;
            }
            if (at[k] >= cc->npieces)
                continue;
            cc->refs[cc->nrows].piece = at[k];
            cc->refs[cc->nrows++].row = row[k]++;
            progress = 1;
        }
    }
    free(at);
    free(row);
    return 0;
}

/* A filtered read's head row (row `i` of res): the shard's last row below
 * the watermark, where its cursor may move once this batch is delivered
 * (read_batch cancels that when the read was not short). */
static void note_head(shard_cursor *s, PGresult *res, int i)
{
    uint64_t t = pg_be64(PQgetvalue(res, i, 7));
    int64_t p = (int64_t)pg_be64(PQgetvalue(res, i, 0));

    s->jump = t > s->txid || (t == s->txid && p > s->pos);
    s->hd_txid = t;
    s->hd_pos = p;
}

/* Takes one shard's answer into the batch: its rows, where its reads got
 * to, and whether it has more (fewer rows than asked: done). */
static int take(citus_cursor *cc, int i, PGresult *res, int64_t ask,
                int64_t *left, int *active, es_error *err)
{
    shard_cursor *s = &cc->sh[i];
    int n = PQntuples(res);

    if (n > 0 && PQgetisnull(res, n - 1, 1)) {    /* the head row */
        n--;
        note_head(s, res, n);
    }
    if (n > 0) {
        s->rd_txid = pg_be64(PQgetvalue(res, n - 1, 7));
        s->rd_pos = (int64_t)pg_be64(PQgetvalue(res, n - 1, 0));
    }
    if (add_piece(cc, i, n, res) < 0) {
        PQclear(res);
        return es_fail(err, ES_DATABASE, "out of memory");
    }
    *left -= n;
    if (n < ask) {
        s->done = 1;
        (*active)--;
    } else {
        s->jump = 0;              /* more may match: no moving past it */
    }
    return 0;
}

/* Leaves pipeline mode on c, reading what is left up to the sync; a
 * session that cannot is closed (the next read opens another). */
static void end_pipeline(pg_store *p, PGconn *c)
{
    for (int guard = 0; guard < 10000; guard++) {
        PGresult *r;
        if (PQpipelineStatus(c) == PQ_PIPELINE_OFF || PQexitPipelineMode(c))
            return;
        r = PQgetResult(c);
        if (!r && PQstatus(c) != CONNECTION_OK)
            break;
        PQclear(r);
    }
    for (int i = 0; p->nodes && i < p->nodes->n; i++)
        if (p->nodes->v[i].conn == c) {
            PQfinish(c);
            p->nodes->v[i].conn = NULL;
        }
}

static int first_use(PGconn **conn, int k)
{
    for (int j = 0; j < k; j++)
        if (conn[j] == conn[k])
            return 0;
    return 1;
}

/* Asks the shards want[0..nw) for `ask` rows each, pipelined: every query
 * is sent on its worker's session first, then the answers are read in the
 * same order, so a round costs about one round trip per worker instead
 * of one per shard. Each query is its own statement (its own snapshot),
 * as when they ran one after the other. */
static int read_round(pg_store *p, citus_cursor *cc, const es_read_all_opts *o,
                      const int *want, int nw, int64_t ask, int64_t *left,
                      int *active, es_error *err)
{
    PGconn **conn = calloc((size_t)nw + 1, sizeof *conn);
    int k, sent = 0, rc = 0;

    if (!conn)
        return es_fail(err, ES_DATABASE, "out of memory");
    /* sessions first: none is opened while a pipeline is open */
    for (k = 0; k < nw; k++) {
        shard_cursor *s = &cc->sh[want[k]];
        if (!(conn[k] = node_session(p, s->host, s->port, err))) {
            free(conn);
            return -1;
        }
    }
    for (k = 0; k < nw && rc == 0; k++)
        if (PQpipelineStatus(conn[k]) == PQ_PIPELINE_OFF &&
            !PQenterPipelineMode(conn[k]))
            rc = es_fail(err, ES_CONNECTION, "read_all: %s",
                         PQerrorMessage(conn[k]));
    for (k = 0; k < nw && rc == 0; k++)
        if ((rc = send_shard(conn[k], cc->sh[want[k]].table, &cc->sh[want[k]],
                             o, ask, err)) == 0)
            sent++;
    for (k = 0; k < nw; k++)
        if (first_use(conn, k) && PQpipelineStatus(conn[k]) != PQ_PIPELINE_OFF)
            PQpipelineSync(conn[k]);
    for (k = 0; k < sent; k++) {
        PGresult *res = PQgetResult(conn[k]), *end;
        while ((end = PQgetResult(conn[k])) != NULL)    /* up to its end */
            PQclear(end);
        if (rc < 0)
            PQclear(res);             /* after an error: only read on */
        else if (shard_result(conn[k], &cc->sh[want[k]], res, err) < 0 ||
                 take(cc, want[k], res, ask, left, active, err) < 0)
            rc = -1;
    }
    for (k = 0; k < nw; k++)
        if (first_use(conn, k))
            end_pipeline(p, conn[k]);
    free(conn);
    return rc;
}

/* Fills the batch up to limit: every shard not yet exhausted gets an even
 * share of what is left, again while some came back short. A batch is short
 * only when every shard had less than its share: followers take a short
 * batch for the end of the log. Each query is one shard's next rows, so a
 * batch reads about `limit` rows whatever the shard count. */
static int read_batch(pg_store *p, citus_cursor *cc, const es_read_all_opts *o,
                      int64_t limit, es_error *err)
{
    int64_t left = limit;
    int active = cc->nsh;
    int *want = malloc(((size_t)cc->nsh + 1) * sizeof *want);

    if (!want)
        return es_fail(err, ES_DATABASE, "out of memory");
    for (int i = 0; i < cc->nsh; i++) {
        cc->sh[i].rd_txid = cc->sh[i].txid;
        cc->sh[i].rd_pos = cc->sh[i].pos;
    }
    while (left > 0 && active > 0) {
        /* A pass: shards still going are level, each gets the same share,
         * or, when fewer rows are left than shards, one each in shard
         * order until none is left. That is what a round robin over the
         * shards takes first. A round asks, at once, as many of the
         * pass's next shards as the rows left can serve (all of them
         * when the shares fit); the pass goes on from there. */
        int64_t ask = left / active > 0 ? left / active : 1;
        int i = 0;
        while (i < cc->nsh && left > 0) {
            int64_t budget = left;
            int nw = 0;
            for (; i < cc->nsh && budget > 0; i++) {
                if (cc->sh[i].done)
                    continue;
                want[nw++] = i;
                budget -= ask;
            }
            if (nw == 0)
                break;
            if (read_round(p, cc, o, want, nw, ask, &left, &active, err) < 0) {
                free(want);
                return -1;
            }
        }
    }
    free(want);
    return lay_out(cc, limit - left, err);
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
        only_shards(cc, o, err) < 0 ||
        rebase(p, cc->sh, cc->nsh, old, nold, err) < 0 ||
        read_batch(p, cc, o, o->limit > 0 ? o->limit : (int64_t)DEFAULT_BATCH,
                   err) < 0) {
        free(old);
        cc_destroy(&cc->base);
        return NULL;
    }
    free(old);
    return &cc->base;
}
