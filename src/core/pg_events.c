/*
 * pg_events.c - appending and reading events in PostgreSQL.
 *
 * Appends are one call of the schema's append() function (one round trip
 * for any number of events), with the events passed as parallel arrays.
 * Reads use prepared statements with binary results: uuids, integers and
 * timestamps arrive as fixed-size values, json as its text,
 * so nothing is formatted by the server only to be parsed again here.
 * Stream reads go page by page, so memory stays flat however long the
 * stream is.
 */
#include "pg.h"
#include "pg_events.h"
#include "es_time.h"
#include "es_uuid.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PAGE_ROWS 1000
#define DEFAULT_BATCH 1000
#define APPEND_RETRIES 50

const char *pg_statement_sql(const pg_store *p, int stmt, char *out,
                             size_t outlen)
{
    const char *s = p->schema;
    switch (stmt) {
    case PG_APPEND:
        snprintf(out, outlen, "SELECT o_status, o_version, o_position, o_id,"
                 " o_stream, o_recorded_at FROM \"%s\".append($1, $2::bigint, $3::boolean,"
                 " $4::uuid[], $5::text[], $6::json[], $7::json[], $8::uuid)", s);
        break;
    case PG_APPEND_ONE:
        /* append()'s one-statement path (pg_schema.c, step 3) sent as is:
         * the same checks, without the function call around it. No row
         * back means a check refused: append() then says which. Binary
         * results: no number formatting or epoch arithmetic on the server.
         * The expected version arrives as the range the stream's version
         * may be in ($2..$7, expected_range): the executor builds every
         * operator of a statement again at each run, and the four cases
         * spelled out in SQL were six of them, 4.5% of the statement's
         * instructions (callgrind, bench/append_instructions.sh). */
        snprintf(out, outlen, "INSERT INTO \"%s\".events (id, stream,"
                 " version, type, data, metadata, category)"
                 " SELECT $3::uuid, $1, l.cur + 1, $4, $5::json, $6::json,"
                 " split_part($1, '-', 1) FROM (SELECT coalesce(e.version, 0)"
                 " AS cur, e.txid, e.id FROM (VALUES (1)) AS one LEFT JOIN"
                 " LATERAL (SELECT version, txid, id FROM \"%s\".events"
                 " WHERE stream = $1 ORDER BY version DESC LIMIT 1) e ON true) l"
                 " WHERE (l.txid IS NULL OR l.txid <= pg_current_xact_id())"
                 " AND l.cur BETWEEN $2::bigint AND $7::bigint"
                 " AND ($8::uuid IS NULL OR l.id = $8::uuid)"
                 " RETURNING position, version, recorded_at", s, s);
        break;
    case PG_APPEND_STRICT:
        /* PG_APPEND_ONE for an append with statements behind it in its
         * round trip (pg_append_commit): there a refusal must stop them,
         * so it is an error, not an empty result. A refused row gets a
         * NULL version, which the column's NOT NULL rejects (23502). */
        snprintf(out, outlen, "INSERT INTO \"%s\".events (id, stream,"
                 " version, type, data, metadata, category)"
                 " SELECT $3::uuid, $1, CASE WHEN (l.txid IS NULL OR"
                 " l.txid <= pg_current_xact_id()) AND l.cur BETWEEN"
                 " $2::bigint AND $7::bigint AND ($8::uuid IS NULL OR"
                 " l.id = $8::uuid) THEN l.cur + 1 END, $4, $5::json,"
                 " $6::json, split_part($1, '-', 1) FROM (SELECT"
                 " coalesce(e.version, 0) AS cur, e.txid, e.id FROM (VALUES"
                 " (1)) AS one LEFT JOIN LATERAL (SELECT version, txid, id FROM"
                 " \"%s\".events WHERE stream = $1 ORDER BY version DESC"
                 " LIMIT 1) e ON true) l"
                 " RETURNING position, version, recorded_at", s, s);
        break;
    case PG_VERSION:
        /* the last event's, through the unique (stream, version) index */
        snprintf(out, outlen, "SELECT version FROM \"%s\".events WHERE "
                 "stream = $1 ORDER BY version DESC LIMIT 1", s);
        break;
    case PG_LAST:
        snprintf(out, outlen, "SELECT version, id FROM \"%s\".events WHERE "
                 "stream = $1 ORDER BY version DESC LIMIT 1", s);
        break;
    case PG_READ_FORWARD:
    case PG_READ_BACKWARD:
        /* Pages are version ranges of at most PAGE_ROWS: versions are
         * dense, so each page touches a bounded part of the index whatever
         * plan the statistics suggest (a LIMIT over an open range can turn
         * into a sort of the whole rest of the stream). */
        snprintf(out, outlen, "SELECT position, id, version, type, data,"
                 " metadata, recorded_at FROM \"%s\".events WHERE stream = $1"
                 " AND version BETWEEN $2::bigint AND $3::bigint"
                 " AND ($4::timestamptz IS NULL OR recorded_at < $4)"
                 " ORDER BY version%s LIMIT $5::bigint", s,
                 stmt == PG_READ_FORWARD ? "" : " DESC");
        break;
    case PG_SNAPSHOT_SAVE:
        /* The replaced snapshot takes the new row's instant (its column
         * default): Citus refuses a call to now() in DO UPDATE SET on a
         * distributed table (it is not IMMUTABLE). */
        snprintf(out, outlen, "INSERT INTO \"%s\".snapshots (stream, version,"
                 " schema_version, state) VALUES ($1, $2::bigint, $3::bigint,"
                 " $4::json) ON CONFLICT (stream, version) DO UPDATE SET"
                 " schema_version = excluded.schema_version,"
                 " state = excluded.state,"
                 " recorded_at = excluded.recorded_at", s);
        break;
    case PG_SNAPSHOT_LOAD:
        snprintf(out, outlen, "SELECT version, schema_version, state,"
                 " recorded_at FROM \"%s\".snapshots WHERE stream = $1"
                 " AND version <= $2::bigint AND schema_version = $3::bigint"
                 " ORDER BY version DESC LIMIT 1", s);
        break;
    default: {
        int filters = stmt - PG_READ_ALL;
        int next = 4;
        char cat[64] = "", types[64] = "", part[128] = "", upto[64] = "";
        if (filters & 1)
            snprintf(cat, sizeof cat, " AND category = $%d", next++);
        if (filters & 2)
            snprintf(types, sizeof types, " AND type = ANY($%d::text[])",
                     next++);
        /* the consumer groups' hash of the stream: a partition never
         * splits a stream */
        if (filters & 4) {
            snprintf(part, sizeof part, " AND (hashtext(stream) & 2147483647)"
                     " %% $%d::int = ANY($%d::int[])", next, next + 1);
            next += 2;
        }
        /* a common upper bound (a rebuild's workers stop at one W) */
        if (filters & 8)
            snprintf(upto, sizeof upto, " AND (txid, position) <="
                     " ($%d::xid8, $%d::bigint)", next, next + 1);
        char partcol[96] = "";
        if (filters & 4)
            snprintf(partcol, sizeof partcol, ", (hashtext(stream) &"
                     " 2147483647) %% $%d::int", next - 2);
        /* the stream read's columns first (read_row), then these */
        int n = snprintf(out, outlen, "%sSELECT position, id, version, type,"
                 " data, metadata, recorded_at, txid, stream%s FROM \"%s\".events"
                 " WHERE (txid, position) > ($1::xid8, $2::bigint)"
                 " AND txid < pg_snapshot_xmin(pg_current_snapshot())%s%s%s%s"
                 " ORDER BY txid, position LIMIT $3::bigint%s", filters ? "(" : "",
                 partcol, s, cat, types, part, upto, filters ? ")" : "");
        /* A filtered batch also names the last event below the watermark
         * (and the bound), whatever its type or partition, in a last row
         * with a NULL id: when the batch is short the checkpoint moves
         * there, so events the filter skips are never scanned again
         * (same snapshot: same statement). */
        if (filters && n > 0 && (size_t)n < outlen)
            snprintf(out + n, outlen - (size_t)n, " UNION ALL (SELECT"
                     " position, NULL, NULL, NULL, NULL, NULL, NULL, txid,"
                     " NULL%s FROM \"%s\".events WHERE txid <"
                     " pg_snapshot_xmin(pg_current_snapshot())%s"
                     " ORDER BY txid DESC, position DESC LIMIT 1)",
                     filters & 4 ? ", NULL::int" : "", s, upto);
    }
    }
    return out;
}

