-- examples/orders/http/draft_view.lua: GET /orders/{id} of a draft order in
-- one statement, answered with the JSON PostgreSQL builds from the read
-- model's row (pool-thread side, no ngx; no JSON decode or encode in Lua).
--
--   local draft_view = require "orders.http.draft_view"
--   local found, body, version, customer_id = draft_view.get(store, order_id)
--   -- found false: answer by folding the stream as before (not a draft, no
--   -- row, a row behind the stream, or no rm_orders table); nil, err: the
--   -- database failed
--
-- The row serves only when its version is the order stream's last version,
-- read in the same statement (one snapshot): the answer is exactly the
-- fold's, whoever keeps rm_orders (inline or a projector) and however far
-- behind it is. Only drafts: a placed order's reservation comes from the
-- Inventory streams, and a cancelled one keeps an explicit null reason.
-- The body has the fields and values of service.view plus a reservation
-- of status "none" per item (orders.http.stock for orders never placed).
local M = {}

-- the instants as eventsourcing.util.ts_sql formats them (the store's own
-- recorded_at form)
local function ts(col)
  return ([[to_char(r.%s AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')]]):format(col)
end

-- rm_orders' items are the fold's items (read model and aggregate apply the
-- same events alike: orders.read_model, orders.order)
local SQL = [[
SELECT r.version, r.customer_id, json_build_object(
  'id', r.id, 'customer_id', r.customer_id, 'status', r.status,
  'items', coalesce(r.items, '[]'::jsonb), 'total', r.total, 'version', r.version,
  'created_at', ]] .. ts("created_at") .. [[,
  'reservation', json_build_object('status', 'none', 'items', coalesce((
    SELECT json_agg(json_build_object('product_id', i.v->'product_id',
      'quantity', i.v->'quantity', 'status', 'none') ORDER BY i.n)
    FROM jsonb_array_elements(r.items) WITH ORDINALITY AS i(v, n)), '[]'::json))
)::text AS body
FROM %s.rm_orders r
WHERE r.id = $1 AND r.status = 'draft' AND r.placed_at IS NULL AND r.cancelled_at IS NULL
  AND r.created_at IS NOT NULL AND r.total IS NOT NULL
  AND r.version = (SELECT max(e.version) FROM %s.events e WHERE e.stream = $2)]]

local sql_of = {}   -- schema -> statement
local missing = setmetatable({}, { __mode = "k" })   -- store -> true: no rm_orders

function M.get(store, order_id)
  if missing[store] then return false end
  local schema = store:schema()
  local sql = sql_of[schema]
  if not sql then
    local q = ('"%s"'):format(schema)
    sql = SQL:format(q, q)
    sql_of[schema] = sql
  end
  local rows, err = store:query(sql, order_id, "Order-" .. order_id)
  if not rows then
    if type(err) == "table" and err.sqlstate == "42P01" then   -- undefined table
      missing[store] = true
      return false
    end
    return nil, err
  end
  local r = rows[1]
  if not r then return false end
  return true, r.body .. "\n", r.version, r.customer_id
end

return M
