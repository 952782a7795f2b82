"""The second guest's side of the guest <-> guest tests: run in CID 4 by ``testbed/cross.py run
--guests 2 --peer-cmd "python tests/cross_vm/guest_peer.py"``.

    python tests/cross_vm/guest_peer.py

Refuses (status 2, no socket opened) unless the gate of ``conftest.py`` is open for CID 4: this
boot's nonce, one virtio vsock device, the local CID 4. Then, on the vsock transport in stream
mode, it opens one datagram endpoint per available core at ``SIBLING_RIDS[core]`` (context 4),
each on its own thread, and:

* makes the two host-initiated connections that ``vhost-device-vsock`` 0.3.0's host port allocator
  needs before any discovery traffic (``test_cross_discovery.py``), with the host peer that the
  bed runs on both guests' VMM sockets (``host_peer.py``; its discovery daemon serves both
  guests);
* registers each endpoint in that daemon as ``sibling_name(core)``;
* answers ``b"lookup <name>"`` with ``b"<code> <context>:<resource>"`` from that daemon, and echoes
  anything else to its sender as ``payload + b" from <context>:<resource>"``.

Runs until the bed stops its guest; prints what it did, and its failures, to the bed's output.
"""
import importlib.util
import os
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if importlib.util.find_spec("vsockcompat") is None:     # not installed: run from a checkout
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/

from cross_vm.conftest import SIBLING_CID, gate  # noqa: E402
from cross_vm.host_peer import HOST_RIDS, built_cores  # noqa: E402
from vsockcompat import ds_client  # noqa: E402
from vsockcompat._settings import Settings  # noqa: E402
from vsockcompat.constants import VMCI_HOST_CONTEXT_ID, VMCI_SUCCESS  # noqa: E402
from vsockcompat.datagram import DatagramEndpoint  # noqa: E402
from vsockcompat.errors import Timeout, VMCIError  # noqa: E402
from vsockcompat.handles import VMCIHandle  # noqa: E402
from vsockcompat.runtime import Runtime  # noqa: E402

#: The second guest's endpoints' resource ids, one per core.
SIBLING_RIDS = {"cython": 6001, "pure": 6002}
#: Seconds to wait for the host peer (it starts before the boot) and for each reply.
READY_WAIT = 120.0
WAIT = 30.0


def sibling_name(core):
    """The name the second guest registers its ``core`` endpoint under."""
    return b"sibling echo " + core.encode()


def answer(dg, runtime):
    for prefix, command in LARGE_COMMANDS.items():        # defined at the end of the file
        if dg.payload.startswith(prefix):
            return command(dg, dg.payload[len(prefix):], runtime)
    if dg.payload.startswith(b"lookup "):
        rc, handle = ds_client.lookup_status(dg.payload[len(b"lookup "):], runtime)
        return b"%d %d:%d" % (rc, handle.context, handle.resource)
    return dg.payload + b" from %d:%d" % (dg.src.context, dg.src.resource)


def serve(ep, runtime, core):
    while True:
        try:
            dg = ep.recv(timeout=1.0)
        except Timeout:
            continue
        try:
            ep.send(dg.src, answer(dg, runtime))
        except VMCIError as exc:
            print("guest-peer: %s: reply to %s failed: %r" % (core, dg.src, exc), flush=True)


