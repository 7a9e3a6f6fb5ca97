-- examples/orders/http/metrics.lua: the HTTP service's counters and
-- histograms in a shared dict (lua_shared_dict es_metrics), so every nginx
-- worker adds to the same figures, and their Prometheus text exposition
-- (format 0.0.4) for GET /metrics. Event-loop side.
--
--   metrics.request(route, method, status, seconds)   -- log phase, every request
--   metrics.add("es_appended_events_total", nil, n)
--   metrics.observe("es_http_vm_pool_wait_seconds", nil, seconds)
--   metrics.render() -> text      metrics.render_family(def, samples) (worker.lua)
--   metrics.flush()   -- this worker's pending sums to the dict (see M.FLUSH)
--
-- Keys in the dict: family \t labels \t suffix, where labels is the
-- rendered label set (`route="/orders",method="GET"`) and suffix is empty
-- for counters, or a bucket's upper bound or "sum" for histograms (bucket
-- counts are stored per bucket and made cumulative when rendered; the
-- count is their total).
local M = {}

M.BUCKETS = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }

-- The families, in output order.
M.FAMILIES = {
  { name = "es_http_requests_total", type = "counter",
    help = "HTTP requests by route template, method and status." },
  { name = "es_http_request_duration_seconds", type = "histogram",
    help = "HTTP request latency by route template and method, from the first byte read to the log phase." },
  { name = "es_appended_events_total", unlabeled = true, type = "counter",
    help = "Events appended by HTTP commands." },
  { name = "es_append_conflicts_total", unlabeled = true, type = "counter",
    help = "Appends that met a concurrent writer (each retry and each 409 counts)." },
  { name = "es_http_vm_pool_wait_seconds", unlabeled = true, type = "histogram",
    help = "Time a request waited for a free worker-thread Lua VM (the semaphore in api.lua)." },
  { name = "es_http_vm_pool_timeouts_total", unlabeled = true, type = "counter",
    help = "Requests answered 503 because no worker-thread Lua VM became free in time." },
  { name = "es_http_thread_pool_wait_seconds", unlabeled = true, type = "histogram",
    help = "Time between handing a call to nginx's thread pool and its start on a thread." },
  { name = "es_sse_clients", unlabeled = true, type = "gauge",
    help = "Server-Sent Events streams open now (all nginx workers)." },
}

local by_name = {}
for _, f in ipairs(M.FAMILIES) do by_name[f.name] = f end

local function dict() return ngx.shared.es_metrics end

