/*
 * vsockcompat C core: queue-pair rings (vmci-sdk.md sections 3.4 and 11.2).
 *
 * A queue is one 4096-byte header page (the 24-byte VMCIQueueHeader at
 * offset 0) followed by its data area; data offset i lives at byte 4096 + i.
 * A queue of size S holds at most S - 1 bytes; tail == head means empty.
 *
 * An endpoint sees two queues: it writes into its produce queue and reads
 * from its consume queue (the peer's produce queue). It writes only its own
 * produce queue's header page: producerTail (its write offset in its produce
 * queue), consumerHead (its read offset in its consume queue) and the private
 * waiting word. Indexes read from shared memory are never trusted: any index
 * >= size gives VMCI_ERROR_INVALID_SIZE and no copy happens.
 */
#ifndef VSC_RING_H
#define VSC_RING_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vsc_constants.h"

#ifdef __cplusplus
extern "C" {
#endif

#define VSC_QP_PAGE_SIZE       4096
#define VSC_QP_DATA_OFFSET     4096 /* data area of a queue, from the start of its header page */
/* Private part of a header page (past the SDK header), written only by its owner. */
#define VSC_QP_OFF_WAITING     64   /* u64: VSC_QP_WAITING_* bits of the owner, its sleep count above */
#define VSC_QP_WAITING_READ    1u   /* owner sleeps until its consume queue has data */
#define VSC_QP_WAITING_WRITE   2u   /* owner sleeps until its produce queue has space */
#define VSC_QP_WAITING_BITS    3u
#define VSC_QP_WAITING_ARM     4u   /* the sleep count's unit: each arm_wait adds one */

typedef struct {
    uint8_t *produce_q;     /* header page + produce_size data bytes; not owned */
    uint8_t *consume_q;     /* header page + consume_size data bytes; not owned */
    uint64_t produce_size;
    uint64_t consume_size;
} vsc_qp;

/* Write a fresh header: the pair's handle, both indexes 0, nobody waiting. */
void vsc_qp_init_header(uint8_t *queue, uint32_t context, uint32_t resource);

/* Free bytes in the produce queue / bytes ready in the consume queue, or
 * VMCI_ERROR_INVALID_SIZE. A zero-size queue has neither space nor data. */
int64_t vsc_qp_free_space(const vsc_qp *qp);
int64_t vsc_qp_buf_ready(const vsc_qp *qp);
/* The same two quantities seen from the other side of each queue. */
int64_t vsc_qp_produce_buf_ready(const vsc_qp *qp);
int64_t vsc_qp_consume_free_space(const vsc_qp *qp);

/* Write min(n, free) bytes; the count, VMCI_ERROR_QUEUEPAIR_NOSPACE if free == 0. */
int64_t vsc_qp_enqueue(vsc_qp *qp, const void *buf, size_t n);
/* Write whole messages while each fits, publishing the tail once. Returns the
 * bytes written with *msgs set, NOSPACE if the first one does not fit. */
int64_t vsc_qp_enqueuev(vsc_qp *qp, const struct iovec *iov, size_t count, size_t *msgs);
/* Read min(n, ready) bytes; the count, VMCI_ERROR_QUEUEPAIR_NODATA if ready == 0. */
int64_t vsc_qp_dequeue(vsc_qp *qp, void *buf, size_t n);
/* Like dequeue without advancing the head. */
int64_t vsc_qp_peek(const vsc_qp *qp, void *buf, size_t n);
/* Zero-copy read: the bytes at the head that are contiguous in the consume
 * queue, at most n. Returns the count (0 only if n == 0) with *offset set to the head (the
 * data lives at consume_q + VSC_QP_DATA_OFFSET + *offset), NODATA if nothing is
 * ready, or INVALID_SIZE. Nothing is consumed. */
int64_t vsc_qp_peek_span(const vsc_qp *qp, size_t n, uint64_t *offset);
/* Advance the head by n (0 <= n <= ready): n; VMCI_ERROR_INVALID_ARGS if
 * n > ready (nothing consumed), or INVALID_SIZE. */
int64_t vsc_qp_consume(vsc_qp *qp, size_t n);

/* Raw indexes (not validated): produce queue (tail, peer's head); consume queue (peer's tail, head). */
void vsc_qp_produce_indexes(const vsc_qp *qp, uint64_t *tail, uint64_t *head);
void vsc_qp_consume_indexes(const vsc_qp *qp, uint64_t *tail, uint64_t *head);

/* Waiting bits: set ours (keeping the count) then a full fence; a full fence then
 * read the peer's word: its bits and its sleep count, so a peer rings once per sleep. */
void vsc_qp_set_waiting(vsc_qp *qp, uint64_t bits);
uint64_t vsc_qp_peer_waiting(const vsc_qp *qp);
/* About to sleep: set our waiting bits (VSC_QP_WAITING_READ or _WRITE) and add
 * one to our sleep count, with the full fence, then count what the sleep waits
 * for (bytes ready, or free space).
 * A count >= want or an error clears the bits again at once, so a peer that saw
 * them rings for nobody only within this call. Returns the count or the error. */
int64_t vsc_qp_arm_wait(vsc_qp *qp, uint64_t bits, uint64_t want);

#ifdef __cplusplus
}
#endif
#endif
