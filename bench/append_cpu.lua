-- bench/append_cpu.lua - CPU per appended event, this process's and its
-- server backend's, for A/B work on a busy machine (CPU time sways much
-- less than rates do). Appends ES_BENCH_APPENDS times SIZE events to 10
-- streams in turn at their exact versions, as bench/append.lua does, after
-- a warm-up, and prints in microseconds per event
--   append_cpu_<SIZE>_client <us> us/event    this process (os.clock)
--   append_cpu_<SIZE>_server <us> us/event    its backend, commits included
--   append_cpu_<SIZE>_wall <us> us/event
-- The server's CPU is the backend's own time on a CPU
-- (/proc/<pid>/schedstat): run it on the machine the server runs on, as a
-- user who may read the server's /proc entries (else it says so, exit 3).
--
--   ES_BENCH_DATABASE_URL=... ES_BENCH_SIZE=100 ES_BENCH_APPENDS=2000 \
--   LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/lua5.4/?.so;;" \
--     lua5.4 bench/append_cpu.lua [SCHEMA]
local es = require "eventsourcing"
local now = require("eventsourcing.core").monotonic

local url = os.getenv("ES_BENCH_DATABASE_URL") or os.getenv("ES_TEST_DATABASE_URL")
if not url or url == "" then
  io.stderr:write("bench/append_cpu.lua: set ES_BENCH_DATABASE_URL\n")
  os.exit(2)
end
local SIZE = tonumber(os.getenv("ES_BENCH_SIZE") or "100")
local APPENDS = tonumber(os.getenv("ES_BENCH_APPENDS") or "1000")
local schema = arg[1] or "bench_append_cpu"
local store = assert(es.open(url, { schema = schema }))
assert(store:migrate())
local pid = store:query("SELECT pg_backend_pid() AS p")[1].p

local function backend_ns()
  local f = io.open(("/proc/%d/schedstat"):format(pid))
  local ns = f and tonumber(f:read("*a"):match("^(%d+)"))
  if f then f:close() end
  return ns
end
if not backend_ns() then
  io.stderr:write("bench/append_cpu.lua: cannot read the backend's /proc/<pid>/schedstat"
    .. " (another machine, or another user's process): SKIPPED\n")
  os.exit(3)
end

local batch = {}
for j = 1, SIZE do
  batch[j] = { type = "Ticked", data = { n = j, note = "hello" } }
end
local event = SIZE == 1 and batch[1] or batch
local tag = ("%x"):format(math.floor(now() * 1e6) % 0x7fffffff)
local names, versions = {}, {}
for i = 1, 10 do
  names[i] = ("Cpu%s_%d-%d"):format(tag, SIZE, i)
  versions[i] = 0
end
local k = 0
local function one()
  k = k % 10 + 1
  local r = assert(store:append(names[k], event, { expected_version = versions[k] }))
  versions[k] = r.version
end

for _ = 1, 20 do one() end
local c0, s0, t0 = os.clock(), backend_ns(), now()
for _ = 1, APPENDS do one() end
local c1, s1, t1 = os.clock(), backend_ns(), now()
local n = APPENDS * SIZE
io.write(("append_cpu_%d_client %.3f us/event\nappend_cpu_%d_server %.3f us/event\n"
  .. "append_cpu_%d_wall %.3f us/event\n"):format(SIZE, (c1 - c0) * 1e6 / n, SIZE,
  (s1 - s0) / 1e3 / n, SIZE, (t1 - t0) * 1e6 / n))
store:close()
