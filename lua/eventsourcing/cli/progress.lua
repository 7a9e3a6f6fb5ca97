-- eventsourcing.cli.progress: progress of a long operation (a rebuild), as
-- the projector reports it: progress(done, total, rate, eta).
-- On a terminal: a bar redrawn in place on stderr (at most 5 times a
-- second); otherwise a plain line every `every` seconds (default 2) and a
-- last one at the end, so logs stay readable.
local M = {}

local clock = require("eventsourcing.core").monotonic

local function bar_line(label, done, total, rate, eta)
  local width = 30
  local frac = total > 0 and math.min(1, done / total) or 1
  local fill = math.floor(frac * width + 0.5)
  return ("\r%s [%s%s] %3d%% %d/%d events, %.0f events/s, ETA %ds  ")
    :format(label, ("#"):rep(fill), ("."):rep(width - fill), math.floor(frac * 100 + 0.5),
      done, total, rate, math.floor(eta + 0.5))
end

local function plain_line(label, done, total, rate, eta)
  return ("%s: %d/%d events, %.0f events/s, ETA %ds\n")
    :format(label, done, total, rate, math.floor(eta + 0.5))
end

-- -> reporter(done, total, rate, eta), finish()
function M.new(label, tty, file, every)
  file = file or io.stderr
  every = every or (tty and 0.2 or 2)
  local last_t, last = -math.huge, nil
  local function draw(d, t, r, e)
    file:write((tty and bar_line or plain_line)(label, d, t, r, e))
    file:flush()
  end
  local function report(done, total, rate, eta)
    last = { done, total, rate, eta }
    local now = clock()
    if now - last_t >= every then
      last_t = now
      draw(done, total, rate, eta)
    end
  end
  local function finish()
    if last then
      last[2] = math.max(last[2], last[1])
      last[4] = 0
      draw(last[1], last[2], last[3], last[4])
    end
    if tty and last then file:write("\n") end
  end
  return report, finish
end

return M
