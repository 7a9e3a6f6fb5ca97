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
-- Connections come from a per-worker cosocket pool (ES_HTTP_PROBE_CONNECTIONS
-- per worker, default 16; more callers wait for a free one). Only a unix
-- socket, or TCP with sslmode=disable, is used: this client speaks no TLS,
-- and must never send in clear what libpq would have encrypted. SCRAM
-- authentication is not spoken either. Whenever the probe is not possible
-- (such settings, an error, a timeout) it says so and the caller falls back
-- to the thread pool, which answers as before.
-- LuaJIT's bit library (the event loop's Lua); under plain Lua only the
-- conninfo parser is used (by the specs)
local has_bit, bit = pcall(require, "bit")
if not has_bit then bit = {} end
local band, rshift, lshift, bor = bit.band, bit.rshift, bit.lshift, bit.bor
local char, byte = string.char, string.byte

local M = {}

local TIMEOUT_MS = 1000
local POOL_SIZE = tonumber(os.getenv("ES_HTTP_PROBE_CONNECTIONS") or "") or 16

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
    pool = "es_probe:" .. (os.getenv("ES_HTTP_DATABASE_URL") or ""),
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

-- the statement's answer: version | nil, err (the connection must go)
local function run(sock, s, stream, fresh)
  local stmt = s.named and "es_probe" or ""
  local out = bind_execute(stmt, stream)
  if fresh or not s.named then
    out = msg("P", stmt .. "\0" .. s.sql .. "\0" .. i16(0)) .. out
  end
  local ok, err = sock:send(out)
  if not ok then return nil, err end
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
      if failure then return nil, failure end
      return version
    end -- 1 (parse), 2 (bind), C (complete), N (notice)
  end
end

-- At most POOL_SIZE probes at a time per worker, each on a connection
-- kept alive in a pool of as many. The cosocket pool's own backlog option
-- is not used: under load it let connections be closed and new ones opened
-- (a PostgreSQL backend started per probe), where waiting here for one of
-- the kept connections costs nothing.
local permits

local function probe(s, stream)
  local sock = ngx.socket.tcp()
  sock:settimeouts(TIMEOUT_MS, TIMEOUT_MS, TIMEOUT_MS)
  local ok, err
  local opts = { pool = s.pool, pool_size = POOL_SIZE }
  if type(s.target) == "table" then
    ok, err = sock:connect(s.target[1], s.target[2], opts)
  else
    ok, err = sock:connect(s.target, opts)
  end
  if not ok then return nil, err end
  local fresh = sock:getreusedtimes() == 0
  if fresh then
    local never
    ok, err, never = startup(sock, s)
    if not ok then
      sock:close()
      -- an authentication this client cannot do will not change: stop
      -- trying in this worker (a server down or restarting may come back)
      if never then settings, settings_why = false, err end
      return nil, err
    end
  end
  local v
  v, err = run(sock, s, stream, fresh)
  if not v then sock:close(); return nil, err end
  sock:setkeepalive(60000)
  return v
end

-- version(stream) -> the stream's last version (0: none) | nil, err
function M.version(stream)
  local s = load_settings()
  if not s then return nil, settings_why end
  if not permits then permits = assert(require("ngx.semaphore").new(POOL_SIZE)) end
  local got, werr = permits:wait(TIMEOUT_MS / 1000)
  if not got then return nil, "no probe connection free: " .. tostring(werr) end
  -- never keep a permit, whatever happens
  local ok, v, err = pcall(probe, s, stream)
  permits:post(1)
  if not ok then return nil, v end
  return v, err
end

M.parse_conninfo = parse_conninfo   -- for the spec

return M
