/* vsockcompat C core: datagram endpoints (the semantics of vsockcompat/datagram.py). */
#define _GNU_SOURCE
#include "vsc_endpoint.h"

#include "vsc_acl.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SPILL_SIZE (VMCI_MAX_DG_PAYLOAD_SIZE + 1)

/* The transport operations that differ between local, vsock and hybrid. */

int vsc_transport_open(vsc_local *t)
{
    if (vsc_local_open(t) != 0)
        return -1;
    if (t->transport == VSC_TRANSPORT_HYBRID)
        return vsc_hybrid_open(t);
    return t->transport == VSC_TRANSPORT_VSOCK ? vsc_vsock_open(t) : 0;
}

static void transport_unbind(const vsc_local *t, const vsc_bound *b)
{
    if (vsc_links_streamed(t))
        vsc_acl_memory_unregister(b->handle);
    if (t->transport == VSC_TRANSPORT_HYBRID)
        vsc_hybrid_unbind(t, b);
    else if (t->transport == VSC_TRANSPORT_VSOCK)
        vsc_vsock_unbind(b);
    else
        vsc_local_unbind(t, b);
}

/* Close an endpoint's listener (on hybrid, an epoll set and its sockets). */
static void close_listener(vsc_bound *b)
{
    if (b->set != NULL)
        vsc_hybrid_close_listener(b);
    else
        close(b->listener);
}

/* Over vsock and hybrid an endpoint's privileges live in this process while it lives (vsc_acl.h). */
static int transport_bind(const vsc_local *t, uint32_t resource, vsc_bound *out)
{
    int rc;

    if (!vsc_links_streamed(t))
        return vsc_local_bind(t, resource, out);
    rc = t->transport == VSC_TRANSPORT_HYBRID ? vsc_hybrid_bind(t, resource, out) : vsc_vsock_bind(t, resource, out);
    if (rc == VMCI_SUCCESS && vsc_acl_memory_register(out->handle, VSC_KIND_DATAGRAM, out->acct) != 0) {
        if (t->transport == VSC_TRANSPORT_HYBRID)
            vsc_hybrid_unbind(t, out);
        close_listener(out);
        vsc_local_unmap(out->acct);
        rc = VMCI_ERROR_NO_MEM;
    }
    return rc;
}

static int transport_connect(const vsc_local *t, vsc_handle src, vsc_handle dst, vsc_conn *out)
{
    memset(out, 0, sizeof *out);
    if (t->transport == VSC_TRANSPORT_HYBRID)
        return vsc_hybrid_connect(t, src, dst, out);
    return vsc_links_streamed(t) ? vsc_vsock_connect(t, src, dst, out) : vsc_local_connect(t, src, dst, out);
}

/* Close a link's connection; in a forked child (abandon), only our copies of it. */
static void transport_disconnect(vsc_conn *c, int abandon)
{
    if (c->pump != NULL) {
        if (abandon)
            vsc_link_pump_abandon(c);
        else
            vsc_link_pump_stop(c);
    } else if (abandon) {
        close(c->fd);
        vsc_local_unmap(c->acct);
    } else {
        vsc_local_disconnect(c);
    }
}

