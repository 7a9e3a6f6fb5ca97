-- luacheck: globals ngx
-- examples/orders/http/pgprobe.lua: a stream's current version read from
-- the nginx event loop, over a cosocket that speaks just enough of
-- PostgreSQL's wire protocol (protocol 3.0: startup, trust / cleartext /
-- md5 password, one prepared statement bound and executed).
--
--   local probe = require "orders.http.pgprobe"
--   probe.version("Order-<uuid>") -> version (0: no stream) | nil, err
--   probe.enabled() -> true | false, why
--
-- Why: GET /orders/{id} replies kept in a shared dict (api.lua) are sent
-- again only while their stream is at the version they were made at. That
-- check is one index probe; made through the thread pool it costs a hop to
-- a pool thread and back (about 100 us of nginx CPU per request), made
-- here it costs a round trip on a non-blocking socket. libpq cannot serve
-- here: it blocks the event loop.
--
-- One connection per nginx worker carries every probe, pipelined (see
-- the prober below). Only a unix socket, or TCP with sslmode=disable, is
-- used: this client speaks no TLS, and must never send in clear what libpq
-- would have encrypted. SCRAM authentication is not spoken either.
-- Whenever the probe is not possible (such settings, an error, a timeout)
-- it says so and the caller falls back to the thread pool, which answers
-- as before.
-- LuaJIT's bit library (the event loop's Lua); under plain Lua only the
-- conninfo parser is used (by the specs)
local has_bit, bit = pcall(require, "bit")
if not has_bit then bit = {} end
local band, rshift, lshift, bor = bit.band, bit.rshift, bit.lshift, bit.bor
local char, byte = string.char, string.byte

local M = {}

local TIMEOUT_MS = 1000

local function i32(n)
  return char(band(rshift(n, 24), 255), band(rshift(n, 16), 255), band(rshift(n, 8), 255), band(n, 255))
end
local function i16(n) return char(band(rshift(n, 8), 255), band(n, 255)) end
local function u32(s, i)
  local a, b, c, d = byte(s, i, i + 3)
  return bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
