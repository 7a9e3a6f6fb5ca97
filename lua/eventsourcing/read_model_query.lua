-- eventsourcing.read_model_query: get, find (keyset paging with opaque
-- cursors) and clear, on both stores.
local base = require "eventsourcing.read_model_base"

local json, quote, deep_copy, key_string = base.json, base.quote, base.deep_copy, base.key_string
local fail, b64encode, b64decode, mem_tables = base.fail, base.b64encode, base.b64decode, base.mem_tables
local is_memory = base.is_memory

local ReadModel = {}   -- methods read_model takes in

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
  if self.types[order_by] == "json" then
    error(("read_model:find: order_by %q is a json column of %s, which has no order")
      :format(order_by, self.name), 2)
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
      elseif self.types[c] == "json" then   -- json has no equality: as jsonb
        conds[#conds + 1] = ("%s::jsonb = %s::jsonb"):format(quote(c), p(v))
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

return ReadModel