int vsc_endpoint_create(const vsc_local *t, uint32_t resource, vsc_endpoint **out)
{
    vsc_endpoint *ep = calloc(1, sizeof *ep);
    int pipefd[2], rc;

    if (ep == NULL)
        return VMCI_ERROR_NO_MEM;
    ep->spill = malloc(SPILL_SIZE);
    if (ep->spill == NULL) {
        free(ep);
        return VMCI_ERROR_NO_MEM;
    }
    if (pipe2(pipefd, O_NONBLOCK | O_CLOEXEC) != 0) {
        free(ep->spill);
        free(ep);
        return VMCI_ERROR_NO_RESOURCES;
    }
    ep->wake_r = pipefd[0];
    ep->wake_w = pipefd[1];
    rc = transport_bind(t, resource, &ep->bound);
    if (rc != VMCI_SUCCESS)
        goto fail;
    ep->handle = ep->bound.handle;
    ep->transport = t;
    ep->dgram = t->transport == VSC_TRANSPORT_VSOCK && t->vsock_mode == VSC_VSOCK_DGRAM;
    ep->acl_epoch = vsc_acl_epoch(ep->bound.acct);
    if (vsc_rx_init(&ep->rx, ep->bound.listener, ep->wake_r, ep->bound.acct, ep->handle) != 0) {
        transport_unbind(t, &ep->bound);
        close_listener(&ep->bound);
        vsc_local_unmap(ep->bound.acct);
        rc = VMCI_ERROR_NO_RESOURCES;
        goto fail;
    }
    vsc_rx_set_polled(&ep->rx, 0); /* only vsc_endpoint_recv waits on it */
    pthread_mutex_init(&ep->recv_lock, NULL);
    pthread_mutex_init(&ep->link_lock, NULL);
    ep->refs = 1;
    *out = ep;
    return VMCI_SUCCESS;
fail:
    close(ep->wake_r);
    close(ep->wake_w);
    free(ep->spill);
    free(ep);
    return rc;
}

void vsc_endpoint_close(vsc_endpoint *ep)
{
    ssize_t n;

    if (__atomic_exchange_n(&ep->closing, 1, __ATOMIC_ACQ_REL))
        return;
    transport_unbind(ep->transport, &ep->bound);
    do {
        n = write(ep->wake_w, "", 1);
    } while (n < 0 && errno == EINTR);
}

/* The vsock state behind accepted connection fd, taken out of the table (NULL: none). */
static vsc_vsock_in *take_in(vsc_endpoint *ep, int fd)
{
    vsc_vsock_in *in = NULL;

    if (fd >= 0 && fd < ep->ins_cap) {
        in = ep->ins[fd];
        ep->ins[fd] = NULL;
    }
    return in;
}

/* Remember in (not NULL) behind fd; 0, or -1 out of memory. */
static int put_in(vsc_endpoint *ep, int fd, vsc_vsock_in *in)
{
    if (in == NULL)
        return 0;
    if (fd >= ep->ins_cap) {
        int cap = fd + 64;
        vsc_vsock_in **grown = realloc(ep->ins, (size_t)cap * sizeof *grown);

        if (grown == NULL)
            return -1;
        memset(grown + ep->ins_cap, 0, (size_t)(cap - ep->ins_cap) * sizeof *grown);
        ep->ins = grown;
        ep->ins_cap = cap;
    }
    ep->ins[fd] = in;
    return 0;
}

static void close_fds(vsc_endpoint *ep, int unlink_links)
{
    int i;

    for (i = 0; i < ep->rx.nconns; i++) {
        if (ep->rx.conns[i].fd >= 0) {
            vsc_vsock_in *in = take_in(ep, i);

            close(ep->rx.conns[i].fd);
            if (unlink_links)
                vsc_vsock_in_release(in);
            else
                vsc_vsock_in_abandon(in);
        }
    }
    vsc_rx_destroy(&ep->rx);
    for (i = 0; i < ep->nlinks; i++)
        transport_disconnect(&ep->links[i].conn, !unlink_links);
    free(ep->links);
    free(ep->ins);
    close_listener(&ep->bound);
    vsc_local_unmap(ep->bound.acct);
    close(ep->wake_r);
    close(ep->wake_w);
    free(ep->spill);
    free(ep->held);
    free(ep->denied);
}

void vsc_endpoint_free(vsc_endpoint *ep)
{
    vsc_endpoint_close(ep);
    close_fds(ep, 1);
    pthread_mutex_destroy(&ep->recv_lock);
    pthread_mutex_destroy(&ep->link_lock);
    free(ep);
}

void vsc_endpoint_abandon(vsc_endpoint *ep)
{
    /* The parent still owns the files, the account pages and (maybe) these mutexes. */
    close_fds(ep, 0);
    free(ep);
}

/* Sending */

static void drop_link(vsc_endpoint *ep, int i)
{
    vsc_link_close(&ep->links[i].link);
    transport_disconnect(&ep->links[i].conn, 0);
    memmove(&ep->links[i], &ep->links[i + 1], (size_t)(ep->nlinks - i - 1) * sizeof ep->links[0]);
    ep->nlinks--;
}

