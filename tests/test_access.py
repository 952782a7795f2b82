"""Access control end to end on the local transport, on both cores: the issue 6 matrix.

For datagrams, queue pairs, shared memory and discovery: each allowed
interaction works, each denied one fails with the SDK code, and a sender that
bypasses the library still cannot get a datagram delivered.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import PYTHON, child_env
from vsockcompat import constants as C
from vsockcompat import ds_client, errors
from vsockcompat.cli import _info_data
from vsockcompat.datagram import Datagram, DatagramEndpoint
from vsockcompat.ds_server import DiscoveryServer
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle
from vsockcompat.policy import PolicyError
from vsockcompat.queuepair import QueuePair
from vsockcompat.sdk import VMCILibrary

pytestmark = pytest.mark.timeout(60)
DG_SEND, SM_ATTACH = C.VMCI_PRIV_DG_SEND, C.VMCI_PRIV_SM_ATTACH


def write_policy(rundir, text):
    os.makedirs(rundir, exist_ok=True)
    with open(os.path.join(rundir, "policy.toml"), "w") as f:
        f.write(text)


@pytest.fixture
def libs(make_runtime):
    """``libs(cid)``: an initialised VMCILibrary of context ``cid`` (cleaned up after the test)."""
    made = []

    def make(cid, **settings):
        lib = VMCILibrary(make_runtime(cid=cid, ds_autostart=False, **settings))
        assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
        made.append(lib)
        return lib

    yield make
    for lib in made:
        lib.VMCI_CleanupApp()


def recv_nothing(lib, handle, timeout=0.3):
    """True if nothing arrives at ``handle`` within ``timeout``."""
    ep = lib._endpoints[handle]
    with pytest.raises(errors.Timeout):
        ep.recv(timeout=timeout)
    return True


# Datagrams and DG_SEND

def test_a_denied_sender_gets_no_access_and_the_receiver_sees_nothing(libs):
    host, guest = libs(2), libs(3)
    server, client = host.VMCIDatagram_CreateHnd(0), guest.VMCIDatagram_CreateHnd(0)
    assert guest.VMCIDatagram_SendTo(server, client, 5, b"first") > 0
    assert host.VMCIDatagram_RecvFrom(server, bytearray(64))[0] == 5
    # The client's link is cached: the denial must still reach it before the next datagram.
    assert host.VMCIResource_AddClientPrivileges(server, (3, 0), [], [DG_SEND]) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 6, b"denied") == C.VMCI_ERROR_NO_ACCESS
    assert recv_nothing(host, server)
    assert host.VMCIResource_CheckClientPrivilege(server, client, DG_SEND) == C.VMCI_ERROR_NO_ACCESS
    # The client's own handle setting beats its context's.
    assert host.VMCIResource_AddClientPrivileges(server, client, [DG_SEND], []) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 5, b"again") > 0
    rv, src = host.VMCIDatagram_RecvFrom(server, bytearray(64))
    assert (rv, src) == (5, client)
    other = guest.VMCIDatagram_CreateHnd(0)
    assert guest.VMCIDatagram_SendTo(server, other, 5, b"other") == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIResource_RemoveAllClientPrivileges(server, (3, 0)) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, other, 5, b"other") > 0
    assert host.VMCIDatagram_RecvFrom(server, bytearray(64)) == (5, other)


def test_public_group_and_own_groups_decide_in_order(libs):
    host, guest = libs(2), libs(3)
    server, client = host.VMCIDatagram_CreateHnd(0), guest.VMCIDatagram_CreateHnd(0)
    public = (2, 1023)
    assert host.VMCIResource_AddClientPrivileges(server, public, [], [DG_SEND]) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 1, b"x") == C.VMCI_ERROR_NO_ACCESS
    friends = host.VMCIGroup_Create()
    assert friends.context == 2 and friends.resource >= 1024
    assert host.VMCIGroup_AddMember(friends, (3, 0), False) == C.VMCI_SUCCESS
    assert host.VMCIGroup_IsMember(friends, (3, 0)) and not host.VMCIGroup_IsMember(friends, (4, 0))
    assert host.VMCIResource_AddClientPrivileges(server, friends, [DG_SEND], []) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 1, b"x") > 0
    assert host.VMCIDatagram_RecvFrom(server, bytearray(8)) == (1, client)
    assert host.VMCIGroup_RemoveMember(friends, (3, 0)) == C.VMCI_SUCCESS
    assert host.VMCIResource_CheckClientPrivilege(server, client, DG_SEND) == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIGroup_Destroy(friends) == C.VMCI_SUCCESS
    assert host.VMCIGroup_IsMember(friends, (3, 0)) is False
    assert host.VMCIGroup_AddMember(friends, (3, 0), True) == C.VMCI_ERROR_INVALID_ARGS


def test_a_revocation_reaches_a_sender_in_another_process(libs, rundir, core):
    host = libs(2)
    server = host.VMCIDatagram_CreateHnd(0)
    script = (
        "import sys, vsockcompat as v\n"
        "assert v.VMCI_InitApp() == 0\n"
        "me = v.VMCIDatagram_CreateHnd(0)\n"
        "dst = v.VMCIHandle(2, %d)\n"
        "for line in sys.stdin:\n"
        "    print(v.VMCIDatagram_SendTo(dst, me, 2, b'hi'), flush=True)\n" % server.resource)
    child = subprocess.Popen([PYTHON, "-c", script], env=child_env(rundir, core.NAME, cid=3,
                                                                   VSOCKCOMPAT_DS_AUTOSTART="0"),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        def send():
            child.stdin.write("go\n")
            child.stdin.flush()
            return int(child.stdout.readline())

        assert send() > 0
        assert host.VMCIDatagram_RecvFrom(server, bytearray(8))[0] == 2
        assert host.VMCIResource_AddClientPrivileges(server, (3, 0), [], [DG_SEND]) == C.VMCI_SUCCESS
        assert send() == C.VMCI_ERROR_NO_ACCESS
        assert host.VMCIResource_AddClientPrivileges(server, (3, 0), [DG_SEND], []) == C.VMCI_SUCCESS
        assert send() > 0
        assert host.VMCIDatagram_RecvFrom(server, bytearray(8))[0] == 2
    finally:
        child.stdin.close()
        assert child.wait(timeout=30) == 0
        child.stdout.close()


def test_a_sender_that_bypasses_the_library_is_still_refused(runtime, make_runtime, rundir):
    guest_rt = make_runtime(cid=3)
    with DatagramEndpoint(runtime=runtime) as victim, DatagramEndpoint(runtime=guest_rt) as denied:
        lib = VMCILibrary(runtime)
        assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
        assert lib.VMCIResource_AddClientPrivileges(victim.handle, (3, 0), [], [DG_SEND]) == C.VMCI_SUCCESS
        with pytest.raises(errors.NoAccess):
            denied.send(victim.handle, b"through the library")
        # A raw socket bound where the denied endpoint's link would be: a true identity,
        # a well-formed frame, and no right to deliver it.
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.bind(os.path.join(rundir, "c3/%d-2.%d" % (denied.handle.resource, victim.handle.resource)))
        raw.connect(os.path.join(rundir, "c2/%d" % victim.handle.resource))
        raw.send(runtime.core.encode_datagram(2, victim.handle.resource, 3, denied.handle.resource, b"raw"))
        buf = bytearray(64)
        with pytest.raises(errors.Timeout):
            victim.recv_into(buf, timeout=0.3)
        assert victim.stats.denied == 1
        assert b"raw" not in buf
        raw.close()
        with DatagramEndpoint(runtime=runtime) as friend:
            friend.send(victim.handle, b"still serving")
            assert victim.recv(timeout=5) == Datagram(friend.handle, b"still serving")
        lib.VMCI_CleanupApp()


def test_a_forged_source_context_from_a_raw_socket_is_refused(runtime, make_runtime, rundir):
    guest_rt = make_runtime(cid=3)
    with DatagramEndpoint(runtime=runtime) as victim, DatagramEndpoint(runtime=guest_rt) as liar:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.bind(os.path.join(rundir, "c3/%d-2.%d" % (liar.handle.resource, victim.handle.resource)))
        raw.connect(os.path.join(rundir, "c2/%d" % victim.handle.resource))
        raw.send(runtime.core.encode_datagram(2, victim.handle.resource, 2, 1, b"I am the host"))
        with pytest.raises(errors.Timeout):
            victim.recv(timeout=0.3)
        assert victim.stats.forged == 1
        raw.close()


def test_a_client_that_changes_its_claimed_context_mid_connection_is_cut_off(runtime, make_runtime, rundir):
    guest_rt = make_runtime(cid=3)
    with DatagramEndpoint(runtime=runtime) as victim, DatagramEndpoint(runtime=guest_rt) as turncoat:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.bind(os.path.join(rundir, "c3/%d-2.%d" % (turncoat.handle.resource, victim.handle.resource)))
        raw.connect(os.path.join(rundir, "c2/%d" % victim.handle.resource))
        encode = runtime.core.encode_datagram
        raw.send(encode(2, victim.handle.resource, 3, turncoat.handle.resource, b"honest"))
        raw.send(encode(2, victim.handle.resource, 4, turncoat.handle.resource, b"now context 4"))
        raw.send(encode(2, victim.handle.resource, 3, turncoat.handle.resource, b"after the lie"))
        assert victim.recv(timeout=5) == Datagram(turncoat.handle, b"honest")
        with pytest.raises(errors.Timeout):
            victim.recv(timeout=0.3)
        assert victim.stats.forged == 1
        raw.settimeout(5)
        try:
            closed = raw.recv(16) == b""
        except ConnectionResetError:  # closed with the last frame unread
            closed = True
        assert closed, "the receiver keeps the connection of a sender that lied"
        raw.close()


# Context flags

RESTRICTED_3 = """
[contexts.3]
flags = ["restricted"]

