/*
 * meta_version.c - lazy events' schema_version read off the metadata's
 * text (lazy.c) on any bytes. Properties: no crash or sanitizer report;
 * whenever it says a version and the text is JSON the decoder takes, the
 * decoded metadata is an object whose schema_version is that integer (what
 * upcast_event would have read); the bytes are never written.
 */
#include "fuzz.h"
#include "../src/lua/binding.h"
#include "../src/lua/json.h"

#include <stdlib.h>
#include <string.h>

static int run(const uint8_t *data, size_t size)
{
    lua_State *L = fuzz_lua();
    char msg[256];
    const char *text = (const char *)data;
    int64_t v = 0;
    /* its own copy, exactly size bytes: a read past the end is reported */
    char *copy = malloc(size ? size : 1);
    if (!copy)
        abort();
    memcpy(copy, data, size);
    int found = esl_meta_schema_version(copy, size, &v);
    FUZZ_CHECK(memcmp(copy, data, size) == 0, "the metadata text was changed",
               data, size);
    free(copy);
    if (!found || esl_json_decode(L, text, size, msg, sizeof msg) < 0)
        return 0;
    FUZZ_CHECK(v >= 1 && v <= ((int64_t)1 << 53), "a version out of 1..2^53",
               data, size);
    FUZZ_CHECK(lua_istable(L, -1), "a version read off JSON that is not an object",
               data, size);
    lua_getfield(L, -1, "schema_version");
    FUZZ_CHECK(lua_isinteger(L, -1) && lua_tointeger(L, -1) == v,
               "the version read differs from the decoded metadata's", data, size);
    return 0;
}

FUZZ_LUA_TARGET(run)