/* ---- binary values -------------------------------------------------------- */

static int32_t be32(const char *v)
{
    const unsigned char *u = (const unsigned char *)v;
    return (int32_t)(((uint32_t)u[0] << 24) | ((uint32_t)u[1] << 16) |
                     ((uint32_t)u[2] << 8) | u[3]);
}

/* int64 as parameter text */
static const char *i64(char out[24], int64_t v)
{
    snprintf(out, 24, "%" PRId64, v);
    return out;
}

/* ---- append --------------------------------------------------------------- */

/* Adds one element of a PostgreSQL array literal: "..." with " and \
 * escaped. */
static int add_array_elem(es_buf *b, const char *s, size_t n, int first)
{
    if (!first && es_buf_addc(b, ',') < 0)
        return -1;
    if (es_buf_reserve(b, n * 2 + 2) < 0)
        return -1;
    char *o = b->data + b->len;
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\')
            *o++ = '\\';
        *o++ = s[i];
    }
    *o++ = '"';
    b->len = (size_t)(o - b->data);
    return 0;
}

/* append()'s parameters; the last event named (A_AFTER) is the caller's
 * text, all the others are laid out in p->params. */
enum { A_STREAM, A_EXPECTED, A_CHECK, A_IDS, A_TYPES, A_DATA, A_META, A_AFTER,
       A_N };

/* Element types of the binary arrays (pg_type.oid, fixed since 8.x). */
#define OID_TEXT 25
#define OID_JSON 114
#define OID_UUID 2950

static int put_be32(es_buf *b, uint32_t v)
{
    char o[4] = { (char)(v >> 24), (char)(v >> 16), (char)(v >> 8),
                  (char)v };
    return es_buf_add(b, o, 4);
}

/* The header of a one-dimensional binary array of n elements without
 * NULLs (array_recv's format); each element follows as its length and
 * its bytes. */
static int put_array_head(es_buf *b, uint32_t elem_type, size_t n)
{
    return put_be32(b, 1) | put_be32(b, 0) | put_be32(b, elem_type) |
           put_be32(b, (uint32_t)n) | put_be32(b, 1);
}

/* An element longer than an int32 says is caught by the caller's check
 * of the whole parameter's size. */
static int put_elem(es_buf *b, const char *s, size_t n)
{
    return put_be32(b, (uint32_t)n) | es_buf_add(b, s, n);
}

/* The ids as a binary uuid[]: 16 bytes each, made here when the caller
 * gave none (store.c checked the caller's). */
static int put_ids(es_buf *b, const es_event_in *ev, size_t n)
{
    int rc = put_array_head(b, OID_UUID, n);
    for (size_t i = 0; i < n; i++) {
        unsigned char id[16];
        if (ev[i].id) {
            if (es_uuid_parse(ev[i].id, id) != 0)
                return -2;
        } else {
            es_uuid_v7_bytes(id);
        }
        rc |= put_elem(b, (const char *)id, sizeof id);
    }
    return rc;
}

/* Which ids append() must look for among stored events: 2 when some
 * may have been sent before (a retry is then an idempotent success), 1
 * when the caller gave only ids it made for this append (ev->new_id),
 * 0 when it gave none. */
static int given_ids(const es_event_in *ev, size_t n)
{
    int given = 0;
    for (size_t i = 0; i < n; i++) {
        if (ev[i].id && !ev[i].new_id)
            return 2;
        if (ev[i].id)
            given = 1;
    }
    return given;
}

/* Lays out the append's parameters in p->params: the stream, expected
 * version and check flag as text, the four arrays in binary (the server
 * neither parses array literals nor uuids, and nothing is escaped here).
 * offs[] get each one's start (the buffer may move while it grows),
 * lens[] their lengths. */
static int build_append_params(pg_store *p, const char *stream,
                               const es_event_in *ev, size_t n,
                               int64_t expected, int check, size_t offs[A_N],
                               int lens[A_N], es_error *err)
{
    es_buf *b = &p->params;
    char num[32];
    int rc = 0, ids;

    es_buf_reset(b);
    offs[A_STREAM] = b->len;
    rc |= es_buf_add(b, stream, strlen(stream) + 1);
    offs[A_EXPECTED] = b->len;
    i64(num, expected);
    rc |= es_buf_add(b, num, strlen(num) + 1);
    offs[A_CHECK] = b->len;
    rc |= es_buf_add(b, check ? "t" : "f", 2);

    offs[A_IDS] = b->len;
    ids = put_ids(b, ev, n);
    if (ids == -2)
        return es_fail(err, ES_INVALID, "append: an event id is not a UUID");
    rc |= ids;

    offs[A_TYPES] = b->len;
    rc |= put_array_head(b, OID_TEXT, n);
    for (size_t i = 0; i < n; i++)
        rc |= put_elem(b, ev[i].type, strlen(ev[i].type));

    offs[A_DATA] = b->len;
    rc |= put_array_head(b, OID_JSON, n);
    for (size_t i = 0; i < n; i++)
        rc |= put_elem(b, ev[i].data, ev[i].data_len);

    offs[A_META] = b->len;
    rc |= put_array_head(b, OID_JSON, n);
    for (size_t i = 0; i < n; i++) {
        if (ev[i].metadata)
            rc |= put_elem(b, ev[i].metadata, ev[i].metadata_len);
        else
            rc |= put_elem(b, "{}", 2);
    }
    if (b->len - offs[A_IDS] > INT32_MAX)     /* libpq counts in int */
        return es_fail(err, ES_INVALID, "append: the batch is too large "
                       "(over 2 GiB of parameters)");
    if (rc)
        return es_fail(err, ES_DATABASE, "out of memory");
    for (int i = 0; i < A_AFTER; i++) {
        size_t end = i + 1 < A_AFTER ? offs[i + 1] : b->len;
        lens[i] = (int)(end - offs[i]);
    }
    lens[A_AFTER] = 0;      /* text */
    return 0;
}

