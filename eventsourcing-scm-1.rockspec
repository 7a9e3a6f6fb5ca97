-- LuaRocks rockspec (the registry is not reachable from our CI; this is for
-- users who have LuaRocks). On Debian, libpq's header lives in
-- /usr/include/postgresql:  luarocks make PQ_INCDIR=/usr/include/postgresql
rockspec_format = "3.0"
package = "eventsourcing"
version = "scm-1"

source = {
  url = "git+https://example.invalid/eventsourcing.git",
  branch = "main",
}

description = {
  summary = "Event sourcing for Lua on PostgreSQL, with a C core",
  detailed = [[
Aggregates, event store (PostgreSQL via libpq, and in-memory), projections,
read models, subscriptions and workflows for Lua 5.4 and LuaJIT/OpenResty.
Event encoding, folding event streams into state and the store are in C.
]],
  homepage = "https://example.invalid/eventsourcing",
  labels = { "eventsourcing", "postgresql", "cqrs" },
  license = "MIT",
}

dependencies = {
  "lua >= 5.1",
  "argparse",        -- bin/eventsourcing (Debian: lua-argparse)
}

external_dependencies = {
  PQ = {
    header = "libpq-fe.h",
    library = "pq",
  },
  UUID = {
    header = "uuid/uuid.h",
    library = "uuid",
  },
}

build = {
  type = "make",
  build_target = "all",
  build_variables = {
    CC = "$(CC)",
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    LUA = "$(LUA)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    LUA_LIBDIR = "$(LUA_LIBDIR)",
    PQ_INCDIR = "$(PQ_INCDIR)",
    PQ_LIBDIR = "$(PQ_LIBDIR)",
    UUID_INCDIR = "$(UUID_INCDIR)",
    UUID_LIBDIR = "$(UUID_LIBDIR)",
  },
  install_target = "install",
  install_variables = {
    PREFIX = "$(PREFIX)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    INCDIR_INSTALL = "$(PREFIX)/include",
    BINDIR = "",          -- the script is LuaRocks' to install (below)
  },
  -- the operator's command-line tool; LuaRocks wraps it for its tree
  install = {
    bin = { eventsourcing = "bin/eventsourcing" },
  },
  copy_directories = { "examples" },
}
