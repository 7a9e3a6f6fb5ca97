/* error.c - error kinds and reasons, and filling in es_error. */
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

const char *es_reason_name(es_reason reason)
{
    switch (reason) {
    case ES_REASON_NONE: return NULL;
    case ES_REASON_VERSION: return "version";
    case ES_REASON_ID_TAKEN: return "id_taken";
    case ES_REASON_ORDER: return "order";
    case ES_REASON_SERIALIZATION: return "serialization";
    case ES_REASON_TX_ABORTED: return "tx_aborted";
    case ES_REASON_TIMEOUT: return "timeout";
    case ES_REASON_LAST_ID: return "last_id";
    }
    return NULL;
}

void es_error_clear(es_error *err)
{
    /* field by field: a cursor clears its error for every event it hands
     * over, and a memset of the whole message buffer (512 bytes) was most
     * of that call */
    err->kind = ES_OK;
    err->message[0] = '\0';
    err->sqlstate[0] = '\0';
    err->expected = err->actual = 0;
    err->reason = ES_REASON_NONE;
}

int es_fail(es_error *err, es_kind kind, const char *fmt, ...)
{
    va_list ap;
    err->kind = kind;
    err->sqlstate[0] = '\0';
    err->reason = ES_REASON_NONE;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return -1;
}
