/*
 * vsockcompat C core: what the two sides of a mirrored region (src/vsc_mirror.c, the attacher;
 * src/vsc_mirror_serve.c, the creator) share, in src/vsc_mirror_core.c: frames (mirror_wire.py),
 * a private copy with its change detection (mirror_diff.py), threads. Internal to those files.
 */
#ifndef VSC_MIRROR_CORE_H
#define VSC_MIRROR_CORE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "vsc_constants.h"
#include "vsc_shm.h"

/* The kind of a region's stream endpoint in the local id space (mirror_link.REGION). */
#define VSC_MIRROR_SUFFIX ".mir"

/* Little-endian u32, as the frames' fields are. */
void vsc_put_u32(uint8_t *p, uint32_t v);
uint32_t vsc_get_u32(const uint8_t *p);

/* Frames to send, appended back to back. */
typedef struct {
    uint8_t *buf;
    size_t len, cap;
} vsc_out;

/* Append one frame; 0, or -1 out of memory. */
int vsc_out_frame(vsc_out *o, int type, uint64_t arg, const void *payload, uint32_t len);
/* Send everything appended (in send() calls of at most piece bytes, 0: whole) and empty o,
 * whatever the result: 0, or -1 (errno; EAGAIN: the socket's send timeout passed). */
int vsc_out_send(vsc_out *o, int fd, size_t piece);
void vsc_out_free(vsc_out *o);

/* A received frame; payload points into the reader's buffer until its next fill. */
typedef struct {
    int type;
    uint64_t arg;
    const uint8_t *payload;
    uint32_t len;
} vsc_frame;

/* Received bytes cut into frames: [pos, len) of buf is not consumed yet. */
typedef struct {
    uint8_t *buf;
    size_t pos, len, cap;
} vsc_reader;

#define VSC_READ_EOF 0
#define VSC_READ_AGAIN 2
/* One recv() into r (flags: MSG_DONTWAIT, or 0 to block within the socket's timeout): 1 (bytes
 * came), VSC_READ_EOF, VSC_READ_AGAIN (none, or the timeout passed), -1 (errno; out of memory). */
int vsc_reader_fill(vsc_reader *r, int fd, int flags);
/* The next whole frame: 1, 0 (need more bytes), -1 (a header that is not one: wrong magic,
 * unknown type, reserved bits set, a payload over VSC_MIRROR_MAX_PAYLOAD). */
int vsc_reader_next(vsc_reader *r, vsc_frame *f);
void vsc_reader_free(vsc_reader *r);
/* An UPDATE within a region of size bytes, with a payload. */
int vsc_valid_update(const vsc_frame *f, uint64_t size);

/* One user's copy of a region: map (what the program sees) and shadow (what was last mirrored). */
typedef struct {
    uint8_t *map;       /* MAP_PRIVATE | MAP_ANONYMOUS, backing bytes */
    uint8_t *shadow;    /* size bytes; touched only by the side's thread once it runs */
    size_t size, backing;
    uint64_t next_scan; /* CLOCK_MONOTONIC ms */
} vsc_copy;

/* A zeroed copy of size bytes: a VMCI code (VMCI_ERROR_NO_MEM). */
int vsc_copy_init(vsc_copy *c, uint64_t size);
/* Free the shadow and, if unmap, the mapping. */
void vsc_copy_free(vsc_copy *c, int unmap);
/* Called for each run of changed lines appended to o, in order; 0, or -1 to fail the scan. */
typedef int (*vsc_run_fn)(void *arg, size_t start, size_t len);
/* Append an UPDATE to o for each run of changed lines since the last scan (runs of at most
 * VSC_MIRROR_MAX_PAYLOAD bytes); the shadow then holds what was appended. Schedules the next scan
 * VSC_MIRROR_INTERVAL_MS on (or ten times the scan's duration). 0, or -1 out of memory. */
int vsc_copy_scan(vsc_copy *c, vsc_out *o, vsc_run_fn ran, void *arg);
/* Write len bytes at offset into the mapping and the shadow (so they are not sent back). */
void vsc_copy_apply(vsc_copy *c, uint64_t offset, const uint8_t *data, size_t len);
/* Milliseconds until the next scan is due (0: now), and whether it is due. */
int vsc_copy_wait_ms(const vsc_copy *c);
int vsc_copy_due(const vsc_copy *c);

/* Whether a private copy of size bytes fits in MemAvailable (mirror._check_memory). */
int vsc_memory_fits(uint64_t size);
/* pthread_create with every signal blocked in the new thread: a VMCI code. */
int vsc_start_thread(pthread_t *thread, void *(*main)(void *), void *arg);

/* The creator's side of vsc_mirror_detach and vsc_mirror_abandon (src/vsc_mirror_serve.c). */
void vsc_mirror_serve_detach(vsc_region *r);
void vsc_mirror_serve_abandon(vsc_region *r);

#endif
