-- scripts/soak.lua: the load run behind `make soak` (scripts/soak.sh sets
-- up PostgreSQL and nginx, then runs this with lua5.4).
--
--   lua5.4 scripts/soak.lua run          the driver: spawns the roles,
--                                        restarts PostgreSQL halfway, checks
--   lua5.4 scripts/soak.lua ROLE N       one role (writer, projector,
--                                        runner, http), spawned by the driver
--
-- Environment: SOAK_URL (conninfo), SOAK_SCHEMA, SOAK_DIR (logs; one file
-- per role), SOAK_SECONDS (default 60), SOAK_PGDATA (restarted halfway
-- with `pg_ctl restart -m immediate`), SOAK_PORT (nginx; no HTTP traffic
-- when unset).
--
-- Writers log every acknowledged event id ("ok <id> <batch> <n>") and
-- every rolled-back one ("rb <id>") as it happens; an append whose outcome
-- is unknown (the server went away before answering) is retried with the
-- same ids at the same expected version until it is acknowledged: the
-- store takes the same ids at the same versions as a success, so a retry
-- can never double an event. At the end the driver checks, against the
-- database: every acknowledged event stored once, no rolled-back event
-- stored, every batch stored whole or not at all, each read model equal
-- to a fresh rebuild, each workflow effect once, and that the followers
-- caught up by themselves after the restart.
local es = require "eventsourcing"
local core = require "eventsourcing.core"
local util = require "eventsourcing.util"

local URL = assert(os.getenv("SOAK_URL"), "SOAK_URL is not set")
local SCHEMA = os.getenv("SOAK_SCHEMA") or "es_soak"
local DIR = assert(os.getenv("SOAK_DIR"), "SOAK_DIR is not set")
local SECONDS = tonumber(os.getenv("SOAK_SECONDS") or "") or 60
local PORT = os.getenv("SOAK_PORT")
local WRITERS = 8
local STREAMS_PER_WRITER = 40

local function log(fmt, ...) io.stderr:write(("soak: " .. fmt .. "\n"):format(...)) end

local function open()
  while true do
    local s, err = es.open(URL, { schema = SCHEMA })
    if s then return s end
    log("open: %s (retrying)", tostring(err))
    util.sleep(0.2)
  end
end

-- The soak's own read model: one row per stream, so "equal to a
-- rebuild" is checked on something every writer touches.
local Streams = es.read_model {
  name = "rm_soak_streams", key = "stream",
  columns = { stream = "text", events = "bigint", last_version = "bigint", tokens = "text" },
  key_of = function(e) return e.stream end,
  on = {
    SoakEvent = function(row, e)
      row.events = (row.events or 0) + 1
      row.last_version = e.version
      -- order matters: a row built from events out of order differs
      row.tokens = ((row.tokens or "") .. e.data.tok:sub(1, 4))
    end,
  },
}

