-- The fuzz corpora (fuzz/corpus/<target>/, and what `make fuzz` found in
-- build/fuzz/corpus/<target>/ when present) against the real thing:
-- every JSON text the memory store's validator (es.json.valid) accepts,
-- PostgreSQL's json input accepts, and the other way round; plus the
-- findings of the fuzz targets, each fixed, kept here as plain cases.
local es = require "eventsourcing"
local core = require "eventsourcing.core"
local helpers = require "helpers"

-- at most this many inputs per target (the found corpus can grow large)
local LIMIT = tonumber(os.getenv("ES_FUZZ_CORPUS_LIMIT") or "") or 4000

local function files(dir)
  local out = {}
  local p = assert(io.popen("find " .. helpers.shell_quote(dir) ..
    " -maxdepth 1 -type f 2>/dev/null | sort"))
  for line in p:lines() do out[#out + 1] = line end
  p:close()
  return out
end

-- nil when the file went away (a fuzzer running meanwhile replaces inputs)
local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function corpus(target)
  local out = {}
  for _, dir in ipairs { "fuzz/corpus/" .. target, "build/fuzz/corpus/" .. target } do
    for _, path in ipairs(files(dir)) do
      local text = #out < LIMIT and slurp(path)
      if text then out[#out + 1] = { path = path, text = text } end
    end
  end
  return out
end

local function show(s)
  s = #s > 60 and s:sub(1, 60) .. "..." or s
  return (s:gsub("[^\32-\126]", function(c) return ("\\x%02x"):format(c:byte()) end))
end

describe("fuzz corpus", function()
  it("has seeds for every target", function()
    for _, t in ipairs { "json_decode", "json_roundtrip", "json_encode", "store_append",
                         "time_iso", "names" } do
      assert.is_true(#files("fuzz/corpus/" .. t) >= 5, t)
    end
  end)

  describe("JSON acceptance, memory validator against PostgreSQL's json", function()
    local store
    before_each(function()
      store = assert(es.open(helpers.database_url(), { schema = helpers.fresh_schema() }))
    end)
    after_each(function() store:close() end)

    -- Where the stores are stricter than PostgreSQL's json input, on
    -- purpose: store.c refuses these for both stores before any SQL.
    local STRICTER = {
      "jsonb cannot store it",    -- \u0000, unpaired surrogate escapes
      "nesting too deep",         -- deeper than 10,000 (PostgreSQL: its stack)
    }
    local function stricter(err)
      for _, why in ipairs(STRICTER) do
        if err.message:find(why, 1, true) then return why end
      end
    end

    it("takes every text the stores accept, and refuses the others only where documented", function()
      local seen, differ, compared, strict = {}, {}, 0, {}
      for _, target in ipairs { "json_decode", "json_roundtrip" } do
        for _, input in ipairs(corpus(target)) do
          local text = input.text
          if not seen[text] then
            seen[text] = true
            local mem_ok, mem_err = es.json.valid(text)
            if text:find("\0", 1, true) then
              -- PostgreSQL text cannot carry NUL; the validator must refuse
              assert.is_nil(mem_ok, input.path)
            else
              local rows, pg_err = store:query("SELECT $1::json IS NOT NULL AS ok", text)
              compared = compared + 1
              local why = not mem_ok and rows and stricter(mem_err)
              if why then
                strict[why] = (strict[why] or 0) + 1
              elseif (mem_ok ~= nil) ~= (rows ~= nil) then
                differ[#differ + 1] = ("%s %q: memory %s, postgresql %s"):format(input.path,
                  show(text), mem_ok and "accepts" or tostring(mem_err),
                  rows and "accepts" or tostring(pg_err))
              end
            end
          end
        end
      end
      assert.is_true(compared >= 40)
      assert.same({}, differ)
      -- the seeds hold each stricter case, so this comparison sees them
      for _, why in ipairs(STRICTER) do assert.is_true((strict[why] or 0) >= 1, why) end
    end)

    it("es.json.valid (store.c's check, for both stores) refuses the stricter cases", function()
      -- (from Lua, payloads are always written by es.json.encode, which
      -- never writes these; through the C API both stores go through
      -- store.c's check, es_json_payload_ok, which es.json.valid calls)
      assert.is_nil((es.json.valid('"\\ud800"')))
      assert.is_nil((es.json.valid('{"a":"\\u0000"}')))
      assert.is_nil((es.json.valid(("["):rep(10001) .. ("]"):rep(10001))))
      assert.is_true(es.json.valid(("["):rep(10000) .. ("]"):rep(10000)))
    end)
  end)

  describe("findings, fixed", function()
    it("time_iso: an offset that carries an instant out of years 0001-9999 is refused", function()
      local ok, err = core.time_parse("9999-12-31T23:59:18.99-1920")
      assert.is_nil(ok)
      assert.matches("outside the years", err.message)
      ok, err = core.time_parse("0001-01-01T00:00:00+01:00")
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.is_nil(core.time_parse("0000-06-01T00:00:00Z"))     -- PostgreSQL has no year 0
      assert.is_number(core.time_parse("9999-12-31T23:59:59.999999Z"))
      assert.equal("0001-01-01T00:00:00.000000Z",
        core.time_format(assert(core.time_parse("0001-01-01T00:00:00Z"))))
    end)

    it("time_iso: every corpus instant formats and parses back", function()
      for _, input in ipairs(corpus("time_iso")) do
        local t = core.time_parse(input.text)
        -- (seconds are Lua numbers: in the last second of 9999 a double no
        -- longer holds microseconds, so that second is left out here; the
        -- time_iso fuzz target checks it in C)
        if t and t < 253402300799 then
          local text = core.time_format(t)
          assert.equal(text, core.time_format(assert(core.time_parse(text))), input.path)
        end
      end
    end)

    it("names: both stores accept and refuse the same stream names and event types", function()
      local mem = assert(es.open("memory:"))
      local pg = assert(es.open(helpers.database_url(), { schema = helpers.fresh_schema() }))
      assert(pg:migrate())
      local differ, accepted = {}, 0
      for _, input in ipairs(corpus("names")) do
        local name = input.text
        if not name:find("\0", 1, true) then    -- (NUL: refused by the binding)
          for _, case in ipairs { { name, "T" }, { "S-1", name } } do
            local m_ok, m_err = mem:append(case[1], { type = case[2] })
            local p_ok, p_err = pg:append(case[1], { type = case[2] })
            if (m_ok ~= nil) ~= (p_ok ~= nil) then
              differ[#differ + 1] = ("%s: memory %s, postgresql %s"):format(input.path,
                tostring(m_err or "accepts"), tostring(p_err or "accepts"))
            elseif m_ok then
              accepted = accepted + 1
              assert.is_true(#name <= 1000 and not name:find("[%c\127]"), input.path)
            else
              assert.equal("invalid", m_err.kind, input.path)
              assert.equal("invalid", p_err.kind, input.path)
            end
          end
        end
      end
      mem:close()
      pg:close()
      assert.same({}, differ)
      assert.is_true(accepted >= 5)
    end)
  end)
end)
