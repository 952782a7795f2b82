/* vsockcompat C core: the vsock transport (the wire of vsockcompat/transport/vsock.py). */
#define _GNU_SOURCE
#include "vsc_vsock.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#define FIRST_AUTO_RID (VMCI_RESERVED_RESOURCE_ID_MAX + 1)

_Static_assert(VSC_AF_VSOCK == AF_VSOCK, "AF_VSOCK");
_Static_assert(VSC_VMADDR_CID_ANY == VMADDR_CID_ANY && VSC_VMADDR_PORT_ANY == VMADDR_PORT_ANY, "vsock ids");
_Static_assert(VSC_IOCTL_VM_SOCKETS_GET_LOCAL_CID == IOCTL_VM_SOCKETS_GET_LOCAL_CID, "local CID ioctl");

static pthread_mutex_t g_rid_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t g_next_rid = FIRST_AUTO_RID; /* under g_rid_lock */

/* Opening */

static const char *mode_name(int mode)
{
    return mode == VSC_VSOCK_STREAM ? "STREAM" : mode == VSC_VSOCK_DGRAM ? "DGRAM" : "SEQPACKET";
}

static int sock_type(int mode)
{
    return mode == VSC_VSOCK_STREAM ? SOCK_STREAM : mode == VSC_VSOCK_DGRAM ? SOCK_DGRAM : SOCK_SEQPACKET;
}

static uint32_t read_local_cid(void)
{
    unsigned int cid = VMADDR_CID_ANY;
    int fd = open(VSC_VSOCK_DEVICE, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return VMADDR_CID_ANY;
    if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) != 0)
        cid = VMADDR_CID_ANY;
    close(fd);
    return cid;
}

static int is_guest(uint32_t cid)
{
    return cid > VMADDR_CID_HOST && cid < VMADDR_CID_ANY;
}

uint32_t vsc_vsock_cid_of(uint32_t kcid, uint32_t context)
{
    if (context != VMCI_WELL_KNOWN_CONTEXT_ID)
        return context;
    return is_guest(kcid) ? VMADDR_CID_HOST : VMADDR_CID_LOCAL;
}

size_t vsc_vsock_piece_between(uint32_t kcid, uint32_t peer_cid)
{
    return is_guest(kcid) && is_guest(peer_cid) && kcid != peer_cid ? VSC_SIBLING_PIECE : 0;
}

int vsc_vsock_open(vsc_local *t)
{
    /* auto: the first type whose socket can be created. Since Linux 5.5 a DGRAM socket gets its
     * transport at creation and fails with ENODEV when no transport has datagrams (only VMware's
     * vmci_transport does): src/vsc_vsock_dgram.c. */
    static const int order[] = {VSC_VSOCK_DGRAM, VSC_VSOCK_SEQPACKET, VSC_VSOCK_STREAM};
    char why[512] = ""; /* room for the three reasons */
    size_t used = 0;
    int i;

    t->kcid = read_local_cid();
    if (t->kcid == VMADDR_CID_ANY) {
        fprintf(stderr, "vsockcompat: the vsock transport cannot run here: the local CID is unknown "
                        "(IOCTL_VM_SOCKETS_GET_LOCAL_CID on %s failed or no vsock transport gave this "
                        "kernel a CID)\n", VSC_VSOCK_DEVICE);
        return -1;
    }
    if (t->cid == VMCI_WELL_KNOWN_CONTEXT_ID && vsc_vsock_cid_of(t->kcid, t->cid) != VMADDR_CID_LOCAL) {
        fprintf(stderr, "vsockcompat: context 1 (the discovery service) is served by the host, not by a "
                        "guest (local CID %u)\n", (unsigned)t->kcid);
        return -1;
    }
    t->well_known = t->cid == VMCI_WELL_KNOWN_CONTEXT_ID;
    if (!t->well_known)
        t->cid = t->kcid;
    for (i = 0; i < (int)(sizeof order / sizeof order[0]); i++) {
        int mode = order[i], fd;

        if (t->vsock_mode != VSC_VSOCK_AUTO && t->vsock_mode != mode)
            continue;
        fd = socket(AF_VSOCK, sock_type(mode) | SOCK_CLOEXEC, 0);
        if (fd >= 0) {
            close(fd);
            t->vsock_mode = mode;
            return 0;
        }
        if (used < sizeof why)
            used += (size_t)snprintf(why + used, sizeof why - used, "%sAF_VSOCK SOCK_%s sockets cannot be "
                                     "created here: %s", used ? "; " : "", mode_name(mode), strerror(errno));
    }
    fprintf(stderr, "vsockcompat: the vsock transport cannot run here: %s\n", why);
    return -1;
}