local function read_models()
  local list = { Streams }
  for _, m in ipairs(require("orders.service").read_models) do list[#list + 1] = m end
  return list
end

-- Roles ---------------------------------------------------------------------

local roles = {}

-- Appends until the deadline: single events to its own streams (expected
-- version checked), batches of 10 to new streams, and on purpose some
-- rolled back.
function roles.writer(n)
  local out = assert(io.open(("%s/writer-%d.acks"):format(DIR, n), "w"))
  out:setvbuf("line")
  local store = open()
  local versions = {}
  local deadline = util.monotonic() + SECONDS
  local seq = 0
  math.randomseed(n * 7919 + os.time())
  local function events_of(count, batch)
    local list = {}
    for i = 1, count do
      local id = core.uuid()
      list[i] = { id = id, type = "SoakEvent", data = { tok = id, i = i },
                  metadata = { soak_batch = batch, soak_n = count } }
    end
    return list
  end
  -- retries an append whose outcome is unknown with the same ids
  local function append(stream, evs, expected)
    for _ = 1, 1200 do   -- a minute at most: a restart takes seconds
      local r, err = store:append(stream, evs, { expected_version = expected })
      if r then return r end
      if err.kind ~= "connection" and err.kind ~= "database" then
        error(("writer %d: %s on %s"):format(n, tostring(err), stream))
      end
      util.sleep(0.05)
    end
    error(("writer %d: no answer for a minute on %s"):format(n, stream))
  end
  while util.monotonic() < deadline do
    seq = seq + 1
    local batch = ("w%d-%d"):format(n, seq)
    local roll = math.random()
    if roll < 0.1 then
      local evs = events_of(3, batch)
      local ok = store:begin()
      if ok and store:append(("SoakRb-w%d-%d"):format(n, seq), evs) then
        -- the transaction is open: whatever happens next, nothing commits
        for _, e in ipairs(evs) do out:write(("rb %s\n"):format(e.id)) end
      end
      store:rollback()
    else
      local count = roll < 0.3 and 10 or 1
      local stream = count == 1 and ("Soak-w%d-%d"):format(n, seq % STREAMS_PER_WRITER)
        or ("SoakBatch-w%d-%d"):format(n, seq)
      local evs = events_of(count, batch)
      local expected = versions[stream] or es.NO_STREAM
      local r = append(stream, evs, expected)
      versions[stream] = r.version
      for _, e in ipairs(evs) do out:write(("ok %s %s %d\n"):format(e.id, batch, count)) end
    end
  end
  out:close()
  store:close()
end

-- Follows until the file DIR/<stop_name> appears.
local function follow(make, stop_name)
  local store = open()
  local follower = make(store)
  local stop = false
  follower:run { poll = 0.2, retry = 0.2,
    stop = function()
      if not stop then
        local f = io.open(DIR .. "/" .. stop_name)
        if f then f:close(); stop = true end
      end
      return stop
    end,
    on_error = function(err) log("follower: %s", tostring(err)) end }
end

function roles.projector()
  follow(function(store) return es.projector(store, read_models()) end, "stop")
end

function roles.runner()
  local workflows = require "orders.workflows"
  -- stopped first (its timers append events of their own), then the projectors
  follow(function(store) return workflows.runner(store, { draft_ttl = 2, read_models = false }) end,
    "stop-runner")
end

-- Drives the order service over HTTP: create, add, place, read.
function roles.http(n)
  local json = es.json
  local token = n % 2 == 0 and "alice-token-0123456789" or "bob-token-0123456789"
  local statuses = {}
  local function request(method, path, body)
    local cmd = ("curl -s -m 15 -X %s -H 'Authorization: Bearer %s' -H 'Content-Type: application/json' "
      .. "-w '\\n%%{http_code}' %s 'http://127.0.0.1:%s%s'"):format(method, token,
      body and ("-d '" .. body .. "'") or "", PORT, path)
    local p = io.popen(cmd)
    local text = p:read("*a")
    p:close()
    local resp, code = text:match("^(.*)\n(%d+)$")
    code = code or "000"
    statuses[code] = (statuses[code] or 0) + 1
    if code == "500" then log("HTTP 500 for %s %s: %s", method, path, tostring(resp)) end
    return tonumber(code), resp and json.decode(resp)
  end
  local deadline = util.monotonic() + SECONDS
  while util.monotonic() < deadline do
    local code, order = request("POST", "/orders", "{}")
    if code == 201 and order then
      local path = "/orders/" .. order.id
      request("POST", path .. "/items", '{"product_id":"p1","quantity":1,"unit_price":100}')
      if math.random() < 0.5 then request("POST", path .. "/place", "{}") end
      request("GET", path)
    end
  end
  local f = assert(io.open(("%s/http-%d.status"):format(DIR, n), "w"))
  for code, count in pairs(statuses) do f:write(("%s %d\n"):format(code, count)) end
  f:close()
end

-- The driver ----------------------------------------------------------------

local function sh(cmd)
  local ok, _, code = os.execute(cmd)
  return ok == true or ok == 0 or code == 0
end

local function spawn(role, n)
  local logf = ("%s/%s-%d.log"):format(DIR, role, n)
  local p = assert(io.popen(("lua5.4 %s %s %d >%s 2>&1 & echo $!"):format(arg[0], role, n, logf)))
  local pid = p:read("*l")
  p:close()
  return { role = role, n = n, pid = pid, log = logf }
end

-- a zombie is gone too: PID 1 reaps orphans late here
local function alive(child)
  local f = io.open("/proc/" .. child.pid .. "/stat")
  if not f then return false end
  local stat = f:read("*a")
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

local function wait_gone(children, seconds)
  local t = util.monotonic() + seconds
  while util.monotonic() < t do
    local any = false
    for _, c in ipairs(children) do if alive(c) then any = true end end
    if not any then return true end
    util.sleep(0.2)
  end
  return false
end

local function query(store, sql, ...)
  return assert(store:query((sql:gsub("<s>", ("%q"):format(SCHEMA))), ...))
end

local function read_acks()
  local acked, rolled = {}, {}
  local n_acked, n_rolled = 0, 0
  for w = 1, WRITERS do
    for line in io.lines(("%s/writer-%d.acks"):format(DIR, w)) do
      local kind, id = line:match("^(%a+) (%S+)")
      if kind == "ok" then
        acked[id] = true; n_acked = n_acked + 1
      elseif kind == "rb" then
        rolled[#rolled + 1] = id; n_rolled = n_rolled + 1
      end
    end
  end
  return acked, n_acked, rolled, n_rolled
end

-- Followers have caught up when every projection (and, unless
-- projections_only, workflow) checkpoint is at the end of the log.
local function caught_up(store, projections_only)
  local p = es.projector(store, read_models())
  local ps = p:status()
  if not ps then return false end
  local workflows = require "orders.workflows"
  local rs = projections_only and {}
    or workflows.runner(store, { draft_ttl = 2, read_models = false }):status()
  if not rs then return false end
  for _, list in ipairs { ps, rs } do
    for _, s in ipairs(list) do
      if (s.lag_events or 0) > 0 or s.error then return false, s end
    end
  end
  return true
end

local function run()
  local t0 = util.monotonic()
  local checks = { passed = 0, failed = 0 }
  local function check(ok, what)
    if ok then checks.passed = checks.passed + 1 else checks.failed = checks.failed + 1 end
    print(("%s %s"):format(ok and "ok  " or "FAIL", what))
  end

  local store = open()
  assert(store:migrate())
  assert(es.projector(store, read_models()):migrate())
  assert(require("orders.workflows").runner(store, { draft_ttl = 2, read_models = false }):migrate())

  local children, writers, followers = {}, {}, {}
  for i = 1, WRITERS do
    local c = spawn("writer", i); writers[#writers + 1] = c; children[#children + 1] = c
  end
  for i = 1, 2 do
    local c = spawn("projector", i); followers[#followers + 1] = c; children[#children + 1] = c
  end
  local r = spawn("runner", 1); followers[#followers + 1] = r; children[#children + 1] = r
  local clients = {}
  if PORT and PORT ~= "" then
    for i = 1, 2 do local c = spawn("http", i); clients[#clients + 1] = c; children[#children + 1] = c end
  end
  log("%d writers, 2 projectors, 1 workflow runner, %d HTTP clients for %d s",
    WRITERS, #clients, SECONDS)

  -- PostgreSQL restarted (a crash: -m immediate) halfway through
  util.sleep(SECONDS / 2)
  local pgdata = os.getenv("SOAK_PGDATA")
  if pgdata and pgdata ~= "" then
    local as_pg = sh("id -u | grep -qx 0") and "runuser -u postgres -- " or ""
    local ok = sh(("%s/usr/lib/postgresql/15/bin/pg_ctl -D '%s' -m immediate -w -t 60 restart >%s/restart.log 2>&1")
      :format(as_pg, pgdata, DIR))
    log("PostgreSQL restarted (immediate) at %.0f s: %s", util.monotonic() - t0, ok and "ok" or "FAILED")
    check(ok, "PostgreSQL restarted with -m immediate halfway")
    store:close()
    store = open()
  end

  check(wait_gone(writers, SECONDS + 120), "writers finished by themselves")
  wait_gone(clients, 60)

  -- the followers must catch up on their own, restart or not
  local t_end, done, last = util.monotonic() + 120, false, nil
  while util.monotonic() < t_end do
    local ok, ok2, s = pcall(caught_up, store)
    if ok and ok2 then done = true; break end
    last = s
    util.sleep(0.5)
  end
  local died = {}
  for _, c in ipairs(followers) do if not alive(c) then died[#died + 1] = c.role .. "-" .. c.n end end
  check(#died == 0, "no follower process died" .. (#died > 0 and (": " .. table.concat(died, ", ")) or ""))
  check(done, "followers caught up by themselves within 120 s of the writers' end"
    .. (last and (" (behind: " .. tostring(last.name) .. ")") or ""))
  -- the runner's timers keep appending (draft expiry): stop it first, let
  -- the projectors reach the very end, then stop them
  local function stop(name, list)
    local f = assert(io.open(DIR .. "/" .. name, "w")); f:close()
    if not wait_gone(list, 30) then
      for _, c in ipairs(list) do sh("kill " .. c.pid .. " 2>/dev/null") end
    end
  end
  stop("stop-runner", { r })
  local t_last = util.monotonic() + 60
  repeat
    local ok, ok2 = pcall(caught_up, store, true)
    if ok and ok2 then break end
    util.sleep(0.2)
  until util.monotonic() > t_last
  stop("stop", followers)

  -- 1. acknowledged appends: stored exactly once
  local acked, n_acked, rolled, n_rolled = read_acks()
  local stored = query(store, "SELECT data->>'tok' AS tok, count(*) AS n FROM <s>.events "
    .. "WHERE type = 'SoakEvent' GROUP BY 1")
  local found, doubled = {}, 0
  for _, row in ipairs(stored) do
    found[row.tok] = row.n
    if row.n > 1 then doubled = doubled + 1 end
  end
  local lost = 0
  for id in pairs(acked) do if not found[id] then lost = lost + 1 end end
  check(lost == 0, ("acknowledged events stored: %d of %d (lost %d)"):format(n_acked - lost, n_acked, lost))
  check(doubled == 0, ("events stored twice: %d"):format(doubled))
  -- 2. rolled back: none stored
  local leaked = 0
  for _, id in ipairs(rolled) do if found[id] then leaked = leaked + 1 end end
  check(leaked == 0, ("rolled-back events stored: %d of %d"):format(leaked, n_rolled))
  -- 3. batches whole or absent (an unknown outcome retried to success counts as acknowledged)
  local partial = query(store, "SELECT metadata->>'soak_batch' AS b, count(*) AS n, "
    .. "max((metadata->>'soak_n')::int) AS want FROM <s>.events WHERE type = 'SoakEvent' "
    .. "GROUP BY 1 HAVING count(*) <> max((metadata->>'soak_n')::int)")
  check(#partial == 0, ("batches stored in part: %d"):format(#partial))
  local unacked = 0
  for _, row in ipairs(stored) do if not acked[row.tok] then unacked = unacked + 1 end end
  log("stored but never acknowledged (a writer killed mid-append would leave these): %d", unacked)

  -- 4. each read model equals a fresh rebuild
  local projector = es.projector(store, read_models())
  local differing = 0
  for _, m in ipairs(read_models()) do
    local copy = m.name .. "__soak_copy"
    query(store, ("DROP TABLE IF EXISTS <s>.%q"):format(copy))
    query(store, ("CREATE TABLE <s>.%q AS SELECT * FROM <s>.%q"):format(copy, m.name))
    assert(projector:rebuild(m.name))
    -- rows compared as jsonb: json columns (rm_orders' items) have no
    -- equality, and keep their text as each writer's encoder wrote it
    -- (key order may differ between processes, the values not)
    local diff = query(store, ("SELECT count(*) AS n FROM ((SELECT to_jsonb(c) FROM <s>.%q c "
      .. "EXCEPT ALL SELECT to_jsonb(m) FROM <s>.%q m) UNION ALL (SELECT to_jsonb(m) FROM <s>.%q m "
      .. "EXCEPT ALL SELECT to_jsonb(c) FROM <s>.%q c)) d")
      :format(copy, m.name, m.name, copy))
    differing = differing + diff[1].n
    check(diff[1].n == 0, ("%s rows differing from a rebuild: %d"):format(m.name, diff[1].n))
    if diff[1].n > 0 then
      -- show a few, as kept live and as rebuilt
      local sample = query(store, ("(SELECT 'live' AS side, x.r::text AS r FROM (SELECT to_jsonb(c) AS r "
        .. "FROM <s>.%q c EXCEPT ALL SELECT to_jsonb(m) FROM <s>.%q m) x LIMIT 3) UNION ALL "
        .. "(SELECT 'rebuilt', y.r::text FROM (SELECT to_jsonb(m) AS r FROM <s>.%q m "
        .. "EXCEPT ALL SELECT to_jsonb(c) FROM <s>.%q c) y LIMIT 3)")
        :format(copy, m.name, m.name, copy))
      for _, row in ipairs(sample) do log("%s %s: %s", m.name, row.side, row.r) end
    end
    query(store, ("DROP TABLE <s>.%q"):format(copy))
  end

  -- 5. workflow effects once: one reservation outcome per order and product
  local effects = query(store, "SELECT stream, data->>'order_id' AS o, type, count(*) AS n FROM <s>.events "
    .. "WHERE type IN ('StockReserved', 'ReservationRejected') GROUP BY 1, 2, 3 HAVING count(*) > 1")
  check(#effects == 0, ("workflow effects done twice: %d"):format(#effects))
  local dead = query(store, "SELECT count(*) AS n FROM <s>.dead_letters")
  log("dead letters: %d", dead[1].n)

  for _, c in ipairs(children) do if alive(c) then sh("kill " .. c.pid) end end
  local total = query(store, "SELECT count(*) AS n FROM <s>.events")[1].n
  local http = {}
  for i = 1, #clients do
    for line in io.lines(("%s/http-%d.status"):format(DIR, i)) do
      local code, n = line:match("^(%d+) (%d+)$")
      http[code] = (http[code] or 0) + tonumber(n)
    end
  end
  local codes = {}
  for code, n in pairs(http) do codes[#codes + 1] = code .. ":" .. n end
  table.sort(codes)
  print(("soak: %d s, events appended %d (acknowledged by writers %d), lost %d, doubled %d, "
    .. "read-model rows differing from a rebuild %d, HTTP statuses %s")
    :format(SECONDS, total, n_acked, lost, doubled, differing,
      #codes > 0 and table.concat(codes, " ") or "none"))
  store:close()
  print(("%d passed, %d failed"):format(checks.passed, checks.failed))
  os.exit(checks.failed == 0 and 0 or 1)
end

local role = arg[1]
if role == "run" then
  run()
elseif roles[role] then
  roles[role](tonumber(arg[2]) or 1)
else
  io.stderr:write("usage: lua5.4 scripts/soak.lua run | writer N | projector N | runner N | http N\n")
  os.exit(2)
end
