-- eventsourcing.workflow_timers: timers fire exactly once (see the
-- header of eventsourcing.workflow): due rows taken FOR UPDATE SKIP LOCKED,
-- the command executed and the row deleted in one transaction.
local core = require "eventsourcing.core"
local util = require "eventsourcing.util"
local wstore = require "eventsourcing.workflow_store"
local context = require "eventsourcing.workflow_context"

local now, ts = util.now, util.ts_sql
local mem, message_of, is_connection = wstore.mem, wstore.message_of, wstore.is_connection
local new_ctx, traceback = context.new_ctx, context.traceback

local Runner = {}     -- methods the runner takes in

local function timer_ctx(self, t)
  return new_ctx(self, t.workflow or "timers", "timer\0" .. t.id, {
    timer = t.key, trigger_id = t.id, trigger_type = "timer", trigger_stream = nil,
    correlation_id = t.correlation_id or t.id, causation_id = t.causation_id or t.id })
end

-- Executes one timer: true | false, err
function Runner:_fire(t)
  local A = self.aggregates[t.aggregate]
  if not A then
    return false, core.error("invalid", ("timer %s: aggregate %s is not registered with this runner")
      :format(t.key, tostring(t.aggregate)))
  end
  local ctx = timer_ctx(self, t)
  local ok, err = xpcall(function()
    return self:_execute(ctx, A, t.aggregate_id, t.command, t.payload, 1)
  end, traceback)
  if ok then return true end
  return false, err
end

local function timer_event(t, A)
  return { id = t.id, type = "timer:" .. t.command, position = nil,
    stream = (A and A.prefix or (t.aggregate .. "-")) .. t.aggregate_id, version = nil }
end

-- Fires the due timers (each exactly once): -> fired | nil, err
function Runner:run_timers()
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local store, fired = self.store, 0
  if self.memory then
    local timers, due = mem(store).timers, {}
    local t_now = now()
    for _, t in pairs(timers) do if t.due <= t_now then due[#due + 1] = t end end
    table.sort(due, function(a, b) return a.due < b.due end)
    for _, t in ipairs(due) do
      local done, ferr = self:_fire(t)
      if done then
        timers[t.key] = nil
        fired = fired + 1
      else
        t.attempts = t.attempts + 1
        t.last_error = message_of(ferr)
        if t.attempts >= self.max_attempts then
          timers[t.key] = nil
          self:_dead_letter(t.workflow or "timers", timer_event(t, self.aggregates[t.aggregate]),
            ferr, t.attempts, t)
        else
          t.due = now() + self:_delay(t.attempts)
        end
      end
    end
    self.stats.timers_fired = self.stats.timers_fired + fired
    return fired
  end
  while true do
    ok, err = store:begin()
    if not ok then return nil, err end
    local rows
    rows, err = store:query(self:_q("SELECT key, id, workflow, aggregate, aggregate_id, command, payload, "
      .. "correlation_id, causation_id, attempts, " .. ts("due_at") .. " FROM <schema>.timers "
      .. "WHERE due_at <= clock_timestamp() ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED"), self.timer_batch)
    if not rows then self:_rollback(); return nil, err end
    if #rows == 0 then self:_rollback(); break end
    local batch_fired = 0
    for _, t in ipairs(rows) do
      ok, err = self:_sp("SAVEPOINT")
      if not ok then self:_rollback(); return nil, err end
      local done, ferr = self:_fire(t)
      if done then
        ok, err = self:_sp("RELEASE SAVEPOINT")
        if ok then ok, err = store:query(self:_q("DELETE FROM <schema>.timers WHERE key = $1"), t.key) end
        if not ok then self:_rollback(); return nil, err end
        batch_fired = batch_fired + 1
      else
        ok, err = self:_sp("ROLLBACK TO SAVEPOINT")
        if not ok or is_connection(ferr) then self:_rollback(); return nil, is_connection(ferr) and ferr or err end
        local n = t.attempts + 1
        if n >= self.max_attempts then
          t.attempts = n
          ok, err = self:_dead_letter(t.workflow or "timers", timer_event(t, self.aggregates[t.aggregate]), ferr, n, t)
          if ok then ok, err = store:query(self:_q("DELETE FROM <schema>.timers WHERE key = $1"), t.key) end
        else
          self:_log("timer %s failed (attempt %d of %d): %s", t.key, n, self.max_attempts, message_of(ferr))
          ok, err = store:query(self:_q("UPDATE <schema>.timers SET attempts = $2, last_error = $3, "
            .. "due_at = clock_timestamp() + $4::float8 * interval '1 second' WHERE key = $1"),
            t.key, n, message_of(ferr), self:_delay(n))
        end
        if not ok then self:_rollback(); return nil, err end
      end
    end
    ok, err = store:commit()
    if not ok then return nil, err end
    fired = fired + batch_fired
    if #rows < self.timer_batch then break end
  end
  self.stats.timers_fired = self.stats.timers_fired + fired
  return fired
end

-- Seconds until the next timer is due (nil: none).
function Runner:next_timer()
  if self.memory then
    local first
    for _, t in pairs(mem(self.store).timers) do
      if not first or t.due < first then first = t.due end
    end
    return first and math.max(0, first - now()) or nil
  end
  local rows = self.store:query(self:_q("SELECT extract(epoch FROM min(due_at) - clock_timestamp())::float8 AS s "
    .. "FROM <schema>.timers"))
  local s = rows and rows[1] and rows[1].s
  return s and math.max(0, s) or nil
end

return Runner