[contexts.4]
flags = ["trusted"]
"""


def test_a_restricted_context_talks_only_to_trusted_ones(libs, rundir):
    write_policy(rundir, RESTRICTED_3)
    host, restricted, trusted = libs(2), libs(3), libs(4)
    h, r, t = (lib.VMCIDatagram_CreateHnd(0) for lib in (host, restricted, trusted))
    assert restricted.VMCIDatagram_SendTo(h, r, 1, b"x") == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIDatagram_SendTo(r, h, 1, b"x") == C.VMCI_ERROR_NO_ACCESS
    assert restricted.VMCIDatagram_SendTo(t, r, 1, b"x") > 0
    assert trusted.VMCIDatagram_RecvFrom(t, bytearray(4)) == (1, r)
    assert trusted.VMCIDatagram_SendTo(r, t, 1, b"y") > 0
    assert restricted.VMCIDatagram_RecvFrom(r, bytearray(4)) == (1, t)
    assert host.VMCIDatagram_SendTo(t, h, 1, b"z") > 0


def test_restricted_contexts_are_refused_by_receivers_too(runtime, make_runtime, rundir):
    write_policy(rundir, RESTRICTED_3)
    with DatagramEndpoint(runtime=runtime) as host, DatagramEndpoint(runtime=make_runtime(cid=3)) as guest:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.bind(os.path.join(rundir, "c3/%d-2.%d" % (guest.handle.resource, host.handle.resource)))
        raw.connect(os.path.join(rundir, "c2/%d" % host.handle.resource))
        raw.send(runtime.core.encode_datagram(2, host.handle.resource, 3, guest.handle.resource, b"r"))
        with pytest.raises(errors.Timeout):
            host.recv(timeout=0.3)
        assert host.stats.denied == 1
        raw.close()


def test_queue_pair_attach_follows_the_flags(make_runtime, rundir):
    write_policy(rundir, RESTRICTED_3)
    host, restricted, trusted = make_runtime(cid=2), make_runtime(cid=3), make_runtime(cid=4)
    with QueuePair.alloc(None, 4096, 4096, C.VMCI_INVALID_ID, 0, runtime=host) as pair:
        with pytest.raises(errors.NoAccess):
            QueuePair.alloc(pair.handle, 4096, 4096, C.VMCI_INVALID_ID, 0, runtime=restricted)
        with QueuePair.alloc(pair.handle, 4096, 4096, C.VMCI_INVALID_ID, 0, runtime=trusted) as other:
            assert other.enqueue(b"ok") == 2
            assert pair.dequeue(2) == b"ok"
    with QueuePair.alloc(None, 4096, 4096, C.VMCI_INVALID_ID, 0, runtime=trusted) as pair:
        with QueuePair.alloc(pair.handle, 4096, 4096, C.VMCI_INVALID_ID, 0, runtime=restricted) as other:
            assert other.enqueue(b"ok") == 2


def test_shared_memory_attach_follows_flags_and_sm_attach(libs, rundir):
    write_policy(rundir, RESTRICTED_3)
    host, restricted, trusted, plain = libs(2), libs(3), libs(4), libs(5)
    handle, view = host.VMCISharedMem_Create(128)
    assert view is not None
    assert restricted.VMCISharedMem_Attach(handle, 128) == (C.VMCI_ERROR_NO_ACCESS, None)
    rv, seen = trusted.VMCISharedMem_Attach(handle, 128)
    assert rv == C.VMCI_SUCCESS and len(seen) == 128
    assert host.VMCIResource_AddClientPrivileges(handle, (5, 0), [], [SM_ATTACH]) == C.VMCI_SUCCESS
    assert plain.VMCISharedMem_Attach(handle, 128) == (C.VMCI_ERROR_NO_ACCESS, None)
    assert host.VMCIResource_AddClientPrivileges(handle, (5, 0), [], [DG_SEND]) == C.VMCI_ERROR_INVALID_PRIV
    assert host.VMCIResource_AddClientPrivileges(handle, (5, 0), [SM_ATTACH], []) == C.VMCI_SUCCESS
    rv, seen = plain.VMCISharedMem_Attach(handle, 128)
    assert rv == C.VMCI_SUCCESS
    view[:4] = b"seen"
    assert bytes(seen[:4]) == b"seen"


@pytest.mark.parametrize("mode", ["shared", "mirrored"])
def test_sm_attach_denied_after_attach_binds_the_next_attach(libs, mode):
    host, plain = libs(2, shm_mode=mode), libs(5, shm_mode=mode)
    handle, view = host.VMCISharedMem_Create(128)
    rv, seen = plain.VMCISharedMem_Attach(handle, 128)
    assert rv == C.VMCI_SUCCESS
    assert host.VMCIResource_AddClientPrivileges(handle, (5, 0), [], [SM_ATTACH]) == C.VMCI_SUCCESS
    view[:5] = b"still"                       # the attached client keeps its view, and its updates
    deadline = time.monotonic() + 20
    while bytes(seen[:5]) != b"still" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert bytes(seen[:5]) == b"still"
    seen.release()
    assert plain.VMCISharedMem_Detach(handle) == C.VMCI_SUCCESS
    assert plain.VMCISharedMem_Attach(handle, 128) == (C.VMCI_ERROR_NO_ACCESS, None)


# Discovery

@pytest.fixture
def discovery(make_runtime):
    def start():
        srv = DiscoveryServer(make_runtime(cid=1), tick=0.05)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        started.append((srv, thread))
        return srv

    started = []
    yield start
    for srv, thread in started:
        srv.stop()
        thread.join(5)


def test_discovery_strict_rule_lets_only_trusted_contexts_register(discovery, make_runtime, rundir):
    write_policy(rundir, '[discovery]\nregister = "trusted"\n\n[contexts.4]\nflags = ["trusted"]\n')
    srv = discovery()
    plain, trusted = make_runtime(cid=2, ds_autostart=False), make_runtime(cid=4, ds_autostart=False)
    with DatagramEndpoint(runtime=plain) as p, DatagramEndpoint(runtime=trusted) as t:
        assert ds_client.register_status("plain", p.handle, plain) == C.VMCI_ERROR_NO_ACCESS
        assert ds_client.register_status("trusted", t.handle, trusted) == C.VMCI_SUCCESS
        assert ds_client.lookup_status("trusted", plain) == (C.VMCI_SUCCESS, t.handle)
        assert ds_client.unregister_status("trusted", plain) == C.VMCI_ERROR_NO_ACCESS
        assert ds_client.unregister_status("trusted", trusted) == C.VMCI_SUCCESS
    assert srv.stats["denied"] == 2


def test_discovery_is_permissive_by_default_and_reachable_when_restricted(discovery, make_runtime, rundir):
    write_policy(rundir, RESTRICTED_3)
    discovery()
    restricted = make_runtime(cid=3, ds_autostart=False)
    with DatagramEndpoint(runtime=restricted) as r:
        assert ds_client.register_status("restricted", r.handle, restricted) == C.VMCI_SUCCESS
        assert ds_client.lookup_status("restricted", restricted) == (C.VMCI_SUCCESS, r.handle)


def test_the_register_setting_overrides_the_policy(discovery, make_runtime, rundir, monkeypatch):
    srv_runtime = make_runtime(cid=1)
    srv_runtime.settings = srv_runtime.settings._replace(ds_register="trusted")
    srv = DiscoveryServer(srv_runtime, tick=0.05)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        client = make_runtime(cid=2, ds_autostart=False)
        with DatagramEndpoint(runtime=client) as ep:
            assert ds_client.register_status("x", ep.handle, client) == C.VMCI_ERROR_NO_ACCESS
    finally:
        srv.stop()
        thread.join(5)


# The policy as the operator sets it

def test_the_daemon_refuses_to_start_on_a_malformed_policy(rundir, core):
    write_policy(rundir, '[contexts.3]\nflags = ["restricted", "godmode"]\n')
    run = subprocess.run([PYTHON, "-m", "vsockcompat", "ds"], env=child_env(rundir, core.NAME),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert run.returncode == 1
    assert "policy.toml:2: unknown flag 'godmode'" in run.stderr
    assert not os.path.exists(os.path.join(rundir, "ds.pid"))


def test_init_app_fails_closed_on_a_malformed_policy(make_runtime, rundir):
    write_policy(rundir, "[contexts.3\n")
    lib = VMCILibrary(make_runtime(cid=2))
    assert lib.VMCI_InitApp() == C.VMCI_ERROR_NO_ACCESS
    with pytest.raises(PolicyError):
        DatagramEndpoint(runtime=make_runtime(cid=2))


def test_a_context_reserved_for_another_user_cannot_be_taken(make_runtime, rundir):
    write_policy(rundir, "[contexts.3]\nuid = %d\n" % (os.getuid() + 1))
    lib = VMCILibrary(make_runtime(cid=3))
    assert lib.VMCI_InitApp() == C.VMCI_ERROR_NO_ACCESS
    with pytest.raises(errors.NoAccess):
        DatagramEndpoint(runtime=make_runtime(cid=3))
    with DatagramEndpoint(runtime=make_runtime(cid=2)):
        pass


def test_the_policy_setting_names_the_file(rundir, tmp_path, core):
    policy = tmp_path / "elsewhere.toml"
    policy.write_text('[contexts.2]\nflags = ["trusted"]\n')
    env = child_env(rundir, core.NAME, VSOCKCOMPAT_POLICY=str(policy), VSOCKCOMPAT_DS_AUTOSTART="0")
    out = subprocess.run([PYTHON, "-m", "vsockcompat", "info", "--json"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    access = json.loads(out.stdout)["access"]
    assert access["policy"]["path"] == str(policy)
    assert access["policy"]["contexts"]["2"]["flags"] == ["trusted"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_user_cannot_impersonate_a_context(runtime, rundir, core):
    """Even with the context directory opened to everyone, the receiver checks the peer's user."""
    with DatagramEndpoint(runtime=runtime) as victim:
        cdir = os.path.join(rundir, "c2")
        for path in (rundir, cdir, os.path.join(cdir, "%d" % victim.handle.resource)):
            os.chmod(path, 0o777)  # every permission loosened: only the peer check is left
        script = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "s.bind(%r)\n"
            "s.connect(%r)\n"
            "s.send(bytes.fromhex(sys.argv[1]))\n"
            "s.close()\n" % (os.path.join(cdir, "7777-2.%d" % victim.handle.resource),
                             os.path.join(cdir, "%d" % victim.handle.resource)))
        frame = runtime.core.encode_datagram(2, victim.handle.resource, 2, 7777, b"impostor")
        run = subprocess.run([sys.executable, "-c", script, bytes(frame).hex()], timeout=30,
                             stderr=subprocess.PIPE, text=True)
        if run.returncode != 0 and "Permission" in run.stderr:
            pytest.skip("user 65534 cannot reach the runtime directory here: %s" % run.stderr.strip()[-200:])
        assert run.returncode == 0, run.stderr
        with pytest.raises(errors.Timeout):
            victim.recv(timeout=0.3)
        assert victim.stats.refused_connections == 1


