/*
 * json_syntax.c - JSON tokens, UTF-8 and the whole-text validator (see
 * json_syntax.h). The validator keeps its nesting in a bit stack instead of
 * recursing, so no input reaches deep into the C stack (nginx pool threads
 * have less of it than a main thread).
 */
#include "json_syntax.h"

#define R0 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
#define R1 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1

const unsigned char es_json_ws[256] = {
    ['\t'] = 1, ['\n'] = 1, ['\r'] = 1, [' '] = 1,
};

const unsigned char es_json_special[256] = {
    R1, R1,                                           /* 0x00-0x1f */
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,   /* 0x20: '"' */
    R0, R0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,   /* 0x50: '\\' */
    R0, R0,
    R1, R1, R1, R1, R1, R1, R1, R1,                   /* 0x80-0xff */
};

const unsigned char es_json_hex1[256] = {
    ['0'] = 1, ['1'] = 2, ['2'] = 3, ['3'] = 4, ['4'] = 5,
    ['5'] = 6, ['6'] = 7, ['7'] = 8, ['8'] = 9, ['9'] = 10,
    ['a'] = 11, ['b'] = 12, ['c'] = 13, ['d'] = 14, ['e'] = 15, ['f'] = 16,
    ['A'] = 11, ['B'] = 12, ['C'] = 13, ['D'] = 14, ['E'] = 15, ['F'] = 16,
};

size_t es_utf8_seq(const unsigned char *p, const unsigned char *end,
                   const char **why)
{
    unsigned c = p[0];
    size_t n, i, have = (size_t)(end - p);
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0xC0) {
        *why = "unexpected continuation byte";
        return 0;
    }
    if (c < 0xC2) {
        *why = "overlong encoding";
        return 0;
    }
    if (c < 0xE0) {
        n = 2;
    } else if (c < 0xF0) {
        n = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c < 0xF5) {
        n = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        *why = "code point above U+10FFFF";
        return 0;
    }
    if (have < 2 || (p[1] & 0xC0) != 0x80) {
        *why = "truncated sequence";
        return 0;
    }
    if (p[1] < lo || p[1] > hi) {
        *why = c == 0xE0 || c == 0xF0 ? "overlong encoding"
             : c == 0xED ? "encoded surrogate" : "code point above U+10FFFF";
        return 0;
    }
    for (i = 2; i < n; i++) {
        if (i >= have || (p[i] & 0xC0) != 0x80) {
            *why = "truncated sequence";
            return 0;
        }
    }
    return n;
}

int es_utf8_valid(const char *s, size_t n, size_t *at, const char **why)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    while (p < end) {
        size_t k;
        if (*p < 0x80) {
            p++;
            continue;
        }
        if (!(k = es_utf8_seq(p, end, why))) {
            *at = (size_t)(p - (const unsigned char *)s);
            return 0;
        }
        p += k;
    }
    return 1;
}

static const unsigned char *problem(es_json_problem *pr,
                                    const unsigned char *at,
                                    const char *what, const char *detail)
{
    pr->at = at;
    pr->what = what;
    pr->detail = detail;
    pr->unexpected = 0;
    return NULL;
}

static const unsigned char *unexpected(es_json_problem *pr,
                                       const unsigned char *at,
                                       const char *context)
{
    problem(pr, at, context, NULL);
    pr->unexpected = 1;
    return NULL;
}

/* The escape at p (a backslash); returns the byte after it. */
static const unsigned char *escape(const unsigned char *p,
                                   const unsigned char *end,
                                   es_json_problem *pr)
{
    int cp, lo;
    if (end - p < 2)
        return problem(pr, end, "unterminated string", NULL);
    switch (p[1]) {
    case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r':
    case 't':
        return p + 2;
    case 'u':
        break;
    default:
        return problem(pr, p, "invalid escape in string", NULL);
    }
    if (end - p < 6 || (cp = es_json_hex4(p + 2)) < 0)
        return problem(pr, p, "invalid \\u escape", NULL);
    if (cp >= 0xDC00 && cp <= 0xDFFF)
        return problem(pr, p, "lone low surrogate in \\u escape", NULL);
    if (cp < 0xD800 || cp > 0xDBFF)
        return p + 6;
    if (end - p < 12 || p[6] != '\\' || p[7] != 'u' ||
        (lo = es_json_hex4(p + 8)) < 0xDC00 || lo > 0xDFFF)
        return problem(pr, p, "lone high surrogate in \\u escape", NULL);
    return p + 12;
}

