-- eventsourcing.follower_group: a follower run as a consumer group of N
-- members (processes, on any machines).
--
--   es.projector(store, { Orders }, { group = {
--     name = "orders",          -- the group (default: the ledger's name and the
--                               -- subscriptions' names; members of one group
--                               -- must follow the same subscriptions)
--     partitions = 16,          -- fixed for the life of the group
--     member = "host-a-1",      -- unique per member (default: host, pid, random)
--     ttl = 5,                  -- seconds without a heartbeat: the member is gone
--     heartbeat = 1,            -- seconds between heartbeats
--   } })
--
-- Streams are spread over `partitions` by hashtext(stream): all events of
-- a stream are in one partition, so per-stream order is kept. Each
-- subscription has a checkpoint per partition (ledger rows "<name>/<k>"),
-- read with the partition's filter in SQL. On a store distributed on
-- Citus the partitions are the shards of the events table instead
-- (partitions = "shards", the default there; a number is refused):
-- partition k is the (k+1)th shard by id, its checkpoint that shard's
-- cursor, read with read_all({ shards = { id } }) on the shard's worker.
--
-- Membership and ownership are rows with leases, never sessions (no
-- LISTEN, no advisory locks: fine behind PgBouncer in transaction mode):
-- <schema>.follower_members (group, member, heartbeat_at) and
-- <schema>.follower_partitions (group, partition, owner, lease_until).
-- Every heartbeat a member refreshes its row, forgets members silent for
-- longer than ttl, ranks the live ones by name and takes the partitions
-- p with p % N == its rank: it releases the others it holds and claims
-- its share where the owner released it, is gone or let its lease lapse.
-- So a member that stops (it releases on the way out) or dies (its rows
-- expire after ttl) has its partitions taken over within ttl + heartbeat,
-- and a member that joins gets its share at the next heartbeats.
--
-- Ownership only spreads the work. Exactly-once comes from the ledger: a
-- batch still locks its partition's row FOR UPDATE SKIP LOCKED and reads
-- after that row's checkpoint, so two members that briefly both believe
-- they own a partition never apply an event twice.
local core = require "eventsourcing.core"
local util = require "eventsourcing.util"

local M = {}

local Group = {}
Group.__index = Group
M.Group = Group

local function quote(s) return '"' .. tostring(s):gsub('"', '""') .. '"' end

local function default_member()
  local host = os.getenv("HOSTNAME")
  if not host then
    local f = io.open("/etc/hostname")
    host = f and f:read("*l") or "host"
    if f then f:close() end
  end
  return ("%s-%d-%06d"):format(host, math.floor(util.monotonic() * 1000) % 100000,
    math.random(0, 999999))
end

-- The partition count: a number, or on a store distributed on Citus the
-- shards of the events table (`partitions = "shards"`, the default and the
-- only choice there: partitions by hash of the stream would be read
-- through the coordinator, merging workers by transaction ids that order
-- events only within a worker). -> count, whether partitions are shards
local function partitions_of(g, store)
  local p = g.partitions
  local info, err = store:info()
  if not info then error("group: " .. tostring(err), 5) end
  if info.distributed then
    if p ~= nil and p ~= "shards" then
      error(("group: on a store distributed on Citus a group's partitions are the shards of "
        .. "the events table: partitions = \"shards\" (or none), not %s"):format(tostring(p)), 5)
    end
    return info.shards, true
  end
  if p == "shards" then error("group: partitions = \"shards\" needs a store distributed on Citus", 5) end
  return p or 16, false
end

local function check(g, store)
  if type(g) ~= "table" then error("group: expected a table { name, partitions, member, ... }", 4) end
  local p, on_shards = partitions_of(g, store)
  if type(p) ~= "number" or p < 1 or p > 4096 or p % 1 ~= 0 then
    error("group: partitions must be an integer from 1 to 4096 (or \"shards\" on Citus)", 4)
  end
  for _, k in ipairs { "ttl", "heartbeat" } do
    if g[k] ~= nil and (type(g[k]) ~= "number" or g[k] <= 0) then
      error(("group: %s must be a positive number of seconds"):format(k), 4)
    end
  end
  if g.member ~= nil and (type(g.member) ~= "string" or g.member == "") then
    error("group: member must be a non-empty string", 4)
  end
  return p, on_shards
