-- Message DB's write_message, one message per transaction, to a new stream
-- each call: the same payload, ids and stream names as
-- bench/pgbench_append.sql. Run with search_path = message_store.
\set k random(1, 1000000000)
SELECT write_message(gen_random_uuid()::text, 'bench' || :client_id || '-' || :k,
  'Ticked', '{"n": 1, "note": "hello"}', '{}');