/* Endpoints */

static int vsock_socket(const vsc_local *t, int flags)
{
    return socket(AF_VSOCK, sock_type(t->vsock_mode) | SOCK_CLOEXEC | flags, 0);
}

static int bind_port(int fd, uint32_t port)
{
    struct sockaddr_vm addr;

    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = port;
    return bind(fd, (struct sockaddr *)&addr, sizeof addr);
}

static uint32_t next_rid(uint32_t rid)
{
    return rid + 1 < VMADDR_PORT_ANY ? rid + 1 : FIRST_AUTO_RID;
}

int vsc_vsock_bind_rid(int fd, uint32_t resource, uint32_t *rid)
{
    int tries;

    if (resource != VMCI_INVALID_ID) {
        if (bind_port(fd, resource) == 0) {
            *rid = resource;
            return VMCI_SUCCESS;
        }
        if (errno == EADDRINUSE)
            return VMCI_ERROR_DUPLICATE_ENTRY;
        return errno == EACCES || errno == EPERM ? VMCI_ERROR_NO_ACCESS : VMCI_ERROR_GENERIC;
    }
    pthread_mutex_lock(&g_rid_lock);
    *rid = g_next_rid;
    pthread_mutex_unlock(&g_rid_lock);
    for (tries = 0; tries < VSC_VSOCK_AUTO_RID_TRIES; tries++, *rid = next_rid(*rid)) {
        if (bind_port(fd, *rid) == 0) {
            pthread_mutex_lock(&g_rid_lock);
            g_next_rid = next_rid(*rid);
            pthread_mutex_unlock(&g_rid_lock);
            return VMCI_SUCCESS;
        }
        if (errno != EADDRINUSE)
            return errno == EACCES || errno == EPERM ? VMCI_ERROR_NO_ACCESS : VMCI_ERROR_GENERIC;
    }
    return VMCI_ERROR_NO_RESOURCES;
}

/* The kernel buffer of a SEQPACKET endpoint's connections (constants.py, VSOCK_DG_LINK_BUFFER):
 * the listener's connections inherit it. Never shrunk on a connection: packets already in
 * flight for the larger buffer would be dropped by the kernel. */
static int set_buffer(int fd, unsigned long long size)
{
    return setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &size, sizeof size);
}

int vsc_vsock_bind(const vsc_local *t, uint32_t resource, vsc_bound *out)
{
    uint32_t rid = 0;
    int dgram = t->vsock_mode == VSC_VSOCK_DGRAM, fd, rc;

    /* In dgram mode the kernel's address is the only identity: a datagram from port
     * VMCI_DS_RESOURCE_ID is the discovery service's (vsc_vsock_dgram_source), so only the
     * process speaking for context 1 may hold it where context 1 lives on this kernel (a host or
     * loopback-only kernel; a guest's port 1 is an ordinary endpoint). */
    if (dgram && resource == VMCI_DS_RESOURCE_ID && !t->well_known
        && vsc_vsock_cid_of(t->kcid, VMCI_WELL_KNOWN_CONTEXT_ID) == VMADDR_CID_LOCAL)
        return VMCI_ERROR_NO_ACCESS;
    if ((fd = vsock_socket(t, SOCK_NONBLOCK)) < 0)
        return errno == EMFILE || errno == ENFILE || errno == ENOMEM ? VMCI_ERROR_NO_RESOURCES
                                                                     : VMCI_ERROR_GENERIC;
    if ((rc = vsc_vsock_bind_rid(fd, resource, &rid)) != VMCI_SUCCESS) {
        close(fd);
        return rc;
    }
    if (t->vsock_mode == VSC_VSOCK_SEQPACKET && set_buffer(fd, VSC_VSOCK_DG_LINK_BUFFER) != 0) {
        close(fd);
        return VMCI_ERROR_GENERIC;
    }
    if ((!dgram && listen(fd, SOMAXCONN) != 0) || (out->acct = vsc_private_account()) == NULL) {
        close(fd);
        return VMCI_ERROR_NO_RESOURCES;
    }
    out->handle.context = t->cid;
    out->handle.resource = rid;
    out->listener = fd;
    return VMCI_SUCCESS;
}

