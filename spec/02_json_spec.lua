-- es.json: the JSON codec (src/lua/json.c). Standalone: needs only
-- require "eventsourcing". Runs under Lua 5.4 and LuaJIT.
local es = require "eventsourcing"
local json = es.json

local HAS_INT = math.type ~= nil -- Lua 5.3+

local function enc(v) return json.encode(v) end
local function dec(s) return json.decode(s) end

-- asserts that encode/decode failed with an "invalid" error matching pat
local function fails(pat, v, err)
  assert.is_nil(v)
  assert.is_table(err)
  assert.equal("invalid", err.kind)
  assert.is_string(err.message)
  assert.equal("invalid: " .. err.message, tostring(err))
  if pat then
    assert.truthy(err.message:find(pat), ("%q does not match %q"):format(err.message, pat))
  end
  return err
end
local function dec_fails(text, pat)
  local v, err = dec(text)
  local e = fails(pat, v, err)
  assert.truthy(e.message:find("at byte %d+"), "no offset in: " .. e.message)
  return e
end
local function enc_fails(value, pat)
  return fails(pat, enc(value))
end

-- deep comparison that also checks shapes and math.type
local function same(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) == "number" then
    if HAS_INT and math.type(a) ~= math.type(b) then return false end
    return a == b or (a ~= a and b ~= b)
  end
  if type(a) ~= "table" then return a == b end
  if getmetatable(a) ~= getmetatable(b) then return false end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

