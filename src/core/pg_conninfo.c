/*
 * pg_conninfo.c - the library's own option inside a connection string.
 *
 * `pooler=transaction` may be written in the target as a URL parameter
 * (postgresql://host/db?pooler=transaction) or as a conninfo keyword
 * (host=/tmp port=6432 pooler=transaction). libpq rejects keywords it does
 * not know, so the option is taken out here and the rest goes to libpq
 * untouched.
 */
#include "pg.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

static int is_url(const char *s)
{
    return strncmp(s, "postgresql://", 13) == 0 ||
           strncmp(s, "postgres://", 11) == 0;
}

/* Copies value [v, v+n) into out (at most outlen-1 bytes, NUL ended).
 * An empty value becomes "''" so that it reads as given, and wrong. */
static void copy_value(char *out, size_t outlen, const char *v, size_t n)
{
    if (n == 0) {
        v = "''";
        n = 2;
    }
    if (n >= outlen)
        n = outlen - 1;
    memcpy(out, v, n);
    out[n] = '\0';
}

/* URL form: removes every `pooler=VALUE` query parameter. */
static void take_from_url(char *s, char *pooler, size_t plen)
{
    char *q = strchr(s, '?');
    char *p, *amp, *out;
    if (!q)
        return;
    out = q + 1;
    for (p = q + 1; *p; p = amp) {
        size_t n;
        amp = strchr(p, '&');
        n = amp ? (size_t)(amp - p) : strlen(p);
        if (n >= 7 && strncmp(p, "pooler=", 7) == 0) {
            copy_value(pooler, plen, p + 7, n - 7);
        } else {
            if (out != q + 1)
                *out++ = '&';
            memmove(out, p, n);
            out += n;
        }
        if (!amp)
            break;
        amp++;
    }
    *out = '\0';
    if (out == q + 1)
        *q = '\0';           /* nothing left after '?' */
}

/* The end of a conninfo value starting at v: quoted ('...' with \
 * escapes) or up to the next blank. */
static const char *value_end(const char *v)
{
    if (*v == '\'') {
        for (v++; *v && *v != '\''; v++)
            if (*v == '\\' && v[1])
                v++;
        return *v ? v + 1 : v;
    }
    while (*v && !isspace((unsigned char)*v))
        v++;
    return v;
}

/* keyword = value form: removes every `pooler = VALUE` pair. */
static void take_from_keywords(char *s, char *pooler, size_t plen)
{
    char *p = s;
    while (*p) {
        char *start, *kw_end, *v;
        const char *end;
        while (isspace((unsigned char)*p))
            p++;
        start = p;
        while (*p && *p != '=' && !isspace((unsigned char)*p))
            p++;
        kw_end = p;
        while (isspace((unsigned char)*p))
            p++;
        if (*p != '=')
            return;          /* malformed: libpq will say so */
        p++;
        while (isspace((unsigned char)*p))
            p++;
        v = p;
        end = value_end(v);
        if (kw_end - start == 6 && strncmp(start, "pooler", 6) == 0) {
            if (*v == '\'')
                copy_value(pooler, plen, v + 1,
                           (size_t)(end - v) >= 2 ? (size_t)(end - v) - 2 : 0);
            else
                copy_value(pooler, plen, v, (size_t)(end - v));
            memmove(start, end, strlen(end) + 1);
            p = start;
        } else {
            p = (char *)end;
        }
    }
}

char *pg_conninfo_take_pooler(const char *target, char *pooler, size_t plen)
{
    char *s = strdup(target);
    if (!s)
        return NULL;
    if (is_url(s))
        take_from_url(s, pooler, plen);
    else
        take_from_keywords(s, pooler, plen);
    return s;
}
