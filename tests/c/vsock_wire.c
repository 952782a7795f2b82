/*
 * vsock_wire: src/vsc_link.c, the socket-agnostic half of the vsock transport (hellos, verdicts,
 * link pumps, stream readers), over AF_UNIX pairs, so the host's tests exercise it, under the
 * sanitizers and valgrind too, without any AF_VSOCK socket (tests/test_clib_vsock_guard.py). Prints "<check>=ok" or
 * "<check>=FAIL <line>" per check, then "all ok" (exit 0) or exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "vsc_link.h"

static int failures;
static const char *current;

#define CHECK(cond)                                                         \
    do {                                                                    \
        if (!(cond)) {                                                      \
            printf("%s=FAIL line %d: %s\n", current, __LINE__, #cond);      \
            failures++;                                                     \
            return;                                                         \
        }                                                                   \
    } while (0)

static void pair(int type, int sv[2])
{
    if (socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0) {
        perror("socketpair");
        exit(2);
    }
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Poll fn(c) until it returns want, for at most 5 s; 1 if it did. */
static int eventually(int (*fn)(const vsc_conn *), const vsc_conn *c, int want)
{
    int i;

    for (i = 0; i < 500; i++) {
        if (fn(c) == want)
            return 1;
        sleep_ms(10);
    }
    return 0;
}

static int ended(const vsc_conn *c)
{
    return vsc_link_pump_ended(c, NULL);
}

static int readable_within(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, ms) == 1;
}

static void frame(uint8_t *out, uint32_t size, uint8_t fill)
{
    vsc_dg_header h = {{1, 2000}, {1, 1500}, size};

    vsc_dg_encode_header(out, &h);
    memset(out + VMCI_DG_HEADERSIZE, fill, size);
}

static void hellos(void)
{
    uint8_t b[VSC_HELLO_SIZE];
    uint32_t rid = 0;
    int wk = -1;

    current = "hello";
    vsc_hello_encode(b, 1234, 0);
    CHECK(memcmp(b, "VSC1", 4) == 0 && vsc_hello_decode(b, 8, &wk, &rid) == 0 && wk == 0 && rid == 1234);
    vsc_hello_encode(b, 1, 1);
    CHECK(memcmp(b, "VSW1", 4) == 0 && vsc_hello_decode(b, 8, &wk, &rid) == 0 && wk == 1 && rid == 1);
    CHECK(vsc_hello_decode(b, 7, &wk, &rid) == -1 && vsc_hello_decode(NULL, 8, &wk, &rid) == -1);
    vsc_hello_encode(b, 0xFFFFFFFFu, 0);
    CHECK(vsc_hello_decode(b, 8, &wk, &rid) == -1);
    vsc_hello_encode(b, 5, 0);
    b[0] ^= 1;
    CHECK(vsc_hello_decode(b, 8, &wk, &rid) == -1);
    printf("%s=ok\n", current);
}

static void verdicts(void)
{
    uint8_t b[VSC_VERDICT_SIZE];

    current = "verdict";
    vsc_verdict_encode(b, 1);
    CHECK(memcmp(b, "VSV1", 4) == 0 && vsc_verdict_decode(b, 8) == 1);
    vsc_verdict_encode(b, 0);
    CHECK(vsc_verdict_decode(b, 8) == 0 && vsc_verdict_decode(b, 9) == -1 && vsc_verdict_decode(b, 0) == -1);
    b[4] = 2;
    CHECK(vsc_verdict_decode(b, 8) == -1);
    printf("%s=ok\n", current);
}

static void hello_reads(void)
{
    uint8_t b[VSC_HELLO_SIZE + 1];
    uint32_t rid = 0;
    int sv[2], wk;

    current = "hello_read_seqpacket";
    pair(SOCK_SEQPACKET, sv);
    vsc_hello_encode(b, 77, 0);
    CHECK(send(sv[0], b, 8, 0) == 8 && vsc_hello_read(sv[1], 0, 1000, &wk, &rid) == 0 && rid == 77);
    b[8] = 0;
    CHECK(send(sv[0], b, 9, 0) == 9 && vsc_hello_read(sv[1], 0, 1000, &wk, &rid) == -1); /* too long */
    CHECK(vsc_hello_read(sv[1], 0, 50, &wk, &rid) == -1); /* nothing in time */
    close(sv[0]);
    close(sv[1]);
    printf("%s=ok\n", current);

    current = "hello_read_stream";
    pair(SOCK_STREAM, sv);
    vsc_hello_encode(b, 88, 1);
    CHECK(send(sv[0], b, 3, 0) == 3 && send(sv[0], b + 3, 5, 0) == 5);
    CHECK(vsc_hello_read(sv[1], 1, 1000, &wk, &rid) == 0 && rid == 88 && wk == 1);
    CHECK(send(sv[0], b, 3, 0) == 3 && close(sv[0]) == 0 && vsc_hello_read(sv[1], 1, 1000, &wk, &rid) == -1);
    close(sv[1]);
    printf("%s=ok\n", current);
}

