/*
 * compat.h - the few Lua 5.2+ API pieces missing from LuaJIT's 5.1 API.
 * Helpers carry the project's esl_ prefix: LuaJIT's lauxlib.h already
 * declares several luaL_* 5.2 functions, so same-named shims would clash.
 */
#ifndef ESL_COMPAT_H
#define ESL_COMPAT_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#if LUA_VERSION_NUM >= 502
#define esl_rawlen(L, i) lua_rawlen((L), (i))
#define esl_absindex(L, i) lua_absindex((L), (i))
#else
#define esl_rawlen(L, i) lua_objlen((L), (i))
#define esl_absindex(L, i) \
    (((i) > 0 || (i) <= LUA_REGISTRYINDEX) ? (i) : lua_gettop(L) + (i) + 1)
#endif

#if LUA_VERSION_NUM >= 504
#define esl_newuserdata(L, sz) lua_newuserdatauv((L), (sz), 1)
#else
#define esl_newuserdata(L, sz) lua_newuserdata((L), (sz))
#endif

/* luaL_setfuncs without upvalues: functions r[] (ending with a NULL
 * name) into the table on top of the stack. */
#if LUA_VERSION_NUM >= 502
#define esl_setfuncs(L, r) luaL_setfuncs((L), (r), 0)
#else
void esl_setfuncs(lua_State *L, const luaL_Reg *r);
#endif

/* Lua 5.3+ has real integers; LuaJIT numbers are doubles. */
#if LUA_VERSION_NUM >= 503
#define ESL_HAS_INTEGERS 1
#define esl_pushint64(L, v) lua_pushinteger((L), (lua_Integer)(v))
#define esl_isinteger(L, i) lua_isinteger((L), (i))
#else
#define ESL_HAS_INTEGERS 0
#define esl_pushint64(L, v) lua_pushnumber((L), (lua_Number)(v))
#define esl_isinteger(L, i) 0
#endif

/* Raises "bad argument #idx to 'f' (T expected, got U)", the standard
 * wording, on every Lua version. */
int esl_typeerror(lua_State *L, int idx, const char *expected);

/* Reads an integral number (an integer, or a float with an exact integer
 * value) into *out; returns 0 when the value is not one. */
int esl_toint64(lua_State *L, int idx, long long *out);

#endif