/* Links whose receiver hung up, then the oldest ones past VSC_MAX_LINKS. Under link_lock. */
static void prune_links(vsc_endpoint *ep)
{
    struct pollfd fds[VSC_MAX_LINKS];
    int i, n = ep->nlinks;

    for (i = 0; i < n; i++) {
        fds[i].fd = ep->links[i].conn.fd;
        fds[i].events = POLLIN;
        fds[i].revents = 0;
    }
    /* A receiver never writes on a link (over vsock, its pump takes the verdicts): any event
     * is a hang-up or an error. */
    if (n > 0 && poll(fds, (nfds_t)n, 0) > 0)
        for (i = n - 1; i >= 0; i--)
            if (fds[i].revents)
                drop_link(ep, i);
    while (ep->nlinks >= VSC_MAX_LINKS)
        drop_link(ep, 0);
}

static int find_link(vsc_endpoint *ep, vsc_handle dst)
{
    int i;

    for (i = ep->nlinks - 1; i >= 0; i--)
        if (ep->links[i].dst.context == dst.context && ep->links[i].dst.resource == dst.resource)
            return i;
    return -1;
}

/* A link to dst, or a VMCI code: VMCI_ERROR_NO_ACCESS if dst denies us DG_SEND. */
static int open_link(vsc_endpoint *ep, vsc_handle dst)
{
    vsc_ep_link *l;
    int rc;

    if (!vsc_acl_may_send(ep->transport, ep->handle, dst))
        return VMCI_ERROR_NO_ACCESS; /* before connecting: a denied sender costs the receiver nothing */
    prune_links(ep);
    if (ep->nlinks == ep->caplinks) {
        int cap = ep->caplinks ? ep->caplinks * 2 : 8;
        vsc_ep_link *grown = realloc(ep->links, (size_t)cap * sizeof *grown);
        if (grown == NULL)
            return VMCI_ERROR_NO_MEM;
        ep->links = grown;
        ep->caplinks = cap;
    }
    l = &ep->links[ep->nlinks];
    rc = transport_connect(ep->transport, ep->handle, dst, &l->conn);
    if (rc != VMCI_SUCCESS)
        return rc;
    l->dst = dst;
    l->denied = 0;
    vsc_link_init(&l->link, l->conn.fd, l->conn.acct, dst, ep->handle);
    /* The epoch first, then the privileges: a change after this read shows in the epoch.
     * (Over vsock the receiver's privileges come as verdicts: vsc_link_pump_denied.) */
    l->acl_epoch = vsc_acl_epoch(l->conn.acct);
    if (!vsc_links_streamed(ep->transport) && !vsc_acl_may_send(ep->transport, ep->handle, dst)) {
        transport_disconnect(&l->conn, 0);
        return VMCI_ERROR_NO_ACCESS;
    }
    return ep->nlinks++;
}

/* Whether link i must be opened again before a send: over vsock its pump ended (the receiver
 * hung up, or wrote what is not a verdict); on local, the receiver's privileges changed. */
static int link_stale(vsc_endpoint *ep, int i)
{
    vsc_conn *c = &ep->links[i].conn;

    if (c->pump != NULL)
        return vsc_link_pump_ended(c, NULL);
    return vsc_acl_epoch(c->acct) != ep->links[i].acl_epoch;
}

/* Vsock dgram mode: one datagram from the endpoint's own socket; no link, no verdict. */
static int send_dgram(vsc_endpoint *ep, vsc_handle dst, const void *buf, uint32_t len)
{
    if (!vsc_acl_may_send(ep->transport, ep->handle, dst))
        return VMCI_ERROR_NO_ACCESS; /* a receiver in this process that denies us */
    return vsc_vsock_dgram_send(ep->transport, ep->bound.listener, dst, buf, len);
}

