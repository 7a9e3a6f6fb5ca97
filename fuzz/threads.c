/*
 * threads.c - not a fuzz target: opens eventsourcing.core in several Lua
 * states on several threads at once and runs the codec in each, the way
 * nginx's thread pool does. Built with ThreadSanitizer (`make
 * build/tsan/threads`); spec/09_threads_spec.lua runs it. Any data race
 * in what the module sets up or shares (it once built the codec's tables
 * at first use behind an unsynchronized flag) is a TSan report and a
 * non-zero exit.
 */
#include "../src/lua/compat.h"

#include <pthread.h>
#include <stdio.h>

#define THREADS 8
#define ROUNDS 200

int luaopen_eventsourcing_core(lua_State *L);

static pthread_barrier_t start;

static const char SCRIPT[] =
    "local core = ...\n"
    "local text = '[\"caf\\\\u00e9\",1.5,-0.0,{\"k\":[true,null]},\"\\\\t\"]'\n"
    "for _ = 1, 50 do\n"
    "  local v = assert(core.json.decode(text))\n"
    "  assert(core.json.decode(assert(core.json.encode(v)))[1] == 'caf\\195\\169')\n"
    "  assert(not core.json.valid or core.json.valid(text))\n"
    "end\n";

static void *worker(void *arg)
{
    long failures = 0;
    (void)arg;
    pthread_barrier_wait(&start);
    for (int r = 0; r < ROUNDS; r++) {
        lua_State *L = luaL_newstate();
        luaL_openlibs(L);
        lua_pushcfunction(L, luaopen_eventsourcing_core);
        lua_call(L, 0, 1);
        if (luaL_loadstring(L, SCRIPT) != LUA_OK) {
            fprintf(stderr, "%s\n", lua_tostring(L, -1));
            failures++;
        } else {
            lua_insert(L, -2);
            if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
                fprintf(stderr, "%s\n", lua_tostring(L, -1));
                failures++;
            }
        }
        lua_close(L);
    }
    return (void *)failures;
}

int main(void)
{
    pthread_t t[THREADS];
    long failures = 0;
    pthread_barrier_init(&start, NULL, THREADS);
    for (int i = 0; i < THREADS; i++)
        if (pthread_create(&t[i], NULL, worker, NULL) != 0)
            return 2;
    for (int i = 0; i < THREADS; i++) {
        void *f;
        pthread_join(t[i], &f);
        failures += (long)f;
    }
    printf("%d threads x %d states: %ld failures\n", THREADS, ROUNDS, failures);
    return failures ? 1 : 0;
}
