-- eventsourcing.admin.transfer: export and import of events as NDJSON, a
-- full backup and restore between databases.
--
-- One line per event, in the global order (txid, position):
--   {"id":..,"stream":..,"version":..,"type":..,"data":..,"metadata":..,
--    "recorded_at":..,"position":..,"checkpoint":"<txid>:<position>"}
-- data and metadata are the stored JSON text, byte for byte (built in SQL:
-- a Lua round trip would reorder object keys). position and checkpoint
-- say where the event was; import ignores them (positions are the target
-- store's own) and keeps ids, streams, versions, types, payloads and
-- recorded_at.
local common = require "eventsourcing.admin.common"
local core = require "eventsourcing.core"

local json = core.json
local fail, q = common.fail, common.q

local M = {}

local PAGE = 5000

local function parse_checkpoint(cp)
  if cp == nil then return "0", 0 end
  local t, p = tostring(cp):match("^(%d+):(%d+)$")
  if not t then return nil end
  return t, tonumber(p)
end

-- Under read_all's watermark: only rows of transactions older than every
-- one still running, so a backup never skips an event committed late.
-- Each line is built as text: json_build_object would space it out, and
-- data/metadata must stay the stored text.
local EXPORT_SQL = [[SELECT txid::text || ':' || position AS cp,
  '{"id":"' || id || '","stream":' || to_json(stream) || ',"version":' || version
  || ',"type":' || to_json(type) || ',"data":' || data::text || ',"metadata":' || metadata::text
  || ',"recorded_at":"' || to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
  || '","position":' || position || ',"checkpoint":"' || txid || ':' || position || '"}' AS line
  FROM <schema>.events
  WHERE txid < pg_snapshot_xmin(pg_current_snapshot())
    AND (txid, position) > ($1::xid8, $2::bigint)
    AND ($3::text IS NULL OR category = $3)
  ORDER BY txid, position LIMIT $4]]

-- export(store, { category, after = checkpoint }, write) calls write(line)
-- for each event. -> { events = n, checkpoint = last one (or after) } | nil, err
function M.export(store, opts, write)
  opts = opts or {}
  local ok, err = common.need_pg(store, "export")
  if not ok then return nil, err end
  local txid, pos = parse_checkpoint(opts.after)
  if not txid then
    return fail("invalid", "--after must be a checkpoint such as 1234:567 (txid:position), not %q",
      tostring(opts.after))
  end
  local n, cp = 0, opts.after
  while true do
    local rows
    rows, err = store:query(q(store, EXPORT_SQL), txid, pos, opts.category, PAGE)
    if not rows then return nil, err end
    for _, r in ipairs(rows) do write(r.line) end
    n = n + #rows
    if #rows == 0 then break end
    cp = rows[#rows].cp
    txid, pos = parse_checkpoint(cp)
    if #rows < PAGE then break end
  end
  return { events = n, checkpoint = cp }
end

-- Import ---------------------------------------------------------------------

local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

local function bad(lno, fmt, ...)
  return fail("invalid", "line %d: " .. fmt, lno, ...)
end

-- One line -> entry { lno, raw, id, stream, version } | nil, err
local function parse_line(raw, lno)
  if raw:find("\\u0000", 1, true) then return bad(lno, "\\u0000 cannot be stored") end
  local e, err = json.decode(raw)
  if not e then return bad(lno, "not JSON: %s", err.message) end
  if type(e) ~= "table" then return bad(lno, "not a JSON object") end
  if type(e.id) ~= "string" or not e.id:lower():match(UUID) then return bad(lno, "id must be a UUID") end
  if type(e.stream) ~= "string" or e.stream == "" then return bad(lno, "stream must be a non-empty string") end
  if math.type and math.type(e.version) ~= "integer" or type(e.version) ~= "number"
      or e.version < 1 or e.version % 1 ~= 0 then
    return bad(lno, "version must be a positive integer")
  end
  if type(e.type) ~= "string" or e.type == "" then return bad(lno, "type must be a non-empty string") end
  if e.data == nil then return bad(lno, "data is missing") end
  if type(e.metadata) ~= "table" then return bad(lno, "metadata must be an object") end
  if type(e.recorded_at) ~= "string" or not core.time_parse(e.recorded_at) then
    return bad(lno, "recorded_at must be an ISO-8601 instant")
  end
  return { lno = lno, raw = raw, id = e.id:lower(), stream = e.stream, version = e.version }
end

local function json_list(list, f)
  local arr = json.array({})
  for i, x in ipairs(list) do arr[i] = f(x) end
  return json.encode(arr)
end

-- Learns the versions of streams not seen yet (a stream's version is its
-- last event's). A writer appending to one of them meanwhile takes a
-- version this import takes too: the unique (stream, version) index
-- refuses one of the two, and an import refused that way imported nothing.
local function learn_streams(store, chunk, cur)
  local fresh, seen = {}, {}
  for _, e in ipairs(chunk) do
    if cur[e.stream] == nil and not seen[e.stream] then
      seen[e.stream] = true
      fresh[#fresh + 1] = e.stream
    end
  end
  if #fresh == 0 then return true end
  local rows, err = store:query(q(store, "SELECT s.stream, l.version, l.txid > pg_current_xact_id() AS younger "
    .. "FROM json_array_elements_text($1::json) AS s(stream) CROSS JOIN LATERAL (SELECT version, txid "
    .. "FROM <schema>.events e WHERE e.stream = s.stream ORDER BY version DESC LIMIT 1) l"),
    json_list(fresh, tostring))
  if not rows then return nil, err end
  for _, s in ipairs(fresh) do cur[s] = 0 end
  for _, r in ipairs(rows) do
    -- append()'s rule: readers order by (txid, position), so events added
    -- after those of a younger transaction would come out of version order
    if r.younger then
      return fail("conflict", "stream %s was appended to during the import; run the import again "
        .. "(nothing was imported; what is already there is skipped)", r.stream)
    end
    cur[r.stream] = r.version
  end
  return true
end

-- Events the store has at those versions must be the same events.
local function check_present(store, present)
  if #present == 0 then return true end
  local rows, err = store:query(q(store, "SELECT r.i, e.id::text AS id FROM json_to_recordset($1::json) "
    .. "AS r(i int, stream text, version bigint) LEFT JOIN <schema>.events e "
    .. "ON e.stream = r.stream AND e.version = r.version ORDER BY r.i"),
    json_list(present, function(e) return { i = e.i, stream = e.stream, version = e.version } end))
  if not rows then return nil, err end
  for _, r in ipairs(rows) do
    local e = present[r.i]
    if r.id ~= e.id then
      return bad(e.lno, "stream %s version %d is event %s in the store but %s in the file: "
        .. "the versions disagree (nothing imported)", e.stream, e.version, tostring(r.id), e.id)
    end
  end
  return true
end

-- New events' ids must be free.
local function check_ids(store, new)
  if #new == 0 then return true end
  local rows, err = store:query(q(store, "SELECT id::text AS id, stream, version FROM <schema>.events "
    .. "WHERE id IN (SELECT x::uuid FROM json_array_elements_text($1::json) AS x) LIMIT 1"),
    json_list(new, function(e) return e.id end))
  if not rows then return nil, err end
  local r = rows[1]
  if r then
    for _, e in ipairs(new) do
      if e.id == r.id then
        return bad(e.lno, "event id %s is already stream %s version %d in the store (nothing imported)",
          e.id, r.stream, r.version)
      end
    end
  end
  return true
end

local INSERT_SQL = [[INSERT INTO <schema>.events (id, stream, version, type, data, metadata, recorded_at,
                                 category)
  SELECT (r->>'id')::uuid, r->>'stream', (r->>'version')::bigint, r->>'type', r->'data',
         r->'metadata', (r->>'recorded_at')::timestamptz, split_part(r->>'stream', '-', 1)
  FROM json_array_elements($1::json) WITH ORDINALITY AS x(r, ord) ORDER BY ord]]

-- Sorts one chunk into events already present and new ones; versions must
-- continue the store's (or the file's own earlier lines).
local function classify(chunk, cur, ids)
  local present, new = {}, {}
  for _, e in ipairs(chunk) do
    local v = cur[e.stream]
    if e.version <= v then
      present[#present + 1] = e
      e.i = #present
    elseif e.version == v + 1 then
      if ids[e.id] then return bad(e.lno, "event id %s appears twice in the file", e.id) end
      ids[e.id] = true
      new[#new + 1] = e
      cur[e.stream] = e.version
    else
      return bad(e.lno, "stream %s is at version %d, the file's next event has version %d: "
        .. "the versions disagree (nothing imported)", e.stream, v, e.version)
    end
  end
  return present, new
end

local function import_chunk(store, chunk, cur, ids, out)
  local ok, err = learn_streams(store, chunk, cur)
  if not ok then return nil, err end
  local present, new = classify(chunk, cur, ids)
  if not present then return nil, new end
  ok, err = check_present(store, present)
  if ok then ok, err = check_ids(store, new) end
  if not ok then return nil, err end
  if #new > 0 then
    local raws = {}
    for i, e in ipairs(new) do raws[i] = e.raw end
    ok, err = store:query(q(store, INSERT_SQL), "[" .. table.concat(raws, ",") .. "]")
    if not ok then return nil, err end
  end
  out.imported, out.present = out.imported + #new, out.present + #present
  return true
end

local CHUNK = 1000

local function import_all(store, next_line, out)
  local cur, ids, chunk, lno = {}, {}, {}, 0
  while true do
    local raw = next_line()
    if raw then
      lno = lno + 1
      if raw:match("%S") then
        local e, err = parse_line(raw, lno)
        if not e then return nil, err end
        chunk[#chunk + 1] = e
        out.lines = out.lines + 1
      end
    end
    if #chunk > 0 and (#chunk >= CHUNK or not raw) then
      local ok, err = import_chunk(store, chunk, cur, ids, out)
      if not ok then return nil, err end
      chunk = {}
    end
    if not raw then return true end
  end
end

-- import(store, next_line): next_line() returns the next line or nil.
-- One transaction: any error imports nothing. Events the store already
-- has (same id at the same stream version) are skipped, so importing a
-- file twice changes nothing.
-- -> { lines, imported, present } | nil, err
function M.import(store, next_line)
  local ok, err = common.need_pg(store, "import")
  if not ok then return nil, err end
  ok, err = store:begin()
  if not ok then return nil, err end
  local out = { lines = 0, imported = 0, present = 0 }
  local pok, res, ierr = pcall(import_all, store, next_line, out)
  if pok and res then
    ok, err = store:commit()
    if not ok then return nil, err end
    return out
  end
  store:rollback()
  if not pok then error(res, 0) end
  return nil, ierr
end

return M
