-- eventsourcing.workflow_ids: the name-based UUIDs (version 5, SHA-1,
-- RFC 4122) of the events workflows append, so a replayed step appends
-- nothing twice. SHA-1 in pure Lua (5.4 operators or LuaJIT's bit).
local M = {}

local band, bor, bxor, bnot, lshift, rshift
do
  local native = load and load([[
    return function(a, b) return a & b end, function(a, b) return a | b end,
      function(a, b) return a ~ b end, function(a) return (~a) & 0xffffffff end,
      function(a, n) return (a << n) & 0xffffffff end,
      function(a, n) return (a & 0xffffffff) >> n end]])
  if native then
    band, bor, bxor, bnot, lshift, rshift = native()
  else
    local bit = require "bit"
    local function u(x) return x % 4294967296 end
    band = function(a, b) return u(bit.band(a, b)) end
    bor = function(a, b) return u(bit.bor(a, b)) end
    bxor = function(a, b) return u(bit.bxor(a, b)) end
    bnot = function(a) return u(bit.bnot(a)) end
    lshift = function(a, n) return u(bit.lshift(a, n)) end
    rshift = function(a, n) return u(bit.rshift(a, n)) end
  end
end

local TWO32 = 4294967296

local function rol(x, n) return bor(lshift(x, n), rshift(x, 32 - n)) end

local function hex32(x)
  return ("%04x%04x"):format(math.floor(x / 65536), x % 65536)
end

-- SHA-1 of a string, as 40 hex digits.
function M.sha1(msg)
  local h0, h1, h2, h3, h4 = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0
  local len = #msg
  local bits = len * 8
  local tail = {}
  for k = 7, 0, -1 do tail[#tail + 1] = string.char(math.floor(bits / 256 ^ k) % 256) end
  msg = msg .. "\128" .. ("\0"):rep((55 - len) % 64) .. table.concat(tail)
  local w = {}
  for chunk = 1, #msg, 64 do
    for i = 0, 15 do
      local a, b, c, d = msg:byte(chunk + i * 4, chunk + i * 4 + 3)
      w[i] = ((a * 256 + b) * 256 + c) * 256 + d
    end
    for i = 16, 79 do
      w[i] = rol(bxor(bxor(w[i - 3], w[i - 8]), bxor(w[i - 14], w[i - 16])), 1)
    end
    local a, b, c, d, e = h0, h1, h2, h3, h4
    for i = 0, 79 do
      local f, k
      if i < 20 then
        f, k = bor(band(b, c), band(bnot(b), d)), 0x5A827999
      elseif i < 40 then
        f, k = bxor(bxor(b, c), d), 0x6ED9EBA1
      elseif i < 60 then
        f, k = bor(bor(band(b, c), band(b, d)), band(c, d)), 0x8F1BBCDC
      else
        f, k = bxor(bxor(b, c), d), 0xCA62C1D6
      end
      local t = (rol(a, 5) + f + e + k + w[i]) % TWO32
      e, d, c, b, a = d, c, rol(b, 30), a, t
    end
    h0, h1, h2 = (h0 + a) % TWO32, (h1 + b) % TWO32, (h2 + c) % TWO32
    h3, h4 = (h3 + d) % TWO32, (h4 + e) % TWO32
  end
  return hex32(h0) .. hex32(h1) .. hex32(h2) .. hex32(h3) .. hex32(h4)
end

local function uuid_bytes(u)
  local hex = u:gsub("-", "")
  return (hex:gsub("..", function(h) return string.char(tonumber(h, 16)) end))
end

-- RFC 4122 version 5 UUID of `name` in namespace `ns` (a UUID string).
function M.uuid5(ns, name)
  local h = M.sha1(uuid_bytes(ns) .. name)
  local b6 = tonumber(h:sub(13, 14), 16) % 16 + 0x50
  local b8 = tonumber(h:sub(17, 18), 16) % 64 + 0x80
  h = h:sub(1, 12) .. ("%02x"):format(b6) .. h:sub(15, 16) .. ("%02x"):format(b8) .. h:sub(19, 32)
  return ("%s-%s-%s-%s-%s"):format(h:sub(1, 8), h:sub(9, 12), h:sub(13, 16), h:sub(17, 20), h:sub(21, 32))
end

-- The namespace of workflow ids: uuid5(NAMESPACE_URL, "eventsourcing:workflow").
M.NAMESPACE = M.uuid5("6ba7b811-9dad-11d1-80b4-00c04fd430c8", "eventsourcing:workflow")

-- The id of event `index` of the command issued at `step` by workflow
-- `name` while handling the event with id `trigger`.
function M.derive_id(name, trigger, step, index)
  return M.uuid5(M.NAMESPACE, ("%s\0%s\0%s\0%s"):format(name, trigger, step, index or 1))
end

return M