describe("es.json", function()
  it("exposes encode, decode, array, object and null", function()
    assert.is_function(json.encode)
    assert.is_function(json.decode)
    assert.is_function(json.array)
    assert.is_function(json.object)
    assert.is_not_nil(json.null)
  end)

  describe("scalars", function()
    it("encodes and decodes literals", function()
      assert.equal("true", enc(true))
      assert.equal("false", enc(false))
      assert.equal("null", enc(json.null))
      assert.equal("null", enc(nil))
      assert.is_true(dec("true"))
      assert.is_false(dec(" false "))
      assert.equal(json.null, dec("null"))
    end)

    it("encodes integers without a fraction", function()
      assert.equal("0", enc(0))
      assert.equal("3", enc(3))
      assert.equal("-42", enc(-42))
      assert.equal("1234567890", enc(1234567890))
      assert.equal("9007199254740992", enc(9007199254740992))
    end)

    it("decodes integers", function()
      assert.equal(3, dec("3"))
      assert.equal(-17, dec("-17"))
      assert.equal(0, dec("0"))
      assert.equal(9007199254740992, dec("9007199254740992"))
    end)

    if HAS_INT then
      it("keeps integers and floats apart on Lua 5.3+", function()
        assert.equal("integer", math.type(dec("3")))
        assert.equal("float", math.type(dec("3.0")))
        assert.equal("float", math.type(dec("3e0")))
        assert.equal("float", math.type(dec("-0.0")))
        assert.equal("3.0", enc(dec("3.0")))
        assert.equal("3.0", enc(3.0))
        assert.equal("-2.0", enc(-2.0))
        assert.equal("1e+15", enc(1e15))
        assert.equal("123456789012345.0", enc(123456789012345.0))
        assert.equal("3", enc(dec("3")))
        assert.equal(math.maxinteger, dec(tostring(math.maxinteger)))
        assert.equal(math.mininteger, dec(tostring(math.mininteger)))
        assert.equal("integer", math.type(dec("-9223372036854775808")))
        assert.equal(tostring(math.mininteger), enc(math.mininteger))
        assert.equal(tostring(math.maxinteger), enc(math.maxinteger))
      end)

      it("decodes integers outside int64 as floats", function()
        local v = dec("9223372036854775808")
        assert.equal("float", math.type(v))
        assert.equal(2.0 ^ 63, v)
        local w = dec("-92233720368547758090")
        assert.equal("float", math.type(w))
        assert.equal(-92233720368547758090.0, w)
        assert.equal("float", math.type(dec("123456789012345678901234567890")))
      end)
    else
      it("writes integral numbers up to 2^53 without a fraction on LuaJIT", function()
        assert.equal("9007199254740992", enc(2 ^ 53))
        assert.equal("-9007199254740992", enc(-2 ^ 53))
        assert.equal("3", enc(3.0))
        assert.equal(2 ^ 53, dec("9007199254740992"))
        assert.equal(2 ^ 53, dec(enc(2 ^ 53)))
        assert.equal(2 ^ 63, dec("9223372036854775808"))
        local big = 2 ^ 60
        assert.equal(big, dec(enc(big)))
      end)
    end

    it("round-trips floats exactly", function()
      for _, x in ipairs({ 0.1, 0.2, 0.3, 1 / 3, 2 / 3, 1e300, -1e300, 5e-324,
        2.2250738585072014e-308, 1.7976931348623157e308, 123.456, 1e-7, 12.99,
        0.000123, 1e21, 1e22, 1e23, 3.14159265358979, math.pi, -math.pi, 2 ^ -1074,
        4.35, 0.1 + 0.2, 100.5, 1e-5, 9.999999999999999e22 }) do
        local s = enc(x)
        assert.equal(x, dec(s), s)
        assert.truthy(s:find("^%-?%d"), s)
      end
      assert.equal("0.1", enc(0.1))
      assert.equal("12.99", enc(12.99))
      assert.equal("0.30000000000000004", enc(0.1 + 0.2))
      assert.equal("1e+300", enc(1e300))
    end)

    it("round-trips 10000 pseudo-random doubles exactly", function()
      local seed = 42
      local function rnd() -- Park-Miller, exact in doubles
        seed = (seed * 16807) % 2147483647
        return seed
      end
      for i = 1, 10000 do
        local x
        local k = i % 4
        if k == 0 then
          x = (rnd() / 2147483647) * 10 ^ (rnd() % 40 - 20)
        elseif k == 1 then
          x = (rnd() * 2147483647 + rnd()) / 2 ^ (rnd() % 100)
        elseif k == 2 then
          x = rnd() % 100000 / 100 -- prices
        else
          x = (rnd() / 2147483647 - 0.5) * 2 ^ (rnd() % 2000 - 1000)
        end
        if i % 2 == 0 then x = -x end
        local s = enc(x)
        local y = dec(s)
        if y ~= x then error(("%.17g encodes as %s and decodes as %.17g"):format(x, s, y)) end
        if HAS_INT and math.type(x) == "float" then
          assert(math.type(y) == "float", s)
        end
      end
    end)

    it("decodes the digit-heavy and exponent forms like strtod", function()
      assert.equal(1.5e-10, dec("1.5e-10"))
      assert.equal(1.5e10, dec("1.5E+10"))
      assert.equal(0.1, dec("0.1000000000000000055511151231257827"))
      assert.equal(1e-400 * 0, dec("1e-400")) -- underflow is 0
      assert.equal(123456789.123456789, dec("123456789.123456789"))
      assert.equal(tonumber("0." .. string.rep("1", 200)), dec("0." .. string.rep("1", 200)))
    end)

    it("does not depend on the numeric locale", function()
      local old = os.setlocale(nil, "numeric")
      local got
      for _, l in ipairs({ "de_DE.UTF-8", "fr_FR.UTF-8", "de_DE", "fr_FR", "nl_NL.UTF-8" }) do
        got = os.setlocale(l, "numeric")
        if got then break end
      end
      -- without a decimal-comma locale installed this checks the C locale
      -- (to exercise it: localedef -i de_DE -f UTF-8 DIR/de_DE.UTF-8 and
      -- run busted with LOCPATH=DIR)
      local ok, e = pcall(function()
        assert.equal("0.5", enc(0.5))
        assert.equal("0.30000000000000004", enc(0.1 + 0.2))
        assert.equal("1e-300", enc(1e-300))
        assert.equal(0.1, dec("0.1000000000000000055511151231257827"))
        assert.equal(1.5, dec("1.5"))
      end)
      os.setlocale(old, "numeric")
      assert(ok, e)
    end)

    it("writes -0.0 with its sign", function()
      assert.equal("-0.0", enc(-0.0))
      local z = dec("-0.0")
      assert.equal(0, z)
      assert.equal(-math.huge, 1 / z)
    end)

    it("rejects NaN and infinities", function()
      enc_fails(0 / 0, "NaN")
      enc_fails(math.huge, "infinity")
      enc_fails(-math.huge, "infinity")
      enc_fails({ a = { 1, math.huge } }, "infinity")
      dec_fails("1e400", "out of range")
      dec_fails("NaN", "unexpected character 'N' at byte 1")
      dec_fails("Infinity", "unexpected character 'I'")
      dec_fails("-Infinity", "after '%-'")
    end)
  end)

  describe("strings", function()
    it("escapes quotes, backslashes and control characters", function()
      assert.equal([["a\"b\\c"]], enc('a"b\\c'))
      assert.equal([["\b\f\n\r\t"]], enc("\b\f\n\r\t"))
      assert.equal([["\u0000\u0001\u001f"]], enc("\0\1\31"))
      assert.equal([["/"]], enc("/"))
      assert.equal('"\127"', enc("\127"))
      assert.equal([["\u2028\u2029"]], enc("\226\128\168\226\128\169"))
    end)

    it("leaves other UTF-8 as it is", function()
      local s = "héllo wörld – 李小龙 😀"
      assert.equal('"' .. s .. '"', enc(s))
      assert.equal(s, dec(enc(s)))
    end)

    it("round-trips every byte value below 0x80 and long strings", function()
      local t = {}
      for i = 0, 127 do t[#t + 1] = string.char(i) end
      local s = table.concat(t)
      assert.equal(s, dec(enc(s)))
      local long = string.rep("abcdefgh\"\\é", 10000)
      assert.equal(long, dec(enc(long)))
      assert.equal(string.rep("x", 100000), dec('"' .. string.rep("x", 100000) .. '"'))
    end)

    it("decodes every JSON escape", function()
      assert.equal('"\\/\b\f\n\r\t', dec([["\"\\\/\b\f\n\r\t"]]))
      assert.equal("A\0B", dec([["\u0041\u0000\u0042"]]))
      assert.equal("é€", dec([["\u00e9\u20AC"]]))
      assert.equal("x😀y", dec([["x\ud83d\ude00y"]]))
      assert.equal("\244\143\191\191", dec([["\uDBFF\uDFFF"]])) -- U+10FFFF
    end)

    it("rejects bad escapes and lone surrogates", function()
      dec_fails([["\x"]], "invalid escape in string at byte 2")
      dec_fails([["\u12"]], "invalid \\u escape")
      dec_fails([["\u12g4"]], "invalid \\u escape")
      dec_fails([["\ud83d"]], "lone high surrogate")
      dec_fails([["\ud83dx"]], "lone high surrogate")
      dec_fails([["\ud83d\u0041"]], "lone high surrogate")
      dec_fails([["\ude00"]], "lone low surrogate.* at byte 2")
    end)

    it("rejects unterminated strings and raw control characters", function()
      dec_fails('"abc', "unterminated string at byte 5")
      dec_fails('"abc\\', "unterminated string")
      dec_fails('"a\nb"', "control character in string at byte 3")
      dec_fails('"a\tb"', "control character")
      dec_fails('"\0"', "control character")
    end)

    local bad_utf8 = {
      { "\128", "continuation" },
      { "\192\175", "overlong" },
      { "\193\191", "overlong" },
      { "\224\128\175", "overlong" },
      { "\240\128\128\175", "overlong" },
      { "\237\160\128", "surrogate" },  -- U+D800
      { "\237\191\191", "surrogate" },  -- U+DFFF
      { "\244\144\128\128", "U%+10FFFF" }, -- U+110000
      { "\245\128\128\128", "U%+10FFFF" },
      { "\255", "U%+10FFFF" },
      { "\195", "truncated" },
      { "\226\130", "truncated" },
      { "\226\130x", "truncated" },
      { "\240\159\152", "truncated" },
    }
    it("rejects invalid UTF-8 on decode, with the offset", function()
      for _, case in ipairs(bad_utf8) do
        local e = dec_fails('["ok", "ab' .. case[1] .. '"]', case[2])
        assert.truthy(e.message:find("invalid UTF%-8"), e.message)
        assert.truthy(e.message:find("at byte 11"), e.message)
      end
    end)

    it("rejects invalid UTF-8 on encode", function()
      for _, case in ipairs(bad_utf8) do
        local e = enc_fails({ a = "ab" .. case[1] }, case[2])
        assert.truthy(e.message:find("not valid UTF%-8"), e.message)
      end
      enc_fails({ ["k\255"] = 1 }, "UTF%-8")
    end)

    it("accepts the UTF-8 boundaries", function()
      for _, s in ipairs({ "\194\128", "\223\191", "\224\160\128", "\237\159\191",
        "\238\128\128", "\239\191\191", "\240\144\128\128", "\244\143\191\191" }) do
        assert.equal(s, dec(enc(s)))
      end
    end)
  end)

  describe("arrays and objects", function()
    it("encodes sequences as arrays and string-keyed tables as objects", function()
      assert.equal("[1,2,3]", enc({ 1, 2, 3 }))
      assert.equal('{"a":1}', enc({ a = 1 }))
      local s = enc({ a = 1, b = "x" })
      assert.truthy(s == '{"a":1,"b":"x"}' or s == '{"b":"x","a":1}', s)
      assert.equal('[[],{},["x",{"k":[true]}]]', enc({ json.array({}), {}, { "x", { k = { true } } } }))
    end)

    it("encodes an unmarked empty table as {} and a marked one as []", function()
      assert.equal("{}", enc({}))
      assert.equal("[]", enc(json.array({})))
      assert.equal("{}", enc(json.object({})))
    end)

    it("decodes arrays and objects with shape metatables", function()
      local a = dec("[1,2,3]")
      assert.same({ 1, 2, 3 }, a)
      assert.equal(getmetatable(json.array({})), getmetatable(a))
      local o = dec('{"a":{"b":[]}}')
      assert.equal(getmetatable(json.object({})), getmetatable(o))
      assert.equal(getmetatable(json.array({})), getmetatable(o.a.b))
      assert.are_not.equal(getmetatable(a), getmetatable(o))
    end)

    it("keeps shapes on re-encode", function()
      for _, s in ipairs({ "[]", "{}", "[[]]", "[{}]", '{"a":[]}', '{"a":{}}',
        '[1,null,3]', '[null]', '{"a":null}', '[[[],{}],{"x":[{}]}]' }) do
        assert.equal(s, enc(dec(s)))
      end
    end)

    it("decodes null inside arrays as the sentinel, keeping the length", function()
      local a = dec("[1,null,3]")
      assert.equal(3, #a)
      assert.equal(json.null, a[2])
      assert.equal("[1,null,3]", enc(a))
      assert.equal(json.null, dec('{"a":null}').a)
    end)

    it("marks tables with es.json.array and es.json.object", function()
      local t = {}
      assert.equal(t, json.array(t))
      assert.equal("[]", enc(t))
      assert.equal(t, json.array(t)) -- marking again is fine
      local o = json.object({ [1] = "a", [2] = "b" })
      local s = enc(o)
      assert.truthy(s == '{"1":"a","2":"b"}' or s == '{"2":"b","1":"a"}', s)
      assert.equal('{"10":true}', enc(json.object({ [10] = true })))
      assert.equal('{"-3":0}', enc(json.object({ [-3] = 0 })))
    end)

    it("raises when marking a non-table or a table with another metatable", function()
      assert.has_error(function() json.array(1) end)
      assert.has_error(function() json.object(nil) end)
      assert.has_error(function() json.array(setmetatable({}, {})) end)
      assert.has_error(function() json.object(json.array({})) end)
      assert.has_error(function() json.array(json.object({})) end)
    end)

    it("rejects tables that are neither arrays nor objects", function()
      enc_fails({ 1, 2, x = 3 }, "neither an array nor an object")
      enc_fails({ [1] = 1, [3] = 3 }, "neither an array nor an object")
      enc_fails({ [2] = 1 }, "neither an array nor an object")
      enc_fails({ [0] = 1 }, "neither an array nor an object")
      enc_fails({ a = 1, [1] = 2 }, "neither an array nor an object")
      enc_fails(json.array({ 1, 2, x = 3 }), "neither an array nor an object")
      enc_fails(json.array({ a = 1 }), "neither an array nor an object")
      local holes = json.array({})
      holes[1] = 1; holes[3] = 3
      enc_fails(holes, "neither an array nor an object")
    end)

    it("rejects keys that are neither strings nor integers", function()
      enc_fails(json.object({ [1.5] = 1 }), "key must be a string or an integer")
      enc_fails({ [true] = 1 }, "key must be a string or an integer, got boolean")
      enc_fails(json.object({ [{}] = 1 }), "got table")
      enc_fails({ a = { [false] = 1 } }, "got boolean")
    end)

    it("ignores other metatables and never calls metamethods", function()
      local t = setmetatable({ a = 1 }, { __index = function() error("called") end,
        __pairs = function() error("called") end, __len = function() return 99 end })
      assert.equal('{"a":1}', enc(t))
      assert.equal("[1,2]", enc(setmetatable({ 1, 2 }, { __len = function() return 5 end })))
    end)

    it("takes the last of duplicate keys", function()
      assert.equal(2, dec('{"a":1,"a":2}').a)
      -- among others, spelled with an escape, past the 8 pairs made at once, nested
      local t = dec('{"x":0,"a":1,"b":2,"a":3,"y":4}')
      assert.same({ 0, 3, 2, 4 }, { t.x, t.a, t.b, t.y })
      assert.equal(5, dec('{"a":1,"\\u0061":5}').a)
      assert.equal(6, dec('{"\\u0061":1,"a":6}').a)
      assert.equal(9, dec('{"k1":1,"k2":2,"k3":3,"k4":4,"k5":5,"k6":6,"k7":7,"k8":8,"k1":9}').k1)
      assert.equal(8, dec('{"k1":1,"k2":2,"k3":3,"k4":4,"k5":5,"k6":6,"k7":7,"k1":8}').k1)
      assert.equal(2, dec('{"o":{"a":1,"a":2}}').o.a)
    end)

    it("keeps every distinct key of an object", function()
      for n = 0, 20 do
        local parts, want = {}, {}
        for i = 1, n do parts[i] = ('"k%d":%d'):format(i, i); want["k" .. i] = i end
        local t = dec("{" .. table.concat(parts, ",") .. "}")
        local got = {}
        for k, v in pairs(t) do got[k] = v end
        assert.same(want, got)
        assert.equal("{}", n == 0 and enc(t) or "{}")
      end
    end)

    it("round-trips a realistic event payload", function()
      local ev = { type = "OrderPlaced", version = 7, data = { order_id = "0b7c2e55-5a5e-4f0c-9b0a-4a3f7f7f2d11",
        items = { { sku = "SKU-1", name = "Café crème", quantity = 2, price = 12.99, tags = json.array({}) } },
        total = 2598, note = json.null, gift = false }, metadata = { user = "u1", at = "2026-01-15T10:00:00.000000Z" } }
      local back = dec(enc(ev))
      assert.equal("OrderPlaced", back.type)
      assert.equal(7, back.version)
      assert.equal(12.99, back.data.items[1].price)
      assert.equal("Café crème", back.data.items[1].name)
      assert.equal(json.null, back.data.note)
      assert.equal("[]", enc(back.data.items[1].tags))
      assert.is_true(same(back, dec(enc(back))))
      if HAS_INT then assert.equal("integer", math.type(back.data.total)) end
    end)
  end)

  describe("the null sentinel", function()
    it("is unique, distinct from nil, and prints as null", function()
      assert.is_not_nil(json.null)
      assert.equal("null", tostring(json.null))
      assert.equal(json.null, dec("null"))
      assert.equal(json.null, dec("[null]")[1])
      assert.equal("null", enc(json.null))
      assert.equal('{"a":null}', enc({ a = json.null }))
      local ok, cjson = pcall(require, "cjson")
      if ok then assert.are_not.equal(cjson.null, json.null) end
    end)

    it("is the same value after re-requiring the core", function()
      local core = require "eventsourcing.core"
      assert.equal(core.json.null, json.null)
    end)
  end)

  describe("errors", function()
    it("rejects other Lua types", function()
      enc_fails(print, "cannot encode a function")
      enc_fails({ f = print }, "cannot encode a function")
      enc_fails(coroutine.create(function() end), "cannot encode a thread")
      enc_fails(io.stdout, "cannot encode a userdata")
    end)

    it("detects cycles", function()
      local t = {}
      t[1] = t
      enc_fails(t, "cycle")
      local o = { a = {} }
      o.a.b = o
      enc_fails(o, "cycle")
      -- the same table twice, not nested, is fine
      local shared = { 1 }
      assert.equal("[[1],[1]]", enc({ shared, shared }))
    end)

    it("limits nesting on encode", function()
      local root = {}
      local t = root
      for _ = 1, 2000 do
        local c = {}
        t[1] = c
        t = c
      end
      enc_fails(root, "nesting deeper than 1000")
      local ok = {}
      t = ok
      for _ = 1, 999 do
        local c = {}
        t[1] = c
        t = c
      end
      local s = assert(enc(ok))
      assert.equal(string.rep("[", 999) .. "{}" .. string.rep("]", 999), s)
    end)

    it("limits nesting on decode without overflowing the C stack", function()
      dec_fails(string.rep("[", 100000), "nesting deeper than 1000 levels at byte 1001")
      dec_fails(string.rep('{"a":', 100000), "nesting deeper than 1000")
      dec_fails(string.rep("[", 1001) .. string.rep("]", 1001), "nesting deeper")
      local s = string.rep("[", 1000) .. string.rep("]", 1000)
      local v = assert(dec(s))
      assert.equal(s, enc(v))
      -- objects of several keys nested 999 deep (LuaJIT's C stack holds
      -- 8,000 values: small objects wait on it only while there is room)
      local parts = {}
      for _ = 1, 999 do parts[#parts + 1] = '{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"x":' end
      local deep = table.concat(parts) .. "1" .. string.rep("}", 999)
      local o = assert(dec(deep))
      for _ = 1, 998 do o = o.x end
      assert.equal(7, o.g)
      assert.equal(1, o.x)
      assert(dec(enc(assert(dec(deep)))))
    end)

    it("decodes and re-encodes 1000 levels of objects with escaped keys", function()
      local s = string.rep('{"k\\n":', 999) .. "[]" .. string.rep("}", 999)
      local v = assert(dec(s))
      assert.equal(s, enc(v))
      assert.is_table(v["k\n"])
    end)

    it("reports malformed JSON with the byte offset", function()
      dec_fails("", "unexpected end of input")
      dec_fails("   ", "unexpected end of input")
      dec_fails("01", "leading zero at byte 1")
      dec_fails("[1, -01]", "leading zero at byte 5")
      dec_fails("-", "after '%-' at byte 2")
      dec_fails("- 1", "after '%-'")
      dec_fails("+1", "unexpected character '%+' at byte 1")
      dec_fails(".5", "unexpected character '%.'")
      dec_fails("1.", "digit expected")
      dec_fails("1.e5", "digit expected")
      dec_fails("1e", "digit expected")
      dec_fails("1e+", "digit expected")
      dec_fails("[1,2,]", "trailing comma in array at byte 6")
      dec_fails('{"a":1,}', "trailing comma in object at byte 8")
      dec_fails("[1 2]", "unexpected character '2' in array")
      dec_fails('{"a" 1}', "':' expected")
      dec_fails("{a:1}", "string key expected")
      dec_fails('{"a":}', "unexpected character '}' at byte 6")
      dec_fails("[", "unexpected end of input")
      dec_fails("[1", "unexpected end of input")
      dec_fails('{"a":1', "unexpected end of input")
      dec_fails("tru", "unexpected character 't' at byte 1")
      dec_fails("nul", "unexpected character 'n'")
      dec_fails("[1,2,3]x", "unexpected character 'x' after the value at byte 8")
      dec_fails("[1] [2]", "after the value at byte 5")
      dec_fails("1 2", "after the value")
      dec_fails("\1", "unexpected byte 0x01 at byte 1")
      local e = dec_fails('{"key": [1, 2, x]}', "unexpected character 'x' at byte 16")
      assert.equal("invalid", e.kind)
    end)

    it("accepts surrounding whitespace", function()
      assert.equal(1, dec(" \t\r\n1 \t\r\n"))
      assert.same({ 1, 2 }, dec(" [ 1 , 2 ] "))
      assert.same({ a = 1 }, dec(' { "a" : 1 } '))
    end)

    it("raises on non-string arguments to decode", function()
      local ok, msg = pcall(json.decode, nil)
      assert.is_false(ok)
      assert.truthy(tostring(msg):find("bad argument #1 to 'decode' %(string expected, got nil%)"), msg)
      ok, msg = pcall(json.decode, 12)
      assert.is_false(ok)
      assert.truthy(tostring(msg):find("string expected, got number"), msg)
      ok, msg = pcall(json.decode, {})
      assert.is_false(ok)
      assert.truthy(tostring(msg):find("got table"), msg)
    end)

    it("raises when encode gets no argument", function()
      assert.has_error(function() json.encode() end)
    end)

    it("keeps working after errors (the buffer is reused)", function()
      for _ = 1, 3 do
        enc_fails({ 1, 2, print }, "function")
        assert.equal("[1,2]", enc({ 1, 2 }))
      end
      local big = {}
      for i = 1, 100000 do big[i] = "some text " .. i end
      local s = enc(big)
      assert.equal(big[100000], dec(s)[100000])
      assert.equal("[1]", enc({ 1 }))
    end)
  end)

  describe("valid (the stores' check of payload text)", function()
    it("accepts what decode accepts, within the stores' depth", function()
      for _, text in ipairs { "{}", "[]", "null", '"caf\195\169"', "-0.0", "1e400",
                              '{"a":[1,{"b":"\\u00e9\\ud83d\\ude00"}]}',
                              ("["):rep(5000) .. ("]"):rep(5000) } do
        assert.is_true(json.valid(text), text:sub(1, 40))
      end
    end)

    it("refuses what is not JSON with the decoder's words and offset", function()
      for text, pat in pairs { ["[1,]"] = "unexpected character ']' at byte 4",
                               ['"a\tb"'] = "control character in string at byte 3",
                               ['"ab'] = "unterminated string",
                               ["01"] = "leading zero at byte 1",
                               ['"\255"'] = "invalid UTF%-8 in string",
                               ["[1] x"] = "after the value at byte 5" } do
        local ok, err = json.valid(text)
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.matches(pat, err.message)
      end
    end)

    it("refuses escapes jsonb cannot hold, which decode would take or refuse", function()
      local ok, err = json.valid('{"a":"\\u0000"}')
      assert.is_nil(ok)
      assert.matches("jsonb", err.message)
      assert.equal("\0", dec('"\\u0000"'))          -- decode itself takes it
      ok, err = json.valid('"\\udc00"')
      assert.is_nil(ok)
      assert.matches("surrogate", err.message)
      assert.is_true(json.valid('"\\\\u0000"'))
    end)

    it("raises on a non-string argument", function()
      assert.has_error(function() json.valid(nil) end)
      assert.has_error(function() json.valid(12) end)
    end)
  end)
end)
