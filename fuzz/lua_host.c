/* lua_host.c - the Lua side shared by the fuzz targets (see fuzz.h). */
#include "fuzz.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int luaopen_eventsourcing_core(lua_State *L);

lua_State *fuzz_lua(void)
{
    static lua_State *L;
    if (!L) {
        L = luaL_newstate();
        if (!L)
            abort();
        luaL_openlibs(L);
        lua_pushcfunction(L, luaopen_eventsourcing_core);
        lua_call(L, 0, 1);
        lua_setfield(L, LUA_REGISTRYINDEX, "fuzz.core");
    }
    lua_settop(L, 0);
    return L;
}

void fuzz_lua_done(void)
{
    lua_State *L = fuzz_lua();
    lua_gc(L, LUA_GCCOLLECT, 0);
}

static int same_tables(lua_State *L, int a, int b, int depth)
{
    int ok = 1;
    size_t na = 0, nb = 0;
    if (lua_rawequal(L, a, b))
        return 1;
    if (depth > 2000)
        return 0;
    {
        int ma = lua_getmetatable(L, a), mb = lua_getmetatable(L, b);
        if (ma != mb) {
            lua_pop(L, ma + mb);
            return 0;
        }
        if (ma) {
            ok = lua_rawequal(L, -1, -2);
            lua_pop(L, 2);
            if (!ok)
                return 0;
        }
    }
    luaL_checkstack(L, 8, "fuzz_same");
    lua_pushnil(L);
    while (ok && lua_next(L, a)) {
        int v = lua_gettop(L);
        na++;
        lua_pushvalue(L, v - 1);
        lua_rawget(L, b);
        ok = !lua_isnil(L, -1);
        if (ok) {
            if (lua_istable(L, v) && lua_istable(L, -1))
                ok = same_tables(L, v, lua_gettop(L), depth + 1);
            else
                ok = fuzz_same(L, v, lua_gettop(L));
        }
        lua_pop(L, 2);
    }
    if (!ok) {
        lua_pop(L, 1);   /* the key lua_next left */
        return 0;
    }
    lua_pushnil(L);
    while (lua_next(L, b)) {
        nb++;
        lua_pop(L, 1);
    }
    return na == nb;
}

int fuzz_same(lua_State *L, int a, int b)
{
    a = lua_absindex(L, a);
    b = lua_absindex(L, b);
    if (lua_type(L, a) != lua_type(L, b))
        return 0;
    switch (lua_type(L, a)) {
    case LUA_TNUMBER: {
        lua_Number x, y;
        if (lua_isinteger(L, a) != lua_isinteger(L, b))
            return 0;
        if (lua_isinteger(L, a))
            return lua_tointeger(L, a) == lua_tointeger(L, b);
        x = lua_tonumber(L, a);
        y = lua_tonumber(L, b);
        return memcmp(&x, &y, sizeof x) == 0;
    }
    case LUA_TSTRING: {
        size_t la, lb;
        const char *sa = lua_tolstring(L, a, &la), *sb = lua_tolstring(L, b, &lb);
        return la == lb && memcmp(sa, sb, la) == 0;
    }
    case LUA_TTABLE:
        return same_tables(L, a, b, 0);
    default:
        return lua_rawequal(L, a, b);
    }
}

void fuzz_fail(const char *what, const uint8_t *data, size_t size)
{
    fprintf(stderr, "\nFUZZ FINDING: %s\ninput (%zu bytes): ", what, size);
    for (size_t i = 0; i < size && i < 400; i++)
        fprintf(stderr, data[i] >= 0x20 && data[i] < 0x7f ? "%c" : "\\x%02x",
                data[i]);
    fprintf(stderr, "\n");
    abort();
}