/* What an expected version asks for, in a conflict's message. */
static void expected_text(int64_t expected, char *want, size_t len)
{
    if (expected == ES_NO_STREAM)
        snprintf(want, len, "no stream");
    else if (expected == ES_STREAM_EXISTS)
        snprintf(want, len, "an existing stream");
    else
        snprintf(want, len, "version %" PRId64, expected);
}

/* The stream is at version actual, not where the caller expected it;
 * then is added to the message. */
static int version_conflict(const char *stream, int64_t expected,
                            int64_t actual, const char *then, es_error *err)
{
    char want[48];
    expected_text(expected, want, sizeof want);
    es_fail(err, ES_CONFLICT, "stream %s: expected %s, found version %"
            PRId64 "%s", stream, want, actual, then);
    err->expected = expected;
    err->actual = actual;
    err->reason = ES_REASON_VERSION;
    return -1;
}

static int append_result(PGresult *res, const char *stream, int64_t expected,
                         es_append_result *out, es_error *err)
{
    int status = atoi(PQgetvalue(res, 0, 0));
    int64_t version = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    int64_t position = strtoll(PQgetvalue(res, 0, 2), NULL, 10);

    if (status == 0 || status == 1) {
        out->version = version;
        out->position = position;
        out->idempotent = status == 1;
        es_time_format(strtoll(PQgetvalue(res, 0, 5), NULL, 10),
                       out->recorded_at);
        return 0;
    }
    if (status == 2)
        return version_conflict(stream, expected, version, "", err);
    if (status == 4)
        return es_last_id_conflict(err, stream, expected, version, "");
    es_fail(err, ES_INVALID, "event id %s is already used by stream %s at "
            "version %" PRId64, PQgetvalue(res, 0, 3), PQgetvalue(res, 0, 4),
            version);
    err->reason = ES_REASON_ID_TAKEN;
    return -1;
}

/* A unique violation or serialization failure inside the caller's
 * transaction has aborted it: a conflict whose reason (set by pg_fail:
 * "order" for the stream-order rule, else "tx_aborted") and message say
 * that the transaction must be rolled back. The event id's constraint is
 * not a version conflict: an id already stored (sent with new_ids, which
 * skips the lookup that would have found it, or stored meanwhile by
 * another session) fails as invalid, the transaction aborted all the
 * same; looking it up is no longer possible in it. */
static int failed_conflict(const pg_store *p, const char *stream,
                           int64_t expected, const char *then, es_error *err)
{
    char sql_msg[ES_MESSAGE_MAX];
    snprintf(sql_msg, sizeof sql_msg, "%s", err->message);
    err->kind = ES_CONFLICT;
    err->expected = expected;
    err->actual = -1;
    if (strcmp(err->sqlstate, "23505") == 0 &&
        strcmp(p->fail_constraint, "events_id_key") == 0) {
        err->kind = ES_INVALID;
        snprintf(sql_msg, sizeof sql_msg, "stream %.200s: an event id of "
                 "this append is already stored (ids sent with new_ids are "
                 "not looked up first)", stream);
    } else if (strcmp(err->sqlstate, "23505") == 0)
        snprintf(sql_msg, sizeof sql_msg, "stream %.200s: a "
                 "concurrent append took the same version", stream);
    snprintf(err->message, sizeof err->message, "%.400s (%s)", sql_msg,
             then);
    return -1;
}

static int aborted_conflict(const pg_store *p, const char *stream,
                            int64_t expected, es_error *err)
{
    return failed_conflict(p, stream, expected, "the transaction is aborted: "
                           "roll it back", err);
}

enum { O_STREAM, O_LOW, O_ID, O_TYPE, O_DATA, O_META, O_HIGH, O_AFTER, O_N };

/* The versions a stream may be at for an append expecting `expected`:
 * any, none (0), some (1 and up) or exactly that one. */
static void expected_range(int64_t expected, int64_t *low, int64_t *high)
{
    *low = expected == ES_STREAM_EXISTS ? 1 : expected > 0 ? expected : 0;
    *high = expected == ES_ANY || expected == ES_STREAM_EXISTS ? INT64_MAX
                                                               : *low;
}

/* PG_APPEND_ONE's parameters (and PG_APPEND_STRICT's) in p->params:
 * values[] point into it. 0, or -1 (out of memory). */
static int one_params(pg_store *p, const char *stream, const es_event_in *ev,
                      int64_t expected, const char *values[O_N],
                      es_error *err)
{
    es_buf *b = &p->params;
    size_t offs[O_N];
    char num[24], id[37];
    int64_t low, high;
    int rc = 0;

    es_buf_reset(b);
    if (ev->id)
        snprintf(id, sizeof id, "%s", ev->id);
    else
        es_uuid_v7(id);
    expected_range(expected, &low, &high);
    offs[O_STREAM] = b->len;
    rc |= es_buf_add(b, stream, strlen(stream) + 1);
    offs[O_LOW] = b->len;
    i64(num, low);
    rc |= es_buf_add(b, num, strlen(num) + 1);
    offs[O_ID] = b->len;
    rc |= es_buf_add(b, id, sizeof id);
    offs[O_TYPE] = b->len;
    rc |= es_buf_add(b, ev->type, strlen(ev->type) + 1);
    offs[O_DATA] = b->len;
    rc |= es_buf_add(b, ev->data, ev->data_len);
    rc |= es_buf_addc(b, '\0');
    offs[O_META] = b->len;
    if (ev->metadata)
        rc |= es_buf_add(b, ev->metadata, ev->metadata_len);
    else
        rc |= es_buf_add(b, "{}", 2);
    rc |= es_buf_addc(b, '\0');
    offs[O_HIGH] = b->len;
    i64(num, high);
    rc |= es_buf_add(b, num, strlen(num) + 1);
    if (rc)
        return es_fail(err, ES_DATABASE, "out of memory");
    for (int i = 0; i < O_AFTER; i++)
        values[i] = b->data + offs[i];
    values[O_AFTER] = ev->after;    /* NULL: no last event named */
    return 0;
}

/* The row RETURNING position, version, recorded_at (binary) gave. */
static void one_result(const PGresult *res, es_append_result *out)
{
    out->position = (int64_t)pg_be64(PQgetvalue(res, 0, 0));
    out->version = (int64_t)pg_be64(PQgetvalue(res, 0, 1));
    es_time_format((int64_t)pg_be64(PQgetvalue(res, 0, 2)) + PG_EPOCH_USEC,
                   out->recorded_at);
}

/* One event whose id is made here or by the caller for this append (the
 * common case) on a single-node store: PG_APPEND_ONE. Returns 1 when it
 * appended (out is set), 0 when a check refused (append() then says
 * which), 2 when a concurrent writer took the version or the id (err
 * holds the unique violation), -1 on an error. */
static int append_one(pg_store *p, const char *stream, const es_event_in *ev,
                      int64_t expected, es_append_result *out, es_error *err)
{
    const char *values[O_N];
    int rc;

    if (one_params(p, stream, ev, expected, values, err) < 0)
        return -1;
    PGresult *res = pg_exec_prepared(p, PG_APPEND_ONE, O_N, values, 1, err);
    if (!res)
        return strcmp(err->sqlstate, "23505") == 0 ||
               strcmp(err->sqlstate, "40001") == 0 ? 2 : -1;
    rc = PQntuples(res) == 1;
    if (rc)
        one_result(res, out);
    PQclear(res);
    return rc;
}

/* The stream's last version and its event's id (0 and zeros when the
 * stream has none). */
