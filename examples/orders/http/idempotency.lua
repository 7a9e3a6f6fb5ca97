-- examples/orders/http/idempotency.lua: commands that are safe to retry
-- (the Idempotency-Key header), pool-thread side, no ngx.
--
--   local idem = require "orders.http.idempotency"
--   idem.migrate(store)
--   local status, body, etag, location, replayed = idem.run(store, {
--     principal = "customer:alice", key = "k-1", method = "POST", path = "/orders/..",
--     body = "...", ttl = 86400,
--   }, function(ctx) ... return status, body, etag, location end)
--   -- inside: ctx.execute(repo, A, id, command, data, opts) and ctx.id(what)
--
-- A key belongs to one principal (customer or admin user): the same key of
-- two principals are two keys. The first request with a key runs in ONE
-- transaction that first inserts the key's row in <schema>.http_idempotency
-- (the primary key (principal, key) makes a racing second attempt wait
-- there until the first commits), then appends the command's events, then
-- stores the response (status, body, ETag, Location) in that row, and
-- commits: events and response are stored together or not at all.
-- Later requests with the key find the row: the same request (method, path
-- and body, compared by SHA-1) gets the stored response again and appends
-- nothing; another request gets 422.
-- Responses that say "try again" (5xx, and 409 for a concurrent writer) are
-- not stored: the transaction rolls back and a retry runs afresh.
--
-- Event ids (and the id of an order that POST /orders creates) are
-- name-based UUIDs (v5) of (principal, key, request hash, index): a racing
-- retry derives the same ids, and even when a key's row is gone (it
-- expired after ttl seconds, default 24 h) a late retry of the same request
-- cannot append its events again: the store holds those ids already, and
-- the request gets 422 "was used before and has expired". An expired key
-- may be used again for a different request.
local es = require "eventsourcing"
local workflow = require "eventsourcing.workflow"
local repository = require "eventsourcing.repository"
local read_model = require "eventsourcing.read_model"
local util = require "eventsourcing.util"

local M = {}

M.DEFAULT_TTL = 24 * 3600
M.NAMESPACE = workflow.uuid5("6ba7b811-9dad-11d1-80b4-00c04fd430c8", "eventsourcing:http-idempotency")

local function tbl(store) return ('"%s".http_idempotency'):format(store:schema()) end

