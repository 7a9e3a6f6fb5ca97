/*
 * names.c - stream-name and event-type validation. Properties: what is
 * accepted is something PostgreSQL's text takes and that prints safely:
 * non-empty, within the length limit, no control characters (C0, DEL),
 * valid UTF-8; what is refused says why. Both stores see the same rule.
 */
#include "fuzz.h"
#include "eventsourcing.h"
#include "../src/core/store.h"
#include "../src/core/json_syntax.h"

#include <stdlib.h>
#include <string.h>

static void check(int ok, const char *s, size_t max, const char *what,
                  const uint8_t *data, size_t size)
{
    size_t n = strlen(s), at;
    const char *why;
    if (!ok)
        return;
    FUZZ_CHECK(n > 0 && n <= max, what, data, size);
    for (size_t i = 0; i < n; i++)
        FUZZ_CHECK((unsigned char)s[i] >= 0x20 && s[i] != 0x7f, what, data,
                   size);
    FUZZ_CHECK(es_utf8_valid(s, n, &at, &why), what, data, size);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    es_error err;
    int ok;
    if (!s)
        abort();
    memcpy(s, data, size);
    s[size] = '\0';
    es_error_clear(&err);
    ok = es_valid_stream(s, &err) == 0;
    FUZZ_CHECK(ok || err.message[0], "stream refused without a message",
               data, size);
    check(ok, s, 1000, "accepted a stream name PostgreSQL would not store "
          "as given", data, size);
    es_error_clear(&err);
    ok = es_valid_event_type(s, &err) == 0;
    FUZZ_CHECK(ok || err.message[0], "type refused without a message", data,
               size);
    check(ok, s, 200, "accepted an event type PostgreSQL would not store "
          "as given", data, size);
    free(s);
    return 0;
}
