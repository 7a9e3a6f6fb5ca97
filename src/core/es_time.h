/*
 * es_time.h - instants as microseconds since the Unix epoch (UTC), and
 * their ISO-8601 text (time.c).
 */
#ifndef ES_TIME_H
#define ES_TIME_H

#include "eventsourcing.h"

/* Parses an ISO-8601 instant to microseconds since the epoch (UTC). */
int es_time_parse(const char *text, int64_t *usec, es_error *err);
/* Formats microseconds since the epoch as "YYYY-MM-DDTHH:MM:SS.ffffffZ". */
void es_time_format(int64_t usec, char out[32]);
int64_t es_time_now(void);

#endif
