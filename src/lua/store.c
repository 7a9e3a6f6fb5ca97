/* store.c - placeholder until the store binding lands (being written). */
#include "binding.h"
void store_open(lua_State *L) { (void)L; }
