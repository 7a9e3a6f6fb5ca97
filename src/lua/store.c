/*
 * store.c - the Lua face of es_store: core.open and the store methods
 * (migrate, append, read, version, read_all, fold, query, transactions,
 * close).
 *
 * Memory rules: everything C holds while Lua code may run (an encode that
 * raises on out-of-memory, a fold handler that errors) is owned by a
 * userdata: scratch buffers live in the store userdata, cursors in a
 * cursor userdata whose __gc frees them.
 */
#include "binding.h"
#include "json.h"
#include "../core/buf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char STORE_MT[] = "eventsourcing.store";
static const char ROWS_MT[] = "eventsourcing.rows";
static const char CURSOR_MT[] = "eventsourcing.cursor";

typedef struct lstore {
    es_store *s;
    es_buf json;     /* encoded payloads of one append */
    es_buf scratch;  /* es_event_in / pointer arrays of one call */
} lstore;

typedef struct lcursor {
    es_cursor *c;
} lcursor;

/* ---- helpers ---------------------------------------------------------- */

static lstore *check_store(lua_State *L)
{
    lstore *ls = (lstore *)luaL_checkudata(L, 1, STORE_MT);
    if (!ls->s)
        luaL_error(L, "attempt to use a closed store");
    return ls;
}

/* Like luaL_checkstring, but a number is a mistake here, not a stream
 * name: "42" and 42 are different things to a caller. */
static const char *check_strict_string(lua_State *L, int idx)
{
    size_t len;
    const char *s;
    if (lua_type(L, idx) != LUA_TSTRING)
        esl_typeerror(L, idx, "string");
    s = lua_tolstring(L, idx, &len);
    /* C sees a string up to its first NUL: "a\0b" would quietly become
     * "a". Such a name is never what the caller meant. */
    if (strlen(s) != len)
        luaL_argerror(L, idx, "string contains a NUL byte");
    return s;
}

/* An event's string field (type, id) with no NUL byte, anchored in the
 * table at `anchor` (slot k) so that it outlives the append even when it
 * came from an __index metamethod. NULL with msg filled when unusable. */
static const char *event_string(lua_State *L, int e, const char *field,
                                int anchor, int k, int required, size_t i,
                                char *msg, size_t msglen)
{
    size_t len;
    const char *s;
    lua_getfield(L, e, field);
    if (lua_isnil(L, -1) && !required) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING) {
        snprintf(msg, msglen, "event %zu: %s must be a string, got %s",
                 i + 1, field, luaL_typename(L, -1));
        lua_pop(L, 1);
        return NULL;
    }
    s = lua_tolstring(L, -1, &len);
    if (strlen(s) != len) {
        snprintf(msg, msglen, "event %zu: %s contains a NUL byte", i + 1,
                 field);
        lua_pop(L, 1);
        return NULL;
    }
    lua_rawseti(L, anchor, k);
    return s;
}

static void check_opts(lua_State *L, int idx)
{
    if (!lua_isnoneornil(L, idx))
        luaL_checktype(L, idx, LUA_TTABLE);
}

/* Optional integer field of the options table at idx (>= 0). Raises when it
 * is there but not an integer: a wrong type is a programming mistake. */
