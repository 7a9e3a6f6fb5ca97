-- The store's 100,000-event stream (bench/fold.lua's Fold-1) read on the
-- server alone, the same columns the store's stream reads take, in one
-- statement: the counterpart of bench/pgbench_get_stream_messages.sql
-- (pgbench discards the rows: no client decoding at all).
-- scripts/bench.sh replaces BENCH_SCHEMA.
SELECT position, id, version, type, data, metadata, recorded_at
  FROM BENCH_SCHEMA.events WHERE stream = 'Fold-1' AND version BETWEEN 1 AND 100000
 ORDER BY version;
