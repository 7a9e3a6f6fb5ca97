/*
 * errors.c - error objects. Expected failures come back as `nil, err` where
 * err is a table {kind=, message=, ...} with a shared metatable whose
 * __tostring prints "kind: message". The Lua layer makes its own errors
 * (kind "rejected" and so on) with core.error so they look the same.
 */
#include "binding.h"

#include <string.h>

static const char ERROR_MT[] = "eventsourcing.error";

static int error_tostring(lua_State *L)
{
    lua_getfield(L, 1, "kind");
    lua_getfield(L, 1, "message");
    lua_pushfstring(L, "%s: %s", luaL_optstring(L, -2, "error"),
                    luaL_optstring(L, -1, "(no message)"));
    return 1;
}

static void push_expected(lua_State *L, int64_t v)
{
    switch (v) {
    case ES_ANY: lua_pushliteral(L, "any"); break;
    case ES_NO_STREAM: lua_pushliteral(L, "no_stream"); break;
    case ES_STREAM_EXISTS: lua_pushliteral(L, "stream_exists"); break;
    default: esl_pushint64(L, v);
    }
}

int esl_push_error(lua_State *L, const es_error *err)
{
    lua_pushnil(L);
    lua_createtable(L, 0, 4);
    lua_pushstring(L, es_kind_name(err->kind));
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, err->message);
    lua_setfield(L, -2, "message");
    if (es_reason_name(err->reason)) {
        lua_pushstring(L, es_reason_name(err->reason));
        lua_setfield(L, -2, "reason");
    }
    if (err->sqlstate[0]) {
        lua_pushstring(L, err->sqlstate);
        lua_setfield(L, -2, "sqlstate");
    }
    if (err->kind == ES_CONFLICT) {
        push_expected(L, err->expected);
        lua_setfield(L, -2, "expected");
        esl_pushint64(L, err->actual);
        lua_setfield(L, -2, "actual");
    }
    luaL_getmetatable(L, ERROR_MT);
    lua_setmetatable(L, -2);
    return 2;
}

int esl_push_fail(lua_State *L, es_kind kind, const char *message)
{
    es_error err;
    es_error_clear(&err);
    es_fail(&err, kind, "%s", message);
    return esl_push_error(L, &err);
}

/* core.error(kind, message [, fields]) -> err table (not nil, err). */
static int error_new(lua_State *L)
{
    const char *kind = luaL_checkstring(L, 1);
    const char *message = luaL_checkstring(L, 2);
    if (!lua_isnoneornil(L, 3))
        luaL_checktype(L, 3, LUA_TTABLE);
    lua_createtable(L, 0, 4);
    if (!lua_isnoneornil(L, 3)) {
        lua_pushnil(L);
        while (lua_next(L, 3)) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, -4);
        }
    }
    lua_pushstring(L, kind);
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, message);
    lua_setfield(L, -2, "message");
    luaL_getmetatable(L, ERROR_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* core.is_error(v) -> true when v is an error table. */
static int error_is(lua_State *L)
{
    int yes = 0;
    if (lua_getmetatable(L, 1)) {
        luaL_getmetatable(L, ERROR_MT);
        yes = lua_rawequal(L, -1, -2);
    }
    lua_pushboolean(L, yes);
    return 1;
}

void errors_open(lua_State *L)
{
    luaL_newmetatable(L, ERROR_MT);
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "eventsourcing.error");
    lua_setfield(L, -2, "__name");
    lua_pop(L, 1);
    lua_pushcfunction(L, error_new);
    lua_setfield(L, -2, "error");
    lua_pushcfunction(L, error_is);
    lua_setfield(L, -2, "is_error");
}
