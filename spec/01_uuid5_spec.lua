-- core.uuid5 (libuuid's uuid_generate_sha1) against the SHA-1 written in
-- Lua that workflow ids were made with: ids already stored must come out
-- the same. Needs no database.
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

  it("matches workflow.uuid5 on 3,000 inputs (lengths 0 to 300, NUL bytes, any namespace)", function()
    local rand = lcg(20261129)
    for i = 1, 3000 do
      local ns = i % 3 == 0 and NS_URL or random_uuid(rand)
      local len = i <= 301 and i - 1 or rand(300)
      local name = random_bytes(rand, len)
      assert.equal(workflow.uuid5(ns, name), core.uuid5(ns, name),
        ("namespace %s, name of %d bytes"):format(ns, len))
    end
  end)

  it("matches workflow ids as derive_id makes them", function()
    for step = 1, 50 do
      local name = ("%s\0%s\0%s\0%s"):format("order-fulfilment",
        "0190c1a2-0000-7000-8000-000000000001", step, step % 3)
      assert.equal(workflow.uuid5(workflow.NAMESPACE, name), core.uuid5(workflow.NAMESPACE, name))
    end
  end)

  it("accepts upper-case namespaces and refuses what is not a UUID", function()
    assert.equal(core.uuid5(NS_DNS, "x"), core.uuid5(NS_DNS:upper(), "x"))
    assert.has_error(function() core.uuid5("not-a-uuid", "x") end)
    assert.has_error(function() core.uuid5(NS_DNS .. "0", "x") end)
    assert.has_error(function() core.uuid5(NS_DNS, 42) end)
    assert.has_error(function() core.uuid5(nil, "x") end)
  end)
end)
