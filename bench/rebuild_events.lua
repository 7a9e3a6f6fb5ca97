-- bench/rebuild_events.lua: the rebuild benches' events, generated in the
-- database: n events (a multiple of 10,000) of 5-event orders in the
-- events table of the quoted schema q, 200,000 per statement. Blocks of
-- 2,000 orders whose 5 events interleave over 10,000 positions (orders in
-- flight at the same time, as in a live shop).
return function(store, q, n)
  local CHUNK = 200000
  for from = 0, n - 1, CHUNK do
    local to = math.min(n, from + CHUNK) - 1
    assert(store:query(([[
      INSERT INTO %s.events (id, stream, category, version, type, data, metadata)
      SELECT gen_random_uuid(), 'Order-' || o, 'Order', s + 1,
        CASE s WHEN 0 THEN 'OrderCreated' WHEN 1 THEN 'ItemAdded' WHEN 2 THEN 'ItemAdded'
               WHEN 3 THEN 'ItemRemoved' ELSE CASE WHEN o %% 10 = 0 THEN 'OrderCancelled'
               ELSE 'OrderPlaced' END END,
        CASE s WHEN 0 THEN jsonb_build_object('order_id', o::text, 'customer_id', 'c' || (o %% 5000))
               WHEN 1 THEN '{"product_id":"p1","quantity":2,"unit_price":1250}'::jsonb
               WHEN 2 THEN '{"product_id":"p2","quantity":1,"unit_price":499}'::jsonb
               WHEN 3 THEN '{"product_id":"p2","quantity":1,"unit_price":499}'::jsonb
               ELSE CASE WHEN o %% 10 = 0 THEN '{"reason":"changed my mind","previous_status":"draft"}'::jsonb
               ELSE '{"total":2500,"item_count":1}'::jsonb END END,
        '{"schema_version":2}'::jsonb
      FROM generate_series(%d, %d) AS g,
           LATERAL (SELECT (g / 10000) * 2000 + g %% 2000 AS o, (g %% 10000) / 2000 AS s) AS x
      ORDER BY g]]):format(q, from, to)))
  end
  assert(store:query(("ANALYZE %s.events"):format(q)))
end
