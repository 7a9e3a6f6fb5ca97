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
--     category = "Order",    -- optional: only streams "Order-..." are read (in SQL)
--     keys_by_stream = true, -- optional: each row's events come from one
--                            -- stream (a rebuild may use workers; implied by
--                            -- the default key_of with a category)
--     one_trip = true,       -- optional, with keys_by_stream: a repository
--                            -- with a state cache may keep this model's rows
--                            -- and run its handlers before the append, on
--                            -- copies of the events without recorded_at and
--                            -- position (see repository.lua, one_trip)
--     fillfactor = 50,       -- optional (10-100): the table's, kept by
--                            -- migrate and by rebuilds' fresh tables
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
-- integers, double precision/real -> numbers, boolean -> booleans, jsonb and
-- json -> tables (es.json shapes), timestamptz -> ISO-8601 UTC strings with
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
--
-- The work is split: read_model_base (identifiers, types, keys),
-- read_model_storage (the table or the Lua rows), read_model_query (get,
-- find, clear); this module defines read models and applies batches.
local base = require "eventsourcing.read_model_base"

local DELETE, IDENT, INTEGER_TYPES, valid_ident = base.DELETE, base.IDENT, base.INTEGER_TYPES, base.valid_ident
local quote, short_ident, normalize_type, util = base.quote, base.short_ident, base.normalize_type, base.util
local key_string, default_key_of, fail, mem_tables = base.key_string, base.default_key_of, base.fail, base.mem_tables
local is_memory = base.is_memory

local M = {}
M.DELETE, M.valid_ident, M.quote, M.short_ident = DELETE, valid_ident, quote, short_ident
M._mem_tables = mem_tables
M.default_key_of = default_key_of

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
        .. "smallint, numeric[(p,s)], boolean, jsonb, json, timestamptz, date, uuid, "
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
  if types[key] == "json" then
    error(("es.read_model %s: key column %q is json, which has no equality: use text or jsonb")
      :format(name, key), 2)
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
      if types[c] == "json" then
        error(("es.read_model %s: index %d names column %q, which is json (no btree index): use jsonb")
          :format(name, i, c), 2)
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
  if def.keys_by_stream ~= nil and type(def.keys_by_stream) ~= "boolean" then
    error(("es.read_model %s: keys_by_stream must be a boolean"):format(name), 2)
  end
  if def.one_trip ~= nil and type(def.one_trip) ~= "boolean" then
    error(("es.read_model %s: one_trip must be a boolean"):format(name), 2)
  end
  local ff = def.fillfactor
  if ff ~= nil and (type(ff) ~= "number" or ff % 1 ~= 0 or ff < 10 or ff > 100) then
    error(("es.read_model %s: fillfactor must be an integer from 10 to 100"):format(name), 2)
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
    category = util.category(def, "es.read_model " .. name),
    -- every row's events come from one stream: a rebuild may be spread
    -- over workers by stream partition (projector:rebuild workers)
    keys_by_stream = def.keys_by_stream or false,
    one_trip = def.one_trip or false,
    fillfactor = ff and math.floor(ff),
  }, ReadModel)
end

function ReadModel:__tostring() return "read model " .. self.name end

local clock = util.monotonic

local function add_time(timings, what, since)
  local t = clock()
  timings[what] = (timings[what] or 0) + (t - since)
  return t
end

