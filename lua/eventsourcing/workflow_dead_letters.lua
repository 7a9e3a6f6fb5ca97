-- eventsourcing.workflow_dead_letters: events (and timers) that kept
-- failing, recorded with their error, and run again on demand.
local core = require "eventsourcing.core"
local util = require "eventsourcing.util"
local wstore = require "eventsourcing.workflow_store"

local json = core.json
local now, iso = util.now, util.iso
local mem, message_of = wstore.mem, wstore.message_of

local Runner = {}     -- methods the runner takes in

function Runner:_dead_letter(wf_name, e, err, attempts, timer)
  local message = message_of(err)
  self.stats.dead_lettered = self.stats.dead_lettered + 1
  self:_log("workflow %s: event %s (%s, position %s) goes to the dead letters after %d attempts: %s",
    wf_name, tostring(e.id), tostring(e.type), tostring(e.position), attempts, message)
  if self.memory then
    local dl = mem(self.store).dead_letters
    for _, d in ipairs(dl) do
      if d.workflow == wf_name and d.event_id == e.id then
        d.error, d.attempts, d.failed_at = message, d.attempts + attempts, iso(now())
        return true
      end
    end
    dl[#dl + 1] = { workflow = wf_name, event_id = e.id, position = e.position, type = e.type,
      stream = e.stream, version = e.version, error = message, attempts = attempts,
      first_failed_at = iso(now()), failed_at = iso(now()), timer = timer }
    return true
  end
  return self.store:query(self:_q([[INSERT INTO <schema>.dead_letters
      (workflow, event_id, position, type, stream, version, error, attempts, timer)
      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::json)
      ON CONFLICT (workflow, event_id) DO UPDATE SET error = excluded.error,
      attempts = dead_letters.attempts + excluded.attempts, failed_at = now()]]),
    wf_name, e.id, e.position, e.type, e.stream, e.version, message, attempts,
    timer and json.encode(timer) or nil)
end

local function read_event(store, stream, version, id)
  local it, err = store:read(stream, { from = version, to = version, limit = 1 })
  if not it then return nil, err end
  for e in it do
    if e.id == id then return e end
  end
  return nil, core.error("not_found", ("event %s (stream %s, version %s) not found")
    :format(tostring(id), tostring(stream), tostring(version)))
end

-- Runs the dead letters of this runner's workflows again (oldest event
-- first), once each: a success removes the dead letter, a failure
-- updates it (attempts, error). Dead timers are put back as due now.
-- opts.workflow: only that workflow's; opts.event_id: only that event's.
-- -> { retried = n, failed = n } | nil, err
function Runner:retry_dead_letters(opts)
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local only = opts and opts.workflow
  local store = self.store
  local list
  list, err = wstore.dead_letters(store, only)
  if not list then return nil, err end
  if opts and opts.event_id then   -- one dead letter (the admin tool's retry ID)
    local keep = {}
    for _, d in ipairs(list) do if d.event_id == opts.event_id then keep[#keep + 1] = d end end
    list = keep
  end
  local out = { retried = 0, failed = 0 }
  for _, d in ipairs(list) do
    local wf = self.by_name[d.workflow]
    if d.timer then
      local t = d.timer
      if self.memory then
        local ts_ = mem(store).timers
        if not ts_[t.key] then
          t.attempts, t.due = 0, now()
          ts_[t.key] = t
        end
        local dl = mem(store).dead_letters
        for i, x in ipairs(dl) do if x == d then table.remove(dl, i); break end end
      else
        ok, err = store:begin()
        if not ok then return nil, err end
        ok, err = store:query(self:_q([[INSERT INTO <schema>.timers
            (key, id, workflow, due_at, aggregate, aggregate_id, command, payload, correlation_id, causation_id)
            VALUES ($1, $2, $3, clock_timestamp(), $4, $5, $6, $7::json, $8, $9) ON CONFLICT (key) DO NOTHING]]),
          t.key, t.id, t.workflow, t.aggregate, t.aggregate_id, t.command, json.encode(t.payload or json.object {}),
          t.correlation_id, t.causation_id)
        if ok then
          ok, err = store:query(self:_q("DELETE FROM <schema>.dead_letters WHERE workflow = $1 AND event_id = $2"),
            d.workflow, d.event_id)
        end
        if not ok then self:_rollback(); return nil, err end
        ok, err = store:commit()
        if not ok then return nil, err end
      end
      out.retried = out.retried + 1
    elseif wf then
      local e
      e, err = read_event(store, d.stream, d.version, d.event_id)
      if not e then return nil, err end
      local locked = true
      ok, err = self:_begin()
      if not ok then return nil, err end
      if not self.memory then
        local rows
        rows, err = store:query(self:_q("SELECT 1 AS x FROM <schema>.dead_letters WHERE workflow = $1 "
          .. "AND event_id = $2 FOR UPDATE SKIP LOCKED"), d.workflow, d.event_id)
        if not rows then self:_rollback(); return nil, err end
        locked = #rows > 0
      end
      if locked then
        ok, err = self:_sp("SAVEPOINT")
        if not ok then self:_rollback(); return nil, err end
        local done, ferr = self:_handle(wf, e)
        if done then
          ok, err = self:_sp("RELEASE SAVEPOINT")
          if ok then
            if self.memory then
              local dl = mem(store).dead_letters
              for i, x in ipairs(dl) do if x == d then table.remove(dl, i); break end end
            else
              ok, err = store:query(self:_q("DELETE FROM <schema>.dead_letters WHERE workflow = $1 AND event_id = $2"),
                d.workflow, d.event_id)
            end
          end
          out.retried = out.retried + 1
        else
          ok, err = self:_sp("ROLLBACK TO SAVEPOINT")
          if ok then ok, err = self:_dead_letter(wf.name, e, ferr, 1) end
          out.failed = out.failed + 1
        end
        if not ok then self:_rollback(); return nil, err end
        ok, err = self:_commit()
        if not ok then return nil, err end
      else
        self:_rollback()
      end
    end
  end
  return out
end


return Runner
