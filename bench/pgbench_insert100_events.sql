-- 100 events per transaction (one INSERT ... SELECT generate_series) into a
-- copy of the store's events table (CREATE TABLE ... (LIKE events
-- INCLUDING ALL) in BENCH_SCHEMA: the same columns, identity, defaults and
-- four indexes), with no version check and no function: the floor for
-- bench/append.lua with SIZE 100 that the table's shape sets. Ids are
-- ordered in time like the library's UUID v7s (bench/pgbench_insert100.sql's
-- random ones land all over the id index).
INSERT INTO BENCH_SCHEMA.events (id, stream, version, type, data, metadata, category)
SELECT ('01900000-0000-7000-8000-' || lpad(to_hex(v), 12, '0'))::uuid,
       'Floor' || :client_id || '-1', v, 'Ticked',
       ('{"n": ' || g || ', "note": "hello"}')::json, '{}', 'Floor' || :client_id
  FROM (SELECT g, nextval('BENCH_SCHEMA.bare_version') AS v
          FROM generate_series(1, 100) AS g) AS s;
