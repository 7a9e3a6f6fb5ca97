/*
 * json.c - the JSON codec (es.json), in the style of lua-cjson: table-driven
 * lexing and escaping, one reusable output buffer, decoding straight onto
 * the Lua stack (no intermediate tree).
 *
 * Choices (the Lua contract is in README.md, "JSON"; these are the details):
 *
 * - Shapes are explicit. Decoded arrays (also empty ones) get a shared
 *   "array" metatable and decoded objects a shared "object" metatable, so a
 *   decoded value re-encodes with the same shape. es.json.array(t) and
 *   es.json.object(t) set those metatables on t and return t.
 * - Unmarked tables (no metatable, or any other metatable: metamethods are
 *   never called, access is raw): keys exactly 1..n -> array; all keys
 *   strings -> object; an EMPTY unmarked table encodes as "{}" (use
 *   es.json.array({}) for "[]"); anything else (holes, mixed keys) is an
 *   error. A table marked as object may also have integer keys, written as
 *   their decimal strings. Object key order is the table's traversal order
 *   (unspecified, like cjson).
 * - es.json.null is a unique full userdata whose __tostring is "null"
 *   (distinct from nil and from cjson.null; truthy like any userdata).
 *   decode("null") returns it and it encodes as null. encode(nil) gives
 *   "null" too.
 * - Numbers: on Lua 5.3+ integers stay integers and floats always carry a
 *   '.' or an exponent ("3.0"), so math.type survives a round trip; JSON
 *   integers outside int64 decode as floats. On LuaJIT integral numbers up
 *   to 2^53 are written without fraction ("3"). Floats are written with the
 *   shortest of %.15g/%.16g/%.17g that strtod reads back exactly; -0.0 is
 *   written "-0.0". NaN and infinities are errors, and so are JSON numbers
 *   too large for a double (1e400).
 * - Locale: the number text is made independent of LC_NUMERIC: encode
 *   replaces the locale's (single-byte) decimal point by '.', and decode
 *   retries strtod with the locale's decimal point when '.' was not
 *   accepted (an nginx that calls setlocale() keeps working).
 * - Strings must be valid UTF-8 on both sides (no overlongs, no encoded
 *   surrogates, nothing above U+10FFFF). Encode escapes '"', '\\', control
 *   characters and U+2028/U+2029 (for JavaScript consumers) and leaves other
 *   UTF-8 as it is. Decode accepts every JSON escape; \u surrogates must
 *   come in pairs.
 * - Byte offsets in decode errors are 1-based, like Lua string positions.
 * - Nesting deeper than ESL_JSON_MAX_DEPTH is an error on both sides;
 *   recursion is bounded by that depth and the Lua stack is grown with
 *   lua_checkstack, so no input can overflow the C stack.
 * - Memory: the Lua-facing encode writes into a buffer owned by a userdata
 *   (an upvalue of encode), reused across calls, so an error raised
 *   mid-encode (out of memory) never leaks. Encode calls no Lua code and
 *   creates no Lua objects before the final string, so it is not re-entered
 *   by finalizers. Escaped strings are decoded through luaL_Buffer.
 */
#include "json.h"
#include "binding.h"
#include "../core/json_syntax.h"

#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REG_ARRAY "eventsourcing.json.array"
#define REG_OBJECT "eventsourcing.json.object"
#define REG_NULL "eventsourcing.json.null"
#define BUFFER_MT "eventsourcing.json.buffer"
#define NULL_MT "eventsourcing.json.nullmt"

/* Buffers that grew beyond this are released after a Lua-facing encode. */
#define KEEP_BUFFER_MAX (1u << 20)

#define MSG_MAX 256

/* ------------------------------------------------------------------ */
/* Character tables                                                    */

/* The lexer's tables (whitespace, plain string bytes, hex digits) and
 * UTF-8 validation are the core's (json_syntax.h), shared with the memory
 * store's validator. These are the encoder's own; all are constant data,
 * so VMs opened at once on nginx's pool threads share them safely. */

/* Escape text for the ASCII bytes encode must escape (NULL: copy). */
static const char *const esc_text[128] = {
    [0x00] = "\\u0000", [0x01] = "\\u0001", [0x02] = "\\u0002",
    [0x03] = "\\u0003", [0x04] = "\\u0004", [0x05] = "\\u0005",
    [0x06] = "\\u0006", [0x07] = "\\u0007", [0x08] = "\\b",
    [0x09] = "\\t",     [0x0a] = "\\n",     [0x0b] = "\\u000b",
    [0x0c] = "\\f",     [0x0d] = "\\r",     [0x0e] = "\\u000e",
    [0x0f] = "\\u000f", [0x10] = "\\u0010", [0x11] = "\\u0011",
    [0x12] = "\\u0012", [0x13] = "\\u0013", [0x14] = "\\u0014",
    [0x15] = "\\u0015", [0x16] = "\\u0016", [0x17] = "\\u0017",
    [0x18] = "\\u0018", [0x19] = "\\u0019", [0x1a] = "\\u001a",
    [0x1b] = "\\u001b", [0x1c] = "\\u001c", [0x1d] = "\\u001d",
    [0x1e] = "\\u001e", [0x1f] = "\\u001f",
    ['"'] = "\\\"",    ['\\'] = "\\\\",
};
/* Their lengths: 6 for \u00XX, 2 for the short forms. */
static const unsigned char esc_len[128] = {
    6, 6, 6, 6, 6, 6, 6, 6, 2, 2, 2, 6, 2, 2, 6, 6,
    6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6,
    ['"'] = 2, ['\\'] = 2,
};