# Bad input to the access-control calls

def test_bad_input_to_the_access_control_calls(libs, runtime):
    host, guest = libs(2), libs(3)
    server, client = host.VMCIDatagram_CreateHnd(0), guest.VMCIDatagram_CreateHnd(0)
    add, remove = host.VMCIResource_AddClientPrivileges, host.VMCIResource_RemoveClientPrivileges
    assert add(server, client, [], []) == C.VMCI_ERROR_INVALID_ARGS
    assert add(server, client, [99]) == C.VMCI_ERROR_INVALID_PRIV
    assert add(server, client, [C.VMCI_PRIV_ASSIGN_CLIENT]) == C.VMCI_ERROR_INVALID_PRIV
    assert add(server, VMCI_INVALID_HANDLE, [DG_SEND]) == C.VMCI_ERROR_INVALID_ARGS
    assert add((2, 99999), client, [DG_SEND]) == C.VMCI_ERROR_INVALID_ARGS, "no such resource"
    assert add(server, "client", [DG_SEND]) == C.VMCI_ERROR_INVALID_ARGS
    assert guest.VMCIResource_AddClientPrivileges(server, client, [DG_SEND]) == C.VMCI_ERROR_NO_ACCESS, \
        "a foreign resource"
    assert remove(server, client, [DG_SEND]) == C.VMCI_ERROR_INVALID_ARGS, "no privileges set"
    assert remove(server, client, "x") == C.VMCI_ERROR_INVALID_ARGS
    assert host.VMCIResource_RemoveAllClientPrivileges(server, client) == C.VMCI_ERROR_INVALID_ARGS
    check = host.VMCIResource_CheckClientPrivilege
    assert check(server, client, DG_SEND) == C.VMCI_ERROR_INVALID_PRIV, "not set"
    assert check(server, client, 99) == C.VMCI_ERROR_INVALID_PRIV
    assert check(server, client, "4") == C.VMCI_ERROR_INVALID_ARGS
    assert check(server, client, C.VMCI_PRIV_SM_ATTACH) == C.VMCI_ERROR_INVALID_PRIV
    assert check(server, (2, 0), C.VMCI_PRIV_CH_PRIV) == C.VMCI_SUCCESS_ACCESS_GRANTED
    assert check((2, 99999), client, DG_SEND) == C.VMCI_ERROR_INVALID_ARGS
    # Groups
    public = (2, 1023)
    assert host.VMCIGroup_AddMember(public, client) == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIGroup_Destroy(public) == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIGroup_IsMember(public, client) is True
    assert host.VMCIGroup_AddMember((2, 99999), client) == C.VMCI_ERROR_INVALID_ARGS
    assert host.VMCIGroup_AddMember(VMCI_INVALID_HANDLE, client) == C.VMCI_ERROR_INVALID_ARGS
    group = host.VMCIGroup_Create()
    assert host.VMCIGroup_AddMember(group, VMCI_INVALID_HANDLE) == C.VMCI_ERROR_INVALID_ARGS
    assert host.VMCIGroup_AddMember(group, client, "yes") == C.VMCI_ERROR_INVALID_ARGS
    assert host.VMCIGroup_RemoveMember(group, client) == C.VMCI_ERROR_INVALID_ARGS
    assert guest.VMCIGroup_AddMember(group, client) == C.VMCI_ERROR_NO_ACCESS, "another context's group"
    assert host.VMCIGroup_AddMember(group, (3, 0), True) == C.VMCI_SUCCESS
    assert guest.VMCIGroup_AddMember(group, client) == C.VMCI_SUCCESS, "a member that can assign"
    assert guest.VMCIGroup_Destroy(group) == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIGroup_IsMember(group, "x") is False
    # Before VMCI_InitApp
    fresh = VMCILibrary(runtime)
    assert fresh.VMCIResource_AddClientPrivileges(server, client, [DG_SEND]) == C.VMCI_ERROR_UNAVAILABLE
    assert fresh.VMCIResource_RemoveClientPrivileges(server, client, [DG_SEND]) == C.VMCI_ERROR_UNAVAILABLE
    assert fresh.VMCIResource_RemoveAllClientPrivileges(server, client) == C.VMCI_ERROR_UNAVAILABLE
    assert fresh.VMCIResource_CheckClientPrivilege(server, client, DG_SEND) == C.VMCI_ERROR_UNAVAILABLE
    assert fresh.VMCIGroup_Create() == VMCI_INVALID_HANDLE
    assert fresh.VMCIGroup_AddMember(group, client) == C.VMCI_ERROR_UNAVAILABLE
    assert fresh.VMCIGroup_IsMember(public, client) is False


