-- eventsourcing.repository: loads aggregates from a store, runs commands,
-- appends their events with optimistic concurrency, keeps snapshots.
--
--   local repo = es.repository(store, { max_retries = 3 })
--   local r, err = repo:execute(Order, id, "AddItem", cmd, { metadata = { user = "u1" } })
--   -- r = { version, position, events, state }
--   local state, version = repo:load(Order, id)                  -- current
--   local state, version = repo:load(Order, id, { version = 3 }) -- as of version 3
--   local state, version = repo:load(Order, id, { at = "2026-01-15T10:00:00Z" })
--   local trail = repo:history(Order, id)
--
-- load of a stream that does not exist gives the initial state and version
-- 0 (not an error: callers decide what "not found" means). `at` means "as
-- recorded before that instant" (the store's `before`, exclusive).
local core = require "eventsourcing.core"
local aggregate = require "eventsourcing.aggregate"
local util = require "eventsourcing.util"
local read_model = require "eventsourcing.read_model"
local key_string = require("eventsourcing.read_model_base").key_string

local M = {}

local Repository = {}
Repository.__index = Repository

local uuid = core.uuid

local function check_aggregate(A, fname)
  if getmetatable(A) ~= aggregate.Aggregate then
    error(("repository:%s: expected an aggregate (es.aggregate{...}), got %s")
      :format(fname, type(A)), 3)
  end
end

-- es.repository(store, opts): opts.max_retries (default 3): how many times
-- execute reloads and decides again after a conflict before returning it;
-- opts.snapshots = false turns snapshots off for this repository;
-- opts.metadata: default metadata for every event (e.g. { service = "x" }).
-- opts.read_models: read models updated inline, in the same transaction as
-- the append (immediately consistent; do not also give them to a
-- projector). Memory stores have no transactions: the rows are updated
-- right after the append. Inside a transaction of the caller's
-- (store:begin() before execute) they are written in it, which stays open.
-- opts.cache: a state cache (es.state_cache{...}, or any object with get
-- and set; see state_cache.lua). execute then starts from the state the
-- last committed command on that stream left there, without reading the
-- stream. The append expects that state's version and last event (its
-- id), so a state that is not the stream's head (another writer went
-- first; or, after a restore, the stream reached that version again
-- with other events) fails it: the entry
-- is dropped and the stream read, as without a cache (not counted in
-- max_retries; a writer met in the act of appending the same version is a
-- retry as before). A refusal, a no-op or a mismatch with the caller's
-- expected_version is decided again from the stream before it is
-- answered. Inside the caller's transaction the cache is not used. Only
-- states JSON gives back as they are get cached (keeps_shape). With one
-- inline read model keyed by stream, its row is kept too, and a command
-- whose row is there goes in one round trip (see one_trip). load,
-- history and time travel always read the store. Keys are stream names:
-- a cache belongs to one store (one database and schema).
function M.new(store, opts)
  if store == nil then error("es.repository: a store is required", 2) end
  opts = opts or {}
  if type(opts) ~= "table" then error("es.repository: opts must be a table", 2) end
  local retries = opts.max_retries or 3
  if type(retries) ~= "number" or retries < 0 or retries % 1 ~= 0 then
    error("es.repository: max_retries must be a non-negative integer", 2)
  end
  if opts.metadata ~= nil and type(opts.metadata) ~= "table" then
    error("es.repository: metadata must be a table", 2)
  end
  if opts.read_models ~= nil and type(opts.read_models) ~= "table" then
    error("es.repository: read_models must be an array of read models", 2)
  end
  local cache = opts.cache
  if cache ~= nil and (type(cache) ~= "table" or type(cache.get) ~= "function"
      or type(cache.set) ~= "function") then
    error("es.repository: cache must have get and set methods (es.state_cache{...})", 2)
  end
  return setmetatable({
    store = store,
    max_retries = retries,
    snapshots = opts.snapshots ~= false,
    metadata = opts.metadata,
    read_models = opts.read_models and #opts.read_models > 0 and opts.read_models or nil,
    cache = cache,
    stats = { loads = 0, events_folded = 0, snapshots_used = 0,
              snapshots_saved = 0, retries = 0, cache_hits = 0, cache_stale = 0,
              one_trips = 0 },
    short = {}, n_short = 0,   -- see note_short
  }, Repository)
