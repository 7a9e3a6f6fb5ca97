-- One event per transaction into the copy of the store's events table
-- (scripts/bench.sh makes it in BENCH_SCHEMA: the same columns, identity,
-- defaults and four indexes), with no version read, no checks and no
-- function: the floor the table's shape sets for
-- bench/pgbench_append_one.sql (the same payload, random ids and new
-- streams; the version from a sequence, so a stream name drawn twice
-- cannot collide).
\set k random(1, 1000000000)
INSERT INTO BENCH_SCHEMA.events (id, stream, version, type, data, metadata, category)
VALUES (gen_random_uuid(), 'Bench' || :client_id || '-' || :k, nextval('BENCH_SCHEMA.bare_version'),
        'Ticked', '{"n": 1, "note": "hello"}', '{}', 'Bench' || :client_id)
RETURNING position, version, recorded_at;
