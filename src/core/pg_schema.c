/*
 * pg_schema.c - migrations of the PostgreSQL store.
 *
 * Objects live in their own schema (default "eventsourcing"). Each
 * migration step is applied once and recorded in <schema>.schema_version;
 * the whole run holds a transaction-level advisory lock keyed by the schema
 * name, so two processes migrating at once take turns and the second finds
 * nothing left to do.
 */
#include "pg.h"
#include "pg_schema.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* "%1$s" stands for the schema. Step 1: the events table, its indexes and
 * the append function.
 *
 * Global order: position (identity) is assigned at insert but becomes
 * visible at commit, so a reader by position alone could skip an event a
 * slower transaction commits later with a lower position. Each row also
 * records its transaction id (xid8); readers take only rows whose
 * transaction is older than every transaction still running
 * (pg_snapshot_xmin) and order by (txid, position). No timeouts: a long
 * transaction delays readers, it never makes them skip.
 *
 * Payloads are `json`, not `jsonb`: the server checks them on the way in
 * and hands the text back as it was stored, while turning jsonb back into
 * text cost more than everything else in a stream read (2.5-3x the
 * server time of a 100,000-event fold). Cast to jsonb in SQL where
 * containment or GIN indexes are wanted. */
/* Step 3's append of one event reads the stream's last version (0 when
 * it has no events) as l.cur, with its transaction id as l.txid (and from
 * step 5 its event id as l.id: ID is ", id" there) ... */
#define APPEND_LAST_WITH(ID) \
    "(SELECT coalesce(e.version, 0) AS cur, e.txid" ID " FROM (VALUES (1))" \
    " AS one LEFT JOIN LATERAL (SELECT version, txid" ID " FROM %1$s.events" \
    "   WHERE stream = p_stream ORDER BY version DESC LIMIT 1) e ON true)"
#define APPEND_LAST APPEND_LAST_WITH("")
/* ... and inserts after it only when the caller's expected version holds
 * and no younger transaction appended last (the same rules as the
 * step-by-step checks that follow it). */
#define APPEND_ALLOWED \
    "(l.txid IS NULL OR l.txid <= pg_current_xact_id())" \
    " AND NOT ((p_expected = -2 AND l.cur <> 0)" \
    "  OR (p_expected = -3 AND l.cur = 0)" \
    "  OR (p_expected >= 0 AND l.cur <> p_expected))"

/* The head of append() that steps 1, 3 and 4 share, word for word (step 5
 * adds a parameter, PARAM, and a variable, VAR): its signature, its
 * variables and the check of caller-chosen ids (a retry of the same batch
 * at the same versions is an idempotent success). */
