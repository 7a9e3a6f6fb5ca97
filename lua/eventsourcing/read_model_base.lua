-- eventsourcing.read_model_base: what every read model module shares:
-- identifiers and column types, keys, errors, cursor encoding, and the
-- rows of memory stores.
local core = require "eventsourcing.core"

local json = core.json
local M = {}

local DELETE = setmetatable({}, { __tostring = function() return "es.read_model.DELETE" end })
M.DELETE = DELETE

local IDENT = "^[a-z_][a-z0-9_]*$"

-- json is PostgreSQL's json, not an alias of jsonb: the server checks the
-- text on the way in and gives it back as written, where jsonb is parsed
-- into its binary form on every write and printed again on every read
-- (items of an order, 25 lines: 12 us in, 9 us out, against under 1 us).
-- It has no equality, order or btree index: such a column cannot be the
-- key, be indexed or order find()'s rows, and find() compares it as jsonb.
local TYPES = {
  text = "text", varchar = "text", bigint = "bigint", int8 = "bigint",
  integer = "integer", int = "integer", int4 = "integer", smallint = "smallint",
  int2 = "smallint", numeric = "numeric", boolean = "boolean", bool = "boolean",
  jsonb = "jsonb", json = "json", timestamptz = "timestamptz",
  ["timestamp with time zone"] = "timestamptz", date = "date", uuid = "uuid",
  ["double precision"] = "double precision", float8 = "double precision",
  real = "real", float4 = "real",
}
local INTEGER_TYPES = { bigint = true, integer = true, smallint = true }

-- Identifier checks ---------------------------------------------------------

local function valid_ident(s)
  return type(s) == "string" and #s <= 63 and s:match(IDENT) ~= nil
end
M.valid_ident = valid_ident

local function quote(s)
  assert(valid_ident(s), "internal: unvalidated identifier")
  return '"' .. s .. '"'
end
M.quote = quote

-- A deterministic identifier of at most 63 bytes derived from s.
local function short_ident(s)
  if #s <= 63 then return s end
  local h = 5381
  for i = 1, #s do h = (h * 33 + s:byte(i)) % 4294967296 end
  return s:sub(1, 54) .. "_" .. ("%08x"):format(h)
end
M.short_ident = short_ident

local function normalize_type(t)
  if type(t) ~= "string" then return nil end
  local lt = t:lower():gsub("^%s+", ""):gsub("%s+$", ""):gsub("%s+", " ")
  if TYPES[lt] then return TYPES[lt] end
  local p, s = lt:match("^numeric%s*%(%s*(%d+)%s*,%s*(%d+)%s*%)$")
  if p then return ("numeric(%d,%d)"):format(tonumber(p), tonumber(s)) end
  p = lt:match("^numeric%s*%(%s*(%d+)%s*%)$")
  if p then return ("numeric(%d)"):format(tonumber(p)) end
end

-- Helpers --------------------------------------------------------------------

local util = require "eventsourcing.util"
local deep_copy = util.deep_copy

local tointeger = math.tointeger or function(v)   -- LuaJIT: numbers are doubles
  if type(v) == "number" and v % 1 == 0 then return v end
end

local function key_string(v)
  if type(v) == "string" then return v end
  if type(v) == "number" then
    local i = tointeger(v)
    if i then return ("%d"):format(i) end
  end
  return tostring(v)
end

local function default_key_of(event)
  local id = event.stream and event.stream:match("^[^-]*%-(.+)$")
  return id
end

local function fail(kind, message, fields)
  return nil, core.error(kind, message, fields)
end

-- base64url for cursors (keeps them safe in URLs).
local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local function b64encode(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local chars = 4 - (b and 0 or 1) - (c and 0 or 1)
    for j = 1, chars do
      local shift = (4 - j) * 6
      local idx = math.floor(n / 2 ^ shift) % 64
      out[#out + 1] = B64:sub(idx + 1, idx + 1)
    end
  end
  return table.concat(out)
end
local B64INV = {}
for i = 1, 64 do B64INV[B64:sub(i, i)] = i - 1 end
local function b64decode(s)
  local out, n, bits = {}, 0, 0
  for i = 1, #s do
    local v = B64INV[s:sub(i, i)]
    if not v then return nil end
    n = n * 64 + v
    bits = bits + 6
    if bits >= 8 then
      bits = bits - 8
      local byte = math.floor(n / 2 ^ bits)
      out[#out + 1] = string.char(byte)
      n = n - byte * 2 ^ bits
    end
  end
  return table.concat(out)
end

-- Memory backend ---------------------------------------------------------------

-- Rows of memory stores: mem[store][table name][key string] = row.
local mem = setmetatable({}, { __mode = "k" })

local function mem_tables(store)
  local t = mem[store]
  if not t then t = {}; mem[store] = t end
  return t
end
M._mem_tables = mem_tables

local is_memory = util.is_memory

M.core = core
M.json = json
M.DELETE = DELETE
M.IDENT = IDENT
M.TYPES = TYPES
M.INTEGER_TYPES = INTEGER_TYPES
M.valid_ident = valid_ident
M.quote = quote
M.short_ident = short_ident
M.normalize_type = normalize_type
M.util = util
M.deep_copy = deep_copy
M.tointeger = tointeger
M.key_string = key_string
M.default_key_of = default_key_of
M.fail = fail
M.b64encode = b64encode
M.b64decode = b64decode
M.mem_tables = mem_tables
M.is_memory = is_memory

return M