static int64_t opt_int_field(lua_State *L, int idx, const char *name,
                             int64_t def)
{
    long long v;
    if (lua_isnoneornil(L, idx))
        return def;
    lua_getfield(L, idx, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    if (!esl_toint64(L, -1, &v))
        luaL_error(L, "option '%s' must be an integer, got %s", name,
                   luaL_typename(L, -1));
    lua_pop(L, 1);
    return (int64_t)v;
}

static const char *opt_string_field(lua_State *L, int idx, const char *name)
{
    const char *s;
    size_t len;
    if (lua_isnoneornil(L, idx))
        return NULL;
    lua_getfield(L, idx, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "option '%s' must be a string, got %s", name,
                   luaL_typename(L, -1));
    s = lua_tolstring(L, -1, &len);
    if (strlen(s) != len)
        luaL_error(L, "option '%s' contains a NUL byte", name);
    /* The string stays referenced by the options table, so the pointer
     * stays valid while that table is on the stack. */
    lua_pop(L, 1);
    return s;
}

static int opt_bool_field(lua_State *L, int idx, const char *name)
{
    int v;
    if (lua_isnoneornil(L, idx))
        return 0;
    lua_getfield(L, idx, name);
    v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* Raises the error table of err: used where a Lua iterator cannot return
 * nil, err (a failure between pages of a read). */
static int raise_error(lua_State *L, const es_error *err)
{
    esl_push_error(L, err);
    lua_remove(L, -2);
    return lua_error(L);
}

/* ---- events to Lua ---------------------------------------------------- */

/* ctx: an esl_json_context, or 0 to look its values up. */
static void push_json_field(lua_State *L, int ctx, const char *text,
                            size_t len, const char *field)
{
    char msg[160];
    if ((ctx ? esl_json_decode_ctx(L, ctx, text, len, msg, sizeof msg)
             : esl_json_decode(L, text, len, msg, sizeof msg)) < 0)
        luaL_error(L, "stored %s is not valid JSON: %s", field, msg);
}

static void set_string(lua_State *L, const char *key, const char *value)
{
    lua_pushstring(L, value);
    lua_setfield(L, -2, key);
}

static void set_int(lua_State *L, const char *key, int64_t value)
{
    esl_pushint64(L, value);
    lua_setfield(L, -2, key);
}

/* The event table's keys, pushed once per call that builds many events:
 * lua_setfield would intern each key again for every event. */
static const char *const event_keys[] = {
    "id", "stream", "type", "version", "position", "data", "metadata",
    "recorded_at"
};
#define NKEYS ((int)(sizeof event_keys / sizeof event_keys[0]))

/* A string field that often repeats from one event to the next (the
 * events of one append share their recorded_at, and often their stream;
 * a log has few types): the last one's Lua string kept in a stack slot
 * and pushed again when the bytes match, rather than hashed and interned
 * once more for each event. */
typedef struct str_memo {
    int slot;           /* stack index of the last string, or 0: off */
    size_t len;         /* its length; SIZE_MAX: none yet */
    char text[64];
} str_memo;

enum { MEMO_STREAM, MEMO_TYPE, MEMO_AT, NMEMO };

static void push_memo(lua_State *L, str_memo *m, const char *s, size_t len)
{
    if (!m->slot) {
        lua_pushlstring(L, s, len);
        return;
    }
    if (len == m->len && memcmp(s, m->text, len) == 0) {
        lua_pushvalue(L, m->slot);
        return;
    }
    lua_pushlstring(L, s, len);
    if (len <= sizeof m->text) {
        memcpy(m->text, s, len);
        m->len = len;
        lua_pushvalue(L, -1);
        lua_replace(L, m->slot);
    }
}

typedef struct event_ctx {
    int json;   /* esl_json_context, or 0 */
    int keys;   /* first of NKEYS key strings on the stack, or 0 */
    int stream; /* the stream name when every event has it (fold), or 0 */
    int type;   /* the current event's type string, or 0 */
    esl_lazy *lazy; /* read_all's lazy = true: the batch, or NULL */
    int lazy_mt;    /* its events' metatable on the stack */
    str_memo memo[NMEMO];   /* off unless memo_on */
} event_ctx;

/* Turns the string memos of c on (one stack slot each). */
static void memo_on(lua_State *L, event_ctx *c)
{
    luaL_checkstack(L, NMEMO, "event strings");
    for (int i = 0; i < NMEMO; i++) {
        lua_pushnil(L);
        c->memo[i].slot = lua_gettop(L);
        c->memo[i].len = (size_t)-1;
    }
}

static event_ctx event_context(lua_State *L)
{
    event_ctx c;
    c.json = esl_json_context(L);
    luaL_checkstack(L, NKEYS, "event keys");
    c.keys = lua_gettop(L) + 1;
    for (int i = 0; i < NKEYS; i++)
        lua_pushstring(L, event_keys[i]);
    c.stream = c.type = 0;
    c.lazy = NULL;
    c.lazy_mt = 0;
    for (int i = 0; i < NMEMO; i++)
        c.memo[i].slot = 0;
    return c;
}

/* Pushes key i of the event table; its value follows, then rawset. */
static void push_key(lua_State *L, const event_ctx *c, int i)
{
    if (c && c->keys)
        lua_pushvalue(L, c->keys + i);
    else
        lua_pushstring(L, event_keys[i]);
}

/* Pushes an event table (README.md, "Stores"); c may be NULL. Strings go through
 * lua_pushlstring: lua_pushstring consults Lua 5.4's C-string cache with
 * a strcmp each time, for strings we know the length of anyway. */
static void push_event(lua_State *L, const es_event *e, event_ctx *c)
{
    int json = c ? c->json : 0;
    lua_createtable(L, 0, NKEYS);
    /* lazy: id and metadata stay in the batch until asked for (lazy.c) */
    int eager = !(c && c->lazy) || esl_lazy_add(L, c->lazy, c->lazy_mt, e);
    if (eager) {
        push_key(L, c, 0);
        lua_pushlstring(L, e->id, 36);
        lua_rawset(L, -3);
    }
    push_key(L, c, 1);
    if (c && c->stream)
        lua_pushvalue(L, c->stream);
    else if (c)
        push_memo(L, &c->memo[MEMO_STREAM], e->stream, strlen(e->stream));
    else
        lua_pushstring(L, e->stream);
    lua_rawset(L, -3);
    push_key(L, c, 2);
    if (c && c->type)
        lua_pushvalue(L, c->type);
    else if (c)
        push_memo(L, &c->memo[MEMO_TYPE], e->type, strlen(e->type));
    else
        lua_pushstring(L, e->type);
    lua_rawset(L, -3);
    push_key(L, c, 3);
    esl_pushint64(L, e->version);
    lua_rawset(L, -3);
    push_key(L, c, 4);
    esl_pushint64(L, e->position);
    lua_rawset(L, -3);
    push_key(L, c, 5);
    push_json_field(L, json, e->data, e->data_len, "data");
    lua_rawset(L, -3);
    if (eager) {
        push_key(L, c, 6);
        push_json_field(L, json, e->metadata, e->metadata_len, "metadata");
        lua_rawset(L, -3);
    }
    push_key(L, c, 7);
    if (c)
        push_memo(L, &c->memo[MEMO_AT], e->recorded_at, strlen(e->recorded_at));
    else
        lua_pushlstring(L, e->recorded_at, strlen(e->recorded_at));
    lua_rawset(L, -3);
}

/* ---- open / close / migrate ------------------------------------------ */

static int l_open(lua_State *L)
{
    const char *target = check_strict_string(L, 1);
    es_open_opts o;
    es_error err;
    lstore *ls;

    check_opts(L, 2);
    o.schema = opt_string_field(L, 2, "schema");
    o.pooler = opt_string_field(L, 2, "pooler");
    ls = (lstore *)esl_newuserdata(L, sizeof *ls);
    ls->s = NULL;
    es_buf_init(&ls->json);
    es_buf_init(&ls->scratch);
    luaL_getmetatable(L, STORE_MT);
    lua_setmetatable(L, -2);
    ls->s = es_open_with(target, &o, &err);
    if (!ls->s)
        return esl_push_error(L, &err);
    {
        int64_t st = opt_int_field(L, 2, "statement_timeout", 0);
        int64_t lk = opt_int_field(L, 2, "lock_timeout", 0);
        if ((st || lk) && es_set_timeouts(ls->s, st, lk, &err) < 0) {
            es_close(ls->s);
            ls->s = NULL;
            return esl_push_error(L, &err);
        }
    }
    return 1;
}

/* __gc and __close: closes, dropping the error of a copy sent without
 * waiting (a finalizer must not raise; store:close() reports it). */
static int l_gc(lua_State *L)
{
    lstore *ls = (lstore *)luaL_checkudata(L, 1, STORE_MT);
    if (ls->s) {
        es_close(ls->s);
        ls->s = NULL;
    }
    es_buf_free(&ls->json);
    es_buf_free(&ls->scratch);
    return 0;
}

/* store:close() -> true | nil, err: a copy sent without waiting
 * (copy_rows wait = false) that failed and was not reported yet; the
 * store is closed either way. */
static int l_close(lua_State *L)
{
    lstore *ls = (lstore *)luaL_checkudata(L, 1, STORE_MT);
    es_error err;
    int rc = 0;
    if (ls->s) {
        rc = es_close_checked(ls->s, &err);
        ls->s = NULL;
    }
    l_gc(L);
    if (rc < 0)
        return esl_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_tostring(lua_State *L)
{
    lstore *ls = (lstore *)luaL_checkudata(L, 1, STORE_MT);
    if (ls->s)
        lua_pushfstring(L, "eventsourcing store (%s): %p",
                        es_store_kind(ls->s), (void *)ls);
    else
        lua_pushfstring(L, "eventsourcing store (closed): %p", (void *)ls);
    return 1;
}

static int l_kind(lua_State *L)
{
    lua_pushstring(L, es_store_kind(check_store(L)->s));
    return 1;
}

static int l_schema(lua_State *L)
{
    const char *schema = es_store_schema(check_store(L)->s);
    if (schema)
        lua_pushstring(L, schema);
    else
        lua_pushnil(L);
    return 1;
}

/* store:migrate([{ distributed = true, shards = n }]): distributed lays
 * the schema out for Citus after the usual steps (docs/scale-out.md). */
static int l_migrate(lua_State *L)
{
    es_store *s = check_store(L)->s;
    int distributed;
    int64_t shards;
    es_error err;

    check_opts(L, 2);
    distributed = opt_bool_field(L, 2, "distributed");
    shards = opt_int_field(L, 2, "shards", 0);
    if (shards < 0 || shards > 4096)
        return luaL_error(L, "option 'shards' must be 1..4096");
    if (!distributed && shards)
        return luaL_error(L, "option 'shards' needs distributed = true");
    if (es_migrate(s, &err) < 0)
        return esl_push_error(L, &err);
    if (distributed && es_distribute(s, (int)shards, &err) < 0)
        return esl_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

/* store:info() -> { kind, citus = version|nil, distributed, shards } */
static int l_info(lua_State *L)
{
    es_store_info info;
    es_error err;

    if (es_store_info_get(check_store(L)->s, &info, &err) < 0)
        return esl_push_error(L, &err);
    lua_createtable(L, 0, 4);
    lua_pushstring(L, info.kind);
    lua_setfield(L, -2, "kind");
    if (info.citus) {
        lua_pushstring(L, info.citus);
        lua_setfield(L, -2, "citus");
    }
    lua_pushboolean(L, info.distributed);
    lua_setfield(L, -2, "distributed");
    lua_pushinteger(L, info.shards);
    lua_setfield(L, -2, "shards");
    return 1;
}

/* ---- append ----------------------------------------------------------- */

/* expected_version: es.ANY / es.NO_STREAM / es.STREAM_EXISTS or an
 * integer >= 0. Returns 0, or -1 with a message for a bad value. */
static int read_expected(lua_State *L, int opts, int64_t *out, char *msg,
                         size_t msglen)
{
    long long v;
    *out = ES_ANY;
    if (lua_isnoneornil(L, opts))
        return 0;
    lua_getfield(L, opts, "expected_version");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    if (lua_type(L, -1) == LUA_TSTRING) {
        const char *s = lua_tostring(L, -1);
        if (strcmp(s, "any") == 0) *out = ES_ANY;
        else if (strcmp(s, "no_stream") == 0) *out = ES_NO_STREAM;
        else if (strcmp(s, "stream_exists") == 0) *out = ES_STREAM_EXISTS;
        else {
            snprintf(msg, msglen, "expected_version '%.40s' is not one of "
                     "es.ANY, es.NO_STREAM, es.STREAM_EXISTS or an integer", s);
            lua_pop(L, 1);
            return -1;
        }
    } else if (esl_toint64(L, -1, &v)) {
        if (v < 0) {
            snprintf(msg, msglen, "expected_version must not be negative");
            lua_pop(L, 1);
            return -1;
        }
        *out = v;
    } else {
        luaL_error(L, "option 'expected_version' must be a string constant "
                   "or an integer, got %s", luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return 0;
}

/* Encodes the metadata of one event: the per-call metadata (at call_meta,
 * or 0) with the event's own keys (at ev_meta, or 0) laid over it. */
static int encode_metadata(lua_State *L, lstore *ls, int call_meta,
                           int ev_meta, char *msg, size_t msglen)
{
    int idx;
    if (call_meta && ev_meta) {
        lua_newtable(L);
        for (int src = 0; src < 2; src++) {
            lua_pushnil(L);
            while (lua_next(L, src ? ev_meta : call_meta)) {
                lua_pushvalue(L, -2);
                lua_insert(L, -2);
                lua_rawset(L, -4);
            }
        }
        idx = lua_gettop(L);
    } else if (call_meta || ev_meta) {
        lua_pushvalue(L, call_meta ? call_meta : ev_meta);
        idx = lua_gettop(L);
    } else {
        return es_buf_add(&ls->json, "{}", 2) < 0 ? -1 : 0;
    }
    int rc = esl_json_encode(L, idx, &ls->json, msg, msglen);
    lua_pop(L, 1);
    return rc;
}

typedef struct span {
    size_t data, data_len, meta, meta_len;
} span;

/* Reads and encodes the event at the top of the stack into ls->json and
 * fills in ev (except the data/metadata pointers, fixed up later because
 * the buffer may move). Events without metadata of their own share one
 * encoding of the call's metadata (`shared`, meta_len 0 until made). */
static int encode_event(lua_State *L, lstore *ls, int call_meta, int anchor,
                        size_t i, es_event_in *ev, span *sp, span *shared,
                        char *msg, size_t msglen)
{
    int e = lua_gettop(L);
    char inner[200];

    if (!lua_istable(L, e)) {
        snprintf(msg, msglen, "event %zu must be a table, got %s", i + 1,
                 luaL_typename(L, e));
        return -1;
    }
    ev->type = event_string(L, e, "type", anchor, (int)(2 * i + 1), 1, i,
                            msg, msglen);
    if (!ev->type)
        return -1;
    msg[0] = '\0';
    ev->id = event_string(L, e, "id", anchor, (int)(2 * i + 2), 0, i, msg,
                          msglen);
    if (!ev->id && msg[0])
        return -1;

    sp->data = ls->json.len;
    lua_getfield(L, e, "data");
    if (lua_isnil(L, -1)) {
        if (es_buf_add(&ls->json, "{}", 2) < 0)
            return luaL_error(L, "out of memory");
    } else if (!lua_istable(L, -1)) {
        /* readers (handlers, read models) index data: a bare string or
         * number would break every one of them later, far from here */
        snprintf(msg, msglen, "event %zu (%s): data must be a table, got %s",
                 i + 1, ev->type, luaL_typename(L, -1));
        return -1;
    } else if (esl_json_encode(L, -1, &ls->json, inner, sizeof inner) < 0) {
        snprintf(msg, msglen, "event %zu (%s): data %s", i + 1, ev->type,
                 inner);
        return -1;
    }
    lua_pop(L, 1);
    sp->data_len = ls->json.len - sp->data;

    sp->meta = ls->json.len;
    lua_getfield(L, e, "metadata");
    if (!lua_isnil(L, -1) && !lua_istable(L, -1)) {
        snprintf(msg, msglen, "event %zu: metadata must be a table, got %s",
                 i + 1, luaL_typename(L, -1));
        return -1;
    }
    int own = !lua_isnil(L, -1);
    if (!own && shared->meta_len) {
        sp->meta = shared->meta;
        sp->meta_len = shared->meta_len;
        lua_pop(L, 1);
        return 0;
    }
    if (encode_metadata(L, ls, call_meta, own ? lua_gettop(L) : 0,
                        inner, sizeof inner) < 0) {
        snprintf(msg, msglen, "event %zu (%s): metadata %s", i + 1, ev->type,
                 inner);
        return -1;
    }
    lua_pop(L, 1);
    sp->meta_len = ls->json.len - sp->meta;
    if (!own)
        *shared = *sp;
    return 0;
}

static const char *param_text(lua_State *L, lstore *ls, int idx, int pnum,
                              size_t *off, int *is_null);
static int push_rows(lua_State *L, es_rows **holder);
static int push_rows_json(lua_State *L, es_rows **holder, es_buf *b);
static es_rows **new_holder(lua_State *L);

/* nil, err for a refused argument; with commit_with the transaction
 * ends anyway (rolled back), as every other outcome of that call ends it. */
static int append_refused(lua_State *L, lstore *ls, int with, const char *msg)
{
    if (with) {
        es_error ignored;
        es_rollback(ls->s, &ignored);
    }
    return esl_push_fail(L, ES_INVALID, msg);
}

/* opts.commit_with = { sql = ..., n = count, json_rows = bool, params... }
 * (the shape a read model leaves a deferred write in): its statement,
 * count and json_rows (the rows as JSON texts: push_rows_json), or -1 with
 * msg. */
static int read_commit_with(lua_State *L, int with, const char **sql,
                            int *np, int *json_rows, char *msg,
                            size_t msglen)
{
    lua_getfield(L, with, "sql");
    if (lua_type(L, -1) != LUA_TSTRING) {
        snprintf(msg, msglen, "option 'commit_with' needs sql (a string), "
                 "got %s", luaL_typename(L, -1));
        return -1;
    }
    *sql = lua_tostring(L, -1);     /* anchored by the table */
    lua_pop(L, 1);
    lua_getfield(L, with, "n");
    if (lua_isnil(L, -1))
        *np = (int)esl_rawlen(L, with);
    else {
        long long v;
        if (!lua_isnumber(L, -1) || !esl_toint64(L, -1, &v) || v < 0 ||
            v > 65535) {
            snprintf(msg, msglen, "option 'commit_with': n must be a "
                     "parameter count from 0 to 65535");
            return -1;
        }
        *np = (int)v;
    }
    lua_pop(L, 1);
    lua_getfield(L, with, "json_rows");
    if (!lua_isnil(L, -1) && !lua_isboolean(L, -1)) {
        snprintf(msg, msglen, "option 'commit_with': json_rows must be a "
                 "boolean, got %s", luaL_typename(L, -1));
        return -1;
    }
    *json_rows = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return 0;
}

/* The text of commit_with's parameters (after the events' JSON in
 * ls->json): offs[i] is set for those written there. 0 or -1 (msg). */
static int commit_params(lua_State *L, lstore *ls, int with, int np,
                         const char **qp, size_t *offs, int *nulls,
                         char *msg, size_t msglen)
{
    for (int i = 0; i < np; i++) {
        lua_rawgeti(L, with, i + 1);
        if (lua_type(L, -1) == LUA_TSTRING &&
            strlen(lua_tostring(L, -1)) != esl_rawlen(L, -1)) {
            snprintf(msg, msglen, "commit_with parameter %d contains a NUL "
                     "byte", i + 1);
            return -1;
        }
        switch (lua_type(L, -1)) {
        case LUA_TNIL: case LUA_TBOOLEAN: case LUA_TSTRING: case LUA_TNUMBER:
            break;
        default: {
            /* one JSON cannot hold: refused here, where the transaction
             * can still be ended (param_text would raise) */
            char inner[200];
            size_t at = ls->json.len;
            int bad = esl_json_encode(L, lua_gettop(L), &ls->json, inner,
                                      sizeof inner) < 0;
            ls->json.len = at;
            if (bad) {
                snprintf(msg, msglen, "commit_with parameter %d: %s", i + 1,
                         inner);
                return -1;
            }
        }
        }
        offs[i] = (size_t)-1;
        /* a string stays anchored by the table */
        qp[i] = param_text(L, ls, lua_gettop(L), i + 1, &offs[i], &nulls[i]);
        lua_pop(L, 1);
    }
    return 0;
}

static int l_append(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *stream = check_strict_string(L, 2);
    int64_t expected;
    int call_meta = 0, single, anchor, new_ids = 0, with = 0, np = 0;
    int json_rows = 0;
    span shared = {0, 0, 0, 0};
    size_t n, *qoffs = NULL;
    char msg[300];
    const char *sql = NULL, **qp = NULL, *after = NULL;
    int *qnulls = NULL;
    es_event_in *evs;
    span *spans;
    es_append_result res;
    es_rows **rows = NULL;
    es_error err;

    luaL_checktype(L, 3, LUA_TTABLE);
    check_opts(L, 4);
    lua_settop(L, 4);
    if (!lua_isnil(L, 4)) {
        lua_getfield(L, 4, "commit_with");
        if (lua_istable(L, -1))
            with = lua_gettop(L);
        else if (!lua_isnil(L, -1))
            return luaL_error(L, "option 'commit_with' must be a table, got "
                              "%s", luaL_typename(L, -1));
        if (with && read_commit_with(L, with, &sql, &np, &json_rows, msg,
                                     sizeof msg) < 0)
            return append_refused(L, ls, with, msg);
    }
    if (read_expected(L, 4, &expected, msg, sizeof msg) < 0)
        return append_refused(L, ls, with, msg);
    if (!lua_isnil(L, 4)) {
        lua_getfield(L, 4, "expected_last_id");
        if (lua_type(L, -1) == LUA_TSTRING) {
            size_t len;
            after = lua_tolstring(L, -1, &len);     /* anchored by opts */
            if (strlen(after) != len)
                return append_refused(L, ls, with, "expected last id "
                                      "contains a NUL byte");
        } else if (!lua_isnil(L, -1)) {
            snprintf(msg, sizeof msg, "option 'expected_last_id' must be a "
                     "string (a UUID), got %s", luaL_typename(L, -1));
            return append_refused(L, ls, with, msg);
        }
        lua_pop(L, 1);
        lua_getfield(L, 4, "new_ids");
        if (lua_isboolean(L, -1))
            new_ids = lua_toboolean(L, -1);
        else if (!lua_isnil(L, -1))
            return luaL_error(L, "option 'new_ids' must be a boolean, got %s",
                              luaL_typename(L, -1));
        lua_pop(L, 1);
        lua_getfield(L, 4, "metadata");
        if (lua_istable(L, -1))
            call_meta = lua_gettop(L);
        else if (!lua_isnil(L, -1))
            return luaL_error(L, "option 'metadata' must be a table, got %s",
                              luaL_typename(L, -1));
    }

    /* One event ({type = ...}) or an array of them. */
    lua_getfield(L, 3, "type");
    single = !lua_isnil(L, -1);
    lua_pop(L, 1);
    n = single ? 1 : esl_rawlen(L, 3);
    if (n == 0)
        return append_refused(L, ls, with, "append needs at least one event");

    es_buf_reset(&ls->json);
    es_buf_reset(&ls->scratch);
    /* the events, then commit_with's parameters: pointers, offsets, nulls */
    if (es_buf_reserve(&ls->scratch, n * (sizeof *evs + sizeof *spans) +
                       (size_t)np * (sizeof *qp + sizeof *qoffs +
                                     sizeof *qnulls)) < 0)
        return luaL_error(L, "out of memory");
    lua_createtable(L, (int)(2 * n), 0);   /* anchors type and id strings */
    anchor = lua_gettop(L);
    evs = (es_event_in *)(void *)ls->scratch.data;
    spans = (span *)(void *)(evs + n);
    qp = (const char **)(void *)(spans + n);
    qoffs = (size_t *)(void *)(qp + np);
    qnulls = (int *)(void *)(qoffs + np);
    for (size_t i = 0; i < n; i++) {
        if (single)
            lua_pushvalue(L, 3);
        else
            lua_rawgeti(L, 3, (int)(i + 1));
        if (encode_event(L, ls, call_meta, anchor, i, &evs[i], &spans[i],
                         &shared, msg, sizeof msg) < 0)
            return append_refused(L, ls, with, msg);
        lua_pop(L, 1);
    }
    if (with && commit_params(L, ls, with, np, qp, qoffs, qnulls, msg,
                              sizeof msg) < 0)
        return append_refused(L, ls, with, msg);
    /* ls->json has stopped moving: pointers into it now */
    for (size_t i = 0; i < n; i++) {
        evs[i].data = ls->json.data + spans[i].data;
        evs[i].data_len = spans[i].data_len;
        evs[i].metadata = ls->json.data + spans[i].meta;
        evs[i].metadata_len = spans[i].meta_len;
        evs[i].new_id = new_ids && evs[i].id;
        evs[i].after = i == 0 ? after : NULL;
    }
    for (int i = 0; i < np; i++)
        if (!qp[i] && !qnulls[i])
            qp[i] = ls->json.data + qoffs[i];
    if (with) {
        rows = new_holder(L);
        if (es_append_commit(ls->s, stream, evs, n, expected, sql, np, qp,
                             &res, rows, &err) < 0)
            return esl_push_error(L, &err);
    } else if (es_append(ls->s, stream, evs, n, expected, &res, &err) < 0)
        return esl_push_error(L, &err);
    lua_createtable(L, 0, 4);
    set_int(L, "version", res.version);
    set_int(L, "position", res.position);
    set_string(L, "recorded_at", res.recorded_at);
    if (res.idempotent) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "idempotent");
    }
    if (res.one_trip) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "one_trip");
    }
    if (rows && *rows) {
        /* ls->json held the events' text, sent by now */
        if (json_rows)
            push_rows_json(L, rows, &ls->json);
        else
            push_rows(L, rows);
        lua_setfield(L, -2, "rows");
    }
    return 1;
}

static int l_version(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *stream = check_strict_string(L, 2);
    int64_t v;
    es_error err;
    if (es_stream_version(ls->s, stream, &v, &err) < 0)
        return esl_push_error(L, &err);
    esl_pushint64(L, v);
    return 1;
}

/* ---- cursors ---------------------------------------------------------- */

static lcursor *new_cursor(lua_State *L)
{
    lcursor *lc = (lcursor *)esl_newuserdata(L, sizeof *lc);
    lc->c = NULL;
    luaL_getmetatable(L, CURSOR_MT);
    lua_setmetatable(L, -2);
    return lc;
}

static int cursor_gc(lua_State *L)
{
    lcursor *lc = (lcursor *)luaL_checkudata(L, 1, CURSOR_MT);
    if (lc->c) {
        es_cursor_free(lc->c);
        lc->c = NULL;
    }
    return 0;
}

static void read_opts(lua_State *L, int idx, es_read_opts *o)
{
    memset(o, 0, sizeof *o);
    o->from = opt_int_field(L, idx, "from", 0);
    o->to = opt_int_field(L, idx, "to", 0);
    o->limit = opt_int_field(L, idx, "limit", 0);
    o->backward = opt_bool_field(L, idx, "backward");
    o->before = opt_string_field(L, idx, "before");
}

/* Iterator of store:read: upvalue 1 the cursor, upvalue 2 the store (kept
 * alive while the loop runs). */
static int read_next(lua_State *L)
{
    lcursor *lc = (lcursor *)lua_touserdata(L, lua_upvalueindex(1));
    es_event e;
    es_error err;
    int rc;
    if (!lc->c)
        return 0;
    rc = es_cursor_next(lc->c, &e, &err);
    if (rc < 0) {
        es_cursor_free(lc->c);
        lc->c = NULL;
        return raise_error(L, &err);
    }
    if (rc == 0) {
        /* Free at once: a loop left early is cleaned up by __gc. */
        es_cursor_free(lc->c);
        lc->c = NULL;
        return 0;
    }
    push_event(L, &e, NULL);
    return 1;
}

static int l_read(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *stream = check_strict_string(L, 2);
    es_read_opts o;
    es_error err;
    lcursor *lc;

    check_opts(L, 3);
    read_opts(L, 3, &o);
    lc = new_cursor(L);
    lc->c = es_read(ls->s, stream, &o, &err);
    if (!lc->c)
        return esl_push_error(L, &err);
    lua_pushvalue(L, 1);
    lua_pushcclosure(L, read_next, 2);
    return 1;
}

/* Option `shards` of read_all (index 2 holds the options): an array of
 * shard ids, copied into a userdata left on the stack. */
static void read_all_shards(lua_State *L, es_read_all_opts *o)
{
    int64_t *ids;
    int t;

    if (lua_isnil(L, 2))
        return;
    lua_getfield(L, 2, "shards");
    t = lua_gettop(L);
    if (lua_isnil(L, t))
        return;
    if (!lua_istable(L, t))
        luaL_error(L, "option 'shards' must be an array of shard ids");
    o->nshards = esl_rawlen(L, t);
    ids = (int64_t *)esl_newuserdata(L, (o->nshards + 1) * sizeof *ids);
    for (size_t k = 0; k < o->nshards; k++) {
        long long v;
        lua_rawgeti(L, t, (int)(k + 1));
        if (!esl_toint64(L, -1, &v))
            luaL_error(L, "option 'shards' must be an array of shard ids "
                       "(item %d is %s)", (int)k + 1, luaL_typename(L, -1));
        ids[k] = (int64_t)v;
        lua_pop(L, 1);
    }
    o->shards = ids;
}

/* Options `partitions` (a count), `partition` (one of them or an array
 * of them; copied into a userdata left on the stack) and `upto` (a
 * checkpoint) of read_all: see es_read_all_opts. */
static void read_all_partitions(lua_State *L, es_read_all_opts *o)
{
    int t;

    if (lua_isnil(L, 2))
        return;
    o->upto = opt_string_field(L, 2, "upto");
    o->partitions = opt_int_field(L, 2, "partitions", 0);
    lua_getfield(L, 2, "partition");
    t = lua_gettop(L);
    if (lua_isnil(L, t))
        return;
    if (!o->partitions)
        luaL_error(L, "option 'partition' needs option 'partitions' (a count)");
    o->nparts = lua_istable(L, t) ? esl_rawlen(L, t) : 1;
    int64_t *ks = (int64_t *)esl_newuserdata(L, (o->nparts + 1) * sizeof *ks);
    for (size_t k = 0; k < o->nparts; k++) {
        long long v;
        if (lua_istable(L, t))
            lua_rawgeti(L, t, (int)(k + 1));
        else
            lua_pushvalue(L, t);
        if (!esl_toint64(L, -1, &v))
            luaL_error(L, "option 'partition' must be a partition number or "
                       "an array of them (item %d is %s)", (int)k + 1,
                       luaL_typename(L, -1));
        ks[k] = (int64_t)v;
        lua_pop(L, 1);
    }
    o->parts = ks;
}

static int l_read_all(lua_State *L)
{
    lstore *ls = check_store(L);
    es_read_all_opts o;
    es_error err;
    lcursor *lc;
    es_event e;
    int rc, i = 0, per_event, lazy;
    event_ctx ctx;
    const char *cp;

    check_opts(L, 2);
    lua_settop(L, 2);
    memset(&o, 0, sizeof o);
    /* checkpoints = false: no string per event (a replay that only ever
     * saves the batch's checkpoint saves building a million of them) */
    per_event = 1;
    if (!lua_isnil(L, 2)) {
        lua_getfield(L, 2, "checkpoints");
        per_event = lua_isnil(L, -1) || lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    o.after = opt_string_field(L, 2, "after");
    o.limit = opt_int_field(L, 2, "limit", 0);
    o.category = opt_string_field(L, 2, "category");
    o.prefetch = opt_bool_field(L, 2, "prefetch");
    lazy = opt_bool_field(L, 2, "lazy");
    if (!lua_isnil(L, 2)) {
        lua_getfield(L, 2, "types");    /* stays on the stack: index 3 */
        if (!lua_isnil(L, 3)) {
            luaL_argcheck(L, lua_istable(L, 3), 2, "option 'types' must be "
                          "an array of strings");
            o.ntypes = esl_rawlen(L, 3);
            es_buf_reset(&ls->scratch);
            if (es_buf_reserve(&ls->scratch, (o.ntypes + 1) * sizeof(char *)) < 0)
                return luaL_error(L, "out of memory");
            const char **types = (const char **)(void *)ls->scratch.data;
            for (size_t k = 0; k < o.ntypes; k++) {
                lua_rawgeti(L, 3, (int)(k + 1));
                if (lua_type(L, -1) != LUA_TSTRING)
                    return luaL_error(L, "option 'types' must be an array of "
                                      "strings (item %d is %s)", (int)k + 1,
                                      luaL_typename(L, -1));
                size_t len;
                types[k] = lua_tolstring(L, -1, &len);
                if (strlen(types[k]) != len)
                    return luaL_error(L, "option 'types': item %d contains a "
                                      "NUL byte", (int)k + 1);
                lua_pop(L, 1);
            }
            o.types = types;
        }
    }
    read_all_shards(L, &o);
    read_all_partitions(L, &o);
    lc = new_cursor(L);
    lc->c = es_read_all(ls->s, &o, &err);
    if (!lc->c)
        return esl_push_error(L, &err);
    ctx = event_context(L);
    memo_on(L, &ctx);
    if (lazy) {
        luaL_checkstack(L, 2, "lazy events");
        ctx.lazy = esl_lazy_push(L);
        ctx.lazy_mt = lua_gettop(L);
    }
    lua_newtable(L);
    /* each event carries the checkpoint after it: a follower that stops
     * at event k saves events[k-1].checkpoint without reading again */
    luaL_checkstack(L, 6, "events");  /* the event, a key, its value */
    e.part = -1;
    while ((rc = es_cursor_next(lc->c, &e, &err)) > 0) {
        push_event(L, &e, &ctx);
        if (e.part >= 0) {
            lua_pushinteger(L, e.part);
            lua_setfield(L, -2, "part");
        }
        if (per_event) {
            lua_pushstring(L, es_cursor_checkpoint(lc->c));
            lua_setfield(L, -2, "checkpoint");
        }
        lua_rawseti(L, -2, ++i);
    }
    if (rc < 0) {
        es_cursor_free(lc->c);
        lc->c = NULL;
        return esl_push_error(L, &err);
    }
    cp = es_cursor_checkpoint(lc->c);
    if (cp)
        lua_pushstring(L, cp);
    else
        lua_pushnil(L);
    /* The batch is built and the checkpoint copied: free the cursor (a
     * result of up to `limit` rows) now, not whenever the collector gets
     * to its userdata; a follower would otherwise hold many of them. */
    es_cursor_free(lc->c);
    lc->c = NULL;
    return 2;
}

/* ---- bulk load ---------------------------------------------------------- */

/* The column names of store:copy_rows (an array at idx) as C strings in
 * ls->scratch, anchored by that table. NULL with msg filled. */
static const char **copy_columns(lua_State *L, lstore *ls, int idx, size_t n,
                                 char *msg, size_t msglen)
{
    const char **cols;
    es_buf_reset(&ls->scratch);
    if (es_buf_reserve(&ls->scratch, (n + 1) * sizeof(char *)) < 0) {
        snprintf(msg, msglen, "out of memory");
        return NULL;
    }
    cols = (const char **)(void *)ls->scratch.data;
    for (size_t k = 0; k < n; k++) {
        size_t len;
        lua_rawgeti(L, idx, (int)(k + 1));
        if (lua_type(L, -1) != LUA_TSTRING) {
            snprintf(msg, msglen, "column %zu is a %s, not a name", k + 1,
                     luaL_typename(L, -1));
            return NULL;
        }
        cols[k] = lua_tolstring(L, -1, &len);
        lua_pop(L, 1);
        if (len == 0 || strlen(cols[k]) != len) {
            snprintf(msg, msglen, "column %zu: a name must be non-empty, "
                     "without NUL bytes", k + 1);
            return NULL;
        }
    }
    return cols;
}

/* Pushes a set of opts.json's names (the columns that take JSON text). */
/* Adds flag to the column names of the array opts[field] in the table
 * at the top of the stack. */
static void flag_columns(lua_State *L, int opts, const char *field, int flag)
{
    char why[64];
    snprintf(why, sizeof why, "%s must be an array of column names", field);
    lua_getfield(L, opts, field);
    if (!lua_isnil(L, -1)) {
        luaL_argcheck(L, lua_istable(L, -1), opts, why);
        for (size_t i = 1, n = esl_rawlen(L, -1); i <= n; i++) {
            lua_rawgeti(L, -1, (int)i);
            luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, opts, why);
            lua_pushvalue(L, -1);
            lua_rawget(L, -4);
            lua_pushinteger(L, lua_tointeger(L, -1) | flag);
            lua_remove(L, -2);
            lua_rawset(L, -4);
        }
    }
    lua_pop(L, 1);
}

/* The columns opts.json and opts.integers name: a table column name ->
 * ESL_COPY_JSON | ESL_COPY_INT, pushed. */
static void column_flags(lua_State *L, int opts)
{
    lua_newtable(L);
    if (lua_isnil(L, opts))
        return;
    flag_columns(L, opts, "json", ESL_COPY_JSON);
    flag_columns(L, opts, "integers", ESL_COPY_INT);
}

/* store:copy_rows(table, columns, rows, { schema = "pg_temp", json = { names },
 *                 integers = { names }, wait = false })
 * -> rows copied | nil, err.
 * COPY into table (of the store's schema, or opts.schema): rows is an
 * array of tables whose fields named by columns are read raw; the columns
 * named in opts.json (json/jsonb) get every value as JSON text, those in
 * opts.integers an integral float as an integer (2500.0 as 2500). Every
 * value is checked and the whole text built before anything is sent; the
 * server takes all the rows or none. wait = false: returns true once the
 * copy has begun, the rows go on being sent by a thread of the store; the
 * store's next call (or store:copy_wait()) waits for the copy, and fails
 * with its error if it failed. */
static int l_copy_rows(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *table = check_strict_string(L, 2);
    const char *schema;
    const char **cols;
    size_t ncols, nrows;
    char msg[320], why[260];
    int64_t n;
    int wait;
    es_error err;

    luaL_checktype(L, 3, LUA_TTABLE);
    luaL_checktype(L, 4, LUA_TTABLE);
    check_opts(L, 5);
    lua_settop(L, 5);
    schema = opt_string_field(L, 5, "schema");
    wait = 1;
    if (lua_istable(L, 5)) {
        lua_getfield(L, 5, "wait");
        luaL_argcheck(L, lua_isnil(L, -1) || lua_isboolean(L, -1), 5,
                      "wait must be a boolean");
        wait = lua_isnil(L, -1) || lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    ncols = esl_rawlen(L, 3);
    nrows = esl_rawlen(L, 4);
    if (ncols == 0)
        return esl_push_fail(L, ES_INVALID, "copy_rows: no columns given");
    column_flags(L, 5);         /* at 6 */
    cols = copy_columns(L, ls, 3, ncols, why, sizeof why);
    es_buf_reset(&ls->json);
    if (cols && esl_copy_text(L, 4, 3, 6, ncols, nrows, &ls->json, why,
                              sizeof why) < 0)
        cols = NULL;
    lua_settop(L, 5);
    if (!cols) {
        snprintf(msg, sizeof msg, "copy_rows %s: %s", table, why);
        return esl_push_fail(L, ES_INVALID, msg);
    }
    if (es_copy(ls->s, schema, table, cols, ncols, ls->json.data,
                ls->json.len, wait ? &n : NULL, &err) < 0)
        return esl_push_error(L, &err);
    if (!wait) {
        lua_pushboolean(L, 1);
        return 1;
    }
    esl_pushint64(L, n);
    return 1;
}

/* store:copy_wait() -> rows copied by copies sent without waiting since
 * the last call | nil, err (the first such copy that failed). */
static int l_copy_wait(lua_State *L)
{
    lstore *ls = check_store(L);
    int64_t n;
    es_error err;
    if (es_copy_wait(ls->s, &n, &err) < 0)
        return esl_push_error(L, &err);
    esl_pushint64(L, n);
    return 1;
}

/* ---- fold: the hot path ----------------------------------------------- */

/* store:fold(stream, handlers, initial, opts) -> state, version, last_id.
 * Rows come page by page from the cursor; each event is decoded straight
 * onto the stack and handed to handlers[type](state, event). Events with
 * no handler are skipped without decoding their payload. last_id: the id
 * of the last event read (nil when none was), what an append's
 * expected_last_id names. */
static int l_fold(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *stream = check_strict_string(L, 2);
    es_read_opts o;
    es_error err;
    lcursor *lc;
    es_event e;
    int rc, state;
    event_ctx ctx;
    int64_t version;
    char last[40] = "";

    luaL_checktype(L, 3, LUA_TTABLE);
    check_opts(L, 5);
    lua_settop(L, 5);
    read_opts(L, 5, &o);
    /* Handlers are pure (no I/O), so the session may stay busy with the
     * next page while they run. */
    o.prefetch = 1;
    if (o.backward || o.limit)
        luaL_error(L, "fold reads forward and whole: options 'backward' and "
                   "'limit' are not allowed");
    version = o.from > 0 ? o.from - 1 : 0;
    lc = new_cursor(L);
    lc->c = es_read(ls->s, stream, &o, &err);
    if (!lc->c)
        return esl_push_error(L, &err);
    ctx = event_context(L);
    memo_on(L, &ctx);       /* recorded_at: the stream's appends share it */
    luaL_checkstack(L, 8, "fold");
    lua_pushvalue(L, 2);
    ctx.stream = lua_gettop(L);
    lua_pushvalue(L, 4);
    state = lua_gettop(L);
    while ((rc = es_cursor_next(lc->c, &e, &err)) > 0) {
        size_t idlen = strlen(e.id);
        version = e.version;
        if (idlen < sizeof last)
            memcpy(last, e.id, idlen + 1);
        lua_pushlstring(L, e.type, strlen(e.type));
        ctx.type = lua_gettop(L);
        lua_pushvalue(L, ctx.type);
        lua_gettable(L, 3);                 /* handlers[type], __index too */
        if (lua_isnil(L, -1)) {
            lua_pop(L, 2);
            continue;
        }
        lua_pushvalue(L, state);
        push_event(L, &e, &ctx);
        lua_call(L, 2, 1);
        if (lua_isnil(L, -1))
            lua_pop(L, 2);                  /* the result, the type */
        else {
            lua_replace(L, state);
            lua_pop(L, 1);
        }
    }
    ctx.type = 0;
    if (rc < 0)
        return esl_push_error(L, &err);
    es_cursor_free(lc->c);
    lc->c = NULL;
    esl_pushint64(L, version);
    if (last[0])
        lua_pushstring(L, last);
    else
        lua_pushnil(L);
    return 3;
}

/* ---- snapshots -------------------------------------------------------- */

/* store:save_snapshot(stream, { version = n, schema_version = k,
 * state = value }) -> true | nil, err */
static int l_save_snapshot(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *stream = check_strict_string(L, 2);
    int64_t version, schema_version;
    char msg[200];
    es_error err;

    luaL_checktype(L, 3, LUA_TTABLE);
    lua_settop(L, 3);
    version = opt_int_field(L, 3, "version", -1);
    if (version < 1)
        return luaL_error(L, "snapshot field 'version' must be an integer >= 1");
    schema_version = opt_int_field(L, 3, "schema_version", 1);
    lua_getfield(L, 3, "state");
    es_buf_reset(&ls->json);
    if (esl_json_encode(L, 4, &ls->json, msg, sizeof msg) < 0) {
        char full[260];
        snprintf(full, sizeof full, "snapshot state %s", msg);
        return esl_push_fail(L, ES_INVALID, full);
    }
    if (es_save_snapshot(ls->s, stream, version, schema_version,
                         ls->json.data, ls->json.len, &err) < 0)
        return esl_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

/* store:load_snapshot(stream, { max_version = n, schema_version = k })
 * -> { version, schema_version, state, recorded_at } | nil | nil, err */
static int l_load_snapshot(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *stream = check_strict_string(L, 2);
    int64_t max_version, schema_version;
    es_snapshot snap;
    es_error err;
    int rc;

    check_opts(L, 3);
    lua_settop(L, 3);
    max_version = opt_int_field(L, 3, "max_version", 0);
    schema_version = opt_int_field(L, 3, "schema_version", 1);
    rc = es_load_snapshot(ls->s, stream, max_version, schema_version, &snap,
                          &err);
    if (rc < 0)
        return esl_push_error(L, &err);
    if (rc == 0) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, 0, 4);
    set_int(L, "version", snap.version);
    set_int(L, "schema_version", snap.schema_version);
    push_json_field(L, 0, snap.state, snap.state_len, "snapshot state");
    lua_setfield(L, -2, "state");
    set_string(L, "recorded_at", snap.recorded_at);
    return 1;
}

/* ---- SQL for the layers above ------------------------------------------ */

/* Text for one query parameter; NULL for nil and es.json.null. */
static const char *param_text(lua_State *L, lstore *ls, int idx, int pnum,
                              size_t *off, int *is_null)
{
    char num[64], msg[200];
    *is_null = 0;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        *is_null = 1;
        return NULL;
    case LUA_TBOOLEAN:
        return lua_toboolean(L, idx) ? "true" : "false";
    case LUA_TSTRING:
        return lua_tostring(L, idx);
    case LUA_TNUMBER: {
        long long v;
        if (esl_toint64(L, idx, &v))
            snprintf(num, sizeof num, "%lld", v);
        else
            snprintf(num, sizeof num, "%.17g", (double)lua_tonumber(L, idx));
        *off = ls->json.len;
        if (es_buf_add(&ls->json, num, strlen(num) + 1) < 0)
            luaL_error(L, "out of memory");
        return NULL;
    }
    default:
        /* tables (and the null sentinel) go as JSON text, for jsonb */
        *off = ls->json.len;
        if (esl_json_encode(L, idx, &ls->json, msg, sizeof msg) < 0)
            luaL_error(L, "query parameter %d: %s", pnum, msg);
        if (ls->json.len - *off == 4 && memcmp(ls->json.data + *off, "null", 4) == 0) {
            ls->json.len = *off;
            *is_null = 1;
            return NULL;
        }
        if (es_buf_addc(&ls->json, '\0') < 0)
            luaL_error(L, "out of memory");
        return NULL;
    }
}

static void push_cell(lua_State *L, const es_rows *r, int row, int col)
{
    size_t len;
    const char *v = es_rows_value(r, row, col, &len);
    char msg[160];
    if (!v) {
        lua_pushnil(L);
        return;
    }
    switch (es_rows_type(r, col)) {
    case 16: /* bool */
        lua_pushboolean(L, v[0] == 't');
        return;
    case 20: case 21: case 23: /* int8, int2, int4 */
        esl_pushint64(L, strtoll(v, NULL, 10));
        return;
    case 700: case 701: /* float4, float8 */
        lua_pushnumber(L, strtod(v, NULL));
        return;
    case 114: case 3802: /* json, jsonb */
        if (esl_json_decode(L, v, len, msg, sizeof msg) < 0)
            luaL_error(L, "column %s: %s", es_rows_name(r, col), msg);
        return;
    default:
        lua_pushlstring(L, v, len);
    }
}

/* Query results are held by a userdata while rows are built: decoding a
 * json column can raise, and the result must not leak then. */
static int rows_gc(lua_State *L)
{
    es_rows **r = (es_rows **)luaL_checkudata(L, 1, ROWS_MT);
    es_rows_free(*r);
    *r = NULL;
    return 0;
}

/* The text of the query parameters at stack indexes 3.. into *out (held
 * by the store's buffers): 0, or minus the count of values pushed (nil,
 * err) for a parameter refused. */
static int query_params(lua_State *L, lstore *ls, int nparams,
                        const char ***out)
{
    const char **params;
    size_t *offs;
    int *nulls;

    /* the protocol counts parameters in 16 bits: libpq would refuse
     * the statement only once it is half on the wire */
    if (nparams > 65535)
        return -esl_push_fail(L, ES_INVALID, "query: at most 65535 "
                              "parameters (PostgreSQL's protocol limit)");
    es_buf_reset(&ls->json);
    es_buf_reset(&ls->scratch);
    if (es_buf_reserve(&ls->scratch, (size_t)(nparams + 1) *
                       (sizeof *params + sizeof *offs + sizeof *nulls)) < 0)
        return luaL_error(L, "out of memory");
    params = (const char **)(void *)ls->scratch.data;
    offs = (size_t *)(void *)(params + nparams + 1);
    nulls = (int *)(void *)(offs + nparams + 1);
    for (int i = 0; i < nparams; i++) {
        /* C reads a parameter up to its first NUL: "a\0b" would quietly
         * become "a" (PostgreSQL text cannot hold NUL anyway). */
        if (lua_type(L, i + 3) == LUA_TSTRING &&
            strlen(lua_tostring(L, i + 3)) != esl_rawlen(L, i + 3)) {
            char msg[80];
            snprintf(msg, sizeof msg, "query parameter %d contains a NUL "
                     "byte", i + 1);
            return -esl_push_fail(L, ES_INVALID, msg);
        }
        offs[i] = (size_t)-1;
        params[i] = param_text(L, ls, i + 3, i + 1, &offs[i], &nulls[i]);
    }
    for (int i = 0; i < nparams; i++)
        if (!params[i] && !nulls[i])
            params[i] = ls->json.data + offs[i];
    *out = params;
    return 0;
}

/* Pushes the rows of r (held by *holder, freed after). */
static int push_rows(lua_State *L, es_rows **holder)
{
    es_rows *r = *holder;
    int nrows = es_rows_count(r), ncols = es_rows_columns(r);
    lua_createtable(L, nrows, 0);
    for (int i = 0; i < nrows; i++) {
        lua_createtable(L, 0, ncols);
        for (int c = 0; c < ncols; c++) {
            push_cell(L, r, i, c);
            lua_setfield(L, -2, es_rows_name(r, c));
        }
        lua_rawseti(L, -2, i + 1);
    }
    es_rows_free(r);
    *holder = NULL;
    return 1;
}

/* Pushes the rows of r (held by *holder, freed after) as JSON texts, one
 * object per row, in b: the text json.encode makes of the row push_rows
 * gives (NULL cells left out, as they are nil there), except that json
 * and jsonb cells go as the server wrote them. Decoding such a text gives
 * that row back, without the row's JSON having been decoded and encoded
 * again on the way (commit_with's json_rows: a kept row's cache entry). A
 * row with a cell JSON cannot hold (a float that is not finite) is false. */
static int push_rows_json(lua_State *L, es_rows **holder, es_buf *b)
{
    es_rows *r = *holder;
    int nrows = es_rows_count(r), ncols = es_rows_columns(r);
    int ctx = esl_json_context(L);
    char msg[160];
    lua_createtable(L, nrows, 0);
    for (int i = 0; i < nrows; i++) {
        int rc = 0, sep = '{';
        es_buf_reset(b);
        for (int c = 0; c < ncols && rc == 0; c++) {
            size_t len;
            const char *v = es_rows_value(r, i, c, &len);
            int type = es_rows_type(r, c);
            if (!v)
                continue;
            rc |= es_buf_addc(b, (char)sep);
            sep = ',';
            lua_pushstring(L, es_rows_name(r, c));
            rc |= esl_json_encode_ctx(L, ctx, -1, b, msg, sizeof msg);
            lua_pop(L, 1);
            rc |= es_buf_addc(b, ':');
            if (type == 114 || type == 3802) {   /* json, jsonb */
                rc |= es_buf_add(b, v, len);
                continue;
            }
            push_cell(L, r, i, c);
            rc |= esl_json_encode_ctx(L, ctx, -1, b, msg, sizeof msg);
            lua_pop(L, 1);
        }
        if (rc == 0 && sep == '{')
            rc = es_buf_addc(b, '{');   /* every cell NULL */
        rc |= es_buf_addc(b, '}');
        if (rc == 0)
            lua_pushlstring(L, b->data, b->len);
        else
            lua_pushboolean(L, 0);
        lua_rawseti(L, -2, i + 1);
    }
    es_buf_reset(b);
    es_rows_free(r);
    *holder = NULL;
    lua_replace(L, ctx);     /* the rows where the context began */
    lua_settop(L, ctx);
    return 1;
}

/* A holder for a result (a Lua error while pushing it frees it). */
static es_rows **new_holder(lua_State *L)
{
    es_rows **holder = (es_rows **)esl_newuserdata(L, sizeof *holder);
    *holder = NULL;
    luaL_getmetatable(L, ROWS_MT);
    lua_setmetatable(L, -2);
    return holder;
}

/* store:query(sql, ...) -> array of rows keyed by column name. */
static int l_query(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *sql = check_strict_string(L, 2);
    int nparams = lua_gettop(L) - 2, rc;
    const char **params;
    es_error err;

    if ((rc = query_params(L, ls, nparams, &params)) < 0)
        return -rc;
    es_rows **holder = new_holder(L);
    if (!(*holder = es_query(ls->s, sql, nparams, params, &err)))
        return esl_push_error(L, &err);
    return push_rows(L, holder);
}

/* store:query_ahead(sql, ...) -> true | nil, err: the query waits for the
 * transaction's next statement and goes in front of it, in its round
 * trip. store:ahead_rows() -> its rows | nil, err. */
static int l_query_ahead(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *sql = check_strict_string(L, 2);
    int nparams = lua_gettop(L) - 2, rc;
    const char **params;
    es_error err;

    if ((rc = query_params(L, ls, nparams, &params)) < 0)
        return -rc;
    if (es_query_ahead(ls->s, sql, nparams, params, &err) < 0)
        return esl_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_ahead_rows(lua_State *L)
{
    lstore *ls = check_store(L);
    es_error err;
    es_rows **holder = new_holder(L);
    if (!(*holder = es_ahead_rows(ls->s, &err)))
        return esl_push_error(L, &err);
    return push_rows(L, holder);
}

static int tx_result(lua_State *L, int rc, es_error *err)
{
    if (rc < 0)
        return esl_push_error(L, err);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_begin(lua_State *L)
{
    es_error err;
    return tx_result(L, es_begin(check_store(L)->s, &err), &err);
}

static int l_commit(lua_State *L)
{
    es_error err;
    return tx_result(L, es_commit(check_store(L)->s, &err), &err);
}

/* store:commit_with(sql, ...) -> true, rows | nil, err: the transaction's
 * last statement (as store:query runs it) and COMMIT in one round trip.
 * The transaction ends either way. */
static int l_commit_with(lua_State *L)
{
    lstore *ls = check_store(L);
    const char *sql = check_strict_string(L, 2);
    int nparams = lua_gettop(L) - 2, rc;
    const char **params;
    es_rows **rows;
    es_error err;

    if ((rc = query_params(L, ls, nparams, &params)) < 0)
        return -rc;
    rows = new_holder(L);
    if (es_query_commit_rows(ls->s, sql, nparams, params, rows, &err) < 0)
        return esl_push_error(L, &err);
    lua_pushboolean(L, 1);
    if (!*rows)
        return 1;
    push_rows(L, rows);
    return 2;
}

static int l_rollback(lua_State *L)
{
    es_error err;
    return tx_result(L, es_rollback(check_store(L)->s, &err), &err);
}

/* store:listen() -> true | nil, err: subscribe to append wake-ups. */
static int l_listen(lua_State *L)
{
    es_error err;
    return tx_result(L, es_listen(check_store(L)->s, &err), &err);
}

/* store:wait(seconds) -> true (woken) | false (timed out) | nil, err */
static int l_wait(lua_State *L)
{
    lstore *ls = check_store(L);
    lua_Number secs = luaL_checknumber(L, 2);
    es_error err;
    int rc;
    luaL_argcheck(L, secs >= 0 && secs <= 86400, 2, "seconds out of range");
    rc = es_wait(ls->s, (int)(secs * 1000 + 0.5), &err);
    if (rc < 0)
        return esl_push_error(L, &err);
    lua_pushboolean(L, rc > 0);
    return 1;
}

/* store:pooler() -> "none" | "session" | "transaction" (es.open's option) */
static int l_pooler(lua_State *L)
{
    lua_pushstring(L, es_store_pooler(check_store(L)->s));
    return 1;
}

/* store:in_transaction() -> boolean: inside begin .. commit/rollback.
 * Asks the server nothing (status() may: a command's hot path uses this). */
static int l_in_transaction(lua_State *L)
{
    lua_pushboolean(L, es_in_transaction(check_store(L)->s));
    return 1;
}

/* store:status() -> { kind, pooler, connected, in_transaction, prepared,
 * proxied = true|false|nil } | nil, err. proxied: a proxy such as PgBouncer
 * answers for the server (nil when unknown: memory, or the session busy). */
static int l_status(lua_State *L)
{
    lstore *ls = check_store(L);
    es_store_status st;
    es_error err;
    if (es_status(ls->s, &st, &err) < 0)
        return esl_push_error(L, &err);
    lua_createtable(L, 0, 6);
    lua_pushstring(L, es_store_kind(ls->s));
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, st.pooler);
    lua_setfield(L, -2, "pooler");
    lua_pushboolean(L, st.connected);
    lua_setfield(L, -2, "connected");
    lua_pushboolean(L, st.in_transaction);
    lua_setfield(L, -2, "in_transaction");
    lua_pushinteger(L, st.prepared);
    lua_setfield(L, -2, "prepared");
    if (st.proxied >= 0) {
        lua_pushboolean(L, st.proxied);
        lua_setfield(L, -2, "proxied");
    }
    return 1;
}

static int l_is_closed(lua_State *L)
{
    lstore *ls = (lstore *)luaL_checkudata(L, 1, STORE_MT);
    lua_pushboolean(L, ls->s == NULL);
    return 1;
}

static const luaL_Reg store_methods[] = {
    {"migrate", l_migrate},
    {"append", l_append},
    {"read", l_read},
    {"version", l_version},
    {"read_all", l_read_all},
    {"copy_rows", l_copy_rows},
    {"copy_wait", l_copy_wait},
    {"fold", l_fold},
    {"save_snapshot", l_save_snapshot},
    {"load_snapshot", l_load_snapshot},
    {"query", l_query},
    {"begin", l_begin},
    {"commit", l_commit},
    {"commit_with", l_commit_with},
    {"query_ahead", l_query_ahead},
    {"ahead_rows", l_ahead_rows},
    {"rollback", l_rollback},
    {"listen", l_listen},
    {"wait", l_wait},
    {"kind", l_kind},
    {"info", l_info},
    {"schema", l_schema},
    {"pooler", l_pooler},
    {"status", l_status},
    {"in_transaction", l_in_transaction},
    {"is_closed", l_is_closed},
    {"close", l_close},
    {NULL, NULL}
};

static int l_uuid(lua_State *L)
{
    char out[37];
    es_uuid_v7(out);
    lua_pushstring(L, out);
    return 1;
}

void store_open(lua_State *L)
{
    luaL_newmetatable(L, STORE_MT);
    lua_newtable(L);
    esl_setfuncs(L, store_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_gc);
    lua_setfield(L, -2, "__gc");
#if LUA_VERSION_NUM >= 504
    lua_pushcfunction(L, l_gc);
    lua_setfield(L, -2, "__close");
#endif
    lua_pushcfunction(L, l_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);

    luaL_newmetatable(L, ROWS_MT);
    lua_pushcfunction(L, rows_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    luaL_newmetatable(L, CURSOR_MT);
    lua_pushcfunction(L, cursor_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    lua_pushcfunction(L, l_open);
    lua_setfield(L, -2, "open");
    lua_pushcfunction(L, l_uuid);
    lua_setfield(L, -2, "uuid");
}
