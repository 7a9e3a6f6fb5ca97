-- One event per transaction as the library sends it when it makes the id
-- (src/core/pg_events.c, PG_APPEND_ONE: append()'s checks in one prepared
-- INSERT, no function call), to a new stream each call, expected version
-- -1 (any), sent as the range of versions the stream may be at (0 and up).
-- The library's check of the last event a cached state names
-- (expected_last_id) is a parameter that is NULL for such an append; here
-- its place holds a NULL literal, which the planner folds away.
-- scripts/bench.sh replaces BENCH_SCHEMA. Same payload, ids and streams as
-- bench/pgbench_append.sql and pgbench_write_message.sql.
\set k random(1, 1000000000)
\set low 0
\set high 9223372036854775807
INSERT INTO BENCH_SCHEMA.events (id, stream, version, type, data, metadata, category)
SELECT gen_random_uuid(), 'Bench' || :client_id || '-' || :k, l.cur + 1, 'Ticked',
       '{"n": 1, "note": "hello"}'::json, '{}'::json,
       split_part('Bench' || :client_id || '-' || :k, '-', 1)
  FROM (SELECT coalesce(e.version, 0) AS cur, e.txid, e.id FROM (VALUES (1)) AS one
        LEFT JOIN LATERAL (SELECT version, txid, id FROM BENCH_SCHEMA.events
                            WHERE stream = 'Bench' || :client_id || '-' || :k
                            ORDER BY version DESC LIMIT 1) e ON true) l
 WHERE (l.txid IS NULL OR l.txid <= pg_current_xact_id())
   AND l.cur BETWEEN :low::bigint AND :high::bigint
   AND (NULL::uuid IS NULL OR l.id = NULL::uuid)
RETURNING position, version, recorded_at;
