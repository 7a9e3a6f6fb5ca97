-- 100 events per transaction (one INSERT ... SELECT generate_series) into the
-- bare table. The alternative to bench/append.lua with SIZE 100.
INSERT INTO BENCH_SCHEMA.bare (id, stream, version, type, data, metadata)
SELECT gen_random_uuid(), 'Bench' || :client_id, nextval('BENCH_SCHEMA.bare_version'),
       'Ticked', ('{"n": ' || g || ', "note": "hello"}')::json, '{}'
  FROM generate_series(1, 100) AS g;
