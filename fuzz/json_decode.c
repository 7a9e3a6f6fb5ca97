/*
 * json_decode.c - the codec's decoder on any bytes. Properties: no crash
 * or sanitizer report; every refusal names a byte offset; the decoder
 * accepts exactly what the core's validator (json_syntax.c, the memory
 * store's) accepts at the same depth, except numbers too large for a
 * double, which only the decoder refuses.
 */
#include "fuzz.h"
#include "../src/lua/json.h"
#include "../src/core/json_syntax.h"

#include <string.h>

static int run(const uint8_t *data, size_t size)
{
    lua_State *L = fuzz_lua();
    char msg[256];
    es_json_problem pr;
    const char *text = (const char *)data;
    int dec = esl_json_decode(L, text, size, msg, sizeof msg);
    int valid = es_json_check(text, size, 0, ESL_JSON_MAX_DEPTH, &pr);

    if (dec < 0) {
        FUZZ_CHECK(lua_gettop(L) == 0, "decode failed but left values",
                   data, size);
        FUZZ_CHECK(strstr(msg, " at byte ") != NULL,
                   "decode error without a byte offset", data, size);
        FUZZ_CHECK(valid < 0 || strstr(msg, "out of range"),
                   "decoder refuses what the validator accepts", data, size);
    } else {
        FUZZ_CHECK(lua_gettop(L) == 1, "decode left not one value", data,
                   size);
        FUZZ_CHECK(valid == 0, "decoder accepts what the validator refuses",
                   data, size);
    }
    return 0;
}

FUZZ_LUA_TARGET(run)
