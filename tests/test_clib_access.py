"""Access control in libvmci.so.0 (src/vsc_acl.c): C and Python processes obey the same
privileges, set from either language, on both cores.

The C peer is tests/c/acl_peer.c under ``vsockcompat run``; the Python side is the SDK
(``VMCILibrary``) in other contexts of the same runtime directory.
"""
import os
import socket
import struct
import subprocess
import types

import pytest

from conftest import make_settings
from test_clib import C_DIR, CC, RUN, SANITIZE, SANITIZER_ENV, SANITIZER_MARKS, SRC_DIR, _cc, env_for
from vsockcompat import clib
from vsockcompat import constants as C
from vsockcompat import errors
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.runtime import Runtime
from vsockcompat.sdk import VMCILibrary

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset"),
]
DG_SEND, SM_ATTACH = C.VMCI_PRIV_DG_SEND, C.VMCI_PRIV_SM_ATTACH
NO_ACCESS = C.VMCI_ERROR_NO_ACCESS
HEADER = struct.Struct("<IIIIQ")  # dst cid, dst rid, src cid, src rid, payload size


def build(out_dir, extra=()):
    lib_dir = os.path.join(out_dir, "lib")
    library = clib.build_libvmci(lib_dir, src_dir=SRC_DIR, extra_cflags=list(extra) + ["-Wpedantic", "-Werror"],
                                 extra_ldflags=list(extra))
    exe = os.path.join(out_dir, "acl_peer")
    warnings = _cc(["-Wall", "-Wextra", "-Wpedantic", "-g", "-I", SRC_DIR] + list(extra)
                   + [os.path.join(C_DIR, "acl_peer.c"), "-o", exe, "-L", lib_dir, "-lvmci"], out_dir)
    assert warnings == "", warnings
    return types.SimpleNamespace(library=library, acl_peer=exe)


@pytest.fixture(scope="module")
def cbuild(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("clibacl")))


