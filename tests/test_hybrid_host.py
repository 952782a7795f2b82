"""The hybrid transport between the host's own programs: mirrored regions and streamed queue
pairs attached at each other's ``<uds>_<rid>.host`` paths, and the discovery daemon started
on demand by the first VMCIDs_* call of a host program. Host side only: the VMM sockets are
plain paths (nothing reaches a guest here) and no AF_VSOCK socket is created
(``no_af_vsock``, from test_hybrid)."""
import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import psutil
import pytest

from vsockcompat import constants as C
from vsockcompat import ds_client, errors, mirror_link
from vsockcompat import mirror_wire as W
from vsockcompat.handles import VMCI_DS_HANDLE, VMCI_INVALID_HANDLE, VMCIHandle
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.queuepair import QPEvent, QueuePair
from vsockcompat.runtime import Runtime
from vsockcompat.sharedmem import SharedRegion

from conftest import PYTHON, child_env
from test_hybrid import GUEST, SIBLING, WAIT, hybrid_settings, mirrors_both_ways, no_af_vsock  # noqa: F401


@pytest.fixture
def vmm_paths(tmp_path):
    """Two VMM socket paths (guests 3 and 4); no VMM listens: host programs never use them."""
    return [(str(tmp_path / "a.vsock"), GUEST), (str(tmp_path / "b.vsock"), SIBLING)]


@pytest.fixture
def host_rt(core, rundir, vmm_paths):
    """``host_rt(cid=2, guests=vmm_paths, **settings)``: a hybrid runtime of a host program."""
    def make(cid=2, guests=None, **changes):
        settings = hybrid_settings(rundir, guests or vmm_paths, cid=cid)._replace(**changes)
        return Runtime(settings, core=core)
    return make


def wait_gone(path):
    deadline = time.monotonic() + WAIT
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not os.path.exists(path)


# Regions

def test_host_programs_attach_each_others_region(host_rt, vmm_paths):
    creator, attacher, well_known = host_rt(), host_rt(), host_rt(cid=1)
    assert mirror_link.mirrored(creator)
    region = SharedRegion.create(256, runtime=creator)
    rid = region.handle.resource
    host_paths = ["%s_%d.host" % (uds, rid) for uds, _ in vmm_paths]
    try:
        assert region.handle == (2, rid) and all(os.path.exists(p) for p in host_paths)
        with pytest.raises(errors.DuplicateEntry):
            DatagramEndpoint(rid, runtime=attacher)        # one id space with the endpoints
        other = SharedRegion.attach(region.handle, runtime=attacher)
        assert other.size == 256 and region.stats.attached == 1
        mirrors_both_ways(region, other)
        # The discovery daemon's context reaches it too (both contexts are the host's ports).
        with SharedRegion.attach((1, rid), 256, runtime=well_known) as third:
            assert bytes(third.buffer[:5]) == b"hello"
        other.detach()
        assert mirror_link.connect(attacher, mirror_link.REGION, region.handle).close() is None
    finally:
        region.detach()
    assert all(wait_gone(p) for p in host_paths)
    with pytest.raises(errors.NotFound):
        SharedRegion.attach(region.handle, runtime=attacher)


def test_bad_attaches_get_the_sdk_codes(host_rt):
    creator, attacher = host_rt(), host_rt()
    with SharedRegion.create(64, runtime=creator) as region:
        rid = region.handle.resource
        with pytest.raises(errors.InvalidSize):
            SharedRegion.attach(region.handle, 128, runtime=attacher)
        with pytest.raises(errors.DstUnreachable):
            SharedRegion.attach((7, rid), runtime=attacher)        # behind no VMM socket
        with pytest.raises(errors.NotFound):
            SharedRegion.attach((2, rid + 1), runtime=attacher)    # nothing there
        with DatagramEndpoint(runtime=attacher) as ep:             # something else there
            with pytest.raises(errors.NotFound):
                SharedRegion.attach(ep.handle, runtime=attacher)
        creator.access.change(region.handle,
                              lambda acl: acl.add(VMCIHandle(2, 0), [], [C.VMCI_PRIV_SM_ATTACH]))
        with pytest.raises(errors.NoAccess):
            SharedRegion.attach(region.handle, runtime=attacher)
        assert region.stats.attached == 0


def test_flags_of_the_policy_apply_between_host_contexts(host_rt, rundir):
    with open(os.path.join(rundir, "policy.toml"), "w") as f:
        f.write('[contexts.1]\nflags = ["restricted"]\n')
    with SharedRegion.create(64, runtime=host_rt()) as region:
        with pytest.raises(errors.NoAccess):
            SharedRegion.attach(region.handle, runtime=host_rt(cid=1))