end

-- Members must follow the same subscriptions: a member owns a partition
-- for all of them. So the default name of a group is the ledger's with
-- the names of its subscriptions (two projectors of different read models
-- are two groups, never one that leaves partitions unread).
function M.default_name(ledger, subs)
  local names = {}
  for i, s in ipairs(subs) do names[i] = s.name end
  table.sort(names)
  return ledger .. ":" .. table.concat(names, ",")
end

function M.new(engine, g, subs)
  if engine.memory then error("group: consumer groups need a PostgreSQL store", 3) end
  local partitions, on_shards = check(g, engine.store)
  math.randomseed(os.time() + math.floor(util.monotonic() * 1e6) % 1000000)
  return setmetatable({
    engine = engine, store = engine.store, name = g.name or M.default_name(engine.ledger, subs),
    partitions = partitions, on_shards = on_shards, member = g.member or default_member(),
    ttl = g.ttl or 5, heartbeat = g.heartbeat or 1,
    next_beat = -math.huge, owned_set = {}, unit_list = {},
  }, Group)
end

function Group:_q(sql)
  return (sql:gsub("<schema>", function() return quote(self.store:schema()) end))
end

-- Units and batches -------------------------------------------------------------

local follower_mod     -- eventsourcing.follower, required lazily (it requires us)
local function fm()
  follower_mod = follower_mod or require "eventsourcing.follower"
  return follower_mod
end