-- Creates the table once per database (IF NOT EXISTS; two sessions racing
-- to create it meet at the catalog's unique index: the loser retries).
function M.migrate(store)
  local steps = {
    ([[CREATE TABLE IF NOT EXISTS %s (
      principal text NOT NULL,
      key text NOT NULL,
      request_hash text NOT NULL,
      status int,
      body text,
      etag text,
      location text,
      created_at timestamptz NOT NULL DEFAULT now(),
      expires_at timestamptz NOT NULL,
      PRIMARY KEY (principal, key))]]):format(tbl(store)),
    ("CREATE INDEX IF NOT EXISTS http_idempotency_expires ON %s (expires_at)"):format(tbl(store)),
  }
  for _, sql in ipairs(steps) do
    local ok, err
    for _ = 1, 3 do
      ok, err = store:query(sql)
      if ok or (err.sqlstate ~= "23505" and err.sqlstate ~= "42P07") then break end
    end
    if not ok then return nil, err end
  end
  return true
end

-- A key: 1 to 200 visible ASCII characters.
function M.valid_key(key)
  return type(key) == "string" and #key >= 1 and #key <= 200 and not key:find("[^\33-\126]")
end

-- The request's fingerprint: a name-based UUID (SHA-1, in C) of method,
-- path and body.
function M.request_hash(method, path, body)
  return workflow.uuid5(M.NAMESPACE, ("request\0%s\0%s\0%s"):format(method, path, body or ""))
end

-- (not a response to keep: the expired key may name a new request)
local function expired(ctx)
  ctx.keep = false
  return es.error("rejected", "this Idempotency-Key was used for this request before and has"
    .. " expired; use a new key")
end

local function expectation_met(expected, version)
  if expected == nil or expected == es.ANY then return true end
  if expected == es.NO_STREAM then return version == 0 end
  if expected == es.STREAM_EXISTS then return version > 0 end
  return expected == version
end

-- repo:execute inside the caller's open transaction, with event ids from
-- id_of(i). Conflicts with other writers reload and decide again (the
-- transaction reads committed data statement by statement).
local function execute_in_tx(ctx, repo, id_of, A, id, command_name, command, opts)
  local store = repo.store
  local stream = A:stream(id)
  local base = util.merge(util.merge({}, repo.metadata), opts and opts.metadata)
  local command_id = id_of(0)
  if base.correlation_id == nil then base.correlation_id = command_id end
  if base.causation_id == nil then base.causation_id = command_id end
  if base.command == nil then base.command = command_name end
  -- the first event's id already stored: a retry of a request whose key
  -- expired (a live key would have found its row)
  local seen, serr = store:query(('SELECT 1 AS seen FROM "%s".events WHERE id = $1')
    :format(store:schema()), id_of(1))
  if not seen then return nil, serr end
  if #seen > 0 then return nil, expired(ctx) end
  local attempt = 0
  while true do
    local state, version = repo:load(A, id)
    if not state then return nil, version end
    local expected = opts and opts.expected_version
    if not expectation_met(expected, version) then
      return nil, es.error("conflict", ("expected version %s of stream %s, found %d")
        :format(tostring(expected), stream, version),
        { expected = expected, actual = version, stream = stream })
    end
    local events, err = A:decide(state, command_name, command)
    if not events then return nil, err end
    if #events == 0 then return { version = version, events = events, state = state } end
    local out = repository.events_to_append(A, stream, version, base, events, id_of)
    local res, aerr = store:append(stream, out, { expected_version = version })
    if res and res.version == version + #out then
      repository.stamp(out, res)
      if repo.read_models then
        local ok, rerr = read_model.apply_inline(store, repo.read_models, out)
        if not ok then return nil, rerr end
      end
      return { version = res.version, position = res.position, events = out,
               state = A:evolve(state, out) }
    end
    if res or (aerr.kind == "invalid" and tostring(aerr.message):find("already used", 1, true)) then
      return nil, expired(ctx)
    end
    if aerr.kind ~= "conflict" or attempt >= (repo.max_retries or 3)
        or tostring(aerr.message):find("aborted", 1, true) then
      -- a conflict, or an append refused with 40001 (it aborts the
      -- transaction): the whole request runs again in a new one
      if aerr.kind == "conflict" or aerr.sqlstate == "40001" then ctx.retry = true end
      return nil, aerr
    end
    attempt = attempt + 1
  end
end

local function lookup(store, principal, key)
  local rows, err = store:query(("SELECT request_hash, status, body, etag, location FROM %s"
    .. " WHERE principal = $1 AND key = $2 AND expires_at > now()"):format(tbl(store)), principal, key)
  if not rows then return nil, err end
  return rows[1] or false
end

local function replay(row, hash)
  if row.request_hash ~= hash then
    return 422, '{"error":{"kind":"invalid","message":"this Idempotency-Key was used with'
      .. ' another request (method, path or body); use a new key for a new request"}}\n'
  end
  local null = es.json.null
  local function v(x) if x == null then return nil end return x end
  return row.status, row.body, v(row.etag), v(row.location), true
end

-- Responses worth keeping: the command's outcome, not "try again".
local function final(status) return status < 500 and status ~= 409 end

-- The instances a request ran commands on, let go of by the state caches
-- of the repositories that ran them (Repository:forget).
local function forget(touched)
  for _, t in ipairs(touched) do t[1]:forget(t[2], t[3]) end
end

local function attempt(store, r, hash, handler, errors)
  local row, err = lookup(store, r.principal, r.key)
  if row == nil then return errors(err) end
  if row then return replay(row, hash) end
  local ok
  ok, err = store:begin()
  if not ok then return errors(err) end
  local results
  -- the instances ctx.execute ran a command on: whatever became of the
  -- transaction, their repositories' state caches let go of them (the
  -- command ran inside it, past the cache)
  local touched = {}
  local fine, raised = pcall(function()
    local t = tbl(store)
    -- an expired row of this key goes first, so the key can be used again
    local q
    q, err = store:query(("DELETE FROM %s WHERE principal = $1 AND key = $2 AND expires_at <= now()")
      :format(t), r.principal, r.key)
    if not q then return end
    local ins
    ins, err = store:query(("INSERT INTO %s (principal, key, request_hash, expires_at)"
      .. " VALUES ($1, $2, $3, now() + make_interval(secs => $4))"
      .. " ON CONFLICT (principal, key) DO NOTHING RETURNING 1 AS inserted"):format(t),
      r.principal, r.key, hash, tostring(r.ttl or M.DEFAULT_TTL))
    if not ins then return end
    if #ins == 0 then results = { again = true } return end   -- another attempt won
    local ctx = {
      id = function(what)
        return workflow.uuid5(M.NAMESPACE, ("%s\0%s\0%s\0%s"):format(r.principal, r.key, hash, what))
      end,
    }
    function ctx.execute(repo, A, id, command_name, command, opts)
      touched[#touched + 1] = { repo, A, id }
      return execute_in_tx(ctx, repo, function(i) return ctx.id("event:" .. i) end,
        A, id, command_name, command, opts)
    end
    -- (table.pack is not in LuaJIT)
    local st, body, etag, location = handler(ctx)
    results = { st, body, etag, location }
    if not final(results[1]) or ctx.keep == false then
      if ctx.retry then results = { again = true } end
      return
    end
    local up
    up, err = store:query(("UPDATE %s SET status = $3, body = $4, etag = $5, location = $6"
      .. " WHERE principal = $1 AND key = $2"):format(t),
      r.principal, r.key, tostring(results[1]), results[2], results[3], results[4])
    if not up then results = nil; return end
    ok, err = store:commit()
    if not ok then results = nil; return end
    results.committed = true
  end)
  if not fine then
    store:rollback()
    forget(touched)
    error(raised, 0)
  end
  forget(touched)
  if results and results.committed then
    return results[1], results[2], results[3], results[4]
  end
  store:rollback()
  if results and results.again then return "again" end
  if results then return results[1], results[2], results[3], results[4] end
  return errors(err)
end

-- Deletes up to `limit` expired keys (default 500) -> how many | nil, err.
-- M.run calls it every PURGE_EVERY requests of a thread, outside their
-- transactions, so the table holds about one TTL's worth of keys.
function M.purge(store, limit)
  local rows, err = store:query(("DELETE FROM %s WHERE ctid IN (SELECT ctid FROM %s"
    .. " WHERE expires_at <= now() LIMIT %d) RETURNING 1 AS gone"):format(tbl(store), tbl(store),
    math.floor(limit or 500)))
  if not rows then return nil, err end
  return #rows
end

M.PURGE_EVERY = 100
local runs = 0

-- Runs handler once per (principal, key); see the header. errors(err)
-- turns a store error into a response.
function M.run(store, r, handler, errors)
  local hash = M.request_hash(r.method, r.path, r.body)
  runs = runs + 1
  if runs % M.PURGE_EVERY == 0 then M.purge(store) end
  for _ = 1, 5 do
    local status, body, etag, location, replayed = attempt(store, r, hash, handler, errors)
    if status ~= "again" then return status, body, etag, location, replayed end
  end
  return errors(es.error("conflict", "another request with this Idempotency-Key is still running"))
end

return M
