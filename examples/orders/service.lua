-- examples/orders/service.lua: the order service (commands and queries).
--
--   local service = require "orders.service"   -- with examples/ on LUA_PATH
--   local svc = service.new(store, { max_retries = 3 })
--   local id  = assert(svc:create_order({ customer_id = "c1" }, { user = "alice" }))
--   assert(svc:add_item { order_id = id, product_id = "p1", quantity = 2, unit_price = 1250 })
--   local order = assert(svc:get_order(id))
--
-- Every method returns a result, or nil, err with err.kind "invalid" (a
-- field is wrong: err.field names it), "not_found" (no such order),
-- "rejected" (a business rule; err.message says which) or a store error.
-- The optional last argument of a command is metadata for its events
-- (user, correlation_id, causation_id, ...). Methods work with `:` and `.`.
--
-- Queries (get_order, list_orders) read the OrderReadModel (rm_orders,
-- examples/orders/read_model.lua), kept up to date inline by the service's
-- repository, in the same transaction as each command's events: a query
-- sees every command that returned. service.new(store, { inline = false })
-- leaves the read model to a projector instead (eventually consistent);
-- service.fold_queries(store, repo) answers by folding the aggregate, for
-- stores without the read model. Any object with get_order(order_id) and
-- list_orders(customer_id, opts) can be passed as opts.queries.
local es = require "eventsourcing"
local Order = require "orders.order"
local orders_rm = require "orders.read_model"
local aggregate = require "eventsourcing.aggregate"
local new_uuid = require("eventsourcing.core").uuid

local M = { Order = Order }

local function invalid(field, message)
  return nil, es.error("invalid", field .. " " .. message, { field = field })
end

local function check_id(value, field)
  if value == nil or value == es.json.null then return invalid(field, "is required") end
  if type(value) ~= "string" then return invalid(field, "must be a string") end
  local ok, why = aggregate.valid_id(value)
  if not ok then return invalid(field, (why:gsub("^id ", ""))) end
  return true
end

local function not_found(order_id)
  return nil, es.error("not_found", ("order %s not found"):format(order_id),
    { order_id = order_id })
end

