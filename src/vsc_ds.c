/* vsockcompat C core: the discovery-service client and the daemon's autostart. */
#define _GNU_SOURCE
#include "vsc_ds.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vsc_endpoint.h"

extern char **environ;

#define RECV_SIZE (VMCI_MAX_DG_PAYLOAD_SIZE + 1)
#define PACKAGE_TAIL "/vsockcompat/lib/libvmci.so.0"

static const vsc_handle DS_HANDLE = {VMCI_WELL_KNOWN_CONTEXT_ID, VMCI_DS_RESOURCE_ID};
static const vsc_handle INVALID = {VMCI_INVALID_ID, VMCI_INVALID_ID};
static unsigned msgid_counter;

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {0, ms * 1000000L};

    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Daemon autostart */

static char *env_entry(const char *name, const char *value, const char *more)
{
    size_t n = strlen(name) + strlen(value) + (more ? strlen(more) + 1 : 0) + 2;
    char *s = malloc(n);

    if (s != NULL)
        snprintf(s, n, "%s=%s%s%s", name, value, more ? ":" : "", more ? more : "");
    return s;
}

/* <parent> if this library is <parent>/vsockcompat/lib/libvmci.so.0, else NULL. */
static char *package_parent(void)
{
    Dl_info info;
    char real[PATH_MAX];
    size_t n, tail = strlen(PACKAGE_TAIL);

    if (dladdr(&msgid_counter, &info) == 0 || info.dli_fname == NULL
        || realpath(info.dli_fname, real) == NULL)
        return NULL;
    n = strlen(real);
    if (n <= tail || strcmp(real + n - tail, PACKAGE_TAIL) != 0)
        return NULL;
    real[n - tail] = '\0';
    return strdup(real);
}

/* Whether environ entry e is one daemon_env sets itself. */
static int replaced(const vsc_local *t, const char *e, const char *parent)
{
    if (strncmp(e, "VSOCKCOMPAT_RUNDIR=", 19) == 0 || strncmp(e, "LD_PRELOAD=", 11) == 0
        || (parent != NULL && strncmp(e, "PYTHONPATH=", 11) == 0))
        return 1;
    return t->transport == VSC_TRANSPORT_HYBRID
           && (strncmp(e, "VSOCKCOMPAT_HYBRID_UDS=", 23) == 0 || strncmp(e, "VSOCKCOMPAT_HYBRID_CID=", 23) == 0);
}

static char **daemon_env(const vsc_local *t)
{
    char *parent = package_parent(), **env;
    const char *pypath = getenv("PYTHONPATH");
    size_t n = 0, i, j = 0;

    while (environ[n] != NULL)
        n++;
    env = calloc(n + 5, sizeof *env);
    if (env == NULL) {
        free(parent);
        return NULL;
    }
    for (i = 0; i < n; i++) {
        if (replaced(t, environ[i], parent))
            continue;
        env[j] = strdup(environ[i]);
        if (env[j] != NULL)
            j++;
    }
    env[j] = env_entry("VSOCKCOMPAT_RUNDIR", t->rundir, NULL);
    if (env[j] != NULL)
        j++;
    if (parent != NULL) {
        env[j] = env_entry("PYTHONPATH", parent, pypath && pypath[0] ? pypath : NULL);
        if (env[j] != NULL)
            j++;
    }
    if (t->transport == VSC_TRANSPORT_HYBRID) { /* the daemon runs in /: absolute paths */
        if ((env[j] = vsc_hybrid_env_uds(t)) != NULL)
            j++;
        if ((env[j] = vsc_hybrid_env_cids(t)) != NULL)
            j++;
    }
    env[j] = NULL;
    free(parent);
    return env;
}

static void free_env(char **env)
{
    size_t i;

    for (i = 0; env[i] != NULL; i++)
        free(env[i]);
    free(env);
}

/* 0 if the daemon was launched (it may still fail later), -1 if not. */
static int spawn_daemon(const vsc_local *t)
{
    const char *python = getenv("VSOCKCOMPAT_PYTHON");
    char *argv[] = {NULL, "-m", "vsockcompat", "ds", "--idle-exit", "60", "--quiet", NULL};
    char log_path[PATH_MAX];
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    sigset_t none, all;
    char **env;
    pid_t child, grandchild;
    int status = 0, rc;

    argv[0] = (char *)(python != NULL && python[0] ? python : "python3");
    snprintf(log_path, sizeof log_path, "%s/ds.log", t->rundir);
    env = daemon_env(t);
    if (env == NULL)
        return -1;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_addchdir_np(&actions, "/");
    posix_spawnattr_init(&attr);
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    child = fork();
    if (child == 0) {
        rc = posix_spawnp(&grandchild, argv[0], &actions, &attr, argv, env);
        _exit(rc == 0 ? 0 : 127);
    }
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&actions);
    free_env(env);
    if (child < 0)
        return -1;
    while ((rc = (int)waitpid(child, &status, 0)) < 0 && errno == EINTR)
        ;
    if (rc < 0)
        return 0; /* the program ignores SIGCHLD: the status is gone, assume it went well */
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

/* Whether (1, 1) is alive, by the transport's rule (no traffic). */
static int ds_alive(const vsc_local *t)
{
    if (t->transport == VSC_TRANSPORT_HYBRID)
        return vsc_hybrid_host_alive(t, DS_HANDLE);
    return vsc_local_endpoint_alive(t, DS_HANDLE);
}

