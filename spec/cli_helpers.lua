-- Helpers for the specs of bin/eventsourcing (spec/5x): run it as a
-- process, with the same Lua flavour as the specs, and read what it did.
local helpers = require "helpers"

local M = {}

local q = helpers.shell_quote
local BIN = "bin/eventsourcing"
local APP = "examples/orders/app.lua"

function M.app_path() return APP end

-- The order service's app definitions, loaded as the tool loads them.
function M.app() return assert(dofile(APP)) end

-- The command line: opts.db (default the specs' database; false: none, and
-- no $ES_DATABASE_URL either), opts.schema, opts.app (true: the order app).
local function command(args, opts)
  opts = opts or {}
  local parts = { "env -u ES_DATABASE_URL", helpers.flavour(), BIN }
  if opts.db ~= false then parts[#parts + 1] = "--db " .. q(opts.db or helpers.database_url()) end
  if opts.schema then parts[#parts + 1] = "--schema " .. opts.schema end
  if opts.app then parts[#parts + 1] = "--app " .. q(opts.app == true and APP or opts.app) end
  parts[#parts + 1] = args
  return table.concat(parts, " ")
end
M.command = command

local function slurp_cmd(cmd)
  local f = assert(io.popen(cmd))
  local s = f:read("*a")
  f:close()
  return s
end

local function tmpfile()
  return os.tmpname()
end

-- -> { code, stdout, stderr }; opts.stdin / opts.stdout: files to redirect.
function M.run(args, opts)
  opts = opts or {}
  local out, err = opts.stdout or tmpfile(), tmpfile()
  local cmd = command(args, opts) .. (opts.stdin and (" <" .. q(opts.stdin)) or " </dev/null")
    .. " >" .. q(out) .. " 2>" .. q(err) .. "; echo $?"
  local code = tonumber(slurp_cmd(cmd):match("(%d+)%s*$"))
  local r = { code = code, stdout = helpers.read_file(out) or "", stderr = helpers.read_file(err) or "" }
  if not opts.stdout then os.remove(out) end
  os.remove(err)
  return r
end

-- The same on a pseudo-terminal (util-linux `script`): stdout and stderr
-- both land in r.stdout.
function M.run_tty(args, opts)
  local cmd = command(args, opts)
  local out = tmpfile()
  local rc = slurp_cmd(("script -qec %s /dev/null </dev/null >%s 2>&1; echo $?"):format(q(cmd), q(out)))
  local r = { code = tonumber(rc:match("(%d+)%s*$")), stdout = helpers.read_file(out) or "" }
  os.remove(out)
  return r
end

-- Starts the tool in the background: proc.out, proc.err, proc.pid;
-- proc:interrupt() sends SIGINT and returns its exit code.
function M.spawn(args, opts, dir)
  local proc = { out = dir .. "/out", err = dir .. "/err", rc = dir .. "/rc" }
  local script = ("%s >%s 2>%s & echo $! >%s/pid; wait $!; echo $? >%s"):format(command(args, opts),
    q(proc.out), q(proc.err), q(dir), q(proc.rc))
  os.execute("(" .. script .. ") </dev/null >/dev/null 2>&1 &")
  -- the shell creates the file before it writes the number: wait for digits
  M.wait_for(function() return (helpers.read_file(dir .. "/pid") or ""):match("%d+\n") end, 10)
  proc.pid = (helpers.read_file(dir .. "/pid") or ""):match("%d+")
  function proc.interrupt()
    helpers.sh("kill -INT " .. proc.pid)
    M.wait_for(function() return (helpers.read_file(proc.rc) or ""):match("%d+") end, 10)
    return tonumber((helpers.read_file(proc.rc) or ""):match("%d+"))
  end
  return proc
end

function M.wait_for(f, seconds)
  for _ = 1, seconds * 20 do
    if f() then return true end
    helpers.sleep(0.05)
  end
  return false
end

function M.lines(s)
  local n = 0
  for _ in (s or ""):gmatch("[^\n]+") do n = n + 1 end
  return n
end

function M.ndjson(s)
  local json = require("eventsourcing").json
  local out = {}
  for line in (s or ""):gmatch("[^\n]+") do out[#out + 1] = assert(json.decode(line)) end
  return out
end

-- export lines without where the events were (positions differ per store).
function M.strip_positions(s)
  return (s:gsub(',"position":%d+,"checkpoint":"%d+:%d+"', ""))
end

-- An app with one workflow "jobs" whose handler fails while file `flag`
-- exists; on JobPosted it marks Done-<stream> and schedules a reminder.
function M.failing_app(dir, flag)
  local path = dir .. "/jobs_app.lua"
  local f = assert(io.open(path, "w"))
  f:write(([[
local es = require "eventsourcing"
local Done = es.aggregate {
  name = "Done",
  initial = function() return {} end,
  apply = { JobDone = function() end },
  decide = { MarkDone = function() return { type = "JobDone", data = {} } end },
}
local jobs = es.workflow { name = "jobs", on = {
  JobPosted = function(e, ctx)
    local flag = io.open(%q)
    if flag then flag:close(); error("refusing on purpose") end
    ctx:execute(Done, e.stream, "MarkDone", {})
    ctx:schedule(3600, Done, e.stream, "MarkDone", {}, "remind:" .. e.stream)
  end } }
return { aggregates = { Done = Done }, workflows = { jobs } }
]]):format(flag))
  f:close()
  return path
end

-- An app whose workflow "later" schedules a timer (due at once) on
-- JobPosted; the timer's command fails while file `flag` exists.
function M.timer_app(dir, flag)
  local path = dir .. "/timer_app.lua"
  local f = assert(io.open(path, "w"))
  f:write(([[
local es = require "eventsourcing"
local Flaky = es.aggregate {
  name = "Flaky",
  initial = function() return {} end,
  apply = { Went = function() end },
  decide = { Go = function()
    local flag = io.open(%q)
    if flag then flag:close(); error("timer refusing on purpose") end
    return { type = "Went", data = {} }
  end },
}
local later = es.workflow { name = "later", on = {
  JobPosted = function(e, ctx) ctx:schedule(0, Flaky, e.stream, "Go", {}, "go:" .. e.stream) end } }
return { aggregates = { Flaky = Flaky }, workflows = { later } }
]]):format(flag))
  f:close()
  return path
end

-- An app with one read model kept by a projector only: rm_notes, one row
-- per Note-<id> stream counting its events.
function M.notes_app(dir)
  local path = dir .. "/notes_app.lua"
  local f = assert(io.open(path, "w"))
  f:write([[
local es = require "eventsourcing"
local Notes = es.read_model {
  name = "rm_notes", key = "id", columns = { id = "text", n = "bigint" },
  on = { Noted = function(row) row.n = (row.n or 0) + 1 end },
}
return { read_models = { Notes } }
]])
  f:close()
  return path
end

return M
