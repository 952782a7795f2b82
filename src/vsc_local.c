/* vsockcompat C core: the local transport (the layout of vsockcompat/transport/local.py). */
#define _GNU_SOURCE
#include "vsc_local.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define FIRST_AUTO_RID (VMCI_RESERVED_RESOURCE_ID_MAX + 1)
#define SNDBUF_WANTED (4 << 20)
#define PATH_BUF 4096
#define CDIR_MAX (VSC_RUNDIR_MAX + 16) /* <rundir>/c<cid> */
#define NAME_MAX_LEN (CDIR_MAX + 16) /* <rundir>/c<cid>/<rid> */

/* Settings (vsockcompat/_settings.py) */

static int parse_flag(const char *value, int dflt, int *out)
{
    if (value == NULL) {
        *out = dflt;
        return 0;
    }
    if (value[0] == '\0' || strcmp(value, "0") == 0) {
        *out = 0;
        return 0;
    }
    if (strcmp(value, "1") == 0) {
        *out = 1;
        return 0;
    }
    return -1;
}

static int parse_cid(const char *value, uint32_t *out)
{
    const char *p = value;
    unsigned long long v = 0;
    int digits = 0;

    if (value == NULL || value[0] == '\0') {
        *out = VMCI_HOST_CONTEXT_ID;
        return 0;
    }
    while (*p == ' ' || (*p >= '\t' && *p <= '\r'))
        p++;
    if (*p == '+')
        p++;
    for (; *p >= '0' && *p <= '9'; p++, digits++) {
        v = v * 10 + (unsigned)(*p - '0');
        if (v > 0xFFFFFFFEull)
            return -1;
    }
    while (*p == ' ' || (*p >= '\t' && *p <= '\r'))
        p++;
    if (digits == 0 || *p != '\0')
        return -1;
    *out = (uint32_t)v;
    return 0;
}

/* os.path.abspath: make absolute against the cwd, then drop "", "." and resolve "..". */
int vsc_abspath(const char *in, char *out, size_t size)
{
    char buf[PATH_BUF], *save = NULL, *part;
    size_t len = 0;
    int dbl;

    if (in[0] == '/') {
        if (strlen(in) >= sizeof buf)
            return -1;
        strcpy(buf, in);
    } else {
        char cwd[PATH_BUF];
        if (getcwd(cwd, sizeof cwd) == NULL)
            return -1;
        if ((size_t)snprintf(buf, sizeof buf, "%s/%s", cwd, in) >= sizeof buf)
            return -1;
    }
    dbl = buf[0] == '/' && buf[1] == '/' && buf[2] != '/';
    if (size < 3)
        return -1;
    out[0] = '\0';
    for (part = strtok_r(buf, "/", &save); part != NULL; part = strtok_r(NULL, "/", &save)) {
        size_t n = strlen(part);
        if (strcmp(part, ".") == 0)
            continue;
        if (strcmp(part, "..") == 0) {
            char *slash = strrchr(out, '/');
            len = slash ? (size_t)(slash - out) : 0;
            out[len] = '\0';
            continue;
        }
        if (len + 1 + n + 1 > size)
            return -1;
        out[len++] = '/';
        memcpy(out + len, part, n + 1);
        len += n;
    }
    if (len == 0)
        strcpy(out, "/");
    if (dbl) {
        if (len + 2 > size)
            return -1;
        memmove(out + 1, out, len + 1);
        if (len == 0)
            out[1] = '\0';
    }
    return 0;
}

static int is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

uint64_t vsc_local_start_ticks(pid_t pid)
{
    char path[64], stat[1024], *p;
    unsigned long long start = 0;
    ssize_t n;
    int fd, field;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, stat, sizeof stat - 1);
    close(fd);
    if (n <= 0)
        return 0;
    stat[n] = '\0';
    p = strrchr(stat, ')');
    if (p == NULL)
        return 0;
    p += 2; /* field 3, the state */
    for (field = 3; field < 22 && p != NULL; field++) {
        p = strchr(p, ' ');
        if (p != NULL)
            p++;
    }
    if (p == NULL || sscanf(p, "%llu", &start) != 1)
        return 0;
    return start;
}

