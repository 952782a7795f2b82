"""The discovery service end to end: daemon (in a thread or a process) and client, on both cores."""
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import psutil
import pytest

from conftest import PYTHON, child_env
from vsockcompat import constants as C
from vsockcompat import ds_client, errors
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.ds_protocol import decode_reply, decode_request, encode_reply
from vsockcompat.ds_server import PUBLIC_GROUP_HANDLE, AlreadyRunning, DiscoveryServer
from vsockcompat.handles import VMCI_DS_HANDLE, VMCI_INVALID_HANDLE

pytestmark = pytest.mark.timeout(60)

DAEMON = [PYTHON, "-m", "vsockcompat.ds_server"]


def _registry(rundir):
    with open(os.path.join(rundir, "ds.registry.json")) as f:
        return {e["name"]: e for e in json.load(f)}


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture
def server(make_runtime, rundir):
    """A DiscoveryServer of context 1 serving in a thread of this process."""
    srv = DiscoveryServer(make_runtime(cid=1), tick=0.05)
    thread = threading.Thread(target=srv.serve_forever, name="ds-test", daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(5)
    alive = thread.is_alive()
    if alive:
        srv.close()
    # ds.pid names this process: it must be gone before the rundir fixture signals the pid in it.
    assert not os.path.exists(os.path.join(rundir, "ds.pid"))
    assert not alive, "the server thread did not stop"


@pytest.fixture
def client(make_runtime):
    """A host (context 2) runtime that never starts a daemon."""
    return make_runtime(ds_autostart=False)


@pytest.fixture
def endpoint(client):
    with DatagramEndpoint(runtime=client) as ep:
        yield ep


def test_public_group_and_files(server, client, rundir):
    assert ds_client.lookup_status("vmci public group", client) == (C.VMCI_SUCCESS, (2, 1023))
    assert ds_client.lookup(C.VMCI_PUBLIC_GROUP_NAME, client) == PUBLIC_GROUP_HANDLE
    entry = _registry(rundir)["vmci public group"]
    assert entry["handle"] == [2, 1023] and entry["owner"] == 2 and entry["pid"] is None
    with open(os.path.join(rundir, "ds.pid")) as f:
        assert int(f.read()) == os.getpid()
    # Never expires, and no host process may remove it.
    assert ds_client.unregister_status("vmci public group", client) == C.VMCI_ERROR_NO_ACCESS
    assert ds_client.register_status("vmci public group", (2, 5000), client) == C.VMCI_ERROR_ALREADY_EXISTS


def test_register_lookup_unregister(fd_guard, server, client, rundir):
    with DatagramEndpoint(runtime=client) as ep:
        assert ds_client.register_status("svc", ep.handle, client) == C.VMCI_SUCCESS
        assert ds_client.lookup_status("svc", client) == (C.VMCI_SUCCESS, ep.handle)
        assert ds_client.lookup(b"svc", client) == ep.handle
        entry = _registry(rundir)["svc"]
        assert entry["handle"] == list(ep.handle) and entry["owner"] == 2 and entry["pid"] == os.getpid()
        assert ds_client.unregister_status("svc", client) == C.VMCI_SUCCESS
        assert "svc" not in _registry(rundir)
        assert ds_client.lookup_status("svc", client) == (C.VMCI_ERROR_NOT_FOUND, VMCI_INVALID_HANDLE)
        assert ds_client.unregister_status("svc", client) == C.VMCI_ERROR_NOT_FOUND
        ds_client.register("svc", ep.handle, client)
        ds_client.unregister("svc", client)
        with pytest.raises(errors.NotFound, match="svc"):
            ds_client.lookup("svc", client)
        with pytest.raises(errors.NotFound):
            ds_client.unregister("svc", client)


def test_duplicates_and_exact_names(server, client, endpoint):
    assert ds_client.register_status("Svc", endpoint.handle, client) == C.VMCI_SUCCESS
    assert ds_client.register_status("Svc", (2, 4444), client) == C.VMCI_ERROR_ALREADY_EXISTS
    with pytest.raises(errors.AlreadyExists):
        ds_client.register("Svc", (2, 4444), client)
    assert ds_client.lookup_status("svc", client)[0] == C.VMCI_ERROR_NOT_FOUND
    assert ds_client.lookup_status("Svc ", client)[0] == C.VMCI_ERROR_NOT_FOUND
    assert ds_client.lookup_status("Svc", client) == (C.VMCI_SUCCESS, endpoint.handle)


def test_unknown_name_and_invalid_handle(server, client):
    assert ds_client.lookup_status("nobody", client) == (C.VMCI_ERROR_NOT_FOUND, VMCI_INVALID_HANDLE)
    assert ds_client.register_status("bad", VMCI_INVALID_HANDLE, client) == C.VMCI_ERROR_INVALID_ARGS
    assert ds_client.lookup_status("bad", client)[0] == C.VMCI_ERROR_NOT_FOUND


def test_only_the_owner_or_the_host_unregisters(server, client, make_runtime, endpoint):
    guest = make_runtime(cid=5, ds_autostart=False)
    assert ds_client.register_status("host-svc", endpoint.handle, client) == C.VMCI_SUCCESS
    assert ds_client.unregister_status("host-svc", guest) == C.VMCI_ERROR_NO_ACCESS
    with pytest.raises(errors.NoAccess, match="access denied"):
        ds_client.unregister("host-svc", guest)
    assert ds_client.lookup_status("host-svc", guest) == (C.VMCI_SUCCESS, endpoint.handle)
    with DatagramEndpoint(runtime=guest) as guest_ep:
        assert guest_ep.handle.context == 5
        assert ds_client.register_status("guest-a", guest_ep.handle, guest) == C.VMCI_SUCCESS
        assert ds_client.register_status("guest-b", guest_ep.handle, guest) == C.VMCI_SUCCESS
        assert ds_client.unregister_status("guest-a", client) == C.VMCI_SUCCESS  # the host may
        assert ds_client.unregister_status("guest-b", guest) == C.VMCI_SUCCESS  # and the owner


def test_name_limits(server, client):
    name = b"n" * C.VMCI_DS_MAX_NAME_LEN
    assert ds_client.register_status(name, (2, 3000), client) == C.VMCI_SUCCESS
    assert ds_client.lookup_status(name.decode(), client) == (C.VMCI_SUCCESS, (2, 3000))
    assert ds_client.register_status("", (2, 3001), client) == C.VMCI_SUCCESS
    assert ds_client.lookup_status(b"", client) == (C.VMCI_SUCCESS, (2, 3001))


@pytest.mark.parametrize("name", [b"n" * 301, "a\0b", None, 42])
def test_bad_names_never_reach_the_daemon(make_runtime, monkeypatch, name):
    client = make_runtime(ds_autostart=True)

    def no_endpoint(*args, **kwargs):
        raise AssertionError("the client contacted the daemon")

    monkeypatch.setattr(ds_client, "DatagramEndpoint", no_endpoint)
    assert ds_client.lookup_status(name, client) == (C.VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)
    assert ds_client.register_status(name, (2, 3000), client) == C.VMCI_ERROR_INVALID_ARGS
    assert ds_client.unregister_status(name, client) == C.VMCI_ERROR_INVALID_ARGS
    with pytest.raises(errors.InvalidArgs):
        ds_client.lookup(name, client)
    assert ds_client.register_status("ok", (2, 3000, 1), client) == C.VMCI_ERROR_INVALID_ARGS


def test_entry_dies_with_its_endpoint(server, client, rundir):
    ep = DatagramEndpoint(runtime=client)
    assert ds_client.register_status("dg", ep.handle, client) == C.VMCI_SUCCESS
    assert ds_client.register_status("plain", (2, 3000), client) == C.VMCI_SUCCESS  # not an endpoint
    ep.close()
    assert ds_client.lookup_status("dg", client)[0] == C.VMCI_ERROR_NOT_FOUND
    assert ds_client.lookup_status("plain", client) == (C.VMCI_SUCCESS, (2, 3000))
    with DatagramEndpoint(runtime=client) as ep2:
        assert ds_client.register_status("dg", ep2.handle, client) == C.VMCI_SUCCESS


def test_entry_dies_with_its_process(server, client, rundir, core):
    script = ("import sys\nfrom vsockcompat import ds_client\n"
              "sys.exit(-ds_client.register_status('child', (7, 77)))\n")
    env = child_env(rundir, core.NAME, cid=7, VSOCKCOMPAT_DS_AUTOSTART="0")
    done = subprocess.run([PYTHON, "-c", script], env=env, timeout=30, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    # The periodic tick prunes it without any request...
    _wait_for(lambda: "child" not in _registry(rundir), timeout=5)
    # ...and a LOOKUP does not find it.
    assert ds_client.lookup_status("child", client)[0] == C.VMCI_ERROR_NOT_FOUND


def _raw_request(action, msgid, name_len, body):
    return struct.pack("<iiIIi", action, msgid, 0xFFFFFFFF, 0xFFFFFFFF, name_len) + body


@pytest.mark.parametrize("payload, reason", [
    (b"\x00\x00\x00\x00\x2a\x00\x00\x00", "shorter"),
    (_raw_request(0, 42, 0, b""), "past"),
    (_raw_request(0, 42, -1, b"\0" * 8), "negative"),
    (_raw_request(0, 42, 301, b"n" * 301 + b"\0"), "exceeds 300"),
    (_raw_request(0, 42, 100, b"abc\0"), "past"),
    (_raw_request(1, 42, 3, b"a\0c\0"), "NUL inside"),
    (_raw_request(2, 42, 3, b"abcd"), "NUL-terminated"),
])
def test_malformed_requests_get_invalid_args(server, client, endpoint, payload, reason):
    endpoint.send(VMCI_DS_HANDLE, payload)
    dg = endpoint.recv(timeout=5)
    assert dg.src == VMCI_DS_HANDLE
    reply = decode_reply(dg.payload)
    assert (reply.msgid, reply.code, reply.handle) == (42, C.VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)
    assert reason in reply.msg.decode()
    assert server.stats["malformed"] == 1
    assert ds_client.lookup_status("vmci public group", client)[0] == C.VMCI_SUCCESS


@pytest.mark.parametrize("payload", [b"", b"\x01", b"\0" * 7])
def test_requests_without_msgid_are_dropped(server, client, endpoint, payload):
    endpoint.send(VMCI_DS_HANDLE, payload)
    with pytest.raises(errors.Timeout):
        endpoint.recv(timeout=0.3)
    assert server.stats["malformed"] == 1
    assert ds_client.lookup_status("vmci public group", client)[0] == C.VMCI_SUCCESS


def test_unknown_action(server, endpoint):
    endpoint.send(VMCI_DS_HANDLE, _raw_request(9, 7, 1, b"x\0\0\0\0"))
    reply = decode_reply(endpoint.recv(timeout=5).payload)
    assert (reply.msgid, reply.code, reply.msg) == (7, C.VMCI_ERROR_GENERIC, b"unknown action")


def test_garbage_from_many_senders_then_service(server, client, endpoint):
    for i in range(50):
        endpoint.send(VMCI_DS_HANDLE, os.urandom(i * 7))
    deadline = time.monotonic() + 5
    while server.stats["requests"] < 50 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.stats["requests"] == 50
    assert ds_client.lookup_status("vmci public group", client)[0] == C.VMCI_SUCCESS


def test_unbound_raw_socket_is_refused(server, client, rundir):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.settimeout(5)
        raw.connect(os.path.join(rundir, "c1", "1"))
        try:
            raw.send(_raw_request(0, 1, 3, b"abc\0") * 3)
            assert raw.recv(100) == b""  # the daemon closes it unread
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert ds_client.lookup_status("vmci public group", client)[0] == C.VMCI_SUCCESS


def test_second_daemon_is_refused(server, make_runtime, rundir, core):
    with pytest.raises(AlreadyRunning, match="pid %d" % os.getpid()):
        DiscoveryServer(make_runtime(cid=1))
    done = subprocess.run(DAEMON, env=child_env(rundir, core.NAME), timeout=30, capture_output=True)
    assert done.returncode == 1
    assert b"already serves" in done.stderr


def test_daemon_process_exits_cleanly_on_sigterm(rundir, core, client):
    log = open(os.path.join(rundir, "test-ds.log"), "wb")
    with log, subprocess.Popen(DAEMON, env=child_env(rundir, core.NAME), stderr=log) as proc:
        try:
            _wait_for(lambda: client.transport.endpoint_alive(VMCI_DS_HANDLE))
            assert ds_client.lookup_status("vmci public group", client)[0] == C.VMCI_SUCCESS
            with open(os.path.join(rundir, "ds.pid")) as f:
                assert int(f.read()) == proc.pid
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            proc.kill()
    assert not os.path.exists(os.path.join(rundir, "ds.pid"))
    assert not os.path.exists(os.path.join(rundir, "ds.registry.json"))
    assert not client.transport.endpoint_alive(VMCI_DS_HANDLE)
    with open(os.path.join(rundir, "test-ds.log"), "rb") as f:
        assert b"LOOKUP b'vmci public group'" in f.read()


def test_autostart_starts_one_daemon_for_concurrent_clients(make_runtime, rundir, core, spawned_daemons):
    spawned = spawned_daemons
    runtimes = [make_runtime(), make_runtime()]
    barrier = threading.Barrier(2)
    results = [None, None]

    def call(i):
        barrier.wait(5)
        results[i] = ds_client.lookup_status("vmci public group", runtimes[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [(C.VMCI_SUCCESS, PUBLIC_GROUP_HANDLE)] * 2
    assert len(spawned) == 1
    with open(os.path.join(rundir, "ds.pid")) as f:
        daemon = psutil.Process(int(f.read()))
    assert daemon.pid == spawned[0].pid
    assert daemon.environ()["VSOCKCOMPAT_NO_EXTENSIONS"] == ("1" if core.NAME == "pure" else "0")
    assert "--idle-exit" in daemon.cmdline()
    assert os.path.exists(os.path.join(rundir, "ds.log"))
    # The rundir fixture stops it through ds.pid.


def test_idle_exit(make_runtime, client, endpoint):
    srv = DiscoveryServer(make_runtime(cid=1), idle_exit=0.3, tick=0.05)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        assert ds_client.register_status("live", endpoint.handle, client) == C.VMCI_SUCCESS
        thread.join(0.8)
        assert thread.is_alive()  # a live entry keeps it running
        assert ds_client.unregister_status("live", client) == C.VMCI_SUCCESS
        thread.join(5)
        assert not thread.is_alive()
    finally:
        srv.stop()
        thread.join(5)


class FakeDaemon:
    """An endpoint on (1, 1) that answers each request with ``respond(src, request)``."""

    def __init__(self, make_runtime, respond):
        self.runtime = make_runtime(cid=1)
        self.ep = DatagramEndpoint(1, runtime=self.runtime)
        self.ep.on_receive(lambda dg: respond(self, dg.src, decode_request(dg.payload)))

    def close(self):
        self.ep.close()


@pytest.fixture
def fake_daemon(make_runtime):
    daemons = []

    def make(respond):
        daemons.append(FakeDaemon(make_runtime, respond))
        return daemons[-1]

    yield make
    for d in daemons:
        d.close()


def test_reply_timeout(fake_daemon, client):
    fake_daemon(lambda fake, src, req: None)  # never answers
    t0 = time.monotonic()
    assert ds_client.lookup_status("x", client, timeout=0.4) == (C.VMCI_ERROR_TIMEOUT, VMCI_INVALID_HANDLE)
    assert 0.3 < time.monotonic() - t0 < 3
    with pytest.raises(errors.Timeout):
        ds_client.register("x", (2, 3000), client, timeout=0.2)


def test_stray_replies_are_ignored(fake_daemon, client):
    def respond(fake, src, req):
        with DatagramEndpoint(runtime=fake.runtime) as other:  # (1, >= 1024): not the service
            other.send(src, encode_reply(req.msgid, C.VMCI_SUCCESS, (2, 1)))
        fake.ep.send(src, encode_reply(req.msgid + 1, C.VMCI_SUCCESS, (2, 2)))
        fake.ep.send(src, encode_reply(req.msgid, C.VMCI_SUCCESS, (2, 3)))

    fake_daemon(respond)
    assert ds_client.lookup_status("x", client, timeout=5) == (C.VMCI_SUCCESS, (2, 3))


@pytest.mark.parametrize("tail, code", [(b"m" * 300 + b"\0", C.VMCI_ERROR_PAYLOAD_TOO_LARGE),
                                        (b"", C.VMCI_ERROR_GENERIC)])
def test_malformed_replies(fake_daemon, client, tail, code):
    def respond(fake, src, req):
        header = struct.pack("<iiIIi", req.msgid, C.VMCI_SUCCESS, 2, 9, len(tail) - 1)
        fake.ep.send(src, header + tail)

    fake_daemon(respond)
    assert ds_client.lookup_status("x", client, timeout=5) == (code, VMCI_INVALID_HANDLE)


def test_msgids_count_up():
    first = ds_client._next_msgid()
    assert ds_client._next_msgid() == first + 1


def test_stopped_daemon_process_times_out(rundir, core, client):
    with subprocess.Popen(DAEMON + ["--quiet"], env=child_env(rundir, core.NAME)) as proc:
        try:
            _wait_for(lambda: client.transport.endpoint_alive(VMCI_DS_HANDLE))
            proc.send_signal(signal.SIGSTOP)
            assert ds_client.lookup_status("vmci public group", client, timeout=0.3)[0] == C.VMCI_ERROR_TIMEOUT
            proc.send_signal(signal.SIGCONT)
            assert ds_client.lookup_status("vmci public group", client, timeout=5)[0] == C.VMCI_SUCCESS
            proc.terminate()
            assert proc.wait(10) == 0
        finally:
            proc.kill()


def test_many_requests_do_not_grow_the_daemon(server, client, rundir):
    for _ in range(30):
        ds_client.lookup_status("x", client)
    link_files = lambda: [n for n in os.listdir(os.path.join(rundir, "c1")) if "-" in n]  # noqa: E731
    _wait_for(lambda: not link_files(), timeout=5)