end

local function uses_snapshots(self, A)
  return self.snapshots and A.snapshot_every ~= nil
    and self.store.load_snapshot ~= nil
end

-- Streams this repository last loaded whole, without a snapshot, at fewer
-- than snapshot_every events: none can have a snapshot yet unless another
-- writer took it past that since, so their next load skips the snapshot
-- query (one round trip of every command and query on a short stream).
-- A stream that did grow is folded from its start once (the same state,
-- a snapshot only saves time) and leaves the set. Bounded: cleared when full.
local SHORT_MAX = 10000

local function note_short(self, stream, short)
  local set = self.short
  if short then
    if not set[stream] then
      if self.n_short >= SHORT_MAX then
        set = {}
        self.short, self.n_short = set, 0
      end
      set[stream] = true
      self.n_short = self.n_short + 1
    end
  elseif set[stream] then
    set[stream] = nil
    self.n_short = self.n_short - 1
  end
end

-- The last event of a stream recorded before instant `at` (any time when
-- nil): the event, false when there is none, or nil, err. A read that
-- fails on its first page raises from the iterator; that is an error
-- to return too, not to raise.
local function last_event(store, stream, at)
  local it, err = store:read(stream, { backward = true, limit = 1, before = at })
  if not it then return nil, err end
  local ok, e = pcall(it)
  if not ok then return nil, e end
  return e or false
end

-- The version of the last event recorded before instant `at` (0: none).
local function version_before(store, stream, at)
  local e, err = last_event(store, stream, at)
  if e == nil then return nil, err end
  return e and e.version or 0
end

-- Internal load: state, version, snapshot_version_used (0 if none), and
-- the id of the last event folded (nil when none was: the stream is empty,
-- or a snapshot was its head).
local function load(self, A, stream, opts)
  local store = self.store
  local max_version = opts and opts.version
  if opts and opts.at ~= nil then
    if type(opts.at) ~= "string" then
      error("repository:load: option 'at' must be an ISO-8601 string", 3)
    end
    local v, err = version_before(store, stream, opts.at)
    if not v then return nil, err end
    if max_version == nil or v < max_version then max_version = v end
    if max_version == 0 then return A:initial(), 0, 0 end
  end
  if max_version ~= nil then
    if type(max_version) ~= "number" or max_version % 1 ~= 0 then
      error("repository:load: option 'version' must be an integer", 3)
    end
    if max_version <= 0 then return A:initial(), 0, 0 end
  end
  local state, from, snap_version = nil, 1, 0
  local snapshots = uses_snapshots(self, A)
  local whole = snapshots and max_version == nil
  if snapshots and not (whole and self.short[stream]) then
    local snap, err = store:load_snapshot(stream,
      { max_version = max_version, schema_version = A.snapshot_version })
    if snap then
      if snap.schema_version == A.snapshot_version and type(snap.state) == "table" then
        state, from, snap_version = snap.state, snap.version + 1, snap.version
        self.stats.snapshots_used = self.stats.snapshots_used + 1
      end
    elseif err ~= nil then
      return nil, err
    end
  end
  if state == nil then state = A:initial() end
  local version, last_id
  state, version, last_id = store:fold(stream, A.handlers, state, { from = from, to = max_version })
  if state == nil then return nil, version end
  if whole then note_short(self, stream, snap_version == 0 and version < A.snapshot_every) end
  self.stats.loads = self.stats.loads + 1
  self.stats.events_folded = self.stats.events_folded + (version - from + 1)
  return state, version, snap_version, last_id
end

-- repo:load(A, id, { version = n } | { at = iso }) -> state, version | nil, err
function Repository:load(A, id, opts)
  check_aggregate(A, "load")
  if opts ~= nil and type(opts) ~= "table" then
    error("repository:load: opts must be a table", 2)
  end
  local state, version = load(self, A, A:stream(id), opts)
  return state, version
end