-- The public view of an order state.
-- Its items are the state's own lines, not copies: the aggregate makes
-- each { product_id, quantity, unit_price } (orders.order, and snapshots of
-- that state), and a view is encoded, never changed. (A copy per line was
-- most of a command's reply: 4.5 KB of garbage at 24 lines.)
function M.view(state, version)
  return {
    id = state.id, customer_id = state.customer_id, status = state.status,
    items = state.items, total = state.total, version = version,
    created_at = state.created_at, placed_at = state.placed_at,
    cancelled_at = state.cancelled_at, cancel_reason = state.cancel_reason,
  }
end

-- Queries by folding the aggregate (until a read model serves them).
function M.fold_queries(store, repo)
  local q = {}

  function q.get_order(order_id)
    local state, version = repo:load(Order, order_id)
    if not state then return nil, version end
    if version == 0 then return not_found(order_id) end
    return M.view(state, version)
  end

  -- Scans OrderCreated events of the "Order" category for the customer,
  -- then folds each order. Newest first (by creation instant, then position).
  function q.list_orders(customer_id)
    local found, after = {}, nil
    while true do
      local batch, checkpoint = store:read_all({ after = after, limit = 1000,
        category = "Order", types = { "OrderCreated" } })
      if not batch then return nil, checkpoint end
      for _, e in ipairs(batch) do
        if e.data.customer_id == customer_id then
          found[#found + 1] = { id = e.data.order_id, position = e.position }
        end
      end
      if #batch == 0 or checkpoint == nil or checkpoint == after then break end
      after = checkpoint
    end
    local list = {}
    for _, f in ipairs(found) do
      local o, err = q.get_order(f.id)
      if not o then return nil, err end
      o.position = f.position
      list[#list + 1] = o
    end
    table.sort(list, function(a, b)
      if a.created_at ~= b.created_at and a.created_at and b.created_at then
        return a.created_at > b.created_at
      end
      return a.position > b.position
    end)
    for _, o in ipairs(list) do o.position = nil end
    return list
  end

  return q
end

-- The read models the service needs (for store:migrate-time creation and
-- for projectors): { Orders }.
M.read_models = { orders_rm.Orders }

-- Creates the store's schema and the service's read model tables.
function M.migrate(store)
  local ok, err = store:migrate()
  if not ok then return nil, err end
  return orders_rm.Orders:migrate(store)
end

-- service.new(store, opts): opts.max_retries, opts.snapshots, opts.cache
-- (repository options), opts.metadata (default metadata, e.g. { service = "orders" }),
-- opts.inline (default true), opts.queries (see above).
function M.new(store, opts)
  opts = opts or {}
  local repo = es.repository(store, { max_retries = opts.max_retries,
    snapshots = opts.snapshots, metadata = opts.metadata, cache = opts.cache,
    read_models = opts.inline ~= false and M.read_models or nil })
  local svc = { store = store, repository = repo }
  svc.queries = opts.queries or orders_rm.queries(store)

  -- methods usable as svc:m(...) and svc.m(...)
  local function method(name, f)
    svc[name] = function(a, ...)
      if a == svc then return f(...) end
      return f(a, ...)
    end
  end

  local function args_table(args)
    if type(args) ~= "table" then
      error("order service: arguments must be a table, got " .. type(args), 3)
    end
  end

  local function meta_of(meta)
    if meta ~= nil and type(meta) ~= "table" then
      error("order service: metadata must be a table", 3)
    end
    return { metadata = meta }
  end

  -- runs a command on an existing order
  local function run(command_name, args, meta, command)
    local ok, err = check_id(args.order_id, "order_id")
    if not ok then return nil, err end
    local r
    r, err = repo:execute(Order, args.order_id, command_name, command,
      { metadata = meta, expected_version = es.STREAM_EXISTS })
    if not r then
      if err.kind == "conflict" and err.actual == 0 then return not_found(args.order_id) end
      return nil, err
    end
    return { order_id = args.order_id, version = r.version, status = r.state.status,
             total = r.state.total, events = #r.events }
  end

  method("create_order", function(args, meta)
    args_table(args)
    local ok, err = check_id(args.customer_id, "customer_id")
    if not ok then return nil, err end
    local id = new_uuid()
    local r
    r, err = repo:execute(Order, id, "CreateOrder",
      { order_id = id, customer_id = args.customer_id },
      { metadata = meta_of(meta).metadata, expected_version = es.NO_STREAM })
    if not r then return nil, err end
    return id
  end)

  method("add_item", function(args, meta)
    args_table(args)
    return run("AddItem", args, meta_of(meta).metadata, { product_id = args.product_id,
      quantity = args.quantity, unit_price = args.unit_price })
  end)

  method("remove_item", function(args, meta)
    args_table(args)
    return run("RemoveItem", args, meta_of(meta).metadata, { product_id = args.product_id })
  end)

  method("place_order", function(args, meta)
    args_table(args)
    return run("PlaceOrder", args, meta_of(meta).metadata, {})
  end)

  method("cancel_order", function(args, meta)
    args_table(args)
    return run("CancelOrder", args, meta_of(meta).metadata, { reason = args.reason })
  end)

  -- stock, kept by the Inventory aggregate (one stream per product; the
  -- order workflows reserve and release it)
  local inventory = require "orders.inventory"
  method("receive_stock", function(args, meta) return inventory.receive_stock(repo, args, meta) end)
  method("stock", function(product_id) return inventory.stock(repo, product_id) end)

  method("get_order", function(order_id)
    local ok, err = check_id(order_id, "order_id")
    if not ok then return nil, err end
    return svc.queries.get_order(order_id)
  end)

  -- list_orders(customer_id, { status, limit, after }) -> orders, next
  -- (newest first; pass next as `after` for the following page)
  method("list_orders", function(customer_id, opts_)
    local ok, err = check_id(customer_id, "customer_id")
    if not ok then return nil, err end
    if opts_ ~= nil and type(opts_) ~= "table" then
      error("order service: list_orders options must be a table", 2)
    end
    return svc.queries.list_orders(customer_id, opts_)
  end)

  -- The audit trail: { version, type, data, metadata, recorded_at, ... }.
  method("history", function(order_id)
    local ok, err = check_id(order_id, "order_id")
    if not ok then return nil, err end
    local list
    list, err = repo:history(Order, order_id)
    if not list then return nil, err end
    if #list == 0 then return not_found(order_id) end
    return list
  end)

  -- The order as of a version (integer) or an instant (ISO-8601 string:
  -- the events recorded before it).
  method("order_at", function(order_id, when)
    local ok, err = check_id(order_id, "order_id")
    if not ok then return nil, err end
    local opts_
    if type(when) == "number" then
      if when % 1 ~= 0 or when < 1 then return invalid("version", "must be a positive integer") end
      opts_ = { version = when }
    elseif type(when) == "string" then
      if not when:match("^%d%d%d%d%-%d%d%-%d%d") then
        return invalid("at", "must be an ISO-8601 instant such as 2026-01-15T10:00:00Z")
      end
      opts_ = { at = when }
    else
      return invalid("at", "must be a version number or an ISO-8601 instant")
    end
    local state, version = repo:load(Order, order_id, opts_)
    if not state then return nil, version end
    if version == 0 then
      return nil, es.error("not_found", ("order %s did not exist at %s"):format(order_id,
        opts_.at or ("version " .. opts_.version)), { order_id = order_id })
    end
    if opts_.version and version < opts_.version then
      return nil, es.error("not_found", ("order %s has no version %d (it is at version %d)")
        :format(order_id, opts_.version, version), { order_id = order_id })
    end
    return M.view(state, version)
  end)

  return svc
end

return M
