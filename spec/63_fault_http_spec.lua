-- Fault matrix, HTTP: nginx workers killed with kill -9 twenty times at
-- random moments while a client adds items to an order, each command with
-- an Idempotency-Key it retries until acknowledged. nginx's master starts
-- new workers; a transaction cut off with its worker is rolled back by
-- PostgreSQL; the retry with the same key either replays the first answer
-- or does the command. Afterwards every command took effect exactly once.
package.path = "examples/?.lua;" .. package.path

local helpers = require "helpers"
local http = require "http_client"
local fm = require "fault_matrix"

local ALICE = "alice-token-0123456789"
local COMMANDS = 60

-- The client: COMMANDS item additions, each retried with its key until a
-- 200; logs "ok <i> <attempts>" per acknowledged command.
local CLIENT = [[
local base, id, token, n, out_path = %q, %q, %q, %d, %q
local out = assert(io.open(out_path, "w"))
out:setvbuf("line")
for i = 1, n do
  local attempts = 0
  while true do
    attempts = attempts + 1
    local p = io.popen(("curl -s -o /dev/null -w '%%%%{http_code}' -m 10 -X POST "
      .. "-H 'Authorization: Bearer %%s' -H 'Content-Type: application/json' "
      .. "-H 'Idempotency-Key: fault-%%d' "
      .. "-d '{\"product_id\":\"p%%d\",\"quantity\":1,\"unit_price\":100}' '%%s/orders/%%s/items'")
      :format(token, i, i, base, id))
    local code = p:read("*a")
    p:close()
    if code == "200" then break end
    assert(attempts < 200, ("command %%d: no 200 after 200 attempts (last %%s)"):format(i, code))
    os.execute("sleep 0.05")
  end
  out:write(("ok %%d %%d\n"):format(i, attempts))
end
out:close()
print("done")
]]

describe("fault matrix: HTTP (nginx, processes, PostgreSQL)", function()
  local store, schema, srv, w
  before_each(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    assert(require("orders.service").migrate(store))
    srv = http.start_server { database_url = helpers.database_url(), schema = schema,
                              decode = require("eventsourcing").json.decode,
                              env = { ES_HTTP_WORKERS = "2" } }
    w = fm.workdir()
  end)
  after_each(function()
    if srv then srv:stop() end
    if store then store:close() end
    w:remove()
  end)

  local function workers()
    local master = (helpers.read_file(srv.prefix .. "/logs/nginx.pid") or ""):match("%d+")
    assert(master, "no nginx master pid")
    local list = {}
    local p = io.popen("pgrep -P " .. master)
    for pid in p:lines() do list[#list + 1] = pid end
    p:close()
    return list
  end

  it("kill -9 of nginx workers 20 times at random moments: every retried command once", function()
    local r = srv:request("POST", "/orders", { token = ALICE, body = "{}" })
    assert.are.equal(201, r.status, r.body)
    local id = r.json.id
    local acks = w.dir .. "/acks"
    local cpid, clog = w:spawn(CLIENT:format(srv.base, id, ALICE, COMMANDS, acks), "client")
    local killed = 0
    for _ = 1, 20 do
      fm.random_sleep(0.05, 0.3)
      local list = workers()
      if #list > 0 then
        helpers.sh("kill -9 " .. list[math.random(#list)])
        killed = killed + 1
      end
    end
    assert.is_true(helpers.wait_exit(cpid, 180), helpers.read_file(clog))
    assert.matches("done", helpers.read_file(clog) or "", 1, true)
    assert.equal(20, killed)
    -- every command acknowledged, and some needed a retry
    local acked, retried = 0, 0
    for line in (helpers.read_file(acks) or ""):gmatch("[^\n]+") do
      local attempts = tonumber(line:match("^ok %d+ (%d+)$"))
      acked = acked + 1
      if attempts > 1 then retried = retried + 1 end
    end
    assert.equal(COMMANDS, acked)
    -- each product added exactly once
    local rows = assert(store:query(('SELECT data->>\'product_id\' AS p, count(*) AS n FROM "%s".events '
      .. "WHERE stream = $1 AND type = 'ItemAdded' GROUP BY 1"):format(schema), "Order-" .. id))
    local once = 0
    for _, row in ipairs(rows) do
      assert.equal(1, row.n, row.p .. " was added " .. row.n .. " times")
      once = once + 1
    end
    assert.equal(COMMANDS, once)
    -- the master replaced the workers, the service answers
    assert.is_true(#workers() >= 1)
    r = srv:request("GET", "/orders/" .. id, { token = ALICE })
    assert.are.equal(200, r.status, r.body)
    assert.equal(COMMANDS, #r.json.items)
    print(("  http faults: %d workers killed, %d of %d commands needed a retry"):format(killed, retried, COMMANDS))
  end)
end)
