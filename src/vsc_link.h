/*
 * vsockcompat C core: the link machinery of the vsock transport (src/vsc_vsock.h), over connected
 * sockets of any family, so the host's tests (which never create AF_VSOCK sockets) run it over
 * AF_UNIX pairs: the hello and the verdict (vsockcompat/transport/vsock.py, "Wire format of a
 * link"; layouts and magics in vsc_constants.h), the pump of a link (the endpoint sends, without
 * blocking and all or nothing, on an AF_UNIX SEQPACKET pair; a thread forwards each message with
 * a blocking send and reads the receiver's verdicts), and the reader of a stream-mode connection
 * (a thread splitting the stream into frames, each one a message on an AF_UNIX SEQPACKET pair).
 */
#ifndef VSC_LINK_H
#define VSC_LINK_H

#include <stddef.h>
#include <stdint.h>

#include "vsc_local.h"

/* Milliseconds a closing link lets its pump forward what was sent; then its join bound. */
#define VSC_VSOCK_LINGER_MS 2000
#define VSC_VSOCK_JOIN_MS 5000

/* Connections accepted on an endpoint's listener: state behind the descriptor the receiver reads. */
typedef struct vsc_vsock_in vsc_vsock_in;

/* A private account page with the limit VSC_UNBOUNDED_ACCOUNT_LIMIT; NULL if out of memory. */
uint8_t *vsc_private_account(void);
/* CLOCK_MONOTONIC in milliseconds. */
int64_t vsc_now_ms(void);
/* Wait until fd is readable or deadline (vsc_now_ms) passes; 1 readable, 0 not. */
int vsc_readable_by(int fd, int64_t deadline);
/* Send all of buf on a blocking socket; 0, or -1 (errno). */
int vsc_send_all(int fd, const uint8_t *buf, size_t len);
/* vsc_send_all in send() calls of at most piece bytes (0: no bound). */
int vsc_send_pieces(int fd, const uint8_t *buf, size_t len, size_t piece);

void vsc_hello_encode(uint8_t out[VSC_HELLO_SIZE], uint32_t rid, int well_known);
/* 0 with *well_known and *rid from exactly one hello, or -1 (size, magic or rid VMADDR_PORT_ANY). */
int vsc_hello_decode(const uint8_t *buf, size_t n, int *well_known, uint32_t *rid);
void vsc_verdict_encode(uint8_t out[VSC_VERDICT_SIZE], int denied);
/* 1 (denied) or 0 (may send) from exactly one verdict, or -1 if buf is not one. */
int vsc_verdict_decode(const uint8_t *buf, size_t n);
/* The hello at the start of connection fd (stream: 8 bytes; else one message), within timeout_ms. */
int vsc_hello_read(int fd, int stream, int timeout_ms, int *well_known, uint32_t *rid);

/* Wrap the connected socket vs (hello sent) in a link: out->fd is the core's end of the pump's
 * pair, out->acct its private account, out->pump the thread. A stream link writes each frame in
 * send() calls of at most piece bytes (0: whole; VSC_SIBLING_PIECE between sibling guests, see
 * vsc_vsock_piece_between). Owns vs from the call on. A VMCI code. */
int vsc_link_pump_start(int vs, int stream, size_t piece, vsc_conn *out);
/* Let the pump forward what was sent (VSC_VSOCK_LINGER_MS at most), end it, release everything. */
void vsc_link_pump_stop(vsc_conn *c);
/* In a forked child: drop the copies of the parent's link without touching its thread. */
void vsc_link_pump_abandon(vsc_conn *c);
/* What the receiver last said (1: DG_SEND denied), and whether the pump ended (peer gone,
 * a hang-up, or bytes that are not verdicts: counted in *garbled if not NULL). */
int vsc_link_pump_denied(const vsc_conn *c);
int vsc_link_pump_ended(const vsc_conn *c, int *garbled);

/* Read frames from the connected stream conn on a thread, each one forwarded as a message on a
 * new AF_UNIX SEQPACKET pair whose core end is *rx_fd. Owns conn. 0, or -1 (conn closed). A frame
 * announcing more than the maximum payload, or cut by the end of the stream, is forwarded as what
 * was read (the receiver drops it as a bad frame) and ends the stream. */
int vsc_stream_in_start(int conn, int *rx_fd, vsc_vsock_in **in);
/* Write a verdict to the sender behind an accepted connection (never blocks; a sender that
 * leaves its buffer full misses it): on in's stream, or on fd itself when in is NULL. */
void vsc_vsock_tell(int fd, const vsc_vsock_in *in, int denied);
/* The receiver closed *rx_fd: end the reader and release in. NULL: nothing to do. */
void vsc_vsock_in_release(vsc_vsock_in *in);
/* In a forked child: drop the copies without touching the parent's thread. */
void vsc_vsock_in_abandon(vsc_vsock_in *in);

#endif
