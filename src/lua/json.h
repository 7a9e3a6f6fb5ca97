/*
 * json.h - the JSON codec, used by the store binding to turn event payloads
 * into JSON text and JSON text straight into Lua values on the stack.
 */
#ifndef ESL_JSON_H
#define ESL_JSON_H

#include "compat.h"
#include "../core/buf.h"

/* Deepest nesting of arrays/objects accepted by encode and decode. */
#define ESL_JSON_MAX_DEPTH 1000

/* Longest text encode writes (default 1 GiB, PostgreSQL's limit for one
 * json value): a table shared many times over is written out each time
 * (n levels of pairs make 2^n copies), and must end in an error, not in
 * the process running out of memory. Set once before any encode (the fuzz
 * harness lowers it to stay inside its memory and time limits); never
 * changed by the library. */
extern size_t esl_json_max_text;

/* Appends the JSON text of the value at idx to b. On failure returns -1 and
 * writes a message (without the "invalid: " prefix) to msg. Raises only on
 * out-of-memory. */
int esl_json_encode(lua_State *L, int idx, es_buf *b, char *msg,
                    size_t msglen);

/* esl_json_encode with the values of esl_json_context at ctx (encoding
 * many values: no registry lookups per value). */
int esl_json_encode_ctx(lua_State *L, int ctx, int idx, es_buf *b,
                        char *msg, size_t msglen);

/* Pushes the Lua value for the JSON text s[0..n). On failure pushes
 * nothing, returns -1 and writes a message with the byte offset to msg. */
int esl_json_decode(lua_State *L, const char *s, size_t n, char *msg,
                    size_t msglen);

/* Decoding many values: esl_json_context pushes the three values decode
 * needs from the registry (3 slots) and returns the index of the first;
 * esl_json_decode_ctx then decodes without looking them up again. */
int esl_json_context(lua_State *L);
int esl_json_decode_ctx(lua_State *L, int ctx, const char *s, size_t n,
                        char *msg, size_t msglen);

/* Registers es.json (encode, decode, array, object, null) in the table
 * at the top of the stack, under the key "json". */
void json_open(lua_State *L);

#endif
