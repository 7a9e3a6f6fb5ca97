-- eventsourcing.read_model: tables kept up to date from events.
--
--   local Orders = es.read_model {
--     name    = "rm_orders",                 -- table name: ^[a-z_][a-z0-9_]*$
--     key     = "id",                        -- primary key column (default "id")
--     columns = { id = "text", customer_id = "text", total = "bigint", ... },
--     indexes = { "customer_id", { "customer_id", "created_at" },
--                 { columns = { "email" }, unique = true } },
--     on = {
--       OrderCreated = function(row, event) row.customer_id = event.data.customer_id end,
--       OrderDeleted = function(row, event) return es.read_model.DELETE end,
--     },
--     key_of = function(event) return ... end,   -- default: the stream after its first "-"
--   }
--
-- Handlers: on[type](row, event) gets the current row (or, for a key with no
-- row yet, a new table holding only the key) and changes it in place.
-- It returns nothing to keep the row, es.read_model.DELETE to delete it,
-- or a table to replace it (the key column is always set back to the key).
-- Events whose type has no handler, or for which key_of returns nil, are
-- skipped. Handlers must be deterministic and do no I/O: a batch may be
-- applied again after a rollback.
--
-- Column values in Lua: text/uuid/numeric/date -> strings, integer types ->
-- integers, double precision/real -> numbers, boolean -> booleans, jsonb ->
-- tables (es.json shapes), timestamptz -> ISO-8601 UTC strings with
-- microseconds ("2026-01-15T10:00:00.123456Z", like event.recorded_at).
--
-- Queries (both stores; memory stores keep the rows in Lua tables):
--   Orders:get(store, key)                         -> row | nil | nil, err
--   Orders:find(store, where, { order_by = "created_at", desc = true,
--                               limit = 50, after = cursor })
--                                                  -> rows, next_cursor | nil, err
--   `where` is a table of column = value equalities; paging is keyset paging
--   on (order_by, key): pass the returned next_cursor (an opaque string, nil
--   on the last page) as `after`. NULL order_by values sort last ascending,
--   first descending (PostgreSQL's defaults), on both stores.
--
-- Inline read models (updated in the appending transaction):
--   store:begin(); store:append(...); read_model.apply_inline(store, { Orders }, events);
--   store:commit()
local core = require "eventsourcing.core"

local json = core.json
local M = {}

local DELETE = setmetatable({}, { __tostring = function() return "es.read_model.DELETE" end })
M.DELETE = DELETE

local IDENT = "^[a-z_][a-z0-9_]*$"

local TYPES = {
  text = "text", varchar = "text", bigint = "bigint", int8 = "bigint",
  integer = "integer", int = "integer", int4 = "integer", smallint = "smallint",
  int2 = "smallint", numeric = "numeric", boolean = "boolean", bool = "boolean",
  jsonb = "jsonb", json = "jsonb", timestamptz = "timestamptz",
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

-- Definition ----------------------------------------------------------------

local ReadModel = {}
ReadModel.__index = ReadModel
M.ReadModel = ReadModel

function M.new(def)
  if type(def) ~= "table" then error("es.read_model: expected a definition table", 2) end
  local name = def.name
  if not valid_ident(name) then
    error(("es.read_model: name %q must match %s and be at most 63 bytes")
      :format(tostring(name), IDENT), 2)
  end
  local key = def.key or "id"
  if type(def.columns) ~= "table" then
    error(("es.read_model %s: columns must be a table { column = type }"):format(name), 2)
  end
  local columns, types = {}, {}
  for col, t in pairs(def.columns) do
    if not valid_ident(col) then
      error(("es.read_model %s: column name %q must match %s"):format(name, tostring(col), IDENT), 2)
    end
    local nt = normalize_type(t)
    if not nt then
      error(("es.read_model %s: column %s has type %q, not one of text, bigint, integer, "
        .. "smallint, numeric[(p,s)], boolean, jsonb, timestamptz, date, uuid, "
        .. "double precision, real"):format(name, col, tostring(t)), 2)
    end
    columns[#columns + 1] = col
    types[col] = nt
  end
  table.sort(columns, function(a, b)
    if a == key then return b ~= key end
    if b == key then return false end
    return a < b
  end)
  if not types[key] then
    error(("es.read_model %s: key column %q is not among the columns"):format(name, tostring(key)), 2)
  end
  local indexes = {}
  for i, ix in ipairs(def.indexes or {}) do
    local cols, unique
    if type(ix) == "string" then cols = { ix }
    elseif type(ix) == "table" and ix.columns then cols, unique = ix.columns, ix.unique and true
    elseif type(ix) == "table" then cols = ix
    else error(("es.read_model %s: index %d must be a column name or a list of them"):format(name, i), 2) end
    if #cols == 0 then error(("es.read_model %s: index %d has no columns"):format(name, i), 2) end
    for _, c in ipairs(cols) do
      if not types[c] then
        error(("es.read_model %s: index %d names unknown column %q"):format(name, i, tostring(c)), 2)
      end
    end
    indexes[#indexes + 1] = { columns = cols, unique = unique or false,
      suffix = table.concat(cols, "_") .. (unique and "_key" or "_idx") }
  end
  local on = {}
  for t, f in pairs(def.on or {}) do
    if type(t) ~= "string" or type(f) ~= "function" then
      error(("es.read_model %s: on.%s must be a function(row, event)"):format(name, tostring(t)), 2)
    end
    on[t] = f
  end
  if def.key_of ~= nil and type(def.key_of) ~= "function" then
    error(("es.read_model %s: key_of must be a function(event)"):format(name), 2)
  end
  -- how _clean treats each column: "int", "ts" or false
  local treat = {}
  for i, c in ipairs(columns) do
    treat[i] = INTEGER_TYPES[types[c]] and "int" or types[c] == "timestamptz" and "ts" or false
  end
  return setmetatable({
    kind = "read_model",
    name = name, key = key, columns = columns, types = types, treat = treat,
    indexes = indexes, on = on, key_of = def.key_of or default_key_of,
  }, ReadModel)
end

function ReadModel:__tostring() return "read model " .. self.name end

-- Memory backend ---------------------------------------------------------------

-- Rows of memory stores: mem[store][table name][key string] = row.
local mem = setmetatable({}, { __mode = "k" })

local function mem_tables(store)
  local t = mem[store]
  if not t then t = {}; mem[store] = t end
  return t
end
M._mem_tables = mem_tables

function ReadModel:_mem_rows(store, tbl)
  local tables = mem_tables(store)
  tbl = tbl or self.name
  local rows = tables[tbl]
  if not rows then rows = {}; tables[tbl] = rows end
  return rows
end

local is_memory = util.is_memory

-- SQL pieces -----------------------------------------------------------------

function ReadModel:_qualified(store, tbl)
  return quote(store:schema()) .. "." .. quote(tbl or self.name)
end

function ReadModel:_select_list()
  if self._sel then return self._sel end
  local parts = {}
  for _, c in ipairs(self.columns) do
    if self.types[c] == "timestamptz" then
      parts[#parts + 1] = util.ts_sql(quote(c))
    else
      parts[#parts + 1] = quote(c)
    end
  end
  self._sel = table.concat(parts, ", ")
  return self._sel
end

function ReadModel:_create_sql(store, tbl)
  local cols = {}
  for _, c in ipairs(self.columns) do
    cols[#cols + 1] = quote(c) .. " " .. self.types[c] .. (c == self.key and " NOT NULL" or "")
  end
  cols[#cols + 1] = ("CONSTRAINT %s PRIMARY KEY (%s)"):format(quote(short_ident(tbl .. "_pkey")), quote(self.key))
  return ("CREATE TABLE IF NOT EXISTS %s (%s)"):format(self:_qualified(store, tbl), table.concat(cols, ", "))
end

function ReadModel:_index_sqls(store, tbl)
  local out = {}
  for _, ix in ipairs(self.indexes) do
    local qc = {}
    for _, c in ipairs(ix.columns) do qc[#qc + 1] = quote(c) end
    out[#out + 1] = ("CREATE %sINDEX IF NOT EXISTS %s ON %s (%s)"):format(ix.unique and "UNIQUE " or "",
      quote(short_ident(tbl .. "_" .. ix.suffix)), self:_qualified(store, tbl), table.concat(qc, ", "))
  end
  return out
end

-- Renames the primary key and the indexes of table `from` (now called
-- self.name) to the names migrate would give them. SQL statements.
function ReadModel:_rename_index_sqls(store, from)
  local schema = quote(store:schema())
  local out = {
    ("ALTER TABLE %s RENAME CONSTRAINT %s TO %s"):format(self:_qualified(store),
      quote(short_ident(from .. "_pkey")), quote(short_ident(self.name .. "_pkey"))),
  }
  for _, ix in ipairs(self.indexes) do
    out[#out + 1] = ("ALTER INDEX %s.%s RENAME TO %s"):format(schema,
      quote(short_ident(from .. "_" .. ix.suffix)), quote(short_ident(self.name .. "_" .. ix.suffix)))
  end
  return out
end

local function exec_all(store, sqls)
  for _, sql in ipairs(sqls) do
    local ok, err = store:query(sql)
    if not ok then return nil, err end
  end
  return true
end
M._exec_all = exec_all

-- Creates the table (key = primary key) and its indexes; idempotent.
-- Run inside a transaction holding the projections' migration lock by
-- the projector; callable directly too.
function ReadModel:migrate(store, tbl)
  if is_memory(store) then self:_mem_rows(store, tbl); return true end
  tbl = tbl or self.name
  local ok, err = store:query(self:_create_sql(store, tbl))
  if not ok then return nil, err end
  return exec_all(store, self:_index_sqls(store, tbl))
end

-- Loading and writing rows -------------------------------------------------------

-- Makes a clean row (declared columns only, integers for integer columns;
-- on memory stores instants in the form PostgreSQL gives them back).
function ReadModel:_clean(row, memory)
  local out, columns, treat, null = {}, self.columns, self.treat, json.null
  for i = 1, #columns do
    local c = columns[i]
    local v = row[c]
    if v ~= nil and v ~= null then
      local how = treat[i]
      if how == "int" then
        if type(v) == "number" then v = tointeger(v) or v end
      elseif how == "ts" and memory and type(v) == "string" then
        local t = util.iso_epoch(v)
        if t then v = util.iso(t) end
      end
      out[c] = v
    end
  end
  return out
end

local function keys_param(keys)
  local arr = json.array({})
  for i, k in ipairs(keys) do arr[i] = k end
  return arr
end

-- Loads the rows of `keys` (array of key strings) -> map key string -> row.
function ReadModel:_load(store, tbl, keys)
  local found = {}
  if #keys == 0 then return found end
  if is_memory(store) then
    local rows = self:_mem_rows(store, tbl)
    for _, k in ipairs(keys) do
      local r = rows[k]
      if r then found[k] = deep_copy(r) end
    end
    return found
  end
  -- statements are cached per schema and table: one read model may serve
  -- stores of several schemas
  local ck = store:schema() .. "." .. (tbl or self.name)
  local sql = self._load_sql and self._load_sql[ck]
  if not sql then
    self._load_sql = self._load_sql or {}
    sql = ("SELECT %s FROM %s WHERE %s IN (SELECT k::%s FROM jsonb_array_elements_text($1::jsonb) AS k)")
      :format(self:_select_list(), self:_qualified(store, tbl), quote(self.key), self.types[self.key])
    self._load_sql[ck] = sql
  end
  local res, err = store:query(sql, keys_param(keys))
  if not res then return nil, err end
  local key = self.key
  for _, r in ipairs(res) do found[key_string(r[key])] = r end
  return found
end

-- Writes the final state of touched rows: upserts (array of rows) and
-- deletes (array of key strings); one statement.
-- The rows as JSON, checked on both stores: a row that cannot be stored
-- (NaN, a function) is an error the caller records, not a raise that
-- strands its transaction, and memory stores refuse what PostgreSQL does.
function ReadModel:_encode_rows(upserts)
  local ups = json.array({})
  for i, r in ipairs(upserts) do ups[i] = r end
  local text, eerr = json.encode(ups)
  if not text then
    return nil, core.error("invalid", ("%s: a row cannot be stored: %s")
      :format(self.name, eerr.message))
  end
  return text
end

function ReadModel:_write(store, tbl, upserts, deletes)
  if #upserts == 0 and #deletes == 0 then return true end
  local text, eerr = self:_encode_rows(upserts)
  if not text then return nil, eerr end
  if is_memory(store) then
    local rows = self:_mem_rows(store, tbl)
    for _, k in ipairs(deletes) do rows[k] = nil end
    for _, r in ipairs(upserts) do rows[key_string(r[self.key])] = r end
    return true
  end
  local ck = store:schema() .. "." .. (tbl or self.name)
  local sql = self._write_sql and self._write_sql[ck]
  if not sql then
    self._write_sql = self._write_sql or {}
    local q = self:_qualified(store, tbl)
    local cols, sets = {}, {}
    for _, c in ipairs(self.columns) do
      cols[#cols + 1] = quote(c)
      if c ~= self.key then sets[#sets + 1] = quote(c) .. " = excluded." .. quote(c) end
    end
    local collist = table.concat(cols, ", ")
    sql = ("WITH d AS (DELETE FROM %s WHERE %s IN (SELECT k::%s FROM jsonb_array_elements_text($2::jsonb) AS k)), "
      .. "u AS (INSERT INTO %s (%s) SELECT %s FROM json_populate_recordset(NULL::%s, $1::json) "
      .. "ON CONFLICT (%s) DO %s) SELECT 1 AS ok")
      :format(q, quote(self.key), self.types[self.key], q, collist, collist, q, quote(self.key),
        #sets > 0 and ("UPDATE SET " .. table.concat(sets, ", ")) or "NOTHING")
    self._write_sql[ck] = sql
  end
  local res, err = store:query(sql, text, keys_param(deletes))
  if not res then return nil, err end
  return true
end

-- Applies events[1..n] to the rows of table `tbl` and writes the touched
-- rows once. Returns true, handled | false, index, message (a handler
-- raised at events[index]; nothing was written) | nil, err (store error).
-- opts.seen: a set of key strings that may exist in tbl (rebuild into a
-- fresh table: keys outside it are not looked up); opts.mark_seen.
function ReadModel:_apply(store, tbl, events, n, opts)
  local on, key_of, keyc = self.on, self.key_of, self.key
  local seen = opts and opts.seen
  local memory = is_memory(store)
  -- 1. keys the batch touches
  local ev_keys, keys, kset = {}, {}, {}
  -- the default key_of depends on the stream only: once per stream
  local memo = key_of == default_key_of and {} or nil
  for i = 1, n do
    local e = events[i]
    if on[e.type] then
      local ok, k = true
      if memo then
        k = memo[e.stream]
        if k == nil then
          k = default_key_of(e) or false
          memo[e.stream] = k
        end
        if k == false then k = nil end
      else
        ok, k = pcall(key_of, e)
      end
      if not ok then return false, i, "key_of: " .. tostring(k) end
      if k ~= nil then
        local ks = key_string(k)
        ev_keys[i] = ks
        if not kset[ks] then
          kset[ks] = k
          if not seen or seen[ks] then keys[#keys + 1] = ks end
        end
      end
    end
  end
  -- 2. current rows, one query
  local rows, err = self:_load(store, tbl, keys)
  if not rows then return nil, err end
  local existed = {}
  for ks in pairs(rows) do existed[ks] = true end
  -- 3. handlers
  local state = {}        -- key string -> row | DELETE
  local handled = 0
  for i = 1, n do
    local ks = ev_keys[i]
    if ks then
      local e = events[i]
      local row = state[ks]
      if row == nil or row == DELETE then
        row = (row == nil) and rows[ks] or nil
        if not row then row = { [keyc] = kset[ks] } end
      end
      local ok, res = pcall(on[e.type], row, e)
      if not ok then return false, i, tostring(res) end
      if res == DELETE then
        state[ks] = DELETE
      else
        if type(res) == "table" then row = res end
        row[keyc] = kset[ks]
        state[ks] = row
      end
      handled = handled + 1
    end
  end
  -- 4. write each touched row once
  local upserts, deletes = {}, {}
  for ks, row in pairs(state) do
    if row == DELETE then
      if existed[ks] then deletes[#deletes + 1] = ks end
    else
      upserts[#upserts + 1] = self:_clean(row, memory)
      if seen then seen[ks] = true end
    end
  end
  if opts and opts.dry_run then
    local text, eerr = self:_encode_rows(upserts)
    if not text then return nil, eerr end
    return true, handled
  end
  local ok, werr = self:_write(store, tbl, upserts, deletes)
  if not ok then return nil, werr end
  return true, handled
end

-- Queries -------------------------------------------------------------------------

function ReadModel:get(store, key)
  if key == nil then error("read_model:get: key is required", 2) end
  if is_memory(store) then
    local r = self:_mem_rows(store)[key_string(key)]
    return r and deep_copy(r) or nil
  end
  self._get_sql = self._get_sql or {}
  local schema = store:schema()
  local sql = self._get_sql[schema]
  if not sql then
    sql = ("SELECT %s FROM %s WHERE %s = $1::%s"):format(self:_select_list(),
      self:_qualified(store), quote(self.key), self.types[self.key])
    self._get_sql[schema] = sql
  end
  local res, err = store:query(sql, key_string(key))
  if not res then return nil, err end
  return res[1]
end

local function encode_cursor(order_by, value, key)
  return b64encode(json.encode({ o = order_by, v = value == nil and json.null or value, k = key }))
end

local function decode_cursor(s, order_by)
  if type(s) ~= "string" then return nil end
  local text = b64decode(s)
  if not text then return nil end
  local ok, t = pcall(json.decode, text)
  if not ok or type(t) ~= "table" or t.o ~= order_by or t.k == nil then return nil end
  if t.v == json.null then t.v = nil end
  return t
end

-- Orders a, b like PostgreSQL: ascending with NULLs last; descending with
-- NULLs first; ties by key in the same direction.
local function less(a, b)
  if type(a) == type(b) then return a < b end
  return tostring(a) < tostring(b)
end

function ReadModel:find(store, where, opts)
  where = where or {}
  opts = opts or {}
  if type(where) ~= "table" then error("read_model:find: where must be a table", 2) end
  local order_by = opts.order_by or self.key
  if not self.types[order_by] then
    error(("read_model:find: order_by %q is not a column of %s"):format(tostring(order_by), self.name), 2)
  end
  local desc = opts.desc and true or false
  local limit = opts.limit or 100
  if type(limit) ~= "number" or limit < 1 or limit % 1 ~= 0 then
    error("read_model:find: limit must be a positive integer", 2)
  end
  local wcols = {}
  for c in pairs(where) do
    if not self.types[c] then
      error(("read_model:find: %q is not a column of %s"):format(tostring(c), self.name), 2)
    end
    wcols[#wcols + 1] = c
  end
  table.sort(wcols)
  local cursor
  if opts.after ~= nil then
    cursor = decode_cursor(opts.after, order_by)
    if not cursor then return fail("invalid", "find: 'after' is not a cursor of this query", { field = "after" }) end
  end
  local key, by_key = self.key, order_by == self.key
  local rows
  if is_memory(store) then
    rows = {}
    for _, r in pairs(self:_mem_rows(store)) do
      local match = true
      for _, c in ipairs(wcols) do
        local want = where[c]
        if want == json.null then want = nil end       -- IS NULL, as in SQL
        if r[c] ~= want then match = false; break end
      end
      if match then rows[#rows + 1] = r end
    end
    local function cmp(a, b)   -- true when a comes first
      local va, vb = a[order_by], b[order_by]
      if not by_key and va ~= vb then
        if va == nil then return desc end
        if vb == nil then return not desc end
        if desc then return less(vb, va) end
        return less(va, vb)
      end
      local ka, kb = a[key], b[key]
      if desc then return less(kb, ka) end
      return less(ka, kb)
    end
    table.sort(rows, cmp)
    local start = 1
    if cursor then
      local pivot = { [order_by] = cursor.v, [key] = cursor.k }
      start = #rows + 1
      for i, r in ipairs(rows) do
        if cmp(pivot, r) then start = i; break end
      end
    end
    local page = {}
    for i = start, math.min(#rows, start + limit) do page[#page + 1] = deep_copy(rows[i]) end
    rows = page
  else
    local params, conds = {}, {}
    local function p(v) params[#params + 1] = v; return "$" .. #params end
    for _, c in ipairs(wcols) do
      local v = where[c]
      if v == json.null then conds[#conds + 1] = quote(c) .. " IS NULL"
      else conds[#conds + 1] = ("%s = %s::%s"):format(quote(c), p(v), self.types[c]) end
    end
    local qo, qk = quote(order_by), quote(key)
    local ot, kt = self.types[order_by], self.types[key]
    local cmpop = desc and "<" or ">"
    if cursor then
      if by_key then
        conds[#conds + 1] = ("%s %s %s::%s"):format(qk, cmpop, p(cursor.k), kt)
      elseif cursor.v == nil then
        local kp = p(cursor.k)
        if desc then
          conds[#conds + 1] = ("(%s IS NOT NULL OR %s < %s::%s)"):format(qo, qk, kp, kt)
        else
          conds[#conds + 1] = ("(%s IS NULL AND %s > %s::%s)"):format(qo, qk, kp, kt)
        end
      else
        local vp, kp = p(cursor.v), p(cursor.k)
        conds[#conds + 1] = ("(%s %s %s::%s OR (%s = %s::%s AND %s %s %s::%s)%s)"):format(
          qo, cmpop, vp, ot, qo, vp, ot, qk, cmpop, kp, kt, desc and "" or (" OR " .. qo .. " IS NULL"))
      end
    end
    local dir = desc and " DESC" or ""
    local sql = ("SELECT %s FROM %s%s ORDER BY %s%s LIMIT %d"):format(self:_select_list(),
      self:_qualified(store), #conds > 0 and (" WHERE " .. table.concat(conds, " AND ")) or "",
      by_key and "" or (qo .. dir .. ", "), qk .. dir, limit + 1)
    local err
    rows, err = store:query(sql, (table.unpack or unpack)(params, 1, #params))
    if not rows then return nil, err end
  end
  local next_cursor
  if #rows > limit then
    rows[#rows] = nil
    local last = rows[#rows]
    next_cursor = encode_cursor(order_by, last[order_by], last[key])
  end
  return rows, next_cursor
end

-- Deletes every row (memory stores and specs); PostgreSQL: TRUNCATE.
function ReadModel:clear(store)
  if is_memory(store) then mem_tables(store)[self.name] = {}; return true end
  return store:query("TRUNCATE " .. self:_qualified(store))
end

-- Inline read models -----------------------------------------------------------------

local now_iso = util.now_iso

-- Applies `events` (the events just appended, each with at least stream,
-- type, data and version) to `read_models` in the store's CURRENT
-- transaction (PostgreSQL: call between store:begin() and store:commit(),
-- after the append). Events lacking recorded_at get the transaction's
-- now() (the recorded_at the appended events have). Memory stores apply
-- to their Lua tables at once. Returns true | nil, err; on nil, err the
-- caller rolls back (a handler error comes back as kind "invalid" with
-- fields read_model, type, stream, version).
function M.apply_inline(store, read_models, events, opts)
  if type(read_models) ~= "table" then error("apply_inline: read_models must be an array", 2) end
  if type(events) ~= "table" then error("apply_inline: events must be an array", 2) end
  if events.type then events = { events } end
  if #events == 0 or #read_models == 0 then return true end
  local missing = false
  for _, e in ipairs(events) do
    if e.recorded_at == nil then missing = true; break end
  end
  local list = events
  if missing then
    local at
    if is_memory(store) then
      at = now_iso()
    else
      local res, err = store:query("SELECT " .. util.ts_sql("now()", "at"))
      if not res then return nil, err end
      at = res[1].at
    end
    list = {}
    for i, e in ipairs(events) do
      local c = {}
      for k, v in pairs(e) do c[k] = v end
      if c.recorded_at == nil then c.recorded_at = at end
      if c.metadata == nil then c.metadata = {} end
      list[i] = c
    end
  end
  for _, rm in ipairs(read_models) do
    local ok, a, b = rm:_apply(store, rm.name, list, #list, opts)
    if ok == nil then return nil, a end
    if ok == false then
      local e = list[a]
      return fail("invalid", ("read model %s: handler for %s (stream %s, version %s) failed: %s")
        :format(rm.name, e.type, tostring(e.stream), tostring(e.version), b),
        { read_model = rm.name, type = e.type, stream = e.stream, version = e.version })
    end
  end
  return true
end

return setmetatable(M, { __call = function(_, def) return M.new(def) end })