#define APPEND_HEAD_WITH(PARAM, VAR) \
    "%1$s.append(p_stream text, p_expected bigint," \
    "    p_check_ids boolean, p_ids uuid[], p_types text[], p_data json[]," \
    "    p_meta json[]" PARAM ", OUT o_status int, OUT o_version bigint," \
    "    OUT o_position bigint, OUT o_id uuid, OUT o_stream text," \
    "    OUT o_recorded_at bigint)" \
    "  LANGUAGE plpgsql AS $fn$" \
    "DECLARE" \
    "  n int := cardinality(p_types);" \
    "  cur bigint;" \
    "  matched int := 0;" \
    "  last_version bigint;" \
    "  last_position bigint;" \
    "  last_txid xid8;" \
    VAR \
    "  t record;" \
    "BEGIN" \
    "  IF p_check_ids THEN" \
    "    FOR t IN SELECT u.ord, e.id, e.stream, e.version, e.position," \
    "                    e.recorded_at" \
    "             FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord)" \
    "             JOIN %1$s.events e ON e.id = u.id ORDER BY u.ord LOOP" \
    "      matched := matched + 1;" \
    "      IF t.stream <> p_stream OR t.ord <> matched" \
    "         OR (matched > 1 AND t.version <> last_version + 1) THEN" \
    "        o_status := 3; o_version := t.version; o_position := t.position;" \
    "        o_id := t.id; o_stream := t.stream;" \
    "        RETURN;" \
    "      END IF;" \
    "      last_version := t.version;" \
    "      last_position := t.position;" \
    "      o_recorded_at := %1$s.usec(t.recorded_at);" \
    "    END LOOP;" \
    /* The same batch again: a success only where the caller's expected \
     * version would have put it (a retry); elsewhere its ids are taken. */ \
    "    IF matched = n THEN" \
    "      IF (p_expected = -2 AND last_version <> n)" \
    "         OR (p_expected = -3 AND last_version = n)" \
    "         OR (p_expected >= 0 AND last_version <> p_expected + n) THEN" \
    "        SELECT e.id, e.stream, e.version, e.position INTO t" \
    "          FROM %1$s.events e WHERE e.id = p_ids[1];" \
    "        o_status := 3; o_version := t.version; o_position := t.position;" \
    "        o_id := t.id; o_stream := t.stream; o_recorded_at := NULL;" \
    "        RETURN;" \
    "      END IF;" \
    "      o_status := 1; o_version := last_version;" \
    "      o_position := last_position;" \
    "      RETURN;" \
    "    ELSIF matched > 0 THEN" \
    "      SELECT e.id, e.stream, e.version, e.position INTO t" \
    "        FROM %1$s.events e WHERE e.id = ANY(p_ids) LIMIT 1;" \
    "      o_status := 3; o_version := t.version; o_position := t.position;" \
    "      o_id := t.id; o_stream := t.stream; o_recorded_at := NULL;" \
    "      RETURN;" \
    "    END IF;" \
    "  END IF;"
#define APPEND_HEAD APPEND_HEAD_WITH("", "")

/* The rest of append() from step 3 on: one statement for one event, the
 * last version then one INSERT for a batch (its rows in ORDER_BY), and the
 * checks again, step by step, when nothing was inserted. K is the last
 * event's check: NO_LAST (steps 3 and 4: none) or BY_LAST (step 5: the
 * stream's last event must be p_last_id when one is named). */
#define NO_LAST_COL ""
#define NO_LAST_ECOL ""
#define NO_LAST_INTO ""
#define NO_LAST_OK_ONE ""
#define NO_LAST_OK_MANY ""
#define NO_LAST_REFUSE ""
#define BY_LAST_COL ", id"
#define BY_LAST_ECOL ", e.id"
#define BY_LAST_INTO ", last_id"
#define BY_LAST_OK_ONE " AND (p_last_id IS NULL OR l.id = p_last_id)"
/* an empty stream has no last event: last_id is NULL, and so is the
 * comparison, which IF takes as false */
#define BY_LAST_OK_MANY " AND (p_last_id IS NULL OR last_id = p_last_id)"
#define BY_LAST_REFUSE \
    "    IF p_last_id IS NOT NULL AND last_id IS DISTINCT FROM p_last_id THEN" \
    "      o_status := 4; o_version := cur;" \
    "      RETURN;" \
    "    END IF;"