def test_privileges_die_with_their_resource(libs, rundir):
    host, guest = libs(2), libs(3)
    server = host.VMCIDatagram_CreateHnd(5000)
    client = guest.VMCIDatagram_CreateHnd(0)
    assert host.VMCIResource_AddClientPrivileges(server, (3, 0), [], [DG_SEND]) == C.VMCI_SUCCESS
    assert host.VMCIDatagram_DestroyHnd(server) == C.VMCI_SUCCESS
    again = host.VMCIDatagram_CreateHnd(5000)
    assert again == server
    assert guest.VMCIDatagram_SendTo(again, client, 1, b"x") > 0, "the old denial died with the old handle"


def test_damaged_privileges_fail_closed(libs, rundir):
    host, guest = libs(2), libs(3)
    server, client = host.VMCIDatagram_CreateHnd(0), guest.VMCIDatagram_CreateHnd(0)
    with open(os.path.join(rundir, "c2", "%d.acl" % server.resource), "w") as f:
        f.write("not a privileges file\n")
    assert guest.VMCIDatagram_SendTo(server, client, 1, b"x") == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIDatagram_SendTo(server, server, 1, b"x") == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIResource_AddClientPrivileges(server, client, [DG_SEND], []) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 1, b"x") > 0, "a fresh setting replaces the damage"


