-- eventsourcing.citus: operations for a store distributed on Citus
-- (docs/scale-out.md, "Shard moves").
--
--   local citus = require "eventsourcing.citus"
--   citus.counters(store)                    -> { { node = "host:port", xid = n }, ... }
--   citus.align_counters(store, { margin = 10000 })
--     -> { { node, before, after }, ... } | nil, err
--
-- Transaction ids are per node. A shard moved to a node whose counter is
-- behind its rows' ids keeps them: appends to its streams are refused
-- until the counter passes them, its copied events wait for the same
-- (they are "in the future" there), and events of new streams get lower
-- ids than the ones followers have read, so read_all cannot carry their
-- cursors over (it refuses rather than skip). align_counters, run on the
-- coordinator just before citus_move_shard_placement (or a rebalance),
-- moves every worker's counter to the highest one plus `margin` (ids the
-- busiest worker may use while the move runs): one short transaction per
-- id, without flushing the log for them.
local core = require "eventsourcing.core"

local M = {}

local function need_citus(store)
  if type(store) ~= "userdata" and type(store) ~= "table" then
    error("citus: expected a store", 3)
  end
  local info, err = store:info()
  if not info then return nil, err end
  if not info.distributed then
    return nil, core.error("invalid", "citus: the store is not distributed on Citus "
      .. "(store:migrate({ distributed = true }))")
  end
  return true
end

-- Each worker's transaction counter (the next id it gives, about).
function M.counters(store)
  local ok, err = need_citus(store)
  if not ok then return nil, err end
  local rows
  rows, err = store:query("SELECT nodename || ':' || nodeport AS node, success, result "
    .. "FROM run_command_on_workers($c$SELECT pg_current_xact_id()$c$) ORDER BY nodename, nodeport")
  if not rows then return nil, err end
  local out = {}
  for i, r in ipairs(rows) do
    if not r.success then
      return nil, core.error("database", ("citus: worker %s: %s"):format(r.node, tostring(r.result)))
    end
    out[i] = { node = r.node, xid = tonumber(r.result) }
  end
  return out
end

-- Moves every worker's counter to the highest plus opts.margin (default
-- 10000). -> { { node, before, after }, ... } | nil, err
function M.align_counters(store, opts)
  local margin = (opts and opts.margin) or 10000
  if type(margin) ~= "number" or margin < 0 or margin % 1 ~= 0 or margin > 2 ^ 31 then
    error("citus.align_counters: margin must be a whole number of transaction ids (0 .. 2^31)", 2)
  end
  local before, err = M.counters(store)
  if not before then return nil, err end
  local top = 0
  for _, c in ipairs(before) do top = math.max(top, c.xid) end
  local target = ("%.0f"):format(top + margin)
  -- each worker uses up ids until its counter reaches the target: one
  -- transaction each (a subtransaction's id would come from the same
  -- counter, but a long transaction would hold back every reader)
  local rows
  rows, err = store:query("SELECT nodename || ':' || nodeport AS node, success, result "
    .. "FROM run_command_on_workers(format($c$DO $b$BEGIN WHILE pg_current_xact_id() < %L::xid8 LOOP "
    .. "PERFORM set_config('synchronous_commit', 'off', true); COMMIT; END LOOP; END$b$$c$, $1::text))",
    target)
  if not rows then return nil, err end
  for _, r in ipairs(rows) do
    if not r.success then
      return nil, core.error("database", ("citus: worker %s: %s"):format(r.node, tostring(r.result)))
    end
  end
  local after
  after, err = M.counters(store)
  if not after then return nil, err end
  local out = {}
  for i, c in ipairs(before) do
    out[i] = { node = c.node, before = c.xid, after = after[i] and after[i].xid }
  end
  return out
end

return M