class Peer:
    """acl_peer in context ``cid``: ``peer("send 2 1024 hi")`` returns its answer line."""

    def __init__(self, build, rundir, core_name, cid, argv=None):
        env = env_for(rundir, core_name, build.library, cid=cid, VSOCKCOMPAT_DS_AUTOSTART="0")
        argv = argv or RUN + ["--", build.acl_peer]
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().split()
        assert first[:1] == ["me"], "acl_peer did not start: %s" % self.proc.stderr.read()
        self.handle = (int(first[1]), int(first[2]))
        self.err = None

    def __call__(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer.endswith("\n"), "acl_peer died: %s" % self.proc.stderr.read()
        return answer[:-1]

    def send(self, dst, text="hi"):
        return int(self("send %d %d %s" % (tuple(dst) + (text,))))

    def recv(self):
        rv, cid, rid, *text = self("recv").split(" ", 3)
        return int(rv), (int(cid), int(rid)), " ".join(text)

    def priv(self, resource, client, allow=(), deny=()):
        res = "me me" if resource == "me" else "%d %d" % tuple(resource)
        lists = [",".join(str(p) for p in privs) or "-" for privs in (allow, deny)]
        return int(self("priv %s %d %d %s %s" % ((res,) + tuple(client) + tuple(lists))))

    def close(self):
        """Quit (VMCI_CleanupApp); returns stderr. Idempotent."""
        if self.err is None:
            try:
                _, self.err = self.proc.communicate("quit\n" if self.proc.poll() is None else None, timeout=60)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.communicate()
        return self.err


@pytest.fixture
def cpeer(cbuild, rundir, core):
    """``cpeer(cid)``: a running acl_peer; each must exit cleanly with nothing on stderr."""
    peers = []

    def make(cid, build=None):
        peer = Peer(build or cbuild, rundir, core.NAME, cid)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        assert peer.close() == ""


@pytest.fixture
def libs(core, rundir):
    """``libs(cid)``: an initialised Python VMCILibrary of context ``cid``."""
    made = []

    def make(cid):
        lib = VMCILibrary(Runtime(make_settings(rundir, cid=cid, ds_autostart=False), core=core))
        assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
        made.append(lib)
        return lib

    yield make
    for lib in made:
        lib.VMCI_CleanupApp()


def recv_nothing(lib, handle, timeout=0.3):
    with pytest.raises(errors.Timeout):
        lib._endpoints[handle].recv(timeout=timeout)
    return True


def acl_path(rundir, handle):
    return os.path.join(rundir, "c%d" % handle[0], "%d.acl" % handle[1])


# Python sets the privileges, C obeys


def test_python_denies_a_c_sender_even_on_its_cached_link(libs, cpeer):
    host = libs(2)
    server = host.VMCIDatagram_CreateHnd(0)
    peer = cpeer(3)
    assert peer.send(server, "first") == C.VMCI_DG_HEADERSIZE + 5
    assert host.VMCIDatagram_RecvFrom(server, bytearray(64)) == (5, peer.handle)
    assert host.VMCIResource_AddClientPrivileges(server, (3, 0), [], [DG_SEND]) == C.VMCI_SUCCESS
    assert peer.send(server, "denied") == NO_ACCESS
    assert peer.send(server, "again") == NO_ACCESS
    assert recv_nothing(host, server)
    # The client's own handle beats its context; then the context's denial is lifted.
    assert host.VMCIResource_AddClientPrivileges(server, peer.handle, [DG_SEND], []) == C.VMCI_SUCCESS
    assert peer.send(server, "mine") > 0
    assert host.VMCIDatagram_RecvFrom(server, bytearray(64)) == (4, peer.handle)


def test_python_groups_and_the_public_group_decide_for_c(libs, cpeer):
    host = libs(2)
    server = host.VMCIDatagram_CreateHnd(0)
    member, stranger = cpeer(3), cpeer(4)
    assert host.VMCIResource_AddClientPrivileges(server, (2, 1023), [], [DG_SEND]) == C.VMCI_SUCCESS
    assert member.send(server) == NO_ACCESS
    friends = host.VMCIGroup_Create()
    assert host.VMCIGroup_AddMember(friends, (3, 0), False) == C.VMCI_SUCCESS
    assert host.VMCIResource_AddClientPrivileges(server, friends, [DG_SEND], []) == C.VMCI_SUCCESS
    assert member.send(server, "friend") > 0
    assert stranger.send(server, "stranger") == NO_ACCESS
    assert host.VMCIDatagram_RecvFrom(server, bytearray(64)) == (6, member.handle)
    assert recv_nothing(host, server)
    # A destroyed group no longer counts: the public group's denial decides again.
    assert host.VMCIGroup_Destroy(friends) == C.VMCI_SUCCESS
    assert host.VMCIResource_AddClientPrivileges(server, (2, 1023), [], [DG_SEND]) == C.VMCI_SUCCESS
    assert member.send(server) == NO_ACCESS


def test_python_denies_sm_attach_to_a_c_context(libs, cpeer):
    host = libs(2)
    region, view = host.VMCISharedMem_Create(4096)
    assert view is not None
    denied, allowed = cpeer(3), cpeer(4)
    assert host.VMCIResource_AddClientPrivileges(region, (3, 0), [], [SM_ATTACH]) == C.VMCI_SUCCESS
    assert int(denied("attach %d %d" % tuple(region))) == NO_ACCESS
    assert int(allowed("attach %d %d" % tuple(region))) == C.VMCI_SUCCESS


# C sets the privileges, Python obeys


def test_a_c_server_denies_a_python_client_even_on_its_cached_link(libs, cpeer, rundir):
    server = cpeer(2)
    guest = libs(3)
    client = guest.VMCIDatagram_CreateHnd(0)
    assert guest.VMCIDatagram_SendTo(server.handle, client, 5, b"first") > 0
    assert server.recv() == (5, tuple(client), "first")
    assert server.priv("me", (3, 0), deny=[DG_SEND]) == C.VMCI_SUCCESS
    with open(acl_path(rundir, server.handle)) as f:
        assert f.read() == "vsockcompat-acl 1 datagram\n3 0 4 deny\n"
    assert guest.VMCIDatagram_SendTo(server.handle, client, 6, b"denied") == NO_ACCESS
    with DatagramEndpoint(runtime=guest.runtime) as other:
        with pytest.raises(errors.NoAccess):
            other.send(server.handle, b"through the object API")
    assert guest.VMCIResource_CheckClientPrivilege(server.handle, client, DG_SEND) == NO_ACCESS
    # Allowing the client handle itself wins over its context's denial.
    assert server.priv("me", client, allow=[DG_SEND]) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server.handle, client, 4, b"mine") > 0
    assert server.recv() == (4, tuple(client), "mine")


