/*
 * lazy.c - read_all({ lazy = true }): an event's id and metadata made on
 * first access.
 *
 * A rebuild builds a table per event, and most handlers never read e.id
 * or e.metadata. Each id is a new 36-byte Lua string (made, interned,
 * then marked and swept by the collector) and each metadata a decoded
 * table: on a 1,000,000-event rm_orders rebuild the two cost about a
 * quarter of the read's client CPU (LuaJIT: 1.6 -> 1.1 us per event with
 * both left out). Here the batch keeps their bytes in one userdata, and the
 * events share a metatable whose __index makes the field when a handler
 * asks for it, then stores it in the event (later reads are plain
 * fields). The event is found by its position (unique in a batch),
 * through a hash in the batch, so the event carries no extra key for
 * pairs() or an encoder to trip over.
 *
 * An event whose metadata holds a plain positive integer schema_version
 * gets it as e.schema_version, which Aggregate:upcast_event reads first:
 * an event already at its type's current version is then not upcast and
 * its metadata never decoded (on rm_orders' ItemAdded, the metadata's
 * decode cost about 5,000 instructions an event and the lookup of the
 * missing field 900).
 */
#include "binding.h"
#include "json.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LAZY_MT "eventsourcing.lazy_batch"
#define NO_META UINT32_MAX

typedef struct lazy_row {
    int64_t position;
    uint32_t meta_off, meta_len;    /* in meta; meta_len NO_META: none */
    char id[36];
} lazy_row;

struct esl_lazy {
    lazy_row *rows;
    size_t n, cap;
    uint32_t *slots;                /* row index + 1; 0: free */
    size_t mask;                    /* slots - 1 (a power of two), or 0 */
    es_buf meta;                    /* the metadata texts, one after another */
};

static int lazy_gc(lua_State *L)
{
    esl_lazy *b = (esl_lazy *)luaL_checkudata(L, 1, LAZY_MT);
    free(b->rows);
    free(b->slots);
    es_buf_free(&b->meta);
    b->rows = NULL;
    b->slots = NULL;
    b->n = b->cap = b->mask = 0;
    return 0;
}

static size_t slot_of(int64_t position, size_t mask)
{
    uint64_t h = (uint64_t)position * 0x9E3779B97F4A7C15u;
    return (size_t)(h >> 32) & mask;
}

static lazy_row *find(const esl_lazy *b, int64_t position)
{
    if (!b->mask)
        return NULL;
    for (size_t i = slot_of(position, b->mask);; i = (i + 1) & b->mask) {
        uint32_t r = b->slots[i];
        if (!r)
            return NULL;
        if (b->rows[r - 1].position == position)
            return &b->rows[r - 1];
    }
}

/* Room for one more row, the slots at most half full. -1: out of memory. */
static int grow(esl_lazy *b)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        lazy_row *rows = realloc(b->rows, cap * sizeof *rows);
        if (!rows)
            return -1;
        b->rows = rows;
        b->cap = cap;
    }
    if ((b->n + 1) * 2 <= b->mask + 1 && b->mask)
        return 0;
    size_t nslots = b->mask ? (b->mask + 1) * 2 : 512;
    uint32_t *slots = calloc(nslots, sizeof *slots);
    if (!slots)
        return -1;
    free(b->slots);
    b->slots = slots;
    b->mask = nslots - 1;
    for (size_t r = 0; r < b->n; r++) {
        size_t i = slot_of(b->rows[r].position, b->mask);
        while (slots[i])
            i = (i + 1) & b->mask;
        slots[i] = (uint32_t)(r + 1);
    }
    return 0;
}

/* The events' __index is a Lua function that calls fill (lazy_fill) for
 * these two keys only: the other keys a handler may look up and not find
 * (e.schema_version, say) then stay plain Lua, which LuaJIT compiles
 * (a C __index would end the handler's trace on each such lookup). */
