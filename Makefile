# eventsourcing - build, test and install.
#
#   make               build the module for Lua 5.4 and for LuaJIT
#   make test          every spec under Lua 5.4 and LuaJIT on a throwaway
#                      PostgreSQL (or ES_TEST_DATABASE_URL)
#   make test-citus    the store, global-order, projector, workflow and Citus
#                      specs against a throwaway Citus cluster (as root;
#                      builds Citus from ../shared/citus when not installed)
#   make bench-citus   appends and catch-up on Citus beside one PostgreSQL
#   make check-memory  the Lua 5.4 specs against an ASan+UBSan build
#   make bench         benchmarks (ratios against alternatives, same run)
#   make demo          the order service walk-through
#   make install       PREFIX=/usr/local DESTDIR=

CC      ?= cc
PKG     ?= pkg-config
CFLAGS  ?= -O2 -g
WARN     = -std=c99 -Wall -Wextra -Wshadow -Wstrict-prototypes \
           -Wmissing-prototypes -Wno-unused-parameter
DEFS     = -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE
DEPS_CFLAGS := $(shell $(PKG) --cflags libpq uuid 2>/dev/null || echo -I/usr/include/postgresql -I/usr/include/uuid)
DEPS_LIBS   := $(shell $(PKG) --libs libpq uuid 2>/dev/null || echo -lpq -luuid)
LUA54_CFLAGS  := $(shell $(PKG) --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
LUAJIT_CFLAGS := $(shell $(PKG) --cflags luajit 2>/dev/null || echo -I/usr/include/luajit-2.1)
# LuaRocks names the dependencies' folders (build_variables in the rockspec).
DEPS_CFLAGS += $(if $(PQ_INCDIR),-I$(PQ_INCDIR)) \
               $(if $(UUID_INCDIR),-I$(UUID_INCDIR) -I$(UUID_INCDIR)/uuid)
DEPS_LIBS   := $(if $(PQ_LIBDIR),-L$(PQ_LIBDIR)) \
               $(if $(UUID_LIBDIR),-L$(UUID_LIBDIR)) $(DEPS_LIBS)
ALL_CFLAGS = $(WARN) $(DEFS) -fPIC -Iinclude $(DEPS_CFLAGS) $(CFLAGS)
LDFLAGS_SO = -shared

# LuaRocks passes these; the defaults suit Debian.
PREFIX  ?= /usr/local
LUA_VERSION ?= 5.4
LUADIR  ?= $(PREFIX)/share/lua/$(LUA_VERSION)
LIBDIR  ?= $(PREFIX)/lib/lua/$(LUA_VERSION)
INCDIR_INSTALL ?= $(PREFIX)/include

CORE_SRC = $(wildcard src/core/*.c)
LUA_SRC  = $(wildcard src/lua/*.c)
HEADERS  = $(wildcard include/*.h src/core/*.h src/lua/*.h)
LUA_MODS = $(wildcard lua/eventsourcing/*.lua)

BUILDS = build/lua5.4/eventsourcing/core.so build/luajit/eventsourcing/core.so
INSTALL_SO = $(if $(filter 5.1,$(LUA_VERSION)),build/luajit,build/lua$(LUA_VERSION))/eventsourcing/core.so
# Under LuaRocks (LUA_INCDIR given): one build, for the Lua it names.
ifdef LUA_INCDIR
BUILDS = build/rock/eventsourcing/core.so
INSTALL_SO = build/rock/eventsourcing/core.so
endif

.PHONY: all test test-citus bench-citus check-memory bench demo install clean lint

all: $(BUILDS)

# One source tree, one object folder per flavour: a module built for 5.4
# needs lua_pcallk and friends, which LuaJIT does not have. Modules are not
# linked against a Lua library: the host provides the symbols.
ASAN = -fsanitize=address,undefined -fno-omit-frame-pointer \
       -fno-sanitize-recover=undefined

define flavour
build/$(1)/obj/%.o: src/%.c $$(HEADERS)
	@mkdir -p $$(dir $$@)
	@echo "  CC [$(1)] $$<"; $$(CC) $$(ALL_CFLAGS) $(2) -c $$< -o $$@
build/$(1)/eventsourcing/core.so: $$(patsubst src/%.c,build/$(1)/obj/%.o,$$(CORE_SRC) $$(LUA_SRC))
	@mkdir -p $$(dir $$@)
	@echo "  LD [$(1)] $$@"; $$(CC) -shared $(3) -o $$@ $$^ $$(DEPS_LIBS)
endef
$(eval $(call flavour,lua5.4,$(LUA54_CFLAGS),))
$(eval $(call flavour,luajit,$(LUAJIT_CFLAGS),))
$(eval $(call flavour,asan,$(LUA54_CFLAGS) $(ASAN) -O1,$(ASAN)))
$(eval $(call flavour,rock,-I$(LUA_INCDIR),))

# SPEC=spec/03_store_spec.lua runs one file (or several, space-separated).
test: all
	@scripts/test.sh $(SPEC)

test-citus: all
	@scripts/citus.sh test $(SPEC)

bench-citus: all
	@scripts/citus.sh bench

check-memory: build/asan/eventsourcing/core.so
	@scripts/check-memory.sh $(SPEC)

bench: all
	@scripts/bench.sh

demo: all
	@scripts/demo.sh

lint:
	luacheck $(if $(CI),--no-color,) lua spec bench examples

install: all
	install -d $(DESTDIR)$(LUADIR)/eventsourcing $(DESTDIR)$(LIBDIR)/eventsourcing $(DESTDIR)$(INCDIR_INSTALL)
	install -m 644 $(LUA_MODS) $(DESTDIR)$(LUADIR)/eventsourcing/
	install -m 755 $(INSTALL_SO) $(DESTDIR)$(LIBDIR)/eventsourcing/core.so
	install -m 644 include/eventsourcing.h $(DESTDIR)$(INCDIR_INSTALL)/

clean:
	rm -rf build

# The order service over HTTP (nginx + the projector): PORT=8080 by default.
.PHONY: serve stop
serve: all
	@scripts/serve.sh

stop:
	@scripts/stop.sh
