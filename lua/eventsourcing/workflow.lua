-- eventsourcing.workflow: event-driven workflows (process managers).
--
--   local fulfilment = es.workflow {
--     name = "order-fulfilment",
--     on = {
--       OrderPlaced = function(event, ctx)
--         local r, err = ctx:execute(Inventory, "p1", "ReserveStock", { order_id = ..., quantity = 2 })
--         ctx:schedule(3600, Order, id, "ExpireDraft", {}, "expire:" .. id)   -- a timer
--         ctx:cancel("expire:" .. id)
--       end,
--     },
--   }
--   local runner = es.workflow.runner(store, { fulfilment }, {
--     aggregates  = { Order = Order, Inventory = Inventory },  -- timers find them by name
--     read_models = { Orders },      -- inline read models updated with the appends
--     batch_size = 50, max_attempts = 5, backoff = 0.05, max_backoff = 5,
--     listen = url_or_store,         -- as es.projector; false: poll only
--     log = function(line) end,
--   })
--   runner:catch_up()        -- every workflow up to the store's end + due timers
--   runner:run { poll = 1, stop = function() return done end }
--   runner:run_timers()      -- due timers only
--   runner:retry_dead_letters()  -> { retried = n, failed = n }
--   runner:status()
--   es.workflow.trace(store, correlation_id)  -> events of one chain, in order
--   es.workflow.cancel_timer(store, key)      -> true, removed
--   es.workflow.timers(store) / dead_letters(store [, workflow]) /
--   rejections(store [, workflow])            -> arrays of rows
--
-- Handlers: on[type](event, ctx). ctx:execute(A, id, command, data [, { metadata }])
-- loads A, decides and appends like repository:execute and returns
-- { version, position, events, state, already_done } or nil, err for a
-- business refusal (err.kind "rejected", "invalid" or "not_found"), which
-- is also recorded in <schema>.workflow_rejections. Any other failure
-- (connection, database, conflict beyond retries) raises: the event is
-- retried with backoff, and after max_attempts it goes to
-- <schema>.dead_letters while the workflow goes on with the next events.
-- A handler that raises is treated the same way.
--
-- Events appended by a workflow carry metadata correlation_id (the
-- triggering event's, or its id when it has none), causation_id (the
-- triggering event's id), workflow (the name) and command.
--
-- Exactly once, on PostgreSQL: each batch is ONE transaction on the
-- store's session: lock the workflow's checkpoint row in
-- <schema>.workflows (FOR UPDATE SKIP LOCKED: the lease; a second process
-- skips it), read the events after that checkpoint, run the handlers (each
-- event under a SAVEPOINT), append their commands' events, write timers,
-- rejections and dead letters, move the checkpoint, commit. Effects and
-- checkpoint commit together or not at all, so a crash (even kill -9)
-- anywhere leaves either the whole batch done or none of it. On top of
-- that, every event a workflow appends has an id derived from (workflow
-- name, triggering event id, step number, index) - a name-based UUID
-- (version 5, SHA-1, RFC 4122) - so running an event again after a replay
-- (a reset checkpoint, a dead letter retried, a memory store) appends
-- nothing twice: the store accepts the same ids at the same versions as an
-- idempotent success, and when the command is decided again on a newer
-- state the ids are found at their old versions ("already used"); both
-- count as "already done" (result.already_done = true).
--
-- Memory stores have no transactions: checkpoints, timers, rejections and
-- dead letters live in Lua tables and effects happen at once; the derived
-- ids make re-running an event harmless, so the same guarantees hold within
-- one process (a memory store does not outlive it anyway).
--
-- Timers: ctx:schedule(delay_seconds | "ISO-8601 instant", A, id, command,
-- data [, key]) writes a row of <schema>.timers (key unique; due_at =
-- the triggering event's recorded_at + delay, so a replay schedules the
-- same instant) in the batch's transaction. run_timers() takes due rows
-- FOR UPDATE SKIP LOCKED, executes each command and deletes the row in one
-- transaction, with event ids derived from the timer's id: a timer fires
-- exactly once, whoever runs it and whatever crashes. A timer command
-- that keeps failing goes to the dead letters too. A is looked up by its
-- key in opts.aggregates (register every aggregate a timer uses).
--
-- This module is the public face; the work is done by workflow_definition
-- (es.workflow{}), workflow_runner (on eventsourcing.follower),
-- workflow_context (what handlers do), workflow_timers,
-- workflow_dead_letters, workflow_store (tables and queries) and
-- workflow_ids (derived event ids).
local util = require "eventsourcing.util"
local ids = require "eventsourcing.workflow_ids"
local definition = require "eventsourcing.workflow_definition"
local wstore = require "eventsourcing.workflow_store"
local runner = require "eventsourcing.workflow_runner"

local M = {}

M.new, M.Workflow = definition.new, definition.Workflow
M.runner, M.Runner = runner.new, runner.Runner
M.Ctx = require("eventsourcing.workflow_context").Ctx
M.uuid5, M.NAMESPACE, M.derive_id = ids.uuid5, ids.NAMESPACE, ids.derive_id
M.sleep, M.now, M.iso_epoch = util.sleep, util.now, util.iso_epoch
for _, k in ipairs { "migrate", "_create_tables", "trace", "end_checkpoint", "cancel_timer",
                     "timers", "dead_letters", "rejections" } do
  M[k] = wstore[k]
end

-- retry_dead_letters(store, workflows, runner_opts) for scripts.
function M.retry_dead_letters(store, workflows, opts)
  return M.runner(store, workflows, opts):retry_dead_letters(opts)
end

return setmetatable(M, { __call = function(_, def) return M.new(def) end })
