-- A floor: one event per transaction into a table with only a primary key
-- (BENCH_SCHEMA.pk in bench/bare.sql): the heap row, one index entry that
-- always goes to the right edge, the commit.
INSERT INTO BENCH_SCHEMA.pk (id, stream, version, type, data, metadata)
VALUES (gen_random_uuid(), 'Bench' || :client_id, 1, 'Ticked', '{"n": 1, "note": "hello"}', '{}');