const unsigned char *es_json_string(const unsigned char *p,
                                    const unsigned char *end, int *escaped,
                                    es_json_problem *pr)
{
    *escaped = 0;
    return es_json_string_rest(p + 1, end, escaped, pr);
}

const unsigned char *es_json_string_rest(const unsigned char *p,
                                         const unsigned char *end,
                                         int *escaped, es_json_problem *pr)
{
    for (;;) {
        p = es_json_scan_plain(p, end);
        if (p >= end)
            return problem(pr, end, "unterminated string", NULL);
        if (*p == '"')
            return p + 1;
        if (*p == '\\') {
            *escaped = 1;
            if (!(p = escape(p, end, pr)))
                return NULL;
        } else if (*p < 0x20) {
            return problem(pr, p, "control character in string", NULL);
        } else {
            const char *why;
            size_t n = es_utf8_seq(p, end, &why);
            if (!n)
                return problem(pr, p, "invalid UTF-8 in string", why);
            p += n;
        }
    }
}

static const unsigned char *skip_ws(const unsigned char *p,
                                    const unsigned char *end)
{
    while (p < end && es_json_ws[*p])
        p++;
    return p;
}

static const unsigned char *literal(const unsigned char *p,
                                    const unsigned char *end,
                                    const char *word, size_t n,
                                    es_json_problem *pr)
{
    if ((size_t)(end - p) < n || memcmp(p, word, n) != 0)
        return unexpected(pr, p, "");
    return p + n;
}

/* A scalar (string, number, literal) at p, which is not end. */
static const unsigned char *scalar(const unsigned char *p,
                                   const unsigned char *end,
                                   es_json_problem *pr)
{
    int escaped;
    switch (*p) {
    case '"': return es_json_string(p, end, &escaped, pr);
    case 't': return literal(p, end, "true", 4, pr);
    case 'f': return literal(p, end, "false", 5, pr);
    case 'n': return literal(p, end, "null", 4, pr);
    default:
        if (*p == '-' || (*p >= '0' && *p <= '9'))
            return es_json_number(p, end, pr);
        return unexpected(pr, p, "");
    }
}

const char *es_json_jsonb_unsafe(const char *text, size_t len)
{
    const unsigned char *p = (const unsigned char *)text, *end = p + len;
    while ((p = memchr(p, '\\', (size_t)(end - p))) != NULL) {
        int cp, lo;
        if (end - p < 6 || p[1] != 'u' || (cp = es_json_hex4(p + 2)) < 0) {
            p += 2;    /* another escape (or not JSON: refused elsewhere) */
            if (p >= end)
                break;
            continue;
        }
        if (cp == 0)
            return "\\u0000";
        if (cp >= 0xDC00 && cp <= 0xDFFF)
            return "an unpaired surrogate escape";
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (end - p < 12 || p[6] != '\\' || p[7] != 'u' ||
                (lo = es_json_hex4(p + 8)) < 0xDC00 || lo > 0xDFFF)
                return "an unpaired surrogate escape";
            p += 6;
        }
        p += 6;
    }
    return NULL;
}

/* 0 when both stores can take text as a payload (an object for metadata):
 * JSON to the shared validator, nested at most ES_JSON_CHECK_MAX_DEPTH
 * deep, and no escape jsonb cannot hold (\u0000, unpaired surrogates:
 * PostgreSQL's json takes them, but read models cast payloads to jsonb).
 * store.c checks every payload with it, once for both stores. Else -1
 * with why filled. */
