/* vsockcompat C core: shared memory regions, the protocol of vsockcompat/sharedmem.py. */
#define _GNU_SOURCE
#include "vsc_shm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define PATH_BUF 4096
#define MARKER_SUFFIX ".shm"
#define MARKER_READ 64 /* sharedmem._read_marker reads this much */

/* SHA-1 (FIPS 180-4), for the 8 hex digits of the runtime directory in shm object names. */

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p)
{
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f, k, tmp;
    int i;

    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (i = 16; i < 80; i++)
        w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (i = 0; i < 80; i++) {
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        tmp = rol(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol(b, 30);
        b = a;
        a = tmp;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

/* The first 4 bytes of sha1(data), as 8 lowercase hex digits. */
static void sha1_prefix(const uint8_t *data, size_t len, char out[9])
{
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    uint8_t block[64];
    uint64_t bits = (uint64_t)len * 8;
    size_t rest;
    int i;

    for (; len >= 64; data += 64, len -= 64)
        sha1_block(h, data);
    memset(block, 0, sizeof block);
    memcpy(block, data, len);
    block[len] = 0x80;
    rest = len + 1;
    if (rest > 56) {
        sha1_block(h, block);
        memset(block, 0, sizeof block);
    }
    for (i = 0; i < 8; i++)
        block[63 - i] = (uint8_t)(bits >> (8 * i));
    sha1_block(h, block);
    snprintf(out, 9, "%08x", (unsigned)h[0]);
}

/* Paths */

void vsc_shm_path(const vsc_local *t, vsc_handle h, char *out, size_t size)
{
    char hex[9];

    /* sharedmem.shm_prefix: sha1 of os.path.abspath(rundir)'s bytes; t->rundir is normalised so. */
    sha1_prefix((const uint8_t *)t->rundir, strlen(t->rundir), hex);
    snprintf(out, size, VSC_SHM_DIR "/vsc.%u.%s.%u.%u", (unsigned)getuid(), hex, (unsigned)h.context,
             (unsigned)h.resource);
}

static void marker_path(const vsc_local *t, vsc_handle h, char *out, size_t size)
{
    snprintf(out, size, "%s/c%u/%u" MARKER_SUFFIX, t->rundir, (unsigned)h.context, (unsigned)h.resource);
}

/* sharedmem._vmci_error */
static int errno_code(int e)
{
    switch (e) {
    case ENOSPC:
    case ENOMEM:
    case EFBIG:
    case EOVERFLOW:
        return VMCI_ERROR_NO_MEM;
    case EACCES:
    case EPERM:
        return VMCI_ERROR_NO_ACCESS;
    case ENOENT:
        return VMCI_ERROR_NOT_FOUND;
    case EMFILE:
    case ENFILE:
        return VMCI_ERROR_NO_RESOURCES;
    default:
        return VMCI_ERROR_GENERIC;
    }
}

static int shm_available(void)
{
    struct stat st;
    return stat(VSC_SHM_DIR, &st) == 0 && S_ISDIR(st.st_mode);
}

static int flock_retry(int fd, int op)
{
    int rc;

    while ((rc = flock(fd, op)) != 0 && errno == EINTR)
        ;
    return rc;
}

/* The allocation lock of context cid: *fd = -1 if the context has no directory. A VMCI code. */
static int context_lock(const vsc_local *t, uint32_t cid, int *fd)
{
    char path[PATH_BUF];

    snprintf(path, sizeof path, "%s/c%u/.lock", t->rundir, (unsigned)cid);
    *fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (*fd < 0)
        return errno == ENOENT ? VMCI_SUCCESS : errno_code(errno);
    if (flock_retry(*fd, LOCK_EX) != 0) {
        int e = errno;
        close(*fd);
        *fd = -1;
        return errno_code(e);
    }
    return VMCI_SUCCESS;
}

static void context_unlock(int fd)
{
    if (fd >= 0)
        close(fd);
}

/* Whether some process holds a lock on the shm object path: 1, 0, or a VMCI code (< 0).
 * Under the context lock. */
static int in_use(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW), rc;

    if (fd < 0)
        return errno == ENOENT ? 0 : errno_code(errno);
    if (flock(fd, LOCK_EX | LOCK_NB) == 0)
        rc = 0;
    else
        rc = errno == EWOULDBLOCK ? 1 : errno_code(errno);
    close(fd);
    return rc;
}

static uint64_t page_round(uint64_t size)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    return (size + page - 1) / page * page;
}

/* Parse an unsigned id as sharedmem's patterns do: 0 or [1-9][0-9]{0,9}, up to end. */
static int parse_rid(const char *p, const char *end, uint32_t *out)
{
    uint64_t v = 0;
    size_t n = (size_t)(end - p), i;

    if (n == 0 || n > 10 || (p[0] == '0' && n > 1))
        return -1;
    for (i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(p[i] - '0');
    }
    if (v > 0xFFFFFFFFull)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

/* The region handle a marker path <rundir>/c<cid>/<rid>.shm names; -1 if it is no marker. */
static int marker_handle(const char *path, vsc_handle *h)
{
    const char *slash = strrchr(path, '/'), *dir, *dot;
    size_t len;

    if (slash == NULL || slash == path)
        return -1;
    for (dir = slash - 1; dir > path && *dir != '/'; dir--)
        ;
    if (*dir != '/' || dir[1] != 'c' || parse_rid(dir + 2, slash, &h->context) != 0)
        return -1;
    len = strlen(slash + 1);
    if (len <= strlen(MARKER_SUFFIX))
        return -1;
    dot = slash + 1 + len - strlen(MARKER_SUFFIX);
    if (strcmp(dot, MARKER_SUFFIX) != 0)
        return -1;
    return parse_rid(slash + 1, dot, &h->resource);
}

/* The ".shm" kind of the id space: alive while some user holds the region (errors count as
 * alive: never reclaim what cannot be probed); reap removes a dead region's shm object. */
static int region_alive(const vsc_local *t, const char *marker)
{
    char path[VSC_SHM_PATH_MAX];
    vsc_handle h;

    if (marker_handle(marker, &h) != 0)
        return 1;
    vsc_shm_path(t, h, path, sizeof path);
    return in_use(path) != 0;
}

static void region_reap(const vsc_local *t, const char *marker)
{
    char path[VSC_SHM_PATH_MAX];
    vsc_handle h;

    if (marker_handle(marker, &h) == 0) {
        vsc_shm_path(t, h, path, sizeof path);
        unlink(path);
    }
}

__attribute__((constructor)) static void vsc_shm_load(void)
{
    vsc_local_add_kind(MARKER_SUFFIX, region_alive, region_reap);
}

/* sharedmem._read_marker: the first whitespace-separated token of the first 64 bytes, an int > 0.
 * *size gets it (saturated at UINT64_MAX). A VMCI code. */
static int read_marker(const char *path, uint64_t *size)
{
    char text[MARKER_READ + 1], *p;
    uint64_t v = 0;
    ssize_t n;
    int fd = open(path, O_RDONLY | O_CLOEXEC), negative = 0, digits = 0;

    if (fd < 0)
        return errno == ENOENT || errno == ENOTDIR ? VMCI_ERROR_NOT_FOUND : errno_code(errno);
    while ((n = read(fd, text, MARKER_READ)) < 0 && errno == EINTR)
        ;
    close(fd);
    if (n < 0)
        return errno_code(errno);
    text[n] = '\0';
    p = text;
    while (*p == ' ' || (*p >= '\t' && *p <= '\r'))
        p++;
    if (*p == '+' || *p == '-')
        negative = *p++ == '-';
    for (; (*p >= '0' && *p <= '9') || (*p == '_' && digits > 0 && p[1] >= '0' && p[1] <= '9'); p++) {
        if (*p == '_')
            continue;
        digits++;
        v = v > (UINT64_MAX - 9) / 10 ? UINT64_MAX : v * 10 + (uint64_t)(*p - '0');
    }
    if (digits == 0 || !(*p == '\0' || *p == ' ' || (*p >= '\t' && *p <= '\r')) || negative || v == 0)
        return VMCI_ERROR_NOT_FOUND;
    *size = v;
    return VMCI_SUCCESS;
}

/* sharedmem._map: a shared mapping of length bytes of path through its own open file, so the
 * mapping never shares the lock holder's open file description. */
static int map_object(const char *path, size_t length, void **addr)
{
    struct stat st;
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW), e;

    if (fd < 0)
        return errno_code(errno);
    if (fstat(fd, &st) != 0) {
        e = errno;
        close(fd);
        return errno_code(e);
    }
    if ((uint64_t)st.st_size < (uint64_t)length) {
        close(fd);
        return VMCI_ERROR_NOT_FOUND; /* not ready */
    }
    *addr = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    e = errno;
    close(fd);
    return *addr == MAP_FAILED ? errno_code(e) : VMCI_SUCCESS;
}

uint64_t vsc_mem_available(void)
{
    char text[4096], *p;
    unsigned long long kib;
    ssize_t n;
    int fd = open("/proc/meminfo", O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return UINT64_MAX;
    n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return UINT64_MAX;
    text[n] = '\0';
    p = strstr(text, "MemAvailable:");
    if (p == NULL || sscanf(p + strlen("MemAvailable:"), "%llu", &kib) != 1 || kib >= UINT64_MAX / 1024)
        return UINT64_MAX;
    return (uint64_t)kib * 1024;
}

/* sharedmem._memory_available: min(free space of /dev/shm, MemAvailable). A VMCI code. */
static int memory_available(uint64_t *out)
{
    struct statvfs st;
    uint64_t ram = vsc_mem_available();

    if (statvfs(VSC_SHM_DIR, &st) != 0)
        return errno_code(errno);
    *out = (uint64_t)st.f_bavail * (uint64_t)st.f_frsize;
    if (ram < *out)
        *out = ram;
    return VMCI_SUCCESS;
}

/* sharedmem._new_object: create the shm object (an orphan of that name is replaced), lock it
 * shared and reserve its backing. */
static int new_object(const char *path, size_t backing, int *out)
{
    int tries, fd, rc, e;

    for (tries = 0; tries < 2; tries++) {
        fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0) {
            if (errno != EEXIST)
                return errno_code(errno);
            rc = in_use(path);
            if (rc != 0)
                return rc > 0 ? VMCI_ERROR_NO_RESOURCES : rc; /* in use but has no marker */
            unlink(path);
            continue;
        }
        if (flock_retry(fd, LOCK_SH) != 0 || ftruncate(fd, (off_t)backing) != 0) {
            e = errno;
        } else {
            while ((e = posix_fallocate(fd, 0, (off_t)backing)) == EINTR)
                ;
        }
        if (e != 0) {
            close(fd);
            unlink(path);
            return errno_code(e);
        }
        *out = fd;
        return VMCI_SUCCESS;
    }
    return VMCI_ERROR_NO_RESOURCES;
}

/* sharedmem._sweep: remove the dead regions of the context directory cdir that have a marker.
 * Under its context lock. */
static void sweep(const vsc_local *t, const char *cdir, uint32_t cid)
{
    char path[VSC_SHM_PATH_MAX], marker[PATH_BUF];
    struct dirent *d;
    DIR *dir = opendir(cdir);
    vsc_handle h;
    size_t len;

    if (dir == NULL)
        return;
    h.context = cid;
    while ((d = readdir(dir)) != NULL) {
        len = strlen(d->d_name);
        if (len <= strlen(MARKER_SUFFIX) || strcmp(d->d_name + len - strlen(MARKER_SUFFIX), MARKER_SUFFIX) != 0
            || parse_rid(d->d_name, d->d_name + len - strlen(MARKER_SUFFIX), &h.resource) != 0)
            continue;
        vsc_shm_path(t, h, path, sizeof path);
        if (in_use(path) == 0) {
            snprintf(marker, sizeof marker, "%s/%s", cdir, d->d_name);
            unlink(path);
            unlink(marker);
        }
    }
    closedir(dir);
}

typedef struct {
    uint32_t size;
    size_t backing;
    vsc_region *region;
} create_args;

/* sharedmem.SharedRegion._create, under the context lock with rid reserved. */
static int create_at(const vsc_local *t, const char *cdir, uint32_t rid, void *arg)
{
    create_args *a = arg;
    char path[VSC_SHM_PATH_MAX], marker[PATH_BUF], text[160];
    vsc_handle h = {t->cid, rid};
    void *addr = MAP_FAILED;
    int fd, mfd, rc, n;

    sweep(t, cdir, t->cid);
    vsc_shm_path(t, h, path, sizeof path);
    snprintf(marker, sizeof marker, "%s/%u" MARKER_SUFFIX, cdir, (unsigned)rid);
    if ((rc = new_object(path, a->backing, &fd)) != VMCI_SUCCESS)
        return rc;
    if ((rc = map_object(path, a->backing, &addr)) != VMCI_SUCCESS)
        goto fail;
    mfd = open(marker, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (mfd < 0) {
        rc = errno_code(errno);
        goto fail;
    }
    n = snprintf(text, sizeof text, "%u %s\n", (unsigned)a->size, strrchr(path, '/') + 1);
    errno = 0;
    if (write(mfd, text, (size_t)n) != n) {
        rc = errno != 0 ? errno_code(errno) : VMCI_ERROR_NO_MEM;
        close(mfd);
        unlink(marker);
        goto fail;
    }
    close(mfd);
    a->region = calloc(1, sizeof *a->region);
    if (a->region == NULL) {
        rc = VMCI_ERROR_NO_MEM;
        unlink(marker);
        goto fail;
    }
    a->region->handle = h;
    a->region->size = a->size;
    a->region->backing = a->backing;
    a->region->lock_fd = fd;
    a->region->addr = addr;
    return VMCI_SUCCESS;
fail:
    if (addr != MAP_FAILED)
        munmap(addr, a->backing);
    close(fd);
    unlink(path);
    return rc;
}

int vsc_shm_create(const vsc_local *t, uint32_t size, vsc_region **out)
{
    create_args a;
    uint64_t backing, available;
    int rc;

    *out = NULL;
    if (size == 0)
        return VMCI_ERROR_INVALID_SIZE;
    if (!shm_available())
        return VMCI_ERROR_UNAVAILABLE;
    backing = page_round(size);
    if ((rc = memory_available(&available)) != VMCI_SUCCESS)
        return rc;
    if (backing > available)
        return VMCI_ERROR_NO_MEM;
#if SIZE_MAX < UINT64_MAX
    if (backing > SIZE_MAX)
        return VMCI_ERROR_NO_MEM;
#endif
    a.size = size;
    a.backing = (size_t)backing;
    a.region = NULL;
    rc = vsc_local_allocate(t, VMCI_INVALID_ID, create_at, &a);
    if (rc == VMCI_SUCCESS)
        *out = a.region;
    return rc;
}

int vsc_shm_query(const vsc_local *t, vsc_handle h, uint32_t *size)
{
    char path[VSC_SHM_PATH_MAX], marker[PATH_BUF];
    uint64_t actual = 0;
    int lock, rc;

    *size = 0;
    if (!shm_available())
        return VMCI_ERROR_UNAVAILABLE;
    vsc_shm_path(t, h, path, sizeof path);
    marker_path(t, h, marker, sizeof marker);
    if ((rc = context_lock(t, h.context, &lock)) != VMCI_SUCCESS)
        return rc;
    rc = read_marker(marker, &actual);
    if (rc == VMCI_SUCCESS) {
        int used = in_use(path);
        rc = used > 0 ? VMCI_SUCCESS : used == 0 ? VMCI_ERROR_NOT_FOUND : used;
    }
    context_unlock(lock);
    if (rc == VMCI_SUCCESS && actual > UINT32_MAX)
        return VMCI_ERROR_INVALID_SIZE; /* a Python region too large for a uint32 */
    if (rc == VMCI_SUCCESS)
        *size = (uint32_t)actual;
    return rc;
}

int vsc_shm_attach(const vsc_local *t, vsc_handle h, uint32_t size, vsc_region **out)
{
    char path[VSC_SHM_PATH_MAX], marker[PATH_BUF];
    uint64_t actual = 0;
    size_t backing = 0;
    void *addr = NULL;
    int lock, fd = -1, rc;

    *out = NULL;
    if (!shm_available())
        return VMCI_ERROR_UNAVAILABLE;
    vsc_shm_path(t, h, path, sizeof path);
    marker_path(t, h, marker, sizeof marker);
    if ((rc = context_lock(t, h.context, &lock)) != VMCI_SUCCESS)
        return rc;
    if ((rc = read_marker(marker, &actual)) != VMCI_SUCCESS)
        goto out;
    if ((size != 0 && size != actual) || actual > UINT32_MAX) {
        rc = VMCI_ERROR_INVALID_SIZE;
        goto out;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        rc = errno_code(errno); /* ENOENT: the region is gone */
        goto out;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
        /* Nobody holds it: its users died. */
        unlink(path);
        unlink(marker);
        rc = VMCI_ERROR_NOT_FOUND;
        goto out;
    }
    if (errno != EWOULDBLOCK || flock_retry(fd, LOCK_SH) != 0) {
        rc = errno_code(errno);
        goto out;
    }
    backing = (size_t)page_round(actual);
    if ((rc = map_object(path, backing, &addr)) != VMCI_SUCCESS)
        goto out;
    *out = calloc(1, sizeof **out);
    if (*out == NULL) {
        munmap(addr, backing);
        rc = VMCI_ERROR_NO_MEM;
        goto out;
    }
    (*out)->handle = h;
    (*out)->size = (uint32_t)actual;
    (*out)->backing = backing;
    (*out)->lock_fd = fd;
    (*out)->addr = addr;
out:
    if (rc != VMCI_SUCCESS && fd >= 0)
        close(fd);
    context_unlock(lock);
    return rc;
}

int vsc_shm_detach(const vsc_local *t, vsc_region *r)
{
    char path[VSC_SHM_PATH_MAX], marker[PATH_BUF];
    int lock, rc;

    munmap(r->addr, r->backing);
    vsc_shm_path(t, r->handle, path, sizeof path);
    marker_path(t, r->handle, marker, sizeof marker);
    rc = context_lock(t, r->handle.context, &lock);
    close(r->lock_fd);
    if (rc == VMCI_SUCCESS && in_use(path) == 0) {
        unlink(path);
        unlink(marker);
    }
    context_unlock(lock);
    free(r);
    return rc;
}

void vsc_shm_abandon(vsc_region *r)
{
    close(r->lock_fd);
    free(r);
}
