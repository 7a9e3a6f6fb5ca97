/* memory.c - placeholder until the in-memory store lands (being written). */
#include "store.h"
es_store *es_memory_open(const char *name, es_error *err)
{ (void)name; es_fail(err, ES_INVALID, "not yet"); return NULL; }
