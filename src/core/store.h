/*
 * store.h - what every store implementation provides. es_store and
 * es_cursor start with these structs; store.c dispatches the public API
 * through the vtable and owns reference counting.
 */
#ifndef ES_STORE_H
#define ES_STORE_H

#include "eventsourcing.h"

typedef struct es_store_ops {
    const char *kind;
    int (*migrate)(es_store *s, es_error *err);
    int (*append)(es_store *s, const char *stream, const es_event_in *ev,
                  size_t n, int64_t expected, es_append_result *out,
                  es_error *err);
    int (*version)(es_store *s, const char *stream, int64_t *out,
                   es_error *err);
    es_cursor *(*read)(es_store *s, const char *stream,
                       const es_read_opts *o, es_error *err);
    es_cursor *(*read_all)(es_store *s, const es_read_all_opts *o,
                           es_error *err);
    int (*save_snapshot)(es_store *s, const char *stream, int64_t version,
                         int64_t schema_version, const char *state,
                         size_t state_len, es_error *err);
    int (*load_snapshot)(es_store *s, const char *stream,
                         int64_t max_version, int64_t schema_version,
                         es_snapshot *out, es_error *err);
    es_rows *(*query)(es_store *s, const char *sql, int nparams,
                      const char *const *params, es_error *err);
    int (*begin)(es_store *s, es_error *err);
    int (*commit)(es_store *s, es_error *err);
    int (*rollback)(es_store *s, es_error *err);
    int (*set_timeouts)(es_store *s, int64_t statement_ms, int64_t lock_ms,
                        es_error *err);
    int (*listen)(es_store *s, es_error *err);
    int (*wait)(es_store *s, int timeout_ms, es_error *err);
    int (*status)(es_store *s, es_store_status *out, es_error *err);
    int (*in_transaction)(const es_store *s);   /* NULL: never */
    void (*disconnect)(es_store *s);   /* close: drop connection/data */
    void (*destroy)(es_store *s);      /* free the struct itself */
    /* optional (NULL: not supported by this kind of store) */
    int (*distribute)(es_store *s, int shards, es_error *err);
    int (*info)(es_store *s, es_store_info *out, es_error *err);
    int (*copy)(es_store *s, const char *schema, const char *table,
                const char *const *columns,
                size_t ncolumns, const char *data, size_t len,
                int64_t *count, es_error *err);
    int (*copy_wait)(es_store *s, int64_t *count, es_error *err);
    int (*query_commit)(es_store *s, const char *sql, int nparams,
                        const char *const *params, es_rows **rows,
                        es_error *err);   /* rows: NULL, or gets them */
    int (*query_ahead)(es_store *s, const char *sql, int nparams,
                       const char *const *params, es_error *err);
    es_rows *(*ahead_rows)(es_store *s, es_error *err);
    int (*append_commit)(es_store *s, const char *stream,
                         const es_event_in *ev, size_t n, int64_t expected,
                         const char *sql, int nparams,
                         const char *const *params, es_append_result *out,
                         es_rows **rows, es_error *err);
} es_store_ops;

struct es_store {
    const es_store_ops *ops;
    const char *schema;   /* NULL when the store has none */
    const char *pooler;   /* es_open_opts.pooler as understood; NULL: none */
    int refs;          /* 1 for the owner + 1 per live cursor */
    int closed;
};

typedef struct es_cursor_ops {
    int (*next)(es_cursor *c, es_event *out, es_error *err);
    const char *(*checkpoint)(es_cursor *c);
    void (*destroy)(es_cursor *c);
} es_cursor_ops;

struct es_cursor {
    const es_cursor_ops *ops;
    es_store *store;
};

/* Implementations. */
es_store *es_memory_open(const char *name, es_error *err);
es_store *es_pg_open(const char *target, const es_open_opts *o,
                     es_error *err);

/* Shared helpers for implementations. */
int es_valid_stream(const char *stream, es_error *err);
int es_valid_event_type(const char *type, es_error *err);
/* An append refused because the stream's last event (at version actual)
 * is not the one es_event_in.after names: ES_CONFLICT, reason
 * ES_REASON_LAST_ID; then is added to the message. Returns -1. */
int es_last_id_conflict(es_error *err, const char *stream, int64_t expected,
                        int64_t actual, const char *then);
/* UUIDs and time have their own headers: es_uuid.h, es_time.h. */

#endif
