/*
 * copy_text.c - Lua rows as PostgreSQL COPY text (store:copy_rows).
 *
 * One line per row, fields in the order of the columns, separated by tabs;
 * nil and es.json.null are \N, booleans true/false, numbers as es.json
 * writes them, strings with backslash, newline, carriage return and tab
 * escaped, tables as their JSON text (escaped the same way). In a column
 * named as json, every value is its JSON text (a string "123" stays a
 * string): the same values a row written as JSON (json_populate_recordset)
 * gets. In a column named as integers, a float with an integral value
 * goes as an integer (Lua 5.4 writes 2500.0 otherwise, which a bigint
 * column refuses): read models copy their rows as the handlers left them,
 * without a cleaned copy of each. Any other value is refused with its row
 * and column named, before anything is sent.
 */
#include "binding.h"
#include "json.h"
#include "../core/json_syntax.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* The byte COPY's text format escapes c as (after a backslash), or 0. */
static char escape_of(unsigned char c)
{
    switch (c) {
    case '\\': return '\\';
    case '\n': return 'n';
    case '\r': return 'r';
    case '\t': return 't';
    default: return 0;
    }
}

/* Escapes, in place, the bytes of b from `from` to its end. */
static int escape_tail(es_buf *b, size_t from)
{
    size_t extra = 0, n = b->len - from;
    const unsigned char *s = (const unsigned char *)b->data + from;
    for (size_t i = 0; i < n; i++)
        extra += escape_of(s[i]) != 0;
    if (extra == 0)
        return 0;
    if (es_buf_reserve(b, extra) < 0)
        return -1;
    /* from the end backwards: each byte moves right by the escapes
     * before it */
    char *d = b->data + from;
    size_t w = n + extra;
    for (size_t r = n; r-- > 0;) {
        char e = escape_of((unsigned char)d[r]);
        if (e) {
            d[--w] = e;
            d[--w] = '\\';
        } else {
            d[--w] = d[r];
        }
    }
    b->len += extra;
    return 0;
}

/* The number at the top of the stack as an integer into out, when it is
 * an integral float within int64's range: 1, else 0. */
static int integral_float(lua_State *L, char *out, size_t outlen)
{
    lua_Number v = lua_tonumber(L, -1);
    /* 2^63 is the first double past int64's range */
    if (esl_isinteger(L, -1) || v != floor(v) || !(fabs(v) < 9223372036854775808.0))
        return 0;
    snprintf(out, outlen, "%lld", (long long)v);
    return 1;
}

/* Appends the field for the value at the top of the stack; ctx is the
 * JSON context (esl_json_context), whose third value is es.json.null;
 * flags the column's ESL_COPY_* bits. -1 with msg filled when it cannot
 * be stored. */
static int add_field(lua_State *L, es_buf *b, int ctx, int flags,
                     char *msg, size_t msglen)
{
    int null_idx = ctx + 2, as_json = flags & ESL_COPY_JSON;
    size_t from = b->len, len;
    const char *s;
    char num[24];
    int rc = 0, type = lua_type(L, -1);

    if (type == LUA_TNIL || lua_rawequal(L, -1, null_idx))
        return es_buf_add(b, "\\N", 2);
    if (type == LUA_TNUMBER && (flags & ESL_COPY_INT) &&
        integral_float(L, num, sizeof num))
        return es_buf_adds(b, num);
    if (as_json && (type == LUA_TSTRING || type == LUA_TBOOLEAN))
        type = LUA_TTABLE;      /* encoded below, as JSON */
    switch (type) {
    case LUA_TBOOLEAN:
        return es_buf_adds(b, lua_toboolean(L, -1) ? "true" : "false");
    case LUA_TSTRING:
        s = lua_tolstring(L, -1, &len);
        if (memchr(s, '\0', len)) {
            snprintf(msg, msglen, "a string contains a NUL byte");
            return -1;
        }
        rc = es_buf_add(b, s, len);
        break;
    case LUA_TNUMBER:
    case LUA_TTABLE:
        if (esl_json_encode_ctx(L, ctx, -1, b, msg, msglen) < 0)
            return -1;
        /* JSON the library writes is always what jsonb can hold (read
         * models compare json columns as jsonb): a NUL byte, \u0000 in
         * JSON, is refused in JSON as in text. The encoder writes no
         * other escape jsonb refuses. */
        if (as_json && es_json_jsonb_unsafe(b->data + from, b->len - from)) {
            snprintf(msg, msglen, "a string contains a NUL byte");
            return -1;
        }
        break;
    default:
        snprintf(msg, msglen, "a %s cannot be stored",
                 luaL_typename(L, -1));
        return -1;
    }
    if (rc < 0 || escape_tail(b, from) < 0) {
        snprintf(msg, msglen, "out of memory");
        return -1;
    }
    return 0;
}

/* The ESL_COPY_* flags of column c (1-based). */
static int col_flags(lua_State *L, int cols, int flag_tbl, size_t c)
{
    int f;
    lua_rawgeti(L, cols, (int)c);
    lua_rawget(L, flag_tbl);
    f = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return f;
}

/* Columns whose flags are looked up once per call rather than per row
 * (the rest, rare, per row). */
#define FLAGGED_COLS 64

int esl_copy_text(lua_State *L, int rows, int cols, int flag_tbl,
                  size_t ncols, size_t nrows, es_buf *out, char *msg,
                  size_t msglen)
{
    int ctx;
    char why[200], flags[FLAGGED_COLS];

    luaL_checkstack(L, 8, "copy rows");
    ctx = esl_json_context(L);
    for (size_t c = 1; c <= ncols && c <= FLAGGED_COLS; c++)
        flags[c - 1] = (char)col_flags(L, cols, flag_tbl, c);
    for (size_t r = 1; r <= nrows; r++) {
        lua_rawgeti(L, rows, (int)r);
        if (!lua_istable(L, -1)) {
            snprintf(msg, msglen, "row %zu is a %s, not a table", r,
                     luaL_typename(L, -1));
            return -1;
        }
        for (size_t c = 1; c <= ncols; c++) {
            if (c > 1 && es_buf_addc(out, '\t') < 0)
                return snprintf(msg, msglen, "out of memory"), -1;
            int f = c <= FLAGGED_COLS ? flags[c - 1]
                                      : col_flags(L, cols, flag_tbl, c);
            lua_rawgeti(L, cols, (int)c);
            lua_rawget(L, -2);
            if (add_field(L, out, ctx, f, why, sizeof why) < 0) {
                lua_rawgeti(L, cols, (int)c);
                snprintf(msg, msglen, "row %zu, column %s: %s", r,
                         lua_tostring(L, -1), why);
                return -1;
            }
            lua_pop(L, 1);
        }
        if (es_buf_addc(out, '\n') < 0)
            return snprintf(msg, msglen, "out of memory"), -1;
        lua_pop(L, 1);
    }
    return 0;
}
