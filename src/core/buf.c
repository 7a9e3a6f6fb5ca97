/* buf.c - growable byte buffer (see buf.h). */
#include "buf.h"

#include <stdlib.h>
#include <string.h>

void es_buf_init(es_buf *b)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}

void es_buf_free(es_buf *b)
{
    free(b->data);
    es_buf_init(b);
}

int es_buf_reserve(es_buf *b, size_t extra)
{
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

int es_buf_add(es_buf *b, const void *p, size_t n)
{
    if (es_buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

int es_buf_adds(es_buf *b, const char *s)
{
    return es_buf_add(b, s, strlen(s));
}

int es_buf_addc(es_buf *b, char c)
{
    if (es_buf_reserve(b, 1) < 0)
        return -1;
    b->data[b->len++] = c;
    return 0;
}

const char *es_buf_cstr(es_buf *b)
{
    if (es_buf_reserve(b, 0) < 0)
        return NULL;
    b->data[b->len] = '\0';
    return b->data;
}
