# eventsourcing - build, test and install.
#
#   make               build the module for Lua 5.4 and for LuaJIT
#   make test          every spec under Lua 5.4 and LuaJIT on a throwaway
#                      PostgreSQL (or ES_TEST_DATABASE_URL)
#   make test-citus    the store contract, global-order and Citus specs on a
#                      throwaway Citus cluster (scripts/citus.sh; builds Citus
#                      from ../shared/citus when not installed)
#   make bench-citus   appends and catch-up on Citus beside one PostgreSQL
#   make check-memory  the Lua 5.4 specs against an ASan+UBSan build
#   make bench         benchmarks (ratios against alternatives, same run)
#   make demo          the order service walk-through
#   make serve / stop  the order service over HTTP (nginx) / stop it
#   make deps          install missing Debian packages (as root)
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
               $(if $(UUID_LIBDIR),-L$(UUID_LIBDIR)) $(DEPS_LIBS) -pthread
ALL_CFLAGS = $(WARN) $(DEFS) -fPIC -Iinclude $(DEPS_CFLAGS) $(CFLAGS)
LDFLAGS_SO = -shared

# LuaRocks passes these; the defaults suit Debian.
PREFIX  ?= /usr/local
LUA_VERSION ?= 5.4
LUADIR  ?= $(PREFIX)/share/lua/$(LUA_VERSION)
LIBDIR  ?= $(PREFIX)/lib/lua/$(LUA_VERSION)
INCDIR_INSTALL ?= $(PREFIX)/include
BINDIR  ?= $(PREFIX)/bin

CORE_SRC = $(wildcard src/core/*.c)
LUA_SRC  = $(wildcard src/lua/*.c)
HEADERS  = $(wildcard include/*.h src/core/*.h src/lua/*.h)
LUA_MODS = $(wildcard lua/eventsourcing/*.lua)
LUA_TREE = $(LUA_MODS) $(wildcard lua/eventsourcing/*/*.lua)

BUILDS = build/lua5.4/eventsourcing/core.so build/luajit/eventsourcing/core.so
INSTALL_SO = $(if $(filter 5.1,$(LUA_VERSION)),build/luajit,build/lua$(LUA_VERSION))/eventsourcing/core.so
# Under LuaRocks (LUA_INCDIR given): one build, for the Lua it names.
ifdef LUA_INCDIR
BUILDS = build/rock/eventsourcing/core.so
INSTALL_SO = build/rock/eventsourcing/core.so
endif

.PHONY: all deps test test-citus bench-citus check-memory bench demo soak install clean lint fuzz fuzz-build

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

# Targets a user may type first install missing Debian packages BEFORE
# anything is compiled: the headers (lua.h, libpq-fe.h) come from them. So
# deps is a recipe line, then the build runs as a sub-make: prerequisites
# would run in any order under -j, and the sub-make also re-reads the
# pkg-config flags once the packages are there. As root scripts/deps.sh
# installs what is missing and a failure stops here; as another user it only
# lists what is missing (then the build goes on, and fails if it must).
# spec/35_first_run_spec.lua checks the order with `make -n`.
DEPS = scripts/deps.sh || [ "$$(id -u)" != 0 ]

deps:
	@$(DEPS)

# libFuzzer targets (clang only; they embed a Lua 5.4 state, so only they
# link liblua5.4). `make fuzz` builds and runs each for FUZZ_SECONDS with
# the seed corpus in fuzz/corpus/<target>/; new inputs go to
# build/fuzz/corpus/<target>/, findings to build/fuzz/findings/.
FUZZ_CC      ?= clang
FUZZ_SAN      = -fsanitize=address,undefined -fno-sanitize-recover=undefined \
                -fno-omit-frame-pointer
FUZZ_TARGETS  = json_decode json_roundtrip json_encode store_append time_iso names \
                meta_version
FUZZ_CFLAGS   = $(WARN) $(DEFS) -Iinclude $(DEPS_CFLAGS) $(LUA54_CFLAGS) -O1 -g \
                $(FUZZ_SAN) -fsanitize=fuzzer-no-link
FUZZ_LIBS     = $(DEPS_LIBS) $(shell $(PKG) --libs lua5.4 2>/dev/null || echo -llua5.4) -lm
FUZZ_OBJS     = $(patsubst src/%.c,build/fuzz/obj/%.o,$(CORE_SRC) $(LUA_SRC)) \
                build/fuzz/obj/fuzz/lua_host.o

