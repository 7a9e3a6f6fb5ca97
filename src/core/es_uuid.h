/*
 * es_uuid.h - event ids (uuid.c): time-ordered version 7 UUIDs, and
 * name-based version 5 UUIDs for ids that must come out the same on every
 * replay. es_uuid_v7 (text) and es_uuid_valid are in eventsourcing.h.
 */
#ifndef ES_UUID_H
#define ES_UUID_H

#include <stddef.h>

/* The same UUID v7 as es_uuid_v7, as its 16 bytes. */
void es_uuid_v7_bytes(unsigned char out[16]);

/* The 16 bytes of a UUID given as its 36 characters of text (hex digits
 * of either case, hyphens at 8, 13, 18 and 23; nothing before or after):
 * 0, or -1 when text is not one. What libuuid's uuid_parse accepts. */
int es_uuid_parse(const char *text, unsigned char out[16]);

/* The lower-case text of the UUID u (as uuid_unparse_lower). */
void es_uuid_format(const unsigned char u[16], char out[37]);

/* RFC 4122 version 5 (SHA-1) UUID of name[0..len) in the namespace given
 * as UUID text, written to out as lower-case text. -1 when the namespace
 * is not a UUID. */
int es_uuid5(const char *namespace_text, const char *name, size_t len,
             char out[37]);

#endif
