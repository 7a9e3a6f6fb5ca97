-- spec/browser.lua: a headless Chromium for specs, driven over WebDriver
-- (Debian's chromium-driver: chromedriver speaks JSON over HTTP, so curl(1)
-- is all it takes; no WebSocket).
--
--   local browser = require "browser"
--   local ok, why = browser.available()           -- false, "no chromedriver ..." when it cannot run
--   local b = browser.start { width = 1280, height = 900, decode = es.json.decode, encode = es.json.encode }
--   b:go(url); b:click("#login-button"); b:type("#token", "..."); b:keys("#travel", browser.LEFT)
--   b:text("#order-total"); b:js("return document.title"); b:wait(function() ... end, 5)
--   b:screenshot("docs/console/store.png"); b:size(390, 844); b:errors(); b:quit()
local helpers = require "helpers"

local M = {}

local q = helpers.shell_quote
local ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

M.LEFT, M.RIGHT, M.ENTER, M.TAB, M.HOME, M.END =
  "\u{E012}", "\u{E014}", "\u{E007}", "\u{E004}", "\u{E011}", "\u{E010}"

-- ES_CHROMIUM / ES_CHROMEDRIVER: other binaries (or a missing one, to see the skip)
local CHROMIUM = os.getenv("ES_CHROMIUM") or "/usr/bin/chromium"
local DRIVER = os.getenv("ES_CHROMEDRIVER") or "/usr/bin/chromedriver"

local function executable(path) return helpers.sh("test -x " .. q(path)) end

-- true, or false and why the browser specs cannot run here
function M.available()
  if not executable(CHROMIUM) then
    return false, CHROMIUM .. " is not installed (Debian package chromium)"
  end
  if not executable(DRIVER) then
    return false, DRIVER .. " is not installed (Debian package chromium-driver)"
  end
  return true
end

----------------------------------------------------------------- base64

local B64 = {}
do
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  for i = 1, 64 do B64[alphabet:byte(i)] = i - 1 end
end

-- Standard base64 (what WebDriver's screenshot returns) to bytes.
function M.base64_decode(s)
  local out, n, bits, acc = {}, 0, 0, 0
  for i = 1, #s do
    local v = B64[s:byte(i)]
    if v then
      acc, bits = acc * 64 + v, bits + 6
      if bits >= 8 then
        bits = bits - 8
        local byte = math.floor(acc / 2 ^ bits)
        acc = acc - byte * 2 ^ bits
        n = n + 1
        out[n] = string.char(byte)
      end
    end
  end
  return table.concat(out)
end

----------------------------------------------------------------- WebDriver

local Browser = {}
Browser.__index = Browser

-- One WebDriver command: the response's value, or an error naming it.
function Browser:call(method, path, body)
  local req, res = self.dir .. "/req.json", self.dir .. "/res.json"
  local cmd = ("curl -sS --max-time 60 -X %s -o %s"):format(method, q(res))
  if body ~= nil then
    local f = assert(io.open(req, "wb"))
    f:write(self.encode(body))
    f:close()
    cmd = cmd .. " -H 'Content-Type: application/json' --data-binary @" .. q(req)
  end
  cmd = cmd .. " " .. q(self.base .. path)
  assert(helpers.sh(cmd), "chromedriver did not answer " .. method .. " " .. path)
  local text = helpers.read_file(res) or ""
  local doc = self.decode(text)
  if type(doc) ~= "table" then error(("webdriver %s %s: %s"):format(method, path, text), 2) end
  local v = doc.value
  if type(v) == "table" and type(v.error) == "string" then
    error(("webdriver %s %s: %s: %s"):format(method, path, v.error, tostring(v.message)), 2)
  end
  return v
end

function Browser:s(path) return "/session/" .. self.session .. path end

function Browser:go(url) return self:call("POST", self:s("/url"), { url = url }) end

-- The element a CSS selector finds (an error when none does).
function Browser:find(css)
  local v = self:call("POST", self:s("/element"), { using = "css selector", value = css })
  return v[ELEMENT]
end

function Browser:click(css)
  return self:call("POST", self:s("/element/" .. self:find(css) .. "/click"), {})
end

-- Typing as a user does (keys go to the element, which gets the focus).
function Browser:keys(css, text)
  return self:call("POST", self:s("/element/" .. self:find(css) .. "/value"), { text = text })
end
Browser.type = Browser.keys

function Browser:clear(css)
  return self:call("POST", self:s("/element/" .. self:find(css) .. "/clear"), {})
end

-- Runs a script in the page (its `return` value comes back); args as arguments[i].
function Browser:js(script, ...)
  return self:call("POST", self:s("/execute/sync"), { script = script, args = self.array({ ... }) })
end

-- The visible text of the first element a selector finds, or nil.
function Browser:text(css)
  return self:js("var e = document.querySelector(arguments[0]); return e ? e.innerText : null", css)
end

-- Polls fn() (every 50 ms) until it returns a true value, at most seconds;
-- returns that value and the seconds it took, or raises with what was last seen.
function Browser:wait(fn, seconds, what)
  local t0 = self.clock()
  local last
  repeat
    local ok, v = pcall(fn)
    if ok and v then return v, self.clock() - t0 end
    last = ok and tostring(v) or v
    helpers.sleep(0.05)
  until self.clock() - t0 > (seconds or 5)
  error(("timed out after %ss waiting for %s (last: %s)"):format(seconds or 5, what or "a condition",
    tostring(last)), 2)
end

-- The window's size in CSS pixels (the screenshots' width).
function Browser:size(width, height)
  return self:call("POST", self:s("/window/rect"), { width = width, height = height })
