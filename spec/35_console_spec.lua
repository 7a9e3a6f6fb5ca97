-- The web console (examples/orders/http/console/ + /admin/ endpoints) in a
-- real browser: Debian's chromium in headless mode, driven over WebDriver
-- by chromedriver (spec/browser.lua), against a real nginx (spec/
-- http_client.lua) and ES_TEST_DATABASE_URL in a fresh schema. The checks
-- read the page's content. Screenshots go to $ES_CONSOLE_SHOTS (default: a
-- temporary folder, so that `make test` leaves the tree as it was); the
-- README's, under docs/console/, are taken by this run with
--   ES_CONSOLE_SHOTS=docs/console make test SPEC=spec/35_console_spec.lua
-- Needs chromium and chromium-driver (Debian packages); where they cannot
-- run the spec says "skipped: ..." and counts as pending.
local helpers = require "helpers"
local http = require "http_client"
local browser = require "browser"
local es = require "eventsourcing"

local ALICE = "alice-token-0123456789"
local BOB = "bob-token-0123456789"
local ADMIN = "admin-token-0123456789"
local SHOTS = os.getenv("ES_CONSOLE_SHOTS") or helpers.mktemp_dir("es-console-shots")

local available, why = browser.available()

describe("web console", function()
  local srv, store, schema, b, app
  local order_a          -- alice's draft order for time travel: totals 1000, 2250, 1250
  local order_b          -- bob's placed order: the workflow's chain

  local function req(method, path, opts) return srv:request(method, path, opts) end

  local function ok_json(r, status)
    assert.are.equal(status or 200, r.status, r.body)
    return r.json
  end

  local function url(fragment) return srv.base .. "/console/" .. (fragment or "") end

  local function shot(name)
    helpers.sh("mkdir -p " .. SHOTS)
    assert.is_true(b:screenshot(SHOTS .. "/" .. name .. ".png") > 1000)
  end

  local function login(token)
    b:go(url())
    b:js("sessionStorage.clear()")
    b:go(url("#/store"))
    b:js("location.reload()")
    b:wait(function() return b:js("return !document.getElementById('login').hidden") end, 5, "the login form")
    b:type("#token", token)
    b:click("#login-button")
  end

  -- waits until the element's text has `part`; the error shows what it had
  local function shown(css, part, seconds)
    local last
    local ok, t = pcall(b.wait, b, function()
      last = b:text(css)
      return last ~= es.json.null and last:find(part, 1, true) and last
    end, seconds or 5)
    if not ok then
      error(("%q never appeared in %s (it shows: %s)"):format(part, css, tostring(last)), 2)
    end
    return t
  end

  setup(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    app = dofile("examples/orders/app.lua")
    assert(es.migrate(store, app))
    srv = http.start_server { database_url = helpers.database_url(), schema = schema,
      threads = 4, decode = es.json.decode }
    -- order A: created, two lines added, one removed (three totals over time)
    order_a = ok_json(req("POST", "/orders", { token = ALICE, body = "{}" }), 201).id
    ok_json(req("POST", "/orders/" .. order_a .. "/items", { token = ALICE,
      body = '{"product_id":"p1","quantity":2,"unit_price":500}' }))
    ok_json(req("POST", "/orders/" .. order_a .. "/items", { token = ALICE,
      body = '{"product_id":"p2","quantity":1,"unit_price":1250}' }))
    ok_json(req("DELETE", "/orders/" .. order_a .. "/items/p1", { token = ALICE }))
    -- order B: placed; the workflow reserves (or refuses) stock for it
    order_b = ok_json(req("POST", "/orders", { token = BOB, body = "{}" }), 201).id
    ok_json(req("POST", "/orders/" .. order_b .. "/items", { token = BOB,
      body = '{"product_id":"p9","quantity":1,"unit_price":700}' }))
    ok_json(req("POST", "/orders/" .. order_b .. "/place", { token = BOB }))
    local runner = es.workflow.runner(store, app.workflows, { aggregates = app.aggregates,
      read_models = app.runner_options.read_models })
    assert(runner:catch_up())
  end)

  teardown(function()
    if srv then
      local log = srv:error_log()
      srv:stop()
      assert.is_falsy(log:find("runtime error", 1, true), log)
    end
    if store then store:close() end
  end)

  describe("admin endpoints", function()
    local function admin(method, path) return req(method, path, { token = ADMIN }) end

    local function refused(r, status, kind, part)
      assert.are.equal(status, r.status, r.body)
      assert.are.equal(kind, r.json.error.kind, r.body)
      if part then assert.matches(part, r.json.error.message, 1, true) end
    end

    it("keep customers' tokens and anonymous requests out", function()
      for _, path in ipairs { "/admin/stats", "/admin/overview", "/admin/streams", "/admin/log",
                              "/admin/projections", "/admin/workflows", "/admin/dead-letters" } do
        refused(req("GET", path, { token = ALICE }), 403, "forbidden")
        refused(req("GET", path), 401, "unauthorized")
        refused(req("GET", path, { token = "not-a-token-at-all" }), 401, "unauthorized")
        assert.are.equal(200, admin("GET", path).status, path)
      end
      local before = store:query(('SELECT checkpoint FROM "%s".projections'):format(schema))[1].checkpoint
      refused(req("POST", "/admin/projections/rm_orders/rebuild", { token = BOB }), 403, "forbidden")
      assert.are.equal(before, store:query(('SELECT checkpoint FROM "%s".projections'):format(schema))[1].checkpoint)
    end)

    it("come with static pages that load nothing from elsewhere", function()
      local r = req("GET", "/console/")
      assert.are.equal(200, r.status)
      assert.matches("text/html", r.headers["content-type"], 1, true)
      assert.matches("default-src 'self'", r.headers["content-security-policy"], 1, true)
      for _, f in ipairs { "console.js", "console.css", "index.html" } do
        local body = req("GET", "/console/" .. f).body
        assert.is_true(#body > 500, f)
        assert.is_nil(body:find("https?://"), f .. " names another server")
      end
      assert.matches("javascript", req("GET", "/console/console.js").headers["content-type"])
      assert.are.equal(301, req("GET", "/console").status)
    end)

    it("refuse bad input with a clear error", function()
      refused(admin("GET", "/admin/streams?limit=0"), 400, "invalid", "limit must be an integer from 1 to 500")
      refused(admin("GET", "/admin/streams?limit=x"), 400, "invalid", "limit")
      refused(admin("GET", "/admin/streams/Order-nope"), 404, "not_found", "stream Order-nope does not exist")
      refused(admin("GET", "/admin/log?after=yesterday"), 400, "invalid", "after must be a checkpoint")
      refused(admin("GET", "/admin/log?before=1:2&after=1:2"), 400, "invalid", "not both")
      refused(admin("POST", "/admin/projections/nope/rebuild"), 404, "not_found", "no projection named nope")
      refused(admin("POST", "/admin/projections/rm_orders/explode"), 404, "not_found")
      refused(admin("POST", "/admin/dead-letters/01a22975-0000-7000-8000-000000000000/retry"), 404, "not_found",
        "no dead letter")
      refused(admin("POST", "/admin/workflows/nope/pause"), 404, "not_found", "no workflow named nope")
      refused(admin("DELETE", "/admin/stats"), 404, "not_found")
      refused(admin("GET", "/admin/nothing"), 404, "not_found")
    end)

    it("page through streams and the log, trace, and discard a dead letter", function()
      local o = ok_json(admin("GET", "/admin/overview"))
      assert.are.equal(store:query(('SELECT count(*) AS n FROM "%s".events'):format(schema))[1].n, o.events)
      local streams = ok_json(admin("GET", "/admin/streams?limit=1"))
      assert.are.equal(1, #streams.streams)
      local second = ok_json(admin("GET", "/admin/streams?limit=1&after=" .. streams.next))
      assert.is_true(second.streams[1].stream > streams.streams[1].stream)
      local tail = ok_json(admin("GET", "/admin/log?limit=3"))
      assert.are.equal(3, #tail.events)
      local older = ok_json(admin("GET", "/admin/log?limit=3&before=" .. tail.before))
      assert.are.equal(tail.events[1].position - 1, older.events[3].position)
      assert.are.equal(0, #ok_json(admin("GET", "/admin/log?after=" .. tail.checkpoint)).events)
      -- a dead letter discarded: gone, and the event it named is untouched
      local placed
      for e in store:read("Order-" .. order_b) do if e.type == "OrderPlaced" then placed = e end end
      local version = store:version("Order-" .. order_b)
      assert(store:query(('INSERT INTO "%s".dead_letters (workflow, event_id, error) '
        .. "VALUES ('order-fulfilment', $1, 'spec 35')"):format(schema), placed.id))
      assert.are.equal(1, #ok_json(admin("GET", "/admin/dead-letters")))
      ok_json(admin("POST", "/admin/dead-letters/order-fulfilment:" .. placed.id .. "/discard"))
      assert.are.equal(0, #ok_json(admin("GET", "/admin/dead-letters")))
      assert.are.equal(version, store:version("Order-" .. order_b))
    end)
  end)

  describe("in headless chromium", function()
    if not available then
      io.stderr:write("35_console_spec: skipped: " .. why .. "\n")
      pending("skipped: " .. why)
      return
    end

    setup(function()
      b = browser.start { width = 1280, height = 900, encode = es.json.encode, decode = es.json.decode,
        array = es.json.array }
    end)

    teardown(function()
      if b then b:quit() end
    end)

    -- no script error and no CSP violation on any page; refused requests
    -- (a 403 the test provokes) only log their failed load
    after_each(function()
      for _, l in ipairs(b:errors()) do
        assert.is_truthy(l.message:find("Failed to load resource", 1, true), l.message)
      end
    end)

    it("refuses a customer's token at the login and keeps nothing", function()
      login(ALICE)
      shown("#message", "not an admin token")
      assert.is_true(b:js("return document.getElementById('nav').hidden"))
      assert.are.equal(es.json.null, b:js("return sessionStorage.getItem('es-console-token')"))
    end)

    it("logs in, lists categories and streams, searches, opens a stream's events", function()
      login(ADMIN)
      shown("#view", "Categories")
      shown("#view", "Order-" .. order_a)
      assert.are.equal(ADMIN, b:js("return sessionStorage.getItem('es-console-token')"))
      shot("store")
      -- search by a part of the name
      b:type("#stream-search", order_a:sub(-12) .. browser.ENTER)
      b:wait(function()
        local t = b:text("#view")
        return t:find(order_a, 1, true) and not t:find(order_b, 1, true)
      end, 5, "only order A's stream")
      b:click(('a[href="#/stream/Order-%s"]'):format(order_a))
      shown("#stream-name", "Order-" .. order_a)
      local text = shown("#view", "ItemRemoved")
      assert.matches("OrderCreated", text)
      assert.matches("version 4", text)
      -- an event's data and metadata, pretty-printed
      b:click("details summary")
      local data = shown("#view pre", '"customer_id": "alice"')
      assert.matches('\n  "', data)
      shot("stream")
    end)

    it("shows an event appended by the test in the live log within a second", function()
      login(ADMIN)
      shown("#view", "Categories")
      b:go(url("#/log"))
      shown("#log-state", "live")
      shown("#log-rows", "Order-" .. order_a)
      local res = assert(store:append("Audit-console", { { type = "ConsoleChecked",
        data = { by = "spec 35" }, metadata = { correlation_id = order_a } } }))
      local _, took = b:wait(function()
        return b:js("return !!document.querySelector('#log-rows tr[data-position=\"' + arguments[0] + '\"]')",
          res.position)
      end, 3, "the appended event in the live log")
      assert.is_true(took < 1, ("appeared after %.2f s"):format(took))
      assert.matches("^ConsoleChecked", b:text("#log-rows tr:first-child td:nth-child(4)"))
      shot("log")
    end)

    it("traces a correlation id, clicked in a stream, with causation arrows", function()
      local placed
      for e in store:read("Order-" .. order_b) do if e.type == "OrderPlaced" then placed = e end end
      local corr = placed.metadata.correlation_id
      login(ADMIN)
      shown("#view", "Categories")
      -- from the order's stream: the correlation id of its OrderPlaced
      b:go(url("#/stream/Order-" .. order_b))
      shown("#view", "OrderPlaced")
      b:click(('tr[data-position="%d"] a[href="#/trace/%s"]'):format(placed.position, corr))
      local text = shown("#trace-list", "OrderPlaced")
      assert.are.equal("#/trace/" .. corr, b:js("return location.hash"))
      -- the workflow's events point at the OrderPlaced that caused them
      assert.matches("caused by OrderPlaced %(Order%-" .. order_b:gsub("%-", "%%-") .. " v3%) via workflow "
        .. "order%-fulfilment", text)
      local n = b:js("return document.querySelectorAll('#trace-list > li').length")
      assert.is_true(n >= 3, "chain of " .. tostring(n))
      shot("trace")
    end)

    it("rebuilds a read model with a progress bar that reaches 100%", function()
      login(ADMIN)
      shown("#view", "Categories")
      b:go(url("#/followers"))
      shown("#projections", "rm_orders")
      shown("#workflows", "order-fulfilment")
      b:click('#projections tr[data-name="rm_orders"] button.primary')
      assert.matches("pause writers first", b:call("GET", b:s("/alert/text")), 1, true)
      b:call("POST", b:s("/alert/accept"), {})
      b:wait(function()
        return b:js("return document.getElementById('bar-rm_orders').getAttribute('aria-valuenow')") == "100"
      end, 20, "the bar at 100%")
      -- every Order event at least (a follower that filters by type in SQL
      -- reads only those), every event at most
      local counts = store:query(('SELECT count(*) AS total, count(*) FILTER (WHERE category = \'Order\') '
        .. 'AS orders FROM "%s".events'):format(schema))[1]
      local n = tonumber(shown("#bar-label-rm_orders", "rebuilt from"):match("rebuilt from (%d+) events"))
      assert.is_true(n >= counts.orders and n <= counts.total, ("%s events of %d"):format(n, counts.total))
      shown("#message", "rebuilt rm_orders")
      -- the read model answers as before
      local list = ok_json(req("GET", "/orders?customer_id=alice", { token = ALICE }))
      assert.are.equal(1, #list.orders)
      assert.are.equal(1250, list.orders[1].total)
      shot("followers")
    end)

    it("retries and discards dead letters from the console", function()
      -- the row the runner writes when an event failed max_attempts times
      local placed
      for e in store:read("Order-" .. order_b) do if e.type == "OrderPlaced" then placed = e end end
      assert(store:query(('INSERT INTO "%s".dead_letters (workflow, event_id, position, type, stream, version, '
        .. "error, attempts) VALUES ('order-fulfilment', $1, $2, $3, $4, $5, 'connection lost (spec 35)', 5)")
        :format(schema), placed.id, placed.position, placed.type, placed.stream, placed.version))
      login(ADMIN)
      shown("#view", "Categories")
      b:go(url("#/followers"))
      shown("#dead-letters", "connection lost (spec 35)")
      shot("dead-letters")
      b:click(('#dead-letters tr[data-event-id="%s"] button'):format(placed.id))
      shown("#message", "retry dead letter " .. placed.id .. ": done")
      shown("#dead-letters", "No dead letters.")
      assert.are.equal(0, store:query(('SELECT count(*) AS n FROM "%s".dead_letters'):format(schema))[1].n)
      -- discard asks first; dismissed, nothing happens; accepted, the row goes
      assert(store:query(('INSERT INTO "%s".dead_letters (workflow, event_id, position, type, stream, version, '
        .. "error, attempts) VALUES ('order-fulfilment', $1, $2, $3, $4, $5, 'poison (spec 35)', 5)")
        :format(schema), placed.id, placed.position, placed.type, placed.stream, placed.version))
      shown("#dead-letters", "poison (spec 35)", 8)
      local discard = ('#dead-letters tr[data-event-id="%s"] button.danger'):format(placed.id)
      b:click(discard)
      b:call("POST", b:s("/alert/dismiss"), {})
      helpers.sleep(0.3)
      assert.are.equal(1, store:query(('SELECT count(*) AS n FROM "%s".dead_letters'):format(schema))[1].n)
      b:click(discard)
      b:call("POST", b:s("/alert/accept"), {})
      shown("#message", "discard dead letter " .. placed.id .. ": done")
      shown("#dead-letters", "No dead letters.")
      assert.are.equal(0, store:query(('SELECT count(*) AS n FROM "%s".dead_letters'):format(schema))[1].n)
    end)

    it("pauses and resumes a projection (needs the follower engine's projector:pause/resume)", function()
      login(ADMIN)
      shown("#view", "Categories")
      b:go(url("#/followers"))
      shown("#projections", "rm_orders")
      b:click('#projections tr[data-name="rm_orders"] button')   -- Pause
      shown("#message", "pause rm_orders: done")
      shown('#projections tr[data-name="rm_orders"]', "paused")
      b:click('#projections tr[data-name="rm_orders"] button:nth-child(2)')   -- Resume
      shown("#message", "resume rm_orders: done")
      shown('#projections tr[data-name="rm_orders"]', "running")
    end)

    it("pauses and resumes a workflow (needs the follower engine's runner:pause/resume)", function()
      login(ADMIN)
      shown("#view", "Categories")
      b:go(url("#/followers"))
      shown("#workflows", "order-fulfilment")
      b:click("#workflows tbody tr button")   -- Pause
      shown("#message", "pause order-fulfilment: done")
      shown("#workflows tbody tr", "paused")
      b:click("#workflows tbody tr button:nth-child(2)")   -- Resume
      shown("#message", "resume order-fulfilment: done")
      shown("#workflows tbody tr", "running")
    end)

    it("lists a customer's orders and travels an order through time with the slider", function()
      login(ADMIN)
      shown("#view", "Categories")
      b:go(url("#/orders"))
      b:type("#customer", "alice" .. browser.ENTER)
      shown("#orders-list", order_a)
      shot("orders")
      b:click(('#orders-list a[href="#/order/%s"]'):format(order_a))
      shown("#order-total", "12.50")
      shown("#timeline", "ItemRemoved")
      -- the keyboard moves the slider one version back: the removed line is back
      b:keys("#travel", browser.LEFT)
      shown("#order-total", "22.50")
      shown("#travel-label", "version 3")
      b:keys("#travel", browser.LEFT)
      shown("#order-total", "10.00")
      shown("#order-version", "2")
      shot("order")
      -- by instant: as it was just before its fourth event was recorded
      local fourth
      for e in store:read("Order-" .. order_a, { from = 4, to = 4 }) do fourth = e end
      b:type("#travel-at", fourth.recorded_at .. browser.ENTER)
      shown("#travel-label", "just before " .. fourth.recorded_at .. " → version 3")
      shown("#order-total", "22.50")
      -- End: back to the present
      b:keys("#travel", browser.END)
      shown("#order-total", "12.50")
    end)

    it("fits a 390 px wide screen and pages through long streams", function()
      -- 120 events in one stream, 60 more streams: pages of 50
      local events = {}
      for i = 1, 120 do events[i] = { type = "Tick", data = { n = i } } end
      assert(store:append("Clock-1", events))
      for i = 1, 60 do assert(store:append(("Gauge-%03d"):format(i), { { type = "Read", data = { v = i } } })) end
      login(ADMIN)
      shown("#view", "Categories")
      b:go(url("#/stream/Clock-1"))
      shown("#view", "events 1–50")
      b:click('a[href="#/stream/Clock-1?from=51"]')
      shown("#view", "events 51–100")
      b:go(url("#/store?category=Gauge"))
      shown("#view", "50 shown")
      b:click(".pager button:nth-child(2)")
      shown("#view", "10 shown")
      shown("#view", "Gauge-060")
      -- the live log starts with the last 50 events and pages back on demand
      b:go(url("#/log"))
      shown("#log-state", "live")
      b:wait(function() return b:js("return document.querySelectorAll('#log-rows tr').length") == 50 end, 5, "50 rows")
      b:click("#log-older")
      b:wait(function() return b:js("return document.querySelectorAll('#log-rows tr').length") == 100 end, 5,
        "100 rows")
      local positions = b:js("return Array.prototype.map.call(document.querySelectorAll('#log-rows tr'), "
        .. "function (tr) { return Number(tr.getAttribute('data-position')); })")
      for i = 2, #positions do assert.are.equal(positions[i - 1] - 1, positions[i]) end
      b:size(390, 844)
      for _, view in ipairs { "#/store", "#/log", "#/followers", "#/order/" .. order_a } do
        b:go(url(view))
        b:wait(function() return b:js("return document.querySelectorAll('#view table, #view ol').length > 0") end,
          5, view)
        local wide = b:js("return document.documentElement.scrollWidth")
        assert.is_true(wide <= 390, view .. " is " .. tostring(wide) .. " px wide")
        if view:find("order") then
          shown("#order-total", "12.50")
          shot("order-390")
        elseif view == "#/followers" then
          shown("#workflows", "order-fulfilment")
          shot("followers-390")
        end
      end
      -- keyboard: from the skip link, Tab goes through the title and the views
      b:size(1280, 900)
      b:go(url("#/store"))
      shown("#view", "Categories")
      b:js("document.querySelector('.skip').focus()")
      local seen = {}
      for _ = 1, 4 do
        local tab = es.json.array { { type = "keyDown", value = browser.TAB }, { type = "keyUp", value = browser.TAB } }
        b:call("POST", b:s("/actions"), { actions = es.json.array { { type = "key", id = "kb", actions = tab } } })
        seen[#seen + 1] = b:js("return document.activeElement.textContent.trim()")
      end
      assert.are.same({ "eventsourcing console", "Store", "Live log", "Followers" }, seen)
    end)
  end)
end)
