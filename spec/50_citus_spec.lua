-- The store on Citus (docs/scale-out.md): what differs from one PostgreSQL.
-- The Citus part runs under `make test-citus` (ES_TEST_DISTRIBUTED=1, a
-- coordinator and two workers); refusals run everywhere.
local es = require "eventsourcing"
local helpers = require "helpers"
local citus = require "eventsourcing.citus"

local function events_of(n)
  local t = {}
  for i = 1, n do t[i] = { type = "E", data = { i = i } } end
  return t
end

local function drain(store, cp, limit)
  local out = {}
  while true do
    local batch, next_cp = store:read_all({ after = cp, limit = limit or 1000 })
    assert(batch, tostring(next_cp))
    for _, e in ipairs(batch) do out[#out + 1] = e end
    cp = next_cp
    if #batch == 0 then return out, cp end
  end
end

describe("distributed layout refused where there is no Citus", function()
  it("memory stores cannot be distributed", function()
    local store = assert(es.open("memory:"))
    local ok, err = store:migrate({ distributed = true })
    assert.is_nil(ok)
    assert.equal("invalid", err.kind)
    assert.equal("memory", store:info().kind)
    assert.is_false(store:info().distributed)
  end)

  it("read_all's shards option is for distributed stores only", function()
    local store = assert(es.open("memory:"))
    local b, err = store:read_all({ shards = { 1 } })
    assert.is_nil(b)
    assert.equal("invalid", err.kind)
    assert.has_error(function() store:read_all({ shards = 1 }) end)
    assert.has_error(function() store:read_all({ shards = { "x" } }) end)
  end)

  it("counters are for distributed stores", function()
    local ok, err = citus.counters(assert(es.open("memory:")))
    assert.is_nil(ok)
    assert.equal("invalid", err.kind)
    assert.has_error(function() citus.align_counters(assert(es.open("memory:")), { margin = -1 }) end)
  end)

  it("bad options raise", function()
    local store = assert(es.open("memory:"))
    assert.has_error(function() store:migrate({ shards = 4 }) end)
    assert.has_error(function() store:migrate({ distributed = true, shards = -1 }) end)
    assert.has_error(function() store:migrate({ distributed = true, shards = "4" }) end)
  end)

  if not helpers.distributed() then
    it("PostgreSQL without Citus: an error, and the store stays as it was", function()
      local schema = helpers.fresh_schema()
      local store = assert(es.open(helpers.database_url(), { schema = schema }))
      assert(store:migrate())
      assert(store:append("S-1", { type = "A" }))
      local ok, err = store:migrate({ distributed = true })
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.matches("Citus", err.message)
      assert.is_false(store:info().distributed)
      assert.equal(1, store:version("S-1"))
      local batch, cp = assert(store:read_all())
      assert.equal(1, #batch)
      assert.matches("^%d+:%d+$", cp)
      store:query('DROP SCHEMA "' .. schema .. '" CASCADE')
      store:close()
    end)
  end
end)

if not helpers.distributed() then
  describe("the store on Citus", function()
    pending("needs a Citus cluster: make test-citus")
  end)
  return
end

describe("the store on Citus", function()
  local store, schema

  -- The node group and port of the shard holding stream `name`.
  local function placement(name)
    local r = assert(store:query("SELECT p.groupid, n.nodeport, p.shardid FROM pg_dist_placement p "
      .. "JOIN pg_dist_node n USING (groupid) WHERE p.shardid = "
      .. "get_shard_id_for_distribution_column($1, $2::text)", '"' .. schema .. '".events', name))[1]
    return r.groupid, r.nodeport, r.shardid
  end

  -- A stream name starting with prefix whose shard is on node group g
  -- (or not on it, with other = true).
  local function stream_on(prefix, g, other)
    for k = 1, 1000 do
      local name = prefix .. "-" .. k
      local group = placement(name)
      if (group == g) ~= (other or false) then return name end
    end
    error("no stream found")
  end

  before_each(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
  end)

  after_each(function()
    if store and not store:is_closed() then
      pcall(store.rollback, store)
      pcall(store.query, store, 'DROP SCHEMA "' .. schema .. '" CASCADE')
      store:close()
    end
  end)

  it("says it is distributed, and migrating again changes nothing", function()
    local info = assert(store:info())
    assert.equal("postgresql", info.kind)
    assert.is_string(info.citus)
    assert.is_true(info.distributed)
    assert.equal(tonumber(os.getenv("ES_TEST_SHARDS") or "4"), info.shards)
    assert(store:append("S-1", { type = "A" }))
    assert(store:migrate(helpers.migrate_opts()))
    assert(store:migrate())
    assert.equal(1, store:version("S-1"))
  end)

  it("upgrading a distributed store past step 4 keeps its own append()", function()
    -- step 4 replaces append() on one PostgreSQL; a distributed store only
    -- records it, so ids stay checked within their stream (pg_citus.c)
    local q = '"' .. schema .. '"'
    local function body()
      return assert(store:query("SELECT pg_get_functiondef(($1 || '.append')::regproc) AS d",
        q))[1].d
    end
    local citus_fn = "e.stream = p_stream AND e.id = u.id"
    assert.truthy(body():find(citus_fn, 1, true))
    assert(store:query("DELETE FROM " .. q .. ".schema_version WHERE version >= 4"))
    assert(store:migrate())
    assert.truthy(body():find(citus_fn, 1, true))
    local top = assert(store:query("SELECT max(version) AS v FROM " .. q .. ".schema_version"))
    assert.is_true(top[1].v >= 4)
    local id = "0190a5a4-0000-7000-8000-0000000000f4"
    assert(store:append("U4-1", { { id = id, type = "A" }, { type = "B" } }))
    assert(store:append("U4-2", { id = id, type = "A" }))   -- another stream: allowed
    assert.equal(2, store:version("U4-1"))
  end)

  it("upgrading a distributed store past step 5 gives its own append() the last event's check", function()
    -- step 5 adds p_last_id to append(); a distributed store gets Citus'
    -- variant of it, delegated to the stream's worker like the one before
    local q = '"' .. schema .. '"'
    local function fns()
      local rows = assert(store:query("SELECT p.pronargs AS n, pg_get_functiondef(p.oid) AS d,"
        .. " EXISTS (SELECT 1 FROM pg_dist_object o WHERE o.objid = p.oid"
        .. "   AND o.distribution_argument_index IS NOT NULL) AS delegated"
        .. " FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace"
        .. " WHERE s.nspname = $1 AND p.proname = 'append'", schema))
      assert.equal(1, #rows)
      return rows[1]
    end
    local citus_fn = "e.stream = p_stream AND e.id = u.id"
    local now = fns()
    assert.equal(8, now.n)
    assert.is_true(now.delegated)
    -- back to step 4: Citus' append() of before, without p_last_id
    local old = now.d:gsub(",%s*p_last_id uuid DEFAULT NULL::uuid", "")
    old = old:gsub("IF p_last_id IS NOT NULL AND last_id IS DISTINCT FROM p_last_id THEN", "IF false THEN")
    assert.is_nil(old:find("p_last_id", 1, true))
    assert(store:query("DROP FUNCTION " .. q .. ".append(text, bigint, boolean, uuid[], text[],"
      .. " json[], json[], uuid)"))
    assert(store:query(old))
    assert(store:query("SELECT create_distributed_function($1, 'p_stream', colocate_with => $2,"
      .. " force_delegation => true)", schema .. ".append(text, bigint, boolean, uuid[], text[],"
      .. " json[], json[])", schema .. ".events"))
    assert(store:query("DELETE FROM " .. q .. ".schema_version WHERE version >= 5"))
    assert.equal(7, fns().n)
    assert(store:migrate())
    now = fns()
    assert.equal(8, now.n)
    assert.is_true(now.delegated)
    assert.truthy(now.d:find(citus_fn, 1, true))
    local top = assert(store:query("SELECT max(version) AS v FROM " .. q .. ".schema_version"))
    assert.is_true(top[1].v >= 5)
    assert(store:append("U5-1", { type = "A" }))
    local last
    for e in assert(store:read("U5-1")) do last = e.id end
    for _, batch in ipairs({ { type = "B" }, { { type = "C" }, { type = "D" } } }) do
      local r = assert(store:append("U5-1", batch, { expected_last_id = last }))
      for e in assert(store:read("U5-1", { from = r.version })) do last = e.id end
    end
    assert.equal(4, store:version("U5-1"))
    local ok, err = store:append("U5-1", { { type = "E" }, { type = "F" } },
      { expected_version = 4, expected_last_id = "0190a5a4-0000-7000-8000-0000000000f5" })
    assert.is_nil(ok)
    assert.equal("last_id", err.reason)
    assert.equal(4, err.actual)
    assert.equal(4, store:version("U5-1"))
  end)

  it("stores each event's txid from the worker that stores it", function()
    for i = 1, 20 do assert(store:append("T-" .. i, { { type = "A" }, { type = "B" } })) end
    store:begin()
    for i = 1, 5 do assert(store:append("T-" .. i, { type = "C" })) end
    assert(store:commit())
    local rows = assert(store:query("SELECT success, result FROM run_command_on_shards($1, "
      .. "'SELECT count(*) FILTER (WHERE txid::text <> xmin::text) FROM %s')",
      '"' .. schema .. '".events'))
    assert.is_true(#rows > 0)
    for _, r in ipairs(rows) do
      assert.is_true(r.success)
      assert.equal("0", r.result)
    end
  end)

  it("checks event ids within their stream", function()
    local id = "0190a5a4-0000-7000-8000-000000000001"
    local r1 = assert(store:append("I-1", { id = id, type = "A" }))
    local again = assert(store:append("I-1", { id = id, type = "A" }))      -- a retry
    assert.is_true(again.idempotent)
    again.idempotent = nil
    assert.same(r1, again)
    assert(store:append("I-2", { id = id, type = "A" }))                      -- another stream
    local ok, err = store:append("I-1", { { type = "B" }, { id = id, type = "A" } })
    assert.is_nil(ok)
    assert.equal("invalid", err.kind)
    assert.equal(1, store:version("I-1"))
  end)

  -- The sockets this process holds: /proc/self/fd/N of a socket cannot be
  -- opened (ENXIO), of a closed descriptor does not exist (ENOENT).
  local function sockets()
    local n = 0
    for fd = 0, 1023 do
      local f, err = io.open("/proc/self/fd/" .. fd)
      if f then f:close() elseif err:find("No such device or address", 1, true) then n = n + 1 end
    end
    return n
  end

  it("a forked child that collects the store lets go of its worker sessions too, without a word", function()
    local core = require "eventsourcing.core"
    for i = 1, 40 do assert(store:append("F-" .. i, { type = "A" })) end
    -- the reads run on each worker's session: two workers, two sessions
    assert.equal(40, #assert(store:read_all({ limit = 100 })))
    local workers = assert(store:query("SELECT count(*) AS n FROM pg_dist_node "
      .. "WHERE noderole = 'primary' AND groupid > 0"))[1].n
    local held = { store = store }
    store = nil
    local seen = setmetatable({ [held.store] = true }, { __mode = "k" })
    local pid = assert(core.fork())
    if pid == 0 then
      local before = sockets()
      held.store = nil
      collectgarbage()
      collectgarbage()
      if next(seen) ~= nil then core.exit(3) end
      -- the store's session and one per worker, each closed in the child
      core.exit(before - sockets() == 1 + workers and 0 or 4)
    end
    local how, code = core.wait(pid)
    store = held.store
    assert.same({ "exited", 0 }, { how, code })
    -- the parent's worker sessions go on (a Terminate would have ended them)
    assert(store:append("F-41", { type = "A" }))
    assert.equal(41, #assert(store:read_all({ limit = 100 })))
  end)

  it("a smaller limit gives a prefix of the same batch (followers re-read up to an event)", function()
    for i = 1, 12 do assert(store:append("P-" .. i, { { type = "A" }, { type = "B" }, { type = "C" } })) end
    assert(store:append("P-1", events_of(9)))     -- one shard much fuller than the others
    local full = assert(store:read_all({ limit = 25 }))
    assert.equal(25, #full)
    for n = 1, 24 do
      local part, cp = assert(store:read_all({ limit = n }))
      assert.equal(n, #part)
      for i = 1, n do assert.equal(full[i].id, part[i].id) end
      -- and the checkpoint after it goes on without reading any again
      local rest = assert(store:read_all({ after = cp, limit = 25 - n }))
      local seen = {}
      for i = 1, n do seen[full[i].id] = true end
      for _, e in ipairs(rest) do assert.is_nil(seen[e.id], "read twice") end
    end
  end)

  it("checkpoints hold a cursor per shard and refuse others", function()
    assert(store:append("C-1", { type = "A" }))
    local _, cp = drain(store)
    local n = select(2, cp:gsub("=", ""))
    assert.equal(store:info().shards, n)
    assert.matches("^c1:%d+@%d+=%d+:%d+", cp)
    for _, bad in ipairs { "5:7", "c1:", "c1:1@1=2", "c1:x", cp .. ",", "c1:1@1=2:3" } do
      local b, err = store:read_all({ after = bad })
      assert.is_nil(b, bad)
      assert.equal("invalid", err.kind)
    end
  end)

  it("a slow transaction holds back only its own worker, and nothing is skipped", function()
    local A = assert(es.open(helpers.database_url(), { schema = schema }))
    local B = assert(es.open(helpers.database_url(), { schema = schema }))
    local slow = "Slow-1"
    local g = placement(slow)
    local near, far = stream_on("Near", g), stream_on("Far", g, true)
    local _, cp0 = drain(store)
    A:begin()
    assert(A:append(slow, { type = "Slow" }))
    assert(B:append(near, { type = "Near" }))
    assert(B:append(far, { type = "Far" }))
    local got, cp1 = drain(store, cp0)
    -- the other worker's event comes through; the same worker's waits
    assert.equal(1, #got)
    assert.equal(far, got[1].stream)
    assert(A:commit())
    local rest = drain(store, cp1, 1)
    assert.equal(2, #rest)
    assert.equal(slow, rest[1].stream)       -- the older transaction first on its worker
    assert.equal(near, rest[2].stream)
    assert.equal(3, #drain(store, nil, 2))   -- from the start: each once
    A:close(); B:close()
  end)

  it("reads a subset of shards: one consumer per shard group, together everything once", function()
    for i = 1, 30 do assert(store:append("G-" .. i, { { type = "A" }, { type = "B" } })) end
    local ids = {}
    for _, r in ipairs(assert(store:query("SELECT shardid FROM pg_dist_shard WHERE logicalrelid = $1::regclass "
      .. "ORDER BY shardid", '"' .. schema .. '".events'))) do ids[#ids + 1] = r.shardid end
    assert.is_true(#ids >= 2)
    -- member k takes every other shard
    local groups = { {}, {} }
    for i, id in ipairs(ids) do table.insert(groups[i % 2 + 1], id) end
    local seen, cps = {}, {}
    for k, g in ipairs(groups) do
      local cp
      repeat
        local b
        b, cp = assert(store:read_all({ after = cp, limit = 7, shards = g }))
        for _, e in ipairs(b) do
          assert.is_nil(seen[e.id], "delivered twice")
          seen[e.id] = k
        end
      until #b == 0
      cps[k] = cp
    end
    local n = 0
    for _ in pairs(seen) do n = n + 1 end
    assert.equal(60, n)
    -- a checkpoint belongs to its shards
    local b, err = store:read_all({ after = cps[1], shards = groups[2] })
    assert.is_nil(b)
    assert.equal("invalid", err.kind)
    b, err = store:read_all({ shards = { 1 } })
    assert.is_nil(b)
    assert.matches("not a shard", err.message)
    -- new events go to the member of their shard
    assert(store:append("G-1", { type = "C" }))
    local got = 0
    for k, g in ipairs(groups) do
      got = got + #assert(store:read_all({ after = cps[k], shards = g }))
    end
    assert.equal(1, got)
  end)

  it("distributes an existing store: rows kept in stream order, old checkpoints refused", function()
    local other = helpers.fresh_schema()
    local s = assert(es.open(helpers.database_url(), { schema = other }))
    assert(s:migrate())
    for i = 1, 20 do assert(s:append("E-" .. (i % 5), { { type = "A" }, { type = "B" } })) end
    local _, old_cp = assert(s:read_all({ limit = 10 }))
    assert(s:migrate({ distributed = true, shards = 4 }))
    assert.is_true(s:info().distributed)
    local b, err = s:read_all({ after = old_cp })
    assert.is_nil(b)
    assert.equal("invalid", err.kind)
    for i = 1, 5 do assert(s:append("E-" .. (i % 5), { type = "C" })) end
    local all = drain(s, nil, 7)
    assert.equal(45, #all)
    local last = {}
    for _, e in ipairs(all) do
      assert.equal((last[e.stream] or 0) + 1, e.version)
      last[e.stream] = e.version
    end
    s:query('DROP SCHEMA "' .. other .. '" CASCADE')
    s:close()
  end)

  it("applies the store's lock and statement timeouts to its reads on workers", function()
    assert(store:append("L-1", { type = "A" }))
    local _, port, shard = placement("L-1")
    local tbl = assert(store:query("SELECT shard_name($1::regclass, $2::bigint) AS t",
      '"' .. schema .. '".events', shard))[1].t
    -- a child holds the shard's table locked on its worker for 4 s: a read
    -- without the timeouts would wait for it
    local work = helpers.workdir("es-citus-lock")
    local locked = work.dir .. "/locked"
    local child = work:spawn(([[
      local es = require "eventsourcing"
      local w = assert(es.open(%q))
      assert(w:begin())
      assert(w:query("SET LOCAL citus.enable_manual_changes_to_shards = on"))
      assert(w:query("LOCK TABLE " .. %q .. " IN ACCESS EXCLUSIVE MODE"))
      io.open(%q, "w"):close()
      os.execute("sleep 4")
      w:rollback()
    ]]):format((helpers.database_url():gsub("port=%d+", "port=" .. port)), tbl, locked), "locker")
    for _ = 1, 100 do
      if helpers.read_file(locked) then break end
      helpers.sleep(0.05)
    end
    assert.truthy(helpers.read_file(locked), "the child did not lock the shard")
    local timed = assert(es.open(helpers.database_url(), { schema = schema, lock_timeout = 200 }))
    local t0 = es.workflow.now()
    local b, err = timed:read_all()
    local took = es.workflow.now() - t0
    assert.is_nil(b)
    assert.equal("timeout", err.reason)
    assert.matches("lock timeout", err.message)
    assert.is_true(took < 3, ("took %.1f s"):format(took))
    helpers.wait_exit(child, 10)
    work:remove()
    local batch = assert(timed:read_all())       -- the same session goes on
    assert.equal(1, #batch)
    timed:close()
  end)

  -- Sessions to a worker, its transaction counter, and moving it on (one
  -- transaction per id, as an operator does before a move: see
  -- docs/scale-out.md).
  local function worker(port)
    return assert(es.open((helpers.database_url():gsub("port=%d+", "port=" .. port))))
  end
  local function counter(s)
    return tonumber(assert(s:query("SELECT pg_current_xact_id()::text AS x"))[1].x)
  end
  local function advance(s, to)
    local n = to - counter(s)
    if n > 0 then
      assert(s:query(("DO $$BEGIN FOR i IN 1..%d LOOP PERFORM pg_current_xact_id(); COMMIT; "
        .. "END LOOP; END$$"):format(n)))
    end
  end
  -- Moves the shard of stream `name` to the other worker: its new group
  -- and sessions to the source and target workers.
  local function move(name, prepare)
    local _, port, shard = placement(name)
    local r = assert(store:query("SELECT groupid, nodeport FROM pg_dist_node WHERE nodeport <> $1 "
      .. "AND groupid <> 0 AND noderole = 'primary' LIMIT 1", port))[1]
    local src, dst = worker(port), worker(r.nodeport)
    if prepare then prepare(src, dst) end
    -- an earlier move's old placement may still wait for cleanup (Citus
    -- drops it later, and refuses a move until it could): try again a while
    local ok, err
    for _ = 1, 40 do
      assert(store:query("CALL citus_cleanup_orphaned_resources()"))
      ok, err = store:query("SELECT citus_move_shard_placement($1::bigint, '127.0.0.1', $2::int, "
        .. "'127.0.0.1', $3::int, shard_transfer_mode => 'block_writes')", shard, port, r.nodeport)
      if ok or not tostring(err):find("could not be cleaned up", 1, true) then break end
      helpers.sleep(0.25)
    end
    assert(ok, tostring(err))
    src:close()
    dst:close()
    return r.groupid, shard
  end

  it("carries a follower over a shard move: nothing skipped or doubled", function()
    assert(store:append("M-1", { { type = "A" }, { type = "B" } }))
    local _, cp = drain(store)
    -- the counters aligned just before the move (docs/scale-out.md)
    local g, shard = move("M-1", function()
      local r = assert(citus.align_counters(store, { margin = 100 }))
      assert.equal(2, #r)
      local top = math.max(r[1].before, r[2].before)
      for _, c in ipairs(r) do assert.is_true(c.after >= top + 100, es.json.encode(r)) end
    end)
    local _, fresh = helpers.on_one_shard(store, "M-1", "Fresh")
    assert(store:append("M-1", { type = "C" }))
    assert(store:append(fresh, { type = "D" }))
    local got, cp2 = drain(store, cp)
    local types = {}
    for _, e in ipairs(got) do types[#types + 1] = e.type end
    table.sort(types)
    assert.same({ "C", "D" }, types)
    assert.matches(shard .. "@" .. g .. "=", cp2, 1, true)
    assert.same({}, (drain(store, cp2)))
    local all = drain(store)
    assert.equal(4, #all)
    local last = {}
    for _, e in ipairs(all) do
      assert.equal((last[e.stream] or 0) + 1, e.version)
      last[e.stream] = e.version
    end
  end)

  it("refuses to carry a cursor over a move when events landed below it", function()
    -- the source's counter ahead: the receiving node gives lower ids
    local _, port = placement("M-1")
    local src = worker(port)
    local ahead = 0
    for _, r in ipairs(assert(store:query("SELECT nodeport FROM pg_dist_node WHERE groupid <> 0 "
        .. "AND noderole = 'primary'"))) do
      local w = worker(r.nodeport)
      ahead = math.max(ahead, counter(w))
      w:close()
    end
    advance(src, ahead + 10000)     -- more than the move itself uses on the target
    src:close()
    assert(store:append("M-1", { type = "A" }))
    local _, cp = drain(store)
    local g = move("M-1")
    local _, fresh = helpers.on_one_shard(store, "M-1", "Fresh")
    assert(store:append(fresh, { type = "B" }))
    local batch, err = store:read_all({ after = cp })
    assert.is_nil(batch)
    assert.equal("invalid", err.kind)
    assert.matches("moved from node group %d+ to " .. g, err.message)
    assert.matches("below its cursor", err.message)
    -- reading from the start works: the moved event's txid is ahead of its
    -- new node's counter, so it waits (a delay, not a skip) until that
    -- counter passes it, then comes once
    local all, cp0 = drain(store)
    assert.equal(1, #all)
    assert.equal(fresh, all[1].stream)
    local _, port2 = placement("M-1")
    local dst = worker(port2)
    advance(dst, ahead + 20000)
    dst:close()
    local rest = drain(store, cp0)
    assert.equal(1, #rest)
    assert.equal("M-1", rest[1].stream)
    assert.equal(g, (placement("M-1")))
  end)
end)
