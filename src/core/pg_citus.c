/*
 * pg_citus.c - the PostgreSQL store laid out on Citus (distributed
 * PostgreSQL): detecting it and the distributed schema (read_all with a
 * cursor per shard is pg_citus_read.c). docs/scale-out.md explains the
 * choices; in short:
 *
 * - events and snapshots are distributed by stream and colocated, so a
 *   stream lives whole on one worker and append() is delegated to it;
 * - Citus refuses a unique constraint without the distribution column, so
 *   event ids are unique within their stream (idempotent retries keep
 *   working; the same id in two streams is no longer refused);
 * - column defaults run on the node that routes an insert, so a trigger
 *   sets txid on the node that stores the row (the watermark compares it
 *   with that node's snapshot);
 * - each worker has its own transaction ids and identity range, so
 *   (txid, position) orders rows only within one node: read_all keeps one
 *   (txid, position) cursor per shard, read on the shard's worker against
 *   that worker's snapshot, and its checkpoint holds them all;
 * - a shard moved to another node keeps its rows' old txids while new rows
 *   get the new node's: a cursor carried across the move could skip. Each
 *   cursor records the node group it was read on; read_all carries it over
 *   to the shard's new node only when no row appended there since has a
 *   lower txid, and refuses otherwise (kind "invalid"; pg_citus_read.c).
 */
#include "pg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the distributed schema ---------------------------------------------- */

/* append() for Citus: the single-node function's rules (pg_schema.c, steps
 * 3 and 5) with id lookups confined to the stream, since ids are unique per
 * stream. It runs on the worker that holds the stream
 * (create_distributed_function below), so pg_current_xact_id() is that
 * worker's, like the rows' txid. */
static const char append_sql[] =
    "CREATE OR REPLACE FUNCTION %1$s.append(p_stream text, p_expected bigint,"
    "    p_check_ids boolean, p_ids uuid[], p_types text[], p_data json[],"
    "    p_meta json[], p_last_id uuid DEFAULT NULL,"
    "    OUT o_status int, OUT o_version bigint,"
    "    OUT o_position bigint, OUT o_id uuid, OUT o_stream text,"
    "    OUT o_recorded_at bigint)"
    "  LANGUAGE plpgsql AS $fn$"
    "DECLARE"
    "  n int := cardinality(p_types);"
    "  cur bigint;"
    "  matched int := 0;"
    "  last_version bigint;"
    "  last_position bigint;"
    "  last_txid xid8;"
    "  last_id uuid;"
    "  t record;"
    "BEGIN"
    "  IF p_check_ids THEN"
    "    FOR t IN SELECT u.ord, e.id, e.stream, e.version, e.position,"
    "                    e.recorded_at"
    "             FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord)"
    "             JOIN %1$s.events e ON e.stream = p_stream AND e.id = u.id"
    "             ORDER BY u.ord LOOP"
    "      matched := matched + 1;"
    "      IF t.ord <> matched"
    "         OR (matched > 1 AND t.version <> last_version + 1) THEN"
    "        o_status := 3; o_version := t.version; o_position := t.position;"
    "        o_id := t.id; o_stream := t.stream;"
    "        RETURN;"
    "      END IF;"
    "      last_version := t.version;"
    "      last_position := t.position;"
    "      o_recorded_at := %1$s.usec(t.recorded_at);"
    "    END LOOP;"
    "    IF matched = n THEN"
    "      IF (p_expected = -2 AND last_version <> n)"
    "         OR (p_expected = -3 AND last_version = n)"
    "         OR (p_expected >= 0 AND last_version <> p_expected + n) THEN"
    "        SELECT e.id, e.stream, e.version, e.position INTO t"
    "          FROM %1$s.events e WHERE e.stream = p_stream"
    "           AND e.id = p_ids[1];"
    "        o_status := 3; o_version := t.version; o_position := t.position;"
    "        o_id := t.id; o_stream := t.stream; o_recorded_at := NULL;"
    "        RETURN;"
    "      END IF;"
    "      o_status := 1; o_version := last_version;"
    "      o_position := last_position;"
    "      RETURN;"
    "    ELSIF matched > 0 THEN"
    "      SELECT e.id, e.stream, e.version, e.position INTO t"
    "        FROM %1$s.events e WHERE e.stream = p_stream"
    "         AND e.id = ANY(p_ids) LIMIT 1;"
    "      o_status := 3; o_version := t.version; o_position := t.position;"
    "      o_id := t.id; o_stream := t.stream; o_recorded_at := NULL;"
    "      RETURN;"
    "    END IF;"
    "  END IF;"
    /* Read the last version, check, then INSERT ... VALUES row by row:
     * each statement names the stream, so Citus runs it on this worker's
     * shard as is. An INSERT ... SELECT (the single-node function's one
     * statement, or unnest for many events) is planned by Citus through
     * intermediate results and COPY instead, several times slower. Two
     * writers that read the same last version meet at the unique
     * (stream, version) index; the caller asks again (pg.c). */
    "  SELECT e.version, e.txid, e.id INTO cur, last_txid, last_id"
    "    FROM %1$s.events e"
    "    WHERE e.stream = p_stream ORDER BY e.version DESC LIMIT 1;"
    "  cur := coalesce(cur, 0);"
    "  IF last_txid > pg_current_xact_id() THEN"
    "    RAISE EXCEPTION 'stream % was appended to by a younger"
    " transaction; retry in a new transaction', p_stream"
    "      USING ERRCODE = '40001', CONSTRAINT = 'stream_order';"
    "  END IF;"
    "  IF (p_expected = -2 AND cur <> 0) OR (p_expected = -3 AND cur = 0)"
    "     OR (p_expected >= 0 AND cur <> p_expected) THEN"
    "    o_status := 2; o_version := cur;"
    "    RETURN;"
    "  END IF;"
    /* the event the caller names must be the last (none in an empty
     * stream): status 4 */
    "  IF p_last_id IS NOT NULL AND last_id IS DISTINCT FROM p_last_id THEN"
    "    o_status := 4; o_version := cur;"
    "    RETURN;"
    "  END IF;"
    "  IF n = 1 THEN"
    "    INSERT INTO %1$s.events (id, stream, version, type, data, metadata,"
    "                             category)"
    "    VALUES (p_ids[1], p_stream, cur + 1, p_types[1], p_data[1],"
    "            p_meta[1], split_part(p_stream, '-', 1))"
    "    RETURNING position INTO o_position;"
    "  ELSE"
    /* Many events: INSERT ... SELECT from the arrays, which Citus runs
     * through an intermediate result and COPY into the shard; measured 3x
     * the events/s of one multi-row INSERT ... VALUES, whose 100 rows
     * Citus deparses and plans again on the shard. */
    "    WITH ins AS ("
    "      INSERT INTO %1$s.events (id, stream, version, type, data,"
    "                               metadata, category)"
    "      SELECT u.id, p_stream, cur + u.ord, u.type, u.data, u.meta,"
    "             split_part(p_stream, '-', 1)"
    "        FROM unnest(p_ids, p_types, p_data, p_meta)"
    "             WITH ORDINALITY AS u(id, type, data, meta, ord)"
    "      RETURNING position)"
    "    SELECT max(ins.position) INTO o_position FROM ins;"
    "  END IF;"
    "  o_status := 0; o_version := cur + n;"
    "  o_recorded_at := (extract(epoch FROM now()) * 1000000)::bigint;"
    "END $fn$;";

