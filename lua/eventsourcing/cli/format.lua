-- eventsourcing.cli.format: how the command-line tool prints results.
-- On a terminal: aligned columns with a header. With --json or when stdout
-- is not a terminal (piped, redirected): NDJSON, one JSON object a line,
-- every field of the row.
local json = require("eventsourcing.core").json

local M = {}

local Out = {}
Out.__index = Out

local function isatty(file)
  local ok, term = pcall(require, "term")
  if ok and term.isatty then return term.isatty(file) end
  return false
end
M.isatty = isatty

-- opts.json: force NDJSON; opts.file (default io.stdout); opts.width: the
-- widest a cell may be on a terminal (longer ones end in "...").
function M.new(opts)
  opts = opts or {}
  local file = opts.file or io.stdout
  local tty = isatty(file)
  return setmetatable({ file = file, json = opts.json or not tty, tty = tty,
                        width = opts.width or 60 }, Out)
end

-- A value as table-cell text: tables (and json.null) as compact JSON.
function M.cell(v)
  if v == nil or v == json.null then return "" end
  if type(v) == "table" then return json.encode(v) end
  if type(v) == "number" and math.type and math.type(v) == "integer" then return ("%d"):format(v) end
  if type(v) == "number" and v % 1 == 0 and v < 2 ^ 53 and v > -2 ^ 53 then return ("%d"):format(v) end
  return tostring(v)
end

local function clip(s, width)
  if #s <= width then return s end
  return s:sub(1, width - 3) .. "..."
end

function Out:line(s)
  self.file:write(s, "\n")
end

function Out:flush() self.file:flush() end

-- One object: NDJSON line, or "key  value" lines in `fields` order
-- (fields: array of { key, title }).
function Out:record(t, fields)
  if self.json then return self:line(json.encode(t)) end
  local w = 0
  for _, f in ipairs(fields) do w = math.max(w, #f[2]) end
  for _, f in ipairs(fields) do
    self:line(("%-" .. w .. "s  %s"):format(f[2], M.cell(t[f[1]])))
  end
end

-- Rows: NDJSON lines (each row whole), or a table of `columns` (array of
-- { key, title }) with aligned columns; numbers right-aligned.
function Out:rows(rows, columns)
  if self.json then
    for _, r in ipairs(rows) do self:line(json.encode(r)) end
    return
  end
  local widths, cells, numeric = {}, {}, {}
  for i, c in ipairs(columns) do widths[i] = #c[2]; numeric[i] = true end
  for r, row in ipairs(rows) do
    cells[r] = {}
    for i, c in ipairs(columns) do
      local v = row[c[1]]
      local s = clip(M.cell(v), self.width)
      cells[r][i] = s
      widths[i] = math.max(widths[i], #s)
      if v ~= nil and type(v) ~= "number" then numeric[i] = false end
    end
  end
  local function fmt(values)
    local parts = {}
    for i, s in ipairs(values) do
      local pad = (" "):rep(widths[i] - #s)
      parts[i] = numeric[i] and (pad .. s) or (i < #values and s .. pad or s)
    end
    return (table.concat(parts, "  "):gsub("%s+$", ""))
  end
  local titles = {}
  for i, c in ipairs(columns) do titles[i] = c[2] end
  self:line(fmt(titles))
  for _, r in ipairs(cells) do self:line(fmt(r)) end
end

-- A human sentence on a terminal; in NDJSON mode an object.
function Out:message(text, t)
  if self.json then return self:line(json.encode(t or { message = text })) end
  self:line(text)
end

return M