static int sndbuf_size(void)
{
    char text[32];
    long v;
    ssize_t n;
    int fd = open("/proc/sys/net/core/wmem_max", O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return SNDBUF_WANTED;
    n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return SNDBUF_WANTED;
    text[n] = '\0';
    v = strtol(text, NULL, 10);
    return v > 0 && v < SNDBUF_WANTED ? (int)v : SNDBUF_WANTED;
}

/* The index of value in names (unset or empty: 0, the default), or -1. */
static int parse_choice(const char *value, const char *const *names, int n)
{
    int i;

    if (value == NULL || value[0] == '\0')
        return 0;
    for (i = 0; i < n; i++)
        if (strcmp(value, names[i]) == 0)
            return i;
    return -1;
}

static const char *const TRANSPORTS[] = {"auto", "local", "vsock", "hybrid"}; /* _settings.TRANSPORTS */
/* _settings.VSOCK_MODES; the index is the VSC_VSOCK_* value */
static const char *const VSOCK_MODES[] = {"auto", "seqpacket", "stream", "dgram"};
/* _settings.SHM_MODES; the index is the VSC_SHM_* value */
static const char *const SHM_MODES[] = {"auto", "shared", "mirrored"};

int vsc_local_open(vsc_local *t)
{
    const char *rundir = getenv("VSOCKCOMPAT_RUNDIR");
    char dflt[PATH_BUF];
    int no_ext, transport;

    memset(t, 0, sizeof *t);
    transport = parse_choice(getenv("VSOCKCOMPAT_TRANSPORT"), TRANSPORTS, 4);
    t->vsock_mode = parse_choice(getenv("VSOCKCOMPAT_VSOCK_MODE"), VSOCK_MODES, 4);
    t->shm_mode = parse_choice(getenv("VSOCKCOMPAT_SHM_MODE"), SHM_MODES, 3);
    if (transport < 0 || t->vsock_mode < 0 || t->shm_mode < 0)
        return -1;
    t->transport = transport == 3 ? VSC_TRANSPORT_HYBRID : transport == 2 ? VSC_TRANSPORT_VSOCK
                                                                            : VSC_TRANSPORT_LOCAL;
    if (parse_cid(getenv("VSOCKCOMPAT_CID"), &t->cid) != 0
        || parse_flag(getenv("VSOCKCOMPAT_DS_AUTOSTART"), 1, &t->ds_autostart) != 0
        || parse_flag(getenv("VSOCKCOMPAT_NO_EXTENSIONS"), 0, &no_ext) != 0)
        return -1;
    if (rundir == NULL || rundir[0] == '\0') {
        const char *xdg = getenv("XDG_RUNTIME_DIR");
        if (xdg != NULL && xdg[0] != '\0' && is_dir(xdg)) {
            if ((size_t)snprintf(dflt, sizeof dflt, "%s/vsockcompat", xdg) >= sizeof dflt)
                return -1;
        } else {
            snprintf(dflt, sizeof dflt, "/tmp/vsockcompat-%u", (unsigned)getuid());
        }
        rundir = dflt;
    }
    if (vsc_abspath(rundir, t->rundir, sizeof t->rundir) != 0)
        return -1;
    if (strlen(t->rundir) + VSC_LONGEST_NAME_LEN > VSC_SUN_PATH_MAX)
        return -1;
    t->sndbuf = sndbuf_size();
    t->pid = getpid();
    t->start = vsc_local_start_ticks(t->pid);
    return 0;
}

/* Paths */

static void context_dir(const vsc_local *t, uint32_t cid, char *out, size_t size)
{
    snprintf(out, size, "%s/c%u", t->rundir, (unsigned)cid);
}

static void endpoint_path(const vsc_local *t, vsc_handle h, char *out, size_t size)
{
    snprintf(out, size, "%s/c%u/%u", t->rundir, (unsigned)h.context, (unsigned)h.resource);
}

int vsc_local_makedirs(const char *path)
{
    char buf[PATH_BUF], *p;

    if (strlen(path) >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(buf, path);
    for (p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
        return -1;
    return is_dir(buf) ? 0 : (errno = ENOTDIR, -1);
}

/* Liveness: the account page's magic, closed flag and owner (pid, start time). */

static int account_alive(const vsc_local *t, const char *acct_path)
{
    uint64_t words[7];
    struct stat st;
    int fd = open(acct_path, O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return 0;
    if (fstat(fd, &st) != 0 || st.st_size < VSC_ACCT_SIZE) {
        close(fd);
        return 0;
    }
    n = pread(fd, words, sizeof words, 0);
    close(fd);
    if (n != (ssize_t)sizeof words)
        return 0;
    if (words[0] != ((uint64_t)VSC_ACCT_MAGIC | (uint64_t)VSC_ACCT_VERSION << 32))
        return 0;
    if (words[VSC_ACCT_OFF_CLOSED / 8] != 0)
        return 0;
    {
        uint64_t pid = words[VSC_ACCT_OFF_OWNER_PID / 8], start = words[VSC_ACCT_OFF_OWNER_START / 8];
        pid_t me = getpid();

        if (pid == (uint64_t)me)
            return start == (me == t->pid ? t->start : vsc_local_start_ticks(me));
        return pid > 0 && pid <= 0x7FFFFFFF && start != 0 && vsc_local_start_ticks((pid_t)pid) == start;
    }
}

int vsc_local_endpoint_alive(const vsc_local *t, vsc_handle h)
{
    char path[PATH_BUF];

    endpoint_path(t, h, path, sizeof path - 8);
    strcat(path, ".acct");
    return account_alive(t, path);
}

static int lexists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* Resource kinds besides endpoints (vsc_local_add_kind); registered before any allocation. */
#define MAX_KINDS 4
static struct {
    const char *suffix;
    vsc_local_alive_fn alive;
    vsc_local_reap_fn reap;
} g_kinds[MAX_KINDS];
static int g_nkinds;

int vsc_local_marker_alive(const vsc_local *t, const char *path)
{
    size_t n = strlen(path);
    int k;

    for (k = 0; k < g_nkinds; k++) {
        size_t m = strlen(g_kinds[k].suffix);
        if (n >= m && strcmp(path + n - m, g_kinds[k].suffix) == 0)
            return g_kinds[k].alive(t, path);
    }
    return 0;
}

int vsc_local_add_kind(const char *suffix, vsc_local_alive_fn alive, vsc_local_reap_fn reap)
{
    if (g_nkinds == MAX_KINDS)
        return -1;
    g_kinds[g_nkinds].suffix = suffix;
    g_kinds[g_nkinds].alive = alive;
    g_kinds[g_nkinds].reap = reap;
    g_nkinds++;
    return 0;
}

/* Remove the files of cdir whose names start with prefix. */
static void unlink_prefixed(const char *cdir, const char *prefix)
{
    char path[PATH_BUF];
    size_t plen = strlen(prefix);
    struct dirent *d;
    DIR *dir = opendir(cdir);

    if (dir == NULL)
        return;
    while ((d = readdir(dir)) != NULL) {
        if (strncmp(d->d_name, prefix, plen) != 0)
            continue;
        if ((size_t)snprintf(path, sizeof path, "%s/%s", cdir, d->d_name) < sizeof path)
            unlink(path);
    }
    closedir(dir);
}

/* Whether a live resource holds rid; reclaims a dead endpoint's files, and those of dead resources
 * of the registered kinds. Call under the lock. Files of other kinds (<rid>.qp*, ...) count as
 * live: only their owners reclaim them. The privileges of a free id are removed, so they never
 * pass to the next resource that takes it (<rid>.acl, vsc_acl.h). */
static int taken(const vsc_local *t, const char *cdir, uint32_t rid)
{
    char path[NAME_MAX_LEN], acct[PATH_BUF], prefix[16];
    size_t plen;
    struct dirent *d;
    DIR *dir;
    int found = 0, k;

    snprintf(path, sizeof path, "%s/%u", cdir, (unsigned)rid);
    snprintf(acct, sizeof acct, "%s.acct", path);
    if (lexists(path) || lexists(acct)) {
        if (account_alive(t, acct))
            return 1;
        unlink(path);
        unlink(acct);
    }
    for (k = 0; k < g_nkinds; k++) {
        snprintf(path, sizeof path, "%s/%u%s", cdir, (unsigned)rid, g_kinds[k].suffix);
        if (!lexists(path))
            continue;
        if (g_kinds[k].alive(t, path))
            return 1;
        if (g_kinds[k].reap != NULL)
            g_kinds[k].reap(t, path);
        unlink_prefixed(cdir, path + strlen(cdir) + 1);
    }
    plen = (size_t)snprintf(prefix, sizeof prefix, "%u.", (unsigned)rid);
    dir = opendir(cdir);
    if (dir == NULL)
        return 0;
    while (!found && (d = readdir(dir)) != NULL)
        found = strncmp(d->d_name, prefix, plen) == 0 && strcmp(d->d_name + plen, "acct") != 0
                && strncmp(d->d_name + plen, "acl", 3) != 0;
    closedir(dir);
    if (!found) {
        snprintf(path, sizeof path, "%s/%u.acl", cdir, (unsigned)rid);
        unlink(path);
    }
    return found;
}

static uint32_t next_rid(uint32_t rid)
{
    rid++;
    return rid >= VMCI_INVALID_ID || rid < FIRST_AUTO_RID ? FIRST_AUTO_RID : rid;
}

static uint32_t read_next(const char *cdir)
{
    char path[PATH_BUF], text[32];
    unsigned long long v;
    char *end;
    ssize_t n;
    int fd;

    snprintf(path, sizeof path, "%s/.next", cdir);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return FIRST_AUTO_RID;
    n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return FIRST_AUTO_RID;
    text[n] = '\0';
    v = strtoull(text, &end, 10);
    if (end == text)
        return FIRST_AUTO_RID;
    return v >= FIRST_AUTO_RID && v < VMCI_INVALID_ID ? (uint32_t)v : FIRST_AUTO_RID;
}

static void write_next(const char *cdir, uint32_t rid)
{
    char path[PATH_BUF], text[32];
    int fd, n;

    snprintf(path, sizeof path, "%s/.next", cdir);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    n = snprintf(text, sizeof text, "%u\n", (unsigned)rid);
    if (write(fd, text, (size_t)n) != n) {
        /* A short .next only restarts the search at 1024. */
    }
    close(fd);
}

static int count_entries(const char *cdir)
{
    DIR *dir = opendir(cdir);
    int n = 0;

    if (dir == NULL)
        return 0;
    while (readdir(dir) != NULL)
        n++;
    closedir(dir);
    return n;
}

static void put64(uint8_t *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
}

static int create_endpoint(const vsc_local *t, const char *cdir, uint32_t rid, vsc_bound *out)
{
    struct sockaddr_un addr;
    char acct_path[PATH_BUF];
    uint8_t *acct;
    int fd, listener;

    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s/%u", cdir, (unsigned)rid);
    snprintf(acct_path, sizeof acct_path, "%s.acct", addr.sun_path);
    fd = open(acct_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return errno == EMFILE || errno == ENFILE || errno == ENOSPC ? VMCI_ERROR_NO_RESOURCES
                                                                     : VMCI_ERROR_GENERIC;
    if (ftruncate(fd, VSC_ACCT_SIZE) != 0) {
        close(fd);
        unlink(acct_path);
        return VMCI_ERROR_NO_MEM;
    }
    acct = mmap(NULL, VSC_ACCT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (acct == MAP_FAILED) {
        unlink(acct_path);
        return VMCI_ERROR_NO_MEM;
    }
    if (vsc_acct_init(acct, VMCI_MAX_DATAGRAM_QUEUE_SIZE) != 0)
        goto fail_acct;
    listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (listener < 0)
        goto fail_acct;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int e = errno;
        close(listener);
        munmap(acct, VSC_ACCT_SIZE);
        unlink(acct_path);
        return e == EADDRINUSE ? VMCI_ERROR_DUPLICATE_ENTRY : VMCI_ERROR_GENERIC;
    }
    if (listen(listener, SOMAXCONN) != 0) {
        close(listener);
        unlink(addr.sun_path);
        goto fail_acct;
    }
    /* Owned (so alive) only once it accepts connections. */
    put64(acct + VSC_ACCT_OFF_OWNER_PID, (uint64_t)getpid());
    put64(acct + VSC_ACCT_OFF_OWNER_START, getpid() == t->pid ? t->start : vsc_local_start_ticks(getpid()));
    out->handle.context = t->cid;
    out->handle.resource = rid;
    out->listener = listener;
    out->acct = acct;
    return VMCI_SUCCESS;
fail_acct:
    munmap(acct, VSC_ACCT_SIZE);
    unlink(acct_path);
    return VMCI_ERROR_NO_RESOURCES;
}

int vsc_local_allocate(const vsc_local *t, uint32_t resource, vsc_local_create_fn create, void *arg)
{
    char cdir[CDIR_MAX], lock_path[PATH_BUF];
    int lock_fd, rc;

    context_dir(t, t->cid, cdir, sizeof cdir);
    if (vsc_local_makedirs(cdir) != 0)
        return errno == EACCES || errno == EPERM ? VMCI_ERROR_NO_ACCESS : VMCI_ERROR_GENERIC;
    snprintf(lock_path, sizeof lock_path, "%s/.lock", cdir);
    lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd < 0)
        return VMCI_ERROR_NO_ACCESS;
    while ((rc = flock(lock_fd, LOCK_EX)) != 0 && errno == EINTR)
        ;
    if (rc != 0) {
        close(lock_fd);
        return VMCI_ERROR_GENERIC;
    }
    if (resource != VMCI_INVALID_ID) {
        rc = taken(t, cdir, resource) ? VMCI_ERROR_DUPLICATE_ENTRY : create(t, cdir, resource, arg);
    } else {
        uint32_t rid = read_next(cdir);
        int tries = count_entries(cdir) + 1;

        while (tries-- > 0 && taken(t, cdir, rid))
            rid = next_rid(rid);
        rc = create(t, cdir, rid, arg);
        if (rc == VMCI_SUCCESS)
            write_next(cdir, next_rid(rid));
    }
    close(lock_fd);
    return rc;
}

static int create_endpoint_cb(const vsc_local *t, const char *cdir, uint32_t rid, void *arg)
{
    return create_endpoint(t, cdir, rid, arg);
}

int vsc_local_bind(const vsc_local *t, uint32_t resource, vsc_bound *out)
{
    return vsc_local_allocate(t, resource, create_endpoint_cb, out);
}

void vsc_local_unbind(const vsc_local *t, const vsc_bound *b)
{
    char path[PATH_BUF];

    size_t n;

    vsc_acct_close(b->acct);
    endpoint_path(t, b->handle, path, sizeof path - 8);
    n = strlen(path);
    unlink(path);
    strcpy(path + n, ".acct");
    unlink(path);
    strcpy(path + n, ".acl");
    unlink(path);
}

void vsc_local_unmap(uint8_t *acct)
{
    if (acct != NULL)
        munmap(acct, VSC_ACCT_SIZE);
}

/* Links */

static int map_account(const char *path, uint8_t **out)
{
    struct stat st;
    uint8_t *acct;
    uint64_t head;
    int fd = open(path, O_RDWR | O_CLOEXEC);

    if (fd < 0)
        return errno == EACCES || errno == EPERM ? VMCI_ERROR_NO_ACCESS : VMCI_ERROR_INVALID_RESOURCE;
    if (fstat(fd, &st) != 0 || st.st_size < VSC_ACCT_SIZE) {
        close(fd);
        return VMCI_ERROR_INVALID_RESOURCE;
    }
    acct = mmap(NULL, VSC_ACCT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (acct == MAP_FAILED)
        return VMCI_ERROR_NO_MEM;
    head = __atomic_load_n((uint64_t *)acct, __ATOMIC_ACQUIRE);
    if (head != ((uint64_t)VSC_ACCT_MAGIC | (uint64_t)VSC_ACCT_VERSION << 32)) {
        munmap(acct, VSC_ACCT_SIZE);
        return VMCI_ERROR_INVALID_RESOURCE;
    }
    *out = acct;
    return VMCI_SUCCESS;
}

int vsc_local_connect(const vsc_local *t, vsc_handle src, vsc_handle dst, vsc_conn *out)
{
    struct sockaddr_un self, peer;
    char cdir[PATH_BUF], acct_path[PATH_BUF];
    uint8_t *acct;
    int fd, rc;

    context_dir(t, dst.context, cdir, sizeof cdir);
    if (dst.context == VMCI_HYPERVISOR_CONTEXT_ID || !is_dir(cdir))
        return VMCI_ERROR_DST_UNREACHABLE;
    memset(&peer, 0, sizeof peer);
    peer.sun_family = AF_UNIX;
    endpoint_path(t, dst, peer.sun_path, sizeof peer.sun_path);
    snprintf(acct_path, sizeof acct_path, "%s.acct", peer.sun_path);
    if ((rc = map_account(acct_path, &acct)) != VMCI_SUCCESS)
        return rc;
    memset(&self, 0, sizeof self);
    self.sun_family = AF_UNIX;
    snprintf(self.sun_path, sizeof self.sun_path, "%s/c%u/%u-%u.%u", t->rundir, (unsigned)src.context,
             (unsigned)src.resource, (unsigned)dst.context, (unsigned)dst.resource);
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        munmap(acct, VSC_ACCT_SIZE);
        return VMCI_ERROR_NO_RESOURCES;
    }
    unlink(self.sun_path);
    if (bind(fd, (struct sockaddr *)&self, sizeof self) != 0) {
        rc = errno == EACCES ? VMCI_ERROR_NO_ACCESS : VMCI_ERROR_GENERIC;
        goto fail;
    }
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &t->sndbuf, sizeof t->sndbuf);
    if (connect(fd, (struct sockaddr *)&peer, sizeof peer) != 0) {
        switch (errno) {
        case ENOENT:
        case ECONNREFUSED:
            rc = VMCI_ERROR_INVALID_RESOURCE;
            break;
        case EAGAIN:
            rc = VMCI_ERROR_NO_RESOURCES;
            break;
        case EACCES:
        case EPERM:
            rc = VMCI_ERROR_NO_ACCESS;
            break;
        default:
            rc = VMCI_ERROR_GENERIC;
        }
        unlink(self.sun_path);
        goto fail;
    }
    out->fd = fd;
    out->acct = acct;
    memcpy(out->name, self.sun_path, sizeof out->name);
    return VMCI_SUCCESS;
fail:
    close(fd);
    munmap(acct, VSC_ACCT_SIZE);
    return rc;
}

void vsc_local_disconnect(vsc_conn *c)
{
    if (c->fd >= 0) {
        close(c->fd);
        unlink(c->name);
    }
    c->fd = -1;
    vsc_local_unmap(c->acct);
    c->acct = NULL;
}

/* Identity: the peer's bound path must be <rundir>/c<cid>/<rid>-<dcid>.<drid> naming self, and its
 * user (SO_PEERCRED) must own c<cid>/ (vsockcompat/transport/local.py identify). */

static const char *parse_id(const char *p, uint32_t *out)
{
    unsigned long long v = 0;
    int digits = 0;

    if (*p == '0') {
        *out = 0;
        return p + 1;
    }
    for (; *p >= '0' && *p <= '9' && digits < 10; p++, digits++)
        v = v * 10 + (unsigned)(*p - '0');
    if (digits == 0 || (*p >= '0' && *p <= '9') || v > 0xFFFFFFFFull)
        return NULL;
    *out = (uint32_t)v;
    return p;
}

int vsc_local_identify(const vsc_local *t, int fd, vsc_handle self, vsc_handle *src)
{
    struct sockaddr_un addr;
    socklen_t len = sizeof addr;
    char name[sizeof addr.sun_path + 1];
    size_t rlen = strlen(t->rundir), nlen;
    uint32_t cid, rid, dcid, drid;
    const char *p;

    memset(&addr, 0, sizeof addr);
    if (getpeername(fd, (struct sockaddr *)&addr, &len) != 0 || addr.sun_family != AF_UNIX)
        return -1;
    if (len <= offsetof(struct sockaddr_un, sun_path))
        return -1;
    nlen = len - offsetof(struct sockaddr_un, sun_path);
    memcpy(name, addr.sun_path, nlen);
    name[nlen] = '\0';
    nlen = strlen(name);
    if (nlen < rlen + 2 || memcmp(name, t->rundir, rlen) != 0 || name[rlen] != '/' || name[rlen + 1] != 'c')
        return -1;
    p = name + rlen + 2;
    if ((p = parse_id(p, &cid)) == NULL || *p++ != '/')
        return -1;
    if ((p = parse_id(p, &rid)) == NULL || *p++ != '-')
        return -1;
    if ((p = parse_id(p, &dcid)) == NULL || *p++ != '.')
        return -1;
    if ((p = parse_id(p, &drid)) == NULL || *p != '\0')
        return -1;
    if (dcid != self.context || drid != self.resource)
        return -1;
    {
        /* Bound in a context directory its user does not own: a loosened permission, refused. */
        struct ucred cred;
        socklen_t clen = sizeof cred;
        char cdir[CDIR_MAX];
        struct stat st;

        context_dir(t, cid, cdir, sizeof cdir);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 || stat(cdir, &st) != 0
            || cred.uid != st.st_uid)
            return -1;
    }
    src->context = cid;
    src->resource = rid;
    return 0;
}
