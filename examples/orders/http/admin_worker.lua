-- examples/orders/http/admin_worker.lua: the web console's JSON endpoints
-- under /admin/, run in nginx's thread pool (never on the event loop),
-- like orders.http.worker. Every operation is one of eventsourcing.admin's
-- (the same functions the `eventsourcing` command-line tool calls), so the
-- console and the tool never disagree.
--
--   ngx.run_worker_thread("es", "orders.http.admin_worker", "handle",
--                         method, request_uri, authorization, body)
--   --> true, status, body_json
--
-- Only admin tokens (tokens.json: "admin": true) get in: no token or an
-- unknown one is a 401, a customer's token a 403.
--
--   GET  /admin/stats              GET /admin/overview (the same counts, cheap: no instants)
--   GET  /admin/streams?category=&search=&after=&limit=      (keyset pages by name)
--   GET  /admin/streams/{stream}?from=&limit=                (a page of events)
--   GET  /admin/log?after=<checkpoint>&limit=                (global log; no after: its tail)
--   GET  /admin/log?before=<checkpoint>&limit=               (older events, for paging back)
--   GET  /admin/trace/{correlation_id}
--   GET  /admin/projections        POST /admin/projections/{name}/{rebuild|reset|pause|resume|retry}
--   GET  /admin/progress/{name}    (a running rebuild: done, total, rate, eta)
--   GET  /admin/workflows          POST /admin/workflows/{name}/{pause|resume}
--   GET  /admin/dead-letters
--   POST /admin/dead-letters/{id}/{retry|discard}
local es = require "eventsourcing"
local admin = require "eventsourcing.admin"
local orders_worker = require "orders.http.worker"

local json = es.json

local M = {}

local store, app = nil, nil

local function respond(status, value)
  local text = json.encode(value)
  if not text then
    return 500, '{"error":{"kind":"internal","message":"response could not be encoded"}}\n'
  end
  return status, text .. "\n"
end

local function fail(status, kind, message)
  return respond(status, { error = { kind = kind, message = message } })
end

local STATUS_OF = {
  invalid = 400, not_found = 404, rejected = 422, conflict = 409,
  connection = 503, database = 500,
}

local function fail_err(err)
  if type(err) ~= "table" then return fail(500, "internal", tostring(err)) end
  return fail(STATUS_OF[err.kind] or 500, err.kind or "internal", err.message or tostring(err))
end

local function connect()
  if store and not store:is_closed() then return true end
  local url = os.getenv("ES_HTTP_DATABASE_URL")
  if not url or url == "" then return nil, es.error("connection", "ES_HTTP_DATABASE_URL is not set") end
  local schema = os.getenv("ES_HTTP_SCHEMA")
  local s, err = es.open(url, { schema = schema ~= "" and schema or nil,
    statement_timeout = tonumber(os.getenv("ES_HTTP_ADMIN_STATEMENT_TIMEOUT") or "") or 60000 })
  if not s then return nil, err end
  store = s
  return true
end

-- The order service's definitions (read models, workflows), for the
-- followers' views.
local function the_app()
  if not app then app = require "orders.app" end
  return app
end

---------------------------------------------------------------- parsing

-- percent-decoding; in a query string "+" is a space too
local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function parse_query(q)
  local args = {}
  for pair in (q or ""):gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    args[unescape((k:gsub("%+", " ")))] = unescape((v:gsub("%+", " ")))
  end
  return args
end

local function int_arg(args, name, default, max)
  local v = args[name]
  if v == nil or v == "" then return default end
  local n = v:match("^%d+$") and tonumber(v)
  if not n or n < 1 or n > max then
    return nil, ("%s must be an integer from 1 to %d"):format(name, max)
  end
  return n
end

local function text_arg(args, name)
  local v = args[name]
  if v == nil or v == "" then return nil end
  if #v > 500 or v:find("%c") then return nil, name .. " must be short text without control characters" end
  return v
end

local CHECKPOINT = "^%d+:%d+$"

---------------------------------------------------------------- progress

-- A rebuild's progress, for GET /admin/progress/{name} (answered by
-- another request while the rebuild's request is still running): kept in
-- the lua_shared_dict es_admin when nginx has it, so every worker sees it.
local function progress_dict()
  local ok, d = pcall(function() return ngx.shared.es_admin end)
  return ok and d or nil
end

local function set_progress(name, value)
  local d = progress_dict()
  if d then d:set("rebuild:" .. name, json.encode(value), 3600) end
end

local function get_progress(name)
  local d = progress_dict()
  local text = d and d:get("rebuild:" .. name)
  return text and json.decode(text) or { name = name, state = "idle" }
end

---------------------------------------------------------------- handlers

-- stats: exact counts and first/last instants (a scan of the whole log);
-- overview: counts from the streams table, what the Store view shows
local function stats() return admin.stats(store) end
local function overview() return admin.overview(store) end