static const char DIGITS2[] =
    "00010203040506070809101112131415161718192021222324252627282930313233"
    "34353637383940414243444546474849505152535455565758596061626364656667"
    "68697071727374757677787980818283848586878889909192939495969798"
    "99";

/* ------------------------------------------------------------------ */
/* Numbers                                                             */

/* Writes the decimal text of v at o; returns the end. */
static char *fmt_int(char *o, long long v)
{
    char tmp[24];
    char *t = tmp + sizeof tmp;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v
                                 : (unsigned long long)v;
    size_t len;
    while (u >= 100) {
        unsigned d = (unsigned)(u % 100) * 2;
        u /= 100;
        *--t = DIGITS2[d + 1];
        *--t = DIGITS2[d];
    }
    if (u >= 10) {
        unsigned d = (unsigned)u * 2;
        *--t = DIGITS2[d + 1];
        *--t = DIGITS2[d];
    } else {
        *--t = (char)('0' + u);
    }
    if (v < 0)
        *--t = '-';
    len = (size_t)(tmp + sizeof tmp - t);
    memcpy(o, t, len);
    return o + len;
}

/* Exact powers of ten (all are doubles up to 1e22). */
static const double P10[23] = {
    1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* Fast path of fmt_double for values with at most 8 decimals and fewer
 * than 15 digits in all (prices, ratios): m / 10^k with m < 2^53 is one
 * correctly rounded division, so when it gives back d, the text "m e-k" is
 * what strtod would read back as d and what %.15g would print. Returns
 * NULL when it does not apply. */
static char *fmt_double_fast(char *o, double d)
{
    double a = d < 0 ? -d : d;
    int k;
    if (!(a >= 1e-4 && a < 1e15))
        return NULL;
    for (k = 0; k <= 8; k++) {
        double x = a * P10[k], m;
        if (x >= 1e15)
            return NULL;
        m = floor(x + 0.5);
        if (m / P10[k] == a) {
            long long mi = (long long)m, pk = (long long)P10[k];
            long long ip = mi / pk, fp = mi % pk;
            int i;
            if (d < 0)
                *o++ = '-';
            o = fmt_int(o, ip);
            *o++ = '.';
            if (k == 0) {
                *o++ = '0';
                return o;
            }
            for (i = k - 1; i >= 0; i--) {
                o[i] = (char)('0' + fp % 10);
                fp /= 10;
            }
            return o + k;
        }
    }
    return NULL;
}

/* Writes the shortest text of the finite d that reads back exactly, with
 * a '.' or an exponent; returns the end. o has room for 32 bytes. */
static char *fmt_double(char *o, double d)
{
    int len, i, marked = 0;
    if (d == 0) {
        if (signbit(d)) {
            memcpy(o, "-0.0", 4);
            return o + 4;
        }
        memcpy(o, "0.0", 3);
        return o + 3;
    }
    {
        char *f = fmt_double_fast(o, d);
        if (f)
            return f;
    }
    len = snprintf(o, 32, "%.15g", d);
    if (strtod(o, NULL) != d) {
        len = snprintf(o, 32, "%.16g", d);
        if (strtod(o, NULL) != d)
            len = snprintf(o, 32, "%.17g", d);
    }
    for (i = 0; i < len; i++) {
        char c = o[i];
        if ((c >= '0' && c <= '9') || c == '-' || c == '+')
            continue;
        if (c != 'e')
            o[i] = '.'; /* the locale's decimal point */
        marked = 1;
    }
    if (!marked) {
        o[len++] = '.';
        o[len++] = '0';
    }
    return o + len;
}

/* ------------------------------------------------------------------ */
/* Encoder                                                             */

typedef struct enc {
    lua_State *L;
    es_buf *b;
    int mt_arr, mt_obj, null_idx; /* absolute stack indices */
    int depth;
    char *msg;
    size_t msglen;
    const void *seen[ESL_JSON_MAX_DEPTH + 1]; /* tables being encoded */
} enc;

static void enc_oom(enc *e)
{
    luaL_error(e->L, "not enough memory");
}

/* Room for n more bytes; returns the write position. */
static inline char *enc_room(enc *e, size_t n)
{
    es_buf *b = e->b;
    if (b->cap - b->len < n + 1 || b->cap == 0) {
        if (es_buf_reserve(b, n) < 0)
            enc_oom(e);
    }
    return b->data + b->len;
}

static inline void enc_put(enc *e, const char *s, size_t n)
{
    char *o = enc_room(e, n);
    memcpy(o, s, n);
    e->b->len += n;
}

static inline void enc_putc(enc *e, char c)
{
    char *o = enc_room(e, 1);
    *o = c;
    e->b->len++;
}

static int enc_fail(enc *e, const char *fmt, const char *arg)
{
    snprintf(e->msg, e->msglen, fmt, arg);
    return -1;
}

static int enc_string(enc *e, const char *str, size_t len)
{
    const unsigned char *p = (const unsigned char *)str, *end = p + len;
    char *o;
    if (len > ((size_t)-1 - 16) / 6)
        enc_oom(e);
    o = enc_room(e, len * 6 + 2);
    *o++ = '"';
    while (p < end) {
        const unsigned char *run = p;
        p = es_json_scan_plain(p, end);
        memcpy(o, run, (size_t)(p - run));
        o += p - run;
        if (p >= end)
            break;
        if (*p < 0x80) {
            memcpy(o, esc_text[*p], esc_len[*p]);
            o += esc_len[*p];
            p++;
        } else {
            const char *why = NULL;
            size_t n = es_utf8_seq(p, end, &why);
            if (!n) {
                char tmp[64];
                snprintf(tmp, sizeof tmp, "%s at byte %zu", why,
                         (size_t)(p - (const unsigned char *)str) + 1);
                return enc_fail(e, "string is not valid UTF-8 (%s)", tmp);
            }
            if (n == 3 && p[0] == 0xE2 && p[1] == 0x80 &&
                (p[2] == 0xA8 || p[2] == 0xA9)) {
                memcpy(o, p[2] == 0xA8 ? "\\u2028" : "\\u2029", 6);
                o += 6;
            } else {
                memcpy(o, p, n);
                o += n;
            }
            p += n;
        }
    }
    *o++ = '"';
    e->b->len = (size_t)(o - e->b->data);
    return 0;
}

static int enc_number(enc *e, int idx)
{
    lua_State *L = e->L;
    char *o;
#if ESL_HAS_INTEGERS
    if (lua_isinteger(L, idx)) {
        o = enc_room(e, 24);
        e->b->len = (size_t)(fmt_int(o, (long long)lua_tointeger(L, idx)) -
                             e->b->data);
        return 0;
    }
#endif
    {
        double d = (double)lua_tonumber(L, idx);
        if (d != d)
            return enc_fail(e, "cannot encode %s", "NaN");
        if (d == HUGE_VAL || d == -HUGE_VAL)
            return enc_fail(e, "cannot encode %s",
                            d > 0 ? "infinity" : "-infinity");
        o = enc_room(e, 32);
#if !ESL_HAS_INTEGERS
        if (d >= -9007199254740992.0 && d <= 9007199254740992.0 &&
            d == (double)(long long)d && !(d == 0 && signbit(d))) {
            e->b->len = (size_t)(fmt_int(o, (long long)d) - e->b->data);
            return 0;
        }
#endif
        e->b->len = (size_t)(fmt_double(o, d) - e->b->data);
        return 0;
    }
}

static int enc_value(enc *e, int idx);

static const char NOT_SHAPE[] =
    "table is neither an array nor an object (%s)";

/* Writes the array t[1..n]. */
static int enc_array_items(enc *e, int t, size_t n)
{
    lua_State *L = e->L;
    size_t i;
    enc_putc(e, '[');
    for (i = 1; i <= n; i++) {
        if (i > 1)
            enc_putc(e, ',');
        lua_rawgeti(L, t, (int)i);
        if (lua_isnil(L, -1))
            return enc_fail(e, NOT_SHAPE, "array has holes");
        if (enc_value(e, lua_gettop(L)) < 0)
            return -1;
        lua_pop(L, 1);
    }
    enc_putc(e, ']');
    return 0;
}

/* Counts the keys of t; fails unless they are all integers in 1..n.
 * Returns the count, or -1 on a foreign key. */
static long long count_index_keys(lua_State *L, int t, size_t n)
{
    long long count = 0, k;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER || !esl_toint64(L, -1, &k) ||
            k < 1 || (unsigned long long)k > n) {
            lua_pop(L, 1);
            return -1;
        }
        count++;
    }
    return count;
}