/* Runs before the tables are distributed, in the migration's transaction.
 * %1$s is the quoted schema, %2$s the bare one (inside literals), %3$s
 * the shard count. */
static const char layout_sql[] =
    /* Triggers on distributed tables are "unsafe" to Citus (they could
     * touch other shards); this one only sets a column of its own row. */
    "SET LOCAL citus.enable_unsafe_triggers = on;"
    /* Unique constraints must hold the distribution column. */
    "ALTER TABLE %1$s.events DROP CONSTRAINT events_pkey,"
    "  DROP CONSTRAINT events_id_key,"
    "  ADD CONSTRAINT events_stream_id_key UNIQUE (stream, id);"
    "CREATE INDEX events_txid_position ON %1$s.events (txid, position);"
    "CREATE FUNCTION %1$s.set_txid() RETURNS trigger LANGUAGE plpgsql AS"
    "  $$BEGIN NEW.txid := pg_current_xact_id(); RETURN NEW; END$$;"
    "CREATE TRIGGER events_txid BEFORE INSERT ON %1$s.events"
    "  FOR EACH ROW EXECUTE FUNCTION %1$s.set_txid();"
    /* Colocation needs the same collation on both distribution columns. */
    "ALTER TABLE %1$s.snapshots ALTER COLUMN stream TYPE text COLLATE \"C\";"
    "SELECT create_distributed_table('%2$s.events', 'stream',"
    "  shard_count => %3$s);"
    "SELECT create_distributed_table('%2$s.snapshots', 'stream',"
    "  colocate_with => '%2$s.events');";

/* Delegation: a call with the stream as a literal or parameter runs on the
 * worker holding it, also inside BEGIN ... COMMIT (force_delegation). */
static const char delegate_sql[] =
    "SELECT create_distributed_function('%2$s.append(text, bigint, boolean,"
    " uuid[], text[], json[], json[], uuid)', 'p_stream',"
    " colocate_with => '%2$s.events', force_delegation => true);";

/* Migration step 5 on a store distributed before it: append() before the
 * step took no p_last_id. */
static const char drop_old_append_sql[] =
    "DROP FUNCTION IF EXISTS %1$s.append(text, bigint, boolean, uuid[],"
    "  text[], json[], json[]);";

/* Expands %1$s (quoted schema), %2$s (bare schema), %3$s (arg) and
 * %% (as %) into b. */