int es_json_payload_ok(const char *text, size_t len, int object,
                       char *why, size_t whylen)
{
    es_json_problem pr;
    char where[160];
    const char *bad = es_json_jsonb_unsafe(text, len);
    if (bad) {
        snprintf(why, whylen, "%s is not allowed in payloads (jsonb cannot "
                 "store it)", bad);
        return -1;
    }
    if (es_json_check(text, len, object, ES_JSON_CHECK_MAX_DEPTH, &pr) < 0) {
        es_json_describe(&pr, text, len, where, sizeof where);
        snprintf(why, whylen, "not valid JSON%s (%s)",
                 object ? " object" : "", where);
        return -1;
    }
    return 0;
}

void es_json_describe(const es_json_problem *pr, const char *start,
                      size_t len, char *out, size_t outlen)
{
    size_t pos = (size_t)(pr->at - (const unsigned char *)start) + 1;
    const char *ctx = pr->what ? pr->what : "";
    int c = pos <= len ? *pr->at : -1;
    if (!pr->unexpected && pr->detail)
        snprintf(out, outlen, "%s (%s) at byte %zu", ctx, pr->detail, pos);
    else if (!pr->unexpected)
        snprintf(out, outlen, "%s at byte %zu", ctx, pos);
    else if (c < 0)
        snprintf(out, outlen, "unexpected end of input%s at byte %zu", ctx,
                 pos);
    else if (c >= 0x21 && c < 0x7F)
        snprintf(out, outlen, "unexpected character '%c'%s at byte %zu", c,
                 ctx, pos);
    else
        snprintf(out, outlen, "unexpected byte 0x%02X%s at byte %zu", c, ctx,
                 pos);
}

#define CHECK_MAX_DEPTH ES_JSON_CHECK_MAX_DEPTH

int es_json_check(const char *text, size_t len, int want_object,
                  int max_depth, es_json_problem *pr)
{
    const unsigned char *p = (const unsigned char *)text, *end = p + len;
    unsigned char in_object[CHECK_MAX_DEPTH / 8 + 1];   /* bit per level */
    int depth = 0, obj, escaped;

    if (max_depth > CHECK_MAX_DEPTH)
        max_depth = CHECK_MAX_DEPTH;
    p = skip_ws(p, end);
    if (want_object && (p >= end || *p != '{')) {
        unexpected(pr, p, " (an object expected)");
        return -1;
    }
value:
    p = skip_ws(p, end);
    if (p >= end) {
        unexpected(pr, p, " (value expected)");
        return -1;
    }
    if (*p == '[' || *p == '{') {
        obj = *p == '{';
        if (depth >= max_depth) {
            problem(pr, p, "nesting too deep", NULL);
            return -1;
        }
        if (obj)
            in_object[depth / 8] |= (unsigned char)(1u << depth % 8);
        else
            in_object[depth / 8] &= (unsigned char)~(1u << depth % 8);
        depth++;
        p = skip_ws(p + 1, end);
        if (p < end && *p == (obj ? '}' : ']')) {
            p++;
            depth--;
            goto after;
        }
        if (obj)
            goto key;
        goto value;
    }
    if (!(p = scalar(p, end, pr)))
        return -1;
after:
    p = skip_ws(p, end);
    if (depth == 0) {
        if (p == end)
            return 0;
        unexpected(pr, p, " after the value");
        return -1;
    }
    obj = in_object[(depth - 1) / 8] >> (depth - 1) % 8 & 1;
    if (p < end && *p == ',') {
        p++;
        if (obj)
            goto key;
        goto value;
    }
    if (p < end && *p == (obj ? '}' : ']')) {
        p++;
        depth--;
        goto after;
    }
    unexpected(pr, p, obj ? " in object (',' or '}' expected)"
                          : " in array (',' or ']' expected)");
    return -1;
key:
    p = skip_ws(p, end);
    if (p >= end || *p != '"') {
        unexpected(pr, p, " in object (string key expected)");
        return -1;
    }
    if (!(p = es_json_string(p, end, &escaped, pr)))
        return -1;
    p = skip_ws(p, end);
    if (p >= end || *p != ':') {
        unexpected(pr, p, " in object (':' expected)");
        return -1;
    }
    p++;
    goto value;
}