def test_a_c_sender_sees_a_c_receivers_revocation(cpeer):
    server, client = cpeer(2), cpeer(3)
    assert client.send(server.handle, "one") > 0
    assert server.recv() == (3, client.handle, "one")
    assert server.priv("me", client.handle, deny=[DG_SEND]) == C.VMCI_SUCCESS
    assert client.send(server.handle, "two") == NO_ACCESS
    assert server.priv("me", client.handle, allow=[DG_SEND]) == C.VMCI_SUCCESS
    assert client.send(server.handle, "three") > 0
    assert server.recv() == (5, client.handle, "three")


def test_a_c_receiver_drops_what_a_denied_sender_still_delivers(libs, cpeer, rundir):
    server = cpeer(2)
    guest, other = libs(3), libs(4)
    mine = guest.VMCIDatagram_CreateHnd(0)
    allowed = other.VMCIDatagram_CreateHnd(0)
    # A raw socket where (3, mine)'s link would be: a true identity, no library checks.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        raw.bind(os.path.join(rundir, "c3/%d-2.%d" % (mine.resource, server.handle[1])))
        raw.connect(os.path.join(rundir, "c2/%d" % server.handle[1]))

        def frame(text):
            return HEADER.pack(server.handle[0], server.handle[1], 3, mine.resource, len(text)) + text

        raw.send(frame(b"one"))
        assert server.recv() == (3, (3, mine.resource), "one")
        # Denied after its connection was accepted: the receiver checks it again.
        assert server.priv("me", (3, 0), deny=[DG_SEND]) == C.VMCI_SUCCESS
        raw.send(frame(b"two"))
        assert other.VMCIDatagram_SendTo(server.handle, allowed, 2, b"ok") > 0
        assert server.recv() == (2, tuple(allowed), "ok")
    finally:
        raw.close()


# Bad input to the C call, with the Python side's codes


def test_c_add_client_privileges_bad_input(libs, cpeer, rundir):
    host = libs(2)
    foreign = host.VMCIDatagram_CreateHnd(0)
    peer = cpeer(3)
    cases = [
        ((3, 0), (), ()),            # empty lists
        ((3, 0), (SM_ATTACH,), ()),  # not a datagram privilege
        ((3, 0), (C.VMCI_PRIV_ASSIGN_CLIENT,), ()),
        ((3, 0), (99,), ()),         # no such privilege
        ((3, 0), (), (-1,)),
    ]
    for client, allow, deny in cases:  # the Python side's code for its own resource, then C's for its own
        expected = host.VMCIResource_AddClientPrivileges(foreign, client, list(allow), list(deny))
        assert expected != C.VMCI_SUCCESS
        assert peer.priv("me", client, allow, deny) == expected, (client, allow, deny)
    assert peer.priv("me", (3, 0)) == C.VMCI_ERROR_INVALID_ARGS
    assert peer.priv("me", (3, 0), (SM_ATTACH,)) == C.VMCI_ERROR_INVALID_PRIV
    assert peer.priv("me", (3, 0), (99,)) == C.VMCI_ERROR_INVALID_PRIV
    assert peer.priv("me", (3, 0), (), (-1,)) == C.VMCI_ERROR_INVALID_PRIV
    assert peer.priv((3, 99999), (3, 0), (DG_SEND,)) == C.VMCI_ERROR_INVALID_ARGS, "no such resource"
    assert peer.priv((0xFFFFFFFF, 0xFFFFFFFF), (3, 0), (DG_SEND,)) == C.VMCI_ERROR_INVALID_ARGS
    assert peer.priv("me", (0xFFFFFFFF, 0xFFFFFFFF), (DG_SEND,)) == C.VMCI_ERROR_INVALID_ARGS
    assert peer.priv(foreign, (3, 0), (DG_SEND,)) == NO_ACCESS, "a foreign resource"
    assert peer.priv(foreign, (3, 0), (99,)) == NO_ACCESS, "ownership is checked first, as in Python"
    assert host.VMCIResource_AddClientPrivileges(foreign, (3, 0), [DG_SEND], []) == C.VMCI_SUCCESS
    assert peer.priv((2, 1023), (3, 0), (DG_SEND,)) == NO_ACCESS, "the public group is the host's"
    assert not os.path.exists(acl_path(rundir, peer.handle)), "nothing was recorded"
    # Granted CH_PRIV on the foreign resource, the peer may change it.
    assert host.VMCIResource_AddClientPrivileges(foreign, (3, 0), [C.VMCI_PRIV_CH_PRIV], []) == C.VMCI_SUCCESS
    assert peer.priv(foreign, (4, 0), (), (DG_SEND,)) == C.VMCI_SUCCESS
    assert host.VMCIResource_CheckClientPrivilege(foreign, (4, 0), DG_SEND) == NO_ACCESS


