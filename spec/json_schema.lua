-- spec/json_schema.lua: the part of JSON Schema (2020-12, as OpenAPI 3.1
-- uses it) that examples/orders/http/openapi.json uses, for specs:
-- $ref (to #/...), type (a name or a list), properties, required,
-- additionalProperties (false or a schema), items, enum, const, minimum,
-- maximum. validate(root, schema, value) -> true | nil, "path: why".
-- Values are es.json.decode results (shapes known by their metatables).
local es = require "eventsourcing"

local M = {}

local OBJECT_MT = getmetatable(es.json.decode("{}"))
local ARRAY_MT = getmetatable(es.json.decode("[]"))

local function is_integer(v)
  if math.type then return math.type(v) == "integer" end
  return v % 1 == 0
end

local function type_of(v)
  if v == es.json.null then return "null" end
  local t = type(v)
  if t == "string" or t == "boolean" then return t end
  if t == "number" then return is_integer(v) and "integer" or "number" end
  if t == "table" then
    if getmetatable(v) == ARRAY_MT then return "array" end
    if getmetatable(v) == OBJECT_MT then return "object" end
    return next(v) == nil and "object" or (v[1] ~= nil and "array" or "object")
  end
  return t
end

local function type_ok(actual, want)
  if actual == want then return true end
  return want == "number" and actual == "integer"
end

local function resolve(root, schema)
  while schema["$ref"] do
    local node = root
    for part in schema["$ref"]:gsub("^#/", ""):gmatch("[^/]+") do
      node = node[part]
      if node == nil then error("unresolved $ref " .. schema["$ref"]) end
    end
    schema = node
  end
  return schema
end

local function equal(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do if not equal(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

local function check(root, schema, v, path)
  schema = resolve(root, schema)
  local t = type_of(v)
  if schema.type ~= nil then
    local wants = type(schema.type) == "table" and schema.type or { schema.type }
    local ok = false
    for _, w in ipairs(wants) do if type_ok(t, w) then ok = true end end
    if not ok then
      return nil, ("%s: %s is not of type %s"):format(path, t, table.concat(wants, "|"))
    end
  end
  if schema.const ~= nil and not equal(schema.const, v) then
    return nil, path .. ": not the constant " .. tostring(schema.const)
  end
  if schema.enum then
    local found = false
    for _, e in ipairs(schema.enum) do if equal(e, v) then found = true end end
    if not found then return nil, ("%s: %s not in the enum"):format(path, tostring(v)) end
  end
  if (t == "integer" or t == "number") then
    if schema.minimum and v < schema.minimum then return nil, path .. ": below the minimum" end
    if schema.maximum and v > schema.maximum then return nil, path .. ": above the maximum" end
  end
  if t == "object" then
    for _, k in ipairs(schema.required or {}) do
      if v[k] == nil then return nil, ("%s: %s is required"):format(path, k) end
    end
    local props = schema.properties or {}
    for k, sub in pairs(v) do
      local s = props[k]
      if s == nil then
        if schema.additionalProperties == false then
          return nil, ("%s: property %s is not in the schema"):format(path, tostring(k))
        elseif type(schema.additionalProperties) == "table" then
          s = schema.additionalProperties
        end
      end
      if s then
        local ok, err = check(root, s, sub, path .. "." .. tostring(k))
        if not ok then return nil, err end
      end
    end
  end
  if t == "array" and schema.items then
    for i, sub in ipairs(v) do
      local ok, err = check(root, schema.items, sub, ("%s[%d]"):format(path, i))
      if not ok then return nil, err end
    end
  end
  return true
end

function M.validate(root, schema, value)
  return check(root, schema, value, "$")
end

return M