int vsc_endpoint_send(vsc_endpoint *ep, vsc_handle dst, const void *buf, uint32_t len)
{
    int attempt, i, rc = VMCI_ERROR_INVALID_RESOURCE, sys_errno;

    if (len > VMCI_MAX_DG_PAYLOAD_SIZE)
        return VMCI_ERROR_INVALID_ARGS;
    if (__atomic_load_n(&ep->closing, __ATOMIC_ACQUIRE))
        return VMCI_ERROR_INVALID_ARGS;
    if (ep->dgram)
        return send_dgram(ep, dst, buf, len);
    pthread_mutex_lock(&ep->link_lock);
    /* A cached link whose receiver went away gets one fresh attempt. */
    for (attempt = 0; attempt < 2; attempt++) {
        i = find_link(ep, dst);
        if (i >= 0 && link_stale(ep, i)) {
            drop_link(ep, i); /* decide again on a fresh link */
            i = -1;
        }
        if (i < 0 && (i = open_link(ep, dst)) < 0) {
            rc = i;
            break;
        }
        if (vsc_link_pump_denied(&ep->links[i].conn)) {
            rc = VMCI_ERROR_NO_ACCESS; /* the receiver's last verdict: no syscall */
            break;
        }
        rc = vsc_link_send(&ep->links[i].link, buf, len, &sys_errno);
        if (rc != VSC_PEER_GONE)
            break;
        drop_link(ep, i);
        rc = VMCI_ERROR_INVALID_RESOURCE;
    }
    pthread_mutex_unlock(&ep->link_lock);
    return rc;
}

/* Receiving */

/* Mark the connection fd denied (1) or not (0); 0, or -1 out of memory. */
static int set_denied(vsc_endpoint *ep, int fd, int denied)
{
    if (fd >= ep->denied_cap) {
        int cap = fd + 64;
        uint8_t *grown;

        if (!denied)
            return 0;
        grown = realloc(ep->denied, (size_t)cap);
        if (grown == NULL)
            return -1;
        memset(grown + ep->denied_cap, 0, (size_t)(cap - ep->denied_cap));
        ep->denied = grown;
        ep->denied_cap = cap;
    }
    ep->ndenied += (denied != 0) - (ep->denied[fd] != 0);
    ep->denied[fd] = (uint8_t)(denied != 0);
    return 0;
}

static void drop_conn(vsc_endpoint *ep, int fd)
{
    vsc_vsock_in *in = take_in(ep, fd);

    set_denied(ep, fd, 0);
    vsc_rx_remove(&ep->rx, fd);
    close(fd);
    vsc_vsock_in_release(in);
}

/* Decide whether the sender on fd is denied; over vsock, tell it when that changed. */
static void decide(vsc_endpoint *ep, int fd, int denied)
{
    int was = fd < ep->denied_cap && ep->denied[fd];

    if (set_denied(ep, fd, denied) != 0) {
        drop_conn(ep, fd); /* cannot remember the denial: refuse the connection */
        return;
    }
    if (vsc_links_streamed(ep->transport) && was != (denied != 0))
        vsc_vsock_tell(fd, fd < ep->ins_cap ? ep->ins[fd] : NULL, denied);
}

/* Our privileges changed: decide again for every connection (the privileges are read once). */
static void recheck_access(vsc_endpoint *ep, uint64_t epoch)
{
    vsc_acl acl;
    int have, fd;

    ep->acl_epoch = epoch; /* before reading: a later change shows again */
    have = vsc_acl_load(ep->transport, ep->handle, &acl);
    for (fd = 0; fd < ep->rx.nconns; fd++) {
        int denied;

        if (ep->rx.conns[fd].fd < 0)
            continue;
        denied = !vsc_acl_sender_allowed(ep->transport, have ? &acl : NULL, ep->rx.conns[fd].src, ep->handle);
        decide(ep, fd, denied);
    }
    if (have)
        vsc_acl_free(&acl);
}

/* The policy may reserve the sender's context for one user (policy.py ContextPolicy.uid). */
static int identity_allowed(vsc_endpoint *ep, int fd, vsc_handle src)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    uint32_t uid;

    if (vsc_links_streamed(ep->transport) || !vsc_policy_uid(ep->transport->policy, src.context, &uid))
        return 1; /* across kernels no uid is known (Python's vsock Peer has none either) */
    return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && cred.uid == uid;
}