void vsc_vsock_unbind(const vsc_bound *b)
{
    vsc_acct_close(b->acct); /* the port itself goes when the endpoint closes the listener */
}

/* Links */

int vsc_vsock_error(int e)
{
    switch (e) {
    case ECONNREFUSED:
    case ECONNRESET:
    case EPROTO:
    case ETIMEDOUT:
    case EPIPE:
    case ENOTCONN:
        return VMCI_ERROR_INVALID_RESOURCE;
    case ESOCKTNOSUPPORT:
        fprintf(stderr, "vsockcompat: this socket type cannot reach the peer (%s): use "
                        "VSOCKCOMPAT_VSOCK_MODE=stream on both sides\n", strerror(e));
        return VMCI_ERROR_DST_UNREACHABLE;
    case EHOSTUNREACH:
    case ENODEV:
    case ENETUNREACH:
    case EADDRNOTAVAIL:
    case EAFNOSUPPORT:
        return VMCI_ERROR_DST_UNREACHABLE;
    case EACCES:
    case EPERM:
        return VMCI_ERROR_NO_ACCESS;
    case EAGAIN:
    case ENOBUFS:
    case ENOMEM:
    case EMFILE:
    case ENFILE:
        return VMCI_ERROR_NO_RESOURCES;
    default:
        return VMCI_ERROR_GENERIC;
    }
}

int vsc_vsock_connect(const vsc_local *t, vsc_handle src, vsc_handle dst, vsc_conn *out)
{
    struct sockaddr_vm addr;
    uint8_t hello[VSC_HELLO_SIZE];
    int fd, rc;

    if (dst.context == VMCI_HYPERVISOR_CONTEXT_ID || dst.context == VMADDR_CID_ANY)
        return VMCI_ERROR_DST_UNREACHABLE;
    if (dst.resource == VMADDR_PORT_ANY)
        return VMCI_ERROR_INVALID_RESOURCE;
    if ((fd = vsock_socket(t, 0)) < 0)
        return vsc_vsock_error(errno);
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = vsc_vsock_cid_of(t->kcid, dst.context);
    addr.svm_port = dst.resource;
    vsc_hello_encode(hello, src.resource, t->well_known);
    /* Blocking: the kernel's connect timeout (2 s by default) bounds it. */
    while ((rc = connect(fd, (struct sockaddr *)&addr, sizeof addr)) != 0 && errno == EINTR)
        ;
    if (rc != 0 || vsc_send_all(fd, hello, sizeof hello) != 0) {
        rc = vsc_vsock_error(errno);
        close(fd);
        return rc;
    }
    return vsc_link_pump_start(fd, t->vsock_mode == VSC_VSOCK_STREAM, vsc_vsock_piece_between(t->kcid, addr.svm_cid),
                               out);
}

/* The context of a peer the kernel places at peer_cid; VMCI_INVALID_ID if its claim is refused. */
static uint32_t peer_context(const vsc_local *t, uint32_t peer_cid, int well_known)
{
    int own = peer_cid == VMADDR_CID_LOCAL || peer_cid == t->kcid;

    if (well_known)
        return own || peer_cid == VMADDR_CID_HOST ? VMCI_WELL_KNOWN_CONTEXT_ID : VMCI_INVALID_ID;
    return own ? t->kcid : peer_cid;
}

int vsc_vsock_accept(const vsc_local *t, int fd, vsc_handle self, vsc_handle *src, int *rx_fd,
                     vsc_vsock_in **in)
{
    struct sockaddr_vm peer;
    socklen_t len = sizeof peer;
    int stream = t->vsock_mode == VSC_VSOCK_STREAM, well_known;
    uint32_t rid, context;

    (void)self;
    *in = NULL;
    memset(&peer, 0, sizeof peer);
    if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0 || peer.svm_family != AF_VSOCK
        || vsc_hello_read(fd, stream, VSC_HELLO_TIMEOUT_MS, &well_known, &rid) != 0
        || (context = peer_context(t, peer.svm_cid, well_known)) == VMCI_INVALID_ID) {
        close(fd);
        return -1;
    }
    src->context = context;
    src->resource = rid;
    if (!stream) {
        *rx_fd = fd;
        return 0;
    }
    return vsc_stream_in_start(fd, rx_fd, in);
}
