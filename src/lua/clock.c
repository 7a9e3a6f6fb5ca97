/*
 * clock.c - time for the Lua layer: wall and monotonic clocks with
 * sub-second resolution (Lua has neither), sleeping, and ISO-8601 instants
 * read and written exactly as the stores do (src/core/time.c), so that
 * every layer agrees on what "2026-01-15T10:00:00Z" means.
 */
#include "binding.h"
#include "../core/es_time.h"

#include <errno.h>
#include <time.h>

/* core.now() -> seconds since the epoch (UTC), microsecond resolution */
static int l_now(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)es_time_now() / 1e6);
    return 1;
}

/* core.monotonic() -> seconds on a clock that never steps back */
static int l_monotonic(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

/* core.sleep(seconds): blocks the calling thread (never call it from an
 * nginx request handler: use ngx.sleep there). */
static int l_sleep(lua_State *L)
{
    lua_Number s = luaL_checknumber(L, 1);
    struct timespec ts, rest;
    luaL_argcheck(L, s >= 0 && s <= 86400, 1, "seconds out of range");
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (lua_Number)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &rest) < 0 && errno == EINTR)
        ts = rest;
    return 0;
}

/* core.time_parse(iso) -> seconds since the epoch | nil, err */
static int l_time_parse(lua_State *L)
{
    const char *text = luaL_checkstring(L, 1);
    int64_t usec;
    es_error err;
    es_error_clear(&err);
    if (es_time_parse(text, &usec, &err) < 0)
        return esl_push_error(L, &err);
    lua_pushnumber(L, (lua_Number)usec / 1e6);
    return 1;
}

/* core.time_format(seconds) -> "YYYY-MM-DDTHH:MM:SS.ffffffZ" */
static int l_time_format(lua_State *L)
{
    lua_Number s = luaL_checknumber(L, 1);
    char out[32];
    /* the years es_time_parse reads: 0001-01-01 to 9999-12-31 (UTC) */
    luaL_argcheck(L, s >= -62135596800.0 && s < 253402300800.0, 1,
                  "instant out of range");
    es_time_format((int64_t)(s * 1e6 + (s >= 0 ? 0.5 : -0.5)), out);
    lua_pushstring(L, out);
    return 1;
}

void clock_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"now", l_now},
        {"monotonic", l_monotonic},
        {"sleep", l_sleep},
        {"time_parse", l_time_parse},
        {"time_format", l_time_format},
        {NULL, NULL}
    };
    esl_setfuncs(L, fns);
}
