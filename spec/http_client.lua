-- spec/http_client.lua: a tiny HTTP client for specs, driving curl(1)
-- (Debian package curl) over loopback, plus start/stop of the order
-- service's nginx (examples/orders/http/nginx.sh).
--
--   local http = require "http_client"
--   local srv = http.start_server{ database_url = ..., schema = ... }
--   local r = srv:request("POST", "/orders", { token = "...", body = "{}" })
--   -- r.status, r.body (text), r.json (decoded or nil), r.headers (lower-case
--   -- names), r.time (seconds, curl's time_total)
--   local pending = srv:start_request(...)   -- in the background
--   local r = pending:finish()
--   srv:stop()
--   local c = http.client("http://127.0.0.1:8080", decode)   -- a running server
local helpers = require "helpers"

local M = {}

local shell_quote = helpers.shell_quote
M.shell_quote = shell_quote

local read_file = helpers.read_file
M.read_file = read_file

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- run(cmd) -> ok, output. The exit status travels in the output: LuaJIT's
-- popen():close() does not report it.
local function run(cmd)
  local p = assert(io.popen("{ " .. cmd .. "\n} 2>&1; echo \"@rc=$?\""))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("@rc=(%d+)%s*$"))
  return rc == 0, (out:gsub("@rc=%d+%s*$", ""))
end
M.run = run

function M.sleep(seconds) os.execute("sleep " .. tostring(seconds)) end

local mktemp_dir = helpers.mktemp_dir

local function pid()
  local f = io.open("/proc/self/stat")
  local stat = f and f:read("*l")
  if f then f:close() end
  return tonumber(stat and stat:match("^(%d+)")) or 0
end

local Server = {}
Server.__index = Server

local seq = 0

local function curl_cmd(self, method, path, opts, files)
  opts = opts or {}
  local args = { "curl", "-sS", "--path-as-is", "-g", "--max-time", tostring(opts.timeout or 30),
    "-o", files.body, "-D", files.headers, "-w", shell_quote("%{http_code} %{time_total}"),
    "-X", method }
  if opts.token then
    args[#args + 1] = "-H " .. shell_quote("Authorization: Bearer " .. opts.token)
  end
  local ctype = false
  for _, h in ipairs(opts.headers or {}) do
    args[#args + 1] = "-H " .. shell_quote(h)
    if h:lower():match("^content%-type:") then ctype = true end
  end
  if opts.body then
    write_file(files.req, opts.body)
    -- JSON unless the request names its own Content-Type
    args[#args + 1] = (ctype and "" or "-H 'Content-Type: application/json' ") .. "--data-binary @" .. files.req
  end
  args[#args + 1] = shell_quote(self.base .. path)
  return table.concat(args, " ")
end

local function parse(self, out, files)
  local code, t = out:match("(%d%d%d) ([%d%.]+)%s*$")
  local r = { status = tonumber(code), time = tonumber(t), body = read_file(files.body) or "",
              headers = {}, raw = out }
  for line in (read_file(files.headers) or ""):gmatch("[^\r\n]+") do
    local k, v = line:match("^([^:]+):%s*(.-)%s*$")
    if k then r.headers[k:lower()] = v end
  end
  if self.decode and r.body ~= "" then r.json = self.decode(r.body) end
  for _, f in pairs(files) do os.remove(f) end
  return r
end

local function new_files(self)
  seq = seq + 1
  local base = ("%s/req%d"):format(self.dir, seq)
  return { body = base .. ".body", headers = base .. ".headers", req = base .. ".req" }
end

function Server:request(method, path, opts)
  local files = new_files(self)
  local _, out = run(curl_cmd(self, method, path, opts, files))
  return parse(self, out, files)
end

-- Starts a request in the background; :finish() waits for and returns it.
function Server:start_request(method, path, opts)
  local files = new_files(self)
  local p = assert(io.popen(curl_cmd(self, method, path, opts, files) .. " 2>&1"))
  local this = self
  return { finish = function()
    local out = p:read("*a")
    p:close()
    return parse(this, out, files)
  end }
end

-- M.start_server{ database_url, schema, root, threads, max_retries, decode,
--                 env = { NAME = value } }
function M.start_server(o)
  local self = setmetatable({ decode = o.decode }, Server)
  self.root = o.root or "."
  self.dir = mktemp_dir("es-http-spec")
  self.prefix = self.dir .. "/nginx"
  local last
  for attempt = 1, 8 do
    local port = 20000 + (os.time() * 7919 + pid() * 31 + attempt * 104729) % 40000
    local env = {
      "PORT=" .. port,
      "ES_HTTP_DATABASE_URL=" .. shell_quote(o.database_url),
      "ES_HTTP_SCHEMA=" .. shell_quote(o.schema or ""),
      "ES_HTTP_THREADS=" .. (o.threads or 8),
      "ES_HTTP_WORKERS=1",
      "ES_HTTP_MAX_RETRIES=" .. (o.max_retries or 3),
    }
    if o.tokens then env[#env + 1] = "ES_HTTP_TOKENS=" .. shell_quote(o.tokens) end
    for k, v in pairs(o.env or {}) do env[#env + 1] = k .. "=" .. shell_quote(v) end
    local ok, out = run("env " .. table.concat(env, " ") .. " " .. self.root
      .. "/examples/orders/http/nginx.sh start " .. shell_quote(self.prefix))
    if ok then
      self.port = port
      self.base = "http://127.0.0.1:" .. port
      return self
    end
    last = out
    run(self.root .. "/examples/orders/http/nginx.sh stop " .. shell_quote(self.prefix))
  end
  error("could not start nginx: " .. tostring(last))
end

-- M.client(base_url, decode): requests to a server started elsewhere
-- (scripts/serve.sh); :close() removes its temp folder.
function M.client(base, decode)
  local self = setmetatable({ decode = decode, base = base, stopped = true }, Server)
  self.dir = mktemp_dir("es-http-spec")
  return self
end

function Server:close()
  if self.dir and self.dir:match("^/tmp/es%-http%-spec%.") then
    run("rm -rf " .. shell_quote(self.dir))
  end
end

function Server:error_log()
  return read_file(self.prefix .. "/logs/error.log") or ""
end

function Server:stop()
  if self.stopped then return end
  self.stopped = true
  run(self.root .. "/examples/orders/http/nginx.sh stop " .. shell_quote(self.prefix))
  if self.dir and self.dir:match("^/tmp/es%-http%-spec%.") then
    run("rm -rf " .. shell_quote(self.dir))
  end
end

return M
