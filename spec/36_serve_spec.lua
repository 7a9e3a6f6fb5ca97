-- `make serve` as a whole (issue 14 section 1): scripts/serve.sh starts a
-- throwaway PostgreSQL, the order workflows under a supervisor and nginx;
-- stock over HTTP; GET /orders/{id} says where its stock reservation
-- stands; a killed workflow process is restarted; scripts/stop.sh leaves
-- no process behind (checked in the process table).
-- Needs nginx + libnginx-mod-http-lua, curl, PostgreSQL 15 and both builds.
local helpers = require "helpers"
local http = require "http_client"
local es = require "eventsourcing"

local q = helpers.shell_quote
local ALICE = "alice-token-0123456789"
local BOB = "bob-token-0123456789"
local ADMIN = "admin-token-0123456789"

-- every process: { pid, ppid, pgid, args }
local function processes()
  local _, out = http.run("ps -eo pid=,ppid=,pgid=,args=")
  local list = {}
  for pid, ppid, pgid, args in out:gmatch("%s*(%d+)%s+(%d+)%s+(%d+)%s+([^\n]*)") do
    list[#list + 1] = { pid = tonumber(pid), ppid = tonumber(ppid), pgid = tonumber(pgid), args = args }
  end
  return list
end

-- the processes for which is_root(p) holds, and all their descendants
local function with_descendants(list, is_root)
  local set, found, changed = {}, {}, true
  while changed do
    changed = false
    for _, p in ipairs(list) do
      if not set[p.pid] and (is_root(p) or set[p.ppid]) then
        set[p.pid], changed = true, true
        found[#found + 1] = p
      end
    end
  end
  return found
end

-- alive and not a zombie (an exited daemon waits a moment for init here)
local function running(pid)
  local stat = http.read_file("/proc/" .. pid .. "/stat")
  return stat ~= nil and stat:match("^%d+ %b() (%a)") ~= "Z"
end

local function read_state(dir)
  local text = http.read_file(dir .. "/state") or ""
  local st = { supervised = {} }
  st.pg_url = text:match("PG_URL='([^']*)'")
  st.nginx = text:match("NGINX_PREFIX='([^']*)'")
  for pid in text:gmatch("SUPERVISED=\"%${SUPERVISED:%-} (%d+)\"") do
    st.supervised[#st.supervised + 1] = tonumber(pid)
  end
  return st
end

describe("make serve: the whole order service", function()
  local dir, port, c, state

  local function serve_env()
    return ("PORT=%d ES_SERVE_DIR=%s ES_HTTP_DRAFT_TTL=4 ES_HTTP_WORKFLOW_POLL=0.2 "
      .. "ES_DATABASE_URL= "):format(port, q(dir))
  end

  setup(function()
    dir = helpers.mktemp_dir("es-serve-spec")
    local ok, out
    for attempt = 1, 5 do
      port = 20000 + (os.time() * 7919 + attempt * 104729) % 40000
      ok, out = http.run(serve_env() .. "scripts/serve.sh")
      if ok then break end
    end
    assert(ok, "scripts/serve.sh failed: " .. tostring(out))
    state = read_state(dir)
    c = http.client("http://127.0.0.1:" .. port, es.json.decode)
  end)

  teardown(function()
    if c then c:close() end
    if dir then
      http.run(serve_env() .. "scripts/stop.sh")
      helpers.sh("rm -rf " .. q(dir))
    end
  end)

  local function req(method, path, opts) return c:request(method, path, opts) end

  -- polls GET /orders/{id} until check(order) holds (or 15 s)
  local function eventually(id, check)
    local r
    for _ = 1, 150 do
      r = req("GET", "/orders/" .. id, { token = ALICE })
      if r.status == 200 and check(r.json) then return r.json end
      http.sleep(0.1)
    end
    error("condition never held; last response: " .. tostring(r and r.body), 2)
  end

  local function order_with(product, qty)
    local r = req("POST", "/orders", { token = ALICE, body = "{}" })
    assert.are.equal(201, r.status, r.body)
    local id = r.json.id
    r = req("POST", "/orders/" .. id .. "/items", { token = ALICE,
      body = es.json.encode { product_id = product, quantity = qty, unit_price = 100 } })
    assert.are.equal(200, r.status, r.body)
    return id
  end

  local function place(id)
    local r = req("POST", "/orders/" .. id .. "/place", { token = ALICE })
    assert.are.equal(200, r.status, r.body)
  end

  local function receive(product, qty, token)
    return req("POST", "/stock/" .. product .. "/receive", { token = token or ADMIN,
      body = es.json.encode { quantity = qty } })
  end

  it("starts PostgreSQL, nginx and a supervised workflow process", function()
    assert.is_string(state.pg_url)
    assert.is_string(state.nginx)
    assert.are.equal(1, #state.supervised)
    local child = tonumber(http.read_file(dir .. "/run/workflows.pid"))
    assert.is_number(child)
    assert.is_true(helpers.alive(child))
  end)

  it("stock: admins receive, everyone reads on hand, reserved, available", function()
    local p = "serve-p1-" .. os.time()
    local r = req("GET", "/stock/" .. p, { token = BOB })
    assert.are.equal(200, r.status, r.body)
    assert.are.same({ product_id = p, on_hand = 0, reserved = 0, available = 0, version = 0 }, r.json)
    r = receive(p, 7)
    assert.are.equal(200, r.status, r.body)
    assert.are.equal(7, r.json.on_hand)
    assert.are.equal('"1"', r.headers["etag"])
    r = receive(p, 7, ALICE)
    assert.are.equal(403, r.status, r.body)
    assert.are.equal("forbidden", r.json.error.kind)
    for _, body in ipairs { '{"quantity":0}', '{"quantity":-1}', '{"quantity":1.5}', '{"quantity":"3"}',
                            "{}", '{"quantity":1,"x":2}', "[", "" } do
      r = req("POST", "/stock/" .. p .. "/receive", { token = ADMIN, body = body })
      assert.are.equal(400, r.status, body .. " -> " .. r.body)
      assert.are.equal("invalid", r.json.error.kind)
    end
    assert.are.equal(401, req("GET", "/stock/" .. p).status)
    assert.are.equal(405, req("DELETE", "/stock/" .. p, { token = ADMIN }).status)
    assert.are.equal(405, req("GET", "/stock/" .. p .. "/receive", { token = ADMIN }).status)
    assert.are.equal(404, req("GET", "/stock", { token = ADMIN }).status)
    assert.are.equal(404, req("POST", "/stock/" .. p .. "/other", { token = ADMIN }).status)
    -- nothing of the refused requests was stored
    r = req("GET", "/stock/" .. p, { token = BOB })
    assert.are.same({ product_id = p, on_hand = 7, reserved = 0, available = 7, version = 1 }, r.json)
  end)

  it("a placed order's reservation goes from pending to reserved; a cancel releases it", function()
    local p = "serve-p2-" .. os.time()
    assert.are.equal(200, receive(p, 5).status)
    local id = order_with(p, 2)
    local o = req("GET", "/orders/" .. id, { token = ALICE }).json
    assert.are.equal("none", o.reservation.status)
    place(id)
    o = eventually(id, function(x) return x.reservation.status == "reserved" end)
    assert.are.same({ { product_id = p, quantity = 2, status = "reserved" } }, o.reservation.items)
    local s = req("GET", "/stock/" .. p, { token = ALICE }).json
    assert.are.equal(2, s.reserved)
    assert.are.equal(3, s.available)
    assert.are.equal(200, req("POST", "/orders/" .. id .. "/cancel", { token = ALICE }).status)
    eventually(id, function(x) return x.reservation.status == "released" end)
    assert.are.equal(0, req("GET", "/stock/" .. p, { token = ALICE }).json.reserved)
  end)

  it("an order that does not fit is rejected and cancelled \"out of stock\"", function()
    local p = "serve-p3-" .. os.time()
    assert.are.equal(200, receive(p, 1).status)
    local id = order_with(p, 3)
    place(id)
    local o = eventually(id, function(x) return x.status == "cancelled" end)
    assert.are.equal("out of stock", o.cancel_reason)
    assert.are.equal("rejected", o.reservation.status)
    assert.are.equal("rejected", o.reservation.items[1].status)
    assert.are.equal(0, req("GET", "/stock/" .. p, { token = ALICE }).json.reserved)
  end)

  it("a draft left alone expires (ES_HTTP_DRAFT_TTL)", function()
    local id = order_with("serve-p4", 1)
    local o = eventually(id, function(x) return x.status == "cancelled" end)
    assert.are.equal("expired", o.cancel_reason)
  end)

  it("a killed workflow process is restarted and carries on", function()
    local child = tonumber(http.read_file(dir .. "/run/workflows.pid"))
    assert.is_true(helpers.sh("kill -9 " .. child))
    local new
    for _ = 1, 150 do
      new = tonumber(http.read_file(dir .. "/run/workflows.pid") or "")
      if new and new ~= child and helpers.alive(new) then break end
      http.sleep(0.1)
    end
    assert.are_not.equal(child, new)
    assert.is_true(helpers.alive(new))
    local p = "serve-p5-" .. os.time()
    assert.are.equal(200, receive(p, 2).status)
    local id = order_with(p, 2)
    place(id)
    eventually(id, function(x) return x.reservation.status == "reserved" end)
  end)

  it("make stop stops every process it started and leaves none behind", function()
    local groups = {}
    for _, g in ipairs(state.supervised) do groups[g] = true end
    local pg_dir = state.pg_url:match("host=(%S+)")
    local function ours(p)
      return groups[p.pgid] or p.args:find(dir, 1, true) or p.args:find(pg_dir, 1, true)
    end
    local mine = with_descendants(processes(), ours)
    -- the supervisor, the workflows, nginx (master + worker), postgres (several)
    assert.is_true(#mine >= 6, #mine .. " processes")
    local ok, out = http.run(serve_env() .. "scripts/stop.sh")
    assert.is_true(ok, out)
    local left = {}
    for _, p in ipairs(with_descendants(processes(), ours)) do
      left[#left + 1] = p.pid .. " " .. p.args
    end
    assert.are.same({}, left)
    for _, p in ipairs(mine) do assert.is_false(running(p.pid), p.args) end
    assert.is_nil(http.read_file(dir .. "/state"))
    -- a second stop has nothing to do
    ok, out = http.run(serve_env() .. "scripts/stop.sh")
    assert.is_true(ok, out)
    assert.is_truthy(out:find("nothing started", 1, true), out)
  end)
end)