def test_a_membership_change_reaches_cached_links(libs):
    host, guest = libs(2), libs(3)
    server, client = host.VMCIDatagram_CreateHnd(0), guest.VMCIDatagram_CreateHnd(0)
    blocked = host.VMCIGroup_Create()
    assert host.VMCIResource_AddClientPrivileges(server, blocked, [], [DG_SEND]) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 1, b"x") > 0, "not a member yet"
    assert host.VMCIDatagram_RecvFrom(server, bytearray(4)) == (1, client)
    assert host.VMCIGroup_AddMember(blocked, (3, 0)) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 1, b"x") == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIGroup_RemoveMember(blocked, (3, 0)) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 1, b"y") > 0
    assert host.VMCIDatagram_RecvFrom(server, bytearray(4)) == (1, client)
    assert host.VMCIGroup_AddMember(blocked, client) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 1, b"x") == C.VMCI_ERROR_NO_ACCESS
    assert host.VMCIGroup_Destroy(blocked) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server, client, 1, b"z") > 0


def test_damaged_region_privileges_fail_closed(libs, rundir):
    host, guest = libs(2), libs(3)
    handle, view = host.VMCISharedMem_Create(64)
    with open(os.path.join(rundir, "c2", "%d.acl" % handle.resource), "w") as f:
        f.write("vsockcompat-acl 1 sharedmem\n3 0 +6 allow\n")
    assert guest.VMCISharedMem_Attach(handle, 64) == (C.VMCI_ERROR_NO_ACCESS, None)
    assert host.VMCIResource_AddClientPrivileges(handle, (3, 0), [SM_ATTACH], []) == C.VMCI_SUCCESS
    rv, seen = guest.VMCISharedMem_Attach(handle, 64)
    assert rv == C.VMCI_SUCCESS and len(seen) == 64