static int expand(es_buf *b, const char *tmpl, const char *schema,
                  const char *arg)
{
    int rc = 0;
    for (const char *s = tmpl; *s; s++) {
        if (strncmp(s, "%1$s", 4) == 0) {
            rc |= es_buf_addc(b, '"');
            rc |= es_buf_adds(b, schema);
            rc |= es_buf_addc(b, '"');
            s += 3;
        } else if (strncmp(s, "%2$s", 4) == 0) {
            rc |= es_buf_adds(b, schema);
            s += 3;
        } else if (strncmp(s, "%3$s", 4) == 0) {
            rc |= es_buf_adds(b, arg);
            s += 3;
        } else if (s[0] == '%' && s[1] == '%') {
            rc |= es_buf_addc(b, '%');
            s += 1;
        } else {
            rc |= es_buf_addc(b, *s);
        }
    }
    return rc;
}

static int exec_template(pg_store *p, const char *tmpl, const char *arg,
                         es_error *err)
{
    es_buf b;
    int rc;
    es_buf_init(&b);
    if (expand(&b, tmpl, p->schema, arg) < 0 || !es_buf_cstr(&b))
        rc = es_fail(err, ES_DATABASE, "out of memory");
    else
        rc = pg_exec_simple(p, es_buf_cstr(&b), err);
    es_buf_free(&b);
    return rc;
}

/* One value from a one-row query with the schema as $1; "" when no row. */
static int query_value(pg_store *p, const char *sql, char *out, size_t n,
                       es_error *err)
{
    const char *param[1] = { p->schema };
    PGresult *res;

    if (pg_ensure(p, err) < 0)
        return -1;
    res = PQexecParams(p->conn, sql, 1, NULL, param, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return pg_fail(p, res, "citus", err);
    snprintf(out, n, "%s", PQntuples(res) > 0 && !PQgetisnull(res, 0, 0)
                           ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
    return 0;
}

int pg_citus_detect(pg_store *p, es_error *err)
{
    char v[32], dist[16];

    if (p->citus >= 0)
        return p->citus;
    if (query_value(p, "SELECT extversion FROM pg_extension WHERE $1::text IS NOT"
                    " NULL AND extname = 'citus'", v, sizeof v, err) < 0)
        return -1;
    snprintf(p->citus_version, sizeof p->citus_version, "%s", v);
    if (!v[0]) {
        p->citus = 0;
        return 0;
    }
    if (query_value(p, "SELECT count(*) FROM pg_dist_partition WHERE"
                    " logicalrelid = to_regclass(quote_ident($1::text) || '.events')",
                    dist, sizeof dist, err) < 0)
        return -1;
    p->citus = atoi(dist) > 0;
    return p->citus;
}

int pg_citus_distribute(pg_store *p, int shards, es_error *err)
{
    char n[64], v[8];
    int own_tx = !p->in_tx;

    if (shards < 0 || shards > 4096)
        return es_fail(err, ES_INVALID, "shards must be 1..4096 (0: Citus' "
                       "citus.shard_count), not %d", shards);
    if (own_tx && pg_exec_simple(p, "BEGIN", err) < 0)
        return -1;
    p->citus = -1;
    if (query_value(p, "SELECT pg_advisory_xact_lock(hashtext("
                    "'eventsourcing.migrate:' || $1::text))::text", v, sizeof v,
                    err) < 0)
        goto fail;
    if (pg_citus_detect(p, err) < 0)
        goto fail;
    if (!p->citus_version[0]) {
        es_fail(err, ES_INVALID, "migrate { distributed = true }: the Citus "
                "extension is not installed in this database (CREATE "
                "EXTENSION citus, on the coordinator)");
        goto fail;
    }
    if (!p->citus) {
        if (shards > 0)
            snprintf(n, sizeof n, "%d", shards);
        else
            snprintf(n, sizeof n, "current_setting('citus.shard_count')::int");
        if (exec_template(p, layout_sql, n, err) < 0 ||
            exec_template(p, append_sql, "", err) < 0 ||
            exec_template(p, delegate_sql, "", err) < 0)
            goto fail;
    }
    if (own_tx && pg_exec_simple(p, "COMMIT", err) < 0)
        goto lost;
    p->citus = 1;
    return 0;
fail:
    if (own_tx && p->conn && PQstatus(p->conn) == CONNECTION_OK) {
        es_error ignored;
        pg_exec_simple(p, "ROLLBACK", &ignored);
    }
lost:
    p->citus = -1;
    return -1;
}

/* Migration step 5 on a distributed store (pg_schema.c): append() with
 * p_last_id, Citus' variant, delegated as before. In the migration's
 * transaction. */
int pg_citus_renew_append(pg_store *p, es_error *err)
{
    if (exec_template(p, drop_old_append_sql, "", err) < 0 ||
        exec_template(p, append_sql, "", err) < 0 ||
        exec_template(p, delegate_sql, "", err) < 0)
        return -1;
    return 0;
}

int pg_citus_info(pg_store *p, int *shards, es_error *err)
{
    char n[24];
    *shards = 0;
    if (pg_citus_detect(p, err) < 0)
        return -1;
    if (p->citus == 1) {
        if (query_value(p, "SELECT count(*) FROM pg_dist_shard WHERE"
                        " logicalrelid = to_regclass(quote_ident($1::text) ||"
                        " '.events')", n, sizeof n, err) < 0)
            return -1;
        *shards = atoi(n);
    }
    return 0;
}
