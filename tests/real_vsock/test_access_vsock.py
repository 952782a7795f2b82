"""Access control over real AF_VSOCK, inside the guest test bed only (marker ``vsock``).

On vsock the kernel vouches for the peer CID and the hello names the sending port;
privileges live in the owning process (no shared runtime directory across kernels),
so its receive path enforces them, and senders of the same runtime see the denial
at once; senders in other processes (or kernels) learn it from the receiver's verdicts
on their links (``transport/verdicts.py``). Both cores.
"""
import os
import queue
import subprocess
import sys
import textwrap

import pytest

from vsockcompat import constants as C
from vsockcompat.datagram import Datagram, DatagramEndpoint
from vsockcompat.errors import NoAccess
from vsockcompat.handles import VMCIHandle
from vsockcompat.sdk import VMCILibrary

from .conftest import VMADDR_CID_LOCAL
from .test_vsock_transport import frame, hello, raw_client, settle, vsock_runtime  # noqa: F401

pytestmark = pytest.mark.vsock
DG_SEND = C.VMCI_PRIV_DG_SEND


def test_a_denied_sender_gets_no_access_over_vsock(vsock_runtime):
    lib = VMCILibrary(vsock_runtime)
    assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
    try:
        server, client = lib.VMCIDatagram_CreateHnd(0), lib.VMCIDatagram_CreateHnd(0)
        assert server.context == VMADDR_CID_LOCAL
        assert lib.VMCIDatagram_SendTo(server, client, 2, b"ok") > 0
        assert lib.VMCIDatagram_RecvFrom(server, bytearray(8)) == (2, client)
        assert lib.VMCIResource_AddClientPrivileges(server, client, [], [DG_SEND]) == C.VMCI_SUCCESS
        assert lib.VMCIDatagram_SendTo(server, client, 2, b"no") == C.VMCI_ERROR_NO_ACCESS
        assert lib.VMCIResource_CheckClientPrivilege(server, client, DG_SEND) == C.VMCI_ERROR_NO_ACCESS
        assert lib.VMCIResource_RemoveAllClientPrivileges(server, client) == C.VMCI_SUCCESS
        assert lib.VMCIDatagram_SendTo(server, client, 3, b"yes") > 0
        assert lib.VMCIDatagram_RecvFrom(server, bytearray(8)) == (3, client)
    finally:
        lib.VMCI_CleanupApp()


def test_a_raw_vsock_sender_that_is_denied_is_dropped_and_counted(vsock_runtime, vsock_socket):
    with DatagramEndpoint(runtime=vsock_runtime) as victim, DatagramEndpoint(runtime=vsock_runtime) as friend:
        denied = VMCIHandle(VMADDR_CID_LOCAL, 7001)
        vsock_runtime.access.change(victim.handle, lambda acl: acl.add(denied, [], [DG_SEND]))
        raw = raw_client(vsock_socket, victim.handle.resource)
        raw.send(hello(7001))
        raw.send(frame(tuple(victim.handle), (VMADDR_CID_LOCAL, 7001), b"denied"))
        settle(victim, 2.0)
        assert victim.stats.denied == 1
        friend.send(victim.handle, b"still serving")
        assert victim.recv(timeout=30) == Datagram(friend.handle, b"still serving")
        raw.close()


# Verdicts: a sender in another process learns of its denial from the receiver.

SENDER = """
    import sys, time
    from vsockcompat import constants as C
    from vsockcompat.datagram import DatagramEndpoint
    from vsockcompat.errors import NoAccess
    from vsockcompat.handles import VMCIHandle
    from vsockcompat.sdk import VMCILibrary

    lib = VMCILibrary()
    assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
    src = lib.VMCIDatagram_CreateHnd(0)
    ep = DatagramEndpoint(runtime=lib.runtime)
    dst = VMCIHandle(int(sys.argv[1]), int(sys.argv[2]))
    senders = {
        "lib": (lambda data: lib.VMCIDatagram_SendTo(dst, src, len(data), data),
                lambda: lib._endpoints[src]._links.get(dst)),
        "ep": (lambda data: ep.send_status(dst, data, len(data)), lambda: ep._links.get(dst)),
    }
    print("ready", src.resource, ep.handle.resource, flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "raise":
            try:
                ep.send(dst, b"raise")
                print("sent", flush=True)
            except NoAccess as exc:
                print("NoAccess", exc, flush=True)
            continue
        who, want, payload = words[0], words[1], words[2].encode()
        send, link = senders[who]
        before, sent, deadline = link(), 0, time.monotonic() + 60
        while time.monotonic() < deadline:
            rc = send(payload)
            if (rc > 0) if want == "ok" else (rc == C.VMCI_ERROR_NO_ACCESS):
                break
            sent += rc > 0
            time.sleep(0.02)
        print(rc, sent, int(before is not None and link() is before), flush=True)
    ep.close()
    lib.VMCI_CleanupApp()
"""