static int last_event(pg_store *p, const char *stream, int64_t *version,
                      unsigned char id[16], es_error *err)
{
    const char *values[1] = { stream };
    PGresult *res = pg_exec_prepared(p, PG_LAST, 1, values, 0, err);

    if (!res)
        return -1;
    *version = 0;
    memset(id, 0, 16);
    if (PQntuples(res) == 1) {
        *version = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        if (es_uuid_parse(PQgetvalue(res, 0, 1), id) != 0)
            memset(id, 0, 16);
    }
    PQclear(res);
    return 0;
}

/* Is `text` (a UUID the caller gave, validated by store.c) this id? */
static int same_id(const char *text, const unsigned char id[16])
{
    unsigned char u[16];
    return es_uuid_parse(text, u) == 0 && memcmp(u, id, 16) == 0;
}

static int pg_append_checked(pg_store *p, const char *stream,
                             const es_event_in *ev, size_t n,
                             int64_t expected, int check, int given,
                             es_append_result *out, es_error *err);

int pg_append(es_store *s, const char *stream, const es_event_in *ev,
              size_t n, int64_t expected, es_append_result *out,
              es_error *err)
{
    pg_store *p = (pg_store *)s;
    int given = given_ids(ev, n), check = given == 2;

    /* Citus routes append() to the stream's worker; only the function
     * knows how (pg_citus.c). Ids that may have been sent before need
     * append()'s idempotency check. */
    if (n == 1 && !check) {
        int citus = pg_citus_detect(p, err), rc = 0;
        if (citus < 0)
            return -1;
        if (!citus)
            rc = append_one(p, stream, ev, expected, out, err);
        if (rc == 1 || rc == -1)
            return rc > 0 ? 0 : -1;
        if (rc == 2 && p->in_tx)
            return aborted_conflict(p, stream, expected, err);
        /* refused: append() says why, looking for the caller's id too (a
         * unique violation may be the id's) */
        if (!citus)
            check = given != 0;
    }
    return pg_append_checked(p, stream, ev, n, expected, check, given, out,
                             err);
}

/* append() itself, asked again while a concurrent writer keeps taking the
 * version first (see pg_append). */
static int pg_append_checked(pg_store *p, const char *stream,
                             const es_event_in *ev, size_t n,
                             int64_t expected, int check, int given,
                             es_append_result *out, es_error *err)
{
    size_t offs[A_N];
    const char *values[A_N];
    int lens[A_N];
    static const int formats[A_N] = { 0, 0, 0, 1, 1, 1, 1, 0 };
    const pg_binparams bin = { lens, formats };
    PGresult *res;
    int build = 1;

    /* A unique violation means a concurrent writer took the version (or
     * the id) between our check and our insert. Outside a transaction we
     * just ask again, looking for the caller's ids from then on: the
     * function then sees that writer's events and answers properly
     * (conflict, idempotent success, id taken, or a new version for
     * es.ANY). Inside the caller's transaction the statement's failure
     * has aborted it (aborted_conflict). */
    for (int attempt = 0;; attempt++) {
        if (build) {
            if (build_append_params(p, stream, ev, n, expected, check, offs,
                                    lens, err) < 0)
                return -1;
            for (int i = 0; i < A_AFTER; i++)
                values[i] = p->params.data + offs[i];
            values[A_AFTER] = ev[0].after;  /* NULL: no last event named */
            build = 0;
        }
        res = pg_exec_prepared_bin(p, PG_APPEND, A_N, values, &bin, 0, err);
        /* a version conflict, or another last event than the one named,
         * may be a retry of this very batch: looking its ids up says so
         * (an idempotent success) */
        if (res && given && !check && (strcmp(PQgetvalue(res, 0, 0), "2") == 0 ||
                                       strcmp(PQgetvalue(res, 0, 0), "4") == 0)) {
            PQclear(res);
            check = build = 1;
            continue;
        }
        if (res)
            break;
        if (strcmp(err->sqlstate, "23505") != 0 &&
            strcmp(err->sqlstate, "40001") != 0)
            return -1;
        if (p->in_tx)
            return aborted_conflict(p, stream, expected, err);
        if (given && !check)
            check = build = 1;
        if (attempt == APPEND_RETRIES) {
            err->kind = ES_CONFLICT;
            err->expected = expected;
            err->actual = -1;
            err->reason = ES_REASON_VERSION;
            snprintf(err->message, sizeof err->message, "stream %.200s: a "
                     "concurrent append took the same version", stream);
            return -1;
        }
    }
    int rc = append_result(res, stream, expected, out, err);
    PQclear(res);
    return rc;
}

/* PG_APPEND_STRICT failed in its pipeline (pg_exec_commit): the
 * transaction is rolled back by now. A refusal (23502, see the statement)
 * is a version conflict, the version it met asked for afterwards, outside
 * any transaction; or, when that version is one the append accepts, the
 * last event the caller named (ev->after) that is not the stream's last,
 * else the stream-order rule's (a transaction that had its id before the
 * stream's last appender: it wrote something before this append). */
static int strict_failed(pg_store *p, const char *stream,
                         const es_event_in *ev, int64_t expected,
                         es_error *err)
{
    es_error verr;
    int64_t actual = -1, low, high;
    unsigned char last[16];
    char want[48];

    if (strcmp(err->sqlstate, "23505") == 0 ||
        strcmp(err->sqlstate, "40001") == 0)
        return failed_conflict(p, stream, expected, "nothing of the "
                               "transaction was committed", err);
    if (strcmp(err->sqlstate, "23502") != 0)
        return -1;
    if (last_event(p, stream, &actual, last, &verr) < 0)
        actual = -1;
    expected_range(expected, &low, &high);
    /* the version is right but the event there is not the one named */
    if (ev->after && actual >= low && actual <= high &&
        !(actual > 0 && same_id(ev->after, last)))
        return es_last_id_conflict(err, stream, expected, actual, " (nothing "
                                   "of the transaction was committed)");
    if (actual >= low && actual <= high) {
        es_fail(err, ES_CONFLICT, "stream %s was appended to by a younger "
                "transaction; retry in a new transaction (nothing of the "
                "transaction was committed)", stream);
        snprintf(err->sqlstate, sizeof err->sqlstate, "40001");
        err->expected = expected;
        err->actual = actual;
        err->reason = ES_REASON_ORDER;
        return -1;
    }
    if (actual >= 0)
        return version_conflict(stream, expected, actual, " (nothing of the "
                                "transaction was committed)", err);
    expected_text(expected, want, sizeof want);
    es_fail(err, ES_CONFLICT, "stream %s: expected %s, found another "
            "version (nothing of the transaction was committed)", stream,
            want);
    err->expected = expected;
    err->actual = actual;
    err->reason = ES_REASON_VERSION;
    return -1;
}

/* A failure's message says that its transaction is over (not that the
 * caller must roll it back: that is done). */
static void note_nothing_committed(es_error *err)
{
    static const char note[] = " (nothing of the transaction was committed)";
    char *aborted = strstr(err->message, " (the transaction is aborted: "
                                         "roll it back)");
    size_t len;
    if (aborted)
        *aborted = '\0';
    len = strlen(err->message);
    if (!strstr(err->message, "nothing of the transaction") &&
        len + sizeof note <= sizeof err->message)
        memcpy(err->message + len, note, sizeof note);
}

