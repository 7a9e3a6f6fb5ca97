-- eventsourcing.cli.main: the `eventsourcing` command line (bin/eventsourcing):
-- arguments, the store, exit codes. The commands are in eventsourcing.cli.commands.
--
-- Exit codes: 0 success, 1 failure (a store error, verify found
-- differences, ...), 2 usage error. Errors are one line on stderr.
local argparse = require "argparse"

local M = {}

local function positive(s)
  local n = tonumber(s)
  if not n or n < 0 or n % 1 ~= 0 then return nil, ("%q is not a whole number"):format(s) end
  return math.tointeger and math.tointeger(n) or n
end

local function seconds(s)
  local n = tonumber(s)
  if not n or n <= 0 then return nil, ("%q is not a positive number of seconds"):format(s) end
  return n
end

local function globals(p)
  p:option("--db", "Database URL or libpq conninfo (default: $ES_DATABASE_URL).")
  p:option("--schema", "The store's schema (default: eventsourcing).")
  p:option("--app", "A Lua file returning { aggregates, read_models, projections, workflows }.")
  p:flag("--json", "NDJSON output (the default when stdout is not a terminal).")
end

local function store_commands(p)
  p:command("migrate", "Create or upgrade the store's schema and (with --app) the app's tables.")
  p:command("stats", "Events, streams, categories with counts and instants, size on disk.")
  local c = p:command("streams", "Streams with their versions.")
  c:option("--category", "Only streams of this category (the part of the name before '-').")
  c:option("--limit", "At most this many (default 100).", "100"):convert(positive)
  c = p:command("read", "One stream's events.")
  c:argument("stream", "The stream, e.g. Order-42.")
  c:option("--from", "From this version."):convert(positive)
  c:option("--to", "Up to this version."):convert(positive)
  c:flag("--backward", "Newest first.")
  c:option("--at", "As of an instant: events recorded before it (ISO-8601).")
  c = p:command("tail", "The last events of the global log.")
  c:option("--category", "Only this category.")
  c:option("--type", "Only this event type.")
  c:option("--limit", "How many of the last events (default 20).", "20"):convert(positive)
  c:flag("--follow -f", "Keep printing new events as they are committed, until interrupted.")
  c:option("--poll", "With --follow: seconds between looks (default 0.2).", "0.2"):convert(seconds)
end

local function ops_commands(p)
  local c = p:command("projections",
    "The app's read models and projections (needs --app; status without it reads the ledger).")
  c:command_target("action")
  c:command("list", "Names and kinds.")
  c:command("status", "Checkpoint, lag in events and seconds, state, last error (without --app: every ledger row).")
  for _, a in ipairs { { "rebuild", "Replay every event into a fresh table, swapped in at the end." },
                       { "reset", "Back to the first event (a read model's rows are cleared)." },
                       { "pause", "Stop applying events until resumed." },
                       { "resume", "Apply events again after pause." },
                       { "retry", "Clear a recorded handler error: it resumes at the failing event." } } do
    c:command(a[1], a[2]):argument("name", "The projection's name.")
  end
  c = p:command("workflows", "Workflows: status, dead letters, timers.")
  c:command_target("action")
  c:command("status", "Checkpoint, lag, dead letters and timers per workflow (without --app: the ledger's rows).")
  c:command("dead-letters", "Events a workflow gave up on."):argument("name", "Only this workflow's."):args("?")
  c:command("retry", "Run one dead letter again (needs --app)."):argument("id", "Its event id.")
  c:command("discard", "Delete one dead letter."):argument("id", "Its event id.")
  c:command("timers", "Pending timers, soonest first.")
  c = p:command("export", "Every event as NDJSON on stdout, in the global order (a backup).")
  c:option("--category", "Only this category.")
  c:option("--after", "Only events after this checkpoint (txid:position).")
  p:command("import", "Events from NDJSON on stdin (export's format); one transaction, idempotent.")
  p:command("verify", "Check the store's invariants and (with --app) each read model against a rebuild.")
end

function M.parser()
  local p = argparse("eventsourcing", "Operate an eventsourcing store on PostgreSQL.")
    :command_target("command")
    :epilog("Exit codes: 0 success, 1 failure, 2 usage error.")
  globals(p)
  store_commands(p)
  ops_commands(p)
  return p
end

-- A one-line message for anything raised (never a traceback).
local function one_line(err)
  local s = tostring(err)
  if type(err) == "table" and err.kind and err.message then s = err.kind .. ": " .. err.message end
  return (s:gsub("\n.*", ""))
end

-- run(args) -> exit code
function M.run(args)
  local parser = M.parser()
  local ok, a = parser:pparse(args)
  if not ok then
    io.stderr:write(("eventsourcing: %s (see eventsourcing --help)\n"):format(a))
    return 2
  end
  local commands = require "eventsourcing.cli.commands"
  local pok, code, err = pcall(commands.run, a)
  if not pok then
    if tostring(code):match("interrupted!$") then return 130 end
    io.stderr:write("eventsourcing: ", one_line(code), "\n")
    return 1
  end
  if code == nil then
    local usage = type(err) == "table" and err.usage
    io.stderr:write("eventsourcing: ", usage and err.message or one_line(err), "\n")
    return (type(err) == "table" and err.usage) and 2 or 1
  end
  return code
end

return M
