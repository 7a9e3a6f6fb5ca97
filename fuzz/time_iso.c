/*
 * time_iso.c - ISO-8601 parsing and formatting. Properties: whatever
 * parses formats to text that parses to the same instant and formats the
 * same again; any instant of years 0001-9999 formats and parses back to
 * itself; refusals say why.
 */
#include "fuzz.h"
#include "eventsourcing.h"
#include "../src/core/es_time.h"

#include <stdlib.h>
#include <string.h>

/* 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z: what parse takes */
#define MIN_USEC (-62135596800LL * 1000000LL)
#define MAX_USEC (253402300799LL * 1000000LL + 999999LL)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1), out[32], again[32];
    es_error err;
    int64_t us, us2;

    if (!text)
        abort();
    memcpy(text, data, size);
    text[size] = '\0';
    es_error_clear(&err);
    if (es_time_parse(text, &us, &err) == 0) {
        FUZZ_CHECK(us >= MIN_USEC && us <= MAX_USEC,
                   "parsed an instant outside the years 0001-9999", data, size);
        es_time_format(us, out);
        FUZZ_CHECK(es_time_parse(out, &us2, &err) == 0 && us2 == us,
                   "a formatted instant does not parse back", data, size);
        es_time_format(us2, again);
        FUZZ_CHECK(strcmp(out, again) == 0, "formatting is not stable", data,
                   size);
    } else {
        FUZZ_CHECK(err.kind == ES_INVALID && err.message[0],
                   "a refusal without a message", data, size);
    }
    if (size >= 8) {
        memcpy(&us, data, 8);
        us = MIN_USEC + (int64_t)((uint64_t)us % (uint64_t)(MAX_USEC - MIN_USEC + 1));
        es_time_format(us, out);
        FUZZ_CHECK(es_time_parse(out, &us2, &err) == 0 && us2 == us,
                   "an instant does not survive format and parse", data, size);
    }
    free(text);
    return 0;
}