@pytest.mark.parametrize("mode", ["seqpacket", "stream"])
def test_a_denied_sender_in_another_process_gets_no_access(core, rundir, mode):
    """Also on the link it had cached before the denial, and SUCCESS again once it is lifted;
    what it sent before the verdict reached it is dropped (and counted) by the receiver."""
    from .test_vsock_discovery import START_TIMEOUT, vsock_env
    from .test_vsock_discovery import vsock_runtime as make_vsock_runtime

    rt = make_vsock_runtime(core, rundir, mode)
    with DatagramEndpoint(runtime=rt) as server:
        got = queue.Queue()
        server.on_receive(got.put)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SENDER), str(server.handle.context),
                                  str(server.handle.resource)], env=vsock_env(rundir, core.NAME, mode),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def ask(command):
            child.stdin.write(command + "\n")
            child.stdin.flush()
            answer = child.stdout.readline().split()
            assert answer, child.stderr.read()
            return answer

        try:
            ready = child.stdout.readline().split()
            assert ready and ready[0] == "ready", child.stderr.read()
            senders = {"lib": VMCIHandle(VMADDR_CID_LOCAL, int(ready[1])),
                       "ep": VMCIHandle(VMADDR_CID_LOCAL, int(ready[2]))}
            for who in senders:
                rc, sent, _ = ask("%s ok warm" % who)
                assert int(rc) > 0 and sent == "0"
                assert got.get(timeout=START_TIMEOUT) == Datagram(senders[who], b"warm")

            def deny(acl):
                for handle in senders.values():
                    acl.add(handle, [], [DG_SEND])

            rt.access.change(server.handle, deny)
            raced = 0
            for who in senders:
                rc, sent, same_link = ask("%s no-access race" % who)
                assert (int(rc), same_link) == (C.VMCI_ERROR_NO_ACCESS, "1")
                raced += int(sent)
            assert ask("raise")[0] == "NoAccess"

            rt.access.change(server.handle, lambda acl: [acl.remove_all(h) for h in senders.values()])
            for who in senders:
                rc, sent, same_link = ask("%s ok back" % who)
                assert int(rc) > 0 and sent == "0" and same_link == "1"
            back, late = set(), 0
            while len(back) < 2:
                datagram = got.get(timeout=START_TIMEOUT)
                if datagram.payload == b"back":
                    back.add(datagram.src)
                else:
                    assert datagram.payload == b"race"
                    late += 1  # sent before the denial reached the receiver's thread
            assert back == set(senders.values())
            assert server.stats.denied + late == raced, server.stats
        finally:
            child.stdin.close()
            assert child.wait(START_TIMEOUT) == 0, child.stderr.read()
            child.stdout.close()
            child.stderr.close()


def test_a_raw_vsock_sender_is_told_and_dropped_if_it_ignores_the_verdict(vsock_runtime, vsock_socket):
    from vsockcompat.transport.verdicts import encode_verdict
    with DatagramEndpoint(runtime=vsock_runtime) as victim:
        denied = VMCIHandle(VMADDR_CID_LOCAL, 7002)
        vsock_runtime.access.change(victim.handle, lambda acl: acl.add(denied, [], [DG_SEND]))
        raw = raw_client(vsock_socket, victim.handle.resource)
        raw.send(hello(7002))
        raw.send(frame(tuple(victim.handle), tuple(denied), b"one"))
        settle(victim, 2.0)
        raw.settimeout(30)
        assert raw.recv(64) == encode_verdict(True)
        raw.send(frame(tuple(victim.handle), tuple(denied), b"two"))  # ignoring it
        settle(victim, 2.0)
        assert victim.stats.denied == 2 and victim.stats.received == 0, victim.stats
        vsock_runtime.access.change(victim.handle, lambda acl: acl.remove_all(denied))
        assert raw.recv(64) == encode_verdict(False)
        raw.send(frame(tuple(victim.handle), tuple(denied), b"three"))
        assert victim.recv(timeout=30) == Datagram(denied, b"three")
        raw.close()


