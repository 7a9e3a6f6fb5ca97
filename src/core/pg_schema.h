/* pg_schema.h - migrations of the PostgreSQL store (pg_schema.c). */
#ifndef ES_PG_SCHEMA_H
#define ES_PG_SCHEMA_H

#include "store.h"

int pg_migrate(es_store *s, es_error *err);

#endif