/* One event, the caller's statement and COMMIT in one round trip. */
static int append_one_commit(pg_store *p, const char *stream,
                             const es_event_in *ev, int64_t expected,
                             const char *sql, int nparams,
                             const char *const *params, es_append_result *out,
                             es_rows **rows, es_error *err)
{
    const char *values[O_N];
    PGresult *res, *late;
    es_error ignored;
    int rc;

    if (one_params(p, stream, ev, expected, values, err) < 0) {
        pg_rollback(&p->base, &ignored);
        return -1;
    }
    rc = pg_exec_commit(p, PG_APPEND_STRICT, O_N, values, 1, sql, nparams,
                        params, &res, &late, err);
    if (rc == 1)
        return strict_failed(p, stream, ev, expected, err);
    if (rc != 0)
        return -1;
    /* PG_APPEND_STRICT gives its row or fails: no row would be a bug,
     * reported rather than read */
    if (PQntuples(res) != 1) {
        PQclear(res);
        PQclear(late);
        return es_fail(err, ES_DATABASE, "append: the server appended no "
                       "event, yet committed the statement behind it");
    }
    /* committed: the statement's rows are a courtesy; without memory for
     * them the append still stands */
    one_result(res, out);
    out->one_trip = 1;
    PQclear(res);
    *rows = pg_rows_of(late, &ignored);
    return 0;
}

int pg_append_commit(es_store *s, const char *stream, const es_event_in *ev,
                     size_t n, int64_t expected, const char *sql,
                     int nparams, const char *const *params,
                     es_append_result *out, es_rows **rows, es_error *err)
{
    pg_store *p = (pg_store *)s;
    es_error ignored;
    int64_t actual;
    int citus;

    *rows = NULL;
    if (!p->in_tx && !p->tx_lost)
        return es_fail(err, ES_INVALID, "append: commit_with needs an open "
                       "transaction (store:begin() first)");
    citus = p->tx_lost ? 0 : pg_citus_detect(p, err);
    if (citus < 0) {
        pg_rollback(s, &ignored);
        return -1;
    }
    if (n == 1 && given_ids(ev, n) != 2 && !citus && !p->tx_lost)
        return append_one_commit(p, stream, ev, expected, sql, nparams,
                                 params, out, rows, err);
    /* anything else (a batch, ids to look up, Citus): the append, then
     * the statement and COMMIT, one round trip each */
    if (pg_append(s, stream, ev, n, expected, out, err) < 0) {
        pg_rollback(s, &ignored);
        note_nothing_committed(err);
        /* a conflict met in the transaction knows no version: asked now,
         * as the one round trip asks it */
        if (err->kind == ES_CONFLICT && err->actual < 0 &&
            pg_version(s, stream, &actual, &ignored) == 0)
            err->actual = actual;
        return -1;
    }
    /* the same events were stored already (a retry): the statement was
     * meant to go with appending them, so it does not run, and nothing of
     * the transaction is committed (out->idempotent says why) */
    if (out->idempotent)
        return pg_rollback(s, err);
    return pg_query_commit(s, sql, nparams, params, rows, err);
}

int pg_version(es_store *s, const char *stream, int64_t *out, es_error *err)
{
    pg_store *p = (pg_store *)s;
    const char *values[1] = { stream };
    PGresult *res = pg_exec_prepared(p, PG_VERSION, 1, values, 0, err);
    if (!res)
        return -1;
    *out = PQntuples(res) ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : 0;
    PQclear(res);
    return 0;
}

/* ---- cursors -------------------------------------------------------------- */

/* One event row of a read, decoded (read_row). */
typedef struct pg_row {
    int64_t position, version, at_usec;
    uint64_t txid;
    const char *type, *data, *metadata, *stream;
    size_t data_len, metadata_len;
    int part;               /* the partition column's, or -1 */
    char id[37];
} pg_row;

typedef struct pg_cursor {
    es_cursor base;
    PGresult *res;          /* the current page */
    int row, nrows;
    /* stream reads: versions still to visit are next..last (forward) or
     * next down to last (backward) */
    char *stream;
    int64_t next;
    int64_t last;
    int64_t remaining;      /* events still wanted; -1 = no limit */
    int backward;
    int learn_top;          /* the first page sets `last` (see pg_read) */
    int64_t page_from;      /* the page on its way: its first version */
    int64_t page_want;      /* and how many rows it can hold */
    int prefetch;           /* keep the next page on its way */
    pg_page_claim page;     /* on the wire while p->page points here */
    char before[40];        /* "" = no bound */
    /* read_all: where the batch has got to, as text only when asked */
    uint64_t cp_txid;
    int64_t cp_pos;
    int has_head;           /* filtered and short: move to head at the end */
    uint64_t head_txid;
    int64_t head_pos;
    char checkpoint[48];
    /* read_all: the rows as the prefetch thread decoded them, or NULL
     * (read_row then reads each into row) */
    const pg_row *rows;
    /* the current event's fields */
    pg_row row_buf;
    char recorded_at[32];   /* "" until the first row */
    int64_t at_usec;        /* the instant recorded_at shows */
} pg_cursor;

static void cursor_destroy(es_cursor *c)
{
    pg_cursor *pc = (pg_cursor *)c;
    pg_store *p = (pg_store *)c->store;
    /* A prefetched page nobody will read: collect it so the session is
     * free for the next call (a cancel would cost a second connection). */
    if (p->page == &pc->page) {
        pg_drain(p);
        p->page = NULL;
    }
    PQclear(pc->res);
    free(pc->stream);
    free(pc);
}

static const char *all_checkpoint(es_cursor *c)
{
    pg_cursor *pc = (pg_cursor *)c;
    snprintf(pc->checkpoint, sizeof pc->checkpoint, "%" PRIu64 ":%" PRId64,
             pc->cp_txid, pc->cp_pos);
    return pc->checkpoint;
}

/* Row i of a read's result: columns 0-6 of either read, and with 9 or
 * more columns read_all's txid, stream and partition. Touches nothing but
 * res and r: the prefetch thread decodes a whole batch this way
 * (decode_rows), so the caller's thread, which builds the events, only
 * copies fields (each PQgetvalue is a call, the id a formatting). */
static void read_row(const PGresult *res, int i, pg_row *r)
{
    int nf = PQnfields(res);
    r->position = (int64_t)pg_be64(PQgetvalue(res, i, 0));
    es_uuid_format((const unsigned char *)PQgetvalue(res, i, 1), r->id);
    r->version = (int64_t)pg_be64(PQgetvalue(res, i, 2));
    r->type = PQgetvalue(res, i, 3);
    r->data = PQgetvalue(res, i, 4);       /* json: the text as stored */
    r->data_len = (size_t)PQgetlength(res, i, 4);
    r->metadata = PQgetvalue(res, i, 5);
    r->metadata_len = (size_t)PQgetlength(res, i, 5);
    r->at_usec = (int64_t)pg_be64(PQgetvalue(res, i, 6)) + PG_EPOCH_USEC;
    r->txid = nf >= 9 ? pg_be64(PQgetvalue(res, i, 7)) : 0;
    r->stream = nf >= 9 ? PQgetvalue(res, i, 8) : NULL;
    r->part = nf > 9 ? be32(PQgetvalue(res, i, 9)) : -1;
}

