/* error.c - error kinds and filling in es_error. */
#include "eventsourcing.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *es_kind_name(es_kind kind)
{
    switch (kind) {
    case ES_OK: return "ok";
    case ES_CONFLICT: return "conflict";
    case ES_REJECTED: return "rejected";
    case ES_NOT_FOUND: return "not_found";
    case ES_INVALID: return "invalid";
    case ES_CONNECTION: return "connection";
    case ES_DATABASE: return "database";
    }
    return "unknown";
}

void es_error_clear(es_error *err)
{
    memset(err, 0, sizeof *err);
}

int es_fail(es_error *err, es_kind kind, const char *fmt, ...)
{
    va_list ap;
    err->kind = kind;
    err->sqlstate[0] = '\0';
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return -1;
}