-- Applies events[1..n] to the rows of table `tbl` and writes the touched
-- rows once. Returns true, handled | false, index, message (a handler
-- raised at events[index]; nothing was written) | nil, err (store error).
-- opts.seen: a set of key strings that may exist in tbl (rebuild into a
-- fresh table: keys outside it are not looked up); opts.mark_seen.
-- opts.record: an inline writer's batch (see _write).
-- opts.stage: the caller's transaction is open (a projector's batch): many
-- upserts may go through a staging table (see _write).
-- opts.timings: a table whose fields keys, load, handlers, build, encode,
-- write get the seconds spent in each step added (a rebuild's breakdown).
function ReadModel:_apply(store, tbl, events, n, opts)
  local on, key_of, keyc = self.on, self.key_of, self.key
  local seen = opts and opts.seen
  local timings = opts and opts.timings
  local t0 = timings and clock()
  local memory = is_memory(store)
  -- 1. keys the batch touches
  local ev_keys, keys, kset = {}, {}, {}
  -- the default key_of depends on the stream only: once per stream
  local memo = key_of == default_key_of and {} or nil
  for i = 1, n do
    local e = events[i]
    if on[e.type] then
      if memo then
        -- the key string of the stream (false: no key); a stream met
        -- before has its key in kset already
        local ks = memo[e.stream]
        if ks == nil then
          local k = default_key_of(e)
          ks = k ~= nil and key_string(k) or false
          memo[e.stream] = ks
          if ks and not kset[ks] then
            kset[ks] = k
            if not seen or seen[ks] then keys[#keys + 1] = ks end
          end
        end
        if ks then ev_keys[i] = ks end
      else
        local ok, k = pcall(key_of, e)
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
  end
  if timings then t0 = add_time(timings, "keys", t0) end
  -- 2. current rows, one query (or loaded already: opts.loaded, when it
  -- holds every key)
  local rows, err = opts and opts.loaded
  if rows then
    for _, ks in ipairs(keys) do
      if not rows.keys[ks] then rows = nil; break end
    end
  end
  if rows then rows = rows.rows
  else
    rows, err = self:_load(store, tbl, keys)
    if not rows then return nil, err end
  end
  if timings then t0 = add_time(timings, "load", t0) end
  local existed = {}
  for ks in pairs(rows) do existed[ks] = true end
  -- 3. handlers, all under one pcall (`at` says which event raised): a
  -- pcall per event cost a call frame each (1.1% of a Lua 5.4 rebuild's
  -- instructions under callgrind; no change measured on LuaJIT)
  local state = {}        -- key string -> row | DELETE
  local handled, at = 0, 0
  local ran, herr = pcall(function()
    for i = 1, n do
      local ks = ev_keys[i]
      if ks then
        local e = events[i]
        local row = state[ks]
        if row == nil or row == DELETE then
          row = (row == nil) and rows[ks] or nil
          if not row then row = { [keyc] = kset[ks] } end
        end
        at = i
        local res = on[e.type](row, e)
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
  end)
  if not ran then return false, at, tostring(herr) end
  if timings then t0 = add_time(timings, "handlers", t0) end
  -- 4. write each touched row once; into a fresh table (seen), rows of
  -- keys never written there before go in by COPY (no conflict possible);
  -- in a projector's batch (stage), so do the rows the load did not find
  -- (see the note on fresh rows below)
  local upserts, deletes = {}, {}
  local fresh = not memory and (seen or (opts and opts.stage))
  local news = fresh and {} or nil
  -- Rows for the COPY go as the handlers left them: it reads only the
  -- declared columns and writes integers as _clean would (_copy_opts);
  -- a cleaned copy of each cost a tenth of a catch-up's instructions.
  for ks, row in pairs(state) do
    if row == DELETE then
      if existed[ks] then deletes[#deletes + 1] = ks end
    else
      local new
      if seen then new = news and not seen[ks] else new = news and not existed[ks] end
      if new then news[#news + 1] = row else upserts[#upserts + 1] = self:_clean(row, memory) end
      if seen then seen[ks] = true end
    end
  end
  -- Fresh rows of a projector's batch: a plain COPY into the live table
  -- costs the server about two thirds of what staging them and merging
  -- with ON CONFLICT does (6.3 against 9.4 us a row, rm_orders). A row the
  -- load did not find can still appear before the COPY (an inline writer
  -- of the same read model commits it): the COPY then fails on the key,
  -- the projector rolls the batch back to its savepoint and applies it
  -- event by event, through the upsert. A few rows go the upsert's way
  -- (one statement, no COPY round trip).
  if news and not seen and #news < self._STAGE_MIN then
    for _, r in ipairs(news) do upserts[#upserts + 1] = self:_clean(r, memory) end
    news = nil
  end
  if opts and opts.dry_run then
    local text, eerr = self:_encode_rows(upserts)
    if not text then return nil, eerr end
    return true, handled
  end
  if timings then add_time(timings, "build", t0) end
  -- an inline batch that touched rows is recorded for a running rebuild
  -- by its write (see _write)
  local ok, werr = self:_write(store, tbl, upserts, deletes, timings, news, opts and opts.stage,
    opts and opts.defer, opts and opts.async, opts and opts.record and #keys > 0)
  if not ok then return nil, werr end
  return true, handled
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
  -- opts.unstamped: the events are not appended yet, and the caller
  -- watches whether a handler reads recorded_at (the repository's one
  -- round trip): nothing is filled in here
  local missing = false
  if not (opts and opts.unstamped) then
    for _, e in ipairs(events) do
      if e.recorded_at == nil then missing = true; break end
    end
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
  -- a rebuild running meanwhile must know this transaction wrote inline
  local aopts = { record = true }
  for k, v in pairs(opts or {}) do aopts[k] = v end
  -- opts.defer: the last write (if one statement) is left in it for the
  -- caller to run with its COMMIT (store:commit_with): one round trip less
  local defer = aopts.defer
  -- opts.loaded: { [read model] = { keys = set, rows = by key } } loaded
  -- already in this transaction (see repository's load ahead)
  local loaded = aopts.loaded
  for i, rm in ipairs(read_models) do
    aopts.defer = (i == #read_models) and defer or nil
    aopts.loaded = loaded and loaded[rm]
    local ok, a, b = rm:_apply(store, rm.name, list, #list, aopts)
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


local storage = require "eventsourcing.read_model_storage"
M._exec_all = storage._exec_all
storage._exec_all = nil
util.merge(ReadModel, storage)
util.merge(ReadModel, require "eventsourcing.read_model_query")

return setmetatable(M, { __call = function(_, def) return M.new(def) end })
