/*
 * binding.h - the parts of the Lua binding and what they share.
 */
#ifndef ESL_BINDING_H
#define ESL_BINDING_H

#include "compat.h"
#include "eventsourcing.h"

/* errors.c: the error objects of the Lua contract (err.kind, err.message,
 * __tostring "kind: message"), and core.error(kind, message, fields). */
void errors_open(lua_State *L);
/* Pushes nil and the error table for err; returns 2 for `return`. */
int esl_push_error(lua_State *L, const es_error *err);
/* Pushes nil and an error table of the given kind and message. */
int esl_push_fail(lua_State *L, es_kind kind, const char *message);

/* clock.c: core.now, core.monotonic, core.sleep, core.time_parse,
 * core.time_format. */
void clock_open(lua_State *L);

/* process.c: core.fork, core.wait, core.kill, core.exit (rebuild
 * workers). */
void process_open(lua_State *L);

/* keyset.c: core.keyset (a set of strings outside the Lua heap). */
void keyset_open(lua_State *L);

/* lazy.c: read_all({ lazy = true }), events whose id and metadata are
 * made on first access. esl_lazy_push pushes a batch userdata, then the
 * metatable its events share. esl_lazy_add records event e (the table on
 * top) in batch b and gives it that metatable (at index mt): 0, or 1 when
 * it cannot be lazy (the caller then sets both fields at once); raises
 * on out-of-memory. */
typedef struct esl_lazy esl_lazy;
void lazy_open(lua_State *L);
esl_lazy *esl_lazy_push(lua_State *L);
int esl_lazy_add(lua_State *L, esl_lazy *b, int mt, const es_event *e);
/* metadata.schema_version read off the metadata's JSON text s[0..n) when
 * its top level names it once as a plain integer 1..2^53: 1 and *out;
 * else 0 (the caller decodes the metadata as usual). */
int esl_meta_schema_version(const char *s, size_t n, int64_t *out);

/* ids.c: core.uuid5 (name-based UUIDs). */
void ids_open(lua_State *L);

/* copy_text.c: rows[1..nrows] (the table at index rows) as COPY text for
 * the column names at cols[1..ncols], appended to out; flags is a table
 * column name -> ESL_COPY_JSON (the column takes JSON text) |
 * ESL_COPY_INT (an integral float goes as an integer). -1 with msg filled
 * (row and column named) when a value cannot be stored; the stack may
 * then hold extra values (the caller restores its top). */
#include "../core/buf.h"
#define ESL_COPY_JSON 1
#define ESL_COPY_INT 2
int esl_copy_text(lua_State *L, int rows, int cols, int flags,
                  size_t ncols, size_t nrows, es_buf *out, char *msg,
                  size_t msglen);

/* store.c: core.open and the store methods. */
void store_open(lua_State *L);

#endif