static int link_send(vsc_conn *c, uint32_t size, uint8_t fill)
{
    static uint8_t payload[VMCI_MAX_DG_PAYLOAD_SIZE];
    vsc_handle dst = {1, 2000}, src = {1, 1500};
    vsc_link link;
    int e;

    memset(payload, fill, size);
    vsc_link_init(&link, c->fd, c->acct, dst, src);
    return vsc_link_send(&link, payload, size, &e);
}

static void pump_seqpacket(void)
{
    static uint8_t want[VMCI_MAX_DG_SIZE], got[VMCI_MAX_DG_SIZE + 1];
    uint8_t v[VSC_VERDICT_SIZE];
    int sv[2], garbled = 0;
    vsc_conn c;

    current = "pump_seqpacket";
    pair(SOCK_SEQPACKET, sv);
    CHECK(vsc_link_pump_start(sv[0], 0, &c) == VMCI_SUCCESS && c.fd >= 0 && c.pump != NULL);
    CHECK(link_send(&c, VMCI_MAX_DG_PAYLOAD_SIZE, 0xAB) == VMCI_MAX_DG_SIZE);
    frame(want, VMCI_MAX_DG_PAYLOAD_SIZE, 0xAB);
    CHECK(recv(sv[1], got, sizeof got, 0) == VMCI_MAX_DG_SIZE && memcmp(got, want, VMCI_MAX_DG_SIZE) == 0);
    CHECK(link_send(&c, 0, 0) == VMCI_DG_HEADERSIZE && recv(sv[1], got, sizeof got, 0) == VMCI_DG_HEADERSIZE);
    vsc_verdict_encode(v, 1);
    CHECK(send(sv[1], v, sizeof v, 0) == 8 && eventually(vsc_link_pump_denied, &c, 1));
    vsc_verdict_encode(v, 0);
    CHECK(send(sv[1], v, sizeof v, 0) == 8 && eventually(vsc_link_pump_denied, &c, 0));
    CHECK(send(sv[1], "garbage", 7, 0) == 7 && eventually(ended, &c, 1));
    CHECK(vsc_link_pump_ended(&c, &garbled) == 1 && garbled == 1);
    CHECK(readable_within(c.fd, 1000)); /* the endpoint's stale-link check sees a hang-up */
    CHECK(link_send(&c, 3, 1) == VSC_PEER_GONE);
    vsc_link_pump_stop(&c);
    CHECK(c.pump == NULL && c.fd == -1 && c.acct == NULL);
    close(sv[1]);
    printf("%s=ok\n", current);
}

static void pump_stream(void)
{
    uint8_t want[3 * (VMCI_DG_HEADERSIZE + 100)], got[sizeof want], v[VSC_VERDICT_SIZE];
    size_t n = 0;
    int sv[2], i, garbled = 1;
    vsc_conn c;

    current = "pump_stream";
    pair(SOCK_STREAM, sv);
    CHECK(vsc_link_pump_start(sv[0], 1, &c) == VMCI_SUCCESS);
    for (i = 0; i < 3; i++) {
        CHECK(link_send(&c, 100, (uint8_t)i) == VMCI_DG_HEADERSIZE + 100);
        frame(want + i * (VMCI_DG_HEADERSIZE + 100), 100, (uint8_t)i);
    }
    while (n < sizeof got) {
        ssize_t r = recv(sv[1], got + n, sizeof got - n, 0);
        CHECK(r > 0);
        n += (size_t)r;
    }
    CHECK(memcmp(got, want, sizeof want) == 0); /* back to back, no other framing */
    vsc_verdict_encode(v, 1);
    CHECK(send(sv[1], v, 5, 0) == 5);
    sleep_ms(50);
    CHECK(vsc_link_pump_denied(&c) == 0); /* a cut verdict waits for its rest */
    CHECK(send(sv[1], v + 5, 3, 0) == 3 && eventually(vsc_link_pump_denied, &c, 1));
    CHECK(shutdown(sv[1], SHUT_WR) == 0 && eventually(ended, &c, 1));
    CHECK(vsc_link_pump_ended(&c, &garbled) == 1 && garbled == 0);
    vsc_link_pump_stop(&c);
    close(sv[1]);
    printf("%s=ok\n", current);
}

