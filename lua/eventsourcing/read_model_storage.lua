-- eventsourcing.read_model_storage: where a read model's rows live: the
-- PostgreSQL table (DDL, one query to load a batch's rows, one to write
-- them) or, on memory stores, a Lua table.
local base = require "eventsourcing.read_model_base"

local core, json, quote, short_ident = base.core, base.json, base.quote, base.short_ident
local util, deep_copy, tointeger, key_string = base.util, base.deep_copy, base.tointeger, base.key_string
local mem_tables, is_memory = base.mem_tables, base.is_memory

local ReadModel = {}   -- methods read_model takes in

function ReadModel:_mem_rows(store, tbl)
  local tables = mem_tables(store)
  tbl = tbl or self.name
  local rows = tables[tbl]
  if not rows then rows = {}; tables[tbl] = rows end
  return rows
end

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

function ReadModel:_create_sql(store, tbl, fresh)
  local cols = {}
  for _, c in ipairs(self.columns) do
    cols[#cols + 1] = quote(c) .. " " .. self.types[c] .. (c == self.key and " NOT NULL" or "")
  end
  cols[#cols + 1] = ("CONSTRAINT %s PRIMARY KEY (%s)"):format(quote(short_ident(tbl .. "_pkey")), quote(self.key))
  -- a rebuild's shadow table must be new: never share one by accident
  return ("CREATE TABLE %s%s (%s)%s"):format(fresh and "" or "IF NOT EXISTS ", self:_qualified(store, tbl),
    table.concat(cols, ", "), self.fillfactor and (" WITH (fillfactor = %d)"):format(self.fillfactor) or "")
end

-- A table made before its definition asked for a fillfactor (or for
-- another one) gets it: pages filled from then on keep that much free.
function ReadModel:_set_fillfactor(store, tbl)
  if not self.fillfactor then return true end
  local name = self:_qualified(store, tbl)
  local rows, err = store:query("SELECT coalesce(array_to_string(reloptions, ','), '') AS o"
    .. " FROM pg_class WHERE oid = to_regclass($1)", name)
  if not rows then return nil, err end
  local want = "fillfactor=" .. self.fillfactor
  for o in (rows[1] and rows[1].o or ""):gmatch("[^,]+") do
    if o == want then return true end
  end
  return store:query(("ALTER TABLE %s SET (fillfactor = %d)"):format(name, self.fillfactor))
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

-- Rebuild markers (see eventsourcing.rebuild): while a rebuild of a read
-- model runs, its row in read_model_rebuilds is there, and every
-- transaction that updates the read model inline records its txid in
-- read_model_rebuild_writes, so the rebuild's swap can replay exactly the
-- inline transactions that committed after its watermark.
-- The record is made by the statement that writes the rows (or, when a
-- batch writes none, by a statement of its own), after the append, never
-- by the load: the rebuild waits only for transactions that had a
-- transaction id when its marker committed. A load sent ahead of the
-- append runs before its transaction has one, so a marker committed
-- between that load and the append was neither seen by the load nor
-- waited for; the write, whose transaction has its id, either sees the
-- marker or is waited for.
function ReadModel:_record_cte(store)
  local s = quote(store:schema())
  return ("rec AS (INSERT INTO %s.read_model_rebuild_writes (id, txid) SELECT id, pg_current_xact_id() "
    .. "FROM %s.read_model_rebuilds WHERE name = '%s' ON CONFLICT DO NOTHING)"):format(s, s, self.name)
end

local function marker_sqls(store)
  local s = quote(store:schema())
  return {
    ("CREATE TABLE IF NOT EXISTS %s.read_model_rebuilds (id text PRIMARY KEY, name text NOT NULL, "
      .. "txid xid8 NOT NULL, pid integer NOT NULL, started_at timestamptz NOT NULL DEFAULT now())"):format(s),
    ("CREATE TABLE IF NOT EXISTS %s.read_model_rebuild_writes (id text NOT NULL, txid xid8 NOT NULL, "
      .. "PRIMARY KEY (id, txid))"):format(s),
  }
end

function ReadModel._marker_sqls(store) return marker_sqls(store) end

-- Creates the table (key = primary key) and its indexes; idempotent.
-- Run inside a transaction holding the projections' migration lock by
-- the projector; callable directly too.
function ReadModel:migrate(store, tbl)
  if is_memory(store) then self:_mem_rows(store, tbl); return true end
  tbl = tbl or self.name
  local ok, err = exec_all(store, marker_sqls(store))
  if not ok then return nil, err end
  ok, err = store:query(self:_create_sql(store, tbl))
  if not ok then return nil, err end
  ok, err = self:_set_fillfactor(store, tbl)
  if not ok then return nil, err end
  return exec_all(store, self:_index_sqls(store, tbl))
end

-- Loading and writing rows -------------------------------------------------------

-- `<key> = ANY (...)` of the keys in the JSON array parameter $n. As an
-- array, not `IN (SELECT ...)`: the planner guesses 100 rows for a
-- set-returning function, which made a table of up to a few thousand rows
-- cheaper to scan whole than to probe 100 times (a seq scan per command);
-- an array is guessed at 10 keys, so the primary key is probed.
function ReadModel:_key_in(n)
  return ("%s = ANY (ARRAY(SELECT k::%s FROM jsonb_array_elements_text($%d::jsonb) AS k))")
    :format(quote(self.key), self.types[self.key], n)
end

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
  local res, err = store:query(self:_load_query(store, tbl, keys))
  if not res then return nil, err end
  return self:_found(res)
end

-- The rows of a load's result, by key string.
function ReadModel:_found(res)
  local found, key = {}, self.key
  for _, r in ipairs(res) do found[key_string(r[key])] = r end
  return found
end

-- The statement of _load and its parameter (PostgreSQL): for a caller
-- that sends it itself (the repository, ahead of its append). One key (an
-- inline command's row) is compared as a typed parameter: parsing a JSON
-- array of one key and building the array cost the server more than the
-- probe itself. An inline writer's transaction is recorded by its write,
-- not here (see the rebuild markers above).
function ReadModel:_load_query(store, tbl, keys)
  -- statements are cached per schema and table: one read model may serve
  -- stores of several schemas
  local one = #keys == 1
  local ck = store:schema() .. "." .. (tbl or self.name) .. (one and "=" or "")
  local sql = self._load_sql and self._load_sql[ck]
  if not sql then
    self._load_sql = self._load_sql or {}
    local where = one and ("%s = $1::%s"):format(quote(self.key), self.types[self.key]) or self:_key_in(1)
    sql = ("SELECT %s FROM %s WHERE %s"):format(self:_select_list(), self:_qualified(store, tbl), where)
    self._load_sql[ck] = sql
  end
  if one then return sql, keys[1] end
  return sql, keys_param(keys)
end

-- A json column keeps its text as written and find() compares it as
-- jsonb, so its values must be what jsonb can hold: a string with a NUL
-- byte, written \u0000, which PostgreSQL's json takes and jsonb does not,
-- is refused, as a jsonb column refuses it. A plain search first; the
-- full check (es.json.valid) only when the text spells "\u0000" (an
-- escaped backslash followed by "u0000" is no NUL).
local function holds_nul(text)
  return text:find("\\u0000", 1, true) ~= nil and not json.valid(text)
end

local function nul_refused(self)
  return nil, core.error("invalid", ("%s: a row cannot be stored: a string holds a NUL byte "
    .. "(\\u0000), which json columns, compared as jsonb, cannot hold"):format(self.name))
end

-- Whether any column is json (not jsonb).
function ReadModel:_has_json()
  local has = self._json_any
  if has == nil then
    has = false
    for _, c in ipairs(self.columns) do
      if self.types[c] == "json" then has = true end
    end
    self._json_any = has
  end
  return has
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
  if self:_has_json() and holds_nul(text) then return nul_refused(self) end
  return text
end

-- At least this many upserts in a transaction go through a staging table.
local STAGE_MIN = 200
ReadModel._STAGE_MIN = STAGE_MIN
local STAGE_NS = "6f1d7c52-3b8e-4a57-9a51-2f0c4e8d9b13"

-- The staging table of tbl: a temporary table (the session's own, gone
-- with it) shaped like tbl. Staged rows live only inside the caller's
-- transaction: a failure rolls them back with it, and the merge takes
-- them all out again.
function ReadModel:_stage_sqls(store, tbl)
  local ck = store:schema() .. "." .. (tbl or self.name)
  self._stage_sql = self._stage_sql or {}
  local st = self._stage_sql[ck]
  if st then return st end
  local q = self:_qualified(store, tbl)
  -- named after the columns too: a session's stage made for a table an
  -- older definition shaped (before a rebuild swapped in new columns) is
  -- never taken for this one
  local shape = {}
  for _, c in ipairs(self.columns) do shape[#shape + 1] = c .. " " .. self.types[c] end
  local tag = core.uuid5(STAGE_NS, table.concat(shape, ",")):sub(1, 8)
  local name = short_ident(("es_stage_%s_%s_%s"):format(store:schema(), tbl or self.name, tag))
  local collist, conflict = self:_upsert_parts()
  st = { name = name,
    -- ON COMMIT DELETE ROWS: truncated in place at each commit, so the
    -- dead rows of the merges' DELETEs never pile up (temporary tables
    -- get no autovacuum)
    create = ("CREATE TEMP TABLE IF NOT EXISTS %s (LIKE %s) ON COMMIT DELETE ROWS"):format(quote(name), q),
    merge = ("WITH d AS (DELETE FROM %s WHERE %s), "
      .. "s AS (DELETE FROM pg_temp.%s RETURNING %s) "
      .. "INSERT INTO %s (%s) SELECT %s FROM s %s")
      :format(q, self:_key_in(1), quote(name), collist, q, collist, collist, conflict) }
  self._stage_sql[ck] = st
  return st
end

-- copy_rows' options for this read model's rows: json/jsonb columns take
-- every value as JSON text (a string stays a JSON string), as the rows
-- written as JSON do; integer columns an integral float as an integer, as
-- _clean makes it (so rows go in as the handlers left them).
function ReadModel:_copy_opts(schema, wait)
  if not self._copy_json then
    local names, ints = {}, {}
    for i, c in ipairs(self.columns) do
      local t = self.types[c]
      if t == "json" or t == "jsonb" then names[#names + 1] = c end
      if self.treat[i] == "int" then ints[#ints + 1] = c end
    end
    self._copy_json, self._copy_ints = names, ints
  end
  return { schema = schema, json = self._copy_json, integers = self._copy_ints, wait = wait }
end

-- Many upserts of a transaction: COPY into the staging table, then one
-- statement deletes `deletes` and merges the staged rows (an upsert, as
-- the JSON path does) and empties the stage.
function ReadModel:_write_staged(store, tbl, upserts, deletes)
  local st = self:_stage_sqls(store, tbl)
  local ok, err = store:query(st.create)
  if not ok then return nil, err end
  ok, err = store:copy_rows(st.name, self.columns, upserts, self:_copy_opts("pg_temp"))
  if not ok then return nil, err end
  return store:query(st.merge, keys_param(deletes))
end

-- The quoted column list of an upsert and its ON CONFLICT clause (every
-- column but the key taken from the new row), for the staged merge and
-- the row writes alike.
function ReadModel:_upsert_parts()
  local cols, sets = {}, {}
  for _, c in ipairs(self.columns) do
    cols[#cols + 1] = quote(c)
    if c ~= self.key then sets[#sets + 1] = quote(c) .. " = excluded." .. quote(c) end
  end
  return table.concat(cols, ", "), ("ON CONFLICT (%s) DO %s"):format(quote(self.key),
    #sets > 0 and ("UPDATE SET " .. table.concat(sets, ", ")) or "NOTHING")
end

-- The statements that write rows (PostgreSQL), cached per schema and
-- table: `many`, any upserts and deletes as JSON (one parameter each);
-- `upsert`, upserts only, as JSON; typed[k] (see _typed_sql), a few
-- upserts as one typed parameter per column, which spares the server
-- json_populate_recordset's parsing and a DELETE that deletes nothing
-- (an inline command's usual write is one row). record: each also records
-- the transaction for a running rebuild (see the rebuild markers above).
function ReadModel:_write_sqls(store, tbl, record)
  local ck = store:schema() .. "." .. (tbl or self.name) .. (record and "+record" or "")
  local sqls = self._write_sql and self._write_sql[ck]
  if sqls then return sqls end
  self._write_sql = self._write_sql or {}
  local q = self:_qualified(store, tbl)
  local collist, conflict = self:_upsert_parts()
  local rec = record and (self:_record_cte(store) .. ", ") or ""
  sqls = {
    many = ("WITH %sd AS (DELETE FROM %s WHERE %s), "
      .. "u AS (INSERT INTO %s (%s) SELECT %s FROM json_populate_recordset(NULL::%s, $1::json) %s) "
      .. "SELECT 1 AS ok"):format(rec, q, self:_key_in(2), q, collist, collist, q, conflict),
    -- no deletes: no DELETE to plan and run, no empty array to parse
    upsert = ("%sINSERT INTO %s (%s) SELECT %s FROM json_populate_recordset(NULL::%s, $1::json) %s")
      :format(record and ("WITH " .. self:_record_cte(store) .. " ") or "", q, collist, collist, q, conflict),
    -- typed[k]: k rows' VALUES, made when first needed (_typed_sql)
    typed = {}, head = ("%sINSERT INTO %s (%s) VALUES "):format(
      record and ("WITH " .. self:_record_cte(store) .. " ") or "", q, collist), conflict = conflict,
    record = record and ("WITH %s SELECT 1 AS ok"):format(self:_record_cte(store)) or nil,
  }
  self._write_sql[ck] = sqls
  return sqls
end

-- At most this many upserts (and no deletes) go as typed parameters: one
-- statement per count is prepared per session. Five rm_orders rows cost
-- the server 77-88 us a transaction this way against 93-104 as JSON
-- (bench/rm_write.lua).
local TYPED_MAX = 8
ReadModel._TYPED_MAX = TYPED_MAX

-- The upsert of k rows by typed parameters (k * #columns of them).
function ReadModel:_typed_sql(sqls, k)
  local sql = sqls.typed[k]
  if sql then return sql end
  local columns, types, tuples = self.columns, self.types, {}
  for r = 0, k - 1 do
    local ps = {}
    for c = 1, #columns do ps[c] = ("$%d::%s"):format(r * #columns + c, types[columns[c]]) end
    tuples[r + 1] = "(" .. table.concat(ps, ", ") .. ")"
  end
  sql = sqls.head .. table.concat(tuples, ", ") .. " " .. sqls.conflict
  sqls.typed[k] = sql
  return sql
end

-- The upsert of one row by typed parameters that also gives the row back
-- as a load would (a caller that keeps it: the repository's state cache).
function ReadModel:_returning_sql(sqls)
  local sql = sqls.returning
  if not sql then
    sql = self:_typed_sql(sqls, 1) .. " RETURNING " .. self:_select_list()
    sqls.returning = sql
  end
  return sql
end

-- How each column's value goes as a typed parameter: "int" (integer
-- columns), "json" (jsonb: every value as JSON text, a string as a JSON
-- string), "plain json" (json: the same, without NUL bytes) or "num"
-- (other columns: a number as its JSON text), so that the typed write
-- stores what the JSON write stores.
function ReadModel:_param_kinds()
  local kinds = self._pkinds
  if kinds then return kinds end
  kinds = {}
  for i, c in ipairs(self.columns) do
    local t = self.types[c]
    kinds[i] = self.treat[i] == "int" and "int" or t == "jsonb" and "json"
      or t == "json" and "plain json" or "num"
  end
  self._pkinds = kinds
  return kinds
end

local function unstorable(self, v)
  local _, eerr = json.encode(v)
  return nil, core.error("invalid", ("%s: a row cannot be stored: %s")
    :format(self.name, eerr and eerr.message or ("a " .. type(v) .. " value")))
end

-- The typed parameters of a clean row (see _clean) into out[at + 1 ..
-- at + #columns] (nil: NULL) -> out | nil, err (a value no JSON can hold,
-- as _encode_rows refuses it).
function ReadModel:_row_params(row, out, at)
  local columns, kinds = self.columns, self:_param_kinds()
  out, at = out or {}, at or 0
  for i = 1, #columns do
    local v = row[columns[i]]
    local tv = type(v)
    if tv == "number" then
      if v ~= v or v == math.huge or v == -math.huge then return unstorable(self, v) end
      if kinds[i] ~= "int" then v = json.encode(v) end
    elseif tv == "string" then
      if kinds[i] == "json" or kinds[i] == "plain json" then
        -- a string no JSON can hold (not UTF-8) is refused, as the JSON
        -- write refuses it, never stored as NULL
        local text = json.encode(v)
        if not text then return unstorable(self, v) end
        if kinds[i] == "plain json" and holds_nul(text) then return nul_refused(self) end
        v = text
      end
    elseif tv == "table" then
      local text = json.encode(v)
      if not text then return unstorable(self, v) end
      if kinds[i] == "plain json" and holds_nul(text) then return nul_refused(self) end
      v = text
    elseif tv ~= "nil" and tv ~= "boolean" then
      return unstorable(self, v)
    end
    out[at + i] = v
  end
  return out
end

-- timings (a rebuild's breakdown): seconds added to "encode" and "write".
-- news: rows of keys the table cannot hold yet (a rebuild's fresh table),
-- copied in bulk (store:copy_rows; async: without waiting, the session's
-- next statement waits for it). stage: the caller's transaction is
-- open, so many upserts may be staged (_write_staged). defer: a table that
-- takes the one-statement write instead of running it ({ sql = ..., n,
-- params... }), for the caller to run with its COMMIT (store:commit_with);
-- with defer.rows set, a write of one row and no delete also gives that
-- row back as a load would (defer.returning is then true).
-- record: an inline writer's batch, recorded for a running rebuild by the
-- write (or, when nothing is written, by a statement of its own).
function ReadModel:_write(store, tbl, upserts, deletes, timings, news, stage, defer, async, record)
  if news and #news > 0 then
    local t0 = timings and util.monotonic()
    local n, cerr = store:copy_rows(tbl or self.name, self.columns, news, self:_copy_opts(nil, not async))
    if not n then return nil, cerr end
    if timings then timings.write = (timings.write or 0) + (util.monotonic() - t0) end
  end
  local memory = is_memory(store)
  if #upserts == 0 and #deletes == 0 then
    if not record or memory then return true end
    return self:_run_write(store, self:_write_sqls(store, tbl, true).record, { n = 0 }, defer)
  end
  if stage and #upserts >= STAGE_MIN and not memory then
    local t0 = timings and util.monotonic()
    local ok, serr = self:_write_staged(store, tbl, upserts, deletes)
    if not ok then return nil, serr end
    if timings then timings.write = (timings.write or 0) + (util.monotonic() - t0) end
    return true
  end
  local t0 = timings and util.monotonic()
  local typed = not memory and #deletes == 0 and #upserts <= TYPED_MAX
  local params, eerr
  if typed then
    local nc = #self.columns
    params = { n = #upserts * nc }
    for r = 1, #upserts do
      if params then params, eerr = self:_row_params(upserts[r], params, (r - 1) * nc) end
    end
  else
    params, eerr = self:_encode_rows(upserts)
    if params then params = { params, n = 2 } end
  end
  if not params then return nil, eerr end
  if timings then
    local t = util.monotonic()
    timings.encode = (timings.encode or 0) + (t - t0)
    t0 = t
  end
  if memory then
    local rows = self:_mem_rows(store, tbl)
    for _, k in ipairs(deletes) do rows[k] = nil end
    for _, r in ipairs(upserts) do rows[key_string(r[self.key])] = r end
    return true
  end
  local sqls = self:_write_sqls(store, tbl, record)
  local sql
  if typed and defer and defer.rows and #upserts == 1 then
    sql, defer.returning = self:_returning_sql(sqls), true
  elseif typed then
    sql = self:_typed_sql(sqls, #upserts)
  elseif #deletes == 0 then
    sql, params.n = sqls.upsert, 1
  else
    sql, params[2] = sqls.many, keys_param(deletes)
  end
  local ok, err = self:_run_write(store, sql, params, defer)
  if not ok then return nil, err end
  if timings then timings.write = (timings.write or 0) + (util.monotonic() - t0) end
  return true
end

-- Runs a write statement with params[1..params.n], or leaves it in defer.
function ReadModel._run_write(_, store, sql, params, defer)
  if defer then
    defer.sql, defer.n = sql, params.n
    for i = 1, params.n do defer[i] = params[i] end
    return true
  end
  local res, err = store:query(sql, (table.unpack or unpack)(params, 1, params.n))
  if not res then return nil, err end
  return true
end

ReadModel._exec_all = exec_all

return ReadModel
