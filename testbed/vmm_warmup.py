"""Moving vhost-device-vsock's host port numbers past the ones our programs listen on, before a
cross-bed guest's command starts.

vhost-device-vsock numbers the host end of each host-initiated connection (``CONNECT <port>``
on the VMM socket) from a counter that starts at 0 and moves on only when a number is handed
out. Version 0.3.0 (Debian's) hands out the counter's value if no connection uses it as a host
port, and otherwise gives up at once (``NoFreeLocalPort`` in its log) instead of trying the next
value: it closes the host's connection unread, and does so for every ``CONNECT`` until the
connections using that port end (later releases try the next value). The ports a guest
connects to are host ports too, and port 1 is the discovery daemon's: so the second
host-initiated connection after the guest's driver comes up fails whenever a guest program is
talking to the daemon at that moment, for instance when it is the daemon's reply to a lookup.

The bed therefore has the counter hand out 0 and 1 before the command runs: the guest listens
on ``PORT`` until it accepted ``CONNECTS`` connections, the host connects there through the
VMM socket until ``CONNECTS`` were answered ``OK``. The next fixed ports our programs use are
1024 and up, which the counter reaches only after about a thousand host-initiated connections,
more than a bed run makes. No AF_VSOCK socket is opened on this machine: the host half speaks
to the VMM's Unix socket only, the listening half runs inside the guest.
"""
import socket
import threading
import time

#: The guest's warm-up port: one no test or program uses.
PORT = 0x7FFFFF00
#: Host-initiated connections answered before the command runs (the counter hands out 0 and 1).
CONNECTS = 2
#: Seconds the guest waits for them once its driver is up.
GUEST_WAIT = 120.0
#: Seconds between the host's tries while the guest is still booting.
RETRY = 0.5


def host_side(uds: str, stop: threading.Event, deadline: float) -> int:
    """Connect through the VMM socket ``uds`` to the guest's ``PORT`` until ``CONNECTS`` were
    answered ``OK``, ``stop`` is set or ``deadline`` (``time.monotonic``) passes; how many
    were answered."""
    answered = 0
    while answered < CONNECTS and not stop.is_set() and time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(5.0)
            sock.connect(uds)
            sock.sendall(b"CONNECT %d\n" % PORT)
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < 32:
                chunk = sock.recv(32 - len(reply))
                if not chunk:
                    break
                reply += chunk
            if reply.startswith(b"OK "):
                answered += 1
                continue
        except OSError:
            pass  # not up yet (no socket, a timeout, a reset)
        finally:
            sock.close()
        stop.wait(RETRY)
    return answered


def start_host_side(uds: str, deadline: float):
    """``host_side`` on a thread; returns ``finish()``, which stops it and gives its count."""
    stop = threading.Event()
    result = []
    thread = threading.Thread(target=lambda: result.append(host_side(uds, stop, deadline)),
                              name="vmm-warmup", daemon=True)
    thread.start()

    def finish() -> int:
        stop.set()
        thread.join(10)
        return result[0] if result else 0
    return finish


def guest_side(wait: float = GUEST_WAIT) -> int:
    """Inside the guest: accept ``CONNECTS`` connections on ``PORT`` (each closed at once)
    within ``wait`` seconds; how many came."""
    accepted = 0
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        listener.bind((socket.VMADDR_CID_ANY, PORT))
        listener.listen(CONNECTS)
        deadline = time.monotonic() + wait
        while accepted < CONNECTS:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            listener.settimeout(left)
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                break
            conn.close()
            accepted += 1
    finally:
        listener.close()
    return accepted