@pytest.mark.parametrize("claim", [GUEST, 9, 0xFFFFFFFF])
def test_a_host_attacher_claiming_another_context_is_refused(host_rt, vmm_paths, claim):
    """At a ``.host`` path only the host's contexts are believed (a guest comes through its VMM)."""
    with SharedRegion.create(64, runtime=host_rt()) as region:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(WAIT)
            sock.connect("%s_%d.host" % (vmm_paths[1][0], region.handle.resource))
            sock.sendall(W.encode(W.HELLO, 0, struct.pack("<I", claim)))
            reader, frames = W.FrameReader(), []
            while not frames:
                data = sock.recv(4096)
                assert data, "closed without an answer"
                frames = reader.feed(data)
        finally:
            sock.close()
        assert frames[0].type == W.REFUSE and W.decode_code(frames[0].arg) == C.VMCI_ERROR_NO_ACCESS
        assert region.stats.attached == 0


ATTACHER = r"""
import sys
from vsockcompat.sharedmem import SharedRegion
region = SharedRegion.attach((2, int(sys.argv[1])))
assert bytes(region.buffer[:6]) == b"parent", bytes(region.buffer[:6])
region.buffer[8:13] = b"child"
region.detach()                      # flushes its writes
print("attached", region.size)
"""


def test_a_separate_host_program_attaches_through_the_environment(host_rt, core, rundir, vmm_paths):
    """Another process, configured only by the environment (two VMM sockets)."""
    with SharedRegion.create(4096, runtime=host_rt()) as region:
        region.buffer[:6] = b"parent"
        env = child_env(rundir, core.NAME, VSOCKCOMPAT_TRANSPORT="hybrid", VSOCKCOMPAT_DS_AUTOSTART="0",
                        VSOCKCOMPAT_HYBRID_UDS=":".join(p for p, _ in vmm_paths[::-1]),
                        VSOCKCOMPAT_HYBRID_CID="%d:%d" % (SIBLING, GUEST))
        out = subprocess.run([PYTHON, "-c", ATTACHER, str(region.handle.resource)], env=env,
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout == b"attached 4096\n"
        region.sync()
        assert bytes(region.buffer[8:13]) == b"child"


# Claiming a port

def claim_during_anothers_claim(first_rt, second_rt, resource, monkeypatch):
    """Create an endpoint (on ``resource``; None: the next free id) in ``second_rt`` while
    ``first_rt`` is stopped inside creating its own, after binding and before it listens (the
    window where two programs starting at once met). Returns what each creation gave: an
    endpoint or its VMCIError."""
    paused, resume = threading.Event(), threading.Event()
    real_listen = socket.socket.listen
    results = {}

    def listen(sock, *args):
        if threading.current_thread() is first and not paused.is_set():
            paused.set()
            resume.wait(WAIT)
        return real_listen(sock, *args)

    def create(which, rt):
        try:
            results[which] = DatagramEndpoint(resource, runtime=rt)
        except errors.VMCIError as exc:
            results[which] = exc

    first_rt.transport, second_rt.transport          # opened before the pause
    monkeypatch.setattr(socket.socket, "listen", listen)
    first = threading.Thread(target=create, args=("first", first_rt))
    second = threading.Thread(target=create, args=("second", second_rt))
    first.start()
    try:
        assert paused.wait(WAIT)
        second.start()
        second.join(1.0)          # a creation that does not wait for the first one's ends at once
    finally:
        resume.set()
        first.join(WAIT)
        if second.ident is not None:
            second.join(WAIT)
    monkeypatch.setattr(socket.socket, "listen", real_listen)
    return results["first"], results["second"]


def claimed_apart(first, second, resource, sender_rt):
    """Check the result of ``claim_during_anothers_claim``: two endpoints on two ids (None), or
    the id to the first and DuplicateEntry to the second; each endpoint receives what is sent
    to its handle (none is deaf). Closes them."""
    endpoints = [ep for ep in (first, second) if isinstance(ep, DatagramEndpoint)]
    try:
        if resource is None:
            assert len(endpoints) == 2 and first.handle != second.handle
        else:
            assert first.handle == (2, resource) and isinstance(second, errors.DuplicateEntry)
        with DatagramEndpoint(runtime=sender_rt) as sender:
            for i, ep in enumerate(endpoints):
                sender.send(ep.handle, b"to %d" % i)
            for i, ep in enumerate(endpoints):
                assert ep.recv(timeout=WAIT).payload == b"to %d" % i
    finally:
        for ep in endpoints:
            ep.close()


@pytest.mark.parametrize("resource", [None, 4242])
def test_a_port_being_claimed_is_not_taken_by_another_program(host_rt, monkeypatch, resource):
    """Two host programs creating endpoints at once get two ports, or one gets DuplicateEntry
    for the same explicit one. (Both got 1024: the second took the first's files, bound but
    not listening yet, for a dead endpoint's and the first was deaf, so the reply of a discovery
    daemon it had just started was lost.) The local transport's counterpart is in test_datagram."""
    first, second = claim_during_anothers_claim(host_rt(), host_rt(), resource, monkeypatch)
    claimed_apart(first, second, resource, host_rt())


def test_a_listener_with_a_full_backlog_keeps_its_port(host_rt, vmm_paths):
    """The claim's probe of a path in use never blocks (it runs under the claim lock): a live
    listener whose backlog is full is alive, so its port is taken, not reclaimed."""
    path = "%s_%d" % (vmm_paths[0][0], 4343)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting = []
    try:
        listener.bind(path)
        listener.listen(0)
        for _ in range(64):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            waiting.append(client)
            try:
                client.connect(path)
            except BlockingIOError:
                break
        else:
            pytest.fail("the backlog never filled")
        with pytest.raises(errors.DuplicateEntry):
            DatagramEndpoint(4343, runtime=host_rt())
        assert os.path.exists(path)
    finally:
        for sock in waiting + [listener]:
            sock.close()


def test_a_stopped_claimer_gives_a_timeout_not_a_hang(host_rt, vmm_paths, monkeypatch):
    """The claim lock is the directory of the VMM sockets; held by a stopped process it makes
    creation fail with VMCI_ERROR_TIMEOUT after CLAIM_TIMEOUT seconds."""
    from vsockcompat.transport import hybrid
    monkeypatch.setattr(hybrid, "CLAIM_TIMEOUT", 0.2)
    rt = host_rt()
    fd = os.open(os.path.dirname(vmm_paths[0][0]), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(errors.Timeout):
            DatagramEndpoint(runtime=rt)
    finally:
        os.close(fd)
    with DatagramEndpoint(runtime=rt) as ep:
        assert ep.handle.context == 2


# Queue pairs

def test_host_programs_share_a_queue_pair(host_rt):
    a_rt, b_rt, ds_rt = host_rt(), host_rt(), host_rt(cid=1)
    a = QueuePair.alloc(None, 100, 200, flags=C.VMCI_QPFLAG_LOCAL, runtime=a_rt)
    try:
        with pytest.raises(errors.AlreadyExists):          # one context, not LOCAL: as the SDK
            QueuePair.alloc(a.handle, 200, 100, runtime=b_rt)
        with pytest.raises(errors.QueuePairMismatch):
            QueuePair.alloc(a.handle, 100, 100, flags=C.VMCI_QPFLAG_LOCAL, runtime=b_rt)
        b = QueuePair.alloc(a.handle, 200, 100, flags=C.VMCI_QPFLAG_LOCAL, runtime=b_rt)
        assert a.events(WAIT) == [QPEvent(C.VMCI_EVENT_QP_PEER_ATTACH, a.handle, 2)]
        assert b.peer_id == 2
        assert b.enqueue(b"host to host") == 12
        assert a.wait_for_data(WAIT) == 12 and a.dequeue(12) == b"host to host"
        with pytest.raises(errors.Unavailable):            # a third end
            QueuePair.alloc(a.handle, 200, 100, flags=C.VMCI_QPFLAG_LOCAL, runtime=host_rt())
        b.detach()
    finally:
        a.detach()
    # Between contexts 2 and 1 (the daemon's) a pair needs no LOCAL.
    c = QueuePair.alloc(None, 64, 64, runtime=a_rt)
    try:
        d = QueuePair.alloc(c.handle, 64, 64, runtime=ds_rt)
        assert c.events(WAIT) == [QPEvent(C.VMCI_EVENT_QP_PEER_ATTACH, c.handle, 1)] and d.peer_id == 2
        d.detach()
    finally:
        c.detach()


# The discovery daemon, started on demand

def test_the_first_call_starts_one_daemon_for_racing_host_programs(host_rt, rundir, vmm_paths,
                                                                   core, spawned_daemons):
    spawned = spawned_daemons
    runtimes = [host_rt(ds_autostart=True), host_rt(ds_autostart=True)]
    with DatagramEndpoint(runtime=runtimes[0]) as ep:
        barrier = threading.Barrier(2)
        results = [None, None]

        def call(i):
            barrier.wait(5)
            results[i] = ds_client.register_status("svc%d" % i, ep.handle, runtimes[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [C.VMCI_SUCCESS] * 2 and len(spawned) == 1
        assert ds_client.lookup_status("svc1", runtimes[1]) == (C.VMCI_SUCCESS, ep.handle)
    with open(os.path.join(rundir, "ds.pid")) as f:
        daemon = psutil.Process(int(f.read()))
    assert daemon.pid == spawned[0].pid and "--idle-exit" in daemon.cmdline()
    env = daemon.environ()
    assert env["VSOCKCOMPAT_TRANSPORT"] == "hybrid" and env["VSOCKCOMPAT_CID"] == "1"
    assert env["VSOCKCOMPAT_HYBRID_UDS"] == "%s:%s" % (vmm_paths[0][0], vmm_paths[1][0])
    assert env["VSOCKCOMPAT_HYBRID_CID"] == "%d:%d" % (GUEST, SIBLING)
    assert env["VSOCKCOMPAT_NO_EXTENSIONS"] == ("1" if core.NAME == "pure" else "0")
    # It serves the guests' path too, where their VMMs deliver them: (1, 1) is <uds>_1.
    assert all(os.path.exists("%s_1" % uds) for uds, _ in vmm_paths)
    assert runtimes[0].transport.endpoint_alive(VMCI_DS_HANDLE)
    # The rundir fixture stops it through ds.pid, as on the local transport.


RACER = r"""
import sys
from vsockcompat import ds_client
from vsockcompat.constants import VMCI_PUBLIC_GROUP_NAME
real_spawn = ds_client._spawn

def spawn(rt):
    print("spawned", flush=True)
    return real_spawn(rt)

ds_client._spawn = spawn
print("ready", flush=True)
sys.stdin.readline()                         # both start their call at once
print(ds_client.lookup_status(VMCI_PUBLIC_GROUP_NAME, timeout=60)[0], flush=True)   # a new daemon may be slow to answer under load
"""


def test_two_host_programs_at_once_start_one_daemon(core, rundir, vmm_paths):
    env = child_env(rundir, core.NAME, VSOCKCOMPAT_TRANSPORT="hybrid", VSOCKCOMPAT_DS_AUTOSTART="1",
                    VSOCKCOMPAT_HYBRID_UDS=":".join(p for p, _ in vmm_paths),
                    VSOCKCOMPAT_HYBRID_CID="%d:%d" % (GUEST, SIBLING))
    procs = [subprocess.Popen([PYTHON, "-c", RACER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline() == b"ready\n"
        for proc in procs:
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        outs = [proc.communicate(timeout=90)[0].split() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert sorted(outs) == [[b"%d" % C.VMCI_SUCCESS], [b"spawned", b"%d" % C.VMCI_SUCCESS]], outs
    with open(os.path.join(rundir, "ds.pid")) as f:
        assert psutil.pid_exists(int(f.read()))     # it outlives them; the fixture stops it


def test_a_daemon_that_cannot_start_is_a_clear_error(host_rt, rundir, monkeypatch, spawned_daemons):
    """It exits at once: the call gives the code of "no service at (1, 1)" when it sees the exit
    (not after SPAWN_TIMEOUT), and the daemon's reason is in ds.log."""
    monkeypatch.setattr(ds_client, "DAEMON_COMMAND",
                        [sys.executable, "-c", "raise SystemExit('ds cannot serve here')"])
    monkeypatch.setattr(ds_client, "SPAWN_TIMEOUT", 3600.0)   # waiting for it would hang the test
    rt = host_rt(ds_autostart=True)
    rc, handle, message = ds_client._call(C.VMCI_DS_ACTION_LOOKUP, "x", VMCI_INVALID_HANDLE, rt, None)
    assert (rc, handle) == (C.VMCI_ERROR_INVALID_RESOURCE, VMCI_INVALID_HANDLE)
    assert "no discovery service" in message
    assert len(spawned_daemons) == 1 and spawned_daemons[0].wait(WAIT) == 1
    with open(os.path.join(rundir, "ds.log"), "rb") as f:
        assert b"ds cannot serve here" in f.read()
    with pytest.raises(errors.InvalidResource):
        ds_client.lookup("x", rt)
    assert not os.path.exists(os.path.join(rundir, "ds.pid"))


def test_a_daemon_command_that_cannot_run_is_a_clear_error(host_rt, monkeypatch, caplog):
    monkeypatch.setattr(ds_client, "DAEMON_COMMAND", ["/nonexistent/vsockcompat-python"])
    rt = host_rt(ds_autostart=True)
    assert ds_client.lookup_status("x", rt) == (C.VMCI_ERROR_INVALID_RESOURCE, VMCI_INVALID_HANDLE)
    assert "cannot start the discovery daemon" in caplog.text


def test_without_autostart_no_daemon_is_started(host_rt, monkeypatch):
    def no_spawn(rt):
        raise AssertionError("a daemon was started")

    monkeypatch.setattr(ds_client, "_spawn", no_spawn)
    rt = host_rt(ds_autostart=False)
    assert ds_client.lookup_status("x", rt) == (C.VMCI_ERROR_INVALID_RESOURCE, VMCI_INVALID_HANDLE)