static const char INDEX_FACTORY[] =
    "local fill = ...\n"
    "return function(e, k)\n"
    "  if k == 'id' or k == 'metadata' then return fill(e, k) end\n"
    "end\n";
static const char FACTORY_KEY[] = "eventsourcing.lazy_index";

/* Pushes the decoded metadata of row (JSON context: upvalues 2-4, which
 * esl_json_context would otherwise look up in the registry every time). */
static void push_metadata(lua_State *L, const esl_lazy *b, const lazy_row *row)
{
    char msg[160];
    for (int i = 2; i <= 4; i++)
        lua_pushvalue(L, lua_upvalueindex(i));
    int ctx = lua_gettop(L) - 2;
    if (esl_json_decode_ctx(L, ctx, b->meta.data + row->meta_off,
                            row->meta_len, msg, sizeof msg) < 0)
        luaL_error(L, "stored metadata is not valid JSON: %s", msg);
    lua_replace(L, ctx);
    lua_settop(L, ctx);
}

/* fill(e, k) (upvalues: the batch, the JSON context, "position"): e.id or
 * e.metadata, made once and kept in the event; nil for an event the
 * batch does not hold. */
static int lazy_fill(lua_State *L)
{
    esl_lazy *b = (esl_lazy *)lua_touserdata(L, lua_upvalueindex(1));
    size_t len;
    long long pos;

    /* the metatable is reachable from Lua (getmetatable): anything may
     * be passed here, and lua_rawget needs a table */
    if (!lua_istable(L, 1) || lua_type(L, 2) != LUA_TSTRING)
        return 0;
    const char *k = lua_tolstring(L, 2, &len);
    int id = len == 2 && memcmp(k, "id", 2) == 0;
    if (!id && !(len == 8 && memcmp(k, "metadata", 8) == 0))
        return 0;
    lua_pushvalue(L, lua_upvalueindex(5));
    lua_rawget(L, 1);
    lazy_row *row = esl_toint64(L, -1, &pos) ? find(b, (int64_t)pos) : NULL;
    lua_pop(L, 1);
    if (!row || (!id && row->meta_len == NO_META))
        return 0;
    if (id)
        lua_pushlstring(L, row->id, sizeof row->id);
    else
        push_metadata(L, b, row);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, -2);
    lua_rawset(L, 1);
    return 1;
}

/* ---- metadata.schema_version without decoding the metadata ------------ */

static size_t skip_ws(const char *s, size_t i, size_t n)
{
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
        i++;
    return i;
}

/* Past the string opening at s[i] (a quote), or n when it does not end. */
static size_t skip_string(const char *s, size_t i, size_t n)
{
    for (i++; i < n; i++) {
        if (s[i] == '\\')
            i++;
        else if (s[i] == '"')
            return i + 1;
    }
    return n;
}

/* Past the value starting at s[i]: a string, an object or array (nested
 * ones and strings inside skipped whole), or a number or literal. */
static size_t skip_value(const char *s, size_t i, size_t n)
{
    size_t depth = 0;
    while (i < n) {
        char c = s[i];
        if (c == '"') {
            i = skip_string(s, i, n);
            if (depth == 0)
                return i;
            continue;
        }
        if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            if (depth == 0)
                return i;
            if (--depth == 0)
                return i + 1;
        } else if (depth == 0 && (c == ',' || c == ' ' || c == '\t' ||
                                  c == '\n' || c == '\r')) {
            return i;
        }
        i++;
    }
    return n;
}

/* metadata.schema_version when the metadata (JSON text s[0..n)) is an
 * object whose top level names it once, as 1 to 2^53 written in plain
 * digits: 1 and *out. Anything else (absent, a string, a fraction, a key
 * spelled with escapes, named twice, a text this scan does not follow): 0,
 * and upcast_event reads the decoded metadata as before. */
