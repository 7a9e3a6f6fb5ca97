/*
 * json_encode.c - the encoder on random Lua-shaped values. The input is a
 * little program that builds values on the Lua stack: integers, any
 * doubles (NaN and infinities too), strings of any bytes, booleans,
 * es.json.null, plain / array-marked / object-marked tables, keys of every
 * type, cycles, and values JSON has no form for. The top value is encoded.
 * Properties: encode either fails with a message or writes text the core's
 * validator accepts; that text decodes; and one more encode/decode round
 * gives the same value again (the encoding is stable).
 */
#include "fuzz.h"
#include "../src/lua/json.h"
#include "../src/core/json_syntax.h"

#include <string.h>

#define MAX_STACK 48

typedef struct prog {
    const uint8_t *p, *end;
} prog;

static unsigned next_byte(prog *g)
{
    return g->p < g->end ? *g->p++ : 0;
}

static void push_bytes(lua_State *L, prog *g, size_t n)
{
    size_t have = (size_t)(g->end - g->p);
    if (n > have)
        n = have;
    lua_pushlstring(L, (const char *)g->p, n);
    g->p += n;
}

static void push_marked(lua_State *L, const char *what)
{
    /* es.json.array / es.json.object on a fresh table */
    lua_getfield(L, LUA_REGISTRYINDEX, "fuzz.core");
    lua_getfield(L, -1, "json");
    lua_getfield(L, -1, what);
    lua_newtable(L);
    lua_call(L, 1, 1);
    lua_replace(L, -3);
    lua_pop(L, 1);
}

/* One instruction; the stack stays within MAX_STACK values. */
static void step(lua_State *L, prog *g)
{
    unsigned op = next_byte(g) % 14;
    int top = lua_gettop(L);
    if (top >= MAX_STACK && op < 8)
        op = 8;
    switch (op) {
    case 0: {
        int64_t v = 0;
        size_t n = (size_t)(g->end - g->p) < 8 ? (size_t)(g->end - g->p) : 8;
        memcpy(&v, g->p, n);
        g->p += n;
        lua_pushinteger(L, (lua_Integer)v);
        break;
    }
    case 1: {
        double d = 0;
        size_t n = (size_t)(g->end - g->p) < 8 ? (size_t)(g->end - g->p) : 8;
        memcpy(&d, g->p, n);
        g->p += n;
        lua_pushnumber(L, d);
        break;
    }
    case 2: push_bytes(L, g, next_byte(g) % 24); break;
    case 3: lua_pushboolean(L, next_byte(g) & 1); break;
    case 4:
        lua_getfield(L, LUA_REGISTRYINDEX, "fuzz.core");
        lua_getfield(L, -1, "json");
        lua_getfield(L, -1, "null");
        lua_replace(L, -3);
        lua_pop(L, 1);
        break;
    case 5: lua_newtable(L); break;
    case 6: push_marked(L, "array"); break;
    case 7: push_marked(L, "object"); break;
    case 8:   /* t[#t + 1] = v */
        if (top >= 2 && lua_istable(L, top - 1) && !lua_isnil(L, top)) {
            lua_rawseti(L, top - 1, (lua_Integer)esl_rawlen(L, top - 1) + 1);
        } else if (top) {
            lua_pop(L, 1);
        }
        break;
    case 9:   /* t[k] = v */
        if (top >= 3 && lua_istable(L, top - 2) && !lua_isnil(L, top - 1) &&
            !(lua_type(L, top - 1) == LUA_TNUMBER &&
              lua_tonumber(L, top - 1) != lua_tonumber(L, top - 1))) {
            lua_rawset(L, top - 2);
        } else if (top) {
            lua_pop(L, 1);
        }
        break;
    case 10:  /* a copy of a value further down: shared tables, cycles */
        if (top && top < MAX_STACK)
            lua_pushvalue(L, 1 + (int)(next_byte(g) % (unsigned)top));
        break;
    case 11: lua_pushnil(L); break;
    case 12:  /* values JSON has no form for */
        if (next_byte(g) & 1)
            lua_pushlightuserdata(L, g);
        else
            lua_pushcfunction(L, luaopen_base);
        break;
    default:  /* a long string, valid UTF-8 or not */
        push_bytes(L, g, next_byte(g) * 4u);
        break;
    }
}

static int run(const uint8_t *data, size_t size)
{
    lua_State *L = fuzz_lua();
    prog g = { data, data + size };
    char msg[256];
    es_json_problem pr;
    es_buf b, b2;
    int top;

    /* shared tables can expand without bound: 8 MiB of text is plenty for
     * every property here and keeps a run inside libFuzzer's limits */
    esl_json_max_text = (size_t)8 << 20;
    while (g.p < g.end)
        step(L, &g);
    if (lua_gettop(L) == 0)
        return 0;
    top = lua_gettop(L);
    es_buf_init(&b);
    msg[0] = '\0';
    if (esl_json_encode(L, top, &b, msg, sizeof msg) < 0) {
        FUZZ_CHECK(msg[0] != '\0', "encode failed without a message", data,
                   size);
        FUZZ_CHECK(lua_gettop(L) == top, "encode changed the stack", data,
                   size);
        es_buf_free(&b);
        return 0;
    }
    FUZZ_CHECK(es_json_check(b.data, b.len, 0, ESL_JSON_MAX_DEPTH, &pr) == 0,
               "encode wrote text the validator refuses", data, size);
    FUZZ_CHECK(esl_json_decode(L, b.data, b.len, msg, sizeof msg) == 0,
               "encode wrote text decode refuses", data, size);
    es_buf_init(&b2);
    FUZZ_CHECK(esl_json_encode(L, top + 1, &b2, msg, sizeof msg) == 0,
               "a decoded encoding does not encode", data, size);
    FUZZ_CHECK(esl_json_decode(L, b2.data, b2.len, msg, sizeof msg) == 0,
               "the second encoding does not decode", data, size);
    FUZZ_CHECK(fuzz_same(L, top + 1, top + 2), "encoding is not stable",
               data, size);
    es_buf_free(&b);
    es_buf_free(&b2);
    return 0;
}

FUZZ_LUA_TARGET(run)