/* Start a daemon unless one serves (1, 1) already; 1 once (1, 1) is alive. */
static int start_daemon(const vsc_local *t)
{
    int64_t deadline = now_ms() + VSC_DS_SPAWN_TIMEOUT_MS;
    char lock_path[PATH_MAX];
    int fd, alive = 0;

    if (vsc_local_makedirs(t->rundir) != 0)
        return 0;
    snprintf(lock_path, sizeof lock_path, "%s/ds.spawn.lock", t->rundir);
    fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return 0;
    while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if ((errno != EWOULDBLOCK && errno != EINTR) || now_ms() >= deadline) {
            alive = ds_alive(t);
            goto out;
        }
        sleep_ms(20);
    }
    if ((alive = ds_alive(t)) != 0)
        goto out;
    if (spawn_daemon(t) != 0)
        goto out;
    while (!(alive = ds_alive(t)) && now_ms() < deadline)
        sleep_ms(20);
out:
    close(fd);
    return alive;
}

/* Requests and replies */

int vsc_ds_parse_reply(const uint8_t *buf, size_t n, uint32_t msgid, vsc_handle *out)
{
    int32_t msg_len;
    int code;

    if (n < 4 || get32(buf + VSC_DS_REP_OFF_MSGID) != msgid)
        return VSC_DS_NOT_MINE;
    if (n > VMCI_DS_MAX_MSG_SIZE)
        return VMCI_ERROR_PAYLOAD_TOO_LARGE;
    if (n < VSC_DS_REPLY_HEADER_SIZE)
        return VMCI_ERROR_GENERIC;
    msg_len = (int32_t)get32(buf + VSC_DS_REP_OFF_MSG_LEN);
    if (msg_len < 0 || msg_len > VMCI_DS_MAX_MSG_SIZE || (size_t)(VSC_DS_REP_OFF_MSG + msg_len) >= n
        || memchr(buf + VSC_DS_REP_OFF_MSG, 0, (size_t)msg_len) != NULL
        || buf[VSC_DS_REP_OFF_MSG + msg_len] != 0)
        return VMCI_ERROR_GENERIC;
    code = (int32_t)get32(buf + VSC_DS_REP_OFF_CODE);
    if (code == VMCI_SUCCESS) {
        out->context = get32(buf + VSC_DS_REP_OFF_HANDLE_CONTEXT);
        out->resource = get32(buf + VSC_DS_REP_OFF_HANDLE_RESOURCE);
    }
    return code;
}

static int await_reply(vsc_endpoint *ep, uint32_t msgid, uint8_t *buf, vsc_handle *out)
{
    int64_t deadline = now_ms() + VSC_DS_REPLY_TIMEOUT_MS;

    for (;;) {
        int64_t left = deadline - now_ms();
        vsc_handle src;
        int n = vsc_endpoint_recv(ep, buf, RECV_SIZE, &src, left > 0 ? (int)left : 0);
        int code;

        if (n < 0)
            return n;
        if (src.context != DS_HANDLE.context || src.resource != DS_HANDLE.resource)
            continue;
        code = vsc_ds_parse_reply(buf, (size_t)n, msgid, out);
        if (code != VSC_DS_NOT_MINE)
            return code;
    }
}

int vsc_ds_call(const vsc_local *t, int action, const char *name, vsc_handle handle, vsc_handle *out)
{
    uint8_t request[VMCI_DS_REQUEST_HEADER_SIZE + VMCI_DS_MAX_NAME_LEN], *buf;
    vsc_handle result = INVALID;
    vsc_endpoint *ep;
    size_t name_len;
    uint32_t msgid;
    int rc;

    if (out != NULL)
        *out = INVALID;
    if (name == NULL || (name_len = strnlen(name, VMCI_DS_MAX_NAME_LEN + 1)) > VMCI_DS_MAX_NAME_LEN)
        return VMCI_ERROR_INVALID_ARGS;
    msgid = __atomic_fetch_add(&msgid_counter, 1u, __ATOMIC_RELAXED) & 0x7FFFFFFFu;
    memset(request, 0, sizeof request);
    put32(request + VSC_DS_REQ_OFF_ACTION, (uint32_t)action);
    put32(request + VSC_DS_REQ_OFF_MSGID, msgid);
    put32(request + VSC_DS_REQ_OFF_HANDLE_CONTEXT, handle.context);
    put32(request + VSC_DS_REQ_OFF_HANDLE_RESOURCE, handle.resource);
    put32(request + VSC_DS_REQ_OFF_NAME_LEN, (uint32_t)name_len);
    memcpy(request + VSC_DS_REQ_OFF_NAME, name, name_len);
    buf = malloc(RECV_SIZE);
    if (buf == NULL)
        return VMCI_ERROR_NO_MEM;
    rc = vsc_endpoint_create(t, VMCI_INVALID_ID, &ep);
    if (rc != VMCI_SUCCESS) {
        free(buf);
        return rc;
    }
    rc = vsc_endpoint_send(ep, DS_HANDLE, request, (uint32_t)(VMCI_DS_REQUEST_HEADER_SIZE + name_len));
    /* Over vsock the daemon lives on the host (or is started by the bed's admin): never spawned;
     * on local and hybrid (the host side) it is. */
    if ((rc == VMCI_ERROR_INVALID_RESOURCE || rc == VMCI_ERROR_DST_UNREACHABLE) && t->ds_autostart
        && t->transport != VSC_TRANSPORT_VSOCK && start_daemon(t))
        rc = vsc_endpoint_send(ep, DS_HANDLE, request, (uint32_t)(VMCI_DS_REQUEST_HEADER_SIZE + name_len));
    if (rc >= 0)
        rc = await_reply(ep, msgid, buf, &result);
    vsc_endpoint_free(ep);
    free(buf);
    if (out != NULL && rc == VMCI_SUCCESS)
        *out = result;
    return rc;
}
