-- eventsourcing.progress: progress reporting for long replays.
--
--   projector:rebuild("rm_orders", { progress = progress.bar() })
--
-- A reporter is a function(done, total, rate, eta, final) (events, events,
-- events per second, seconds left, true on the last call). The projector
-- only calls it; drawing belongs to whoever shows it (the command-line
-- tool draws bar() on stderr).
local util = require "eventsourcing.util"

local M = {}

-- A reporter drawing a bar on `out` (default io.stderr), at most five
-- times a second, and a newline at the end.
function M.bar(out)
  out = out or io.stderr
  local width, last = 30, -1
  return function(done, total, rate, eta, final)
    local t = util.monotonic()
    if not final and t - last < 0.2 then return end
    last = t
    local frac = total > 0 and math.min(1, done / total) or 1
    local fill = math.floor(frac * width + 0.5)
    out:write(("\r[%s%s] %3d%% %d/%d events %.0f ev/s ETA %ds  ")
      :format(("#"):rep(fill), ("."):rep(width - fill), math.floor(frac * 100 + 0.5),
        done, total, rate, math.floor(eta + 0.5)))
    if final then out:write("\n") end
    out:flush()
  end
end

-- Wraps callback cb (or nil) into report(done, final), which adds the
-- total (count(), asked once and only when there is a callback: counting
-- the whole store is work of its own), the rate and the time left.
function M.reporter(cb, count)
  local total = cb and count() or 0
  local t0 = util.monotonic()
  return function(done, final)
    if not cb then return end
    local el = util.monotonic() - t0
    local rate = el > 0 and done / el or 0
    total = math.max(total, done)
    local eta = rate > 0 and math.max(0, (total - done) / rate) or 0
    cb(done, total, rate, eta, final or false)
  end
end

return M