static int enc_object(enc *e, int t, int marked)
{
    lua_State *L = e->L;
    int first = 1;
    long long k;
    enc_putc(e, '{');
    lua_pushnil(L);
    while (lua_next(L, t)) {
        int kt = lua_type(L, -2);
        if (!first)
            enc_putc(e, ',');
        first = 0;
        if (kt == LUA_TSTRING) {
            size_t kl;
            const char *ks = lua_tolstring(L, -2, &kl);
            if (enc_string(e, ks, kl) < 0)
                return -1;
        } else if (kt == LUA_TNUMBER && esl_toint64(L, -2, &k)) {
            char *o;
            if (!marked)
                return enc_fail(e, NOT_SHAPE,
                                "keys are neither exactly 1..n nor all "
                                "strings");
            o = enc_room(e, 26);
            *o++ = '"';
            o = fmt_int(o, k);
            *o++ = '"';
            e->b->len = (size_t)(o - e->b->data);
        } else {
            char tn[40];
            snprintf(tn, sizeof tn, "%s",
                     kt == LUA_TNUMBER ? "non-integer number"
                                       : lua_typename(L, kt));
            return enc_fail(e,
                            "object key must be a string or an integer, "
                            "got %s", tn);
        }
        enc_putc(e, ':');
        if (enc_value(e, lua_gettop(L)) < 0)
            return -1;
        lua_pop(L, 1);
    }
    enc_putc(e, '}');
    return 0;
}

size_t esl_json_max_text = (size_t)1 << 30;

