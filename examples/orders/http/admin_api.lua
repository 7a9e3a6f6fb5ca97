-- luacheck: globals ngx
-- examples/orders/http/admin_api.lua: the nginx content handler for the
-- web console's JSON endpoints under /admin/ (event loop side). Like
-- orders.http.api it only hands the request to the thread pool, where
-- orders.http.admin_worker makes the store calls; it waits for the same
-- semaphore, so order requests and console requests together never ask
-- for more pool VMs than there are.
local M = {}

local api = require "orders.http.api"

local function send(status, body)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Cache-Control"] = "no-store"
  if status == 401 then ngx.header["WWW-Authenticate"] = 'Bearer realm="console"' end
  ngx.print(body)
end

function M.handle()
  local auth = ngx.req.get_headers(100)["authorization"]
  if type(auth) == "table" then
    return send(401, '{"error":{"kind":"unauthorized","message":"Authorization given more than once"}}\n')
  end
  local got, werr = api.semaphore:wait(10)
  if not got then
    return send(503, ('{"error":{"kind":"unavailable","message":"the service is busy (%s)"}}\n')
      :format(tostring(werr)))
  end
  local ok, status, out = ngx.run_worker_thread("es", "orders.http.admin_worker", "handle",
    ngx.req.get_method(), ngx.var.request_uri, auth)
  api.semaphore:post(1)
  if not ok then
    ngx.log(ngx.ERR, "orders.http.admin_worker: ", tostring(status))
    return send(500, '{"error":{"kind":"internal","message":"worker thread failed"}}\n')
  end
  return send(status, out)
end

return M
