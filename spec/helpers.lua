-- Shared helpers for specs:  local helpers = require "helpers"
local helpers = {}


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

-- "transaction" in scripts/test.sh's pooler pass: ES_TEST_DATABASE_URL then
-- reaches PostgreSQL through PgBouncer (transaction pooling) and carries
-- pooler=transaction, so every es.open of it keeps no session state. Specs
-- of things that need a session of their own (LISTEN, session settings)
-- check this. nil otherwise.
function helpers.pooler()
  local p = os.getenv("ES_TEST_POOLER")
  return p ~= "" and p or nil
end

-- A URL a LISTEN session can use: the server itself in the pooler pass
-- (ES_TEST_DIRECT_URL, as users would give `listen =`), else the usual one.
function helpers.listen_url()
  local direct = helpers.pooler() and os.getenv("ES_TEST_DIRECT_URL")
  return direct and direct ~= "" and direct or helpers.database_url()
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
-- busted loads this file afresh for every spec file, so a counter would
-- repeat names across files: a UUID v7 (unique in the process, time
-- ordered) makes each name new.
function helpers.fresh_schema()
  local u = require("eventsourcing.core").uuid():gsub("-", "")
  return ("es_test_%s_%s"):format(my_pid, u:sub(9))
end

-- Open a store for a helpers.stores() entry; PostgreSQL ones get a fresh
-- schema and are migrated. Returns store, schema (nil for memory).
function helpers.open(entry)
  local es = require "eventsourcing"
  local schema = entry.name ~= "memory" and helpers.fresh_schema() or nil
  local store = assert(es.open(entry.url, schema and { schema = schema } or nil))
  if store.migrate then assert(store:migrate(helpers.migrate_opts(entry))) end
  return store, schema
end

-- Migration options for a store entry: with ES_TEST_DISTRIBUTED=1 (make
-- test-citus, against a Citus coordinator) PostgreSQL stores are laid out
-- distributed, with ES_TEST_SHARDS shards (default 4).
function helpers.migrate_opts(entry)
  if (entry and entry.name == "memory") or os.getenv("ES_TEST_DISTRIBUTED") ~= "1" then
    return nil
  end
  return { distributed = true, shards = tonumber(os.getenv("ES_TEST_SHARDS") or "4") }
end

-- Whether PostgreSQL stores are distributed on Citus in this run.
function helpers.distributed()
  return os.getenv("ES_TEST_DISTRIBUTED") == "1"
end

-- Stream names on one shard, for scenarios about the order of events of
-- several streams (on Citus read_all orders only within a shard): the
-- first name as given, the others with a suffix ("_<n>") when needed.
-- Elsewhere the names as given.
function helpers.on_one_shard(store, ...)
  local names = { ... }
  if not (helpers.distributed() and store:kind() == "postgresql") then return ... end
  local q = "SELECT get_shard_id_for_distribution_column($1, $2::text)::text AS s"
  local rel = '"' .. store:schema() .. '".events'
  local want = assert(store:query(q, rel, names[1]))[1].s
  for i = 2, #names do
    local k = 0
    while assert(store:query(q, rel, names[i]))[1].s ~= want do
      k = k + 1
      names[i] = names[i]:gsub("_%d+$", "") .. "_" .. k
    end
  end
  return (table.unpack or unpack)(names)
end

-- Two sessions on one fresh schema, with an empty table `probe` for
-- specs that need something to lock or write: store, admin, schema.
function helpers.open_pair()
  local es = require "eventsourcing"
  local store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
  local admin = assert(es.open(helpers.database_url(), { schema = schema }))
  assert(store:query(('CREATE TABLE "%s".probe (x int)'):format(schema)))
  return store, admin, schema
end

-- A second session on the data of helpers.open(entry)'s store: store2,
-- own (memory: the same store, and own false; close store2 when own).
function helpers.second_store(entry, store, schema)
  if entry.name == "memory" then return store, false end
  return assert(require("eventsourcing").open(entry.url, { schema = schema })), true
end

