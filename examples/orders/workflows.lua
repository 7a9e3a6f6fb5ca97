-- examples/orders/workflows.lua: the order workflows (stock reservations,
-- out-of-stock compensation, expiry of draft orders).
--
--   local workflows = require "orders.workflows"
--   local runner = workflows.runner(store, { draft_ttl = 3600 })
--   runner:catch_up()          -- or runner:run { poll = 1 }
--   workflows.demo(store, print)
--
-- The "order-fulfilment" workflow:
--   OrderCreated   -> a timer: cancel the order with reason "expired" if it
--                     is still a draft after draft_ttl seconds (key
--                     "order-expiry:<order id>")
--   OrderPlaced    -> cancel that timer; reserve stock (Inventory-<product>)
--                     for every line of the order as placed; if a line does
--                     not fit, release what was reserved and cancel the
--                     order with reason "out of stock"
--   OrderCancelled -> cancel the timer; when the order had been placed,
--                     release its reservations (no-ops where none is held)
-- Every command is safe to repeat (the Inventory ignores a second
-- reservation or a release of nothing; CancelOrder of a cancelled order is
-- a no-op), and the workflow's event ids are derived from the triggering
-- event, so replays append nothing twice.
local es = require "eventsourcing"
local Order = require "orders.order"
local inventory = require "orders.inventory"

local Inventory = inventory.Inventory

local M = { Order = Order, Inventory = Inventory, inventory = inventory }

M.DEFAULT_DRAFT_TTL = 24 * 3600

-- The Order aggregate plus the timer's command: ExpireDraft cancels the
-- order with reason "expired" only while it is still a draft (a timer that
-- fires just after the order was placed changes nothing). Same stream,
-- same state and events as Order.
M.OrderTimers = es.aggregate {
  name = "Order",
  initial = function() return Order:initial() end,
  apply = Order.apply_handlers,
  upcast = Order.upcasters,
  snapshot_every = Order.snapshot_every,
  snapshot_version = Order.snapshot_version,
  decide = {
    ExpireDraft = function(state)
      if state.status ~= "draft" then return nil end
      return Order.decide_handlers.CancelOrder(state, { reason = "expired" })
    end,
  },
}

-- Aggregates by name, for the runner (timers are stored by name).
M.aggregates = { Order = Order, Inventory = Inventory, OrderTimers = M.OrderTimers }

function M.expiry_key(order_id) return "order-expiry:" .. order_id end

