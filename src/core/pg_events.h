/* pg_events.h - the PostgreSQL store's event operations (pg_events.c):
 * append, version, stream and global reads, snapshots. */
#ifndef ES_PG_EVENTS_H
#define ES_PG_EVENTS_H

#include "store.h"

int pg_append(es_store *s, const char *stream, const es_event_in *ev,
              size_t n, int64_t expected, es_append_result *out,
              es_error *err);
/* pg_append inside the caller's transaction, then sql and COMMIT: one
 * round trip for one event on a single-node store (es_append_commit). */
int pg_append_commit(es_store *s, const char *stream, const es_event_in *ev,
                     size_t n, int64_t expected, const char *sql,
                     int nparams, const char *const *params,
                     es_append_result *out, es_rows **rows, es_error *err);
int pg_version(es_store *s, const char *stream, int64_t *out, es_error *err);
es_cursor *pg_read(es_store *s, const char *stream, const es_read_opts *o,
                   es_error *err);
int pg_save_snapshot(es_store *s, const char *stream, int64_t version,
                     int64_t schema_version, const char *state,
                     size_t state_len, es_error *err);
int pg_load_snapshot(es_store *s, const char *stream, int64_t max_version,
                     int64_t schema_version, es_snapshot *out,
                     es_error *err);
es_cursor *pg_read_all(es_store *s, const es_read_all_opts *o,
                       es_error *err);

#endif
