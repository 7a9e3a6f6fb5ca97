-- spec/prometheus.lua: a strict parser of Prometheus' text exposition
-- format (version 0.0.4), for specs. parse(text) -> families | nil, err
-- where families[name] = { type, help, samples = { { name, labels, value,
-- key } } } and err names the line. It refuses: a missing final newline,
-- bad metric or label names, label values with escapes other than \\ \"
-- \n, numbers Go's ParseFloat would not read, a TYPE after the family's
-- samples or given twice, a family's samples split by another family's,
-- duplicate series, negative counters, and histograms whose buckets are
-- not cumulative, lack +Inf, or disagree with _count.
local M = {}

local NAME = "^[a-zA-Z_:][a-zA-Z0-9_:]*$"
local LABEL = "^[a-zA-Z_][a-zA-Z0-9_]*$"
local TYPES = { counter = true, gauge = true, histogram = true, summary = true, untyped = true }

local function number(s)
  if s == "+Inf" or s == "Inf" then return math.huge end
  if s == "-Inf" then return -math.huge end
  if s == "NaN" then return 0 / 0 end
  if not s:match("^[-+]?%d+%.?%d*[eE]?[-+]?%d*$") and not s:match("^[-+]?%.%d+[eE]?[-+]?%d*$") then
    return nil
  end
  return tonumber(s)
end

