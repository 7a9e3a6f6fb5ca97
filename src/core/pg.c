/* pg.c - placeholder until the PostgreSQL store lands (being written). */
#include "store.h"
es_store *es_pg_open(const char *conninfo, const char *schema, es_error *err)
{ (void)conninfo; (void)schema; es_fail(err, ES_INVALID, "not yet"); return NULL; }
const char *es_rows_value(const es_rows *r, int row, int col, size_t *len) { (void)r; (void)row; (void)col; (void)len; return 0; }
int es_rows_count(const es_rows *r) { (void)r; return 0; }
int es_rows_columns(const es_rows *r) { (void)r; return 0; }
const char *es_rows_name(const es_rows *r, int c) { (void)r; (void)c; return 0; }
unsigned es_rows_type(const es_rows *r, int c) { (void)r; (void)c; return 0; }
void es_rows_free(es_rows *r) { (void)r; }
