/*
 * buf.h - a growable byte buffer. The owner decides its lifetime; the
 * binding keeps its buffers inside userdata so a Lua error cannot leak them.
 */
#ifndef ES_BUF_H
#define ES_BUF_H

#include <stddef.h>

typedef struct es_buf {
    char *data;
    size_t len;
    size_t cap;
} es_buf;

void es_buf_init(es_buf *b);
void es_buf_free(es_buf *b);
/* Ensure room for `extra` more bytes (plus a NUL); returns -1 on ENOMEM. */
int es_buf_reserve(es_buf *b, size_t extra);
int es_buf_add(es_buf *b, const void *p, size_t n);
int es_buf_adds(es_buf *b, const char *s);
int es_buf_addc(es_buf *b, char c);
/* NUL-terminates without counting the NUL in len. */
const char *es_buf_cstr(es_buf *b);
static inline void es_buf_reset(es_buf *b) { b->len = 0; }

#endif
