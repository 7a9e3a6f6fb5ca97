-- luacheck: globals ngx
-- examples/orders/http/sse.lua: live events as Server-Sent Events, on the
-- event loop (LuaJIT, nginx worker).
--
--   GET /orders/{id}/events        the order's events (SSE id: its version)
--   GET /events?customer_id=c      every event of the customer's orders
--                                  (SSE id: the checkpoint "<txid>:<position>")
--   both with Accept: text/event-stream; Last-Event-ID resumes after an id
--
-- A client first gets the history after Last-Event-ID (or from the start),
-- then new events as they commit. No client holds a database connection:
-- the history is read in pages through the thread pool, and new events
-- come from ONE poller per nginx worker (a timer) that reads every order
-- event after its checkpoint through the thread pool - every
-- ES_HTTP_SSE_POLL seconds (default 0.05) while a client listens, not at
-- all otherwise - and hands each event to the clients whose order or
-- customer it belongs to (the customer comes from the order's first event,
-- so nobody gets another customer's events). A client subscribes BEFORE
-- its history is read; what the poller delivers that the history already
-- sent is skipped by id, so nothing is lost or sent twice in between.
-- Authorization is the order's (or, for /events, the customer's own orders;
-- admins name any customer).
local semaphore = require "ngx.semaphore"
local metrics = require "orders.http.metrics"

local M = {}

local POOL = "es"
local POLL = tonumber(os.getenv("ES_HTTP_SSE_POLL") or "") or 0.05
local PAGE = 500
local KEEPALIVE = 15        -- seconds between comments on an idle stream
local MAX_QUEUE = 10000     -- a client this far behind is cut off (it resumes)

local api        -- orders.http.api (send, acquire, release), set by serve()

-- subscribers by stream ("Order-<id>") and by customer id
local by_stream, by_customer = {}, {}
local count = 0
local poller_running = false

-- "txid:position" -> two numbers, for comparing ids
local function cp_of(s)
  local t, p = s:match("^(%d+):(%d+)$")
  return tonumber(t) or 0, tonumber(p) or 0
end

local function newer(sub, ev)
  if sub.kind == "order" then return ev.version > sub.last end
  local t, p = cp_of(ev.cp)
  return t > sub.last_t or (t == sub.last_t and p > sub.last_p)
end

local function mark_sent(sub, ev)
  if sub.kind == "order" then sub.last = ev.version
  else sub.last_t, sub.last_p = cp_of(ev.cp) end
end

local function index_of(sub)
  if sub.kind == "order" then return by_stream, "Order-" .. sub.key end
  return by_customer, sub.key
end

local function add(sub)
  local idx, k = index_of(sub)
  idx[k] = idx[k] or {}
  idx[k][sub] = true
  count = count + 1
  metrics.add("es_sse_clients", nil, 1)
end

local function remove(sub)
  local idx, k = index_of(sub)
  if idx[k] and idx[k][sub] then
    idx[k][sub] = nil
    if next(idx[k]) == nil then idx[k] = nil end
    count = count - 1
    metrics.add("es_sse_clients", nil, -1)
  end
end