static int enc_table(enc *e, int t)
{
    lua_State *L = e->L;
    const void *ptr = lua_topointer(L, t);
    int i, kind = 0; /* 0 unmarked, 1 array, 2 object */
    size_t n;
    for (i = 0; i < e->depth; i++)
        if (e->seen[i] == ptr)
            return enc_fail(e, "%s",
                            "cannot encode a table that contains itself "
                            "(cycle)");
    if (e->depth >= ESL_JSON_MAX_DEPTH) {
        snprintf(e->msg, e->msglen, "nesting deeper than %d levels",
                 ESL_JSON_MAX_DEPTH);
        return -1;
    }
    if (e->b->len > esl_json_max_text)
        return enc_fail(e, "%s", "text too long (a table shared many times "
                        "over is written out each time)");
    if (!lua_checkstack(L, 6))
        return enc_fail(e, "%s", "nesting too deep (Lua stack exhausted)");
    e->seen[e->depth++] = ptr;
    if (lua_getmetatable(L, t)) {
        if (lua_rawequal(L, -1, e->mt_arr))
            kind = 1;
        else if (lua_rawequal(L, -1, e->mt_obj))
            kind = 2;
        lua_pop(L, 1);
    }
    if (kind == 2) {
        if (enc_object(e, t, 1) < 0)
            return -1;
    } else {
        n = esl_rawlen(L, t);
        if (n == 0 && kind == 0) {
            if (enc_object(e, t, 0) < 0)
                return -1;
        } else {
            long long count = count_index_keys(L, t, n);
            if (count != (long long)n)
                return enc_fail(e, NOT_SHAPE,
                                kind == 1
                                    ? "marked as array but its keys are "
                                      "not exactly 1..n"
                                    : "keys are neither exactly 1..n nor "
                                      "all strings");
            if (enc_array_items(e, t, n) < 0)
                return -1;
        }
    }
    e->depth--;
    return 0;
}

static int enc_value(enc *e, int idx)
{
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return enc_string(e, s, len);
    }
    case LUA_TNUMBER:
        return enc_number(e, idx);
    case LUA_TTABLE:
        return enc_table(e, idx);
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx))
            enc_put(e, "true", 4);
        else
            enc_put(e, "false", 5);
        return 0;
    case LUA_TNIL:
        enc_put(e, "null", 4);
        return 0;
    case LUA_TUSERDATA:
        if (lua_rawequal(L, idx, e->null_idx)) {
            enc_put(e, "null", 4);
            return 0;
        }
        /* fall through */
    default:
        return enc_fail(e, "cannot encode a %s",
                        lua_typename(L, lua_type(L, idx)));
    }
}

static int encode_with(lua_State *L, int idx, es_buf *b, int mt_arr,
                       int mt_obj, int null_idx, char *msg, size_t msglen)
{
    enc e;
    int top = lua_gettop(L), rc;
    e.L = L;
    e.b = b;
    e.mt_arr = mt_arr;
    e.mt_obj = mt_obj;
    e.null_idx = null_idx;
    e.depth = 0;
    e.msg = msg;
    e.msglen = msglen;
    rc = enc_value(&e, idx);
    lua_settop(L, top);
    return rc;
}

int esl_json_encode_ctx(lua_State *L, int ctx, int idx, es_buf *b,
                        char *msg, size_t msglen)
{
    size_t len0 = b->len;
    int rc;
    idx = esl_absindex(L, idx);
    luaL_checkstack(L, 8, "json encode");
    rc = encode_with(L, idx, b, ctx, ctx + 1, ctx + 2, msg, msglen);
    if (rc < 0)
        b->len = len0;
    return rc;
}

int esl_json_encode(lua_State *L, int idx, es_buf *b, char *msg,
                    size_t msglen)
{
    int top, rc;
    size_t len0 = b->len;
    idx = esl_absindex(L, idx);
    top = lua_gettop(L);
    luaL_checkstack(L, 8, "json encode");
    lua_getfield(L, LUA_REGISTRYINDEX, REG_ARRAY);
    lua_getfield(L, LUA_REGISTRYINDEX, REG_OBJECT);
    lua_getfield(L, LUA_REGISTRYINDEX, REG_NULL);
    rc = encode_with(L, idx, b, top + 1, top + 2, top + 3, msg, msglen);
    lua_settop(L, top);
    if (rc < 0)
        b->len = len0;
    return rc;
}

/* ------------------------------------------------------------------ */
/* Decoder                                                             */

typedef struct dec {
    lua_State *L;
    const unsigned char *start, *p, *end;
    int mt_arr, mt_obj, null_idx;
    int depth;
    char *msg;
    size_t msglen;
} dec;

static size_t dec_pos(const dec *d, const unsigned char *p)
{
    return (size_t)(p - d->start) + 1;
}

static int dec_fail(dec *d, const unsigned char *at, const char *what)
{
    snprintf(d->msg, d->msglen, "%s at byte %zu", what, dec_pos(d, at));
    return -1;
}

/* "unexpected character 'x' at byte N" (or end of input). */
static int dec_unexpected(dec *d, const unsigned char *at, const char *ctx)
{
    if (at >= d->end) {
        snprintf(d->msg, d->msglen, "unexpected end of input%s at byte %zu",
                 ctx, dec_pos(d, at));
    } else if (*at >= 0x21 && *at < 0x7F) {
        snprintf(d->msg, d->msglen, "unexpected character '%c'%s at byte %zu",
                 *at, ctx, dec_pos(d, at));
    } else {
        snprintf(d->msg, d->msglen, "unexpected byte 0x%02X%s at byte %zu",
                 *at, ctx, dec_pos(d, at));
    }
    return -1;
}

static inline void skip_ws(dec *d)
{
    const unsigned char *p = d->p, *end = d->end;
    while (p < end && es_json_ws[*p])
        p++;
    d->p = p;
}

