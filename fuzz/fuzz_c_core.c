/*
 * libFuzzer target for the C core's decoders of peer bytes: datagram frames
 * received on a socket, queue-pair rings with arbitrary header indexes,
 * discovery-service replies, and mirror-stream frames applied to a region's copy. Built with -fsanitize=fuzzer,address,undefined
 * by fuzz/c_core.py; a crash or a sanitizer report is a finding.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>

#include "vsc_dgram.h"
#include "vsc_ds.h"
#include "vsc_mirror_core.h"
#include "vsc_ring.h"

#define QSIZE 256 /* data bytes per queue: small, so indexes go out of range often */

static int pair[2] = {-1, -1}, stream[2] = {-1, -1};
static vsc_copy region; /* 300 bytes: updates land out of range often */
static uint8_t *acct;
static uint8_t buf[64], spill[VMCI_MAX_DG_PAYLOAD_SIZE + 1];

static void setup(void)
{
    int size = 1 << 20;

    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, pair) != 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, stream) != 0
        || vsc_copy_init(&region, 300) != VMCI_SUCCESS)
        abort();
    setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    acct = mmap(NULL, VSC_ACCT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (acct == MAP_FAILED || vsc_acct_init(acct, VMCI_MAX_DATAGRAM_QUEUE_SIZE) != 0)
        abort();
}

static void fuzz_frame(const uint8_t *data, size_t size)
{
    vsc_dg_header h;
    int err;

    if (size > VMCI_MAX_DG_SIZE + 64 || send(pair[0], data, size, MSG_DONTWAIT) < 0)
        return;
    vsc_dg_recv(pair[1], acct, &h, buf, sizeof buf, spill, sizeof spill, &err);
}

static uint64_t word(const uint8_t *data, size_t size, size_t i)
{
    uint64_t v = 0;

    if (size >= (i + 1) * 8)
        memcpy(&v, data + i * 8, 8);
    return v;
}

static void fuzz_ring(const uint8_t *data, size_t size)
{
    static uint8_t a[VSC_QP_DATA_OFFSET + QSIZE], b[VSC_QP_DATA_OFFSET + QSIZE], out[QSIZE * 2];
    vsc_qp qp = {a, b, QSIZE, QSIZE};
    uint64_t tail, head, at;
    int64_t span;
    uint8_t sum = 0;

    vsc_qp_init_header(a, 2, 1024);
    vsc_qp_init_header(b, 2, 1024);
    /* Peer-written indexes are arbitrary: they must be refused, never followed. */
    memcpy(a + 8, &(uint64_t){word(data, size, 0) % (QSIZE * 2)}, 8);
    memcpy(a + 16, &(uint64_t){word(data, size, 1) % (QSIZE * 2)}, 8);
    memcpy(b + 8, &(uint64_t){word(data, size, 2)}, 8);
    memcpy(b + 16, &(uint64_t){word(data, size, 3) % (QSIZE * 2)}, 8);
    vsc_qp_free_space(&qp);
    vsc_qp_buf_ready(&qp);
    vsc_qp_produce_buf_ready(&qp);
    vsc_qp_consume_free_space(&qp);
    vsc_qp_enqueue(&qp, data, size < sizeof out ? size : sizeof out);
    vsc_qp_peek(&qp, out, word(data, size, 4) % sizeof out);
    vsc_qp_dequeue(&qp, out, word(data, size, 5) % sizeof out);
    span = vsc_qp_peek_span(&qp, word(data, size, 6) % (QSIZE * 2), &at);
    /* A span is read in place: ASan sees any byte outside the consume queue. */
    for (int64_t i = 0; i < span; i++)
        sum += qp.consume_q[VSC_QP_DATA_OFFSET + at + (uint64_t)i];
    out[0] = sum;
    vsc_qp_consume(&qp, word(data, size, 7) % (QSIZE * 2));
    vsc_qp_produce_indexes(&qp, &tail, &head);
    vsc_qp_consume_indexes(&qp, &tail, &head);
}

static void fuzz_ds_reply(const uint8_t *data, size_t size)
{
    vsc_handle out = {0, 0};
    uint32_t msgid = 0;

    if (size >= 4)
        memcpy(&msgid, data, 4); /* often the reply's own msgid, so the body is parsed */
    vsc_ds_parse_reply(data, size, msgid, &out);
}

/* What an attacher does with a creator's bytes (src/vsc_mirror.c): cut frames, apply valid
 * updates to its copy, scan the copy for changes to send back. */
static void fuzz_mirror(const uint8_t *data, size_t size)
{
    vsc_reader r = {0};
    vsc_out o = {0};
    vsc_frame f;
    int rc;

    if (size > 1 << 16 || send(stream[0], data, size, MSG_DONTWAIT) < 0)
        return;
    do {
        rc = vsc_reader_fill(&r, stream[1], MSG_DONTWAIT);
        while (rc == 1 && (rc = vsc_reader_next(&r, &f)) == 1)
            if (f.type == VSC_MIRROR_UPDATE && vsc_valid_update(&f, region.size))
                vsc_copy_apply(&region, f.arg, f.payload, f.len);
    } while (rc == 0);
    region.map[size % region.size] ^= 1;
    vsc_copy_scan(&region, &o, NULL, NULL);
    vsc_out_free(&o);
    vsc_reader_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (pair[0] < 0)
        setup();
    fuzz_frame(data, size);
    fuzz_ring(data, size);
    fuzz_ds_reply(data, size);
    fuzz_mirror(data, size);
    return 0;
}