def wait_for_host_peer(runtime):
    """Until the host peer of this VMM socket answers an echo (it starts with the bed)."""
    host = VMCIHandle(VMCI_HOST_CONTEXT_ID, HOST_RIDS["cython"])
    with DatagramEndpoint(runtime=runtime) as control:
        deadline = time.monotonic() + READY_WAIT
        while True:
            try:
                control.send(host, b"hello")
                control.recv(timeout=WAIT)
                return
            except VMCIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def main():
    reason = gate(cid=SIBLING_CID)
    if reason is not None:
        print("guest-peer: refusing: %s" % reason, flush=True)
        return 2
    rundir = tempfile.mkdtemp(prefix="vsc-sib-")
    settings = Settings(no_extensions=False, rundir=rundir, cid=SIBLING_CID, transport="vsock",
                        vsock_mode="stream", ds_autostart=False)
    endpoints = {}
    for core in built_cores(SIBLING_RIDS, "guest-peer"):
        runtime = Runtime(settings, core=core)
        ep = DatagramEndpoint(SIBLING_RIDS[core], runtime=runtime)
        endpoints[core] = (ep, runtime)
        threading.Thread(target=serve, args=(ep, runtime, core), daemon=True).start()
        print("guest-peer: %s endpoint %d:%d ready" % (core, SIBLING_CID, SIBLING_RIDS[core]),
              flush=True)
    try:
        wait_for_host_peer(Runtime(settings))
        for core, (ep, runtime) in endpoints.items():
            rc = ds_client.register_status(sibling_name(core), ep.handle, runtime)
            print("guest-peer: registered %r: %d" % (sibling_name(core), rc), flush=True)
            if rc != VMCI_SUCCESS:
                return 1
    except VMCIError as exc:
        print("guest-peer: discovery through CID %d's daemon failed: %r" % (SIBLING_CID, exc),
              flush=True)
        return 1
    while True:            # serving on the endpoints' threads until the bed stops this guest
        time.sleep(60)


# Large guest <-> guest traffic (``test_cross_guests.py``: writes cut in pieces, see
# ``vsockcompat/transport/pieces.py``). Each command's reply is a datagram to its sender.

import hashlib  # noqa: E402

from vsockcompat.constants import VMCI_QPFLAG_ATTACH_ONLY  # noqa: E402
from vsockcompat.queuepair import QueuePair  # noqa: E402
from vsockcompat.sharedmem import SharedRegion  # noqa: E402

#: Bytes of each queue pair's queues in the ``qp-echo`` exchange.
QP_SIZE = 65536