static size_t put_utf8(char *o, unsigned long cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Reports a lexer problem (json_syntax.c) in the decoder's words. */
static int dec_problem(dec *d, const es_json_problem *pr)
{
    es_json_describe(pr, (const char *)d->start,
                     (size_t)(d->end - d->start), d->msg, d->msglen);
    return -1;
}

/* Pushes the string s[0..n) with its escapes (all valid: the lexer
 * checked them) turned into UTF-8, through luaL_Buffer. */
static int dec_unescape(dec *d, const unsigned char *s,
                        const unsigned char *end)
{
    lua_State *L = d->L;
    luaL_Buffer B;
    if (!lua_checkstack(L, 24))
        return dec_fail(d, s, "Lua stack exhausted");
    luaL_buffinit(L, &B);
    while (s < end) {
        const unsigned char *run = s;
        char tmp[4];
        size_t tl = 1;
        int cp;
        while (s < end && *s != '\\')
            s++;
        luaL_addlstring(&B, (const char *)run, (size_t)(s - run));
        if (s >= end)
            break;
        switch (s[1]) {
        case 'b': tmp[0] = '\b'; break;
        case 'f': tmp[0] = '\f'; break;
        case 'n': tmp[0] = '\n'; break;
        case 'r': tmp[0] = '\r'; break;
        case 't': tmp[0] = '\t'; break;
        case 'u':
            cp = es_json_hex4(s + 2);
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) +
                     (es_json_hex4(s + 8) - 0xDC00);
                s += 6;
            }
            tl = put_utf8(tmp, (unsigned long)cp);
            s += 4;
            break;
        default: tmp[0] = (char)s[1]; break;    /* " \\ / */
        }
        luaL_addlstring(&B, tmp, tl);
        s += 2;
    }
    luaL_pushresult(&B);
    return 0;
}

/* Pushes the string whose opening quote is at d->p. */
static int dec_string(dec *d)
{
    es_json_problem pr;
    int escaped = 0;
    const unsigned char *s = d->p + 1, *q = es_json_scan_plain(s, d->end);
    /* The common case, plain bytes up to the closing quote, needs no more
     * than the lexer's plain scan; anything else goes on from there by its
     * full string rule (escapes, UTF-8, control characters). */
    if (q < d->end && *q == '"') {
        lua_pushlstring(d->L, (const char *)s, (size_t)(q - s));
        d->p = q + 1;
        return 0;
    }
    q = es_json_string_rest(q, d->end, &escaped, &pr);
    if (!q)
        return dec_problem(d, &pr);
    d->p = q;
    if (!escaped) {
        lua_pushlstring(d->L, (const char *)s, (size_t)(q - 1 - s));
        return 0;
    }
    return dec_unescape(d, s, q - 1);
}

static int dec_number(dec *d)
{
    const unsigned char *s = d->p, *p = s, *end;
    unsigned long long u = 0; /* all the digits, while they fit */
    int neg = 0, isfloat = 0, lost = 0, fracdigits = 0, expv = 0;
    es_json_problem pr;
    /* The grammar is the lexer's; what follows only reads the digits. */
    if (!(end = es_json_number(s, d->end, &pr)))
        return dec_problem(d, &pr);
    if (*p == '-') {
        neg = 1;
        p++;
    }
    while (p < end && *p >= '0' && *p <= '9') {
        unsigned dg = (unsigned)(*p - '0');
        if (u > (~0ULL - dg) / 10)
            lost = 1;
        else
            u = u * 10 + dg;
        p++;
    }
    if (p < end && *p == '.') {
        p++;
        isfloat = 1;
        while (p < end && *p >= '0' && *p <= '9') {
            if (u < 100000000000000000ULL) {
                u = u * 10 + (unsigned)(*p - '0');
                fracdigits++;
            } else {
                lost = 1;
            }
            p++;
        }
    }
    if (p < end) {   /* the exponent */
        int eneg = 0;
        p++;
        isfloat = 1;
        if (*p == '+' || *p == '-')
            eneg = *p++ == '-';
        while (p < end) {
            if (expv < 100000)
                expv = expv * 10 + (*p - '0');
            p++;
        }
        if (eneg)
            expv = -expv;
    }
    d->p = p;
    if (!lost) {
        if (!isfloat) {
            if (neg ? u <= 9223372036854775808ULL
                    : u <= 9223372036854775807ULL) {
#if ESL_HAS_INTEGERS
                esl_pushint64(d->L,
                              neg ? (long long)(0ULL - u) : (long long)u);
#else
                double v = (double)u;
                lua_pushnumber(d->L, (lua_Number)(neg ? -v : v));
#endif
                return 0;
            }
        } else if (u <= 9007199254740992ULL) {
            /* Clinger's fast path: an exact mantissa and an exact power
             * of ten, one correctly rounded operation. */
            int e10 = expv - fracdigits;
            if (e10 >= -22 && e10 <= 22) {
                double v = (double)u;
                v = e10 < 0 ? v / P10[-e10] : v * P10[e10];
                lua_pushnumber(d->L, (lua_Number)(neg ? -v : v));
                return 0;
            }
        }
    }
    {
        char small[64], *tok = small, *ep;
        size_t len = (size_t)(p - s);
        double v;
        if (len >= sizeof small) {
            tok = malloc(len + 1);
            if (!tok)
                luaL_error(d->L, "not enough memory");
        }
        memcpy(tok, s, len);
        tok[len] = '\0';
        v = strtod(tok, &ep);
        if ((size_t)(ep - tok) != len) {
            /* a locale whose decimal point is not '.' */
            char *dot = strchr(tok, '.');
            const char *dp = localeconv()->decimal_point;
            if (dot && dp && dp[0] && !dp[1]) {
                *dot = dp[0];
                v = strtod(tok, &ep);
            }
        }
        if (tok != small)
            free(tok);
        if (v == HUGE_VAL || v == -HUGE_VAL)
            return dec_fail(d, s, "number out of range");
        lua_pushnumber(d->L, (lua_Number)v);
        return 0;
    }
}

