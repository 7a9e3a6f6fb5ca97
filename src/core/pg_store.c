/*
 * pg_store.c - the PostgreSQL store as the core sees it: its operations
 * table and es_pg_open. It is the one file that knows every part (the
 * session in pg.c, migrations in pg_schema.c, events in pg_events.c), so
 * none of those needs to know the others: the session code never calls
 * up into the event code.
 */
#include "pg.h"
#include "pg_events.h"
#include "pg_schema.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const pooler_names[] = { "none", "session", "transaction" };

static int valid_schema(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 63 || !(islower((unsigned char)s[0]) || s[0] == '_'))
        return 0;
    for (size_t i = 1; i < n; i++)
        if (!(islower((unsigned char)s[i]) || isdigit((unsigned char)s[i]) ||
              s[i] == '_'))
            return 0;
    return 1;
}

static int pg_distribute(es_store *s, int shards, es_error *err)
{
    return pg_citus_distribute((pg_store *)s, shards, err);
}

static int pg_info(es_store *s, es_store_info *out, es_error *err)
{
    pg_store *p = (pg_store *)s;
    if (pg_citus_info(p, &out->shards, err) < 0)
        return -1;
    out->citus = p->citus_version[0] ? p->citus_version : NULL;
    out->distributed = p->citus == 1;
    return 0;
}

static const es_store_ops pg_ops = {
    .kind = "postgresql",
    .migrate = pg_migrate,
    .append = pg_append,
    .version = pg_version,
    .read = pg_read,
    .read_all = pg_read_all,
    .save_snapshot = pg_save_snapshot,
    .load_snapshot = pg_load_snapshot,
    .query = pg_query,
    .begin = pg_begin,
    .commit = pg_commit,
    .rollback = pg_rollback,
    .set_timeouts = pg_set_timeouts,
    .listen = pg_listen,
    .wait = pg_wait,
    .status = pg_status,
    .in_transaction = pg_in_transaction,
    .disconnect = pg_disconnect,
    .destroy = pg_destroy,
    .distribute = pg_distribute,
    .info = pg_info,
    .copy = pg_copy,
    .copy_wait = pg_copy_wait,
    .query_commit = pg_query_commit,
    .query_ahead = pg_query_ahead,
    .ahead_rows = pg_ahead_rows,
    .append_commit = pg_append_commit,
};

/* PG_POOLER_* for a name, or -1. */
static int pooler_mode(const char *name)
{
    for (int i = 0; i < 3; i++)
        if (strcmp(name, pooler_names[i]) == 0)
            return i;
    return -1;
}

es_store *es_pg_open(const char *target, const es_open_opts *o, es_error *err)
{
    const char *schema = o ? o->schema : NULL;
    char in_target[32] = "";
    const char *pooler;
    pg_store *p;
    if (!schema)
        schema = "eventsourcing";
    if (!valid_schema(schema)) {
        es_fail(err, ES_INVALID, "schema name '%.80s' must match "
                "[a-z_][a-z0-9_]* and be at most 63 bytes", schema);
        return NULL;
    }
    p = calloc(1, sizeof *p);
    if (!p || !(p->conninfo = pg_conninfo_take_pooler(target, in_target,
                                                      sizeof in_target))) {
        free(p);
        es_fail(err, ES_CONNECTION, "out of memory");
        return NULL;
    }
    pooler = o && o->pooler ? o->pooler : in_target[0] ? in_target : "none";
    if ((p->pooler = pooler_mode(pooler)) < 0) {
        es_fail(err, ES_INVALID, "pooler must be \"none\", \"session\" or "
                "\"transaction\", not '%.40s'",
                strcmp(pooler, "''") == 0 ? "" : pooler);   /* empty */
        free(p->conninfo);
        free(p);
        return NULL;
    }
    p->base.ops = &pg_ops;
    p->owner = getpid();      /* (pg_disconnect: a forked child's copy) */
    p->citus = -1;            /* not asked yet (pg_citus_detect) */
    snprintf(p->schema, sizeof p->schema, "%s", schema);
    p->base.schema = p->schema;
    pg_name_statements(p);
    p->base.pooler = pooler_names[p->pooler];
    es_buf_init(&p->params);
    es_buf_init(&p->ahead.key);
    if (pg_ensure(p, err) < 0) {
        pg_destroy(&p->base);
        return NULL;
    }
    return &p->base;
}