static void accept_all(vsc_endpoint *ep)
{
    for (;;) {
        vsc_handle src;
        /* Blocking, so that the receiver may read it hot (vsc_rx_add). */
        int fd = ep->bound.set != NULL ? vsc_hybrid_accept(&ep->bound)
                                       : accept4(ep->bound.listener, NULL, NULL, SOCK_CLOEXEC);

        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return; /* EAGAIN, or out of descriptors: the rest waits for the next accept */
        }
        vsc_vsock_in *in = NULL;

        if (ep->transport->transport == VSC_TRANSPORT_HYBRID) {
            if (vsc_hybrid_identify(ep->transport, fd, &src, &fd, &in) != 0)
                continue; /* refused, and closed */
        } else if (vsc_links_streamed(ep->transport)) {
            if (vsc_vsock_accept(ep->transport, fd, ep->handle, &src, &fd, &in) != 0)
                continue; /* refused, and closed */
        } else if (vsc_local_identify(ep->transport, fd, ep->handle, &src) != 0 || !identity_allowed(ep, fd, src)) {
            close(fd);
            continue;
        }
        if (vsc_rx_add(&ep->rx, fd, src) != 0) {
            close(fd);
            vsc_vsock_in_release(in);
            continue;
        }
        if (put_in(ep, fd, in) != 0) {
            vsc_rx_remove(&ep->rx, fd);
            close(fd);
            vsc_vsock_in_release(in);
            continue;
        }
        decide(ep, fd, !vsc_acl_may_send(ep->transport, src, ep->handle));
    }
}

void vsc_endpoint_privileges_changed(vsc_endpoint *ep)
{
    ssize_t n;

    if (pthread_mutex_trylock(&ep->recv_lock) == 0) {
        uint64_t epoch = vsc_acl_epoch(ep->bound.acct);

        if (epoch != ep->acl_epoch && !__atomic_load_n(&ep->closing, __ATOMIC_ACQUIRE))
            recheck_access(ep, epoch);
        pthread_mutex_unlock(&ep->recv_lock);
        return;
    }
    do {
        n = write(ep->wake_w, "", 1); /* the receiving thread rechecks when it wakes */
    } while (n < 0 && errno == EINTR);
}

static void drain_wake(vsc_endpoint *ep)
{
    char buf[64];

    while (read(ep->wake_r, buf, sizeof buf) > 0)
        ;
}

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int deliver_held(vsc_endpoint *ep, void *buf, uint32_t len, vsc_handle *src)
{
    int n = (int)ep->held_len;

    if (ep->held_len > len)
        return VMCI_ERROR_NO_MEM;
    if (n > 0)
        memcpy(buf, ep->held, (size_t)n);
    *src = ep->held_src;
    free(ep->held);
    ep->held = NULL;
    return n;
}

/* Keep a datagram of n bytes too large for buf (its first len bytes in buf, the rest in spill)
 * for the next receive: VMCI_ERROR_NO_MEM either way (the SDK's answer to too small a buffer). */
static int hold(vsc_endpoint *ep, const void *buf, uint32_t len, uint64_t n, vsc_handle from)
{
    ep->held = malloc((size_t)n);
    if (ep->held == NULL)
        return VMCI_ERROR_NO_MEM; /* the datagram is lost */
    if (len > 0)
        memcpy(ep->held, buf, len);
    memcpy(ep->held + len, ep->spill, (size_t)(n - len));
    ep->held_len = n;
    ep->held_src = from;
    return VMCI_ERROR_NO_MEM;
}

/* Vsock dgram mode: the datagram waiting on the endpoint's socket. Its length, VMCI_ERROR_NO_MEM
 * (held), VSC_AGAIN (nothing to deliver: none queued, or one read and dropped), or a VMCI code.
 * The privileges are enforced here, per datagram: a denied sender's are counted and dropped. */
