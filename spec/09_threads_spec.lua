-- The module opened in Lua states on several threads at once, as nginx's
-- thread pool does, under ThreadSanitizer (fuzz/threads.c). The codec once
-- built its lookup tables at first use behind an unsynchronized flag: TSan
-- reported that race here. Needs clang (an optional package).
local function run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  local ok, _, code = p:close()
  return out, ok == true or code == 0
end

describe("the module on several threads at once", function()
  it("opens and runs the codec in 8 threads without a data race", function()
    local _, have_clang = run("command -v " .. (os.getenv("FUZZ_CC") or "clang"))
    if not have_clang then
      pending("clang is not installed (optional: scripts/deps.sh)")
      return
    end
    -- (no LD_PRELOAD: under make check-memory it names ASan's runtime)
    local out, built = run("env -u LD_PRELOAD make -s build/tsan/threads")
    assert.is_true(built, out)
    local report, ok = run("env -u LD_PRELOAD TSAN_OPTIONS=halt_on_error=1 build/tsan/threads")
    assert.is_nil(report:find("ThreadSanitizer", 1, true), report)
    assert.is_true(ok, report)
    assert.matches("0 failures", report)
  end)
end)