build/fuzz/obj/%.o: src/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	@echo "  CC [fuzz] $<"; $(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@
build/fuzz/obj/fuzz/%.o: fuzz/%.c fuzz/fuzz.h $(HEADERS)
	@mkdir -p $(dir $@)
	@echo "  CC [fuzz] $<"; $(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@
build/fuzz/%: build/fuzz/obj/fuzz/%.o $(FUZZ_OBJS)
	@echo "  LD [fuzz] $@"; $(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer -o $@ $^ $(FUZZ_LIBS)

.PRECIOUS: build/fuzz/obj/%.o build/fuzz/obj/fuzz/%.o

# The module opened in Lua states on several threads at once, under
# ThreadSanitizer (spec/09_threads_spec.lua runs it).
TSAN_CFLAGS = $(WARN) $(DEFS) -Iinclude $(DEPS_CFLAGS) $(LUA54_CFLAGS) -O1 -g \
              -fsanitize=thread -fno-omit-frame-pointer
build/tsan/threads: fuzz/threads.c $(CORE_SRC) $(LUA_SRC) $(HEADERS)
	@mkdir -p $(dir $@)
	@echo "  CC [tsan] $@"; $(FUZZ_CC) $(TSAN_CFLAGS) -o $@ fuzz/threads.c \
	  $(CORE_SRC) $(LUA_SRC) $(FUZZ_LIBS) -lpthread

fuzz-build: $(addprefix build/fuzz/,$(FUZZ_TARGETS))

fuzz:
	@$(DEPS)
	@$(MAKE) --no-print-directory fuzz-build
	@scripts/fuzz.sh $(FUZZ_TARGETS)

# SPEC=spec/03_store_spec.lua runs one file (or several, space-separated).
test:
	@$(DEPS)
	@$(MAKE) --no-print-directory all
	@scripts/test.sh $(SPEC)

# Citus (scripts/citus.sh): a coordinator and 2 workers on loopback, Citus
# built from ../shared/citus when it is not installed.
test-citus:
	@$(DEPS)
	@$(MAKE) --no-print-directory all
	@scripts/citus.sh test $(SPEC)

bench-citus:
	@$(DEPS)
	@$(MAKE) --no-print-directory all
	@scripts/citus.sh bench

check-memory:
	@$(DEPS)
	@$(MAKE) --no-print-directory build/asan/eventsourcing/core.so
	@scripts/check-memory.sh $(SPEC)

bench:
	@$(DEPS)
	@$(MAKE) --no-print-directory all
	@scripts/bench.sh

demo:
	@$(DEPS)
	@$(MAKE) --no-print-directory all
	@scripts/demo.sh

# A bounded load run with a PostgreSQL crash halfway (SOAK_SECONDS=60).
soak:
	@scripts/soak.sh

lint:
	luacheck $(if $(CI),--no-color,) lua spec bench examples scripts bin/eventsourcing

# The modules keep their folders (eventsourcing/cli/, eventsourcing/admin/);
# bin/eventsourcing runs them with lua5.4 (BINDIR; LuaRocks installs the
# script itself, from build.install.bin).
install: all
	install -d $(DESTDIR)$(LUADIR)/eventsourcing $(DESTDIR)$(LIBDIR)/eventsourcing $(DESTDIR)$(INCDIR_INSTALL)
	for f in $(LUA_TREE); do \
	  install -d $(DESTDIR)$(LUADIR)/$$(dirname $${f#lua/}) && \
	  install -m 644 $$f $(DESTDIR)$(LUADIR)/$${f#lua/} || exit 1; \
	done
	install -m 755 $(INSTALL_SO) $(DESTDIR)$(LIBDIR)/eventsourcing/core.so
	install -m 644 include/eventsourcing.h $(DESTDIR)$(INCDIR_INSTALL)/
	$(if $(BINDIR),install -d $(DESTDIR)$(BINDIR) && install -m 755 bin/eventsourcing $(DESTDIR)$(BINDIR)/)

clean:
	rm -rf build

# The order service over HTTP (nginx + the projector): PORT=8080 by default.
.PHONY: serve stop
serve:
	@$(DEPS)
	@$(MAKE) --no-print-directory all
	@scripts/serve.sh

stop:
	@scripts/stop.sh
