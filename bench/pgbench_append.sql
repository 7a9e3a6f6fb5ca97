-- One event per transaction through the schema's append() function, called
-- as a client calls it (prepared), to a new stream each call (categories per
-- client, as Message DB's category lock wants). scripts/bench.sh replaces
-- BENCH_SCHEMA. Measured against bench/pgbench_write_message.sql.
\set k random(1, 1000000000)
SELECT * FROM BENCH_SCHEMA.append('Bench' || :client_id || '-' || :k, -1, false,
  ARRAY[gen_random_uuid()], ARRAY['Ticked'], ARRAY['{"n": 1, "note": "hello"}'::json],
  ARRAY['{}'::json]);
