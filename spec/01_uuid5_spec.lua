-- core.uuid5 (libuuid's uuid_generate_sha1) against the SHA-1 written in
-- Lua that workflow ids were made with before: ids already stored must
-- come out the same. That implementation is gone; what it gave for the
-- inputs below is pinned here (a fingerprint: the uuid5 of all its
-- outputs; the generated inputs differ between Lua 5.4 and LuaJIT, whose
-- numbers round the generator's products). Needs no database.
local core = require "eventsourcing.core"
local workflow = require "eventsourcing.workflow"

local NS_DNS = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
local NS_URL = "6ba7b811-9dad-11d1-80b4-00c04fd430c8"

-- a deterministic byte generator (no math.random: its sequence differs
-- between Lua 5.4 and LuaJIT, and failures should reproduce)
local function lcg(seed)
  local x = seed
  return function(n)
    x = (x * 1103515245 + 12345) % 2147483648
    return x % n
  end
end

local function random_bytes(rand, len)
  local t = {}
  for i = 1, len do t[i] = string.char(rand(256)) end
  return table.concat(t)
end

local function random_uuid(rand)
  local h = {}
  for i = 1, 32 do h[i] = ("%x"):format(rand(16)) end
  local s = table.concat(h)
  return ("%s-%s-%s-%s-%s"):format(s:sub(1, 8), s:sub(9, 12), s:sub(13, 16),
    s:sub(17, 20), s:sub(21, 32))
end

describe("core.uuid5", function()
  it("gives RFC 4122's known answers", function()
    assert.equal("886313e1-3b8a-5372-9b90-0c9aee199e5d", core.uuid5(NS_DNS, "python.org"))
    assert.equal(workflow.NAMESPACE, core.uuid5(NS_URL, "eventsourcing:workflow"))
  end)

  -- what the Lua SHA-1 gave, per flavour (see the top)
  local PINNED = {
    ["lua5.4"] = "0f6bb5e9-f54a-5bac-aebc-6a95ac1c1c64",
    luajit = "c9c98dad-1dc1-572e-bb13-d17442df4747",
  }

  it("gives the ids the Lua SHA-1 gave on 3,000 inputs (lengths 0 to 300, NUL bytes, any namespace)", function()
    local rand = lcg(20261129)
    local all = {}
    for i = 1, 3000 do
      local ns = i % 3 == 0 and NS_URL or random_uuid(rand)
      local len = i <= 301 and i - 1 or rand(300)
      all[i] = core.uuid5(ns, random_bytes(rand, len))
    end
    local flavour = rawget(_G, "jit") and "luajit" or "lua5.4"
    assert.equal(PINNED[flavour], core.uuid5(NS_URL, table.concat(all, ",")))
  end)

  it("gives the workflow ids derive_id made before", function()
    local d = {}
    for step = 1, 50 do
      d[step] = workflow.derive_id("order-fulfilment", "0190c1a2-0000-7000-8000-000000000001", step, step % 3)
    end
    assert.equal("9542cc9b-ca2a-5672-8748-53b84f5ed03c", d[1])
    assert.equal("5f31f3e8-4d45-5207-b202-3cdaff3c5370", core.uuid5(NS_URL, table.concat(d, ",")))
  end)

  it("accepts upper-case namespaces and refuses what is not a UUID", function()
    assert.equal(core.uuid5(NS_DNS, "x"), core.uuid5(NS_DNS:upper(), "x"))
    assert.has_error(function() core.uuid5("not-a-uuid", "x") end)
    assert.has_error(function() core.uuid5(NS_DNS .. "0", "x") end)
    assert.has_error(function() core.uuid5(NS_DNS, 42) end)
    assert.has_error(function() core.uuid5(nil, "x") end)
    -- the text form exactly: 32 hex digits of either case, hyphens at 8,
    -- 13, 18 and 23 (the check every event id and expected_last_id goes
    -- through)
    local mixed = NS_DNS:sub(1, 10):upper() .. NS_DNS:sub(11)
    assert.equal(core.uuid5(NS_DNS, "x"), core.uuid5(mixed, "x"))
    for _, bad in ipairs {
      NS_DNS:sub(1, 35), NS_DNS:sub(2), NS_DNS .. " ", " " .. NS_DNS:sub(2),
      NS_DNS:sub(1, 8) .. "0" .. NS_DNS:sub(10),          -- no hyphen at 8
      NS_DNS:sub(1, 7) .. "-" .. NS_DNS:sub(9),           -- a hyphen at 7
      NS_DNS:sub(1, 35) .. "g", "g" .. NS_DNS:sub(2),
      NS_DNS:gsub("%-", ""), "{" .. NS_DNS:sub(2, 35) .. "}", "",
    } do
      assert.has_error(function() core.uuid5(bad, "x") end, nil, bad)
    end
  end)
  it("makes different v7 ids in a forked child and its parent, in the same millisecond", function()
    -- the child inherits the id state; without the fork guard both count
    -- up from the same id (identical in 29 of 50 forks once)
    local path = os.tmpname()
    for _ = 1, 20 do
      core.uuid()
      local pid = assert(core.fork())
      if pid == 0 then
        local f = io.open(path, "w")
        f:write(core.uuid())
        f:close()
        core.exit(0)
      end
      local mine = core.uuid()
      core.wait(pid)
      local f = assert(io.open(path))
      local theirs = f:read("a")
      f:close()
      assert.equal(36, #theirs)
      assert.are_not.equal(mine, theirs)
    end
    os.remove(path)
  end)
end)