DAMAGED = [b"", b"\x00\xff\xfe", b"vsockcompat-acl 2 datagram\n", b"vsockcompat-acl 1 datagram\n3 0 4 maybe\n",
           b"vsockcompat-acl 1 datagram\n\n", b"vsockcompat-acl 1 datagram\n3 0 9 allow\n",
           b"vsockcompat-acl 1 datagram\n99999999999 0 4 allow\n", b"x" * (2 << 20)]


def test_a_damaged_acl_fails_closed_in_c_too(libs, cpeer, rundir):
    host = libs(2)
    server = host.VMCIDatagram_CreateHnd(0)
    peer = cpeer(3)
    for damage in DAMAGED:
        with open(acl_path(rundir, server), "wb") as f:
            f.write(damage)
        assert peer.send(server) == NO_ACCESS, damage[:40]
    os.unlink(acl_path(rundir, server))
    assert peer.send(server, "healed") > 0
    assert host.VMCIDatagram_RecvFrom(server, bytearray(64)) == (6, peer.handle)
    # A C receiver with a damaged file refuses what arrives, and its owner may still repair it.
    cserver = cpeer(2)
    guest = libs(4)
    client = guest.VMCIDatagram_CreateHnd(0)
    with open(acl_path(rundir, cserver.handle), "wb") as f:
        f.write(b"\x00garbage")
    assert guest.VMCIDatagram_SendTo(cserver.handle, client, 1, b"x") == NO_ACCESS
    assert peer.send(cserver.handle, "x") == NO_ACCESS
    assert cserver.priv("me", (4, 0), allow=[DG_SEND]) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(cserver.handle, client, 2, b"ok") > 0
    assert cserver.recv() == (2, tuple(client), "ok")
    assert peer.send(cserver.handle, "x") == NO_ACCESS, "the rest stays closed"


def test_privileges_die_with_a_c_endpoint(cpeer, rundir):
    server = cpeer(2)
    assert server.priv("me", (3, 0), deny=[DG_SEND]) == C.VMCI_SUCCESS
    path = acl_path(rundir, server.handle)
    assert os.path.exists(path)
    assert server.close() == ""
    assert not os.path.exists(path)


# Under the sanitizers


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("clibacl_asan")), SANITIZE)


def exercise(server, client, libs, rundir):
    """Allow, deny, a bad privilege, a damaged file and its repair, between C peers and Python."""
    guest = libs(4)
    mine = guest.VMCIDatagram_CreateHnd(0)
    assert client.send(server.handle, "one") > 0
    assert server.recv() == (3, client.handle, "one")
    assert server.priv("me", (3, 0), deny=[DG_SEND]) == C.VMCI_SUCCESS
    assert server.priv("me", (3, 0), allow=[SM_ATTACH]) == C.VMCI_ERROR_INVALID_PRIV
    assert client.send(server.handle, "two") == NO_ACCESS
    with open(acl_path(rundir, server.handle), "ab") as f:
        f.write(b"\xff garbage\n")
    assert guest.VMCIDatagram_SendTo(server.handle, mine, 2, b"no") == NO_ACCESS
    assert server.priv("me", (4, 0), allow=[DG_SEND]) == C.VMCI_SUCCESS
    assert guest.VMCIDatagram_SendTo(server.handle, mine, 2, b"ok") > 0
    assert server.recv() == (2, tuple(mine), "ok")
    assert server.priv(mine, (2, 0), deny=[DG_SEND]) == NO_ACCESS


@pytest.mark.slow
def test_access_control_under_the_sanitizers(sanitized, rundir, core, libs, monkeypatch):
    for name, value in SANITIZER_ENV.items():
        monkeypatch.setenv(name, value)
    server, client = Peer(sanitized, rundir, core.NAME, 2), Peer(sanitized, rundir, core.NAME, 3)
    try:
        exercise(server, client, libs, rundir)
    finally:
        errs = [server.close(), client.close()]
    for err in errs:
        assert all(m not in err for m in SANITIZER_MARKS), err


