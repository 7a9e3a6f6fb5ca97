-- The bare table for the pgbench alternative: the events table's columns and
-- keys (unique id, unique (stream, version)), without position/txid/category
-- and without the append function. BENCH_SCHEMA is replaced by scripts/bench.sh.
DROP SCHEMA IF EXISTS BENCH_SCHEMA CASCADE;
CREATE SCHEMA BENCH_SCHEMA;
CREATE SEQUENCE BENCH_SCHEMA.bare_version;
CREATE TABLE BENCH_SCHEMA.bare (
  id uuid NOT NULL PRIMARY KEY,
  stream text NOT NULL,
  version bigint NOT NULL,
  type text NOT NULL,
  data json NOT NULL,
  metadata json NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (stream, version)
);
-- A floor for bench/pgbench_insert_pk.sql: the same row, only a primary key.
CREATE TABLE BENCH_SCHEMA.pk (
  position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id uuid NOT NULL,
  stream text NOT NULL,
  version bigint NOT NULL,
  type text NOT NULL,
  data json NOT NULL,
  metadata json NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now()
);
