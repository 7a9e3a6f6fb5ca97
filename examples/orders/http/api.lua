-- luacheck: globals ngx
-- examples/orders/http/api.lua: the nginx content handler (LuaJIT, event
-- loop side). It only gathers the request and hands it to the thread pool:
-- every store call (blocking libpq) runs in orders.http.worker on a pool
-- thread, so this worker's event loop keeps serving other requests.
local M = {}

local semaphore = require "ngx.semaphore"
local metrics = require "orders.http.metrics"

local POOL = "es"

-- ngx.run_worker_thread takes a Lua VM from a per-worker pool of
-- lua_worker_thread_vm_pool_size VMs when the call is made (and fails with
-- "no available Lua vm" when none is free). Each VM keeps its own store
-- connection. Calls wait here, without blocking the event loop, for one of
-- ES_HTTP_THREADS permits (= the VM pool size = the thread pool size).
local PERMITS = tonumber(os.getenv("ES_HTTP_THREADS") or "") or 16
local WAIT = 10   -- seconds a request may queue before a 503
local sema = assert(semaphore.new(PERMITS))

-- Bench-only (ES_HTTP_TIMINGS=1): a Server-Timing header with the wait for
-- a VM permit, the thread pool's hand-off, and the worker's phases
-- (orders.http.worker). clock: a monotonic clock finer than ngx.now().
local clock = os.getenv("ES_HTTP_TIMINGS") == "1" and require("eventsourcing.core").monotonic or nil
M.semaphore = sema   -- shared with orders.http.admin_api (the console)

-- The bearer tokens, read once per nginx worker (a small file, read
-- before the first request is answered), so that a request without valid
-- credentials gets its 401 at once instead of queueing for a pool thread
-- behind a slow database. The pool thread checks again and maps the token
-- to its principal.
local known_tokens
local function bearer(authorization)
  return type(authorization) == "string"
    and authorization:match("^[Bb][Ee][Aa][Rr][Ee][Rr] +([%w%-%._~%+/]+=*) *$")
end

local function load_tokens()
  if known_tokens == nil then
    known_tokens = false
    local path = os.getenv("ES_HTTP_TOKENS")
    local f = path and path ~= "" and io.open(path, "rb")
    if f then
      local doc = require("eventsourcing").json.decode(f:read("*a"))
      f:close()
      if type(doc) == "table" and type(doc.tokens) == "table" then known_tokens = doc.tokens end
    end
  end
  return known_tokens
end

local function token_known(authorization)
  if not load_tokens() then return true end   -- let the pool thread report it
  local token = bearer(authorization)
  return token ~= nil and known_tokens[token] ~= nil
end

-- GET /orders/{id} on the event loop (no thread-pool hop): the replies
-- pool threads made for orders whose reply depends on their own stream
-- only (never placed), kept in a shared dict (lua_shared_dict es_replies,
-- every worker) as "<version> <#customer> <customer><body>", are sent again
-- while the stream's version, probed on a cosocket (orders.http.pgprobe),
-- is the one the reply was made at: the same version is the same events,
-- so the reply is never stale, whoever appended meanwhile. Anything else
-- (a miss, another version, a probe that cannot be made) goes to the
-- thread pool as before, which also refills the dict.
local probe = require "orders.http.pgprobe"
local replies = ngx.shared.es_replies
-- the generation of the code that stores a reply (nginx.conf's
-- init_by_lua, run again on each reload): workers of an earlier
-- generation, still finishing their requests, may store replies after
-- the reload emptied the dict; they are never sent by this one
local GENERATION = rawget(_G, "ES_REPLIES_GENERATION") or "0"
local FAST = replies ~= nil and probe.enabled()
local ORDER_URI = "^/orders/(" .. ("%x"):rep(8) .. "%-" .. ("%x"):rep(4) .. "%-" .. ("%x"):rep(4)
  .. "%-" .. ("%x"):rep(4) .. "%-" .. ("%x"):rep(12) .. ")$"

