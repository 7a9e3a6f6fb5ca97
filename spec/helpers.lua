-- Shared helpers for specs:  local helpers = require "helpers"
local helpers = {}

local counter = 0

-- The PostgreSQL database the specs may use (scripts/test.sh provides one).
function helpers.database_url()
  local url = os.getenv("ES_TEST_DATABASE_URL")
  if not url or url == "" then
    error("ES_TEST_DATABASE_URL is not set: run the specs with `make test` "
      .. "(or scripts/test.sh), which starts a throwaway PostgreSQL, or export "
      .. "ES_TEST_DATABASE_URL=\"$(scripts/pg.sh start)\"", 2)
  end
  return url
end

-- Both stores, for running one describe block against each:
--   for _, s in ipairs(helpers.stores()) do describe(s.name, function() ... end) end
function helpers.stores()
  return {
    { name = "memory", url = "memory:" },
    { name = "postgresql", url = helpers.database_url() },
  }
end

local function pid()
  local f = io.open("/proc/self/stat")
  local stat = f and f:read("*l")
  if f then f:close() end
  return stat and stat:match("^(%d+)") or tostring(os.time())
end
local my_pid = pid()

-- A PostgreSQL schema name unique to this call, so specs never see each
-- other's data: es.open(url, { schema = helpers.fresh_schema() }).
-- busted loads this file afresh for every spec file, so a counter alone
-- would repeat names across files: a UUID v7 (unique in the process, time
-- ordered) makes each name new.
function helpers.fresh_schema()
  counter = counter + 1
  local u = require("eventsourcing.core").uuid():gsub("-", "")
  return ("es_test_%s_%s"):format(my_pid, u:sub(9))
end

-- Open a store for a helpers.stores() entry; PostgreSQL ones get a fresh
-- schema and are migrated. Returns store, schema (nil for memory).
function helpers.open(entry)
  local es = require "eventsourcing"
  local schema = entry.name ~= "memory" and helpers.fresh_schema() or nil
  local store = assert(es.open(entry.url, schema and { schema = schema } or nil))
  if store.migrate then assert(store:migrate()) end
  return store, schema
end

-- The Lua flavour running the specs: "luajit" or "lua5.4".
function helpers.flavour()
  return rawget(_G, "jit") and "luajit" or "lua5.4"
end

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
helpers.shell_quote = shell_quote

-- The command line that starts a child Lua of the same flavour with the same
-- module paths, for specs that spawn writers with io.popen / os.execute:
--   io.popen(helpers.lua_cmd() .. " -e " .. helpers.shell_quote(code))
function helpers.lua_cmd()
  local env = {}
  for _, k in ipairs { "LUA_PATH", "LUA_CPATH", "ES_TEST_DATABASE_URL", "LD_PRELOAD",
                       "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS" } do
    local v = os.getenv(k)
    if v then env[#env + 1] = k .. "=" .. shell_quote(v) end
  end
  -- package.path/cpath as seen here also cover paths set by busted (.busted lpath)
  env[#env + 1] = "LUA_PATH=" .. shell_quote(package.path)
  env[#env + 1] = "LUA_CPATH=" .. shell_quote(package.cpath)
  local interp = os.getenv("ES_LUA") or helpers.flavour()
  return "env " .. table.concat(env, " ") .. " " .. interp
end

-- Run SQL on a PostgreSQL store, if the store exposes a raw query method
-- (store:sql / store:exec / store:query). Extra arguments are parameters.
function helpers.sql(store, sql, ...)
  for _, m in ipairs { "sql", "exec", "query" } do
    if type(store[m]) == "function" then return store[m](store, sql, ...) end
  end
  error("helpers.sql: this store has no raw SQL method", 2)
end

return helpers