#define APPEND_BODY_WITH(ORDER_BY, K) \
    /* A check that passes now although the insert refused a moment ago \
     * saw a concurrent append land in between (a new snapshot per \
     * statement): go round again, a bounded number of times. */ \
    "  FOR attempt IN 1..3 LOOP" \
    "    IF n = 1 THEN" \
    "      INSERT INTO %1$s.events (id, stream, version, type, data," \
    "                               metadata, category)" \
    "      SELECT p_ids[1], p_stream, l.cur + 1, p_types[1], p_data[1]," \
    "             p_meta[1], split_part(p_stream, '-', 1)" \
    "        FROM " APPEND_LAST_WITH(K##_COL) " l WHERE " APPEND_ALLOWED \
    K##_OK_ONE \
    "      RETURNING position, version INTO o_position, o_version;" \
    "    ELSE" \
    /* Many events: the last version first, then a plain INSERT. Rows \
     * take their positions in order, so the session's currval() is the \
     * last one: RETURNING a row per event cost a tenth of the time. */ \
    "      SELECT e.version, e.txid" K##_ECOL " INTO cur, last_txid" K##_INTO \
    "        FROM %1$s.events e" \
    "        WHERE e.stream = p_stream ORDER BY e.version DESC LIMIT 1;" \
    "      cur := coalesce(cur, 0);" \
    "      IF (last_txid IS NULL OR last_txid <= pg_current_xact_id())" \
    "         AND NOT ((p_expected = -2 AND cur <> 0)" \
    "                  OR (p_expected = -3 AND cur = 0)" \
    "                  OR (p_expected >= 0 AND cur <> p_expected))" \
    K##_OK_MANY " THEN" \
    "        INSERT INTO %1$s.events (id, stream, version, type, data," \
    "                                 metadata, category)" \
    "        SELECT u.id, p_stream, cur + u.ord, u.type, u.data, u.meta," \
    "               split_part(p_stream, '-', 1)" \
    "          FROM unnest(p_ids, p_types, p_data, p_meta)" \
    "               WITH ORDINALITY AS u(id, type, data, meta, ord)" \
    ORDER_BY ";" \
    "        o_position := currval('%1$s.events_position_seq');" \
    "        o_version := cur + n;" \
    "      END IF;" \
    "    END IF;" \
    "    IF o_position IS NOT NULL THEN" \
    "      o_status := 0;" \
    /* usec() inline: an IMMUTABLE SQL function around a STABLE \
     * expression is not inlined, and PostgreSQL 15 plans such a call \
     * every time it runs. */ \
    "      o_recorded_at := (extract(epoch FROM now()) * 1000000)::bigint;" \
    "      RETURN;" \
    "    END IF;" \
    "    SELECT e.version, e.txid" K##_ECOL " INTO cur, last_txid" K##_INTO \
    "      FROM %1$s.events e" \
    "      WHERE e.stream = p_stream ORDER BY e.version DESC LIMIT 1;" \
    "    cur := coalesce(cur, 0);" \
    /* Readers order by (txid, position). A transaction that got its id \
     * before the stream's last appender and appends only now would put \
     * its events before that appender's: refuse, so a stream's events \
     * never come out of version order. Only a transaction that wrote \
     * something before appending can meet this; a retry is new. */ \
    "    IF last_txid > pg_current_xact_id() THEN" \
    "      RAISE EXCEPTION 'stream % was appended to by a younger" \
    " transaction; retry in a new transaction', p_stream" \
    "        USING ERRCODE = '40001', CONSTRAINT = 'stream_order';" \
    "    END IF;" \
    "    IF (p_expected = -2 AND cur <> 0) OR (p_expected = -3 AND cur = 0)" \
    "       OR (p_expected >= 0 AND cur <> p_expected) THEN" \
    "      o_status := 2; o_version := cur;" \
    "      RETURN;" \
    "    END IF;" \
    K##_REFUSE \
    "  END LOOP;" \
    "  RAISE EXCEPTION 'stream % keeps changing under this append; retry'," \
    "    p_stream USING ERRCODE = '40001';" \
    "END $fn$;"
#define APPEND_BODY(ORDER_BY) APPEND_BODY_WITH(ORDER_BY, NO_LAST)

static const char *const steps[] = {
    "CREATE TABLE %1$s.events ("
    "  position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    "  txid xid8 NOT NULL DEFAULT pg_current_xact_id(),"
    "  id uuid NOT NULL,"
    "  stream text NOT NULL,"
    "  version bigint NOT NULL CHECK (version > 0),"
    "  type text NOT NULL,"
    "  data json NOT NULL,"
    "  metadata json NOT NULL,"
    "  recorded_at timestamptz NOT NULL DEFAULT now(),"
    "  category text GENERATED ALWAYS AS (split_part(stream, '-', 1)) STORED,"
    "  CONSTRAINT events_id_key UNIQUE (id),"
    "  CONSTRAINT events_stream_version_key UNIQUE (stream, version));"
    /* The current version of every stream: appends lock its row, so
     * writers to one stream take turns and find the version by primary
     * key (never by a plan that depends on statistics). */
    "CREATE TABLE %1$s.streams ("
    "  stream text PRIMARY KEY,"
    "  version bigint NOT NULL,"
    "  txid xid8 NOT NULL DEFAULT pg_current_xact_id());"
    "CREATE INDEX events_txid_position ON %1$s.events (txid, position);"
    "CREATE INDEX events_category ON %1$s.events (category, txid, position);"
    /* Microseconds since the epoch: how instants leave the database
     * in function results, whatever the session's DateStyle. */
    "CREATE FUNCTION %1$s.usec(t timestamptz) RETURNS bigint"
    "  LANGUAGE sql IMMUTABLE AS"
    "  $$ SELECT (extract(epoch FROM t) * 1000000)::bigint $$;"
    /* One round trip appends any number of events. Status: 0 appended,
     * 1 the same ids were appended before at these versions (idempotent),
     * 2 expected version did not match (o_version = actual),
     * 3 an id is taken elsewhere (o_id, o_stream, o_version say where). */
    "CREATE FUNCTION " APPEND_HEAD
    "  SELECT s.version, s.txid INTO cur, last_txid FROM %1$s.streams s"
    "    WHERE s.stream = p_stream FOR UPDATE;"
    "  cur := coalesce(cur, 0);"
    /* Readers order by (txid, position). A transaction that got its id
     * before the stream's last appender and appends only now would put
     * its events before that appender's: refuse, so a stream's events
     * never come out of version order. Only a transaction that wrote
     * something before appending can meet this; a retry is new. */
    "  IF last_txid > pg_current_xact_id() THEN"
    "    RAISE EXCEPTION 'stream % was appended to by a younger transaction;"
    " retry in a new transaction', p_stream"
    "      USING ERRCODE = '40001', CONSTRAINT = 'stream_order';"
    "  END IF;"
    "  IF (p_expected = -2 AND cur <> 0) OR (p_expected = -3 AND cur = 0)"
    "     OR (p_expected >= 0 AND cur <> p_expected) THEN"
    "    o_status := 2; o_version := cur;"
    "    RETURN;"
    "  END IF;"
    /* A new stream's row is inserted; two writers creating the same
     * stream at once meet at its primary key and the loser is asked
     * again by the caller (unique_violation). */
    "  IF cur = 0 THEN"
    "    INSERT INTO %1$s.streams (stream, version) VALUES (p_stream, n);"
    "  ELSE"
    "    UPDATE %1$s.streams SET version = cur + n,"
    "      txid = pg_current_xact_id() WHERE stream = p_stream;"
    "  END IF;"
    /* One event, the common case, skips the unnest. */
    "  IF n = 1 THEN"
    "    INSERT INTO %1$s.events (id, stream, version, type, data, metadata)"
    "      VALUES (p_ids[1], p_stream, cur + 1, p_types[1], p_data[1],"
    "              p_meta[1])"
    "      RETURNING position INTO o_position;"
    "  ELSE"
    "    WITH ins AS ("
    "      INSERT INTO %1$s.events (id, stream, version, type, data, metadata)"
    "      SELECT u.id, p_stream, cur + u.ord, u.type, u.data, u.meta"
    "        FROM unnest(p_ids, p_types, p_data, p_meta)"
    "             WITH ORDINALITY AS u(id, type, data, meta, ord)"
    "       ORDER BY u.ord"
    "      RETURNING position)"
    "    SELECT max(ins.position) INTO o_position FROM ins;"
    "  END IF;"
    "  o_status := 0; o_version := cur + n;"
    "  o_recorded_at := %1$s.usec(now());"
    /* No NOTIFY: it takes a database-wide lock at commit and serializes
     * every notifying commit. Live readers poll the log's head. */
    "END $fn$;",
    /* Step 2: snapshots, several per stream so time travel to an earlier
     * version can still start from one. */
    "CREATE TABLE %1$s.snapshots ("
    "  stream text NOT NULL,"
    "  version bigint NOT NULL CHECK (version > 0),"
    "  schema_version bigint NOT NULL,"
    "  state json NOT NULL,"
    "  recorded_at timestamptz NOT NULL DEFAULT now(),"
    "  PRIMARY KEY (stream, version));",
    /* Step 3: appends with less server work, so they scale with writers
     * (each removal measured against the previous variant: README
     * "Performance").
     *
     * No streams table: a stream's version is its last event's, found
     * through the unique (stream, version) index, which is also what
     * keeps versions dense under concurrency: two writers that read the
     * same last version insert the same next one, the second waits for
     * the first and fails with a unique violation, and the caller asks
     * again (pg_append's retry), as before when they met at the streams row.
     * That row cost an insert or update, a lock and an index entry per
     * append.
     *
     * The common case is one statement: read the stream's last event and
     * insert after it when the expected version and the order rule (see
     * below) allow it. When it inserts nothing, the same checks run
     * again step by step to say which one refused.
     *
     * The category is written by append() rather than generated, and
     * versions are no longer CHECKed (append() makes them from 1 up): each
     * INSERT otherwise rebuilt both expressions from the catalog when it
     * started, a seventh of a single-event append's server time.
     *
     * Five indexes on events were four: read_all orders and resumes by
     * (txid, position), which is unique since positions are, so that is
     * the primary key now and nothing indexes position alone. Stream and
     * category compare bytewise (COLLATE "C"): they are names, never
     * sorted for people, and a locale's strcoll() was part of every index
     * insert. Together a tenth of a 100-event append's server time. */
    "DROP TABLE %1$s.streams;"
    "ALTER TABLE %1$s.events ALTER COLUMN category DROP EXPRESSION,"
    "  ALTER COLUMN category SET NOT NULL,"
    "  DROP CONSTRAINT events_version_check;"
    "ALTER TABLE %1$s.events DROP CONSTRAINT events_pkey,"
    "  ADD CONSTRAINT events_pkey PRIMARY KEY (txid, position),"
    "  ALTER COLUMN stream TYPE text COLLATE \"C\","
    "  ALTER COLUMN category TYPE text COLLATE \"C\";"
    "DROP INDEX %1$s.events_txid_position;"
    "CREATE OR REPLACE FUNCTION " APPEND_HEAD
    APPEND_BODY("         ORDER BY u.ord"),
    /* Step 4: append() without the sort of a batch's rows by their
     * ordinal: unnest() WITH ORDINALITY already yields them in order and
     * a plain function scan feeding an INSERT keeps that order, so the
     * rows still take their positions in version order (the sort was 3%
     * of a 100-event append's server time). A store distributed on Citus
     * keeps its own append() (pg_citus.c): single_node_only. */
    "CREATE OR REPLACE FUNCTION " APPEND_HEAD APPEND_BODY(""),
    /* Step 5: append() can name the event that must be the stream's last
     * (p_last_id; NULL, the default, for none), checked by the statement
     * that inserts, so an append that names it (a state cache's command,
     * expected_last_id) costs no read before it. An empty stream has no
     * last event and is refused; a refusal is status 4, with the stream's
     * version. The old signature goes (calls with 7 arguments take the
     * default); a store distributed on Citus gets its own append() with
     * the same parameter instead (pg_citus_renew_append). */
    "DROP FUNCTION IF EXISTS %1$s.append(text, bigint, boolean, uuid[],"
    "  text[], json[], json[]);"
    "CREATE OR REPLACE FUNCTION "
    APPEND_HEAD_WITH(", p_last_id uuid DEFAULT NULL", "  last_id uuid;")
    APPEND_BODY_WITH("", BY_LAST),
};

#define NSTEPS ((int)(sizeof steps / sizeof steps[0]))

/* Steps that replace append() with a single-node variant: a store already
 * distributed on Citus keeps the append() made for it (pg_citus.c), and
 * such a step is only recorded there; or, for a step that changes what
 * append() takes, gets the Citus variant of that change. */
static int single_node_only(int step)
{
    return step == 4 || step == 5;
}

static int citus_variant(pg_store *p, int step, es_error *err)
{
    return step == 5 ? pg_citus_renew_append(p, err) : 0;
}

static int run_step(pg_store *p, int step, es_error *err)
{
    char quoted[80], rec[256];
    es_buf b;
    const char *sql;
    int rc;

    if (single_node_only(step)) {
        int citus = pg_citus_detect(p, err);
        if (citus < 0)
            return -1;
        if (citus) {
            if (citus_variant(p, step, err) < 0)
                return -1;
            goto record;
        }
    }
    /* The schema name was validated ([a-z_][a-z0-9_]*); quoted anyway. */
    snprintf(quoted, sizeof quoted, "\"%s\"", p->schema);
    es_buf_init(&b);
    for (const char *s = steps[step - 1]; *s; s++) {
        if (strncmp(s, "%1$s", 4) == 0) {
            es_buf_adds(&b, quoted);
            s += 3;
        } else if (strncmp(s, "%2$s", 4) == 0) {
            es_buf_adds(&b, p->schema);   /* inside a string literal */
            s += 3;
        } else {
            es_buf_addc(&b, *s);
        }
    }
    sql = es_buf_cstr(&b);
    rc = sql ? pg_exec_simple(p, sql, err)
             : es_fail(err, ES_DATABASE, "out of memory");
    es_buf_free(&b);
    if (rc < 0)
        return -1;
record:
    snprintf(rec, sizeof rec,
             "INSERT INTO \"%s\".schema_version (version) VALUES (%d)",
             p->schema, step);
    return pg_exec_simple(p, rec, err);
}

int pg_migrate(es_store *s, es_error *err)
{
    pg_store *p = (pg_store *)s;
    char sql[512];
    const char *param[1] = { p->schema };
    PGresult *res;
    int current, own_tx;

    /* The session's own checks first, inside a caller's transaction too:
     * a read-ahead result on the wire is collected (libpq would discard
     * it), a session lost in the transaction is reported. */
    if (pg_ensure(p, err) < 0)
        return -1;
    own_tx = !p->in_tx;
    if (own_tx && pg_exec_simple(p, "BEGIN", err) < 0)
        return -1;
    res = PQexecParams(p->conn, "SELECT pg_advisory_xact_lock("
                       "hashtext('eventsourcing.migrate:' || $1))",
                       1, NULL, param, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        pg_fail(p, res, "migrate", err);
        goto fail;
    }
    PQclear(res);
    snprintf(sql, sizeof sql,
             "CREATE SCHEMA IF NOT EXISTS \"%s\";"
             "CREATE TABLE IF NOT EXISTS \"%s\".schema_version ("
             "  version int PRIMARY KEY,"
             "  applied_at timestamptz NOT NULL DEFAULT now())",
             p->schema, p->schema);
    if (pg_exec_simple(p, sql, err) < 0)
        goto fail;
    snprintf(sql, sizeof sql,
             "SELECT coalesce(max(version), 0) FROM \"%s\".schema_version",
             p->schema);
    res = PQexec(p->conn, sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        pg_fail(p, res, "migrate", err);
        goto fail;
    }
    current = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    if (current > NSTEPS) {
        es_fail(err, ES_DATABASE, "schema '%s' is at version %d, newer than "
                "this library knows (%d): upgrade the library", p->schema,
                current, NSTEPS);
        goto fail;
    }
    for (int step = current + 1; step <= NSTEPS; step++)
        if (run_step(p, step, err) < 0)
            goto fail;
    if (own_tx && pg_exec_simple(p, "COMMIT", err) < 0)
        return -1;
    return 0;
fail:
    if (own_tx && p->conn && PQstatus(p->conn) == CONNECTION_OK) {
        es_error ignored;
        pg_exec_simple(p, "ROLLBACK", &ignored);
    }
    return -1;
}