-- the principal of a bearer token as the pool thread maps it
-- (orders.http.worker's load_tokens), or nil
local function principal(authorization)
  local tokens = load_tokens()
  local token = tokens and bearer(authorization)
  local p = token and #token >= 8 and tokens[token]
  if type(p) ~= "table" then return nil end
  if p.admin == true then return true end
  if type(p.customer_id) == "string" and p.customer_id ~= "" then return p.customer_id end
  return nil
end

local probe_failed = false   -- logged once per worker

-- status, body, etag when the kept reply is current, else nil
local function kept_reply(uri, authorization)
  local id = uri:match(ORDER_URI)
  if not id then return nil end
  id = id:lower()
  local entry = replies:get(id)
  if not entry then return nil end
  local p = principal(authorization)
  local g, v, n, at = entry:match("^(%S+) (%d+) (%d+) ()")
  if g ~= GENERATION then return nil end
  n = tonumber(n)
  if p == nil or (p ~= true and entry:sub(at, at + n - 1) ~= p) then return nil end
  local c0 = clock and clock()
  local current, err = probe.version("Order-" .. id)
  if c0 then ngx.ctx.probe = clock() - c0 end
  if not current then
    if not probe_failed then
      probe_failed = true
      ngx.log(ngx.WARN, "orders.http.api: version probe failed (the thread pool answers): ", tostring(err))
    end
    return nil
  end
  if current ~= tonumber(v) then return nil end
  return 200, entry:sub(at + n), '"' .. v .. '"'
end

local function header(h, name)
  local v = h[name]
  if type(v) == "table" then return false end   -- given more than once
  return v
end

local function json_type(ctype)
  local t = ctype:lower():match("^%s*([^;%s]+)")
  return t == "application/json" or t == "application/x-www-form-urlencoded"
    or (t ~= nil and t:match("^application/[%w.-]+%+json$") ~= nil)
end

local function send(status, body, etag, location, replayed)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  if replayed then ngx.header["Idempotent-Replayed"] = "true" end
  if etag then ngx.header["ETag"] = etag end
  if location then ngx.header["Location"] = location end
  if status == 401 then ngx.header["WWW-Authenticate"] = 'Bearer realm="orders"' end
  ngx.print(body)
  return
end

local function error_body(kind, message)
  return ('{"error":{"kind":"%s","message":"%s"}}\n'):format(kind,
    (message:gsub('[%c"\\]', " ")))
end

-- The request's id when the client sent no usable X-Request-Id (the map
-- $es_request_id in nginx.conf prefers the client's): 24 hex digits drawn
-- once per worker from nginx's random $request_id, then a counter, so 32
-- hex digits as nginx's own ids have, unique across workers and restarts,
-- without OpenSSL's RAND on every request. A new prefix before the counter
-- would wrap.
local id_prefix, id_count = nil, 0
local function own_request_id()
  if id_prefix == nil or id_count >= 0xffffffff then
    id_prefix, id_count = ngx.var.request_id:sub(1, 24), 0
  end
  id_count = id_count + 1
  return ("%s%08x"):format(id_prefix, id_count)
end

function M.handle()
  ngx.var.es_lua_request_id = own_request_id()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body == nil and ngx.req.get_body_file() then
    -- cannot happen with client_body_buffer_size == client_max_body_size
    return send(413, error_body("too_large", "request body too large"))
  end
  local h, truncated = ngx.req.get_headers(100)
  if truncated then
    return send(400, error_body("invalid", "too many request headers"))
  end
  -- Bodies are JSON. Say so, or say nothing; curl's -d says
  -- form-urlencoded, which the README's examples use, so it passes too.
  -- Any other type (text/plain, multipart/...) is refused before anything.
  local ctype = header(h, "content-type")
  if ctype == false then
    return send(400, error_body("invalid", "Content-Type given more than once"))
  end
  if body and body ~= "" and ctype and not json_type(ctype) then
    return send(415, error_body("unsupported_media_type",
      "request bodies are JSON: send Content-Type: application/json"))
  end
  local auth, if_match = header(h, "authorization"), header(h, "if-match")
  local idem_key = header(h, "idempotency-key")
  if idem_key == false then
    return send(400, error_body("invalid", "Idempotency-Key given more than once"))
  end
  if auth == false then
    return send(401, error_body("unauthorized", "Authorization given more than once"))
  end
  if if_match == false then
    return send(400, error_body("invalid", "If-Match given more than once"))
  end
  -- If-Match is ours (the stream version): keep nginx's not-modified
  -- filter from comparing it with the ETag of the response. On commands
  -- the other conditional headers must not turn a done command into a
  -- 304 or 412 either: they are not supported there.
  if if_match then ngx.req.clear_header("If-Match") end
  local method = ngx.req.get_method()
  if method ~= "GET" then
    -- (only those sent: each clearing walks the request's headers)
    if h["if-none-match"] ~= nil then ngx.req.clear_header("If-None-Match") end
    if h["if-modified-since"] ~= nil then ngx.req.clear_header("If-Modified-Since") end
    if h["if-unmodified-since"] ~= nil then ngx.req.clear_header("If-Unmodified-Since") end
  end
  if not token_known(auth) then
    ngx.header["WWW-Authenticate"] = 'Bearer realm="orders"'
    return send(401, error_body("unauthorized", "a valid Authorization: Bearer <token> header is required"))
  end
  if FAST and method == "GET" then
    local status, out, etag = kept_reply(ngx.var.request_uri, auth)
    if status then
      if clock then
        ngx.header["Server-Timing"] = ("probe;dur=%.3f"):format((ngx.ctx.probe or 0) * 1000)
      end
      return send(status, out, etag)
    end
  end
  local got, werr = M.acquire()
  if not got then
    return send(503, error_body("unavailable", "the service is busy (" .. tostring(werr) .. ")"))
  end
  ngx.update_time()
  local t0 = ngx.now()
  local c0 = clock and clock()
  local ok, status, out, etag, location, replayed, appended, conflicts, busy, timings, keep_id, keep =
    ngx.run_worker_thread(POOL, "orders.http.worker", "handle",
      method, ngx.var.request_uri, auth, if_match, body, idem_key, ngx.var.es_request_id)
  sema:post(1)
  if c0 and ok and timings then
    -- the thread call's time beyond the thread's own: hand-off and return
    ngx.header["Server-Timing"] = ("vm_wait;dur=%.3f, %shandoff;dur=%.3f, %s"):format(
      (ngx.ctx.vm_wait or 0) * 1000,
      ngx.ctx.probe and ("probe;dur=%.3f, "):format(ngx.ctx.probe * 1000) or "",
      (clock() - c0 - (busy or 0)) * 1000, timings)
  end
  if FAST and ok and keep_id then replies:set(keep_id, GENERATION .. " " .. keep) end
  if not ok then
    ngx.log(ngx.ERR, "orders.http.worker: ", tostring(status))
    return send(500, error_body("internal", "worker thread failed"))
  end
  ngx.update_time()
  metrics.observe("es_http_thread_pool_wait_seconds", nil, ngx.now() - t0 - (busy or 0))
  if (appended or 0) > 0 then metrics.add("es_appended_events_total", nil, appended) end
  if (conflicts or 0) > 0 then metrics.add("es_append_conflicts_total", nil, conflicts) end
  return send(status, out, etag, location, replayed)
end

M.send, M.error_body = send, error_body

-- Gives a permit back (after M.acquire and the thread call).
function M.release() sema:post(1) end

-- Waits for one of the permits (a free worker-thread VM), timed.
function M.acquire()
  ngx.update_time()
  local t0, c0 = ngx.now(), clock and clock()
  local got, err = sema:wait(WAIT)
  if c0 then ngx.ctx.vm_wait = clock() - c0 end
  ngx.update_time()
  metrics.observe("es_http_vm_pool_wait_seconds", nil, ngx.now() - t0)
  if not got then metrics.add("es_http_vm_pool_timeouts_total") end
  return got, err
end

-- log_by_lua: every request of the server, counted by route template
-- ($es_route, a map in nginx.conf) and status, with its latency.
-- (the latency as $request_time has it: nginx's cached clock since the
-- request's first byte, without formatting and parsing its text)
function M.log()
  metrics.request(ngx.var.es_route or "other", ngx.req.get_method(), ngx.status,
    ngx.now() - ngx.req.start_time())
end

local function loopback(addr)
  return addr ~= nil and (addr:match("^127%.") ~= nil or addr == "::1")
end

-- GET /metrics: an admin token, or no credentials from loopback.
function M.metrics()
  if ngx.req.get_method() ~= "GET" then
    return send(405, error_body("method_not_allowed", "only GET is allowed on /metrics"))
  end
  local auth = ngx.req.get_headers()["authorization"]
  if auth ~= nil then
    local tokens = load_tokens()
    local p = tokens and tokens[bearer(auth) or ""]
    if not p then
      return send(401, error_body("unauthorized", "invalid bearer token"))
    end
    if type(p) ~= "table" or p.admin ~= true then
      return send(403, error_body("forbidden", "metrics need an admin token (or a loopback client)"))
    end
  elseif not loopback(ngx.var.remote_addr) then
    return send(401, error_body("unauthorized", "metrics need an admin token (or a loopback client)"))
  end
  local text = metrics.render()
  local got = M.acquire()
  if got then
    local ok, lines = ngx.run_worker_thread(POOL, "orders.http.worker", "metrics")
    sema:post(1)
    if ok and type(lines) == "string" then text = text .. "\n" .. lines end
  end
  ngx.status = 200
  ngx.header["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
  ngx.print(text, "\n")
end

return M