static int dec_value(dec *d);

static int dec_enter(dec *d)
{
    if (++d->depth > ESL_JSON_MAX_DEPTH) {
        char what[64];
        snprintf(what, sizeof what, "nesting deeper than %d levels",
                 ESL_JSON_MAX_DEPTH);
        return dec_fail(d, d->p, what);
    }
    /* the outermost value's room is made once, by decode_with */
    if (d->depth > 1 && !lua_checkstack(d->L, 6))
        return dec_fail(d, d->p, "nesting too deep (Lua stack exhausted)");
    return 0;
}

static int dec_array(dec *d)
{
    lua_State *L = d->L;
    int i;
    if (dec_enter(d) < 0)
        return -1;
    d->p++;
    lua_createtable(L, 0, 0);
    lua_pushvalue(L, d->mt_arr);
    lua_setmetatable(L, -2);
    skip_ws(d);
    if (d->p < d->end && *d->p == ']') {
        d->p++;
        d->depth--;
        return 0;
    }
    for (i = 1;; i++) {
        if (dec_value(d) < 0)
            return -1;
        lua_rawseti(L, -2, i);
        skip_ws(d);
        if (d->p < d->end && *d->p == ',') {
            d->p++;
            skip_ws(d);
            if (d->p < d->end && *d->p == ']')
                return dec_fail(d, d->p, "trailing comma in array");
            continue;
        }
        if (d->p < d->end && *d->p == ']') {
            d->p++;
            break;
        }
        return dec_unexpected(d, d->p, " in array (',' or ']' expected)");
    }
    d->depth--;
    return 0;
}

/* Pairs of an object kept on the stack before its table is made: most
 * objects an event carries are this small, and a table made for its
 * size holds them without growing (each growth reallocates and rehashes
 * the keys so far). */
#define DEC_OBJ_PAIRS 8
/* Objects nested deeper than this are made at once (stack room). */
#define DEC_OBJ_STACKED_DEPTH 64

/* Room decode_with makes for the outermost value: an object's stacked
 * pairs, its table, a pair's copies (dec_make_object) and dec_enter's. */
#define DEC_TOP_ROOM (2 * DEC_OBJ_PAIRS + 9)

/* Where a stacked object's keys are in the text, to tell whether one is
 * given twice. */
typedef struct dec_keys {
    const unsigned char *s[DEC_OBJ_PAIRS];
    size_t len[DEC_OBJ_PAIRS];
    int plain;  /* no key has an escape (its bytes are its text) */
} dec_keys;

static void note_key(dec_keys *k, int i, const unsigned char *open,
                     const unsigned char *after)
{
    size_t len = (size_t)(after - open) - 2;   /* between the quotes */
    k->s[i] = open + 1;
    k->len[i] = len;
    if (memchr(open + 1, '\\', len))
        k->plain = 0;
}

/* 1 when the n keys are plain and all different. */
static int keys_distinct(const dec_keys *k, int n)
{
    if (!k->plain)
        return 0;
    for (int i = 1; i < n; i++)
        for (int j = 0; j < i; j++)
            if (k->len[i] == k->len[j] &&
                memcmp(k->s[i], k->s[j], k->len[i]) == 0)
                return 0;
    return 1;
}

/* The object table from the n pairs above base, whose keys are all
 * different: the table goes below them and takes them from the top (in
 * any order, as none replaces another), without copying each pair up
 * first as dec_make_object does. */
static void dec_take_pairs(dec *d, int base, int n)
{
    lua_State *L = d->L;
    lua_createtable(L, 0, n);
    lua_pushvalue(L, d->mt_obj);
    lua_setmetatable(L, -2);
    lua_insert(L, base + 1);
    for (int i = 0; i < n; i++)
        lua_rawset(L, base + 1);
}

/* The object table from the n pairs above base (the table then stands
 * at base + 1, the pairs gone); room for at least hint keys. */
static void dec_make_object(dec *d, int base, int n, int hint)
{
    lua_State *L = d->L;
    lua_createtable(L, 0, hint);
    lua_pushvalue(L, d->mt_obj);
    lua_setmetatable(L, -2);
    /* in order: of a key given twice, the last value stays */
    for (int i = 0; i < n; i++) {
        lua_pushvalue(L, base + 1 + 2 * i);
        lua_pushvalue(L, base + 2 + 2 * i);
        lua_rawset(L, -3);
    }
    if (n > 0) {
        lua_replace(L, base + 1);
        lua_settop(L, base + 1);
    }
}

