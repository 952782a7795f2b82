"""The host side of the cross-VM tests: run by ``testbed/cross.py run --host-cmd`` on the machine.

    python tests/cross_vm/host_peer.py

Uses the ``hybrid`` transport only (``VSOCKCOMPAT_TRANSPORT=hybrid``, ``VSOCKCOMPAT_HYBRID_UDS``
and ``VSOCKCOMPAT_HYBRID_CID`` come from the bed; AF_UNIX, never AF_VSOCK). One datagram endpoint
per available core, at ``HOST_RIDS[core]`` in context 2, each on its own thread:

* ``b"call <rid>"``: sends ``b"host calls <rid>"`` to ``(guest CID, rid)``, a host-initiated
  datagram to an endpoint that never sent us anything; when that send fails, answers the caller
  ``b"call <rid> failed: <VMCIError subclass>"``;
* ``b"deny <rid>"`` / ``b"allow <rid>"``: denies ``(guest CID, rid)`` DG_SEND on this endpoint,
  or lifts that, then answers the caller with the same words (the verdicts reach the guest);
* anything else: echoed to its sender as ``payload + b" from <context>:<resource>"`` (the
  sender's handle as this side saw it).

Runs until SIGTERM; exits 0, 1 when a reply could not be sent or an endpoint failed, 2 (at once,
nothing opened) when the transport asked for is not ``hybrid``.
"""
import importlib.util
import os
import signal
import sys
import threading

if importlib.util.find_spec("vsockcompat") is None:     # not installed: run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from vsockcompat._backend import load_core
from vsockcompat._settings import Settings
from vsockcompat.constants import VMCI_PRIV_DG_SEND
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import Timeout, VMCIError
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime

#: The host endpoints' resource ids, one per core (the guest tests send to these).
HOST_RIDS = {"cython": 5001, "pure": 5002}


def serve(settings, core, stop, failures):
    runtime = Runtime(settings, core=core)
    guest_cid = settings.hybrid_cid
    with DatagramEndpoint(HOST_RIDS[core], runtime=runtime) as ep:
        print("host-peer: %s endpoint %d:%d ready" % (core, ep.handle.context, ep.handle.resource),
              flush=True)
        while not stop.is_set():
            try:
                dg = ep.recv(timeout=0.5)
            except Timeout:
                continue
            try:
                if dg.payload.startswith(b"call "):
                    rid = int(dg.payload[5:])
                    try:
                        ep.send(VMCIHandle(guest_cid, rid), b"host calls %d" % rid)
                    except VMCIError as exc:
                        ep.send(dg.src, b"call %d failed: %s" % (rid, type(exc).__name__.encode()))
                elif dg.payload.startswith((b"deny ", b"allow ")):
                    word, rid = dg.payload.split()
                    client = VMCIHandle(guest_cid, int(rid))
                    if word == b"deny":
                        runtime.access.change(ep.handle, lambda acl: acl.add(client, [], [VMCI_PRIV_DG_SEND]))
                    else:
                        runtime.access.change(ep.handle, lambda acl: acl.remove_all(client))
                    ep.send(dg.src, dg.payload)
                else:
                    ep.send(dg.src, dg.payload + b" from %d:%d" % (dg.src.context,
                                                                     dg.src.resource))
            except (VMCIError, ValueError) as exc:
                print("host-peer: %s: reply to %s failed: %r" % (core, dg.src, exc), flush=True)
                failures.append(exc)


def main():
    settings = Settings.from_environ()
    if settings.transport != "hybrid":
        # Checked before any transport is opened: another one (vsock) could use AF_VSOCK here.
        print("host-peer: refusing: VSOCKCOMPAT_TRANSPORT is %r, not 'hybrid'" % settings.transport,
              flush=True)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    failures = []
    threads = []
    for core in HOST_RIDS:
        try:
            load_core(core)
        except ImportError:
            print("host-peer: the %s core is not built: not served" % core, flush=True)
            continue
        t = threading.Thread(target=serve, args=(settings, core, stop, failures), daemon=True)
        t.start()
        threads.append(t)
    while not stop.is_set() and all(t.is_alive() for t in threads):
        stop.wait(0.5)
    died = not stop.is_set()        # a serving thread ended on its own (its traceback is above)
    stop.set()
    for t in threads:
        t.join(5)
    return 1 if died or failures or not threads else 0


if __name__ == "__main__":
    sys.exit(main())