-- Counter, a small aggregate for repository specs: Add { by, max, hook }
-- (refused over max; decide runs hook(state) first, to interleave
-- writers), Take { by } (refused when n < by), Noop. opts:
-- snapshot_every, snapshot_version, unencodable (its apply leaves a
-- function in the state, which JSON cannot hold).
function helpers.counter(opts)
  local es = require "eventsourcing"
  opts = opts or {}
  return es.aggregate {
    name = "Counter",
    initial = function() return { n = 0, log = es.json.array {} } end,
    snapshot_every = opts.snapshot_every,
    snapshot_version = opts.snapshot_version,
    apply = {
      Added = function(s, e)
        s.n = s.n + e.data.by
        s.log[#s.log + 1] = e.data.by
        if opts.unencodable then s.fn = print end
      end,
      Taken = function(s, e) s.n = s.n - e.data.by end,
    },
    decide = {
      Add = function(s, c)
        if c.hook then c.hook(s) end
        if c.max and s.n + c.by > c.max then return nil, "over the maximum" end
        return { type = "Added", data = { by = c.by } }
      end,
      Take = function(s, c)
        if s.n < c.by then return nil, "not enough" end
        return { type = "Taken", data = { by = c.by } }
      end,
      Noop = function() return nil end,
    },
  }
end

-- repo:execute of Counter's Add { by } (extra: more command fields).
function helpers.add(repo, A, id, by, extra)
  local cmd = { by = by }
  for k, v in pairs(extra or {}) do cmd[k] = v end
  return repo:execute(A, id, "Add", cmd)
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
  for _, k in ipairs { "LUA_PATH", "LUA_CPATH", "ES_TEST_DATABASE_URL", "ES_TEST_POOLER", "ES_TEST_DIRECT_URL",
                       "ES_TEST_DISTRIBUTED", "ES_TEST_SHARDS", "LD_PRELOAD",
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

-- Child processes and files, for the specs that run writers, projectors
-- or workflows in processes of their own.
function helpers.read_file(path)          -- the contents, or nil
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

function helpers.sh(cmd)                  -- true when the command succeeded
  local r = os.execute(cmd)
  return r == true or r == 0
end

function helpers.sleep(seconds)
  helpers.sh("sleep " .. tostring(seconds))
end

-- Starts `code` in a background Lua of the same flavour, output to log;
-- env is a prefix such as "X=1 Y=2". Returns the child's pid.
function helpers.spawn(code, log, env)
  local f = assert(io.popen(("%s %s -e %s >%s 2>&1 & echo $!"):format(env or "",
    helpers.lua_cmd(), shell_quote(code), shell_quote(log))))
  local child = f:read("*l")
  f:close()
  return child
end

-- A new empty folder under /tmp (prefix: its name's start).
function helpers.mktemp_dir(prefix)
  local f = assert(io.popen("mktemp -d /tmp/" .. prefix .. ".XXXXXX"))
  local dir = f:read("*l")
  f:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  return dir
end

-- A folder for child processes and their logs: w.dir; w:spawn(code, name,
-- env) -> pid, log path; w:remove().
function helpers.workdir(prefix)
  local w = { dir = helpers.mktemp_dir(prefix) }
  function w:spawn(code, name, env)
    local log = self.dir .. "/" .. name .. ".log"
    return helpers.spawn(code, log, env), log
  end
  function w:remove() helpers.sh("rm -rf " .. shell_quote(self.dir)) end
  return w
end

-- A killed child stays a zombie until its parent reaps it, and a child
-- whose starting shell has exited belongs to PID 1, which may reap late
-- (seconds, on the CI machine): a zombie counts as gone.
function helpers.alive(child)
  local stat = helpers.read_file("/proc/" .. tostring(child) .. "/stat")
  if not stat then return false end
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

function helpers.wait_exit(child, seconds)  -- true once the process is gone
  for _ = 1, (seconds or 60) * 10 do
    if not helpers.alive(child) then return true end
    helpers.sleep(0.1)
  end
  return false
end

-- Every row of every table of a schema, hashed in a stable order: equal
-- digests before and after mean no stored byte changed.
function helpers.schema_digest(store, schema)
  local tables = assert(store:query(
    "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY tablename", schema))
  local parts = {}
  for _, t in ipairs(tables) do
    local q = ("SELECT count(*) AS n, coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') AS h "
      .. "FROM %q.%q x"):format(schema, t.tablename)
    local r = assert(store:query(q))
    parts[#parts + 1] = ("%s:%s:%s"):format(t.tablename, tostring(r[1].n), r[1].h)
  end
  return table.concat(parts, "\n")
end

return helpers
