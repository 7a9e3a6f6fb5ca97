/*
 * process.c - worker processes for the Lua layer: a rebuild spread over N
 * workers forks N-1 copies of the calling process (each has the read
 * model's handlers as they are, which no other process could be given)
 * and waits for them.
 *
 * A child must never use a session of its parent (libpq connections are
 * not shared) and must leave with core.exit: _exit runs no finalizers,
 * so the parent's sessions, copied into the child, are never closed or
 * written to from there. The child's collector may still finalize a
 * store that is garbage in the child (the parent may be using its own
 * copy, a COPY under way included): that lets go of the child's copy of
 * the session without a word on it (pg_disconnect, forsake in pg.c).
 */
#include "binding.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

/* core.fork() -> pid in the parent, 0 in the child | nil, err */
static int l_fork(lua_State *L)
{
    pid_t parent = getpid();
    pid_t pid;

    fflush(NULL);           /* nothing buffered is written twice */
    pid = fork();
    if (pid < 0)
        return esl_push_fail(L, ES_DATABASE, strerror(errno));
#ifdef __linux__
    /* a worker outlives no parent that died: it would go on writing into
     * a shadow table nobody swaps in */
    if (pid == 0 && (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent))
        _exit(70);
#else
    (void)parent;
#endif
    lua_pushinteger(L, (lua_Integer)pid);
    return 1;
}

/* core.wait(pid) -> "exited", code | "killed", signal | nil, err */
static int l_wait(lua_State *L)
{
    pid_t pid = (pid_t)luaL_checkinteger(L, 1);
    int status;

    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return esl_push_fail(L, ES_INVALID, strerror(errno));
    }
    if (WIFEXITED(status)) {
        lua_pushliteral(L, "exited");
        lua_pushinteger(L, WEXITSTATUS(status));
    } else {
        lua_pushliteral(L, "killed");
        lua_pushinteger(L, WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    }
    return 2;
}

/* core.kill(pid): SIGKILL (a rebuild stopping its other workers) */
static int l_kill(lua_State *L)
{
    pid_t pid = (pid_t)luaL_checkinteger(L, 1);
    luaL_argcheck(L, pid > 0, 1, "a worker's pid");
    lua_pushboolean(L, kill(pid, SIGKILL) == 0);
    return 1;
}

/* core.exit(code): leaves a forked worker at once (see above) */
static int l_exit(lua_State *L)
{
    int code = (int)luaL_optinteger(L, 1, 0);
    fflush(NULL);
    _exit(code & 0xff);
    return 0;
}

void process_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"fork", l_fork},
        {"wait", l_wait},
        {"kill", l_kill},
        {"exit", l_exit},
        {NULL, NULL}
    };
    esl_setfuncs(L, fns);
}