static int dec_object(dec *d)
{
    lua_State *L = d->L;
    int base, n = 0, made = 0;
    dec_keys keys;
    if (dec_enter(d) < 0)
        return -1;
    d->p++;
    base = lua_gettop(L);
    keys.plain = 1;
    /* deep down, or no room for the pairs: the table at once. LuaJIT
     * gives a C call 8,000 stack slots, and objects nested 1,000 deep
     * that each held 8 pairs there would need twice that. The outermost
     * object's room is decode_with's. */
    if (d->depth > DEC_OBJ_STACKED_DEPTH ||
        (d->depth > 1 && !lua_checkstack(L, 2 * DEC_OBJ_PAIRS + 3))) {
        dec_make_object(d, base, 0, 0);
        made = 1;
    }
    skip_ws(d);
    if (d->p < d->end && *d->p == '}') {
        d->p++;
        d->depth--;
        if (!made)
            dec_make_object(d, base, 0, 0);
        return 0;
    }
    for (;;) {
        if (d->p >= d->end || *d->p != '"')
            return dec_unexpected(d, d->p, " in object (string key expected)");
        const unsigned char *open = d->p;
        if (dec_string(d) < 0)
            return -1;
        if (!made)
            note_key(&keys, n, open, d->p);
        skip_ws(d);
        if (d->p >= d->end || *d->p != ':')
            return dec_unexpected(d, d->p, " in object (':' expected)");
        d->p++;
        if (dec_value(d) < 0)
            return -1;
        if (made) {
            lua_rawset(L, base + 1);
        } else if (++n == DEC_OBJ_PAIRS) {
            dec_make_object(d, base, n, 2 * n);
            made = 1;
        }
        skip_ws(d);
        if (d->p < d->end && *d->p == ',') {
            d->p++;
            skip_ws(d);
            if (d->p < d->end && *d->p == '}')
                return dec_fail(d, d->p, "trailing comma in object");
            continue;
        }
        if (d->p < d->end && *d->p == '}') {
            d->p++;
            break;
        }
        return dec_unexpected(d, d->p, " in object (',' or '}' expected)");
    }
    if (!made) {
        if (keys_distinct(&keys, n))
            dec_take_pairs(d, base, n);
        else
            dec_make_object(d, base, n, n);
    }
    d->depth--;
    return 0;
}

static int dec_literal(dec *d, const char *word, size_t n)
{
    if ((size_t)(d->end - d->p) < n || memcmp(d->p, word, n) != 0)
        return dec_unexpected(d, d->p, "");
    d->p += n;
    return 0;
}

static int dec_value(dec *d)
{
    skip_ws(d);
    if (d->p >= d->end)
        return dec_unexpected(d, d->p, " (value expected)");
    switch (*d->p) {
    case '"':
        return dec_string(d);
    case '{':
        return dec_object(d);
    case '[':
        return dec_array(d);
    case '-': case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9':
        return dec_number(d);
    case 't':
        if (dec_literal(d, "true", 4) < 0)
            return -1;
        lua_pushboolean(d->L, 1);
        return 0;
    case 'f':
        if (dec_literal(d, "false", 5) < 0)
            return -1;
        lua_pushboolean(d->L, 0);
        return 0;
    case 'n':
        if (dec_literal(d, "null", 4) < 0)
            return -1;
        lua_pushvalue(d->L, d->null_idx);
        return 0;
    default:
        return dec_unexpected(d, d->p, "");
    }
}

/* Decodes a whole document; on success the value is on top. */
static int decode_with(lua_State *L, const char *s, size_t n, int mt_arr,
                       int mt_obj, int null_idx, char *msg, size_t msglen)
{
    dec d;
    d.L = L;
    d.start = d.p = (const unsigned char *)s;
    d.end = d.start + n;
    d.mt_arr = mt_arr;
    d.mt_obj = mt_obj;
    d.null_idx = null_idx;
    d.depth = 0;
    d.msg = msg;
    d.msglen = msglen;
    if (!lua_checkstack(L, DEC_TOP_ROOM))
        return dec_fail(&d, d.p, "Lua stack exhausted");
    if (dec_value(&d) < 0)
        return -1;
    skip_ws(&d);
    if (d.p < d.end)
        return dec_unexpected(&d, d.p, " after the value");
    return 0;
}

int esl_json_context(lua_State *L)
{
    luaL_checkstack(L, 8, "json decode");
    lua_getfield(L, LUA_REGISTRYINDEX, REG_ARRAY);
    lua_getfield(L, LUA_REGISTRYINDEX, REG_OBJECT);
    lua_getfield(L, LUA_REGISTRYINDEX, REG_NULL);
    return lua_gettop(L) - 2;
}

int esl_json_decode_ctx(lua_State *L, int ctx, const char *s, size_t n,
                        char *msg, size_t msglen)
{
    int top = lua_gettop(L);
    if (decode_with(L, s, n, ctx, ctx + 1, ctx + 2, msg, msglen) < 0) {
        lua_settop(L, top);
        return -1;
    }
    return 0;
}