def pattern(n, seed):
    """``n`` bytes that differ with ``seed`` (the bulk payloads of both sides)."""
    block = bytes((i + seed) % 256 for i in range(256))
    return (block * (n // 256 + 1))[:n]


def digest(data):
    """What the sibling answers for received bytes: their count and SHA-256."""
    return b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())


def bulk(dg, args, runtime):
    """``bulk <n> <seed>``: a datagram of ``pattern(n, seed)``."""
    n, seed = (int(word) for word in args.split())
    return pattern(n, seed)


def qp_echo(dg, args, runtime):
    """``qp-echo <rid> <n>``: attach to the sender's queue pair ``(sender's context, rid)``
    (queues of ``QP_SIZE``), read ``n`` bytes, enqueue them back at once (one stream write),
    detach; answers ``digest`` of what it read, or ``error <exception>``."""
    rid, n = (int(word) for word in args.split())
    try:
        qp = QueuePair.alloc(VMCIHandle(dg.src.context, rid), QP_SIZE, QP_SIZE,
                             flags=VMCI_QPFLAG_ATTACH_ONLY, runtime=runtime)
    except VMCIError as exc:
        return b"error %r" % exc
    try:
        got = bytearray()
        while len(got) < n:
            qp.wait_for_data(WAIT)
            got += qp.dequeue(n - len(got))
        sent = qp.enqueue(bytes(got))
        if sent != n:
            return b"error enqueued %d of %d" % (sent, n)
        return digest(bytes(got))
    except VMCIError as exc:
        return b"error %r" % exc
    finally:
        qp.detach()


def mirror_echo(dg, args, runtime):
    """``mirror-echo <rid> <size> <seed>``: attach to the sender's region ``(sender's context,
    rid)`` of ``size`` bytes (mirrored: its whole contents arrive as UPDATE frames), fill it with
    ``pattern(size, seed)``, sync (the creator has applied it), detach; answers ``digest`` of
    the contents it found, or ``error <exception>``."""
    rid, size, seed = (int(word) for word in args.split())
    try:
        region = SharedRegion.attach(VMCIHandle(dg.src.context, rid), size, runtime=runtime)
    except VMCIError as exc:
        return b"error %r" % exc
    try:
        found = digest(bytes(region.buffer))
        region.buffer[:] = pattern(size, seed)
        region.sync(WAIT)
        return found
    except VMCIError as exc:
        return b"error %r" % exc
    finally:
        region.detach()


_OFFERED = {}    # rid: a region of ``mirror-offer``, until ``mirror-drop``
_OFFERED_LOCK = threading.Lock()


def mirror_offer(dg, args, runtime):
    """``mirror-offer <size> <seed>``: create a region of ``size`` bytes here holding
    ``pattern(size, seed)`` (attachers get it whole as UPDATE frames); answers ``b"<rid>"``."""
    size, seed = (int(word) for word in args.split())
    try:
        region = SharedRegion.create(size, runtime=runtime)
    except VMCIError as exc:
        return b"error %r" % exc
    region.buffer[:] = pattern(size, seed)
    with _OFFERED_LOCK:
        _OFFERED[region.handle.resource] = region
    return b"%d" % region.handle.resource


def mirror_digest(dg, args, runtime):
    """``mirror-digest <rid>``: ``digest`` of that offered region's contents here (its
    attachers' writes applied so far); ``mirror-drop <rid>``: detach it, answers ``b"dropped"``."""
    with _OFFERED_LOCK:
        region = _OFFERED.get(int(args))
    return b"error no region %s" % args if region is None else digest(bytes(region.buffer))


def mirror_drop(dg, args, runtime):
    with _OFFERED_LOCK:
        region = _OFFERED.pop(int(args), None)
    if region is None:
        return b"error no region %s" % args
    region.detach()
    return b"dropped"


LARGE_COMMANDS = {
    b"digest ": lambda dg, rest, runtime: digest(rest),   # ``digest <bytes>``: count and hash
    b"bulk ": bulk,
    b"qp-echo ": qp_echo,
    b"mirror-echo ": mirror_echo,
    b"mirror-offer ": mirror_offer,
    b"mirror-digest ": mirror_digest,
    b"mirror-drop ": mirror_drop,
}


# ---------------------------------------------------------------- multivmm
# Commands of test_cross_multivmm.py (one host discovery daemon for both guests), answered before
# those above:
# * ``b"unregister <name>"``: unregisters ``name`` in the daemon from here; answers ``b"<code>"``;
# * ``b"datagram-app client"``: runs the SDK's datagramApp client here, in this process on the
#   endpoint's core; answers ``b"<status>\\n<stdout>\\0<stderr>"``.

import contextlib  # noqa: E402
import io  # noqa: E402

from vsockcompat.apps import datagram_app  # noqa: E402
from vsockcompat.sdk import VMCILibrary  # noqa: E402

_SAMPLE_OUTPUT = threading.Lock()    # the client writes to sys.stdout/stderr: one at a time


def run_app_client(runtime, app=datagram_app):
    """The SDK sample ``app``'s client (``-c``) on ``runtime``, its output captured:
    ``(status, stdout, stderr)``."""
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="latin-1"), io.StringIO()
    with _SAMPLE_OUTPUT, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = app.main(["-c"], lib=VMCILibrary(runtime))
        out.flush()
    return status, out.buffer.getvalue(), err.getvalue().encode()


def _multivmm_answer(base):
    def multivmm_answer(dg, runtime):
        if dg.payload.startswith(b"unregister "):
            return b"%d" % ds_client.unregister_status(dg.payload[len(b"unregister "):], runtime)
        if dg.payload == b"datagram-app client":
            return b"%d\n%s\0%s" % run_app_client(runtime)
        return base(dg, runtime)
    return multivmm_answer


answer = _multivmm_answer(answer)   # serve() reads the name at each datagram


