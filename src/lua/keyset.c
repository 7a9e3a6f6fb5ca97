/*
 * keyset.c - core.keyset(): a set of strings kept outside the Lua heap.
 *
 * A rebuild remembers every row key it has written into the shadow table
 * (hundreds of thousands of them). In a Lua table each key is a string
 * the collector marks and sweeps again on every cycle, and the table
 * itself is traversed again each time it grows during a cycle: measured
 * on a 1,000,000-event rebuild, that cost more CPU than everything else
 * the replay did per event. Here the collector sees one userdata with no
 * references: the keys are bytes in an arena it owns (freed by __gc, so
 * an error never leaks them, as with LPeg's scratch memory).
 *
 *   local seen = core.keyset()
 *   seen[k] = true      -- adds string k (false or nil: an error)
 *   if seen[k] then     -- true | nil
 *   #seen               -- keys held
 */
#include "binding.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define KEYSET_MT "eventsourcing.keyset"

typedef struct ks_slot {
    uint64_t hash;            /* 0: free (hashes are made non-zero) */
    size_t off, len;          /* the key's bytes in the arena */
} ks_slot;

typedef struct keyset {
    uint64_t seed;            /* per set: keys cannot be chosen to collide */
    ks_slot *slots;
    size_t cap;               /* a power of two, or 0 */
    size_t n;
    es_buf arena;
} keyset;

/* FNV-1a, 64 bits, from the set's seed, mixed at the end (the slot is
 * taken from the low bits); never 0 (0 marks a free slot). */
static uint64_t ks_hash(const keyset *k, const char *s, size_t len)
{
    uint64_t h = 14695981039346656037ULL ^ k->seed;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h ? h : 1;
}

/* The slot holding s, or the free slot where it would go. */
static ks_slot *ks_find(const keyset *k, const char *s, size_t len,
                        uint64_t h)
{
    size_t mask = k->cap - 1;
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        ks_slot *sl = &k->slots[i];
        if (sl->hash == 0)
            return sl;
        if (sl->hash == h && sl->len == len &&
            memcmp(k->arena.data + sl->off, s, len) == 0)
            return sl;
    }
}

/* Doubles the slots (kept at most half full). -1: out of memory. */
static int ks_grow(keyset *k)
{
    size_t cap = k->cap ? 2 * k->cap : 64;
    ks_slot *old = k->slots, *slots = calloc(cap, sizeof *slots);
    size_t oldcap = k->cap;
    if (!slots)
        return -1;
    k->slots = slots;
    k->cap = cap;
    for (size_t i = 0; i < oldcap; i++) {
        if (old[i].hash) {
            size_t j = (size_t)old[i].hash & (cap - 1);
            while (slots[j].hash)
                j = (j + 1) & (cap - 1);
            slots[j] = old[i];
        }
    }
    free(old);
    return 0;
}

static keyset *check_keyset(lua_State *L)
{
    return (keyset *)luaL_checkudata(L, 1, KEYSET_MT);
}

/* set[k] -> true | nil */
static int ks_index(lua_State *L)
{
    keyset *k = check_keyset(L);
    size_t len;
    const char *s;
    if (lua_type(L, 2) != LUA_TSTRING || k->n == 0) {
        lua_pushnil(L);
        return 1;
    }
    s = lua_tolstring(L, 2, &len);
    if (ks_find(k, s, len, ks_hash(k, s, len))->hash)
        lua_pushboolean(L, 1);
    else
        lua_pushnil(L);
    return 1;
}

/* set[k] = true */
static int ks_newindex(lua_State *L)
{
    keyset *k = check_keyset(L);
    size_t len;
    const char *s;
    uint64_t h;
    ks_slot *sl;
    if (lua_type(L, 2) != LUA_TSTRING)
        return luaL_error(L, "keyset: keys are strings, not %s",
                          luaL_typename(L, 2));
    if (!lua_toboolean(L, 3))
        return luaL_error(L, "keyset: a key is added with true; keys are "
                          "never removed");
    s = lua_tolstring(L, 2, &len);
    if ((k->n + 1) * 2 > k->cap && ks_grow(k) < 0)
        return luaL_error(L, "keyset: out of memory");
    h = ks_hash(k, s, len);
    sl = ks_find(k, s, len, h);
    if (sl->hash)
        return 0;
    if (es_buf_add(&k->arena, s, len) < 0)
        return luaL_error(L, "keyset: out of memory");
    sl->hash = h;
    sl->off = k->arena.len - len;
    sl->len = len;
    k->n++;
    return 0;
}

static int ks_len(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)check_keyset(L)->n);
    return 1;
}

static int ks_gc(lua_State *L)
{
    keyset *k = check_keyset(L);
    free(k->slots);
    k->slots = NULL;
    k->cap = k->n = 0;
    es_buf_free(&k->arena);
    return 0;
}

static int l_keyset(lua_State *L)
{
    keyset *k = (keyset *)esl_newuserdata(L, sizeof *k);
    memset(k, 0, sizeof *k);
    /* no shared state: the binding also runs on nginx's pool threads */
    k->seed = ((uint64_t)(uintptr_t)k * 0x9e3779b97f4a7c15ULL) ^
              ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    es_buf_init(&k->arena);
    luaL_getmetatable(L, KEYSET_MT);
    lua_setmetatable(L, -2);
    return 1;
}

void keyset_open(lua_State *L)
{
    static const luaL_Reg meta[] = {
        {"__index", ks_index},
        {"__newindex", ks_newindex},
        {"__len", ks_len},
        {"__gc", ks_gc},
        {NULL, NULL}
    };
    luaL_newmetatable(L, KEYSET_MT);
    esl_setfuncs(L, meta);
    lua_pop(L, 1);
    lua_pushcfunction(L, l_keyset);
    lua_setfield(L, -2, "keyset");
}
