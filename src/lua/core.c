/*
 * core.c - luaopen_eventsourcing_core: wires the binding's parts into the
 * module table. Each part lives in its own file with an <area>_open.
 */
#include "compat.h"
#include "json.h"
#include "binding.h"
#include "eventsourcing.h"

int esl_typeerror(lua_State *L, int idx, const char *expected)
{
    const char *msg = lua_pushfstring(L, "%s expected, got %s", expected,
                                      luaL_typename(L, idx));
    return luaL_argerror(L, idx, msg);
}

#if LUA_VERSION_NUM < 502
void esl_setfuncs(lua_State *L, const luaL_Reg *r)
{
    for (; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, -2, r->name);
    }
}
#endif

int esl_toint64(lua_State *L, int idx, long long *out)
{
    /* numbers only: "5" is a string, not a version or a limit */
    if (lua_type(L, idx) != LUA_TNUMBER)
        return 0;
#if LUA_VERSION_NUM >= 503
    int isnum;
    lua_Integer i = lua_tointegerx(L, idx, &isnum);
    if (isnum) {
        *out = (long long)i;
        return 1;
    }
    return 0;
#else
    lua_Number n = lua_tonumber(L, idx);
    if (n != n || n < -9007199254740992.0 || n > 9007199254740992.0 ||
        (lua_Number)(long long)n != n)
        return 0;
    *out = (long long)n;
    return 1;
#endif
}

#if defined(__GNUC__)
__attribute__((visibility("default")))
#endif
int luaopen_eventsourcing_core(lua_State *L);

int luaopen_eventsourcing_core(lua_State *L)
{
    lua_newtable(L);
    lua_pushliteral(L, ES_VERSION);
    lua_setfield(L, -2, "_VERSION");
    errors_open(L);
    json_open(L);
    store_open(L);
    clock_open(L);
    ids_open(L);
    process_open(L);
    keyset_open(L);
    lazy_open(L);
    return 1;
}
