-- examples/orders/http/worker.lua: the order service's HTTP requests, run
-- in nginx's thread pool (never on the event loop).
--
--   ngx.run_worker_thread("es", "orders.http.worker", "handle",
--                         method, request_uri, authorization, if_match, body,
--                         idempotency_key, request_id)
--   --> true, status, body_json, etag_or_nil, location_or_nil, replayed,
--       appended, conflicts, seconds, timings, keep_id, keep
-- (appended: events this request appended; conflicts: appends that met a
-- concurrent writer; seconds: time spent on this thread; request_id: the
-- correlation id the command's events carry; timings: nil, or with
-- ES_HTTP_TIMINGS=1 the milliseconds per phase, Server-Timing style;
-- keep_id, keep: nil, or a GET /orders/{id} reply api.lua may send again
-- from its shared dict while the order's version stays)
--   ngx.run_worker_thread("es", "orders.http.worker", "metrics")
--   --> true, exposition lines (checkpoint lag and dead letters)
-- (replayed: the stored response of an earlier request with the same
-- Idempotency-Key, see orders.http.idempotency)
--
-- Each pool thread has its own Lua VM that requires this module once, so the
-- module-level store below is one PostgreSQL connection per thread, opened
-- on first use and reopened after a connection error. Arguments and results
-- are plain strings and numbers (what may cross between VMs).
--
-- Settings come from the environment (nginx.conf `env` directives):
-- ES_HTTP_DATABASE_URL (libpq conninfo or URL; behind PgBouncer in
-- transaction mode with pooler=transaction in it), ES_HTTP_SCHEMA (optional),
-- ES_HTTP_TOKENS (path of the tokens file, see tokens.json),
-- ES_HTTP_MAX_RETRIES (conflict retries per command, default 3),
-- ES_HTTP_STATE_CACHE (off: commands read and fold their order's stream
-- every time instead of starting from the shared state cache).
--
-- The routing, authorisation and error mapping do no ngx calls: the module
-- also runs in plain Lua 5.4 / LuaJIT (M.handle with M.configure).
local es = require "eventsourcing"
local core = require "eventsourcing.core"
local service = require "orders.service"
local Order = require "orders.order"
local stock = require "orders.http.stock"
local idem = require "orders.http.idempotency"

local json = es.json
local null = json.null
local OBJECT_MT = getmetatable(json.decode("{}"))
local unpack = table.unpack or unpack -- luacheck: ignore

local M = {}

-- Read model mode (ES_HTTP_READ_MODEL): "inline" (default) has the
-- service update rm_orders in each command's transaction, so lists see a
-- command as soon as it returned; "projector" leaves rm_orders to the
-- projector process (examples/orders/http/projector.lua), eventually
-- consistent. Never both: the read model would apply events twice.
local function read_model_mode()
  return os.getenv("ES_HTTP_READ_MODEL") == "projector" and "projector" or "inline"
end

local config = nil        -- { database_url, schema, tokens_path }
local store, svc, folded = nil, nil, nil   -- folded: queries by folding
local states = nil        -- see state_cache
local idem_ready = false  -- the idempotency table exists (checked per connection)
local counts = { appended = 0, conflicts = 0 }   -- of the request being handled
local tokens = nil        -- token -> principal
local owners = {}         -- order id -> customer id (immutable once created)
local owners_count = 0
local MAX_OWNERS = 100000
local replies, replies_count, MAX_REPLIES = {}, 0, 4096   -- see cached_reply
-- the reply of this request for api.lua's shared dict: order id and
-- "<version> <#customer> <customer><body>" (see remember_reply)
local keep_id, keep = nil, nil

-- M.configure{ database_url, schema, tokens_path, state_cache }: for use
-- outside nginx (state_cache = false: none, as ES_HTTP_STATE_CACHE=off).
function M.configure(c)
  config = c
  if store then store:close() end
  store, svc, tokens, owners, owners_count = nil, nil, nil, {}, 0
  replies, replies_count, states = {}, 0, nil
end

local function settings()
  if not config then
    config = {
      database_url = os.getenv("ES_HTTP_DATABASE_URL"),
      schema = os.getenv("ES_HTTP_SCHEMA"),
      tokens_path = os.getenv("ES_HTTP_TOKENS"),
      max_retries = tonumber(os.getenv("ES_HTTP_MAX_RETRIES") or ""),
    }
    if config.schema == "" then config.schema = nil end
  end
  return config
end

---------------------------------------------------------------- timings

-- Bench-only (ES_HTTP_TIMINGS=1): seconds this thread spent per phase of
-- the request, returned to api.lua, which sends them in a Server-Timing
-- header. The store is wrapped in a proxy that times its calls; off, the
-- store is used as it is and nothing is timed.
local TIMINGS = os.getenv("ES_HTTP_TIMINGS") == "1"
local phases = {}     -- phase -> seconds, of the request being handled
local PHASE_OF = { fold = "fold", read = "fold", load_snapshot = "fold", version = "fold",
                   begin = "begin", append = "append", query = "sql", commit = "commit", commit_with = "commit",
                   rollback = "commit", query_ahead = "sql", ahead_rows = "sql" }

-- This thread's CPU time (LuaJIT's FFI: CLOCK_THREAD_CPUTIME_ID), or nil
-- where there is no FFI: the store calls' CPU, beside their wall time,
-- shows what the thread itself spent while others ran on the same cores.
local thread_cpu = nil
if TIMINGS and rawget(_G, "jit") then
  local ok, ffi = pcall(require, "ffi")
  if ok then
    pcall(ffi.cdef, "typedef struct { long sec; long nsec; } es_cpu_timespec;"
      .. " int clock_gettime(int clock, es_cpu_timespec *ts);")
    local ts = ffi.new("es_cpu_timespec")
    thread_cpu = function()
      ffi.C.clock_gettime(3, ts)   -- CLOCK_THREAD_CPUTIME_ID
      return tonumber(ts.sec) + tonumber(ts.nsec) * 1e-9
    end
  end