local function streams(args)
  local limit, err = int_arg(args, "limit", 50, 500)
  if not limit then return nil, es.error("invalid", err) end
  local o = { limit = limit }
  for _, k in ipairs { "category", "search", "after" } do
    o[k], err = text_arg(args, k)
    if err then return nil, es.error("invalid", err) end
  end
  local rows
  rows, err = admin.streams(store, o)
  if not rows then return nil, err end
  return { streams = json.array(rows), next = #rows == limit and rows[#rows].stream or json.null }
end

local function stream_events(name, args)
  local from, err = int_arg(args, "from", 1, 2^53)
  if not from then return nil, es.error("invalid", err) end
  local limit
  limit, err = int_arg(args, "limit", 50, 500)
  if not limit then return nil, es.error("invalid", err) end
  local events
  events, err = admin.read(store, name, { from = from, limit = limit })
  if not events then return nil, err end
  return { stream = name, version = store:version(name), from = from, events = json.array(events) }
end

local function log(args)
  local limit, err = int_arg(args, "limit", 50, 1000)
  if not limit then return nil, es.error("invalid", err) end
  local after, before = args.after, args.before
  local events, cp
  if before ~= nil and before ~= "" then
    if after then return nil, es.error("invalid", "give after or before, not both") end
    if not before:match(CHECKPOINT) then
      return nil, es.error("invalid", "before must be a checkpoint such as 1234:56")
    end
    events, cp = admin.before(store, before, { limit = limit })
    if not events then return nil, cp end
    return { events = json.array(events), before = cp or json.null }
  elseif after == nil or after == "" then
    -- the end of the log under read_all's watermark, then the page that
    -- ends there, each event with its checkpoint (for paging back)
    local _
    _, cp = admin.tail(store, { limit = 1 })
    if _ == nil then return nil, cp end
    local older
    events, older = json.array {}, nil
    if cp then
      events, older = admin.before(store, cp, { limit = limit, inclusive = true })
      if not events then return nil, older end
    end
    return { events = json.array(events), checkpoint = cp or json.null, before = older or json.null }
  elseif not after:match(CHECKPOINT) then
    return nil, es.error("invalid", "after must be a checkpoint such as 1234:56")
  else
    events, cp = admin.follow(store, after, { limit = limit })
  end
  if not events then return nil, cp end
  return { events = json.array(events), checkpoint = cp or json.null }
end

local function trace(id)
  local events, err = admin.trace(store, id)
  if not events then return nil, err end
  return { correlation_id = id, events = json.array(events) }
end

local FOLLOWER_ACTIONS = { rebuild = true, reset = true, pause = true, resume = true, retry = true }

local function projection_action(name, action)
  if action ~= "rebuild" then return admin.projections[action](store, the_app(), name) end
  set_progress(name, { name = name, state = "running", done = 0, total = 0 })
  local r, err = admin.projections.rebuild(store, the_app(), name, function(done, total, rate, eta)
    set_progress(name, { name = name, state = "running", done = done, total = total, rate = rate, eta = eta })
  end)
  if not r then
    set_progress(name, { name = name, state = "failed", error = tostring(err) })
    return nil, err
  end
  set_progress(name, { name = name, state = "done", done = r.events, total = r.events })
  return r
end

local function dead_letter_action(id, action)
  if action == "retry" then return admin.workflows.retry(store, the_app(), id) end
  return admin.workflows.discard(store, id)
end

local function rows(list, err)
  if not list then return nil, err end
  return json.array(list)
end

-- -> result table | nil, err | nil, nil, status, kind, message
local function route(method, segs, args)
  local n, top = #segs, segs[2]
  local get, post = method == "GET", method == "POST"
  if get and n == 2 and top == "stats" then return stats() end
  if get and n == 2 and top == "overview" then return overview() end
  if get and n == 2 and top == "streams" then return streams(args) end
  if get and n == 3 and top == "streams" then return stream_events(segs[3], args) end
  if get and n == 2 and top == "log" then return log(args) end
  if get and n == 3 and top == "trace" then return trace(segs[3]) end
  if get and n == 2 and top == "projections" then
    return rows(admin.projections.status(store, the_app()))
  end
  if get and n == 3 and top == "progress" then return get_progress(segs[3]) end
  if post and n == 4 and top == "projections" and FOLLOWER_ACTIONS[segs[4]] then
    return projection_action(segs[3], segs[4])
  end
  if get and n == 2 and top == "workflows" then return rows(admin.workflows.status(store, the_app())) end
  if post and n == 4 and top == "workflows" and (segs[4] == "pause" or segs[4] == "resume") then
    return admin.workflows[segs[4]](store, the_app(), segs[3])
  end
  if get and n == 2 and top == "dead-letters" then return rows(admin.workflows.dead_letters(store)) end
  if post and n == 4 and top == "dead-letters" and (segs[4] == "retry" or segs[4] == "discard") then
    return dead_letter_action(segs[3], segs[4])
  end
  return nil, nil, 404, "not_found", "no such admin resource"
end

local function dispatch(method, uri, authorization)
  local path, query = uri:match("^([^?#]*)%??([^#]*)")
  local segs = {}
  for raw in (path or ""):gmatch("[^/]+") do segs[#segs + 1] = unescape(raw) end
  if segs[1] ~= "admin" then return fail(404, "not_found", "no such admin resource") end
  local p, status, msg = orders_worker.authenticate(authorization)
  if not p then return fail(status, status == 401 and "unauthorized" or "internal", msg) end
  if not p.admin then return fail(403, "forbidden", "the console's endpoints need an admin token") end
  local ok, err = connect()
  if not ok then return fail_err(err) end
  local res, rerr, st, kind, message = route(method, segs, parse_query(query))
  if res then return respond(200, res) end
  if st then return fail(st, kind, message) end
  return fail_err(rerr)
end

-- The thread-pool entry point. Always returns status, body.
function M.handle(method, uri, authorization)
  if type(method) ~= "string" or type(uri) ~= "string" then
    return fail(400, "invalid", "malformed request")
  end
  local ok, status, out = xpcall(dispatch, debug.traceback, method, uri, authorization)
  if not ok then
    io.stderr:write("orders.http.admin_worker: ", tostring(status), "\n")
    return fail(500, "internal", "internal error")
  end
  if status == 503 and store and store:is_closed() then store = nil end
  return status, out
end

return M