def _write_policy(rundir, text):
    with open(os.path.join(rundir, "policy.toml"), "w") as f:
        f.write(text)


def test_restricted_contexts_are_refused_over_vsock(core, rundir):
    """Everything here is CID 1: a policy that restricts context 1 (and does not trust it)
    forbids it every interaction, so each kind of resource must refuse with the SDK code."""
    from vsockcompat.queuepair import QueuePair
    from vsockcompat.sharedmem import SharedRegion
    from .test_vsock_discovery import vsock_runtime as make_vsock_runtime

    _write_policy(rundir, '[contexts.1]\nflags = ["restricted"]\n')
    a, b = make_vsock_runtime(core, rundir), make_vsock_runtime(core, rundir)
    lib = VMCILibrary(a)
    assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
    try:
        server, client = lib.VMCIDatagram_CreateHnd(0), lib.VMCIDatagram_CreateHnd(0)
        assert lib.VMCIDatagram_SendTo(server, client, 2, b"no") == C.VMCI_ERROR_NO_ACCESS
        region = SharedRegion.create(64, runtime=a)
        try:
            with pytest.raises(NoAccess):
                SharedRegion.attach(region.handle, runtime=b)
        finally:
            region.detach()
        pair = QueuePair.alloc(None, 4096, 4096, runtime=a)
        try:
            with pytest.raises(NoAccess):
                QueuePair.alloc(pair.handle, 4096, 4096, runtime=b)
        finally:
            pair.detach()
    finally:
        lib.VMCI_CleanupApp()


def test_the_creator_refuses_a_denied_attacher_over_vsock(core, rundir):
    from vsockcompat.sharedmem import SharedRegion
    from .test_vsock_discovery import vsock_runtime as make_vsock_runtime

    a, b = make_vsock_runtime(core, rundir), make_vsock_runtime(core, rundir)
    region = SharedRegion.create(64, runtime=a)
    try:
        with SharedRegion.attach(region.handle, runtime=b) as allowed:
            assert len(allowed.buffer) == 64
        a.access.change(region.handle, lambda acl: acl.add(VMCIHandle(VMADDR_CID_LOCAL, 0), [],
                                                           [C.VMCI_PRIV_SM_ATTACH]))
        with pytest.raises(NoAccess):  # b's own library sees no privileges: the creator refuses
            SharedRegion.attach(region.handle, runtime=b)
    finally:
        region.detach()


def test_the_strict_discovery_rule_over_vsock(core, rundir):
    import subprocess
    import sys
    import time
    from vsockcompat import ds_client
    from .test_vsock_discovery import START_TIMEOUT, WAIT, vsock_env
    from .test_vsock_discovery import vsock_runtime as make_vsock_runtime

    _write_policy(rundir, '[discovery]\nregister = "trusted"\n\n[contexts.1]\nflags = []\n')
    proc = subprocess.Popen([sys.executable, "-m", "vsockcompat", "ds"], env=vsock_env(rundir, core.NAME),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rt = make_vsock_runtime(core, rundir)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while ds_client.lookup_status(C.VMCI_PUBLIC_GROUP_NAME, rt, timeout=5)[0] != C.VMCI_SUCCESS:
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not answer"
            time.sleep(0.2)
        with DatagramEndpoint(runtime=rt) as ep:
            assert ds_client.register_status("strict", ep.handle, rt) == C.VMCI_ERROR_NO_ACCESS
            assert ds_client.lookup_status("strict", rt)[0] == C.VMCI_ERROR_NOT_FOUND
    finally:
        proc.terminate()
        proc.wait(WAIT)