end
local cpu_phases = {} -- phase -> CPU seconds of this thread (with thread_cpu)

local function add_time(phase, t0, c0)
  phases[phase] = (phases[phase] or 0) + (core.monotonic() - t0)
  if c0 then cpu_phases[phase] = (cpu_phases[phase] or 0) + (thread_cpu() - c0) end
end

local function finish(phase, t0, c0, ...)
  add_time(phase, t0, c0)
  return ...
end

local function timed(s)
  local proxy = {}
  return setmetatable(proxy, { __index = function(_, name)
    local f, phase = s[name], PHASE_OF[name]
    if type(f) ~= "function" then return f end
    local w
    if phase then
      w = function(_, ...)
        local t0, c0 = core.monotonic(), thread_cpu and thread_cpu()
        return finish(phase, t0, c0, f(s, ...))
      end
    else
      w = function(_, ...) return f(s, ...) end
    end
    proxy[name] = w
    return w
  end })
end

-- Adds each phase of `from` to parts as "<phase><suffix>;dur=<ms>",
-- emptying it, then the rest of `total` as "lua<suffix>".
local function add_phases(parts, from, suffix, total)
  local known = 0
  for phase, secs in pairs(from) do
    parts[#parts + 1] = ("%s%s;dur=%.3f"):format(phase, suffix, secs * 1000)
    known = known + secs
    from[phase] = nil
  end
  parts[#parts + 1] = ("lua%s;dur=%.3f"):format(suffix, (total - known) * 1000)
end

-- total: the thread's wall seconds; cpu: its CPU seconds (or nil)
local function timing_text(total, cpu)
  local parts = {}
  add_phases(parts, phases, "", total)
  if cpu then
    add_phases(parts, cpu_phases, "_cpu", cpu)
    parts[#parts + 1] = ("cpu;dur=%.3f"):format(cpu * 1000)
  end
  return table.concat(parts, ", ")
end

---------------------------------------------------------------- responses

local function respond(status, value, etag, location)
  local t0, c0 = TIMINGS and core.monotonic(), thread_cpu and thread_cpu()
  local text = json.encode(value)
  if t0 then add_time("encode", t0, c0) end
  if not text then
    return 500, '{"error":{"kind":"internal","message":"response could not be encoded"}}\n'
  end
  return status, text .. "\n", etag, location
end

local function fail(status, kind, message, extra)
  local e = { kind = kind, message = message }
  if extra then for k, v in pairs(extra) do e[k] = v end end
  return respond(status, { error = e })
end

local STATUS_OF = {
  invalid = 400, not_found = 404, rejected = 422, conflict = 409,
  connection = 503, database = 500,
}

-- statement_timeout / lock_timeout: the database is too busy, try later
local BUSY = { ["57014"] = true, ["55P03"] = true }

local function fail_err(err)
  if type(err) ~= "table" then
    return fail(500, "internal", tostring(err))
  end
  if BUSY[err.sqlstate] then
    return fail(503, "unavailable", "the database did not answer in time; try again")
  end
  -- the server going away or coming back (08 connection exception, 53
  -- insufficient resources, 57 operator intervention: a shutdown or a
  -- restart in progress) is a passing unavailability, not our fault
  local class = type(err.sqlstate) == "string" and err.sqlstate:sub(1, 2)
  if class == "08" or class == "53" or class == "57" then
    return fail(503, "unavailable", "the database is not available right now; try again")
  end
  local extra = nil
  if err.kind == "invalid" and err.field then extra = { field = err.field } end
  return fail(STATUS_OF[err.kind] or 500, err.kind or "internal",
    err.message or tostring(err), extra)
end

local function etag_of(version) return ('"%d"'):format(version) end

---------------------------------------------------------------- store

-- Where commands leave their order's state for the next command on it
-- (repository opts.cache; ES_HTTP_STATE_CACHE=off: none). In nginx the
-- shared dict es_states, one for every worker and pool thread, its keys
-- under the generation init_by_lua gave this configuration (nginx.conf:
-- states made by the code before a reload are never read by the code
-- after it); none when that generation cannot be read. Elsewhere this
-- VM's own. false: none.
local function state_cache()
  if os.getenv("ES_HTTP_STATE_CACHE") == "off" or (config and config.state_cache == false) then
    return false
  end
  local ngx = rawget(_G, "ngx")
  local dict = ngx and ngx.shared and ngx.shared.es_states
  if not dict then return es.state_cache() end
  local g = ngx.shared.es_generation
  g = g and g:get("generation")
  if type(g) ~= "string" then return false end
  local gen = g .. " "
  return {
    get = function(_, k) return (dict:get(gen .. k)) end,
    set = function(_, k, v) dict:set(gen .. k, v) end,
    delete = function(_, k) dict:delete(gen .. k) end,
  }
end

local function connect()
  if store and not store:is_closed() then return true end
  idem_ready = false
  local c = settings()
  if not c.database_url or c.database_url == "" then
    return nil, es.error("connection", "ES_HTTP_DATABASE_URL is not set")
  end
  -- a stuck database must not hold a pool thread forever: statements
  -- give up (503) after ES_HTTP_STATEMENT_TIMEOUT ms, lock waits sooner
  local s, err = es.open(c.database_url, { schema = c.schema,
    statement_timeout = tonumber(os.getenv("ES_HTTP_STATEMENT_TIMEOUT") or "") or 5000,
    lock_timeout = tonumber(os.getenv("ES_HTTP_LOCK_TIMEOUT") or "") or 2000 })
  if not s then return nil, err end
  store = TIMINGS and timed(s) or s
  if states == nil then states = state_cache() end
  svc = service.new(store, { metadata = { via = "http" }, max_retries = c.max_retries,
    inline = read_model_mode() == "inline", cache = states or nil })
  folded = service.fold_queries(store, svc.repository)
  return true
end

local function drop_connection()
  if store then pcall(store.close, store) end
  store, svc, folded = nil, nil, nil
end

-- Runs a command: in an idempotent request (req.ctx) inside its
-- transaction with derived event ids, else as usual.
-- The events carry the request's id as their correlation id.
local function execute(req, A, id, name, cmd, opts)
  local repo = svc.repository
  opts = opts or {}
  opts.metadata = opts.metadata or {}
  opts.metadata.correlation_id = opts.metadata.correlation_id or req.request_id
  local retries = repo.stats.retries
  local r, err
  if req.ctx then
    r, err = req.ctx.execute(repo, A, id, name, cmd, opts)
  else
    r, err = repo:execute(A, id, name, cmd, opts)
  end
  counts.conflicts = counts.conflicts + (repo.stats.retries - retries)
    + ((not r and type(err) == "table" and err.kind == "conflict") and 1 or 0)
  if r then counts.appended = counts.appended + #r.events end
  return r, err
end

---------------------------------------------------------------- auth

local function load_tokens()
  local path = settings().tokens_path
  if not path or path == "" then return nil, "ES_HTTP_TOKENS is not set" end
  local f, ferr = io.open(path, "rb")
  if not f then return nil, ferr end
  local text = f:read("*a")
  f:close()
  local doc, err = json.decode(text)
  if type(doc) ~= "table" or type(doc.tokens) ~= "table" then
    return nil, ("%s: expected {\"tokens\": {...}}: %s"):format(path, tostring(err))
  end
  local map = {}
  for token, p in pairs(doc.tokens) do
    if type(token) == "string" and #token >= 8 and type(p) == "table" then
      if p.admin == true then
        map[token] = { admin = true, user = tostring(p.user or "admin") }
      elseif type(p.customer_id) == "string" and p.customer_id ~= "" then
        map[token] = { customer_id = p.customer_id,
                       user = tostring(p.user or p.customer_id) }
      end
    end
  end
  return map
end

local function authenticate(authorization)
  if not tokens then
    local map, err = load_tokens()
    if not map then return nil, 500, "tokens: " .. tostring(err) end
    tokens = map
  end
  if type(authorization) ~= "string" or authorization == "" then
    return nil, 401, "an Authorization: Bearer <token> header is required"
  end
  local token = authorization:match("^[Bb][Ee][Aa][Rr][Ee][Rr] +([%w%-%._~%+/]+=*) *$")
  local p = token and tokens[token]
  if not p then return nil, 401, "invalid bearer token" end
  return p
end

M.authenticate = authenticate   -- also for orders.http.admin_worker

local function forbidden()
  return fail(403, "forbidden", "this order belongs to another customer")
end

local function not_found(id)
  return fail(404, "not_found", ("order %s not found"):format(id))
end

-- The customer of an order (cached: it never changes), or nil, err.
local function owner_of(id)
  local c = owners[id]
  if c then return c end
  local state, version = svc.repository:load(Order, id)
  if not state then return nil, version end
  if version == 0 then return nil, es.error("not_found", ("order %s not found"):format(id)) end
  c = state.customer_id
  if owners_count >= MAX_OWNERS then owners, owners_count = {}, 0 end
  owners[id], owners_count = c, owners_count + 1
  return c
end

-- nil when the principal may act on the order, else the error response.
local function check_owner(p, id)
  if p.admin then return nil end
  local c, err = owner_of(id)
  if not c then return { fail_err(err) } end
  if c ~= p.customer_id then return { forbidden() } end
  return nil
end

---------------------------------------------------------------- parsing

-- Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
local function utf8_valid(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len, min
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len, min = 2, 0x80
    elseif c >= 0xE0 and c <= 0xEF then len, min = 3, 0x800
    elseif c >= 0xF0 and c <= 0xF4 then len, min = 4, 0x10000
    else return false end
    if len > 1 then
      if i + len - 1 > n then return false end
      local cp = c % (2 ^ (7 - len))
      for k = 1, len - 1 do
        local b = s:byte(i + k)
        if b < 0x80 or b > 0xBF then return false end
        cp = cp * 64 + (b - 0x80)
      end
      if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
    end
    i = i + len
  end
  return true
end

local function unescape(s)
  if not s:find("%", 1, true) then   -- nothing to decode (most paths)
    if s:find("[\128-\255]") and not utf8_valid(s) then return nil end
    return s
  end
  local bad = false
  local out = s:gsub("%%(..)", function(h)
    local n = tonumber(h, 16)
    if not n or not h:match("^%x%x$") then bad = true; return "" end
    return string.char(n)
  end)
  if bad or out:find("%%$") or out:find("%%.$") then return nil end
  -- decoded text must be UTF-8: it is echoed in messages and stored
  if not utf8_valid(out) then return nil end
  return out
end

local function parse_query(q)
  local args = {}
  if not q or q == "" then return args end
  for pair in (q .. "&"):gmatch("([^&]*)&") do
    if pair ~= "" then
      local k, v = pair:match("^([^=]*)=?(.*)$")
      k, v = unescape(k), unescape(v)
      if not k or not v then return nil, "malformed percent-encoding in the query string" end
      if args[k] ~= nil then return nil, ("query parameter %s is given twice"):format(k) end
      args[k] = v
    end
  end
  return args
end

local function check_query(args, allowed)
  for k in pairs(args) do
    if not allowed[k] then
      return ("unknown query parameter %q"):format(k)
    end
  end
end

local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

-- The request body as a JSON object with only the allowed fields.
local function body_object(body, allowed, optional)
  if body == nil or body:match("^%s*$") then
    if optional then return {} end
    return nil, "the request body must be a JSON object"
  end
  local v, err = json.decode(body)
  if v == nil then
    return nil, "malformed JSON: " .. tostring(err and (err.message or err)):gsub("^invalid: ", "")
  end
  if type(v) ~= "table" or getmetatable(v) ~= OBJECT_MT then
    return nil, "the request body must be a JSON object"
  end
  for k in pairs(v) do
    if not allowed[k] then return nil, ("unknown field %q"):format(tostring(k)), k end
  end
  return v
end

local function bad_request(message, field)
  return fail(400, "invalid", message, field and { field = field } or nil)
end

-- If-Match: nil (absent), es.STREAM_EXISTS ("*"), a version, or false
-- (a value that can never match).
local function parse_if_match(v)
  if v == nil or v == "" then return nil end
  if v:match("^%s*%*%s*$") then return es.STREAM_EXISTS end
  local n = v:match('^%s*W?/?"(%d+)"%s*$') or v:match("^%s*(%d+)%s*$")
  n = n and tonumber(n)
  if n and n >= 0 and n < 2^53 then return n end
  return false
end

local ISO = {
  "^%d%d%d%d%-%d%d%-%d%d$",
  "^%d%d%d%d%-%d%d%-%d%d[T ]%d%d:%d%d:%d%d%.?%d*Z$",
  "^%d%d%d%d%-%d%d%-%d%d[T ]%d%d:%d%d:%d%d%.?%d*[+-]%d%d:?%d%d$",
  "^%d%d%d%d%-%d%d%-%d%d[T ]%d%d:%d%d:%d%d%.?%d*[+-]%d%d$",
}

local function valid_instant(s)
  if #s > 40 then return false end
  local ok = false
  for _, p in ipairs(ISO) do if s:match(p) then ok = true end end
  if not ok then return false end
  local y, mo, d = s:match("^(%d+)%-(%d+)%-(%d+)")
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if y < 1 or mo < 1 or mo > 12 or d < 1 or d > 31 then return false end
  local h, mi, sec = s:match("^%d+%-%d+%-%d+[T ](%d+):(%d+):(%d+)")
  if h and (tonumber(h) > 23 or tonumber(mi) > 59 or tonumber(sec) > 60) then return false end
  if s:find("%.$") or s:find("%.[Z+-]") then return false end
  return true
end

---------------------------------------------------------------- handlers

local view = service.view

-- Commands on an existing order: AddItem, RemoveItem, PlaceOrder, CancelOrder.
local function command(p, req, id, name, cmd, if_match)
  local denied = check_owner(p, id)
  if denied then return unpack(denied) end
  local expected = if_match
  if expected == false then
    return fail(412, "precondition_failed", "If-Match does not name a version of this order")
  end
  if expected == nil then expected = es.STREAM_EXISTS end
  local r, err = execute(req, Order, id, name, cmd,
    { metadata = { user = p.user }, expected_version = expected })
  if not r then
    if err.kind == "conflict" then
      if err.actual == 0 then return not_found(id) end
      if if_match ~= nil then
        return fail(412, "precondition_failed",
          ("If-Match %s does not match the order's version %s")
            :format(tostring(if_match), tostring(err.actual)),
          { expected = if_match, actual = err.actual })
      end
    end
    return fail_err(err)
  end
  return respond(200, view(r.state, r.version), etag_of(r.version))
end

local function create_order(p, req)
  local body, msg, field = body_object(req.body, { customer_id = true })
  if not body then return bad_request(msg, field) end
  local customer = body.customer_id
  if customer == nil or customer == null then
    if p.admin then return bad_request("customer_id is required", "customer_id") end
    customer = p.customer_id
  end
  if type(customer) ~= "string" then
    return bad_request("customer_id must be a string", "customer_id")
  end
  if not p.admin and customer ~= p.customer_id then
    return fail(403, "forbidden", "customers create orders only for themselves")
  end
  if req.if_match ~= nil then
    return fail(412, "precondition_failed", "If-Match cannot apply to a new order")
  end
  -- with an Idempotency-Key the order's id derives from it, so a retry
  -- names the same order
  local id = req.ctx and req.ctx.id("order") or core.uuid()
  local r, err = execute(req, Order, id, "CreateOrder",
    { order_id = id, customer_id = customer },
    { metadata = { user = p.user }, expected_version = es.NO_STREAM })
  if not r then return fail_err(err) end
  owners[id], owners_count = customer, owners_count + 1
  -- r.state already carries what the store recorded (created_at)
  return respond(201, view(r.state, r.version), etag_of(r.version), "/orders/" .. id)
end

-- GET /orders/{id}'s reply per order, kept by this thread for orders whose
-- reply depends on their own stream only (never placed: the reservation
-- of a placed order follows the Inventory streams). Served again only
-- while the stream's version (one index probe) is the one it was made at:
-- a stream's events never change, so the same version is the same reply.
local function cached_reply(id)
  local r = replies[id]
  if not r then return nil end
  local v, err = store:version(Order:stream(id))
  if not v then return nil, err end
  if v == r.version then
    keep_id, keep = id, r.keep
    return r
  end
  return nil
end

local function remember_reply(id, o, status, body, etag)
  if status ~= 200 or o.placed_at ~= nil or type(o.customer_id) ~= "string" then return end
  if replies_count >= MAX_REPLIES then replies, replies_count = {}, 0 end
  if not replies[id] then replies_count = replies_count + 1 end
  local k = ("%d %d %s%s"):format(o.version, #o.customer_id, o.customer_id, body)
  replies[id] = { version = o.version, body = body, etag = etag, keep = k }
  keep_id, keep = id, k
end

local function get_order(p, id, args)
  local err = check_query(args, { at = true, version = true })
  if err then return bad_request(err) end
  if args.at and args.version then
    return bad_request("give either at or version, not both", "at")
  end
  local denied = check_owner(p, id)
  if denied then return unpack(denied) end
  if args.version then
    local v = args.version:match("^%d+$") and tonumber(args.version)
    if not v or v < 1 or v >= 2^53 then
      return bad_request("version must be a positive integer", "version")
    end
    local o, e = svc.order_at(id, v)
    if not o then return fail_err(e) end
    return respond(200, o, etag_of(o.version))
  elseif args.at then
    if not valid_instant(args.at) then
      return bad_request("at must be an ISO-8601 instant such as 2026-01-15T10:00:00Z", "at")
    end
    local o, e = svc.order_at(id, args.at)
    if not o then return fail_err(e) end
    return respond(200, o, etag_of(o.version))
  end
  local hit, herr = cached_reply(id)
  if hit then return 200, hit.body, hit.etag end
  if herr then return fail_err(herr) end
  -- current state: folded from the stream (never stale, exact version),
  -- with where its stock reservation stands (the workflow's progress)
  local o, e = folded.get_order(id)
  if not o then return fail_err(e) end
  o.reservation, e = stock.reservation(svc.repository, o)
  if not o.reservation then return fail_err(e) end
  local status, body, etag = respond(200, o, etag_of(o.version))
  remember_reply(id, o, status, body, etag)
  return status, body, etag
end

local function history(p, id, args)
  local err = check_query(args, {})
  if err then return bad_request(err) end
  local denied = check_owner(p, id)
  if denied then return unpack(denied) end
  local list, e = svc.history(id)
  if not list then return fail_err(e) end
  local events = json.array {}
  for i, ev in ipairs(list) do
    events[i] = { version = ev.version, type = ev.type, data = ev.data,
      metadata = ev.metadata, recorded_at = ev.recorded_at, id = ev.id,
      user = ev.metadata and ev.metadata.user or null }
  end
  local version = #list > 0 and list[#list].version or 0
  return respond(200, { order_id = id, version = version, events = events }, etag_of(version))
end

local STATUSES = { draft = true, placed = true, cancelled = true }

local function list_orders(p, args)
  local err = check_query(args, { customer_id = true, status = true, limit = true, after = true })
  if err then return bad_request(err) end
  local customer = args.customer_id
  if customer == nil then
    if p.admin then return bad_request("customer_id is required", "customer_id") end
    customer = p.customer_id
  end
  if customer == "" or customer:find("%c") or #customer > 200 then
    return bad_request("customer_id must be a non-empty string without control characters",
      "customer_id")
  end
  if not p.admin and customer ~= p.customer_id then
    return fail(403, "forbidden", "customers list only their own orders")
  end
  if args.status and not STATUSES[args.status] then
    return bad_request("status must be one of draft, placed, cancelled", "status")
  end
  local limit = 50
  if args.limit then
    limit = args.limit:match("^%d+$") and tonumber(args.limit)
    if not limit or limit < 1 or limit > 500 then
      return bad_request("limit must be an integer from 1 to 500", "limit")
    end
  end
  if args.after and (#args.after > 1000 or args.after:find("[^%w%-_=+/.:]")) then
    return bad_request("after must be a cursor from a previous page's next", "after")
  end
  local list, next_or_err = svc.list_orders(customer,
    { status = args.status, limit = limit, after = args.after })
  if not list then
    local e = next_or_err
    -- a crafted cursor the database refuses says nothing of the database
    if type(e) == "table" and e.kind == "invalid" then
      return bad_request("after must be a cursor from a previous page's next", "after")
    end
    return fail_err(e)
  end
  return respond(200, { orders = list, next = next_or_err or null })
end

-- /stock/{product_id} (GET, any principal) and /stock/{product_id}/receive
-- (POST { quantity }, admins only). The ETag is the Inventory stream's version.
local function route_stock(p, req, segs, args)
  local n, method, product = #segs, req.method, segs[2]
  if n < 2 or n > 3 or (n == 3 and segs[3] ~= "receive") then
    return fail(404, "not_found", "no such resource")
  end
  local qerr = check_query(args, {})
  if qerr then return bad_request(qerr) end
  if n == 2 then
    if method ~= "GET" then
      return fail(405, "method_not_allowed", method .. " is not allowed on a product's stock")
    end
    local v, err = stock.view(svc.repository, product)
    if not v then return fail_err(err) end
    return respond(200, v, etag_of(v.version))
  end
  if method ~= "POST" then
    return fail(405, "method_not_allowed", method .. " is not allowed here")
  end
  if not p.admin then return fail(403, "forbidden", "only an admin may receive stock") end
  local body, msg, field = body_object(req.body, { quantity = true })
  if not body then return bad_request(msg, field) end
  if body.quantity == nil then return bad_request("quantity is required", "quantity") end
  local v, err = stock.receive(function(...) return execute(req, ...) end, product,
    body.quantity, { user = p.user })
  if not v then return fail_err(err) end
  return respond(200, v, etag_of(v.version))
end

-- The JSON object a POST on an order's sub-resource carries (with only
-- the allowed fields), or false, status, error body. (No closures on the
-- command path: a function that makes one is never compiled by LuaJIT.)
local ITEM_FIELDS = { product_id = true, quantity = true, unit_price = true }
local NO_FIELDS, CANCEL_FIELDS = {}, { reason = true }
local function post_body(req, fields, optional)
  if req.method ~= "POST" then
    return false, fail(405, "method_not_allowed", req.method .. " is not allowed here")
  end
  local body, msg, field = body_object(req.body, fields, optional)
  if not body then return false, bad_request(msg, field) end
  return body
end

-- route(method, segments, args, req, principal)
local function route(p, req, segs, args)
  if segs[1] == "stock" then return route_stock(p, req, segs, args) end
  local n, method = #segs, req.method
  local id = segs[2]
  if n == 1 then
    if method == "POST" then
      if next(args) then return bad_request(check_query(args, {})) end
      return create_order(p, req)
    end
    if method == "GET" then return list_orders(p, args) end
    return fail(405, "method_not_allowed", method .. " is not allowed on /orders")
  end
  if not id:match(UUID) then return not_found(id) end
  id = id:lower()
  local sub = segs[3]
  if n == 2 then
    if method == "GET" then return get_order(p, id, args) end
    return fail(405, "method_not_allowed", method .. " is not allowed on an order")
  end
  if next(args) and not (n == 3 and sub == "history") then
    return bad_request(check_query(args, {}))
  end
  if n == 3 and sub == "items" then
    local b, status, out = post_body(req, ITEM_FIELDS, false)
    if not b then return status, out end
    return command(p, req, id, "AddItem", { product_id = b.product_id,
      quantity = b.quantity, unit_price = b.unit_price }, req.if_match)
  elseif n == 4 and sub == "items" then
    if method ~= "DELETE" then
      return fail(405, "method_not_allowed", method .. " is not allowed on an item")
    end
    return command(p, req, id, "RemoveItem", { product_id = segs[4] }, req.if_match)
  elseif n == 3 and sub == "place" then
    local b, status, out = post_body(req, NO_FIELDS, true)
    if not b then return status, out end
    return command(p, req, id, "PlaceOrder", {}, req.if_match)
  elseif n == 3 and sub == "cancel" then
    local b, status, out = post_body(req, CANCEL_FIELDS, true)
    if not b then return status, out end
    return command(p, req, id, "CancelOrder", { reason = b.reason }, req.if_match)
  elseif n == 3 and sub == "history" then
    if method ~= "GET" then
      return fail(405, "method_not_allowed", method .. " is not allowed on a history")
    end
    return history(p, id, args)
  end
  return fail(404, "not_found", "no such resource")
end

local function dispatch(method, uri, authorization, if_match, body, idempotency_key, request_id)
  local path, query = uri:match("^([^?#]*)%??([^#]*)")
  if not path or path:sub(1, 1) ~= "/" then return fail(400, "invalid", "malformed request target") end
  -- segments, percent-decoded one by one (an encoded / stays in its segment)
  local segs = {}
  for raw in (path:sub(2) .. "/"):gmatch("([^/]*)/") do segs[#segs + 1] = raw end
  for i, s in ipairs(segs) do
    local d = unescape(s)
    if not d then return bad_request("malformed percent-encoding in the path") end
    if d == "" then return fail(404, "not_found", "no such resource") end
    if d == "." or d == ".." then
      return bad_request("the path must not contain . or .. segments")
    end
    segs[i] = d
  end
  if (segs[1] ~= "orders" and segs[1] ~= "stock") or #segs > 4 then
    return fail(404, "not_found", "no such resource")
  end
  local p, status, msg = authenticate(authorization)
  if not p then
    if status == 401 then return fail(401, "unauthorized", msg) end
    return fail(status, "internal", msg)
  end
  local args, qerr = parse_query(query)
  if not args then return bad_request(qerr) end
  local ok, err = connect()
  if not ok then return fail_err(err) end
  local req = { method = method, body = body, if_match = parse_if_match(if_match),
                request_id = type(request_id) == "string" and request_id ~= "" and request_id or nil }
  if idempotency_key == nil or method == "GET" then return route(p, req, segs, args) end
  if not idem.valid_key(idempotency_key) then
    return bad_request("Idempotency-Key must be 1 to 200 visible ASCII characters")
  end
  if not idem_ready then
    local iok, ierr = idem.migrate(store)
    if not iok then return fail_err(ierr) end
    idem_ready = true
  end
  return idem.run(store, {
    principal = (p.admin and "admin:" or "customer:") .. p.user, key = idempotency_key,
    method = method, path = uri, body = body,
    ttl = tonumber(os.getenv("ES_HTTP_IDEMPOTENCY_TTL") or "") or idem.DEFAULT_TTL,
  }, function(ctx)
    req.ctx = ctx
    return route(p, req, segs, args)
  end, fail_err)
end

-- The thread-pool entry point. Always returns status, body[, etag, location].
function M.handle(method, uri, authorization, if_match, body, idempotency_key, request_id)
  if type(method) ~= "string" or type(uri) ~= "string" then
    return fail(400, "invalid", "malformed request")
  end
  local t0, c0 = core.monotonic(), thread_cpu and thread_cpu()
  counts.appended, counts.conflicts = 0, 0
  keep_id, keep = nil, nil
  if TIMINGS then
    for k in pairs(phases) do phases[k] = nil end
    for k in pairs(cpu_phases) do cpu_phases[k] = nil end
  end
  local ok, status, out, etag, location, replayed = xpcall(dispatch, debug.traceback,
    method, uri, authorization, if_match, body, idempotency_key, request_id)
  if not ok then
    io.stderr:write("orders.http.worker: ", tostring(status), "\n")
    return fail(500, "internal", "internal error")
  end
  -- a lost connection: open a new one on the next request
  if status == 503 and store and store:is_closed() then drop_connection() end
  if replayed then counts.appended = 0 end
  local busy = core.monotonic() - t0
  if status ~= 200 then keep_id, keep = nil, nil end
  return status, out, etag, location, replayed, counts.appended, counts.conflicts,
    busy, TIMINGS and timing_text(busy, c0 and thread_cpu() - c0) or nil, keep_id, keep
end

---------------------------------------------------------------- live events
--
-- For orders.http.sse (the event-loop side of Server-Sent Events). An SSE
-- event's id is the order stream's version on /orders/{id}/events, and the
-- global checkpoint "<txid>:<position>" on /events (Last-Event-ID resumes
-- after it). Events are read under the same watermark as read_all (only
-- transactions older than every running one), ordered by (txid, position),
-- so a stream's events come in version order and none is skipped.

local util = require "eventsourcing.util"

local function events_sql(schema, where, limit)
  return ("SELECT e.txid::text AS txid, e.position, e.id::text AS id, e.stream, e.version,"
    .. " e.type, e.data::text AS data, %s, c.data->>'customer_id' AS customer_id"
    .. " FROM %s.events e LEFT JOIN %s.events c ON c.stream = e.stream AND c.version = 1"
    .. " WHERE e.category = 'Order' AND %s"
    .. " AND e.txid < pg_snapshot_xmin(pg_current_snapshot())"
    .. " ORDER BY e.txid, e.position LIMIT %d")
    :format(util.ts_sql("e.recorded_at", "recorded_at"), schema, schema, where, limit)
end

-- rows -> plain tables for the event loop: { cp, stream, version,
-- customer_id, type, payload } where payload is the SSE data (JSON text)
local function live_events(rows)
  local out = {}
  for i, r in ipairs(rows) do
    local order_id = r.stream:sub(#"Order-" + 1)
    local payload = ('{"id":%s,"order_id":%s,"version":%d,"type":%s,"recorded_at":%s,"data":%s}')
      :format(json.encode(r.id), json.encode(order_id), r.version, json.encode(r.type),
        json.encode(r.recorded_at), r.data)
    out[i] = { cp = r.txid .. ":" .. r.position, stream = r.stream, version = r.version,
               customer_id = r.customer_id ~= null and r.customer_id or "", type = r.type,
               payload = payload }
  end
  return out
end

local function quoted_schema() return ('"%s"'):format(store:schema()) end

-- sse_open(request_uri, authorization, last_event_id)
--   -> 200, nil, kind ("order" | "customer"), key (order or customer id), after
--   |  status, error_body
-- after: the version (kind order) or checkpoint (kind customer) to resume after.
function M.sse_open(uri, authorization, last_event_id)
  local ok, status, body, kind, key, after = xpcall(function()
    local path, query = uri:match("^([^?#]*)%??([^#]*)")
    local p, st, msg = authenticate(authorization)
    if not p then
      if st == 401 then return fail(401, "unauthorized", msg) end
      return fail(st, "internal", msg)
    end
    local args, qerr = parse_query(query)
    if not args then return bad_request(qerr) end
    local c, cerr = connect()
    if not c then return fail_err(cerr) end
    if path == "/events" then
      local err = check_query(args, { customer_id = true })
      if err then return bad_request(err) end
      local customer = args.customer_id or (not p.admin and p.customer_id) or nil
      if not customer then return bad_request("customer_id is required", "customer_id") end
      if not p.admin and customer ~= p.customer_id then
        return fail(403, "forbidden", "customers follow only their own orders")
      end
      local from = "0:0"
      if last_event_id and last_event_id ~= "" then
        if not last_event_id:match("^%d+:%d+$") then
          return bad_request("Last-Event-ID must be an event id of this stream (<txid>:<position>)")
        end
        from = last_event_id
      end
      return 200, nil, "customer", customer, from
    end
    local id = path:match("^/orders/([^/]+)/events$")
    id = id and unescape(id)
    if not id or not id:match(UUID) then return not_found(tostring(id)) end
    id = id:lower()
    local err = check_query(args, {})
    if err then return bad_request(err) end
    local denied = check_owner(p, id)
    if denied then return unpack(denied) end
    local from = 0
    if last_event_id and last_event_id ~= "" then
      from = last_event_id:match("^%d+$") and tonumber(last_event_id)
      if not from then return bad_request("Last-Event-ID must be an event id of this stream (a version)") end
    end
    return 200, nil, "order", id, from
  end, debug.traceback)
  if not ok then
    io.stderr:write("orders.http.worker: ", tostring(status), "\n")
    return fail(500, "internal", "internal error")
  end
  return status, body, kind, key, after
end

-- sse_history(kind, key, after, limit) -> events, done | nil, message
function M.sse_history(kind, key, after, limit)
  local ok, err = connect()
  if not ok then return nil, tostring(err) end
  local rows
  if kind == "order" then
    rows, err = store:query(events_sql(quoted_schema(), "e.stream = $1 AND e.version > $2::bigint", limit),
      "Order-" .. key, tostring(after))
  else
    local txid, pos = tostring(after):match("^(%d+):(%d+)$")
    rows, err = store:query(events_sql(quoted_schema(), "(e.txid, e.position) > ($1::xid8, $2::bigint)"
      .. " AND c.data->>'customer_id' = $3", limit), txid or "0", pos or "0", key)
  end
  if not rows then
    if store:is_closed() then drop_connection() end
    return nil, tostring(err)
  end
  return live_events(rows), #rows < limit
end

-- sse_poll(after, limit) -> events, checkpoint | nil, message: the shared
-- poller's read of every order event after checkpoint `after` (nil: the
-- current end of the log, so a new poller starts with what comes next).
function M.sse_poll(after, limit)
  local ok, err = connect()
  if not ok then return nil, tostring(err) end
  local schema = quoted_schema()
  if after == nil then
    local rows
    rows, err = store:query(("SELECT txid::text AS txid, position FROM %s.events"
      .. " WHERE txid < pg_snapshot_xmin(pg_current_snapshot())"
      .. " ORDER BY txid DESC, position DESC LIMIT 1"):format(schema))
    if not rows then return nil, tostring(err) end
    return {}, rows[1] and (rows[1].txid .. ":" .. rows[1].position) or "0:0"
  end
  local txid, pos = tostring(after):match("^(%d+):(%d+)$")
  local rows
  rows, err = store:query(events_sql(schema, "(e.txid, e.position) > ($1::xid8, $2::bigint)", limit),
    txid or "0", pos or "0")
  if not rows then
    if store:is_closed() then drop_connection() end
    return nil, tostring(err)
  end
  local events = live_events(rows)
  return events, #events > 0 and events[#events].cp or after
end

---------------------------------------------------------------- metrics

local metrics = require "orders.http.metrics"

local GAUGES = {
  { name = "es_checkpoint_lag_events", type = "gauge",
    help = "Events committed after the checkpoint of a projection or workflow." },
  { name = "es_checkpoint_lag_seconds", type = "gauge",
    help = "Age of the oldest event after the checkpoint of a projection or workflow (0 when caught up)." },
  { name = "es_dead_letters", type = "gauge",
    help = "Dead letters of a workflow; for a projection, 1 while a failing event stops it." },
  { name = "es_database_up", type = "gauge",
    help = "1 when the metrics query reached the database." },
}

local function checkpoints(schema)
  local rows, err = store:query(("SELECT to_regclass('%s.projections') IS NOT NULL AS p,"
    .. " to_regclass('%s.workflows') IS NOT NULL AS w, to_regclass('%s.dead_letters') IS NOT NULL AS d")
    :format(schema, schema, schema))
  if not rows then return nil, err end
  local parts = {}
  if rows[1].p then
    parts[#parts + 1] = ("SELECT 'projection' AS kind, name, checkpoint,"
      .. " CASE WHEN error IS NULL THEN 0 ELSE 1 END AS dead FROM %s.projections"):format(schema)
  end
  if rows[1].w then
    parts[#parts + 1] = ("SELECT 'workflow' AS kind, w.name, w.checkpoint, %s AS dead FROM %s.workflows w")
      :format(rows[1].d and ("(SELECT count(*) FROM %s.dead_letters d WHERE d.workflow = w.name)")
        :format(schema) or "0", schema)
  end
  if #parts == 0 then return {} end
  return store:query(table.concat(parts, " UNION ALL ") .. " ORDER BY 1, 2")
end

-- The lines of the gauges above, read from the database.
function M.metrics()
  local samples = {}
  for _, g in ipairs(GAUGES) do samples[g.name] = {} end
  local up = 0
  local ok, err = connect()
  if ok then
    local schema = ('"%s"'):format(store:schema())
    local list
    list, err = checkpoints(schema)
    if list then
      up = 1
      for _, c in ipairs(list) do
        local txid, pos = tostring(c.checkpoint or ""):match("^(%d+):(%d+)$")
        local lag = store:query(("SELECT count(*) AS n, coalesce(extract(epoch FROM now() -"
          .. " min(recorded_at)), 0)::float8 AS age FROM %s.events WHERE (txid, position) >"
          .. " ($1::xid8, $2::bigint)"):format(schema), txid or "0", pos or "0")
        local l = metrics.labels { { "kind", c.kind }, { "name", c.name } }
        if lag then
          samples.es_checkpoint_lag_events[l] = lag[1].n
          samples.es_checkpoint_lag_seconds[l] = math.max(0, lag[1].age)
        end
        samples.es_dead_letters[l] = c.dead
      end
    end
  end
  if err and store and store:is_closed() then drop_connection() end
  samples.es_database_up[""] = up
  local out = {}
  for _, g in ipairs(GAUGES) do metrics.render_family(out, g, samples[g.name]) end
  return table.concat(out, "\n")
end

return M