int esl_meta_schema_version(const char *s, size_t n, int64_t *out)
{
    static const char key[] = "\"schema_version\"";
    const size_t klen = sizeof key - 1;
    int found = 0;
    size_t i = skip_ws(s, 0, n);
    if (i >= n || s[i] != '{')
        return 0;
    i = skip_ws(s, i + 1, n);
    while (i < n && s[i] != '}') {
        if (s[i] != '"')
            return 0;
        size_t k = i, end = skip_string(s, i, n);
        if (end >= n || memchr(s + k, '\\', end - k))
            return 0;
        int ours = end - k == klen && memcmp(s + k, key, klen) == 0;
        i = skip_ws(s, end, n);
        if (i >= n || s[i] != ':')
            return 0;
        i = skip_ws(s, i + 1, n);
        if (ours) {
            int64_t v = 0;
            size_t d = i;
            if (found || i >= n || s[i] < '1' || s[i] > '9')
                return 0;
            while (i < n && s[i] >= '0' && s[i] <= '9' && i - d < 16)
                v = v * 10 + (s[i++] - '0');
            if (i < n && s[i] >= '0' && s[i] <= '9')
                return 0;           /* 17 digits and more */
            if (v > ((int64_t)1 << 53))
                return 0;
            *out = v;
            found = 1;
        } else {
            i = skip_value(s, i, n);
        }
        i = skip_ws(s, i, n);
        if (i < n && s[i] == ',')
            i = skip_ws(s, i + 1, n);
        else if (i >= n || s[i] != '}')
            return 0;
    }
    return found && i < n;
}

esl_lazy *esl_lazy_push(lua_State *L)
{
    esl_lazy *b = (esl_lazy *)esl_newuserdata(L, sizeof *b);
    memset(b, 0, sizeof *b);
    es_buf_init(&b->meta);
    luaL_setmetatable(L, LAZY_MT);
    lua_createtable(L, 0, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, FACTORY_KEY);
    lua_pushvalue(L, -3);
    esl_json_context(L);
    lua_pushliteral(L, "position");
    lua_pushcclosure(L, lazy_fill, 5);
    lua_call(L, 1, 1);
    lua_setfield(L, -2, "__index");
    return b;
}

int esl_lazy_add(lua_State *L, esl_lazy *b, int mt, const es_event *e)
{
    if (!e->id || strlen(e->id) != 36 ||
        (e->metadata && e->metadata_len >= NO_META) ||
        b->n >= UINT32_MAX - 1 || find(b, e->position))
        return 1;
    if (e->metadata && b->meta.len + e->metadata_len >= NO_META)
        return 1;
    if (grow(b) < 0 || (e->metadata &&
                        es_buf_reserve(&b->meta, e->metadata_len) < 0))
        luaL_error(L, "out of memory");
    lazy_row *row = &b->rows[b->n];
    row->position = e->position;
    memcpy(row->id, e->id, sizeof row->id);
    row->meta_len = NO_META;
    if (e->metadata) {
        row->meta_off = (uint32_t)b->meta.len;
        row->meta_len = (uint32_t)e->metadata_len;
        es_buf_add(&b->meta, e->metadata, e->metadata_len);
    }
    size_t i = slot_of(e->position, b->mask);
    while (b->slots[i])
        i = (i + 1) & b->mask;
    b->slots[i] = (uint32_t)++b->n;
    int64_t v = 0;
    if (e->metadata && esl_meta_schema_version(e->metadata, e->metadata_len, &v)) {
        lua_pushliteral(L, "schema_version");
        esl_pushint64(L, v);
        lua_rawset(L, -3);
    }
    lua_pushvalue(L, mt);
    lua_setmetatable(L, -2);
    return 0;
}

void lazy_open(lua_State *L)
{
    luaL_newmetatable(L, LAZY_MT);
    lua_pushcfunction(L, lazy_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    if (luaL_loadbuffer(L, INDEX_FACTORY, sizeof INDEX_FACTORY - 1,
                        "=lazy_index") != 0)
        lua_error(L);
    lua_setfield(L, LUA_REGISTRYINDEX, FACTORY_KEY);
}