local function push(set, ev)
  for sub in pairs(set or {}) do
    if #sub.queue >= MAX_QUEUE then
      sub.overflow = true
    else
      sub.queue[#sub.queue + 1] = ev
    end
    sub.sema:post(1)
  end
end

local function distribute(events)
  for _, ev in ipairs(events) do
    push(by_stream[ev.stream], ev)
    if ev.customer_id ~= "" then push(by_customer[ev.customer_id], ev) end
  end
end

-- The poller: runs while anyone listens; starts from the log's end.
local function poll_loop()
  local cp
  while count > 0 and not ngx.worker.exiting() do
    local got = api.acquire()
    local ok, events, next_cp
    if got then
      ok, events, next_cp = ngx.run_worker_thread(POOL, "orders.http.worker", "sse_poll", cp, 1000)
      api.release()
    end
    if ok and events then
      distribute(events)
      cp = next_cp
    elseif got then
      ngx.log(ngx.ERR, "sse poller: ", tostring(events), " ", tostring(next_cp))
    end
    if not (ok and events and #events >= 1000) then ngx.sleep(POLL) end
  end
end

local poll
function poll(premature)
  if premature then poller_running = false; return end
  local ok, err = pcall(poll_loop)
  poller_running = false
  if not ok then
    ngx.log(ngx.ERR, "sse poller: ", tostring(err))
    -- listeners left: a new poller (from the log's end would skip events,
    -- so the streams end and their clients resume with Last-Event-ID)
    for _, idx in ipairs { by_stream, by_customer } do
      for _, set in pairs(idx) do
        for sub in pairs(set) do sub.overflow = true; sub.sema:post(1) end
      end
    end
  end
end

local function ensure_poller()
  if poller_running then return true end
  local ok, err = ngx.timer.at(0, poll)
  if not ok then return nil, err end
  poller_running = true
  return true
end

local function accepts_sse(accept)
  return type(accept) == "string" and accept:lower():find("text/event-stream", 1, true) ~= nil
end

-- one SSE event; false when the client is gone
local function send_event(sub, ev)
  local id = sub.kind == "order" and tostring(ev.version) or ev.cp
  ngx.print("id: ", id, "\nevent: ", ev.type, "\ndata: ", ev.payload, "\n\n")
  mark_sent(sub, ev)
  return true
end

local function flush()
  local ok = ngx.flush(true)
  return ok == 1 or ok == true
end

function M.serve()
  api = api or require "orders.http.api"
  local h = ngx.req.get_headers(100)
  if ngx.req.get_method() ~= "GET" then
    return api.send(405, api.error_body("method_not_allowed", "only GET is allowed on an event stream"))
  end
  if not accepts_sse(h["accept"]) then
    return api.send(406, api.error_body("not_acceptable", "this resource is a stream: send Accept: text/event-stream"))
  end
  local auth, last_id = h["authorization"], h["last-event-id"]
  if type(auth) == "table" or type(last_id) == "table" then
    return api.send(400, api.error_body("invalid", "Authorization and Last-Event-ID may be given once"))
  end
  local got, werr = api.acquire()
  if not got then
    return api.send(503, api.error_body("unavailable", "the service is busy (" .. tostring(werr) .. ")"))
  end
  local ok, status, body, kind, key, after = ngx.run_worker_thread(POOL, "orders.http.worker", "sse_open",
    ngx.var.request_uri, auth, last_id)
  api.release()
  if not ok then
    ngx.log(ngx.ERR, "sse_open: ", tostring(status))
    return api.send(500, api.error_body("internal", "worker thread failed"))
  end
  if status ~= 200 then return api.send(status, body) end

  local sub = { kind = kind, key = key, queue = {}, sema = semaphore.new(0), last = 0,
                last_t = 0, last_p = 0 }
  if kind == "order" then sub.last = after else sub.last_t, sub.last_p = cp_of(after) end
  local state = { closed = false }
  local aok = ngx.on_abort(function() state.closed = true; sub.sema:post(1) end)
  if not aok then ngx.log(ngx.WARN, "sse: lua_check_client_abort is off") end
  add(sub)   -- before the history is read: nothing falls between the two
  local pok, perr = ensure_poller()
  if not pok then
    remove(sub)
    return api.send(503, api.error_body("unavailable", "cannot start the poller: " .. tostring(perr)))
  end
  -- whatever happens while streaming, the subscription ends with it
  local sok, serr = pcall(M.stream, sub, state, kind, key, after)
  remove(sub)
  if not sok then ngx.log(ngx.ERR, "sse: ", tostring(serr)) end
  return ngx.exit(ngx.HTTP_OK)
end

function M.stream(sub, state, kind, key, after)
  ngx.status = 200
  ngx.header["Content-Type"] = "text/event-stream"
  ngx.header["Cache-Control"] = "no-cache"
  ngx.header["X-Accel-Buffering"] = "no"
  ngx.print(": stream of ", kind == "order" and ("order " .. key) or ("customer " .. key), "\n\n")
  if not flush() then state.closed = true end

  -- the history, page by page, after the client's last id
  local from = after
  while not state.closed do
    if not api.acquire() then state.closed = true; break end
    local hok, events, done = ngx.run_worker_thread(POOL, "orders.http.worker", "sse_history",
      kind, key, from, PAGE)
    api.release()
    if not hok or not events then
      ngx.log(ngx.ERR, "sse_history: ", tostring(events), " ", tostring(done))
      state.closed = true
      break
    end
    for _, ev in ipairs(events) do send_event(sub, ev) end
    if #events > 0 then
      from = kind == "order" and events[#events].version or events[#events].cp
      if not flush() then state.closed = true end
    end
    if done then break end
  end

  -- then live, from the poller
  while not state.closed and not sub.overflow do
    local woke = sub.sema:wait(KEEPALIVE)
    if state.closed then break end
    if woke then
      local queue = sub.queue
      sub.queue = {}
      local sent = false
      for _, ev in ipairs(queue) do
        if newer(sub, ev) then send_event(sub, ev); sent = true end
      end
      if sent and not flush() then break end
    else
      ngx.print(": keepalive\n\n")
      if not flush() then break end
    end
  end
end

return M
