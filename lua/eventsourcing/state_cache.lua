-- eventsourcing.state_cache: where a repository keeps the state each
-- command left, so that the next command on that stream starts from it
-- instead of reading and folding the stream (repository opts.cache).
--
--   local cache = es.state_cache { size = 10000 }   -- this process's
--   local repo = es.repository(store, { cache = cache })
--
-- A cache is any object with get(key) -> string|nil and set(key, string)
-- (an nginx shared dict wrapped in two functions is one: every worker and
-- pool thread of a server then shares it). It holds text only: each hit
-- decodes a fresh state, so nothing a command's rules or its caller do to
-- a state can change what the next command starts from.
--
-- This one lives in one Lua VM and keeps at most about 2 x size entries:
-- when the newer half is full the older one is dropped (an entry read from
-- the older half moves to the newer), an LRU's behaviour without its
-- bookkeeping.
local M = {}

local Cache = {}
Cache.__index = Cache

function M.new(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("es.state_cache: opts must be a table", 2)
  end
  local size = opts and opts.size or 10000
  if type(size) ~= "number" or size < 1 or size % 1 ~= 0 then
    error("es.state_cache: size must be a positive integer", 2)
  end
  return setmetatable({ size = size, new = {}, old = {}, n = 0 }, Cache)
end

function Cache:get(key)
  local v = self.new[key]
  if v ~= nil then return v end
  v = self.old[key]
  if v ~= nil then
    self.old[key] = nil
    self:set(key, v)
  end
  return v
end

function Cache:set(key, value)
  local new = self.new
  if new[key] == nil then
    if self.n >= self.size then
      self.old, new = new, {}
      self.new, self.n = new, 0
    end
    self.n = self.n + 1
  end
  new[key] = value
end

-- Drops key (a state known to be behind its stream).
function Cache:delete(key)
  if self.new[key] ~= nil then
    self.new[key] = nil
    self.n = self.n - 1
  end
  self.old[key] = nil
end

M.Cache = Cache
return M
