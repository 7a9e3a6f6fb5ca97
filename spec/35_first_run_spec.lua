-- A first run on a fresh machine (issue 9 section 1):
-- * the make targets a user may type first install the Debian packages
--   before compiling anything (scripts/check-make-order.sh reads make -n);
-- * the HTTP service starts and answers from a checkout in a 0700 folder
--   (a home on Debian 12, or /root), where nginx's default worker user
--   (nobody) can read nothing, and refuses to start, naming the file, when
--   its workers could not read the code.
-- Needs nginx + libnginx-mod-http-lua, curl and the LuaJIT build.
local helpers = require "helpers"
local http = require "http_client"
local es = require "eventsourcing"

local q = helpers.shell_quote
local ALICE = "alice-token-0123456789"
local is_root = helpers.sh('[ "$(id -u)" = 0 ]')

describe("first run: make order", function()
  it("every first target installs dependencies before it compiles", function()
    local ok, out = http.run("scripts/check-make-order.sh")
    assert.is_true(ok, out)
    -- all five targets, with and without -j2
    local n = select(2, out:gsub("deps %(line %d+%) before the first compile", ""))
    assert.are.equal(10, n, out)
  end)

  it("the check catches a target that compiles first", function()
    local dir = helpers.mktemp_dir("es-make-order")
    finally(function() helpers.sh("rm -rf " .. q(dir)) end)
    assert.is_true(helpers.sh("cp -a Makefile src include scripts " .. q(dir)))
    -- the old rule: `demo: all` built before scripts/demo.sh ran deps.sh
    assert.is_true(helpers.sh("printf 'demo2: all\\n\\t@scripts/demo.sh\\n' >>" .. q(dir .. "/Makefile")))
    local ok, out = http.run("scripts/check-make-order.sh -C " .. q(dir) .. " demo2")
    assert.is_false(ok, out)
    assert.is_truthy(out:find("make  demo2 compiles (line", 1, true), out)
    ok, out = http.run("scripts/check-make-order.sh -C " .. q(dir) .. " demo")
    assert.is_true(ok, out)
  end)
end)

describe("first run: the HTTP service from a 0700 checkout", function()
  local dir, copy, store, schema

  -- the files the service runs from, copied into DIR/checkout
  local function make_copy(owner)
    dir = helpers.mktemp_dir("es-0700")
    copy = dir .. "/checkout"
    assert.is_true(helpers.sh(("chmod 700 %s && mkdir -p %s/build && cp -a lua examples %s/ "
      .. "&& cp -a build/luajit %s/build/"):format(q(dir), q(copy), q(copy), q(copy))))
    if owner then assert.is_true(helpers.sh(("chown -R %s: %s"):format(owner, q(dir)))) end
  end

  local function worker_users()
    local _, out = http.run("ps -o user=,args= -C nginx")
    local users = {}
    for user, args in out:gmatch("(%S+) +([^\n]*)") do
      if args:find("worker process", 1, true) and not args:find("master", 1, true) then
        users[#users + 1] = user
      end
    end
    return users
  end

  setup(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    package.path = "examples/?.lua;" .. package.path
    assert(require("orders.service").migrate(store))
  end)

  teardown(function() if store then store:close() end end)

  after_each(function()
    if dir then helpers.sh("rm -rf " .. q(dir)) end
    dir = nil
  end)

  local function serve_and_use()
    local srv = http.start_server { root = copy, database_url = helpers.database_url(),
      schema = schema, threads = 2, decode = es.json.decode }
    finally(function() srv:stop() end)
    local r = srv:request("POST", "/orders", { token = ALICE, body = "{}" })
    assert.are.equal(201, r.status, r.body .. srv:error_log())
    local g = srv:request("GET", "/orders/" .. r.json.id, { token = ALICE })
    assert.are.equal(200, g.status, g.body)
    assert.are.equal("draft", g.json.status)
    assert.is_falsy(srv:error_log():find("not found", 1, true), srv:error_log())
    return srv
  end

  it("answers from a checkout in a 0700 folder of the user running make", function()
    make_copy(nil)
    serve_and_use()
  end)

  it("as root, runs its workers as the checkout's owner (a 0700 home of another user)", function()
    if not is_root then pending("needs root"); return end
    make_copy("nobody")
    local srv = serve_and_use()
    local conf = http.read_file(srv.prefix .. "/conf/nginx.conf")
    assert.is_truthy(conf:find("\nuser nobody ", 1, true), conf)
    local users = worker_users()
    local seen = false
    for _, u in ipairs(users) do if u == "nobody" then seen = true end end
    assert.is_true(seen, table.concat(users, ","))
  end)

  it("refuses to start, naming the file, when the workers cannot read the code", function()
    if not is_root then pending("needs root"); return end
    make_copy("nobody")
    local so = copy .. "/build/luajit/eventsourcing/core.so"
    assert.is_true(helpers.sh("chmod 000 " .. q(so)))
    local prefix = dir .. "/nginx"
    local ok, out = http.run(("env PORT=%d ES_HTTP_DATABASE_URL=%s %s/examples/orders/http/nginx.sh start %s")
      :format(20000 + os.time() % 30000, q(helpers.database_url()), q(copy), q(prefix)))
    assert.is_false(ok, out)
    assert.is_truthy(out:find("workers run as nobody, who cannot read " .. so, 1, true), out)
    -- nothing left running
    assert.is_falsy(helpers.read_file(prefix .. "/logs/nginx.pid"), "nginx started")
  end)
end)
