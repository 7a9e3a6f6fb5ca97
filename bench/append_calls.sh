# bench/append_calls.sh - sourced, not run: the plpgsql statement that makes
# one append, for the server figures of scripts/bench.sh (server_cpu) and
# bench/append_instructions.sh, so both measure the same thing.
#
#   append_call TARGET SCHEMA   prints it; TARGET es: append() with one
#                               event; es_one: the library's one-event INSERT
#                               (src/core/pg_events.c, PG_APPEND_ONE)
#
# It runs in a DO block's loop over i that declares s text, lo bigint,
# hi bigint (the versions the stream may be at: 0 and up, any), after uuid
# (the last event the caller names: none, NULL), pos bigint, ver bigint and
# at timestamptz; a new stream each time.
append_call() {
  local schema=$2 payload="'{\"n\": 1, \"note\": \"hello\"}'"
  case $1 in
    es) echo "PERFORM $schema.append('Cpu-' || i || '-' || random(), -1, false,
          ARRAY[gen_random_uuid()], ARRAY['Ticked'], ARRAY[$payload::json],
          ARRAY['{}'::json])" ;;
    es_one) echo "s := 'Cpu-' || i || '-' || random();
          INSERT INTO $schema.events (id, stream, version, type, data, metadata, category)
          SELECT gen_random_uuid(), s, l.cur + 1, 'Ticked', $payload::json, '{}'::json,
                 split_part(s, '-', 1)
            FROM (SELECT coalesce(e.version, 0) AS cur, e.txid, e.id FROM (VALUES (1)) AS one
                  LEFT JOIN LATERAL (SELECT version, txid, id FROM $schema.events
                    WHERE stream = s ORDER BY version DESC LIMIT 1) e ON true) l
           WHERE (l.txid IS NULL OR l.txid <= pg_current_xact_id())
             AND l.cur BETWEEN lo AND hi AND (after IS NULL OR l.id = after)
          RETURNING position, version, recorded_at INTO pos, ver, at" ;;
    *) return 2 ;;
  esac
}
