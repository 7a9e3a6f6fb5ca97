-- busted output handler: the usual terminal output, plus a machine-readable
-- summary written to the file named by ES_TEST_SUMMARY_FILE (not stdout, so
-- specs that print can not corrupt it). Used by scripts/test.sh:
--   busted -o spec/summary_output.lua ...
-- File format, one item a line:
--   passed N / failed N / errors N / pending N
--   FAIL<TAB>name<TAB>message        (one per failure or error)
--   done
-- ES_TEST_OUTPUT picks the terminal handler (default plainTerminal; utfTerminal,
-- TAP, gtest ...).
return function(options)
  local busted = require "busted"
  local term = os.getenv("ES_TEST_OUTPUT") or "plainTerminal"
  require("busted.outputHandlers." .. term)(options):subscribe(options)

  local handler = require("busted.outputHandlers.base")()

  local function one_line(msg)
    if type(msg) ~= "string" then
      local ok, pretty = pcall(require, "pl.pretty")
      msg = msg == nil and "nil error" or (ok and pretty.write(msg) or tostring(msg))
    end
    msg = msg:gsub("[\r\n\t]+", " | ")
    if #msg > 600 then msg = msg:sub(1, 600) .. "..." end
    return msg
  end

  local function where(item)
    local t = item.trace or (item.element and item.element.trace)
    if t and t.short_src then return " (" .. t.short_src .. ":" .. tostring(t.currentline) .. ")" end
    return ""
  end

  handler.esSuiteEnd = function()
    local path = os.getenv("ES_TEST_SUMMARY_FILE")
    if not path or path == "" then return nil, true end
    local f = assert(io.open(path, "w"))
    f:write(("passed %d\nfailed %d\nerrors %d\npending %d\n"):format(
      handler.successesCount, handler.failuresCount, handler.errorsCount, handler.pendingsCount))
    for _, list in ipairs { handler.failures, handler.errors } do
      for _, item in ipairs(list) do
        local name = (item.name and item.name ~= "") and item.name
                     or (item.element and item.element.name) or "?"
        f:write("FAIL\t", one_line(name), where(item), "\t", one_line(item.message), "\n")
      end
    end
    f:write("done\n")
    f:close()
    return nil, true
  end

  -- busted's loader calls handler:subscribe(options) on what we return.
  busted.subscribe({ "suite", "end" }, handler.esSuiteEnd)
  return handler
end
