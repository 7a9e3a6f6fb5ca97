/*
 * json_roundtrip.c - decode -> encode -> decode on any bytes that decode.
 * Properties: whatever decodes encodes; the encoding is valid JSON to the
 * core's validator; decoding it gives a value equal to the first (shapes,
 * integer/float and -0.0 included).
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
    es_buf b;

    if (esl_json_decode(L, (const char *)data, size, msg, sizeof msg) < 0)
        return 0;
    es_buf_init(&b);
    FUZZ_CHECK(esl_json_encode(L, 1, &b, msg, sizeof msg) == 0,
               "a decoded value does not encode", data, size);
    FUZZ_CHECK(es_json_check(b.data, b.len, 0, ESL_JSON_MAX_DEPTH, &pr) == 0,
               "encode wrote text the validator refuses", data, size);
    FUZZ_CHECK(esl_json_decode(L, b.data, b.len, msg, sizeof msg) == 0,
               "encode wrote text decode refuses", data, size);
    FUZZ_CHECK(fuzz_same(L, 1, 2), "decode(encode(decode(x))) differs",
               data, size);
    es_buf_free(&b);
    return 0;
}

FUZZ_LUA_TARGET(run)
