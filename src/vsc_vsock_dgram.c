/*
 * vsockcompat C core: the vsock transport's dgram mode (VSC_VSOCK_DGRAM, src/vsc_vsock.h), for
 * kernels whose vsock transport carries SOCK_DGRAM (VMware's vmci_transport; its limit per
 * datagram is VMCI_MAX_DG_PAYLOAD_SIZE, the SDK's own).
 *
 * Choosing it: since Linux 5.5 (multi-transport vsock) net/vmw_vsock/af_vsock.c's vsock_create
 * assigns a SOCK_DGRAM socket its transport at once (vsock_assign_transport(vsk, NULL)), and
 * vsock_assign_transport fails with -ENODEV when transport_dgram is NULL, as it is with only
 * virtio, vsock_loopback or hyperv loaded: so creating the socket is the whole probe, nothing is
 * sent. Older kernels (one transport, chosen at module load) create a DGRAM socket whatever the
 * transport; there "auto" may pick dgram where datagrams cannot flow, and
 * VSOCKCOMPAT_VSOCK_MODE=seqpacket (or stream) must be set: the same kind of limit as the
 * SEQPACKET probe's (since 5.14 a SEQPACKET socket is created whatever the transport, which
 * refuses only at connect; vsockcompat/transport/vsock.py).
 */
#define _GNU_SOURCE
#include "vsc_vsock.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#include <linux/vm_sockets.h>

vsc_handle vsc_vsock_dgram_source(const vsc_local *t, uint32_t cid, uint32_t port)
{
    int own = cid == VMADDR_CID_LOCAL || cid == t->kcid;
    uint32_t well_known = vsc_vsock_cid_of(t->kcid, VMCI_WELL_KNOWN_CONTEXT_ID);
    vsc_handle h = {own ? t->kcid : cid, port};

    /* Port 1 of the CID that reaches context 1 is the discovery service's: the host's, seen from
     * a guest; our own kernel's only where context 1 lives here (a host or loopback-only kernel,
     * where only the process speaking for context 1 may bind it: vsc_vsock_bind). A guest's own
     * port 1 is an ordinary endpoint of the guest, as in vsockcompat/transport/vsock_dgram.py. */
    if (port == VMCI_DS_RESOURCE_ID && (well_known == VMADDR_CID_LOCAL ? own : cid == well_known)) {
        h.context = VMCI_WELL_KNOWN_CONTEXT_ID;
        h.resource = VMCI_DS_RESOURCE_ID;
    }
    return h;
}

/* vmci_transport turns VMCI's codes into errnos (vmci-sdk.md 10.2); undo it where it can:
 * EHOSTUNREACH is INVALID_RESOURCE (nothing at that resource; for a well-known destination, the
 * SDK's DST_UNREACHABLE: (1, 1), or any handle of context 1 on a kernel whose own CID is not 1),
 * EINVAL (the arguments were checked first) the codes folded into it such as an unknown context
 * (DST_UNREACHABLE), ENOMEM is NO_MEM. The same mapping as vsockcompat/transport/vsock_dgram.py's
 * sendto_error. */
static int sendto_error(const vsc_local *t, int e, vsc_handle dst)
{
    int well_known = dst.context == VMCI_WELL_KNOWN_CONTEXT_ID
                     && (dst.resource == VMCI_DS_RESOURCE_ID || t->kcid != VMADDR_CID_LOCAL);

    switch (e) {
    case EMSGSIZE:
        return VMCI_ERROR_INVALID_ARGS;
    case EHOSTUNREACH:
        return well_known ? VMCI_ERROR_DST_UNREACHABLE : VMCI_ERROR_INVALID_RESOURCE;
    case EINVAL:
        return VMCI_ERROR_DST_UNREACHABLE;
    case ENOMEM:
        return VMCI_ERROR_NO_MEM;
    default:
        return vsc_vsock_error(e);
    }
}

int vsc_vsock_dgram_send(const vsc_local *t, int fd, vsc_handle dst, const void *buf, uint32_t len)
{
    struct sockaddr_vm addr;
    ssize_t n;

    if (dst.context == VMCI_HYPERVISOR_CONTEXT_ID || dst.context == VMADDR_CID_ANY)
        return VMCI_ERROR_DST_UNREACHABLE;
    if (dst.resource == VMADDR_PORT_ANY)
        return VMCI_ERROR_INVALID_RESOURCE;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = vsc_vsock_cid_of(t->kcid, dst.context);
    addr.svm_port = dst.resource;
    do {
        n = sendto(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&addr, sizeof addr);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return sendto_error(t, errno, dst);
    if ((size_t)n != len)
        return VMCI_ERROR_GENERIC; /* a datagram is sent whole or not at all */
    return (int)len + VMCI_DG_HEADERSIZE;
}

ssize_t vsc_vsock_dgram_recv(const vsc_local *t, int fd, void *buf, size_t len, void *spill, size_t spill_len,
                             vsc_handle *src)
{
    struct sockaddr_vm from;
    struct iovec iov[2] = {{.iov_base = buf, .iov_len = len}, {.iov_base = spill, .iov_len = spill_len}};
    struct msghdr msg = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = iov, .msg_iovlen = 2};
    ssize_t n;

    memset(&from, 0, sizeof from);
    do {
        n = recvmsg(fd, &msg, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return VSC_AGAIN;
        return errno == ENOMEM || errno == ENOBUFS ? VMCI_ERROR_NO_RESOURCES : VMCI_ERROR_GENERIC;
    }
    if ((msg.msg_flags & MSG_TRUNC) || msg.msg_namelen < sizeof from || from.svm_family != AF_VSOCK
        || (size_t)n > VMCI_MAX_DG_PAYLOAD_SIZE)
        return VSC_BAD_FRAME;
    *src = vsc_vsock_dgram_source(t, from.svm_cid, from.svm_port);
    return n;
}