static int recv_dgram(vsc_endpoint *ep, void *buf, uint32_t len, vsc_handle *src)
{
    vsc_handle from;
    ssize_t n = vsc_vsock_dgram_recv(ep->transport, ep->bound.listener, buf, len, ep->spill, SPILL_SIZE, &from);

    if (n == VSC_AGAIN || n == VSC_BAD_FRAME)
        return VSC_AGAIN;
    if (n < 0)
        return (int)n;
    if (!vsc_acl_may_send(ep->transport, from, ep->handle)) {
        ep->dropped_denied++;
        if (len > 0)
            memset(buf, 0, (size_t)n < len ? (size_t)n : len);
        return VSC_AGAIN;
    }
    if ((uint64_t)n > len)
        return hold(ep, buf, len, (uint64_t)n, from);
    *src = from;
    return (int)n;
}

static int recv_locked(vsc_endpoint *ep, void *buf, uint32_t len, vsc_handle *src, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? 0 : now_ms() + timeout_ms;
    int wait = timeout_ms, sys_errno;

    if (__atomic_load_n(&ep->closing, __ATOMIC_ACQUIRE))
        return VMCI_ERROR_NO_MORE_DATAGRAMS;
    if (ep->held != NULL)
        return deliver_held(ep, buf, len, src);
    for (;;) {
        ssize_t status;

        ep->rx.last_fd = -1; /* set again only when a connection is read */
        status = vsc_rx_recv(&ep->rx, buf, len, ep->spill, SPILL_SIZE, wait, &sys_errno);

        if (status >= 0) {
            uint64_t n = (uint64_t)status - VMCI_DG_HEADERSIZE, epoch = vsc_acl_epoch(ep->bound.acct);
            int fd = ep->rx.last_fd;
            vsc_handle from = ep->rx.conns[fd].src;

            if (epoch != ep->acl_epoch) {
                recheck_access(ep, epoch);
                if (ep->rx.conns[fd].fd < 0)
                    goto waited; /* refused meanwhile */
            }
            if (ep->ndenied > 0 && fd < ep->denied_cap && ep->denied[fd]) {
                /* Read (so its bytes left our queue account) and dropped: never seen. */
                ep->dropped_denied++;
                if (len > 0)
                    memset(buf, 0, n < len ? (size_t)n : len);
                goto waited;
            }
            if (n > len)
                return hold(ep, buf, len, n, from);
            *src = from;
            return (int)n;
        }
        switch (status) {
        case VSC_AGAIN:
            if (timeout_ms >= 0)
                return VMCI_ERROR_TIMEOUT;
            break;
        case VSC_ACCEPT:
            if (!ep->dgram) {
                accept_all(ep);
                break;
            }
            if ((status = recv_dgram(ep, buf, len, src)) != VSC_AGAIN)
                return (int)status;
            break;
        case VSC_WAKE:
            drain_wake(ep);
            if (__atomic_load_n(&ep->closing, __ATOMIC_ACQUIRE))
                return VMCI_ERROR_NO_MORE_DATAGRAMS;
            if (vsc_acl_epoch(ep->bound.acct) != ep->acl_epoch)
                recheck_access(ep, vsc_acl_epoch(ep->bound.acct)); /* vsc_endpoint_privileges_changed */
            break;
        case VSC_INTR:
            break;
        case VSC_PEER_GONE:
        case VSC_BAD_FRAME:
        case VSC_FORGED:
        default:
            if (ep->rx.last_fd >= 0 && ep->rx.last_fd < ep->rx.nconns && ep->rx.conns[ep->rx.last_fd].fd >= 0)
                drop_conn(ep, ep->rx.last_fd);
            else
                return VMCI_ERROR_GENERIC; /* epoll itself failed */
        }
    waited:
        if (timeout_ms >= 0) {
            int64_t left = deadline - now_ms();
            wait = left > 0 ? (int)left : 0;
        }
    }
}

int vsc_endpoint_recv(vsc_endpoint *ep, void *buf, uint32_t len, vsc_handle *src, int timeout_ms)
{
    int rc;

    pthread_mutex_lock(&ep->recv_lock);
    rc = recv_locked(ep, buf, len, src, timeout_ms);
    pthread_mutex_unlock(&ep->recv_lock);
    return rc;
}