-- The units of subscription sub: one per partition.
function Group:units(sub)
  local out = {}
  for k = 0, self.partitions - 1 do
    local u = { name = ("%s/%d"):format(sub.name, k), part = k }
    out[#out + 1] = u
    self.unit_list[#self.unit_list + 1] = u
  end
  return out
end

-- One read for any set of partitions: the events of those partitions after
-- checkpoint `after` (each with its partition e.part and, when asked, its
-- checkpoint), by the C read path (read_all's partition filter:
-- (hashtext(stream) & 0x7fffffff) % partitions, in SQL). A short batch's
-- checkpoint moves on to the last event below the watermark, whatever its
-- partition or type.
-- -> events, the batch's checkpoint | nil, err
function Group:read(base, parts, after, limit, checkpoints, prefetch)
  return self.store:read_all({ after = after, limit = limit, prefetch = prefetch and base.prefetch,
    types = base.types, category = base.category, partitions = self.partitions, partition = parts,
    checkpoints = checkpoints, lazy = base.lazy })
end

local function array_literal(list, quoted)
  local out = {}
  for i, t in ipairs(list) do
    out[i] = quoted and ('"' .. tostring(t):gsub('[\\"]', '\\%0') .. '"') or tostring(t)
  end
  return "{" .. table.concat(out, ",") .. "}"
end

-- Work items: per subscription, the units of the owned partitions.
function Group:items()
  local owned, err = self:owned()
  if not owned then return nil, err end
  local by_base, items = {}, {}
  for _, u in ipairs(owned) do
    local it = by_base[u.base]
    if not it then
      it = { base = u.base, units = {} }
      by_base[u.base] = it
      items[#items + 1] = it
    end
    it.units[#it.units + 1] = u
  end
  return items
end

-- One batch of an item, in one transaction: lock the units' ledger rows
-- (SKIP LOCKED), read once from the lowest of their checkpoints, drop
-- events a unit has done already, let the subscription process the rest,
-- and move every unit to where the batch got (the failing unit records
-- its failure). Same results as the follower's batch.

-- Hands a batch to the subscription's handlers. -> events done, info
-- (nothing to do for an empty batch) | nil, err
local function process(item, kept)
  if #kept == 0 then return 0, {} end
  local done, info = item.base.process(kept, #kept)
  if done == nil then return nil, info end
  return done, info or {}
end

function Group:batch(item, limit)
  local engine, store = self.engine, self.store
  local ok, err = store:begin()
  if not ok then return nil, err end
  local names, by_name = {}, {}
  for _, u in ipairs(item.units) do names[#names + 1] = u.name; by_name[u.name] = u end
  local rows
  rows, err = store:query(engine:_q("SELECT name, checkpoint, error IS NOT NULL AS failed, paused "
    .. "FROM <ledger> WHERE name = ANY($1::text[]) ORDER BY name FOR UPDATE SKIP LOCKED"),
    array_literal(names, true))
  if not rows then engine:rollback(); return nil, err end
  local usable, cps, parts, low, any = {}, {}, {}, nil, false
  for _, r in ipairs(rows) do
    if not r.failed and not r.paused then
      local u = by_name[r.name]
      usable[#usable + 1] = u
      cps[u.part] = r.checkpoint or false
      parts[#parts + 1] = u.part
      if not any or fm().checkpoint_less(r.checkpoint, low) then low = r.checkpoint end
      any = true
    end
  end
  if not any then engine:rollback(); return 0, #rows < #item.units and "locked" or "idle" end
  if self.on_shards then return self:_shard_batch(item, usable, cps, limit) end
  -- drop events a unit has done already: only units whose checkpoint is
  -- above the one read from can have any (after a takeover or a failure)
  local ahead, less = {}, fm().checkpoint_less
  for part, c in pairs(cps) do
    if c and c ~= low then ahead[part] = c end
  end
  local filter = next(ahead) ~= nil
  -- a checkpoint string per event only when something needs it (the
  -- filter, or the subscription's handlers: not a read model's)
  local batch, cp = self:read(item.base, parts, low, limit, filter or item.base.checkpoints ~= false, true)
  if not batch then engine:rollback(); return nil, cp end
  local kept = batch
  if filter then
    kept = {}
    for _, e in ipairs(batch) do
      local c = ahead[e.part]
      if not c or less(c, e.checkpoint) then kept[#kept + 1] = e end
    end
  end
  local n, done, info = #kept, process(item, kept)
  if done == nil then engine:rollback(); return nil, info end
  local upto = done == n and cp or nil
  if done < n and done > 0 then
    upto, err = self:_checkpoint_at(item.base, parts, low, kept, done)
    if not upto then engine:rollback(); return nil, err end
  end
  return self:_finish(item, usable, cps, kept, done, info, upto, #batch < limit)
end

-- The checkpoint after kept[done] (a batch stopped early, read without
-- per-event checkpoints): the first `done` events read again, below the
-- first read's watermark they come back the same and first; checked, a
-- mismatch only retries the batch.
function Group:_checkpoint_at(base, parts, after, kept, done)
  local e = kept[done]
  if e.checkpoint then return e.checkpoint end
  local again, err = self:read(base, parts, after, done, true, false)
  if not again then return nil, err end
  local last = again[done]
  if #again ~= done or last.id ~= e.id or last.position ~= e.position then
    return nil, core.error("conflict", ("%s %s: a batch read again differs at event %d; retrying")
      :format(self.engine.label, base.name, done), { reason = "serialization" })
  end
  return last.checkpoint
end

function Group:_finish(item, usable, cps, kept, done, info, upto, short)
  local engine, less = self.engine, fm().checkpoint_less
  local handled, n = {}, #kept
  for i = 1, done do handled[kept[i].part] = (handled[kept[i].part] or 0) + 1 end
  local fail_part = done < n and info.failure and kept[done + 1].part
  local moved = {}
  for _, u in ipairs(usable) do
    local from = cps[u.part] or nil
    local to = from
    if upto and less(from, upto) then to = upto end
    moved[u] = to
    if to ~= from or handled[u.part] or u.part == fail_part then
      local ok, err = engine:save(u, to, handled[u.part] or 0, u.part == fail_part and info.failure or nil)
      if not ok then engine:rollback(); return nil, err end
    end
  end
  return self:_done(item, kept, done, info, fail_part, moved, short)
end

-- Commits a batch and says what comes next: done, "more" | "idle".
function Group:_done(item, kept, done, info, fail_part, moved, short)
  local engine, n = self.engine, #kept
  local ok, err = engine:commit()
  if not ok then return nil, err end
  if fail_part and engine.log then
    local e = kept[done + 1]
    engine.log(("%s %s stopped at position %s (%s, stream %s): %s"):format(engine.label,
      item.base.name, tostring(e.position), tostring(e.type), tostring(e.stream),
      tostring(info.failure.message)))
  end
  if done < n then
    if not info.failure and info.delay then util.sleep(info.delay) end
    return done, "more"
  end
  if not short then return done, "more" end
  for u, to in pairs(moved) do engine.idle_at[u] = to end
  return done, "idle"
end

-- Partitions that are shards (Citus) --------------------------------------------

-- The events table's shard ids in order: partition k is the (k+1)th.
-- Asked once; a split (another count) is refused, as read_all refuses
-- a checkpoint of shards that are gone.
function Group:shard_ids()
  if self.shards then return self.shards end
  local rows, err = self.store:query("SELECT shardid FROM pg_dist_shard WHERE logicalrelid = "
    .. "to_regclass(quote_ident($1) || '.events') ORDER BY shardid", self.store:schema())
  if not rows then return nil, err end
  if #rows ~= self.partitions then
    return nil, core.error("invalid", ("group %s: the events table has %d shards, the group %d "
      .. "partitions (one per shard; docs/scale-out.md)"):format(self.name, #rows, self.partitions))
  end
  local ids = {}
  for i, r in ipairs(rows) do ids[i] = r.shardid end
  self.shards = ids
  return ids
end

-- A unit's checkpoint narrowed to its own shard's cursor: a reset may
-- give every unit one checkpoint of all shards (es.workflow.end_checkpoint).
local function own_cursor(cp, id)
  if not util.per_shard(cp) then return cp end
  local entry = cp:match("[:,](" .. ("%d"):format(id) .. "@%d+=%d+:%d+)")
  return entry and "c1:" .. entry or cp
end

-- A batch of partitions that are shards: each unit reads its own shard
-- after its own checkpoint (a cursor of that shard alone, read on its
-- worker against that worker's snapshot: the coordinator-side read above
-- would merge shards of different workers by transaction ids that only
-- order events within a worker). The units' events are handled one
-- unit after the other (a stream lives on one shard), in the batch's
-- transaction; each unit moves to where its own events got.
function Group:_shard_batch(item, usable, cps, limit)
  local engine, store = self.engine, self.store
  local ids, err = self:shard_ids()
  if not ids then engine:rollback(); return nil, err end
  local ask = math.max(1, math.floor(limit / #usable))
  local kept, reads, short = {}, {}, true
  for _, u in ipairs(usable) do
    local b, cp = store:read_all({ after = own_cursor(cps[u.part] or nil, ids[u.part + 1]), limit = ask,
      shards = { ids[u.part + 1] },
      types = item.base.types, category = item.base.category, lazy = item.base.lazy })
    if not b then engine:rollback(); return nil, cp end
    reads[u] = { cp = cp, first = #kept + 1, last = #kept + #b }
    for _, e in ipairs(b) do e.part = u.part; kept[#kept + 1] = e end
    if #b >= ask then short = false end
  end
  local n, done, info = #kept, process(item, kept)
  if done == nil then engine:rollback(); return nil, info end
  local fail_part = done < n and info.failure and kept[done + 1].part
  local moved = {}
  for _, u in ipairs(usable) do
    local r, from = reads[u], cps[u.part] or nil
    local to, last, handled = from, nil, 0
    if done >= r.last then
      to, handled = r.cp, r.last - r.first + 1
    elseif done >= r.first then
      to, handled = kept[done].checkpoint, done - r.first + 1
    end
    if handled > 0 then last = kept[r.first + handled - 1].position end
    moved[u] = to
    if to ~= from or handled > 0 or u.part == fail_part then
      local ok, e = engine:save(u, to, handled, u.part == fail_part and info.failure or nil, last)
      if not ok then engine:rollback(); return nil, e end
    end
  end
  return self:_done(item, kept, done, info, fail_part, moved, short)
end

-- Whether the log moved past where idle units (partitions that are
-- shards) stand: one event read after their cursors, in one read_all for
-- those with a checkpoint and one for those still at the start.
-- -> true | false | nil, err
function Group:moved(idle_at)
  local ids = self.shards
  if not ids then return true end
  local seen, with, at_start, cps = {}, {}, {}, {}
  for u, cp in pairs(idle_at) do
    local id = ids[u.part + 1]
    if id and not seen[id] then
      seen[id] = true
      if cp then
        with[#with + 1] = id
        cps[#cps + 1] = cp:sub(4)        -- "c1:" dropped: one shard's cursor
      else
        at_start[#at_start + 1] = id
      end
    end
  end
  for _, q in ipairs { { shards = with, after = #cps > 0 and "c1:" .. table.concat(cps, ",") or nil },
                       { shards = at_start } } do
    if #q.shards > 0 then
      local b, err = self.store:read_all({ after = q.after, shards = q.shards, limit = 1 })
      if not b then return nil, err end
      if #b > 0 then return true end
    end
  end
  return false
end

-- Lag of partitions that are shards: each partition's rows (ledger rows of
-- status) counted on its own shard. -> events, seconds | nil, err
function Group:shard_lag(parts)
  local ids, err = self:shard_ids()
  if not ids then return nil, err end
  local n, oldest = 0, nil
  for _, r in ipairs(parts) do
    local k = tonumber(r.name:match("/(%d+)$"))
    local c, first = util.lag_by_scan(self.store, own_cursor(r.checkpoint, ids[k + 1]), { ids[k + 1] })
    if not c then return nil, first end
    n = n + c
    if first and (not oldest or first < oldest) then oldest = first end
  end
  local t = oldest and util.iso_epoch(oldest)
  return n, t and math.max(0, util.now() - t) or 0
end

-- Tables -------------------------------------------------------------------------

local TABLES = {
  [[CREATE TABLE IF NOT EXISTS <schema>.follower_members (
      grp text NOT NULL, member text NOT NULL,
      heartbeat_at timestamptz NOT NULL DEFAULT now(),
      PRIMARY KEY (grp, member))]],
  [[CREATE TABLE IF NOT EXISTS <schema>.follower_partitions (
      grp text NOT NULL, part integer NOT NULL, owner text, lease_until timestamptz,
      PRIMARY KEY (grp, part))]],
}

-- In the ledger's migration transaction: the tables and this group's
-- partition rows; a group keeps its partition count.
function Group:migrate()
  local store = self.store
  for _, sql in ipairs(TABLES) do
    local ok, err = store:query(self:_q(sql))
    if not ok then return nil, err end
  end
  local rows, err = store:query(self:_q("SELECT count(*) AS n FROM <schema>.follower_partitions "
    .. "WHERE grp = $1"), self.name)
  if not rows then return nil, err end
  local n = rows[1].n
  if n > 0 and n ~= self.partitions then
    return nil, core.error("invalid", ("group %s has %d partitions, not %d: the count is fixed")
      :format(self.name, n, self.partitions))
  end
  return store:query(self:_q("INSERT INTO <schema>.follower_partitions (grp, part) "
    .. "SELECT $1, g FROM generate_series(0, $2::int - 1) g ON CONFLICT DO NOTHING"), self.name, self.partitions)
end

-- Heartbeats -----------------------------------------------------------------------

-- One heartbeat (each statement its own transaction: rows locked one
-- statement at a time never deadlock with another member's).
-- -> the set of owned partitions, whether that is the whole share | nil, err
function Group:beat()
  local store, grp, me = self.store, self.name, self.member
  local ok, err = store:query(self:_q("INSERT INTO <schema>.follower_members (grp, member) VALUES ($1, $2) "
    .. "ON CONFLICT (grp, member) DO UPDATE SET heartbeat_at = now()"), grp, me)
  if not ok then return nil, err end
  ok, err = store:query(self:_q("DELETE FROM <schema>.follower_members WHERE grp = $1 "
    .. "AND heartbeat_at < now() - $2::float8 * interval '1 second'"), grp, self.ttl)
  if not ok then return nil, err end
  local rows
  rows, err = store:query(self:_q("SELECT member FROM <schema>.follower_members WHERE grp = $1 "
    .. "ORDER BY member"), grp)
  if not rows then return nil, err end
  local rank, n = 0, #rows
  for i, r in ipairs(rows) do if r.member == me then rank = i - 1 end end
  local share = {}
  for p = rank, self.partitions - 1, math.max(n, 1) do share[#share + 1] = p end
  local arr = "{" .. table.concat(share, ",") .. "}"
  ok, err = store:query(self:_q("UPDATE <schema>.follower_partitions SET owner = NULL, lease_until = NULL "
    .. "WHERE grp = $1 AND owner = $2 AND NOT (part = ANY($3::int[]))"), grp, me, arr)
  if not ok then return nil, err end
  rows, err = store:query(self:_q("UPDATE <schema>.follower_partitions p SET owner = $2, "
    .. "lease_until = now() + $4::float8 * interval '1 second' "
    .. "WHERE p.grp = $1 AND p.part = ANY($3::int[]) AND (p.owner IS NULL OR p.owner = $2 "
    .. "OR p.lease_until < now() OR NOT EXISTS (SELECT 1 FROM <schema>.follower_members m "
    .. "WHERE m.grp = p.grp AND m.member = p.owner)) RETURNING part"), grp, me, arr, self.ttl)
  if not rows then return nil, err end
  local owned = {}
  for _, r in ipairs(rows) do owned[r.part] = true end
  self.owned_set = owned
  return owned, #rows == #share
end

-- The units of the owned partitions, after a heartbeat when one is due.
-- A failed heartbeat keeps the last ownership (the ledger keeps it safe).
function Group:owned()
  local t = util.monotonic()
  if t >= self.next_beat then
    local owned, complete = self:beat()
    if not owned then return nil, complete end
    -- part of the share still held by a member that has not seen us yet:
    -- look again soon rather than a whole heartbeat later
    self.next_beat = t + (complete and self.heartbeat or math.min(self.heartbeat, 0.1))
  end
  local out = {}
  for _, u in ipairs(self.unit_list) do
    if self.owned_set[u.part] then out[#out + 1] = u end
  end
  return out
end

-- Seconds until the next heartbeat is due.
function Group:until_beat()
  return math.max(0, self.next_beat - util.monotonic())
end

-- Leaves the group: releases the partitions and the membership, so the
-- others take over at their next heartbeat.
function Group:leave()
  local store = self.store
  store:query(self:_q("UPDATE <schema>.follower_partitions SET owner = NULL, lease_until = NULL "
    .. "WHERE grp = $1 AND owner = $2"), self.name, self.member)
  store:query(self:_q("DELETE FROM <schema>.follower_members WHERE grp = $1 AND member = $2"),
    self.name, self.member)
  self.owned_set, self.next_beat = {}, -math.huge
end

-- Who owns what: { { part, owner, lease_until }, ... } | nil, err
function Group:partitions_status()
  return self.store:query(self:_q("SELECT part, owner, " .. util.ts_sql("lease_until") .. " FROM "
    .. "<schema>.follower_partitions WHERE grp = $1 ORDER BY part"), self.name)
end

return M
