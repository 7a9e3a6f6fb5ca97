-- eventsourcing.rebuild_workers: a rebuild's replay spread over N worker
-- processes by stream-hash partition (projector:rebuild(name, { workers = N })).
--
-- The calling process forks N-1 copies of itself (core.fork: each copy
-- has the read model's handlers as they are) and replays partition 0
-- itself; worker k opens its own session (util.reopener: the store's
-- target and options as es.open got them) and replays partition k. Every
-- partition stops at one bound W fixed before the fork, so together they
-- replay exactly the events up to W; the caller then runs the one swap.
--
-- A worker reports through a file (its count, or its error's kind and
-- message) and its exit status. One that fails or dies fails the
-- rebuild; the caller kills the others when its own part fails.
local core = require "eventsourcing.core"
local util = require "eventsourcing.util"

local M = {}

local function write_file(path, text)
  local f = io.open(path, "w")
  if f then
    f:write(text)
    f:close()
  end
end

local function read_file(path)
  local f = io.open(path, "r")
  if not f then return "" end
  local text = f:read("*a") or ""
  f:close()
  os.remove(path)
  return text
end

-- In a worker: replay partition k in a session of its own, report, leave
-- (core.exit: none of the parent's sessions is closed from here).
local function child(reopen, replay, k, path)
  local ok, done, err = pcall(function()
    local store, oerr = reopen()
    if not store then return nil, oerr end
    local n, rerr = replay(store, k)
    -- close() reports a copy sent without waiting that failed unseen
    local closed, cerr = store:close()
    if n and not closed then return nil, cerr end
    return n, rerr
  end)
  if ok and done then
    write_file(path, "ok " .. tostring(done))
    core.exit(0)
  end
  local e = ok and err or done
  write_file(path, ("error %s\t%s"):format(type(e) == "table" and e.kind or "database",
    type(e) == "table" and e.message or tostring(e)))
  core.exit(1)
end

-- The outcome of worker `kid` (waited for). -> events | nil, err
local function collect(kid, n, what)
  local how, code = core.wait(kid.pid)
  local text = read_file(kid.path)
  local done = how == "exited" and code == 0 and tonumber(text:match("^ok (%d+)$"))
  if done then return done end
  local kind, msg = text:match("^error (%w+)\t(.*)$")
  if not kind then
    kind, msg = "database", how == "exited" and ("exited with status " .. tostring(code))
      or ("killed by signal " .. tostring(code))
  end
  return nil, core.error(kind, ("%s: worker %d of %d: %s"):format(what, kid.part, n, msg))
end

-- replay(store, k) -> events | nil, err replays partition k (of n).
-- -> events replayed by all | nil, err (every worker has ended either way)
function M.run(store, n, replay, what)
  local reopen = util.reopener(store)
  if not reopen then
    return nil, core.error("invalid", what .. ": workers > 1 needs a store opened with es.open "
      .. "(each worker opens its own session like it)")
  end
  local kids = {}
  local function stop_all()
    for _, kid in ipairs(kids) do
      core.kill(kid.pid)
      core.wait(kid.pid)
      os.remove(kid.path)
    end
  end
  -- garbage of the parent is collected here, not in a worker: a cursor's
  -- or store's finalizer run there would talk on the parent's session
  collectgarbage("collect")
  for k = 1, n - 1 do
    local path = os.tmpname()
    local pid, err = core.fork()
    if not pid then
      os.remove(path)
      stop_all()
      return nil, err
    end
    if pid == 0 then child(reopen, replay, k, path) end
    kids[#kids + 1] = { pid = pid, path = path, part = k }
  end
  local ok, total, err = pcall(replay, store, 0)
  if not ok or not total then
    stop_all()
    if not ok then error(total, 0) end
    return nil, err
  end
  local failure
  for _, kid in ipairs(kids) do
    local done, kerr = collect(kid, n, what)
    if done then total = total + done else failure = failure or kerr end
  end
  if failure then return nil, failure end
  return total
end

return M
