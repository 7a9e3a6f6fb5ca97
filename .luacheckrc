-- luacheck configuration: `make lint` runs `luacheck lua spec bench examples`.
-- Code must run on Lua 5.4 and on LuaJIT (OpenResty's luajit2).
std = "lua54+luajit"
max_line_length = 120
codes = true
exclude_files = { "build/**", ".git/**" }

-- `jit`, `table.new` etc. are probed at run time; bit32/unpack for 5.1 compat.
read_globals = { "jit", "unpack" }

files["spec/**/*.lua"] = { std = "+busted" }
files[".busted"] = { std = "lua54" }
files["**/*.rockspec"] = { std = "+rockspec" }

-- nginx handlers run in OpenResty: the `ngx` API is global there.
files["examples/**/http/**/*.lua"] = { read_globals = { "ngx", "ndk" } }
