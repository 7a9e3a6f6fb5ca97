-- One event per transaction into the bare table (scripts/bench.sh replaces
-- BENCH_SCHEMA). The alternative to bench/append.lua with SIZE 1.
INSERT INTO BENCH_SCHEMA.bare (id, stream, version, type, data, metadata)
VALUES (gen_random_uuid(), 'Bench' || :client_id, nextval('BENCH_SCHEMA.bare_version'),
        'Ticked', '{"n": 1, "note": "hello"}', '{}');
