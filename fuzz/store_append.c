/*
 * store_append.c - the memory store's append on any payloads, ids and
 * names. The input is split at 0xFF bytes into stream, type, data,
 * metadata and id. Properties: an accepted append reads back byte for
 * byte (data and metadata exactly as given); a refused one says why and
 * leaves the stream's version and the store's end as they were; the JSON
 * the store accepts is exactly what the core's validator accepts (with
 * \u0000 refused for jsonb's sake).
 */
#include "fuzz.h"
#include "eventsourcing.h"
#include "../src/core/store.h"
#include "../src/core/json_syntax.h"

#include <stdlib.h>
#include <string.h>

/* Splits the input at 0xFF into up to n NUL-terminated parts (copies). */
static void split(const uint8_t *data, size_t size, char **part,
                  size_t *len, int n)
{
    size_t start = 0;
    for (int i = 0; i < n; i++) {
        size_t end = start;
        while (end < size && data[end] != 0xFF)
            end++;
        len[i] = end > start ? end - start : 0;
        part[i] = malloc(len[i] + 1);
        if (!part[i])
            abort();
        if (len[i])
            memcpy(part[i], data + start, len[i]);
        part[i][len[i]] = '\0';
        start = end < size ? end + 1 : size;
    }
}

static int64_t store_end(es_store *s)
{
    es_error err;
    es_event e;
    int64_t last = 0;
    es_read_all_opts o = { .limit = 100000 };
    es_cursor *c = es_read_all(s, &o, &err);
    while (c && es_cursor_next(c, &e, &err) == 1)
        last = e.position;
    es_cursor_free(c);
    return last;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static es_store *s;
    static unsigned runs;
    char *part[5];
    size_t len[5];
    es_error err;
    es_append_result res;
    es_json_problem pr;
    int64_t before = 0, after = 0, end0, end1;

    /* A fresh store now and then keeps each run's full read cheap. */
    if (s && ++runs % 512 == 0) {
        es_close(s);
        s = NULL;
    }
    if (!s && !(s = es_open("memory:fuzz", &err)))
        abort();
    split(data, size, part, len, 5);
    es_event_in ev = {
        .id = len[4] ? part[4] : NULL, .type = part[1],
        .data = part[2], .data_len = len[2],
        .metadata = len[3] ? part[3] : NULL, .metadata_len = len[3],
    };
    int named = es_stream_version(s, part[0], &before, &err) == 0;
    end0 = store_end(s);
    int rc = es_append(s, part[0], &ev, 1, ES_ANY, &res, &err);
    end1 = store_end(s);
    if (rc < 0) {
        FUZZ_CHECK(err.message[0] != '\0', "a refusal without a message",
                   data, size);
        FUZZ_CHECK(end1 == end0, "a refused append changed the store", data,
                   size);
        if (named) {
            FUZZ_CHECK(es_stream_version(s, part[0], &after, &err) == 0 &&
                       after == before,
                       "a refused append changed the stream", data, size);
        }
    } else {
        es_read_opts o = { .from = res.version, .limit = 1 };
        es_cursor *c = es_read(s, part[0], &o, &err);
        es_event e;
        FUZZ_CHECK(c && es_cursor_next(c, &e, &err) == 1,
                   "an accepted event does not read back", data, size);
        /* (an id already stored makes the append an idempotent success
         * that returns the stored event, whatever the data) */
        FUZZ_CHECK(end1 == end0 ||
                   (e.data_len == len[2] && memcmp(e.data, part[2], len[2]) == 0),
                   "data does not read back as given", data, size);
        FUZZ_CHECK(end1 == end0 || strcmp(e.type, part[1]) == 0, "type differs",
                   data, size);
        if (len[3] && end1 != end0)
            FUZZ_CHECK(e.metadata_len == len[3] &&
                       memcmp(e.metadata, part[3], len[3]) == 0,
                       "metadata does not read back as given", data, size);
        FUZZ_CHECK(es_json_check(part[2], len[2], 0, 10000, &pr) == 0,
                   "the store took data the validator refuses", data, size);
        FUZZ_CHECK(end1 == end0 + 1 || (ev.id && end1 == end0),
                   "an append did not add one event", data, size);
        es_cursor_free(c);
    }
    if (rc < 0 && err.kind == ES_INVALID && named && !ev.id &&
        es_valid_event_type(part[1], &err) == 0 &&
        (!ev.metadata || es_json_check(part[3], len[3], 1, 10000, &pr) == 0) &&
        !strstr(part[2], "\\u0000") && !(ev.metadata && strstr(part[3], "\\u0000")))
        FUZZ_CHECK(es_json_check(part[2], len[2], 0, 10000, &pr) < 0,
                   "the store refused data the validator accepts", data, size);
    for (int i = 0; i < 5; i++)
        free(part[i]);
    return 0;
}
