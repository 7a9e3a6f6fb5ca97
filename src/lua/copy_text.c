/*
 * copy_text.c - Lua rows as PostgreSQL COPY text (store:copy_rows).
 *
 * One line per row, fields in the order of the columns, separated by tabs;
 * nil and es.json.null are \N, booleans true/false, numbers as es.json
 * writes them, strings with backslash, newline, carriage return and tab
 * escaped, tables as their JSON text (escaped the same way). In a column
 * named as json, every value is its JSON text (a string "123" stays a
 * string): the same values a row written as JSON (json_populate_recordset)
 * gets. Any other value is refused with its row and column named, before
 * anything is sent.
 */
#include "binding.h"
#include "json.h"

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

/* Appends the field for the value at the top of the stack; ctx is the
 * JSON context (esl_json_context), whose third value is es.json.null. -1
 * with msg filled when it cannot be stored. */
static int add_field(lua_State *L, es_buf *b, int ctx, int as_json,
                     char *msg, size_t msglen)
{
    int null_idx = ctx + 2;
    size_t from = b->len, len;
    const char *s;
    int rc = 0, type = lua_type(L, -1);

    if (type == LUA_TNIL || lua_rawequal(L, -1, null_idx))
        return es_buf_add(b, "\\N", 2);
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

/* Whether column c (1-based) is named in json_cols. */
static int json_col(lua_State *L, int cols, int json_cols, size_t c)
{
    int as_json;
    lua_rawgeti(L, cols, (int)c);
    lua_rawget(L, json_cols);
    as_json = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return as_json;
}

/* Columns whose json flag is looked up once per call rather than per row
 * (the rest, rare, per row). */
#define FLAGGED_COLS 64

int esl_copy_text(lua_State *L, int rows, int cols, int json_cols,
                  size_t ncols, size_t nrows, es_buf *out, char *msg,
                  size_t msglen)
{
    int ctx;
    char why[200], flags[FLAGGED_COLS];

    luaL_checkstack(L, 8, "copy rows");
    ctx = esl_json_context(L);
    for (size_t c = 1; c <= ncols && c <= FLAGGED_COLS; c++)
        flags[c - 1] = (char)json_col(L, cols, json_cols, c);
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
            int as_json = c <= FLAGGED_COLS ? flags[c - 1]
                                            : json_col(L, cols, json_cols, c);
            lua_rawgeti(L, cols, (int)c);
            lua_rawget(L, -2);
            if (add_field(L, out, ctx, as_json, why, sizeof why) < 0) {
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