end
local function msg(kind, body) return kind .. i32(#body + 4) .. body end

---------------------------------------------------------------- settings

-- conninfo "k=v k='v w'" or a postgres:// URL -> table of keywords
local function unquote(v)
  if v:sub(1, 1) == "'" then return (v:sub(2, -2):gsub("\\(.)", "%1")) end
  return v
end

local function pct(s)
  return (s:gsub("%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

local function parse_conninfo(s)
  local out = {}
  if s:match("^postgres[ql]*://") then
    local rest = s:gsub("^postgres[ql]*://", "")
    local auth, after = rest:match("^([^@/?]*)@()")
    if auth then rest = rest:sub(after) end
    local hostport, path, query = rest:match("^([^/?]*)/?([^?]*)%??(.*)$")
    if not hostport then return nil end
    if auth then
      local u, p = auth:match("^([^:]*):?(.*)$")
      out.user = u ~= "" and pct(u) or nil
      out.password = p ~= "" and pct(p) or nil
    end
    local h, port = hostport:match("^(.-):?(%d*)$")
    if h and h ~= "" then out.host = pct(h) end
    if port and port ~= "" then out.port = port end
    if path ~= "" then out.dbname = pct(path) end
    for k, v in query:gmatch("([^&=]+)=([^&]*)") do out[pct(k)] = pct(v) end
    return out
  end
  local i, n = 1, #s
  while i <= n do
    local k, e = s:match("^%s*([%w_]+)%s*=%s*()", i)
    if not k then
      if s:match("^%s*$", i) then break end
      return nil
    end
    local v, after
    if s:sub(e, e) == "'" then
      -- a quoted value: up to the next quote not escaped by a backslash
      local j = e + 1
      while j <= n and s:sub(j, j) ~= "'" do
        if s:sub(j, j) == "\\" then j = j + 1 end
        j = j + 1
      end
      if j > n then return nil end
      v, after = s:sub(e, j), j + 1
    else
      v, after = s:match("^(%S*)()", e)
    end
    out[k] = unquote(v)
    i = after
  end
  return out
end

local settings   -- false: no probe (why in settings_why)
local settings_why

local function load_settings()
  if settings ~= nil then return settings end
  settings = false
  local mode = os.getenv("ES_HTTP_FAST_GET")
  if mode == "off" or mode == "0" then
    settings_why = "ES_HTTP_FAST_GET=off"
    return settings
  end
  local c = parse_conninfo(os.getenv("ES_HTTP_DATABASE_URL") or "")
  if not c then settings_why = "ES_HTTP_DATABASE_URL not understood"; return settings end
  local host, user, db = c.host, c.user, c.dbname or c.user
  if not host or host == "" or host:find(",") or not user then
    settings_why = "host and user must be given in ES_HTTP_DATABASE_URL"
    return settings
  end
  local target
  local port = tonumber(c.port or "5432")
  if host:sub(1, 1) == "/" then
    target = ("unix:%s/.s.PGSQL.%d"):format(host, port)
  elseif c.sslmode == "disable" then
    target = { host, port }
  else
    settings_why = "TCP without sslmode=disable (this client speaks no TLS)"
    return settings
  end
  local schema = os.getenv("ES_HTTP_SCHEMA")
  if not schema or schema == "" then schema = "eventsourcing" end
  if schema:find('"', 1, true) then settings_why = "schema name"; return settings end
  settings = {
    target = target, user = user, dbname = db, password = c.password,
    -- behind a transaction pooler a named statement would not stay on the
    -- session it was prepared on: parse it each time (unnamed) there
    named = c.pooler ~= "transaction",
    sql = ('SELECT version FROM "%s".events WHERE stream = $1 ORDER BY version DESC LIMIT 1'):format(schema),
  }
  return settings
end

function M.enabled()
  local s = load_settings()
  if not s then return false, settings_why end
  return true
end

---------------------------------------------------------------- protocol

-- one message: kind, body | nil, err
local function receive(sock)
  local head, err = sock:receive(5)
  if not head then return nil, err end
  local len = u32(head, 2) - 4
  if len < 0 or len > 1048576 then return nil, "bad message length" end
  local body = ""
  if len > 0 then
    body, err = sock:receive(len)
    if not body then return nil, err end
  end
  return head:sub(1, 1), body
end

local function error_text(body)
  local parts = {}
  for code, text in body:gmatch("(.)([^%z]*)%z") do
    if code == "C" or code == "M" then parts[#parts + 1] = text end
  end
  return table.concat(parts, " ")
end

local function startup(sock, s)
  local params = "user\0" .. s.user .. "\0database\0" .. s.dbname
    .. "\0application_name\0es_http_probe\0\0"
  local ok, err = sock:send(i32(#params + 8) .. i32(196608) .. params)
  if not ok then return nil, err end
  while true do
    local kind, body = receive(sock)
    if not kind then return nil, body end
    if kind == "R" then
      local code = u32(body, 1)
      if code == 3 or code == 5 then
        if not s.password then return nil, "the server wants a password and none is given", true end
        local pw = s.password
        if code == 5 then
          pw = "md5" .. ngx.md5(ngx.md5(pw .. s.user) .. body:sub(5, 8))
        end
        ok, err = sock:send(msg("p", pw .. "\0"))
        if not ok then return nil, err end
      elseif code ~= 0 then
        return nil, "authentication method " .. code .. " is not supported here", true
      end
    elseif kind == "E" then
      return nil, error_text(body)
    elseif kind == "Z" then
      return true
    end -- S (parameters), K (key data), N (notices): nothing to keep
  end
end

local function bind_execute(stmt, value)
  return msg("B", "\0" .. stmt .. "\0" .. i16(0) .. i16(1) .. i32(#value) .. value .. i16(0))
    .. msg("E", "\0" .. i32(0)) .. msg("S", "")
end

-- Reads one probe's answer, up to its ReadyForQuery: true, version or
-- false, error (the statement failed) | nil, err (the connection must go)
local function answer(sock)
  local version, failure = 0, nil
  while true do
    local kind, body = receive(sock)
    if not kind then return nil, body end
    if kind == "D" then
      local len = u32(body, 3)
      version = tonumber(body:sub(7, 6 + len))
      if not version then failure = "not a version" end
    elseif kind == "E" then
      failure = error_text(body)
    elseif kind == "Z" then
      if failure then return false, failure end
      return true, version
    end -- 1 (parse), 2 (bind), C (complete), N (notice)
  end
end

---------------------------------------------------------------- the prober

-- One connection per nginx worker, owned by a timer (a cosocket belongs
-- to the request or timer that made it). Requests queue their streams and
-- wait; the timer sends every queued probe in one write (pipelined, each
-- with its own Sync so that one failure fails only itself), reads the
-- answers in order and wakes each request. One PostgreSQL backend per
-- worker, however many GETs are in flight: at 32 connections a probe per
-- backend woke 32 processes on 2 cores, and their scheduling made the p99.
local semaphore               -- ngx.semaphore, loaded on first use (nginx only)
local pending = {}            -- { stream, sema, version | err } waiting to be sent
local inflight = nil            -- the batch the prober is sending and reading
local wake                    -- posted when the idle prober has work
local idle, running = false, false
local IDLE_WAIT = 1           -- seconds between checks for nginx exiting

local function connect(s)
  local sock = ngx.socket.tcp()
  sock:settimeouts(TIMEOUT_MS, TIMEOUT_MS, TIMEOUT_MS)
  local ok, err
  if type(s.target) == "table" then
    ok, err = sock:connect(s.target[1], s.target[2])
  else
    ok, err = sock:connect(s.target)
  end
  if not ok then return nil, err end
  local never
  ok, err, never = startup(sock, s)
  if not ok then
    sock:close()
    -- an authentication this client cannot do will not change: stop
    -- probing in this worker (a server down or restarting may come back)
    if never then settings, settings_why = false, err end
    return nil, err
  end
  return sock
end

-- Sends a batch and reads its answers into the items: true | nil, err
local function run_batch(sock, s, batch, fresh)
  local stmt = s.named and "es_probe" or ""
  local parse = msg("P", stmt .. "\0" .. s.sql .. "\0" .. i16(0))
  local out = {}
  if fresh and s.named then out[1] = parse end
  for _, it in ipairs(batch) do
    if not s.named then out[#out + 1] = parse end
    out[#out + 1] = bind_execute(stmt, it.stream)
  end
  local ok, err = sock:send(out)
  if not ok then return nil, err end
  local failed = false
  for _, it in ipairs(batch) do
    local good, v = answer(sock)
    if good == nil then return nil, v end
    if good then it.version = v else it.err, failed = v, true end
  end
  -- after a failed statement start again on a new session (its named
  -- statement may never have been prepared, a table may have come since)
  return true, failed
end

local function prober(premature)
  local sock, fresh = nil, false
  while not premature and not ngx.worker.exiting() and settings do
    if #pending == 0 then
      idle = true
      wake:wait(IDLE_WAIT)
      idle = false
    end
    if #pending > 0 then
      local batch = pending
      pending, inflight = {}, batch
      local ok, err = true, nil
      if not sock then
        sock, err = connect(settings)
        fresh, ok = true, sock ~= nil
      end
      if sock then
        local failed
        ok, failed = run_batch(sock, settings, batch, fresh)
        fresh = false
        if not ok then err = failed end
        if not ok or failed then sock:close(); sock = nil end
      end
      for _, it in ipairs(batch) do
        if not ok and it.version == nil and it.err == nil then it.err = err end
        it.sema:post(1)
      end
      inflight = nil
    end
  end
  running = false
  if sock then sock:close() end
  -- requests still queued (nginx exiting, probing given up) go to the pool
  local left = pending
  pending = {}
  for _, it in ipairs(left) do it.err = "the prober stopped"; it.sema:post(1) end
end

-- version(stream) -> the stream's last version (0: none) | nil, err
function M.version(stream)
  local s = load_settings()
  if not s then return nil, settings_why end
  if not running then
    semaphore = semaphore or require "ngx.semaphore"
    wake = wake or assert(semaphore.new(0))
    local ok, err = ngx.timer.at(0, function(premature)
      local fine, perr = pcall(prober, premature)
      if not fine then
        running = false
        ngx.log(ngx.ERR, "orders.http.pgprobe: ", tostring(perr))
        -- its requests, the batch it was on included, go to the pool now
        -- rather than after their wait runs out
        local stranded = inflight or {}
        for _, it in ipairs(pending) do stranded[#stranded + 1] = it end
        inflight, pending = nil, {}
        for _, it in ipairs(stranded) do
          it.err = it.err or "the prober failed"
          it.sema:post(1)
        end
      end
    end)
    if not ok then return nil, "cannot start the prober: " .. tostring(err) end
    running = true
  end
  local it = { stream = stream, sema = assert(semaphore.new(0)) }
  pending[#pending + 1] = it
  if idle and #pending == 1 then wake:post(1) end
  local got, werr = it.sema:wait(TIMEOUT_MS / 1000)
  if not got then return nil, "probe: " .. tostring(werr) end
  if it.err then return nil, it.err end
  return it.version
end

M.parse_conninfo = parse_conninfo   -- for the spec

return M
