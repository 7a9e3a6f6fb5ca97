-- Live events as Server-Sent Events (issue 14 section 3): GET
-- /orders/{id}/events and GET /events?customer_id= stream the history after
-- Last-Event-ID, then new events as they commit (one shared poller per nginx
-- worker; no database connection per client); authorization as for the
-- order; no customer ever receives another customer's event.
local helpers = require "helpers"
local http = require "http_client"
local es = require "eventsourcing"

local q = helpers.shell_quote
local ALICE = "alice-token-0123456789"
local BOB = "bob-token-0123456789"
local ADMIN = "admin-token-0123456789"

describe("Server-Sent Events", function()
  local srv, store, schema, dir
  local streams = {}

  setup(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    package.path = "examples/?.lua;" .. package.path
    assert(require("orders.service").migrate(store))
    srv = http.start_server { database_url = helpers.database_url(), schema = schema,
      threads = 4, decode = es.json.decode, env = { ES_HTTP_SSE_POLL = "0.05" } }
    dir = helpers.mktemp_dir("es-sse-spec")
  end)

  teardown(function()
    for _, s in ipairs(streams) do s:close() end
    if srv then srv:stop() end
    if store then store:close() end
    if dir then helpers.sh("rm -rf " .. q(dir)) end
  end)

  -- a client in the background (curl -N) writing the stream to a file
  local n = 0
  local function listen(path, token, last_id)
    n = n + 1
    local file = ("%s/stream%d.txt"):format(dir, n)
    local pidfile = file .. ".pid"
    local headers = "-H 'Accept: text/event-stream'"
    if token then headers = headers .. " -H " .. q("Authorization: Bearer " .. token) end
    if last_id then headers = headers .. " -H " .. q("Last-Event-ID: " .. last_id) end
    assert(helpers.sh(("curl -sN --max-time 60 %s %s >%s 2>&1 & echo $! >%s")
      :format(headers, q(srv.base .. path), q(file), q(pidfile))))
    local s = { file = file, pid = tonumber(http.read_file(pidfile)) }
    function s:text() return http.read_file(self.file) or "" end
    -- the events so far: { id, event, data (decoded) }
    function s:events()
      local list = {}
      for block in self:text():gmatch("(.-)\n\n") do
        local id, ev, data = block:match("^id: ([^\n]*)\nevent: ([^\n]*)\ndata: ([^\n]*)$")
        if id then list[#list + 1] = { id = id, event = ev, data = es.json.decode(data) } end
      end
      return list
    end
    function s:wait_for(count, seconds)
      for _ = 1, (seconds or 10) * 20 do
        if #self:events() >= count then return self:events() end
        http.sleep(0.05)
      end
      error(("%d events expected, got %d:\n%s"):format(count, #self:events(), self:text()), 2)
    end
    function s:close() helpers.sh("kill " .. self.pid .. " 2>/dev/null") end
    streams[#streams + 1] = s
    -- ready when the opening comment arrived
    for _ = 1, 200 do
      if s:text():find(": stream of", 1, true) then return s end
      http.sleep(0.025)
    end
    return s
  end

  local function req(method, path, opts) return srv:request(method, path, opts) end

  local function create(token)
    local r = req("POST", "/orders", { token = token, body = "{}" })
    assert.are.equal(201, r.status, r.body)
    return r.json.id
  end

  local function add(token, id, product)
    local r = req("POST", "/orders/" .. id .. "/items", { token = token,
      body = es.json.encode { product_id = product, quantity = 1, unit_price = 10 } })
    assert.are.equal(200, r.status, r.body)
  end

  local function sse_get(path, token, headers)
    local h = { "Accept: text/event-stream" }
    for _, x in ipairs(headers or {}) do h[#h + 1] = x end
    return req("GET", path, { token = token, headers = h })
  end

  it("refuses what it must, with the usual JSON errors", function()
    local id = create(ALICE)
    local r = req("GET", "/orders/" .. id .. "/events", { token = ALICE })
    assert.are.equal(406, r.status, r.body)
    assert.are.equal(401, sse_get("/orders/" .. id .. "/events").status)
    assert.are.equal(401, sse_get("/orders/" .. id .. "/events", "nope-nope-nope").status)
    assert.are.equal(403, sse_get("/orders/" .. id .. "/events", BOB).status)
    assert.are.equal(404, sse_get("/orders/00000000-0000-7000-8000-000000000000/events", ALICE).status)
    assert.are.equal(400, sse_get("/orders/" .. id .. "/events", ALICE, { "Last-Event-ID: x" }).status)
    assert.are.equal(403, sse_get("/events?customer_id=bob", ALICE).status)
    assert.are.equal(400, sse_get("/events", ADMIN).status)
    assert.are.equal(400, sse_get("/events?customer_id=alice", ADMIN, { "Last-Event-ID: 7" }).status)
    assert.are.equal(405, req("POST", "/events", { token = ALICE, body = "{}" }).status)
    local e = sse_get("/orders/" .. id .. "/events", BOB)
    assert.are.equal("forbidden", e.json.error.kind)
  end)

  it("many clients hold no database connection each and do not stall the event loop", function()
    local function connections()
      return assert(store:query("SELECT count(*) AS n FROM pg_stat_activity"
        .. " WHERE datname = current_database() AND pid <> pg_backend_pid()"))[1].n
    end
    local id = create(ALICE)
    local clients = {}
    for i = 1, 24 do
      clients[i] = listen(i % 2 == 0 and ("/orders/" .. id .. "/events") or "/events", ALICE)
    end
    for _, c in ipairs(clients) do c:wait_for(1) end
    -- 24 streams, 4 pool threads: at most one connection per thread
    assert.is_true(connections() <= 4, connections() .. " connections")
    local r = req("GET", "/orders/" .. id, { token = ALICE })
    assert.are.equal(200, r.status)
    assert.is_true(r.time < 1, ("GET took %.3f s beside 24 streams"):format(r.time))
    add(ALICE, id, "fan-out")
    for _, c in ipairs(clients) do c:wait_for(2) end
    local function open_streams()
      local m = req("GET", "/metrics", { token = ADMIN })
      return tonumber(m.body:match("\nes_sse_clients (%d+)\n"))
    end
    assert.are.equal(24, open_streams())
    for _, c in ipairs(clients) do c:close() end
    -- a client that goes ends its subscription
    local left
    for _ = 1, 100 do
      left = open_streams()
      if left == 0 then break end
      http.sleep(0.05)
    end
    assert.are.equal(0, left)
  end)

  it("an order's stream: the history, then new events as they commit, in order, once", function()
    local id = create(ALICE)
    add(ALICE, id, "a")
    local s = listen("/orders/" .. id .. "/events", ALICE)
    local got = s:wait_for(2)
    assert.are.equal("1", got[1].id)
    assert.are.equal("OrderCreated", got[1].event)
    assert.are.equal(id, got[1].data.order_id)
    for i = 1, 5 do add(ALICE, id, "live" .. i) end
    s:wait_for(7)
    http.sleep(0.3)   -- and nothing more comes
    got = s:events()
    assert.are.equal(7, #got)
    for i, ev in ipairs(got) do
      assert.are.equal(tostring(i), ev.id)
      assert.are.equal(i, ev.data.version)
    end
    assert.are.equal("live5", got[7].data.data.product_id)
    -- an admin may follow it too; Last-Event-ID resumes after that version
    local r = listen("/orders/" .. id .. "/events", ADMIN, "5")
    got = r:wait_for(2)
    assert.are.equal("6", got[1].id)
    assert.are.equal("7", got[2].id)
  end)

  it("a customer's stream carries all of their orders and nothing of anyone else's", function()
    local mine, theirs = {}, {}
    mine[create(ALICE)] = true
    theirs[create(BOB)] = true
    local a = listen("/events", ALICE)
    local b = listen("/events?customer_id=bob", BOB)
    local watch = listen("/events?customer_id=alice", ADMIN)
    -- both customers' commands interleaved
    for i = 1, 3 do
      local ida, idb = create(ALICE), create(BOB)
      mine[ida], theirs[idb] = true, true
      for j = 1, 3 do
        add(ALICE, ida, ("a%d-%d"):format(i, j))
        add(BOB, idb, ("b%d-%d"):format(i, j))
      end
    end
    -- every event of each customer's orders so far, from the store
    local function owner_counts()
      local rows = assert(store:query(('SELECT c.data->>\'customer_id\' AS customer, count(*) AS n'
        .. ' FROM "%s".events e JOIN "%s".events c ON c.stream = e.stream AND c.version = 1'
        .. ' WHERE e.category = \'Order\' GROUP BY 1'):format(schema, schema)))
      local t = {}
      for _, r in ipairs(rows) do t[r.customer] = r.n end
      return t
    end
    local counts = owner_counts()
    a:wait_for(counts.alice)
    b:wait_for(counts.bob)
    watch:wait_for(counts.alice)
    http.sleep(0.3)   -- and nothing more comes
    local ga, gb, gw = a:events(), b:events(), watch:events()
    assert.are.equal(counts.alice, #ga)
    assert.are.equal(counts.bob, #gb)
    assert.are.equal(counts.alice, #gw)
    local owner = {}
    for _, r in ipairs(assert(store:query(('SELECT stream, data->>\'customer_id\' AS customer FROM "%s".events'
        .. ' WHERE category = \'Order\' AND version = 1'):format(schema)))) do
      owner[r.stream:sub(#"Order-" + 1)] = r.customer
    end
    local seen = {}
    for _, ev in ipairs(ga) do
      assert.are.equal("alice", owner[ev.data.order_id], "alice got " .. ev.data.order_id)
      assert.is_nil(seen[ev.id], "twice: " .. ev.id)
      seen[ev.id] = true
    end
    local alice_orders = {}
    for _, ev in ipairs(ga) do alice_orders[ev.data.order_id] = true end
    for id in pairs(mine) do assert.is_true(alice_orders[id], id) end
    for _, ev in ipairs(gb) do assert.are.equal("bob", owner[ev.data.order_id], "bob got " .. ev.data.order_id) end
    for _, ev in ipairs(gw) do assert.are.equal("alice", owner[ev.data.order_id]) end
    -- bob's orders made in this test all reached him
    local bob_orders = {}
    for _, ev in ipairs(gb) do bob_orders[ev.data.order_id] = true end
    for id in pairs(theirs) do assert.is_true(bob_orders[id], id) end
    local expected = #ga
    -- ids are checkpoints in increasing order; resuming after one skips what came before
    local last_t, last_p = -1, -1
    for _, ev in ipairs(ga) do
      local t, p = ev.id:match("^(%d+):(%d+)$")
      t, p = tonumber(t), tonumber(p)
      assert.is_true(t > last_t or (t == last_t and p > last_p), ev.id)
      last_t, last_p = t, p
    end
    local resumed = listen("/events", ALICE, ga[expected - 2].id)
    local gr = resumed:wait_for(2)
    http.sleep(0.3)
    assert.are.equal(2, #resumed:events())
    assert.are.equal(ga[expected - 1].id, gr[1].id)
  end)
end)