# ---------------------------------------------------------------- sharedMemApp
# Commands of test_cross_guests_c.py (the SDK's sharedMemApp server in C in CID 3, its region
# mirrored over vsock streams between the guests), answered before those above; each answers
# ``b"<status>\\n<stdout>\\0<stderr>"`` of the client it ran, or ``b"failed: <reason>"``:
# * ``b"sharedmem-app client"``: the Python client here, in this process on the endpoint's core;
# * ``b"c-sharedmem-app build"``: builds the sample in C (tests/c/sharedMemApp.c) against
#   libvmci.so.0 with this guest's compiler, once; answers ``b"built"``;
# * ``b"c-sharedmem-app client"``: runs that C client, on the C library's vsock transport in
#   stream mode, context 4, regions mirrored (``VSOCKCOMPAT_SHM_MODE=mirrored``); the gate is
#   checked again right before it starts.

import subprocess  # noqa: E402

from vsockcompat import clib  # noqa: E402
from vsockcompat.apps import sharedmem_app  # noqa: E402
from vsockcompat.run import command as run_command  # noqa: E402

_C_APP = {}        # "argv", "env": the built C sharedMemApp client, as ``vsockcompat run`` runs it
_C_APP_LOCK = threading.Lock()


def build_c_shared_mem_app():
    """Build the C sharedMemApp once (under ``_C_APP_LOCK``): None, or why it failed."""
    from guest_c_programs import build_programs
    if _C_APP:
        return None
    cc = clib.find_compiler()
    if cc is None:
        return "no C compiler in the guest"
    out = tempfile.mkdtemp(prefix="vsc-sib-c-")
    try:
        built = build_programs(cc, out, ["sharedMemApp"])
    except (AssertionError, OSError, subprocess.SubprocessError) as exc:
        return "cannot build sharedMemApp: %r" % (exc,)
    env = dict(os.environ, VSOCKCOMPAT_LIBVMCI=built["library"], VSOCKCOMPAT_TRANSPORT="vsock",
               VSOCKCOMPAT_VSOCK_MODE="stream", VSOCKCOMPAT_DS_AUTOSTART="0",
               VSOCKCOMPAT_RUNDIR=tempfile.mkdtemp(prefix="vsc-sib-run-"), VSOCKCOMPAT_CID=str(SIBLING_CID),
               VSOCKCOMPAT_SHM_MODE="mirrored")
    _C_APP["argv"], _C_APP["env"] = run_command([built["sharedMemApp"], "-c"], env)
    return None


def run_c_shared_mem_app_client():
    """The C sharedMemApp client: ``b"<status>\\n<stdout>\\0<stderr>"`` or ``b"failed: ..."``."""
    with _C_APP_LOCK:
        if not _C_APP:
            return b"failed: not built (send c-sharedmem-app build first)"
        argv, env = _C_APP["argv"], _C_APP["env"]
    reason = gate(cid=SIBLING_CID)
    if reason is not None:
        return b"failed: the gate closed (%s): refusing to run an AF_VSOCK program" % reason.encode()
    try:
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=READY_WAIT)
    except subprocess.TimeoutExpired:
        return b"failed: the C client ran over %d s" % READY_WAIT
    return b"%d\n%s\0%s" % (proc.returncode, proc.stdout, proc.stderr)


def _shared_mem_app_answer(base):
    def shared_mem_app_answer(dg, runtime):
        if dg.payload == b"sharedmem-app client":
            return b"%d\n%s\0%s" % run_app_client(runtime, sharedmem_app)
        if dg.payload == b"c-sharedmem-app build":
            with _C_APP_LOCK:
                failure = build_c_shared_mem_app()
            return b"built" if failure is None else b"failed: " + failure.encode()
        if dg.payload == b"c-sharedmem-app client":
            return run_c_shared_mem_app_client()
        return base(dg, runtime)
    return shared_mem_app_answer


answer = _shared_mem_app_answer(answer)


if __name__ == "__main__":
    sys.exit(main())