def test_a_group_dies_with_its_creator(rundir, core, make_runtime):
    script = ("import vsockcompat as v\nassert v.VMCI_InitApp() == 0\n"
              "g = v.VMCIGroup_Create()\nprint(g.resource, flush=True)\n")
    run = subprocess.run([PYTHON, "-c", script], env=child_env(rundir, core.NAME, VSOCKCOMPAT_DS_AUTOSTART="0"),
                         stdout=subprocess.PIPE, text=True, timeout=60)
    group = VMCIHandle(2, int(run.stdout))
    lib = VMCILibrary(make_runtime(cid=2))
    assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
    assert lib.VMCIGroup_AddMember(group, (3, 0)) == C.VMCI_ERROR_INVALID_ARGS
    assert lib.VMCIDatagram_CreateHnd(group.resource) == group, "its id is free again"
    lib.VMCI_CleanupApp()


def test_info_shows_flags_resources_and_privileges(libs, rundir, monkeypatch):
    write_policy(rundir, RESTRICTED_3)
    host = libs(2)
    server = host.VMCIDatagram_CreateHnd(0)
    assert host.VMCIResource_AddClientPrivileges(server, (4, 0), [DG_SEND], []) == C.VMCI_SUCCESS
    group = host.VMCIGroup_Create()
    assert host.VMCIGroup_AddMember(group, (4, 0), True) == C.VMCI_SUCCESS
    libs(3).VMCIDatagram_CreateHnd(0)
    import vsockcompat.runtime as runtime_module
    monkeypatch.setattr(runtime_module, "_default", host.runtime)
    access = _info_data()["access"]
    assert access["contexts"]["3"]["flags"] == ["restricted"]
    assert access["contexts"]["2"]["uid"] == os.getuid()
    resource = [r for r in access["contexts"]["2"]["resources"] if r["handle"] == list(server)][0]
    assert resource["kind"] == "datagram"
    assert resource["privileges"] == [{"client": [4, 0], "privileges": {"DG_SEND": "allow"}}]
    assert access["groups"] == [{"handle": list(group), "owner": 2, "members": [[[4, 0], True]]}]
    assert access["public_group"] == [2, 1023]


