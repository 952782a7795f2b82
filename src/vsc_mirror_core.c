/* vsockcompat C core: what both sides of a mirrored region share (src/vsc_mirror_core.h):
 * frames (mirror_wire.py), a private copy and its change detection (mirror_diff.py), threads. */
#define _GNU_SOURCE
#include "vsc_mirror_core.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "vsc_link.h"

#define FIRST_READ (256 * 1024)

/* Frames (mirror_wire.py) */

void vsc_put_u32(uint8_t *p, uint32_t v)
{
    int i;
    for (i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v)
{
    int i;
    for (i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

uint32_t vsc_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64(const uint8_t *p)
{
    return (uint64_t)vsc_get_u32(p) | (uint64_t)vsc_get_u32(p + 4) << 32;
}

int vsc_out_frame(vsc_out *o, int type, uint64_t arg, const void *payload, uint32_t len)
{
    uint8_t *h;

    if (o->len + VSC_MIRROR_HEADER_SIZE + len > o->cap) {
        size_t cap = o->cap ? o->cap : 4096;
        uint8_t *grown;

        while (cap < o->len + VSC_MIRROR_HEADER_SIZE + len)
            cap *= 2;
        if ((grown = realloc(o->buf, cap)) == NULL)
            return -1;
        o->buf = grown;
        o->cap = cap;
    }
    h = o->buf + o->len;
    vsc_put_u32(h + VSC_MIRROR_OFF_MAGIC, VSC_MIRROR_MAGIC);
    h[VSC_MIRROR_OFF_TYPE] = (uint8_t)type;
    h[VSC_MIRROR_OFF_FLAGS] = 0;
    h[VSC_MIRROR_OFF_RESERVED] = h[VSC_MIRROR_OFF_RESERVED + 1] = 0;
    put_u64(h + VSC_MIRROR_OFF_ARG, arg);
    vsc_put_u32(h + VSC_MIRROR_OFF_LENGTH, len);
    if (len > 0)
        memcpy(h + VSC_MIRROR_HEADER_SIZE, payload, len);
    o->len += VSC_MIRROR_HEADER_SIZE + len;
    return 0;
}

int vsc_out_send(vsc_out *o, int fd, size_t piece)
{
    int rc = o->len == 0 ? 0 : vsc_send_pieces(fd, o->buf, o->len, piece);

    o->len = 0;
    return rc;
}

void vsc_out_free(vsc_out *o)
{
    free(o->buf);
    o->buf = NULL;
    o->len = o->cap = 0;
}

int vsc_reader_fill(vsc_reader *r, int fd, int flags)
{
    ssize_t n;

    if (r->pos > 0) {
        memmove(r->buf, r->buf + r->pos, r->len - r->pos);
        r->len -= r->pos;
        r->pos = 0;
    }
    if (r->len == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : FIRST_READ;
        uint8_t *grown;

        if (cap > VSC_MIRROR_HEADER_SIZE + VSC_MIRROR_MAX_PAYLOAD)
            cap = VSC_MIRROR_HEADER_SIZE + VSC_MIRROR_MAX_PAYLOAD;
        if (cap <= r->cap || (grown = realloc(r->buf, cap)) == NULL)
            return -1;
        r->buf = grown;
        r->cap = cap;
    }
    while ((n = recv(fd, r->buf + r->len, r->cap - r->len, flags)) < 0 && errno == EINTR)
        ;
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? VSC_READ_AGAIN : -1;
    r->len += (size_t)n;
    return n == 0 ? VSC_READ_EOF : 1;
}

int vsc_reader_next(vsc_reader *r, vsc_frame *f)
{
    const uint8_t *h = r->buf + r->pos;
    size_t have = r->len - r->pos;
    uint32_t len;

    if (have < VSC_MIRROR_HEADER_SIZE)
        return 0;
    len = vsc_get_u32(h + VSC_MIRROR_OFF_LENGTH);
    f->type = h[VSC_MIRROR_OFF_TYPE];
    if (vsc_get_u32(h + VSC_MIRROR_OFF_MAGIC) != VSC_MIRROR_MAGIC || f->type < VSC_MIRROR_HELLO
        || f->type > VSC_MIRROR_WANT || h[VSC_MIRROR_OFF_FLAGS] != 0 || h[VSC_MIRROR_OFF_RESERVED] != 0
        || h[VSC_MIRROR_OFF_RESERVED + 1] != 0 || len > VSC_MIRROR_MAX_PAYLOAD)
        return -1;
    if (have < VSC_MIRROR_HEADER_SIZE + (size_t)len)
        return 0;
    f->arg = get_u64(h + VSC_MIRROR_OFF_ARG);
    f->payload = h + VSC_MIRROR_HEADER_SIZE;
    f->len = len;
    r->pos += VSC_MIRROR_HEADER_SIZE + len;
    return 1;
}

void vsc_reader_free(vsc_reader *r)
{
    free(r->buf);
    memset(r, 0, sizeof *r);
}

int vsc_valid_update(const vsc_frame *f, uint64_t size)
{
    return f->len > 0 && f->arg <= size && f->len <= size - f->arg;
}

/* Change detection (mirror_diff.py) */

int vsc_copy_init(vsc_copy *c, uint64_t size)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);

    memset(c, 0, sizeof *c);
    c->size = (size_t)size;
    c->backing = (size_t)((size + page - 1) / page * page);
    c->map = mmap(NULL, c->backing, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (c->map == MAP_FAILED) {
        c->map = NULL;
        return VMCI_ERROR_NO_MEM;
    }
    c->shadow = calloc(1, c->size);
    if (c->shadow == NULL) {
        munmap(c->map, c->backing);
        c->map = NULL;
        return VMCI_ERROR_NO_MEM;
    }
    return VMCI_SUCCESS;
}

void vsc_copy_free(vsc_copy *c, int unmap)
{
    if (unmap && c->map != NULL)
        munmap(c->map, c->backing);
    free(c->shadow);
    c->map = NULL;
    c->shadow = NULL;
}

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int vsc_copy_scan(vsc_copy *c, vsc_out *o, vsc_run_fn ran, void *arg)
{
    size_t base, p, start = 0, run = 0;
    uint64_t began = now_ms(), took;

    for (base = 0; base < c->size; base += VSC_MIRROR_BLOCK) {
        size_t n = c->size - base < VSC_MIRROR_BLOCK ? c->size - base : VSC_MIRROR_BLOCK;

        if (memcmp(c->map + base, c->shadow + base, n) == 0)
            continue;
        for (p = base; p < base + n; p += VSC_MIRROR_LINE) {
            size_t l = base + n - p < VSC_MIRROR_LINE ? base + n - p : VSC_MIRROR_LINE;

            if (memcmp(c->map + p, c->shadow + p, l) == 0)
                continue;
            memcpy(c->shadow + p, c->map + p, l); /* the shadow holds exactly what is sent */
            if (run > 0 && start + run == p && run + l <= VSC_MIRROR_MAX_PAYLOAD) {
                run += l;
                continue;
            }
            if (run > 0 && (vsc_out_frame(o, VSC_MIRROR_UPDATE, start, c->shadow + start, (uint32_t)run) != 0
                            || (ran != NULL && ran(arg, start, run) != 0)))
                return -1;
            start = p;
            run = l;
        }
    }
    if (run > 0 && (vsc_out_frame(o, VSC_MIRROR_UPDATE, start, c->shadow + start, (uint32_t)run) != 0
                    || (ran != NULL && ran(arg, start, run) != 0)))
        return -1;
    took = now_ms() - began;
    c->next_scan = now_ms() + (10 * took > VSC_MIRROR_INTERVAL_MS ? 10 * took : VSC_MIRROR_INTERVAL_MS);
    return 0;
}

void vsc_copy_apply(vsc_copy *c, uint64_t offset, const uint8_t *data, size_t len)
{
    memcpy(c->map + offset, data, len);
    memcpy(c->shadow + offset, data, len);
}

int vsc_copy_wait_ms(const vsc_copy *c)
{
    uint64_t now = now_ms();

    return c->next_scan > now ? (int)(c->next_scan - now) : 0;
}

int vsc_copy_due(const vsc_copy *c)
{
    return now_ms() >= c->next_scan;
}

int vsc_memory_fits(uint64_t size)
{
    return size <= vsc_mem_available();
}

int vsc_start_thread(pthread_t *thread, void *(*main)(void *), void *arg)
{
    sigset_t all, old;
    int rc;

    /* The program's signals stay with the program's threads. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(thread, NULL, main, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc == 0 ? VMCI_SUCCESS : VMCI_ERROR_NO_RESOURCES;
}
