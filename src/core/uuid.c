/*
 * uuid.c - event ids. Version 7 layout (RFC 9562): 48 bits of Unix time in
 * milliseconds, then random bits from libuuid, so ids made one after the
 * other sort together and keep the unique index's inserts local. Debian 12's
 * libuuid predates uuid_generate_time_v7, so the layout is done here.
 */
#include "eventsourcing.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <uuid.h>

void es_uuid_v7(char out[37])
{
    uuid_t u;
    struct timespec ts;
    uint64_t ms;

    uuid_generate_random(u);
    clock_gettime(CLOCK_REALTIME, &ts);
    ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    for (int i = 0; i < 6; i++)
        u[i] = (unsigned char)(ms >> (8 * (5 - i)));
    u[6] = (unsigned char)((u[6] & 0x0f) | 0x70);   /* version 7 */
    u[8] = (unsigned char)((u[8] & 0x3f) | 0x80);   /* RFC variant */
    uuid_unparse_lower(u, out);
}

int es_uuid_valid(const char *text)
{
    uuid_t u;
    return text && strlen(text) == 36 && uuid_parse(text, u) == 0;
}
