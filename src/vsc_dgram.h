/*
 * vsockcompat C core: the datagram data plane shared by the Cython extension
 * and the libvmci.so.0 preload library.
 *
 * A frame on the wire is exactly a VMCI datagram: the 24-byte header of
 * vmci-sdk.md section 3.1 (little-endian) followed by payloadSize bytes.
 *
 * Every receiving endpoint owns a queue account: a small shared file that all
 * senders map. It makes the SDK's per-endpoint queue bound
 * (VMCI_MAX_DATAGRAM_QUEUE_SIZE bytes, header included) exact across any
 * number of sending processes.
 */
#ifndef VSC_DGRAM_H
#define VSC_DGRAM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "vsc_constants.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Frames with at most this many payload bytes are sent with one send() of a contiguous copy,
 * and received (while the receiver's recent frames were that small) with one recv() into a
 * frame buffer, then copied out: below it a copy is cheaper than the iovec import of
 * sendmsg/recvmsg. */
#define VSC_COPY_MAX 8192

/* Status codes of the core that are not VMCI codes (below the VMCI range). */
#define VSC_AGAIN      (-2001) /* nothing to receive right now (or the wait timed out) */
#define VSC_PEER_GONE  (-2002) /* the connection or the receiving endpoint is gone */
#define VSC_BAD_FRAME  (-2003) /* a frame whose length disagrees with its header */
#define VSC_FORGED     (-2004) /* a frame whose handles disagree with the connection's */
#define VSC_ACCEPT     (-2005) /* the listening socket has connections to accept */
#define VSC_WAKE       (-2006) /* the wake-up descriptor is readable */
#define VSC_INTR       (-2007) /* the wait was interrupted (signal, spurious wake-up): call again */
#define VSC_DENIED     (-2008) /* a frame from a sender without the privilege was read and dropped */
#define VSC_STALE      (-2009) /* the receiver's privileges changed since the link checked them */

/* Queue account layout (one page, shared by the receiver and its senders). */
#define VSC_ACCT_MAGIC        0x51435356u /* "VSCQ" */
#define VSC_ACCT_VERSION      1u
#define VSC_ACCT_OFF_MAGIC    0
#define VSC_ACCT_OFF_VERSION  4
#define VSC_ACCT_OFF_LIMIT    8
#define VSC_ACCT_OFF_PRODUCED 16  /* written only by senders, under flock */
#define VSC_ACCT_OFF_CONSUMED 24  /* written only by the receiver */
#define VSC_ACCT_OFF_CLOSED   32  /* set once by the receiver when it goes away */
#define VSC_ACCT_OFF_OWNER_PID   40  /* u64: pid of the endpoint's owner */
#define VSC_ACCT_OFF_OWNER_START 48  /* u64: its start time, /proc/<pid>/stat field 22 */
#define VSC_ACCT_OFF_ACL_EPOCH   56  /* u64: bumped by every change of the endpoint's privileges */
#define VSC_ACCT_OFF_LOCK     64  /* robust process-shared pthread mutex guarding PRODUCED */
#define VSC_ACCT_LOCK_SIZE    64
#define VSC_ACCT_SIZE         4096

typedef struct {
    uint32_t context;
    uint32_t resource;
} vsc_handle;

typedef struct {
    vsc_handle dst;
    vsc_handle src;
    uint64_t payload_size;
} vsc_dg_header;

void vsc_dg_encode_header(uint8_t out[VMCI_DG_HEADERSIZE], const vsc_dg_header *h);
void vsc_dg_decode_header(const uint8_t in[VMCI_DG_HEADERSIZE], vsc_dg_header *h);

/* Initialise a fresh account page for an endpoint with the given byte limit.
 * Returns 0, or an errno value if the lock cannot be initialised. */
int vsc_acct_init(uint8_t *acct, uint64_t limit);
void vsc_acct_close(uint8_t *acct);
uint64_t vsc_acct_queued(const uint8_t *acct);

/*
 * Send one datagram on a connected SOCK_SEQPACKET socket without blocking.
 * Reserves the frame in the receiver's account first (under the account's
 * lock), so the receiver can never observe a frame that is not yet counted.
 * Returns the frame size (header included) on success, VMCI_ERROR_NO_RESOURCES
 * when the receiver's queue is full, VSC_PEER_GONE when the receiver is gone,
 * another VMCI error code otherwise; *sys_errno receives errno (0 if none).
 */
int vsc_dg_send(int sock_fd, uint8_t *acct, const vsc_dg_header *h, const void *payload,
                int *sys_errno);

/* A link: one sender endpoint's connection to one receiver, with its header template. */
typedef struct {
    int fd;         /* -1 once closed; changed only under the account's lock */
    uint8_t *acct;  /* the receiver's account page */
    vsc_dg_header header;
} vsc_link;

void vsc_link_init(vsc_link *link, int fd, uint8_t *acct, vsc_handle dst, vsc_handle src);
/* Mark the link closed; waits for a send in progress on it. The caller then closes the fd. */
void vsc_link_close(vsc_link *link);
int vsc_link_send(vsc_link *link, const void *payload, uint64_t length, int *sys_errno);

/*
 * Receive one frame without blocking. The payload is scattered into buf, then
 * spill (so a datagram larger than buf is never truncated). Returns the frame
 * size (>= 24) with *h filled, VSC_AGAIN, VSC_PEER_GONE (orderly close),
 * VSC_BAD_FRAME, or a VMCI error code with *sys_errno set. Every received frame
 * is released from the account (clamped so the account never goes negative).
 */
ssize_t vsc_dg_recv(int sock_fd, uint8_t *acct, vsc_dg_header *h, void *buf, size_t buf_len,
                    void *spill, size_t spill_len, int *sys_errno);

/*
 * A receiver: the connections senders opened to one endpoint, multiplexed with
 * epoll. The oldest connection is served first, so a sender that reconnects
 * cannot overtake its own datagrams still queued on the old connection.
 */
typedef struct {
    int fd;          /* -1: slot unused */
    vsc_handle src;  /* the kernel-verified sender */
    uint64_t seq;    /* accept order */
    int hot_ok;      /* blocking, with a read timeout of VSC_RX_HOT_MS: may be read hot */
} vsc_rx_conn;

#define VSC_RX_MAX_READY 64
/* Frames read with one recvmmsg while one sender streams; each slot holds any frame. */
#define VSC_RX_BATCH 16
#define VSC_RX_SLOT  (VMCI_DG_HEADERSIZE + VMCI_MAX_DG_PAYLOAD_SIZE + 1)
/* Receives in a row that skip epoll_wait while one connection is served. */
#define VSC_RX_SKIPS 16
/* A hot read blocks on the one connection for at most this (its SO_RCVTIMEO, which
 * the kernel rounds up to clock ticks: a few ms)... */
#define VSC_RX_HOT_MS 1
/* ...so it is tried only when the caller waits forever or at least this long. */
#define VSC_RX_HOT_MIN_WAIT_MS 100

typedef struct {
    int epfd, listener_fd, wake_fd;
    uint8_t *acct;
    vsc_handle self;
    vsc_rx_conn *conns;  /* indexed by fd */
    int nconns;          /* slots allocated */
    int ready[VSC_RX_MAX_READY];
    int nready;          /* ready[nready - 1] is served next */
    uint64_t next_seq;
    int last_fd;         /* the connection of the last status that names one */
    int nlive;           /* connections being served */
    int only_fd;         /* the connection, when nlive == 1 */
    int skips;           /* epoll_wait calls skipped in a row (bounded) */
    int hot_fd;          /* the only connection, while its last read delivered a frame; -1: none */
    int parked_fd;       /* the hot connection, out of the epoll set while nothing else polls
                          * epfd (each frame then wakes only the reader, no epoll callback);
                          * put back before any wait that must see it; -1: none */
    /* Frames read ahead from connection batch_fd, delivered (and only then released from
     * the account, so the queue bound stays exact) before anything else is read. */
    uint8_t *batch;      /* VSC_RX_BATCH slots, allocated when a sender first streams */
    int pending_fd;      /* an eventfd in the epoll set, readable while frames wait in the
                          * batch, so epfd stays readable for a caller that polls it; -1:
                          * no read-ahead */
    int pending_set;     /* pending_fd was made readable */
    int polled;          /* someone may poll epfd (the default): keep pending_fd up to date */
    int copy_recv;       /* the last frame read was small: read the next into frame */
    uint8_t *frame;      /* VSC_RX_SLOT bytes, allocated when first needed */
    uint64_t last_len;   /* size of the last frame delivered (0: none yet) */
    int batch_fd;
    int batch_next, batch_count;
    uint32_t batch_len[VSC_RX_BATCH];
    int batch_flags[VSC_RX_BATCH];
} vsc_rx;

int vsc_rx_init(vsc_rx *rx, int listener_fd, int wake_fd, uint8_t *acct, vsc_handle self);
void vsc_rx_destroy(vsc_rx *rx);
/*
 * Serve the connection fd. A blocking fd gets a receive timeout (SO_RCVTIMEO) of
 * VSC_RX_HOT_MS and may then be read hot (see vsc_rx_recv); every other read of
 * it passes MSG_DONTWAIT. Returns 0 or an errno value.
 */
int vsc_rx_add(vsc_rx *rx, int fd, vsc_handle src);
void vsc_rx_remove(vsc_rx *rx, int fd);
/*
 * Wait up to timeout_ms (-1: forever) and receive one frame into buf, then spill.
 * Returns the frame size (>= 24; rx->last_fd names its connection, whose
 * handles the frame carries), VSC_AGAIN on timeout, VSC_ACCEPT, VSC_WAKE,
 * VSC_INTR, or VSC_PEER_GONE / VSC_BAD_FRAME / VSC_FORGED / a VMCI error code
 * for the connection rx->last_fd (the caller removes it).
 * While one connection streams (the account shows more bytes queued than the
 * last frame delivered had), up to
 * VSC_RX_BATCH frames are read from it with one recvmmsg and handed out one
 * per call, each checked and released from the account as it is handed out;
 * removing the connection discards (and releases) the rest.
 * While one connection is served and its last read delivered a frame (it is
 * hot), a receive that would wait blocks in recvmsg on it alone, without
 * epoll_wait, for at most VSC_RX_HOT_MS (only when timeout_ms is -1 or at least
 * VSC_RX_HOT_MIN_WAIT_MS); if nothing came, the connection is no longer hot and
 * the call returns VSC_INTR, so the next one waits on everything with epoll. A
 * new connection, a wake-up or a close is thus noticed within that bound, and
 * at the latest every VSC_RX_SKIPS receives.
 * While nothing else polls epfd (vsc_rx_set_polled 0), the hot connection is
 * taken out of the epoll set (one epoll_ctl when it turns hot), so that its
 * frames do not also wake epoll; it is put back before any wait that must see it.
 */
ssize_t vsc_rx_recv(vsc_rx *rx, void *buf, size_t buf_len, void *spill, size_t spill_len,
                    int timeout_ms, int *sys_errno);
/*
 * Whether anything but vsc_rx_recv may poll rx->epfd (1 after vsc_rx_init). With 0,
 * frames read ahead do not make epfd readable, saving two system calls per batch,
 * and the hot connection leaves the epoll set (see vsc_rx_recv); setting 1 again
 * makes epfd readable at once if frames wait or a connection is out of the set (the
 * next vsc_rx_recv, which may then find nothing, puts it back). Only this call may
 * run on another thread than the receiving one.
 */
void vsc_rx_set_polled(vsc_rx *rx, int polled);

#ifdef __cplusplus
}
#endif
#endif