int esl_json_decode(lua_State *L, const char *s, size_t n, char *msg,
                    size_t msglen)
{
    int top = lua_gettop(L);
    int ctx = esl_json_context(L);
    if (esl_json_decode_ctx(L, ctx, s, n, msg, msglen) < 0) {
        lua_settop(L, top);
        return -1;
    }
    lua_replace(L, top + 1);
    lua_settop(L, top + 1);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Lua functions                                                       */

#define UP_ARRAY lua_upvalueindex(1)
#define UP_OBJECT lua_upvalueindex(2)
#define UP_NULL lua_upvalueindex(3)
#define UP_BUFFER lua_upvalueindex(4)

static int buffer_gc(lua_State *L)
{
    es_buf *b = luaL_checkudata(L, 1, BUFFER_MT);
    es_buf_free(b);
    return 0;
}

/* es.json.encode(value) -> text | nil, err */
static int l_encode(lua_State *L)
{
    char msg[MSG_MAX];
    es_buf *b = lua_touserdata(L, UP_BUFFER);
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    es_buf_reset(b);
    if (encode_with(L, 1, b, UP_ARRAY, UP_OBJECT, UP_NULL, msg,
                    sizeof msg) < 0) {
        if (b->cap > KEEP_BUFFER_MAX)
            es_buf_free(b);
        return esl_push_fail(L, ES_INVALID, msg);
    }
    lua_pushlstring(L, b->data, b->len);
    if (b->cap > KEEP_BUFFER_MAX)
        es_buf_free(b);
    return 1;
}

/* es.json.decode(text) -> value | nil, err */
static int l_decode(lua_State *L)
{
    char msg[MSG_MAX];
    size_t n;
    const char *s;
    if (lua_type(L, 1) != LUA_TSTRING)
        /* spelled out: luaL_argerror says '?' when called via pcall */
        return luaL_error(L, "bad argument #1 to 'decode' (string "
                             "expected, got %s)", luaL_typename(L, 1));
    s = lua_tolstring(L, 1, &n);
    lua_settop(L, 1);
    if (decode_with(L, s, n, UP_ARRAY, UP_OBJECT, UP_NULL, msg,
                    sizeof msg) < 0) {
        lua_settop(L, 1);
        return esl_push_fail(L, ES_INVALID, msg);
    }
    return 1;
}

/* es.json.array(t) / es.json.object(t): mark t's shape; returns t. */
static int mark(lua_State *L, const char *what)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    if (lua_getmetatable(L, 1)) {
        if (!lua_rawequal(L, -1, lua_upvalueindex(1))) {
            const char *m = lua_pushfstring(
                L, "table already has another metatable (cannot mark it "
                   "as %s)", what);
            return luaL_argerror(L, 1, m);
        }
        lua_pop(L, 1);
        return 1;
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_setmetatable(L, 1);
    return 1;
}

static int l_array(lua_State *L)
{
    return mark(L, "an array");
}

static int l_object(lua_State *L)
{
    return mark(L, "an object");
}

static int null_tostring(lua_State *L)
{
    lua_pushliteral(L, "null");
    return 1;
}

/* Pushes registry[key], creating it with make() the first time (loading
 * the module twice in one state keeps the same shapes and null). */
static void reg_get(lua_State *L, const char *key, void (*make)(lua_State *))
{
    lua_getfield(L, LUA_REGISTRYINDEX, key);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        make(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, LUA_REGISTRYINDEX, key);
    }
}

static void make_array_mt(lua_State *L)
{
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "json.array");
    lua_setfield(L, -2, "__name");
}

static void make_object_mt(lua_State *L)
{
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "json.object");
    lua_setfield(L, -2, "__name");
}

static void make_null(lua_State *L)
{
    esl_newuserdata(L, 1);
    if (luaL_newmetatable(L, NULL_MT)) {
        lua_pushcfunction(L, null_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_pushliteral(L, "json.null");
        lua_setfield(L, -2, "__name");
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
    }
    lua_setmetatable(L, -2);
}

/* es.json.valid(text) -> true | nil, err: whether the stores take text as
 * a payload: store.c's own check (es_json_payload_ok), without building
 * any value. */
static int l_valid(lua_State *L)
{
    size_t n;
    const char *s;
    char msg[MSG_MAX];
    if (lua_type(L, 1) != LUA_TSTRING)
        return esl_typeerror(L, 1, "string");
    s = lua_tolstring(L, 1, &n);
    if (es_json_payload_ok(s, n, 0, msg, sizeof msg) < 0)
        return esl_push_fail(L, ES_INVALID, msg);
    lua_pushboolean(L, 1);
    return 1;
}

void json_open(lua_State *L)
{
    es_buf *b;
    lua_createtable(L, 0, 6);

    reg_get(L, REG_ARRAY, make_array_mt);
    reg_get(L, REG_OBJECT, make_object_mt);
    reg_get(L, REG_NULL, make_null);
    b = esl_newuserdata(L, sizeof *b);
    es_buf_init(b);
    if (luaL_newmetatable(L, BUFFER_MT)) {
        lua_pushcfunction(L, buffer_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_pushcclosure(L, l_encode, 4);
    lua_setfield(L, -2, "encode");

    reg_get(L, REG_ARRAY, make_array_mt);
    reg_get(L, REG_OBJECT, make_object_mt);
    reg_get(L, REG_NULL, make_null);
    lua_pushcclosure(L, l_decode, 3);
    lua_setfield(L, -2, "decode");

    reg_get(L, REG_ARRAY, make_array_mt);
    lua_pushcclosure(L, l_array, 1);
    lua_setfield(L, -2, "array");

    reg_get(L, REG_OBJECT, make_object_mt);
    lua_pushcclosure(L, l_object, 1);
    lua_setfield(L, -2, "object");

    reg_get(L, REG_NULL, make_null);
    lua_setfield(L, -2, "null");

    lua_pushcfunction(L, l_valid);
    lua_setfield(L, -2, "valid");

    lua_setfield(L, -2, "json");
}