end

function Browser:screenshot(path)
  local png = M.base64_decode(self:call("GET", self:s("/screenshot")))
  local f = assert(io.open(path, "wb"))
  f:write(png)
  f:close()
  return #png
end

-- The page's console messages of level SEVERE since the last call (script
-- errors, CSP violations, failed loads): { { level, message } }
function Browser:errors()
  local out = {}
  for _, l in ipairs(self:call("POST", self:s("/se/log"), { type = "browser" })) do
    if l.level == "SEVERE" then out[#out + 1] = l end
  end
  return out
end

function Browser:quit()
  if self.session then pcall(self.call, self, "DELETE", self:s("")) end
  self.session = nil
  if self.pid then helpers.sh("kill " .. self.pid .. " 2>/dev/null") end
  self.pid = nil
  helpers.sh("rm -rf " .. q(self.dir))
end

local function monotonic()
  local f = io.open("/proc/uptime")
  local t = f and tonumber(f:read("*l"):match("^([%d%.]+)"))
  if f then f:close() end
  return t or os.time()
end

-- M.start{ width, height, encode, decode, array }: chromedriver on a free
-- port and a headless Chromium session with a fresh profile.
function M.start(o)
  local self = setmetatable({ encode = o.encode, decode = o.decode, array = o.array or function(t) return t end,
    clock = monotonic }, Browser)
  self.dir = helpers.mktemp_dir("es-browser")
  for attempt = 1, 8 do
    local port = 20000 + (os.time() * 7919 + attempt * 104729 + math.random(1, 9999)) % 40000
    local f = assert(io.popen(("%s --port=%d >%s 2>&1 & echo $!"):format(DRIVER, port,
      q(self.dir .. "/chromedriver.log"))))
    self.pid = f:read("*l")
    f:close()
    self.base = "http://127.0.0.1:" .. port
    local up = false
    for _ = 1, 100 do
      if helpers.sh("curl -fsS -o /dev/null " .. q(self.base .. "/status") .. " 2>/dev/null") then
        up = true
        break
      end
      if not helpers.alive(self.pid) then break end
      helpers.sleep(0.05)
    end
    if up then break end
    helpers.sh("kill " .. self.pid .. " 2>/dev/null")
    self.pid = nil
  end
  assert(self.pid, "chromedriver did not start: " .. tostring(helpers.read_file(self.dir .. "/chromedriver.log")))
  local v = self:call("POST", "/session", { capabilities = { alwaysMatch = {
    browserName = "chrome",
    ["goog:chromeOptions"] = { binary = CHROMIUM, args = self.array {
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
      "--user-data-dir=" .. self.dir .. "/profile",
      ("--window-size=%d,%d"):format(o.width or 1280, o.height or 900) } },
  } } })
  self.session = v.sessionId
  self:size(o.width or 1280, o.height or 900)
  return self
end

return M