@pytest.fixture(scope="module")
def debug_build(tmp_path_factory):
    from test_clib_valgrind import VALGRIND, _valgrind_works

    if VALGRIND is None:
        pytest.skip("valgrind is not installed (apt-get install valgrind)")
    reason = _valgrind_works()
    if reason:
        pytest.skip(reason)
    return build(str(tmp_path_factory.mktemp("clibacl_valgrind")), ["-O0", "-g"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_access_control_under_memcheck(debug_build, rundir, libs):
    from test_clib_valgrind import assert_clean, under_valgrind

    server, client = (Peer(debug_build, rundir, "pure", cid, under_valgrind(debug_build.acl_peer)) for cid in (2, 3))
    try:
        exercise(server, client, libs, rundir)
    finally:
        errs = [server.close(), client.close()]
    for err in errs:
        assert_clean(err)



# The policy file's context flags (src/vsc_policy.c)

RESTRICTED_3 = '[contexts.3]\nflags = ["restricted"]\n\n[contexts.4]\nflags = ["trusted"]\n'
POLICIES = [  # (text, whether C reads it: its subset of TOML)
    ("", True),
    ("# nothing but a comment\n\n", True),
    (RESTRICTED_3, True),
    ('[discovery]\nregister = "trusted"   # strict\n[contexts."7"]\nflags = [ "trusted" , "restricted", ]\nuid = 0\n',
     True),
    ("[contexts.3]\nflags = [\n  'restricted',  # why\n  \"trusted\"\n]\n[contexts]\n", True),
    ("[contexts.0]\nflags = []\n[contexts.1]\n", True),
    ("[contexts.3]\r\nflags = [\"trusted\"]\r\n", True),
    ("# caf\u00e9\n[contexts.5]\nuid = 4294967295\n", True),
    ('[contexts]\n3 = { flags = ["trusted"] }\n', False),   # valid TOML outside the subset
    ('contexts.3.flags = ["trusted"]\n', False),
    ('[contexts.3]\nflags = ["trusted"]\n[contexts.3]\nuid = 1\n', False),
    ('[contexts.3]\nflags = ["trusted", "admin"]\n', False),
    ('[contexts.3]\nflags = "trusted"\n', False),
    ("[contexts.3]\nuid = -1\n", False),
    ("[contexts.3]\nuid = 4294967296\n", False),
    ("[contexts.03]\n", False),
    ("[contexts.4294967295]\n", False),
    ("[contexts.x]\n", False),
    ("[other]\n", False),
    ('[discovery]\nregister = "sometimes"\n', False),
    ('[discovery]\nmode = "trusted"\n', False),
    ("[contexts.3]\nflags = [\"trusted\"\n", False),
    ("[contexts.3\n", False),
    ("[contexts.3]\ncolour = 1\n", False),
    ("[contexts.3]\nflags = [\"trusted\"] extra\n", False),
    ("\x00", False),
    ("[contexts.3]\nflags = [\"trusted\"]\nflags = []\n", False),
    ("[[contexts]]\n", False),
]


@pytest.fixture(scope="module")
def policy_check(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("policy_check"))
    exe = os.path.join(out, "policy_check")
    warnings = _cc(["-std=c11", "-Wall", "-Wextra", "-g", "-I", SRC_DIR, os.path.join(C_DIR, "policy_check.c"),
                    os.path.join(SRC_DIR, "vsc_policy.c"), "-o", exe], out)
    assert warnings == "", warnings
    return exe


def test_c_reads_the_policy_as_python_does(policy_check, tmp_path):
    from vsockcompat.policy import PolicyError, load_policy

    for i, (text, in_subset) in enumerate(POLICIES):
        path = tmp_path / ("policy%d.toml" % i)
        path.write_bytes(text.encode())
        out = subprocess.run([policy_check, str(path)], capture_output=True, text=True, check=True).stdout
        try:
            python = load_policy(str(path))
        except PolicyError:
            python = None
        if not in_subset:
            assert out.startswith("error "), (text, out)
            line = int(out.split()[1])
            assert 1 <= line <= text.count("\n") + 1, (text, out)
            continue
        assert python is not None, text
        lines = out.splitlines()
        assert lines[0] == "ok", (text, out)
        seen = {}
        for row in lines[1:]:
            cid, flags, uid = row.split()
            seen[int(cid)] = (int(flags), None if uid == "-" else int(uid))
        assert seen == {cid: (entry.flags, entry.uid) for cid, entry in python.contexts.items()}, text


def write_policy(rundir, text):
    os.makedirs(rundir, exist_ok=True)
    with open(os.path.join(rundir, "policy.toml"), "w") as f:
        f.write(text)


def test_a_restricted_c_context_talks_only_to_trusted_ones(libs, cpeer, rundir):
    write_policy(rundir, RESTRICTED_3)
    host, trusted = libs(2), libs(4)
    plain, friend = host.VMCIDatagram_CreateHnd(0), trusted.VMCIDatagram_CreateHnd(0)
    restricted = cpeer(3)
    assert restricted.send(plain) == NO_ACCESS
    assert restricted.send(friend, "trusted") > 0
    assert trusted.VMCIDatagram_RecvFrom(friend, bytearray(64)) == (7, restricted.handle)
    # Both ways: a plain Python context cannot reach the restricted C one; a trusted one can.
    assert host.VMCIDatagram_SendTo(restricted.handle, plain, 1, b"x") == NO_ACCESS
    assert trusted.VMCIDatagram_SendTo(restricted.handle, friend, 5, b"hello") > 0
    assert restricted.recv() == (5, tuple(friend), "hello")
    region, _ = host.VMCISharedMem_Create(4096)
    assert int(restricted("attach %d %d" % tuple(region))) == NO_ACCESS
    # A C receiver refuses what a restricted sender delivers without the library's check.
    cplain = cpeer(5)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        raw.bind(os.path.join(rundir, "c3/%d-5.%d" % (restricted.handle[1], cplain.handle[1])))
        raw.connect(os.path.join(rundir, "c5/%d" % cplain.handle[1]))
        raw.send(HEADER.pack(5, cplain.handle[1], 3, restricted.handle[1], 4) + b"sneak")
        assert trusted.VMCIDatagram_SendTo(cplain.handle, friend, 2, b"ok") > 0
        assert cplain.recv() == (2, tuple(friend), "ok")
    finally:
        raw.close()


def run_peer(cbuild, rundir, core, cid=2):
    env = env_for(rundir, core.NAME, cbuild.library, cid=cid, VSOCKCOMPAT_DS_AUTOSTART="0")
    return subprocess.run(RUN + ["--", cbuild.acl_peer], env=env, input="quit\n", capture_output=True, text=True,
                          timeout=60)


def test_c_init_app_fails_closed_on_a_malformed_policy(cbuild, rundir, core):
    write_policy(rundir, '[contexts.3]\nflags = ["restricted"]\n\n[contexts.4]\nflags = ["sometimes"]\n')
    result = run_peer(cbuild, rundir, core)
    assert result.returncode == 1 and result.stdout == ""
    assert "policy.toml:5: unknown flag" in result.stderr
    assert "VMCI_InitApp failed" in result.stderr
    write_policy(rundir, RESTRICTED_3)
    result = run_peer(cbuild, rundir, core)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_c_init_app_refuses_a_context_the_policy_gives_to_another_user(cbuild, rundir, core):
    write_policy(rundir, "[contexts.2]\nuid = %d\n" % (os.getuid() + 1))
    result = run_peer(cbuild, rundir, core, cid=2)
    assert result.returncode == 1
    assert "context 2 belongs to user %d by the policy" % (os.getuid() + 1) in result.stderr
    assert run_peer(cbuild, rundir, core, cid=3).returncode == 0


def test_c_allocation_knows_groups(cpeer, rundir):
    """A live group holds its id in the host context; a dead one's id is taken back."""
    from vsockcompat.transport.local import process_start_ticks

    c2 = os.path.join(rundir, "c2")
    os.makedirs(c2, exist_ok=True)
    with open(os.path.join(c2, "1024.group"), "w") as f:
        f.write("vsockcompat-group 1 2 %d %d\n3 0 0\n" % (os.getpid(), process_start_ticks(os.getpid())))
    with open(os.path.join(c2, "1025.group"), "w") as f:
        f.write("vsockcompat-group 1 2 %d %d\n" % (os.getpid(), process_start_ticks(os.getpid()) + 1))
    with open(os.path.join(c2, "1025.acl"), "w") as f:
        f.write("vsockcompat-acl 1 group\n3 0 0 allow\n")
    peer = cpeer(2)
    assert peer.handle == (2, 1025)
    assert sorted(n for n in os.listdir(c2) if n.startswith("1025.")) == ["1025.acct"]
    assert os.path.exists(os.path.join(c2, "1024.group"))