-- Does the loaded version satisfy the caller's expected_version?
local function expectation_met(expected, version)
  if expected == nil or expected == "any" then return true end
  if expected == "no_stream" then return version == 0 end
  if expected == "stream_exists" then return version > 0 end
  return expected == version
end

local merge = util.merge

-- Save a snapshot once at least snapshot_every events accrued since the
-- last one. The state is rebuilt by a fresh load (from the previous
-- snapshot) so that it is exactly what a later load would compute,
-- including anything apply handlers take from stored fields (recorded_at).
local function maybe_snapshot(self, A, stream, version, snap_version)
  if not uses_snapshots(self, A) or not self.store.save_snapshot then return end
  if version - snap_version < A.snapshot_every then return end
  local state, v = load(self, A, stream, { version = version })
  if not state or v ~= version then return end
  local ok, err = self.store:save_snapshot(stream, {
    version = version, schema_version = A.snapshot_version, state = state })
  if ok then
    self.stats.snapshots_saved = self.stats.snapshots_saved + 1
  end
  return err
end

-- The appended events as the store recorded them: recorded_at from the
-- append's result, so apply handlers and read models see what a later
-- read would.
local function stamp(out, res)
  for _, e in ipairs(out) do e.recorded_at = res.recorded_at end
  out[#out].position = res.position
end
M.stamp = stamp

-- The events a decide returned, as they will be appended: the command's
-- shared metadata under each event's own, the type's schema version,
-- an id (id_of(i) when given, else the event's own or a new UUID) and the
-- versions they will take. Also true when every id is a new UUID made
-- here: such an append cannot be the retry of an earlier one, so the
-- store need not look its ids up (store:append's new_ids).
function M.events_to_append(A, stream, version, base, events, id_of)
  local out, all_new = {}, true
  for i, e in ipairs(events) do
    local meta = merge(merge({}, base), e.metadata)
    local sv = A.schema_versions[e.type]
    if sv then meta.schema_version = sv end
    local id = (id_of and id_of(i)) or e.id
    if id == nil then id = uuid() else all_new = false end
    out[i] = { id = id, type = e.type,
               data = e.data or {}, metadata = meta, stream = stream,
               version = version + i }
  end
  return out, all_new
end

-- The rows an inline read model needs, asked for in front of the append
-- (store:query_ahead: the same round trip as BEGIN and the append) when
-- its keys follow from the events' streams alone (the default key_of).
-- Loading them before the append is safe: the fold came first, so a
-- command that changed this stream's row since would have taken the
-- version the append expects, and the append fails (a conflict) instead.
-- -> { rm, keys } (queued), false (not possible here) | nil, err.
local function load_ahead(self, store, out)
  local rms = self.read_models
  local rm = rms[1]
  if #rms ~= 1 or not store.query_ahead or rm.key_of ~= read_model.default_key_of then
    return false
  end
  local keys, list = {}, {}
  for _, e in ipairs(out) do
    local k = rm.on[e.type] and read_model.default_key_of(e)
    if k then
      local ks = key_string(k)
      if not keys[ks] then
        keys[ks] = true
        list[#list + 1] = ks
      end
    end
  end
  if #list == 0 then return false end
  local ok, err = store:query_ahead(rm:_load_query(store, nil, list))
  if not ok then return nil, err end
  return { rm = rm, keys = keys }
end

-- The rows load_ahead asked for: opts.loaded of read_model.apply_inline.
local function loaded_rows(store, ahead)
  if not ahead then return nil end
  local rows, err = store:ahead_rows()
  if not rows then return nil, err end
  return { [ahead.rm] = { keys = ahead.keys, rows = ahead.rm:_found(rows) } }
end

-- Rows kept beside the states (see one_trip) -------------------------------

local json = core.json

-- The inline read model whose row a command can carry in the cache: the
-- only one, keyed by the default key_of, each row fed by one stream
-- (keys_by_stream), so that its row at a stream version is the row the
-- transaction that appended that version wrote, and whose definition says
-- its handlers may run before the append (one_trip). nil: none (or no
-- cache: execute uses none inside a transaction of the caller's).
local function row_model(self, cache)
  local rms = self.read_models
  local rm = rms and #rms == 1 and rms[1]
  if cache and rm and rm.one_trip and rm.keys_by_stream
      and rm.key_of == read_model.default_key_of then
    return rm
  end
end

-- A row's key names the model's columns and their types (a hash of
-- them): a row kept by a definition with other columns (before a rebuild
-- that added one, say) is never given to this one's handlers.
local SHAPE_NS = "3c8f6d2e-7a51-5b9e-9d4c-6e2b1f0a8c37"
local function row_key(rm, stream)
  local tag = rm._row_tag
  if not tag then
    local parts = {}
    for i, c in ipairs(rm.columns) do parts[i] = c .. " " .. rm.types[c] end
    tag = core.uuid5(SHAPE_NS, table.concat(parts, ",")):sub(1, 8)
    rm._row_tag = tag
  end
  return "rm " .. rm.name .. " " .. tag .. " " .. stream
end

-- The event id written at `at` in a cache entry, followed by a space: the
-- id ("-" for none) and where the rest starts, or nil (not an entry of
-- this form: one of an earlier form has its JSON there). Read by its
-- fixed width, not by a pattern: this runs on every command.
local function entry_id(entry, at)
  local c = entry:byte(at)
  if c == 45 and entry:byte(at + 1) == 32 then return "-", at + 2 end   -- "-"
  if c and (c >= 48 and c <= 57 or c >= 97 and c <= 102 or c >= 65 and c <= 70)
      and entry:byte(at + 8) == 45 and entry:byte(at + 36) == 32 then
    return entry:sub(at, at + 35), at + 37
  end
end

-- The row the cache holds for stream at version after the event last_id,
-- or nil. The entry is "<version> <last event id> <row as JSON>".
local function cached_row(self, rm, stream, version, last_id)
  local entry = self.cache:get(row_key(rm, stream))
  if type(entry) ~= "string" then return nil end
  local v, at = entry:match("^(%d+) ()")
  if tonumber(v) ~= version then return nil end
  local id
  id, at = entry_id(entry, at)
  if id ~= last_id then return nil end
  local ok, row = pcall(json.decode, entry:sub(at))
  if ok and type(row) == "table" then return row end
end

local keeps_shape   -- below, with the states' cache

-- Keeps the row a write gave back (rows: its RETURNING, as a load gives
-- it, or that row's JSON text: commit_with's json_rows) for the stream's
-- next command, which finds it only after the same last event (the
-- append's: out); anything else drops the entry.
local function cache_row(self, rm, stream, out, version, rows)
  local row = rows and #rows == 1 and rows[1]
  local text = type(row) == "string" and row
    or type(row) == "table" and keeps_shape(row, 0) and json.encode(row)
  if text then
    self.cache:set(row_key(rm, stream), version .. " " .. out[#out].id .. " " .. text)
  elseif self.cache.delete then
    self.cache:delete(row_key(rm, stream))
  end
end

local deep_copy = util.deep_copy

-- The event copies one_trip gives the handlers: a read of what only the
-- append gives sets watched.needs (handlers run to the end, never
-- yielding, so one flag serves every call).
local watched = { needs = false }
local WATCH = {
  __index = function(_, k) if k == "recorded_at" or k == "position" then watched.needs = true end end,
  __pairs = function(t) watched.needs = true; return next, t, nil end,
}

-- A command in one round trip: when the cache holds the read model's row
-- at the version the append expects, after the same last event (last_id),
-- the handlers run before the append, and the row's write goes behind the
-- append, with COMMIT: [BEGIN, the append, the write, COMMIT]. The append
-- expects that version (and, from a cached state, that last event), so a
-- row that is not the stream's head fails it as the state would. Not
-- when a handler reads what only the append gives (recorded_at, position),
-- nor when the write is not one row's upsert: false then (the caller goes
-- the two round trips), else the append's result | nil, err.
local function one_trip(self, rm, stream, out, aopts, last_id)
  local row = cached_row(self, rm, stream, aopts.expected_version, last_id or "-")
  if not row then return false end
  local ks = key_string(read_model.default_key_of(out[1]))
  for i = 2, #out do
    if key_string(read_model.default_key_of(out[i])) ~= ks then return false end
  end
  -- the handlers get copies: what they do to an event must not reach the
  -- one appended; and a read of recorded_at or position (or, on Lua 5.4,
  -- a walk over the event's fields) sends the command the long way
  watched.needs = false
  local copies = {}
  for i, e in ipairs(out) do
    copies[i] = setmetatable({ id = e.id, type = e.type, stream = e.stream, version = e.version,
      data = deep_copy(e.data), metadata = deep_copy(e.metadata) }, WATCH)
  end
  local last = { rows = true }
  local ok = read_model.apply_inline(self.store, { rm }, copies, { defer = last, unstamped = true,
    loaded = { [rm] = { keys = { [ks] = true }, rows = { [ks] = row } } } })
  -- a handler that failed may have met a row that is behind: the long
  -- way loads the row and answers
  if watched.needs or not ok or not last.returning then return false end
  local store = self.store
  local bok, berr = store:begin()
  if not bok then return nil, berr end
  -- the row comes back as the text the cache keeps: its json columns are
  -- never decoded and encoded again on the way
  last.json_rows = true
  aopts.commit_with = last
  local res, err = store:append(stream, out, aopts)
  aopts.commit_with = nil
  if not res then return nil, err end
  if res.one_trip then self.stats.one_trips = self.stats.one_trips + 1 end
  stamp(out, res)
  -- an append found done already (a retry) wrote no row: keep none
  cache_row(self, rm, stream, out, res.version, not res.idempotent and res.rows)
  return res
end

-- Appends and updates the inline read models in one transaction (or one
-- after the other on a memory store). The events get the versions they
-- will have, so handlers see what a projector would. On PostgreSQL that
-- is 2 round trips: [BEGIN, the rows' load, the append], then [the rows'
-- write, COMMIT]; one (one_trip) when the cache holds the row.
local function append_inline(self, stream, out, aopts, cache, in_caller_tx, last_id)
  local store = self.store
  if util.is_memory(store) then
    -- no transactions: run the handlers without writing first, so that a
    -- failing one refuses the command before anything is stored
    for _, e in ipairs(out) do e.recorded_at = e.recorded_at or util.now_iso() end
    local ok, rerr = read_model.apply_inline(store, self.read_models, out, { dry_run = true })
    if not ok then return nil, rerr end
    local res, err = store:append(stream, out, aopts)
    if not res then return nil, err end
    stamp(out, res)
    if res.idempotent then return res end   -- rows written the first time
    ok, rerr = read_model.apply_inline(store, self.read_models, out)
    if not ok then return nil, rerr end
    return res
  end
  if in_caller_tx then
    -- the caller's transaction: the rows are written in it, after the
    -- append, under a savepoint, so that a command that fails after its
    -- append (a handler, a row's write) leaves nothing of itself there.
    -- The savepoint goes in front of the append, in its round trip
    -- (query_ahead); saved() collects its answer, once: true when it was
    -- set (also when no statement took it along: it runs on its own then)
    local sok, serr = store:query_ahead("SAVEPOINT es_execute")
    if not sok then return nil, serr end
    local set, set_err
    local function saved()
      if set == nil then
        local rows
        rows, set_err = store:ahead_rows()
        set = rows ~= nil
      end
      return set
    end
    local fine, res, err = pcall(function()
      local r, aerr = store:append(stream, out, aopts)
      -- a savepoint the server refused failed the append with its error
      if not saved() then return nil, aerr or set_err end
      if not r then return nil, aerr end
      stamp(out, r)
      -- events stored already (a retry) had their rows written then
      if r.idempotent then return r end
      local ok, rerr = read_model.apply_inline(store, self.read_models, out)
      if not ok then return nil, rerr end
      return r
    end)
    if fine and res then return res end
    if saved() then store:query("ROLLBACK TO SAVEPOINT es_execute") end
    if not fine then error(res, 0) end
    return nil, err
  end
  local rm = row_model(self, cache)
  local res, ok, err
  -- a raise in between (a bug in a handler's helper) must not leave the
  -- transaction open
  local fine, raised = pcall(function()
    if rm then
      res, err = one_trip(self, rm, stream, out, aopts, last_id)
      if res ~= false then ok = res ~= nil; return end
      res = nil
    end
    ok, err = store:begin()
    if not ok then return end
    local ahead, loaded
    ahead, err = load_ahead(self, store, out)
    if ahead == nil then ok = false; return end
    res, err = store:append(stream, out, aopts)
    if res and res.idempotent then
      -- these events were stored already (a retry of this append): their
      -- rows were written then, and nothing is to be done now
      stamp(out, res)
      ok, err = store:rollback()
      if rm and cache.delete then cache:delete(row_key(rm, stream)) end
      return
    end
    if res then
      stamp(out, res)
      loaded, err = loaded_rows(store, ahead)
      if ahead and not loaded then ok = false; return end
      -- the read models' last write goes with COMMIT, in one round trip
      -- (giving the row back when the cache keeps it)
      local last = { rows = rm and true }
      ok, err = read_model.apply_inline(store, self.read_models, out,
        { defer = last, loaded = loaded })
      if ok then
        local rows
        if last.sql then
          ok, rows = store:commit_with(last.sql, (table.unpack or unpack)(last, 1, last.n))
          if not ok then err = rows end
        else
          ok, err = store:commit()
        end
        if ok and rm then
          cache_row(self, rm, stream, out, res.version, last.returning and rows)
        end
        return
      end
    end
    ok = false
  end)
  -- may fail too when the session is gone (err says why); an append that
  -- carried the COMMIT ended the transaction itself
  local open = not store.in_transaction or store:in_transaction()
  if not fine then
    if open then store:rollback() end
    error(raised, 0)
  end
  if ok then return res end
  if open then store:rollback() end
  return nil, err
end

local ARRAY_MT = getmetatable(json.array {})
local OBJECT_MT = getmetatable(json.object {})

-- The cache's key of a stream: the state's shape changes with the
-- aggregate's snapshot_version, as for snapshots.
local function cache_key(A, stream)
  return A.snapshot_version .. " " .. stream
end

-- The state the cache holds for stream: state, version, snap_version and
-- the id of the stream's last event then (nil at version 0), or nil. The
-- entry is "<version> <snap_version> <last event id, or -> <state as
-- JSON>" (an entry of an earlier form is not one).
local function cached_state(self, A, stream)
  local entry = self.cache:get(cache_key(A, stream))
  if type(entry) ~= "string" then return nil end
  local v, sv, at = entry:match("^(%d+) (%d+) ()")
  if not v then return nil end
  local id
  id, at = entry_id(entry, at)
  if not id or (id == "-") ~= (v == "0") then return nil end
  local ok, state = pcall(json.decode, entry:sub(at))
  if not ok or type(state) ~= "table" then return nil end
  self.stats.cache_hits = self.stats.cache_hits + 1
  return state, tonumber(v), tonumber(sv), id ~= "-" and id or nil
end

-- Whether JSON gives the tables of v back as they are: not an empty table
-- without a shape (written "{}", it would come back an object, where
-- t[#t + 1] = x then sets the key "1" instead of appending), nor one with
-- another metatable (its methods would be gone), nor an object with keys
-- that are not strings, nor an array with keys beyond 1..#t.
function keeps_shape(v, depth)
  if depth > 64 then return false end
  local mt = getmetatable(v)
  if mt ~= nil and mt ~= ARRAY_MT and mt ~= OBJECT_MT then return false end
  if next(v) == nil then return mt ~= nil end
  local n = mt == ARRAY_MT and #v
  for k, x in pairs(v) do
    if mt == OBJECT_MT and type(k) ~= "string" then return false end
    if n and (type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0) then return false end
    if type(x) == "table" and not keeps_shape(x, depth + 1) then return false end
  end
  return true
end

-- Drops stream's entry (when the cache can delete; else it stays, and the
-- append's version check catches it).
local function cache_delete(cache, A, stream)
  if cache.delete then cache:delete(cache_key(A, stream)) end
end

-- Keeps state for the next command, with the id of the stream's last
-- event (the append that takes it from there names it: a stream that
-- reached the same version with other events, as after a restore, is not
-- taken for this one). Only a state that JSON gives back as it is, and
-- whose last event is known (not one a snapshot alone gave): for anything
-- else an older entry goes, and that stream is read each time.
local function cache_state(self, A, stream, version, snap_version, state, last_id)
  local text = (version == 0 or last_id) and keeps_shape(state, 0) and json.encode(state)
  if text then
    self.cache:set(cache_key(A, stream),
      version .. " " .. snap_version .. " " .. (last_id or "-") .. " " .. text)
  else
    cache_delete(self.cache, A, stream)
  end
end

-- The stream's head, read and folded (load), and kept in the cache when
-- there is one: before decide, which may alter the tables it is given.
local function read_head(self, A, stream, cache)
  local state, version, snap_version, last_id = load(self, A, stream, nil)
  if state and cache then cache_state(self, A, stream, version, snap_version, state, last_id) end
  return state, version, snap_version, last_id
end

local function cache_drop(self, A, stream)
  self.stats.cache_stale = self.stats.cache_stale + 1
  cache_delete(self.cache, A, stream)
end

-- The command's events and error from the state at version, or nothing
-- when that version is not the one the caller expects.
local function decide(A, state, version, command_name, command, opts)
  if expectation_met(opts.expected_version, version) then
    return A:decide(state, command_name, command)
  end
end

-- repo:execute(A, id, command_name, command, { metadata, expected_version })
--   -> { version, position, events, state } | nil, err
function Repository:execute(A, id, command_name, command, opts)
  check_aggregate(A, "execute")
  if not A:handles(command_name) then
    error(("%s: unknown command '%s'"):format(A.name, tostring(command_name)), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("repository:execute: opts must be a table", 2)
  end
  opts = opts or {}
  local stream = A:stream(id)
  local store = self.store

  -- metadata shared by the events of this command
  local base = merge(merge({}, self.metadata), opts.metadata)
  local command_id = uuid()
  if base.correlation_id == nil then base.correlation_id = command_id end
  if base.causation_id == nil then base.causation_id = command_id end
  if base.command == nil then base.command = command_name end

  local attempt = 0
  -- from_cache: this attempt starts from the cache's state, which may be
  -- behind the stream; only an append that succeeds proves it was not.
  -- Inside the caller's transaction the cache is neither read nor written:
  -- what this command appends there is not committed, and may never be.
  local in_caller_tx = store.in_transaction ~= nil and store:in_transaction()
  local cache = not in_caller_tx and self.cache or nil
  local try_cache = cache ~= nil
  while true do
    local state, version, snap_version, last_id, from_cache
    if try_cache then
      state, version, snap_version, last_id = cached_state(self, A, stream)
      from_cache = state ~= nil
      try_cache = false
    end
    if not from_cache then
      state, version, snap_version, last_id = read_head(self, A, stream, cache)
      if not state then return nil, version end
    end
    local events, err = decide(A, state, version, command_name, command, opts)
    if from_cache and (not events or #events == 0) then
      -- decided again from the stream: a refusal, a conflict with the
      -- caller's expected version or a no-op must hold at its head
      local cached_version, cached_last = version, last_id
      state, version, snap_version, last_id = read_head(self, A, stream, cache)
      if not state then return nil, version end
      if version ~= cached_version or last_id ~= cached_last then
        self.stats.cache_stale = self.stats.cache_stale + 1
      end
      from_cache = false
      events, err = decide(A, state, version, command_name, command, opts)
    end
    if not expectation_met(opts.expected_version, version) then
      return nil, core.error("conflict",
        ("expected version %s of stream %s, found %d")
          :format(tostring(opts.expected_version), stream, version),
        { expected = opts.expected_version, actual = version, stream = stream, reason = "version" })
    end
    if not events then return nil, err end
    if #events == 0 then
      -- nothing to append: the result still names where the stream is
      local position
      if version > 0 then
        local last, rerr = last_event(store, stream)
        if last == nil then return nil, rerr end
        position = last and last.position
      end
      return { version = version, position = position, events = events, state = state }
    end
    local out, new_ids = M.events_to_append(A, stream, version, base, events)
    -- a state from the cache names the stream's last event too: a stream
    -- that reached this version with other events (after a restore) is
    -- not its stream
    local aopts = { expected_version = version, new_ids = new_ids,
                    expected_last_id = from_cache and last_id or nil }
    local res, aerr
    if self.read_models then
      res, aerr = append_inline(self, stream, out, aopts, cache, in_caller_tx, last_id)   -- stamps them
    else
      res, aerr = store:append(stream, out, aopts)
      if res then stamp(out, res) end
    end
    -- A state that is behind whose events the stream holds already (the
    -- same command decided again, with the same event ids) is not taken
    -- for this command's success: it is decided again from the stream's
    -- head (read, not counted as a retry).
    local done_before = res and res.idempotent and from_cache
    if done_before then cache_drop(self, A, stream) end
    if res and not done_before then
      state = A:evolve(state, out)
      local saved = self.stats.snapshots_saved
      local serr = maybe_snapshot(self, A, stream, res.version, snap_version)
      -- what this append made of the stream (a snapshot may be due now)
      if uses_snapshots(self, A) then
        note_short(self, stream, snap_version == 0 and res.version < A.snapshot_every)
      end
      if cache then
        if self.stats.snapshots_saved > saved then snap_version = res.version end
        cache_state(self, A, stream, res.version, snap_version, state, out[#out].id)
      end
      return { version = res.version, position = res.position, events = out,
               state = state, snapshot_error = serr }
    end
    if not done_before then
      -- In the caller's aborted transaction (reason "tx_aborted",
      -- "order") a retry can only fail again. The inline read models'
      -- append ran in a transaction of its own, rolled back by now: there
      -- a writer that took the same version first (the unique index
      -- refused this one, so the transaction aborted) is a conflict like
      -- any other, retried.
      local aborted = aerr.reason == "tx_aborted" or aerr.reason == "order"
      if aerr.kind ~= "conflict" or (aborted and in_caller_tx) then
        return nil, aerr
      end
      if from_cache then cache_drop(self, A, stream) end
      -- A stream found elsewhere than the cached state (ahead, or behind
      -- after a restore) is read, as the load the cache stood in for
      -- would have been: not a retry. A writer met in the act (a unique
      -- violation) still is one.
      local misled = from_cache and (aerr.reason == "last_id" or aerr.reason == "version"
        and (aerr.actual or -1) >= 0 and aerr.actual ~= version)
      if not misled then
        if attempt >= self.max_retries then return nil, aerr end
        attempt = attempt + 1
        self.stats.retries = self.stats.retries + 1
      end
    end
  end
end

-- repo:forget(A, id): the cache no longer holds that instance's state (nor
-- its read model row), so its next command reads the stream (one round
-- trip more) instead of meeting a state that is behind (three more). For
-- streams this
-- repository's execute did not leave last: a command run inside a
-- transaction of the caller's, once it ended, or events appended some
-- other way.
function Repository:forget(A, id)
  check_aggregate(A, "forget")
  local cache = self.cache
  if not cache then return end
  local stream = A:stream(id)
  cache_delete(cache, A, stream)
  local rm = row_model(self, cache)
  if rm and cache.delete then cache:delete(row_key(rm, stream)) end
end

-- repo:history(A, id, { raw = false }) -> array of
--   { id, type, data, metadata, recorded_at, version, position }
-- Data is upcast to the current shape unless raw = true.
function Repository:history(A, id, opts)
  check_aggregate(A, "history")
  local raw = opts and opts.raw
  local it, err = self.store:read(A:stream(id))
  if not it then return nil, err end
  local list = {}
  for e in it do
    if not raw then A:upcast_event(e, 1) end
    list[#list + 1] = { id = e.id, type = e.type, data = e.data, metadata = e.metadata,
                        recorded_at = e.recorded_at, version = e.version,
                        position = e.position }
  end
  return list
end

-- The current version of an instance's stream (0: it does not exist).
function Repository:version(A, id)
  check_aggregate(A, "version")
  return self.store:version(A:stream(id))
end

M.Repository = Repository
M._row_key = row_key   -- a kept row's cache key (specs)
return M