def test_a_busy_sender_is_stopped_by_a_denial(libs):
    """A denial lands between two datagrams of a sender that never pauses."""
    host, guest = libs(2), libs(3)
    server, client = host.VMCIDatagram_CreateHnd(0), guest.VMCIDatagram_CreateHnd(0)
    results = []
    stop = threading.Event()

    def blast():
        while not stop.is_set():
            rc = guest.VMCIDatagram_SendTo(server, client, 1, b"x")
            results.append(rc)
            if rc == C.VMCI_ERROR_NO_ACCESS:
                return
            if rc == C.VMCI_ERROR_NO_RESOURCES:
                time.sleep(0.001)

    thread = threading.Thread(target=blast)
    thread.start()
    buf = bytearray(4)
    while len(results) < 50:
        host.VMCIDatagram_RecvFrom(server, buf)
    assert host.VMCIResource_AddClientPrivileges(server, (3, 0), [], [DG_SEND]) == C.VMCI_SUCCESS
    thread.join(10)
    stop.set()
    assert results[-1] == C.VMCI_ERROR_NO_ACCESS


def test_a_queue_pair_creator_cuts_off_an_attacher_that_lies_about_its_context(make_runtime, rundir,
                                                                              monkeypatch):
    host, liar_rt, honest_rt = make_runtime(cid=2), make_runtime(cid=4), make_runtime(cid=3)
    liar_transport, honest_transport = liar_rt.transport, honest_rt.transport
    # Context 4's library, but its doorbell is bound where context 3's would be.
    monkeypatch.setattr(liar_transport, "bind_in_context", honest_transport.bind_in_context)
    with QueuePair.alloc(None, 4096, 4096, C.VMCI_INVALID_ID, 0, runtime=host) as pair:
        liar = QueuePair.alloc(pair.handle, 4096, 4096, C.VMCI_INVALID_ID, 0, runtime=liar_rt)
        assert pair.events(timeout=0.3) == []
        assert pair.refused_attaches == 1 and pair.peer_id == C.VMCI_INVALID_ID
        assert [e.event for e in liar.events(timeout=5)] == [C.VMCI_EVENT_QP_PEER_DETACH]
        liar.detach()
    with QueuePair.alloc(None, 4096, 4096, C.VMCI_INVALID_ID, 0, runtime=host) as pair:
        with QueuePair.alloc(pair.handle, 4096, 4096, C.VMCI_INVALID_ID, 0, runtime=honest_rt):
            assert pair.events(timeout=5)[0].event == C.VMCI_EVENT_QP_PEER_ATTACH
            assert pair.refused_attaches == 0 and pair.peer_id == 3