local function order_id_of(e)
  return (type(e.data) == "table" and e.data.order_id) or e.stream:sub(#"Order-" + 1)
end

-- The workflow definition. opts.draft_ttl: seconds a draft may live
-- (default 24 h; false: no expiry); opts.name (default "order-fulfilment").
function M.fulfilment(opts)
  opts = opts or {}
  local ttl = opts.draft_ttl
  if ttl == nil then ttl = M.DEFAULT_DRAFT_TTL end
  return es.workflow {
    name = opts.name or "order-fulfilment",
    on = {
      OrderCreated = function(e, ctx)
        if ttl then
          ctx:schedule(ttl, M.OrderTimers, order_id_of(e), "ExpireDraft", {}, M.expiry_key(order_id_of(e)))
        end
      end,

      OrderPlaced = function(e, ctx)
        local id = e.stream:sub(#"Order-" + 1)
        ctx:cancel(M.expiry_key(id))
        local order = ctx:load(Order, id, { version = e.version })   -- the order as placed
        local reserved, short = {}, false
        for _, item in ipairs(order.items) do
          local r = ctx:execute(Inventory, item.product_id, "ReserveStock",
            { order_id = id, quantity = item.quantity })
          if r and r.state.reservations[id] then
            reserved[#reserved + 1] = item.product_id
          else
            short = true
            break
          end
        end
        if short then
          for _, product_id in ipairs(reserved) do
            ctx:execute(Inventory, product_id, "ReleaseStock", { order_id = id })
          end
          ctx:execute(Order, id, "CancelOrder", { reason = "out of stock" })
        end
      end,

      OrderCancelled = function(e, ctx)
        local id = e.stream:sub(#"Order-" + 1)
        ctx:cancel(M.expiry_key(id))
        if e.data.previous_status ~= "placed" then return end
        local order = ctx:load(Order, id, { version = e.version })
        for _, item in ipairs(order.items) do
          ctx:execute(Inventory, item.product_id, "ReleaseStock", { order_id = id })
        end
      end,
    },
  }
end

-- A runner for the order workflows. opts: draft_ttl, name (see
-- fulfilment), read_models (default: the service's inline read models, so
-- orders the workflow cancels show in rm_orders at once; false: none, when
-- a projector keeps them), and any es.workflow.runner option.
function M.runner(store, opts)
  opts = opts or {}
  local ropts = {}
  for k, v in pairs(opts) do ropts[k] = v end
  ropts.aggregates = M.aggregates
  if opts.read_models == nil then
    ropts.read_models = require("orders.service").read_models
  elseif opts.read_models == false then
    ropts.read_models = nil
  end
  return es.workflow.runner(store, { M.fulfilment(opts) }, ropts)
end

-- Service methods (a service adds them with one line each):
--   method("receive_stock", function(args, meta) return workflows.receive_stock(repo, args, meta) end)
--   method("stock", function(product_id) return workflows.stock(repo, product_id) end)
M.receive_stock = inventory.receive_stock
M.stock = inventory.stock

-- ---------------------------------------------------------------------------
-- The demo: a chain, an out-of-stock compensation and its trace, an
-- expired draft. store: migrated for the service (service.migrate);
-- print: function(line) (default: print).

local function short(id) return tostring(id):sub(-6) end

function M.demo(store, out)
  out = out or print
  local service = require "orders.service"
  local function must(r, err)
    if r == nil then error("workflows demo: " .. tostring(err), 2) end
    return r
  end
  local function say(fmt, ...) out((fmt):format(...)) end
  must(service.migrate(store))
  local svc = service.new(store, { metadata = { app = "demo" } })
  local repo = es.repository(store)
  local runner = M.runner(store, { draft_ttl = 0.3, name = "order-fulfilment-demo" })
  must(runner:migrate())
  -- this demo's workflow ignores what happened before it (drafts left by
  -- other demos would expire at once with a 0.3 s time to live)
  must(runner:reset("order-fulfilment-demo", { checkpoint = es.workflow.end_checkpoint(store) }))

  local function stock_line(p)
    local s = must(M.stock(repo, p))
    return ("%s: on hand %d, reserved %d, available %d"):format(p, s.on_hand, s.reserved, s.available)
  end
  local function order_line(id)
    local state = must(repo:load(Order, id))
    return ("order …%s: %s%s"):format(short(id), state.status,
      state.cancel_reason and (" (" .. state.cancel_reason .. ")") or "")
  end
  local function correlation_of(id, type_)
    for _, e in ipairs(must(repo:history(Order, id))) do
      if e.type == type_ then return e.metadata.correlation_id end
    end
  end
  local function show_trace(corr)
    local events = must(es.workflow.trace(store, corr))
    say("   trace of correlation id …%s (%d events):", short(corr), #events)
    local by_id = {}
    for i, e in ipairs(events) do by_id[e.id] = i end
    for i, e in ipairs(events) do
      local cause = e.metadata and e.metadata.causation_id
      local stream = e.stream:gsub("^Order%-(.+)$", function(x) return "Order-…" .. short(x) end)
      say("     %d. %-20s %-26s%s", i, e.type, stream,
        by_id[cause] and cause ~= e.id and ("  caused by " .. by_id[cause]) or "")
    end
  end

  local suffix = short(es.workflow.derive_id("demo", tostring(os.time()), 0, 0))
  local widget, gadget = "widget-" .. suffix, "gadget-" .. suffix
  say("Stock arrives:")
  must(M.receive_stock(repo, { product_id = widget, quantity = 10 }))
  must(M.receive_stock(repo, { product_id = gadget, quantity = 1 }))
  say("   %s", stock_line(widget))
  say("   %s", stock_line(gadget))

  say("A placed order reserves its lines (OrderPlaced -> StockReserved x2):")
  local a = must(svc:create_order { customer_id = "demo-c1" })
  must(svc:add_item { order_id = a, product_id = widget, quantity = 2, unit_price = 1250 })
  must(svc:add_item { order_id = a, product_id = gadget, quantity = 1, unit_price = 4999 })
  must(svc:place_order { order_id = a })
  must(runner:catch_up())
  say("   %s", order_line(a))
  say("   %s", stock_line(widget))
  say("   %s", stock_line(gadget))
  show_trace(correlation_of(a, "OrderPlaced"))

  say("An order that does not fit is compensated (released, cancelled \"out of stock\"):")
  local b = must(svc:create_order { customer_id = "demo-c2" })
  must(svc:add_item { order_id = b, product_id = widget, quantity = 3, unit_price = 1250 })
  must(svc:add_item { order_id = b, product_id = gadget, quantity = 1, unit_price = 4999 })
  must(svc:place_order { order_id = b })
  must(runner:catch_up())          -- also handles the OrderCancelled it caused
  say("   %s", order_line(b))
  say("   %s", stock_line(widget))
  show_trace(correlation_of(b, "OrderPlaced"))

  say("Cancelling a placed order releases its stock:")
  must(svc:cancel_order { order_id = a, reason = "changed my mind" })
  must(runner:catch_up())
  say("   %s", order_line(a))
  say("   %s", stock_line(widget))
  say("   %s", stock_line(gadget))

  say("A draft left alone expires (timer, draft_ttl = 0.3 s here):")
  local c = must(svc:create_order { customer_id = "demo-c3" })
  must(runner:catch_up())
  say("   timers pending: %d", #must(es.workflow.timers(store)))
  es.workflow.sleep(0.4)
  local n, fired = runner:catch_up()
  must(n, fired)
  say("   timers fired: %d", fired)
  say("   %s", order_line(c))
  return { placed = a, out_of_stock = b, expired = c }
end

return M
