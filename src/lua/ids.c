/*
 * ids.c - core.uuid5(namespace, name): name-based (SHA-1, version 5) UUIDs
 * from libuuid, for ids that must come out the same on every replay (the
 * ids of events a workflow step appends). The name is taken whole, NUL
 * bytes included: callers join parts with "\0".
 */
#include "binding.h"
#include "../core/es_uuid.h"

static int l_uuid5(lua_State *L)
{
    size_t len;
    const char *ns = luaL_checkstring(L, 1);
    const char *name;
    char out[37];
    if (lua_type(L, 2) != LUA_TSTRING)
        return esl_typeerror(L, 2, "string");
    name = lua_tolstring(L, 2, &len);
    if (lua_type(L, 1) != LUA_TSTRING || es_uuid5(ns, name, len, out) < 0)
        return luaL_argerror(L, 1, "namespace must be a UUID string");
    lua_pushstring(L, out);
    return 1;
}

void ids_open(lua_State *L)
{
    lua_pushcfunction(L, l_uuid5);
    lua_setfield(L, -2, "uuid5");
}
