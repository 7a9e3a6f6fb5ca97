/*
 * fuzz.h - what the libFuzzer targets share: a Lua 5.4 state with the
 * module's core opened in it (the codec decodes onto a Lua stack), a deep
 * comparison of Lua values, and a check that stops the run with a message.
 * Only the fuzz binaries link liblua5.4; the module never does.
 */
#ifndef ES_FUZZ_H
#define ES_FUZZ_H

#include <stddef.h>
#include <stdint.h>

#include "../src/lua/compat.h"

/* The shared state, with eventsourcing.core opened and the stack empty. */
lua_State *fuzz_lua(void);
/* Empties the stack and collects garbage, so a run frees what it
 * allocated: libFuzzer then skips its leak scan, which otherwise runs
 * after every input and takes most of the time. */
void fuzz_lua_done(void);
/* LLVMFuzzerTestOneInput for a target whose runs use the Lua state. */
#define FUZZ_LUA_TARGET(run) \
    int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) \
    { \
        int rc_ = run(data, size); \
        fuzz_lua_done(); \
        return rc_; \
    }
/* 1 when the values at a and b are equal: same types, integers and floats
 * told apart, floats bit for bit (-0.0 is not 0.0), strings byte for byte,
 * tables key by key with the same metatable. */
int fuzz_same(lua_State *L, int a, int b);
/* Reports a broken property with the input, then aborts (a finding). */
void fuzz_fail(const char *what, const uint8_t *data, size_t size);
#define FUZZ_CHECK(cond, what, data, size) \
    do { if (!(cond)) fuzz_fail((what), (data), (size)); } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#endif