static void pump_linger(void)
{
    uint8_t got[VMCI_DG_HEADERSIZE + 10];
    int sv[2];
    vsc_conn c;

    current = "pump_linger";
    pair(SOCK_SEQPACKET, sv);
    CHECK(vsc_link_pump_start(sv[0], 0, &c) == VMCI_SUCCESS);
    CHECK(link_send(&c, 10, 9) == VMCI_DG_HEADERSIZE + 10);
    vsc_link_pump_stop(&c); /* forwards what was sent before it ends */
    CHECK(recv(sv[1], got, sizeof got, MSG_DONTWAIT) == (ssize_t)sizeof got && got[VMCI_DG_HEADERSIZE] == 9);
    CHECK(recv(sv[1], got, sizeof got, 0) == 0);
    close(sv[1]);
    printf("%s=ok\n", current);
}

static void stream_reader(void)
{
    static uint8_t two[2 * (VMCI_DG_HEADERSIZE + 5000)], got[VMCI_MAX_DG_SIZE + 1];
    uint8_t v[VSC_VERDICT_SIZE];
    size_t off;
    int sv[2], rx;
    vsc_vsock_in *in;

    current = "stream_reader";
    pair(SOCK_STREAM, sv);
    CHECK(vsc_stream_in_start(sv[1], &rx, &in) == 0);
    frame(two, 5000, 1);
    frame(two + VMCI_DG_HEADERSIZE + 5000, 5000, 2);
    for (off = 0; off < sizeof two; off += 777) /* in odd pieces */
        CHECK(send(sv[0], two + off, sizeof two - off < 777 ? sizeof two - off : 777, 0) > 0);
    CHECK(recv(rx, got, sizeof got, 0) == VMCI_DG_HEADERSIZE + 5000 && memcmp(got, two, VMCI_DG_HEADERSIZE + 5000) == 0);
    CHECK(recv(rx, got, sizeof got, 0) == VMCI_DG_HEADERSIZE + 5000 && got[VMCI_DG_HEADERSIZE] == 2);
    vsc_vsock_tell(rx, in, 1);
    CHECK(recv(sv[0], v, sizeof v, 0) == 8 && vsc_verdict_decode(v, 8) == 1);
    frame(two, 100, 3);
    CHECK(send(sv[0], two, VMCI_DG_HEADERSIZE + 10, 0) == VMCI_DG_HEADERSIZE + 10 && close(sv[0]) == 0);
    CHECK(recv(rx, got, sizeof got, 0) == VMCI_DG_HEADERSIZE + 10); /* cut by the end: as read */
    CHECK(recv(rx, got, sizeof got, 0) == 0);
    close(rx);
    vsc_vsock_in_release(in);
    printf("%s=ok\n", current);

    current = "stream_reader_oversized";
    pair(SOCK_STREAM, sv);
    CHECK(vsc_stream_in_start(sv[1], &rx, &in) == 0);
    {
        vsc_dg_header h = {{1, 2000}, {1, 1500}, VMCI_MAX_DG_PAYLOAD_SIZE + 1};
        vsc_dg_encode_header(two, &h);
    }
    CHECK(send(sv[0], two, VMCI_DG_HEADERSIZE, 0) == VMCI_DG_HEADERSIZE);
    CHECK(recv(rx, got, sizeof got, 0) == VMCI_DG_HEADERSIZE && recv(rx, got, sizeof got, 0) == 0);
    close(rx);
    vsc_vsock_in_release(in);
    close(sv[0]);
    printf("%s=ok\n", current);

    current = "stream_reader_release";
    pair(SOCK_STREAM, sv);
    CHECK(vsc_stream_in_start(sv[1], &rx, &in) == 0);
    close(rx); /* the receiver drops it while the reader waits for bytes */
    vsc_vsock_in_release(in);
    close(sv[0]);
    printf("%s=ok\n", current);

    current = "tell_seqpacket";
    pair(SOCK_SEQPACKET, sv);
    vsc_vsock_tell(sv[1], NULL, 0);
    CHECK(recv(sv[0], v, sizeof v, 0) == 8 && vsc_verdict_decode(v, 8) == 0);
    close(sv[0]);
    close(sv[1]);
    printf("%s=ok\n", current);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    hellos();
    verdicts();
    hello_reads();
    pump_seqpacket();
    pump_stream();
    pump_linger();
    stream_reader();
    if (failures)
        return 1;
    printf("all ok\n");
    return 0;
}