/* Event e from row r; its strings stay r's and the cursor's. */
static void row_event(pg_cursor *pc, const pg_row *r, es_event *e)
{
    e->position = r->position;
    e->id = r->id;
    e->version = r->version;
    e->type = r->type;
    e->data = r->data;
    e->data_len = r->data_len;
    e->metadata = r->metadata;
    e->metadata_len = r->metadata_len;
    /* the events of one transaction share their instant (now()) */
    if (!pc->recorded_at[0] || r->at_usec != pc->at_usec) {
        es_time_format(r->at_usec, pc->recorded_at);
        pc->at_usec = r->at_usec;
    }
    e->recorded_at = pc->recorded_at;
}

static int stream_exhausted(const pg_cursor *pc)
{
    if (pc->remaining == 0)
        return 1;
    return pc->backward ? pc->next < pc->last : pc->next > pc->last;
}

/* Sends the query for the next page (version range) of a stream read. */
static int send_page(pg_cursor *pc, es_error *err)
{
    pg_store *p = (pg_store *)pc->base.store;
    char lo[24], hi[24], limit[24];
    const char *values[5];
    int64_t a, b;

    if (pc->backward) {
        b = pc->next;
        a = b - pc->last >= PAGE_ROWS ? b - PAGE_ROWS + 1 : pc->last;
        pc->next = a - 1;
    } else {
        a = pc->next;
        b = pc->last - a >= PAGE_ROWS ? a + PAGE_ROWS - 1 : pc->last;
        pc->next = b + 1;
    }
    values[0] = pc->stream;
    values[1] = i64(lo, a);
    values[2] = i64(hi, b);
    values[3] = pc->before[0] ? pc->before : NULL;
    values[4] = i64(limit, pc->remaining >= 0 ? pc->remaining
                                              : (int64_t)PAGE_ROWS);
    pc->page_from = a;
    pc->page_want = b - a + 1;
    if (pc->remaining >= 0 && pc->remaining < pc->page_want)
        pc->page_want = pc->remaining;
    if (pg_send_prepared(p, pc->backward ? PG_READ_BACKWARD : PG_READ_FORWARD,
                         5, values, 1, err) < 0)
        return -1;
    p->page = &pc->page;
    return 0;
}

/* The first page of a forward read without `before` bounds the read.
 * Versions are dense, so a page with fewer rows than it could hold ends
 * where the stream ended when it was read: nothing more to read (a stream
 * shorter than a page costs one statement, no version query). Only after
 * a full page, when more is wanted, is the stream's version asked for,
 * still inside read(): later pages stop there, so events appended after
 * read() are not read. */
static int learn_top(pg_cursor *pc, es_error *err)
{
    int64_t top;
    pc->learn_top = 0;
    if (pc->nrows < pc->page_want) {
        pc->last = pc->page_from + pc->nrows - 1;
        if (pc->next > pc->last + 1)
            pc->next = pc->last + 1;
        return 0;
    }
    if (stream_exhausted(pc))
        return 0;
    if (pg_version(pc->base.store, pc->stream, &top, err) < 0)
        return -1;
    if (top < pc->last)
        pc->last = top;
    return 0;
}

/* Waits for the page sent last; with prefetch, sends the one after. */
static int receive_page(pg_cursor *pc, es_error *err)
{
    pg_store *p = (pg_store *)pc->base.store;
    PQclear(pc->res);
    p->page = NULL;
    pc->res = pg_receive(p, pc->backward ? PG_READ_BACKWARD : PG_READ_FORWARD,
                         err);
    pc->row = pc->nrows = 0;
    if (!pc->res)
        return -1;
    if (PQnfields(pc->res) != 7) {
        PQclear(pc->res);
        pc->res = NULL;
        return es_fail(err, ES_DATABASE, "read: unexpected result shape");
    }
    pc->nrows = PQntuples(pc->res);
    if (pc->remaining >= 0)
        pc->remaining -= pc->nrows;
    if (pc->learn_top) {
        if (learn_top(pc, err) < 0)
            return -1;
    } else if (!pc->backward && !pc->before[0] && pc->nrows == 0)
        pc->last = pc->next - 1;    /* dense versions: the end (defensive) */
    if (pc->prefetch && !stream_exhausted(pc))
        return send_page(pc, err);
    return 0;
}

static int stream_next(es_cursor *c, es_event *e, es_error *err)
{
    pg_cursor *pc = (pg_cursor *)c;
    pg_store *p = (pg_store *)c->store;

    if (pc->page.broken)
        return es_fail(err, ES_INVALID, "read of stream %s: the store was "
                       "used by another call while this read had a page on "
                       "its way (fold handlers must not use the store)",
                       pc->stream);
    /* A page can be empty when `before` filters all of its range. */
    while (pc->row >= pc->nrows) {
        if (p->page != &pc->page) {
            if (stream_exhausted(pc))
                return 0;
            if (send_page(pc, err) < 0)
                return -1;
        }
        if (receive_page(pc, err) < 0)
            return -1;
    }
    read_row(pc->res, pc->row++, &pc->row_buf);
    row_event(pc, &pc->row_buf, e);
    e->stream = pc->stream;
    return 1;
}

static const es_cursor_ops stream_cursor_ops = {
    stream_next, NULL, cursor_destroy
};

es_cursor *pg_read(es_store *s, const char *stream, const es_read_opts *o,
                   es_error *err)
{
    pg_cursor *pc;
    int64_t top = INT64_MAX;

    /* The stream's version bounds the pages: events appended after read()
     * are not read. Backward reads start from it, and a page filtered by
     * `before` can be empty in the middle of the stream, so those ask for
     * it first; a forward read learns it from its first page, fetched
     * here (one round trip in all for a short stream). Either way a bad
     * store or connection shows up as read()'s nil, err rather than in
     * the middle of a loop. */
    if ((o->backward || o->before) && pg_version(s, stream, &top, err) < 0)
        return NULL;
    pc = calloc(1, sizeof *pc);
    if (!pc || !(pc->stream = strdup(stream))) {
        free(pc);
        es_fail(err, ES_DATABASE, "out of memory");
        return NULL;
    }
    pc->base.ops = &stream_cursor_ops;
    pc->base.store = s;
    pc->backward = o->backward;
    if (o->backward) {
        pc->next = o->from > 0 && o->from < top ? o->from : top;
        pc->last = o->to > 0 ? o->to : 1;
    } else {
        pc->next = o->from > 0 ? o->from : 1;
        pc->last = o->to > 0 && o->to < top ? o->to : top;
    }
    pc->remaining = o->limit > 0 ? o->limit : -1;
    pc->prefetch = o->prefetch && pc->remaining < 0;
    if (o->before) {
        /* Parsed here rather than by the server, so both stores accept
         * exactly the same instants ("yesterday" is not one). */
        int64_t usec;
        if (es_time_parse(o->before, &usec, err) < 0) {
            cursor_destroy(&pc->base);
            return NULL;
        }
        es_time_format(usec, pc->before);
    }
    if (!o->backward && !o->before) {
        pc->learn_top = 1;
        if (!stream_exhausted(pc) &&
            (send_page(pc, err) < 0 || receive_page(pc, err) < 0)) {
            cursor_destroy(&pc->base);
            return NULL;
        }
    }
    return &pc->base;
}