-- A label value as the format wants it: backslash, double quote and line
-- feed escaped.
function M.escape(v)
  return (tostring(v):gsub('[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

-- labels: array of { name, value } (in this order) -> rendered label set
function M.labels(list)
  if not list then return "" end
  local parts = {}
  for i, l in ipairs(list) do parts[i] = ('%s="%s"'):format(l[1], M.escape(l[2])) end
  return table.concat(parts, ",")
end

local function key(family, labels, suffix)
  return family .. "\t" .. (labels or "") .. "\t" .. (suffix or "")
end

-- Counters and histograms are summed in this worker's own table first and
-- added to the shared dict every FLUSH seconds (a timer), when this
-- worker renders GET /metrics, and when it exits: eight dict operations
-- per command (each an FFI call and the dict's lock) cost the event loop
-- 10-15 us per command; a table's sum costs next to nothing. So the
-- figures another worker counted may show up to FLUSH seconds late.
-- Gauges go to the dict at once (es_sse_clients goes up and down).
M.FLUSH = 0.1
local pending, flusher = {}, nil

function M.flush()
  local d = dict()
  local batch = pending
  pending = {}
  if not d then return end
  for k, v in pairs(batch) do d:incr(k, v, 0) end
end

local function on_timer(premature)
  M.flush()
  if premature then flusher = nil end
end

local function bump(k, n)
  pending[k] = (pending[k] or 0) + n
  if flusher then return end
  if flusher == nil then
    flusher = ngx.timer.every(M.FLUSH, on_timer) or false
    if flusher then return end
  end
  M.flush()   -- no timer (an exiting worker, or too many timers): at once
end

function M.add(family, labels, n)
  local def = by_name[family]
  if def and def.type == "gauge" then
    local d = dict()
    if d then d:incr(key(family, labels), n or 1, 0) end
    return
  end
  bump(key(family, labels), n or 1)
end

-- the upper bound of the bucket value falls in ("+Inf" past the last)
local function bucket_of(v)
  for _, b in ipairs(M.BUCKETS) do
    if v <= b then return b end
  end
  return "+Inf"
end

-- Every request observes three histograms: their dict keys are made once
-- per family and label set (bucket bound -> key, and "sum"), not per call.
local hist_keys, n_hist_keys = {}, 0
local function keys_of(family, labels)
  if n_hist_keys >= 1000 then hist_keys, n_hist_keys = {}, 0 end
  local by_labels = hist_keys[family]
  if not by_labels then by_labels = {}; hist_keys[family] = by_labels end
  local k = by_labels[labels or ""]
  if not k then
    k = { sum = key(family, labels, "sum"), ["+Inf"] = key(family, labels, "+Inf") }
    for _, b in ipairs(M.BUCKETS) do k[b] = key(family, labels, tostring(b)) end
    by_labels[labels or ""] = k
    n_hist_keys = n_hist_keys + 1
  end
  return k
end

-- A bucket and the sum; the count is the buckets' total (render).
function M.observe(family, labels, v)
  v = math.max(0, tonumber(v) or 0)
  local k = keys_of(family, labels)
  bump(k[bucket_of(v)], 1)
  bump(k.sum, v)
end

-- route -> method -> status -> { the counter's key, the histogram's labels }
-- (at most MAX_KEYS: a client's made-up methods must not grow it forever)
local request_keys, n_request_keys, MAX_KEYS = {}, 0, 1000
local function request_key(route, method, status)
  if n_request_keys >= MAX_KEYS then
    request_keys, n_request_keys = {}, 0
  end
  local by_method = request_keys[route]
  if not by_method then by_method = {}; request_keys[route] = by_method end
  local by_status = by_method[method]
  if not by_status then by_status = {}; by_method[method] = by_status end
  local k = by_status[status]
  if not k then
    k = { key("es_http_requests_total", M.labels { { "route", route }, { "method", method },
            { "status", status } }),
          M.labels { { "route", route }, { "method", method } } }
    by_status[status] = k
    n_request_keys = n_request_keys + 1
  end
  return k
end

function M.request(route, method, status, seconds)
  local k = request_key(route, method, status)
  bump(k[1], 1)
  M.observe("es_http_request_duration_seconds", k[2], seconds)
end

-- Prometheus' number syntax (integers without a fraction).
function M.number(v)
  if v ~= v then return "NaN" end
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  if v == math.floor(v) and math.abs(v) < 2^53 then return ("%d"):format(v) end
  for digits = 15, 17 do   -- the shortest text that reads back the same
    local t = ("%." .. digits .. "g"):format(v)
    if tonumber(t) == v then return t end
  end
  return ("%.17g"):format(v)
end

local function le_text(b) return b == "+Inf" and "+Inf" or M.number(b) end

local function sample(out, name, labels, extra, v)
  local l = labels
  if extra then l = (l ~= "" and (l .. ",") or "") .. extra end
  out[#out + 1] = ("%s%s %s"):format(name, l ~= "" and ("{" .. l .. "}") or "", M.number(v))
end

-- def: a family; samples: labels -> value (counters, gauges) or labels ->
-- { [bound] = n, sum = x, count = n } (histograms). Appends lines to out.
function M.render_family(out, def, samples)
  out[#out + 1] = ("# HELP %s %s"):format(def.name, def.help)
  out[#out + 1] = ("# TYPE %s %s"):format(def.name, def.type)
  local keys = {}
  for labels in pairs(samples) do keys[#keys + 1] = labels end
  table.sort(keys)
  for _, labels in ipairs(keys) do
    local s = samples[labels]
    if def.type == "histogram" then
      local base = def.name:gsub("_total$", "")
      local acc = 0
      for _, b in ipairs(M.BUCKETS) do
        acc = acc + (s[tostring(b)] or 0)
        sample(out, base .. "_bucket", labels, ('le="%s"'):format(le_text(b)), acc)
      end
      acc = acc + (s["+Inf"] or 0)
      sample(out, base .. "_bucket", labels, 'le="+Inf"', s.count or acc)
      sample(out, base .. "_sum", labels, nil, s.sum or 0)
      sample(out, base .. "_count", labels, nil, s.count or acc)
    else
      sample(out, def.name, labels, nil, s)
    end
  end
end

-- The dict's figures as exposition lines (without a final newline).
function M.render()
  M.flush()
  local d = dict()
  local samples = {}
  for _, f in ipairs(M.FAMILIES) do samples[f.name] = {} end
  for _, k in ipairs(d and d:get_keys(0) or {}) do
    local family, labels, suffix = k:match("^([^\t]*)\t([^\t]*)\t(.*)$")
    local def = family and by_name[family]
    local v = def and d:get(k)
    if v then
      local s = samples[family]
      if def.type == "histogram" then
        s[labels] = s[labels] or {}
        s[labels][suffix] = v
      else
        s[labels] = v
      end
    end
  end
  local out = {}
  for _, f in ipairs(M.FAMILIES) do
    -- a family without labels shows its zero before the first event
    if f.unlabeled and samples[f.name][""] == nil then
      samples[f.name][""] = f.type == "histogram" and {} or 0
    end
    M.render_family(out, f, samples[f.name])
  end
  return table.concat(out, "\n")
end

return M