-- labels between { and }: -> table, canonical key | nil, err
local function parse_labels(s)
  local labels, names, i = {}, {}, 1
  while i <= #s do
    local name, rest = s:match("^([^=]*)=()", i)
    if not name then return nil, "label without =" end
    if not name:match(LABEL) or name:sub(1, 2) == "__" then return nil, "bad label name " .. name end
    if labels[name] then return nil, "label " .. name .. " twice" end
    if s:sub(rest, rest) ~= '"' then return nil, "label value not quoted" end
    local j, value = rest + 1, {}
    while true do
      local c = s:sub(j, j)
      if c == "" then return nil, "unterminated label value" end
      if c == '"' then break end
      if c == "\\" then
        local e = s:sub(j + 1, j + 1)
        if e == "\\" then value[#value + 1] = "\\"
        elseif e == '"' then value[#value + 1] = '"'
        elseif e == "n" then value[#value + 1] = "\n"
        else return nil, "bad escape \\" .. e end
        j = j + 2
      elseif c == "\n" then
        return nil, "raw line feed in a label value"
      else
        value[#value + 1] = c
        j = j + 1
      end
    end
    labels[name] = table.concat(value)
    names[#names + 1] = name
    i = j + 1
    local sep = s:sub(i, i)
    if sep == "," then i = i + 1 elseif sep ~= "" then return nil, "expected , after a label" end
  end
  table.sort(names)
  local parts = {}
  for k, n in ipairs(names) do parts[k] = n .. "=" .. labels[n] end
  return labels, table.concat(parts, "\0")
end

-- the family a sample name belongs to, given the declared types
local function family_of(name, families)
  for _, suffix in ipairs { "_bucket", "_sum", "_count" } do
    local base = name:sub(1, #name - #suffix)
    if name:sub(-#suffix) == suffix and families[base]
        and (families[base].type == "histogram" or families[base].type == "summary") then
      return base
    end
  end
  return name
end

local function check_histogram(f)
  local series = {}
  for _, s in ipairs(f.samples) do
    local l = {}
    for k, v in pairs(s.labels) do if k ~= "le" then l[#l + 1] = k .. "=" .. v end end
    table.sort(l)
    local id = table.concat(l, "\0")
    series[id] = series[id] or { buckets = {} }
    local h = series[id]
    if s.name == f.name .. "_bucket" then
      local le = s.labels.le and number(s.labels.le)
      if not le then return "bucket without a valid le" end
      h.buckets[#h.buckets + 1] = { le = le, v = s.value }
    elseif s.name == f.name .. "_sum" then h.sum = s.value
    elseif s.name == f.name .. "_count" then h.count = s.value
    else return "unexpected sample " .. s.name end
  end
  for _, h in pairs(series) do
    if not h.count or not h.sum then return "histogram without _sum or _count" end
    local last_le, last_v = -math.huge, 0
    for _, b in ipairs(h.buckets) do
      if b.le <= last_le then return "le not increasing" end
      if b.v < last_v then return "buckets not cumulative" end
      last_le, last_v = b.le, b.v
    end
    if last_le ~= math.huge then return "no +Inf bucket" end
    if last_v ~= h.count then return "+Inf bucket differs from _count" end
  end
end

function M.parse(text)
  if text:sub(-1) ~= "\n" then return nil, "no final line feed" end
  local families, order, seen, done = {}, {}, {}, {}
  local current
  local function family(name)
    if not families[name] then
      families[name] = { name = name, samples = {} }
      order[#order + 1] = name
    end
    return families[name]
  end
  local n = 0
  for line in text:gmatch("([^\n]*)\n") do
    n = n + 1
    local function fail(why) return nil, ("line %d: %s: %s"):format(n, why, line) end
    if line == "" then goto continue end
    if line:sub(1, 1) == "#" then
      local kind, name, rest = line:match("^# (%u+) (%S+) ?(.*)$")
      if kind == "HELP" or kind == "TYPE" then
        if not name:match(NAME) then return fail("bad metric name") end
        local f = family(name)
        if kind == "TYPE" then
          if not TYPES[rest] then return fail("unknown type") end
          if f.type then return fail("TYPE twice") end
          if #f.samples > 0 then return fail("TYPE after samples") end
          f.type = rest
        else
          if f.help then return fail("HELP twice") end
          if rest:find("\\[^\\n]") then return fail("bad escape in HELP") end
          f.help = rest
        end
      end
      goto continue
    end
    do
      local name, labels_text, after = line:match("^([^{%s]+)()"), "", nil
      if name then
        local open = line:sub(#name + 1, #name + 1)
        after = line:sub(#name + 1)
        if open == "{" then   -- the closing brace outside quoted values
          local j, quoted = #name + 2, false
          while j <= #line do
            local c = line:sub(j, j)
            if quoted and c == "\\" then j = j + 1
            elseif c == '"' then quoted = not quoted
            elseif c == "}" and not quoted then break end
            j = j + 1
          end
          if j > #line then return fail("unterminated label set") end
          labels_text, after = line:sub(#name + 2, j - 1), line:sub(j + 1)
        end
      end
      if not name or not name:match(NAME) then return fail("bad sample name") end
      local value, ts = after:match("^ (%S+)$")
      if not value then value, ts = after:match("^ (%S+) (%S+)$") end
      if not value then return fail("bad value part") end
      if ts and not ts:match("^-?%d+$") then return fail("bad timestamp") end
      local v = number(value)
      if not v then return fail("bad number") end
      local labels, key = parse_labels(labels_text)
      if not labels then return fail(key) end
      local fname = family_of(name, families)
      local f = family(fname)
      if current ~= fname then
        if done[fname] then return fail("samples of " .. fname .. " are not together") end
        if current then done[current] = true end
        current = fname
      end
      local id = name .. "\1" .. key
      if seen[id] then return fail("duplicate series") end
      seen[id] = true
      if f.type == "counter" and (v < 0 or v ~= v) then return fail("negative counter") end
      f.samples[#f.samples + 1] = { name = name, labels = labels, value = v }
    end
    ::continue::
  end
  for _, name in ipairs(order) do
    local f = families[name]
    if f.type == "histogram" then
      local err = check_histogram(f)
      if err then return nil, name .. ": " .. err end
    end
  end
  return families
end

-- the value of one sample (labels: exact set), or nil
function M.value(families, family, name, labels)
  local f = families[family]
  if not f then return nil end
  for _, s in ipairs(f.samples) do
    if s.name == name then
      local same = true
      for k, v in pairs(labels or {}) do if s.labels[k] ~= v then same = false end end
      for k in pairs(s.labels) do if (labels or {})[k] == nil then same = false end end
      if same then return s.value end
    end
  end
end

return M