static int all_next(es_cursor *c, es_event *e, es_error *err)
{
    pg_cursor *pc = (pg_cursor *)c;
    const pg_row *r;
    int i;

    (void)err;
    if (pc->row >= pc->nrows) {
        if (pc->has_head) {
            pc->cp_txid = pc->head_txid;
            pc->cp_pos = pc->head_pos;
            pc->has_head = 0;
        }
        return 0;
    }
    i = pc->row++;
    if (pc->rows)
        r = &pc->rows[i];
    else {
        read_row(pc->res, i, &pc->row_buf);
        r = &pc->row_buf;
    }
    row_event(pc, r, e);
    e->stream = r->stream;
    if (r->part >= 0)       /* read with partitions: the stream's */
        e->part = r->part;
    pc->cp_txid = r->txid;
    pc->cp_pos = r->position;
    return 1;
}

/* A short filtered batch read every matching event below the watermark:
 * its checkpoint may move on to the last event there (the head row). */
static void note_head(pg_cursor *pc)
{
    int h = pc->nrows;
    uint64_t tx = pg_be64(PQgetvalue(pc->res, h, 7));
    int64_t pos = (int64_t)pg_be64(PQgetvalue(pc->res, h, 0));
    if (tx > pc->cp_txid || (tx == pc->cp_txid && pos > pc->cp_pos)) {
        pc->has_head = 1;
        pc->head_txid = tx;
        pc->head_pos = pos;
    }
}

static const es_cursor_ops all_cursor_ops = {
    all_next, all_checkpoint, cursor_destroy
};

/* Checkpoints are "<txid>:<position>"; "0:<position>" from the memory
 * store works too (it only orders by position). */
static int parse_checkpoint(const char *text, uint64_t *txid, int64_t *pos,
                            es_error *err)
{
    char *end;
    if (!text) {
        *txid = 0;
        *pos = 0;
        return 0;
    }
    if (text[0] < '0' || text[0] > '9')
        goto bad;
    /* out of range is as foreign as malformed: strtoull would clamp it
     * to the largest value and read from a place nobody asked for */
    errno = 0;
    *txid = strtoull(text, &end, 10);
    if (errno || *end != ':' || end[1] < '0' || end[1] > '9')
        goto bad;
    *pos = strtoll(end + 1, &end, 10);
    if (errno || *end != '\0')
        goto bad;
    return 0;
bad:
    return es_fail(err, ES_INVALID, "checkpoint '%.60s' is not one this store "
                   "made (\"<txid>:<position>\")", text);
}

/* The request a read_all batch answers, as one string: a prefetched batch
 * is used only for exactly the request it was made for. */
static int request_key(es_buf *key, int stmt, const char *const *values,
                       int nvalues)
{
    int rc = 0;
    es_buf_reset(key);
    rc |= es_buf_addc(key, (char)('0' + stmt));
    for (int i = 0; i < nvalues; i++) {
        rc |= es_buf_addc(key, '\x1f');
        rc |= es_buf_adds(key, values[i]);
    }
    return rc;
}

/* Whether key (from request_key) is this request, compared in place. */
static int request_is(const es_buf *key, int stmt, const char *const *values,
                      int nvalues)
{
    const char *k = key->data, *end = key->data + key->len;
    if (k == end || *k++ != (char)('0' + stmt))
        return 0;
    for (int i = 0; i < nvalues; i++) {
        size_t n = strlen(values[i]);
        if (k == end || *k++ != '\x1f' || (size_t)(end - k) < n ||
            memcmp(k, values[i], n) != 0)
            return 0;
        k += n;
    }
    return k == end;
}

/* Rows of a read_all result that are events: a filtered read ends with
 * the head row (NULL id), which is not one. */
static int event_rows(PGresult *res)
{
    int n = PQntuples(res);
    return n > 0 && PQgetisnull(res, n - 1, 1) ? n - 1 : n;
}

/* ---- the batch ahead, collected by a thread --------------------------------
 *
 * The server can only write a result as fast as it is read: over a unix
 * socket about 200 kB of a 10,000-event batch (about 2 MB) fit in the
 * socket's buffer, and the server then waits until the next read_all
 * reads the rest. A rebuild then waited there for most of the server's
 * work on the batch. A thread of the store reads the batch ahead into
 * memory as the server writes it, while the caller works on the one before;
 * the session is the thread's until pg_prefetch_join, which every use of
 * the session goes through (pg_settle), as with pg_copy.c's copies. */

typedef struct pg_fetch_job {
    pthread_t thread;
    pid_t pid;                /* the process whose thread it is */
    pg_store *p;
    PGresult *res;
    pg_row *rows;             /* res's event rows decoded, or NULL */
} pg_fetch_job;

/* The event rows of a read_all result, decoded into memory of the result
 * (freed by its PQclear); NULL when it holds none or on out-of-memory
 * (the rows are then read as they are used). */
static pg_row *decode_rows(PGresult *res)
{
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) < 9)
        return NULL;
    int n = event_rows(res);
    if (n <= 0)
        return NULL;
    pg_row *rows = PQresultAlloc(res, (size_t)n * sizeof *rows);
    if (!rows)
        return NULL;
    for (int i = 0; i < n; i++)
        read_row(res, i, &rows[i]);
    return rows;
}

static void *fetch_thread(void *arg)
{
    pg_fetch_job *job = arg;
    job->res = pg_take_result(job->p);
    pg_drain(job->p);
    job->rows = decode_rows(job->res);
    return NULL;
}

/* The batch just sent (ahead.state 1) collected by a thread; without one
 * (none could be made) pg_settle collects it as before. */
static void fetch_start(pg_store *p)
{
    pg_fetch_job *job = calloc(1, sizeof *job);
    if (!job)
        return;
    job->p = p;
    job->pid = getpid();
    if (pthread_create(&job->thread, NULL, fetch_thread, job) != 0) {
        free(job);
        return;
    }
    p->ahead.job = job;
}

void pg_prefetch_join(pg_store *p)
{
    pg_fetch_job *job = p->ahead.job;
    if (!job)
        return;
    p->ahead.job = NULL;
    if (job->pid != getpid()) {
        /* a forked child: the thread and the reply are the parent's;
         * touch neither (the child must not use this session at all),
         * only free the child's copy of the job */
        p->ahead.state = 0;
        free(job);
        return;
    }
    pthread_join(job->thread, NULL);
    p->ahead.res = job->res;
    p->ahead.rows = job->rows;
    p->ahead.state = 2;
    free(job);
}

/* Sends the query for the batch after the last event of res. */
static void prefetch_next(pg_store *p, int stmt, PGresult *res,
                          const char **values, int nvalues)
{
    char txs[24], poss[24];
    int last = event_rows(res) - 1;
    es_error ignored;

    snprintf(txs, sizeof txs, "%" PRIu64, pg_be64(PQgetvalue(res, last, 7)));
    values[0] = txs;
    values[1] = i64(poss, (int64_t)pg_be64(PQgetvalue(res, last, 0)));
    if (request_key(&p->ahead.key, stmt, values, nvalues) < 0)
        return;
    /* A failure here only means no batch ahead; the next read_all asks
     * the usual way and reports what is wrong. */
    if (pg_send_prepared(p, stmt, nvalues, values, 1, &ignored) == 0) {
        p->ahead.state = 1;
        fetch_start(p);
    }
}

