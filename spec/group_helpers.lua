-- Shared by the consumer-group specs (25 on one PostgreSQL, 52 on Citus):
-- the member and writer processes' code, and a wait that shows the ledger
-- when it times out.
local es = require "eventsourcing"
local helpers = require "helpers"

local M = {}

-- A custom projection that records every event it handles (with the
-- member that did it) and refuses an event that is not the next one of
-- its stream: a doubled, lost or reordered event shows.
M.PROJECTION = [[
local es = require "eventsourcing"
local member = os.getenv("ES_MEMBER") or "test"
local schema = %q
local P = es.projection { name = "grp_audit",
  migrate = function(tx)
    tx:execute(('CREATE TABLE IF NOT EXISTS "%%s".grp_handled (event_id uuid, stream text, '
      .. 'version bigint, member text)'):format(schema))
    tx:execute(('CREATE TABLE IF NOT EXISTS "%%s".grp_last (stream text PRIMARY KEY, '
      .. 'version bigint NOT NULL)'):format(schema))
  end,
  on = { Tick = function(e, tx)
    local r = tx:execute(('SELECT version FROM "%%s".grp_last WHERE stream = $1'):format(schema), e.stream)
    local prev = r[1] and r[1].version or 0
    if e.version ~= prev + 1 then
      error(("stream %%s: version %%d after %%d"):format(e.stream, e.version, prev))
    end
    tx:execute(('INSERT INTO "%%s".grp_last VALUES ($1, $2) ON CONFLICT (stream) DO UPDATE '
      .. 'SET version = excluded.version'):format(schema), e.stream, e.version)
    tx:execute(('INSERT INTO "%%s".grp_handled VALUES ($1, $2, $3, $4)'):format(schema),
      e.id, e.stream, e.version, member)
  end } }
]]

-- A member process of a group with `partitions` (a count or "shards")
-- that runs until stop_file exists.
function M.member_code(url, schema, stop_file, partitions)
  return M.PROJECTION:format(schema) .. ([[
local store = assert(es.open(%q, { schema = %q }))
local p = es.projector(store, { P }, { batch_size = 20,
  group = { partitions = %s, member = member, ttl = 1.5, heartbeat = 0.2 } })
p:run { poll = 0.5, retry = 0.1, stop = function()
  local f = io.open(%q); if f then f:close(); return true end; return false end }
print("done")
]]):format(url, schema, type(partitions) == "string" and ("%q"):format(partitions) or tostring(partitions),
    stop_file)
end

-- A writer process: n rounds of a Tick on one of 13 streams of its own
-- (G<w>-k) and a Noise the projection ignores.
function M.writer_code(url, schema, w, n)
  return ([[
local es = require "eventsourcing"
local store = assert(es.open(%q, { schema = %q }))
for i = 1, %d do
  assert(store:append(("G%d-%%d"):format(i %% 13), { type = "Tick" }))
  assert(store:append(("N-%%d"):format(i %% 5), { type = "Noise" }))
  if i %% 50 == 0 then os.execute("sleep 0.05") end
end
print("done")
]]):format(url, schema, n, w)
end

-- Member and writer processes of one test, in work (helpers.workdir):
-- spawn(code, name, env) -> pid; stop() touches work's stop file (members
-- leave at it) and kills what has not left within 5 s. A test that failed
-- half-way leaves members running: stop() before the folder goes.
function M.processes(work)
  local pids = {}
  return {
    spawn = function(code, name, env)
      local pid = work:spawn(code, name, env)
      pids[#pids + 1] = pid
      return pid
    end,
    stop = function()
      helpers.sh("touch " .. helpers.shell_quote(work.dir .. "/stop"))
      for _, pid in ipairs(pids) do
        if not helpers.wait_exit(pid, 5) then helpers.sh("kill -9 " .. pid .. " 2>/dev/null") end
      end
    end,
  }
end

-- Waits until fn() is true; on timeout raises with the ledger's rows and
-- whatever more() says. sql(s) runs s with <s> as the schema.
function M.wait_for(sql, what, fn, seconds, more)
  local t_end = es.workflow.now() + (seconds or 60)
  while es.workflow.now() < t_end do
    if fn() then return end
    helpers.sleep(0.1)
  end
  local ledger = {}
  for _, r in ipairs(sql("SELECT name, checkpoint, error::text AS e FROM <s>.projections ORDER BY name")) do
    ledger[#ledger + 1] = ("%s %s %s"):format(r.name, tostring(r.checkpoint), tostring(r.e))
  end
  error("timed out waiting for " .. what .. (more and ("; " .. more()) or "") .. "; ledger:\n"
    .. table.concat(ledger, "\n"))
end

return M