/* The prefetched batch for this request, or NULL (then dropped). Only a
 * full batch is taken: a short one was read near the end of the log,
 * where a fresh read may already find more (a live follower woken by an
 * append must see it). An older read never skips anything either way. */
static PGresult *take_prefetched(pg_store *p, int stmt,
                                 const char *const *values, int nvalues,
                                 int64_t limit, const pg_row **rows)
{
    PGresult *res = NULL;

    *rows = NULL;
    if (p->ahead.state == 0)
        return NULL;
    if (request_is(&p->ahead.key, stmt, values, nvalues)) {
        pg_settle(p);
        if (p->ahead.res && PQresultStatus(p->ahead.res) == PGRES_TUPLES_OK &&
            event_rows(p->ahead.res) == limit) {
            res = p->ahead.res;
            *rows = p->ahead.rows;  /* memory of res: goes with it */
            p->ahead.res = NULL;
            p->ahead.rows = NULL;
        }
    }
    pg_prefetch_drop(p);
    return res;
}

es_cursor *pg_read_all(es_store *s, const es_read_all_opts *o, es_error *err)
{
    pg_store *p = (pg_store *)s;
    pg_cursor *pc;
    uint64_t txid = 0, up_txid = 0;
    int64_t pos = 0, up_pos = 0, limit_n;
    char txs[24], poss[24], limit[24], nparts_s[24], up_txs[24], up_poss[24];
    const char *values[9];
    int nvalues = 3, stmt = PG_READ_ALL;
    es_buf types, parts;

    /* On Citus the log is read per shard (pg_citus_read.c). */
    switch (pg_citus_detect(p, err)) {
    case -1: return NULL;
    case 1:
        if (o->partitions || o->upto) {
            es_fail(err, ES_INVALID, "read_all: options partitions and upto "
                    "are not for stores distributed on Citus (their "
                    "partitions are shards: option shards)");
            return NULL;
        }
        return pg_citus_read_all(p, o, err);
    }
    if (o->shards) {
        es_fail(err, ES_INVALID, "read_all: option shards is for stores "
                "distributed on Citus (store:migrate({ distributed = true }))");
        return NULL;
    }
    if (parse_checkpoint(o->after, &txid, &pos, err) < 0 ||
        (o->upto && parse_checkpoint(o->upto, &up_txid, &up_pos, err) < 0))
        return NULL;
    limit_n = o->limit > 0 ? o->limit : (int64_t)DEFAULT_BATCH;
    snprintf(txs, sizeof txs, "%" PRIu64, txid);
    values[0] = txs;
    values[1] = i64(poss, pos);
    values[2] = i64(limit, limit_n);
    es_buf_init(&types);
    es_buf_init(&parts);
    if (o->category) {
        stmt += 1;
        values[nvalues++] = o->category;
    }
    if (o->types) {
        int rc = es_buf_addc(&types, '{');
        stmt += 2;
        for (size_t i = 0; i < o->ntypes; i++)
            rc |= add_array_elem(&types, o->types[i], strlen(o->types[i]),
                                 i == 0);
        rc |= es_buf_addc(&types, '}');
        values[nvalues++] = es_buf_cstr(&types);
        if (rc || !values[nvalues - 1])
            goto oom;
    }
    if (o->partitions) {
        int rc = es_buf_addc(&parts, '{');
        char k[24];
        stmt += 4;
        for (size_t i = 0; i < o->nparts; i++) {
            if (i)
                rc |= es_buf_addc(&parts, ',');
            rc |= es_buf_adds(&parts, i64(k, o->parts[i]));
        }
        rc |= es_buf_addc(&parts, '}');
        values[nvalues++] = i64(nparts_s, o->partitions);
        values[nvalues++] = es_buf_cstr(&parts);
        if (rc || !values[nvalues - 1])
            goto oom;
    }
    if (o->upto) {
        stmt += 8;
        snprintf(up_txs, sizeof up_txs, "%" PRIu64, up_txid);
        values[nvalues++] = up_txs;
        values[nvalues++] = i64(up_poss, up_pos);
    }
    pc = calloc(1, sizeof *pc);
    if (!pc)
        goto oom;
    pc->base.ops = &all_cursor_ops;
    pc->base.store = s;
    pc->cp_txid = txid;        /* the `after` given, until a row moves it */
    pc->cp_pos = pos;
    pc->res = take_prefetched(p, stmt, values, nvalues, limit_n, &pc->rows);
    if (!pc->res)
        pc->res = pg_exec_prepared(p, stmt, nvalues, values, 1, err);
    if (pc->res && o->prefetch && event_rows(pc->res) == limit_n)
        prefetch_next(p, stmt, pc->res, values, nvalues);
    es_buf_free(&types);
    es_buf_free(&parts);
    if (!pc->res) {
        cursor_destroy(&pc->base);
        return NULL;
    }
    pc->nrows = event_rows(pc->res);
    if (pc->nrows < limit_n && pc->nrows < PQntuples(pc->res))
        note_head(pc);
    return &pc->base;
oom:
    es_buf_free(&types);
    es_buf_free(&parts);
    es_fail(err, ES_DATABASE, "out of memory");
    return NULL;
}

/* ---- snapshots ------------------------------------------------------------ */

int pg_save_snapshot(es_store *s, const char *stream, int64_t version,
                     int64_t schema_version, const char *state,
                     size_t state_len, es_error *err)
{
    pg_store *p = (pg_store *)s;
    char v[24], sv[24];
    const char *values[4];
    PGresult *res;

    es_buf_reset(&p->params);
    if (es_buf_add(&p->params, state, state_len) < 0 ||
        !es_buf_cstr(&p->params))
        return es_fail(err, ES_DATABASE, "out of memory");
    values[0] = stream;
    values[1] = i64(v, version);
    values[2] = i64(sv, schema_version);
    values[3] = p->params.data;
    res = pg_exec_prepared(p, PG_SNAPSHOT_SAVE, 4, values, 0, err);
    if (!res)
        return -1;
    PQclear(res);
    return 0;
}

int pg_load_snapshot(es_store *s, const char *stream, int64_t max_version,
                     int64_t schema_version, es_snapshot *out,
                     es_error *err)
{
    pg_store *p = (pg_store *)s;
    char mv[24], sv[24];
    const char *values[3];
    PGresult *r;

    values[0] = stream;
    values[1] = i64(mv, max_version > 0 ? max_version : INT64_MAX);
    values[2] = i64(sv, schema_version);
    PQclear(p->snapshot);
    p->snapshot = r = pg_exec_prepared(p, PG_SNAPSHOT_LOAD, 3, values, 1,
                                       err);
    if (!r)
        return -1;
    if (PQntuples(r) == 0)
        return 0;
    out->version = (int64_t)pg_be64(PQgetvalue(r, 0, 0));
    out->schema_version = (int64_t)pg_be64(PQgetvalue(r, 0, 1));
    out->state = PQgetvalue(r, 0, 2);
    out->state_len = (size_t)PQgetlength(r, 0, 2);
    es_time_format((int64_t)pg_be64(PQgetvalue(r, 0, 3)) + PG_EPOCH_USEC,
                   p->snapshot_time);
    out->recorded_at = p->snapshot_time;
    return 1;
}
