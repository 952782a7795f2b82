"""The host side of the cross-VM tests: run by ``testbed/cross.py run --host-cmd`` on the machine.

    python tests/cross_vm/host_peer.py

Uses the ``hybrid`` transport only (``VSOCKCOMPAT_TRANSPORT=hybrid``, ``VSOCKCOMPAT_HYBRID_UDS``
and ``VSOCKCOMPAT_HYBRID_CID`` come from the bed: one VMM socket, or both guests' with
``--guests 2``; AF_UNIX, never AF_VSOCK), in a runtime directory of its own. First it starts
the discovery daemon (``vsockcompat ds``, context 1 on the hybrid transport: each guest reaches
it at (2, 1)) and waits until it answers; then it opens one datagram endpoint per available
core, at ``HOST_RIDS[core]`` in context 2 (reached by every guest), each on its own thread:

* ``b"call <rid>"``: sends ``b"host calls <rid>"`` to ``(the caller's CID, rid)``, a
  host-initiated datagram to an endpoint that never sent us anything; when that send fails,
  answers the caller ``b"call <rid> failed: <VMCIError subclass>"``;
* ``b"deny <rid>"`` / ``b"allow <rid>"``: denies ``(the caller's CID, rid)`` DG_SEND on this
  endpoint, or lifts that, then answers the caller with the same words (the verdicts reach
  the guest);
* ``b"lookup <name>"``: looks ``name`` up in the discovery service from here and answers
  ``b"<code> <context>:<resource>"``;
* ``b"start <app> <core>"`` (``app`` one of ``APPS``): starts the SDK sample's server here
  (``vsockcompat <app> -s`` on that core, regions mirrored; ``c-datagram-app`` and
  ``c-sharedmem-app``: the SDK's datagramApp and sharedMemApp in C, tests/c/, built here against
  libvmci.so.0 at their first start, on the C library's hybrid transport (regions mirrored, its
  default there), ``core`` ignored) and answers its first line of output
  once it printed it (``b"started: <line>"``), or ``b"failed: <reason>"``;
* ``b"result"``: waits for that server to exit and answers ``b"<status>\\n<stdout>\\0<stderr>"``;
* ``b"share"``: creates a mirrored region of ``SHARE_SIZE`` bytes here (context 2), writes
  ``b"creator"`` at 0, and runs another host program (``SHARER``) that attaches to it at its
  ``.host`` path, checks that, writes ``b"attacher"`` at 64 and detaches; answers
  ``b"shared <rid> <its status> <its stderr>"``. The region lives until this process ends;
* ``b"peek <rid> <offset> <n>"``: answers ``n`` bytes of that region's copy here at ``offset``;
* ``b"c-sharedmem-client"``: runs the SDK's sharedMemApp client in C here (tests/c/sharedMemApp.c,
  built as ``start c-sharedmem-app`` builds it, on the C library's hybrid transport): it looks
  ``"HOST TIME"`` up (a guest registers its region's handle there), attaches through the VMM and
  prints three readings; answers ``b"<status>\\n<stdout>\\0<stderr>"``;
* ``b"c-attach <cid> <rid> <size> <offset> <n>"``: runs a line-driven C attacher here
  (test_clib_shm's probe, on the same library and transport): ``init``, ``attach <cid> <rid>
  <size>``, ``read <cid> <rid> <offset> <n>``, ``detach <cid> <rid>``; answers like
  ``c-sharedmem-client``, one stdout line per command (``<code> <size> <failed>``, ``[<text>]``
  or ``unmapped``, ``<code>``).
  Both C clients run under tests/c/no_vsock_shim.c (no AF_VSOCK socket can be made; any attempt
  is recorded) and are killed after ``CLIENT_WAIT`` seconds; the answer is ``b"failed: <reason>"``
  when one could not be built, timed out, or touched AF_VSOCK;
* ``b"stop-vmm <cid>"``, ``b"relay <cid> <rid> <payload>"``: with ``cross.py run
  --vmm-per-guest``, see the end of this file;
* anything else: echoed to its sender as ``payload + b" from <context>:<resource>"`` (the
  sender's handle as this side saw it).

Runs until SIGTERM; exits 0, 1 when a reply could not be sent, an endpoint failed or the daemon
died, 2 (at once, nothing opened) when the transport asked for is not ``hybrid``.
"""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if importlib.util.find_spec("vsockcompat") is None:     # not installed: run from a checkout
    sys.path.insert(0, REPO)

import vsockcompat  # noqa: E402
from vsockcompat import clib, ds_client  # noqa: E402
from vsockcompat._backend import load_core  # noqa: E402
from vsockcompat._settings import Settings  # noqa: E402
from vsockcompat.constants import VMCI_PRIV_DG_SEND, VMCI_PUBLIC_GROUP_NAME, VMCI_SUCCESS  # noqa: E402
from vsockcompat.datagram import DatagramEndpoint  # noqa: E402
from vsockcompat.errors import Timeout, VMCIError  # noqa: E402
from vsockcompat.handles import VMCIHandle  # noqa: E402
from vsockcompat.runtime import Runtime  # noqa: E402
from vsockcompat.sharedmem import SharedRegion  # noqa: E402

#: The host endpoints' resource ids, one per core (the guest tests send to these).
HOST_RIDS = {"cython": 5001, "pure": 5002}
#: The SDK samples whose server ``start`` runs here.
APPS = ("datagram-app", "sharedmem-app", "c-datagram-app", "c-sharedmem-app")
#: The C programs of the ``c-`` apps (tests/c/<name>.c).
C_APPS = {"c-datagram-app": "datagramApp", "c-sharedmem-app": "sharedMemApp"}
#: Seconds for the daemon, or a sample's server, to come up; and for a server to finish.
START_WAIT = 30.0
#: The most of a server's output ``result`` returns.
OUTPUT_MAX = 16384
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(vsockcompat.__file__)))
#: Bytes of a region ``share`` creates.
SHARE_SIZE = 4096
#: Seconds a C client of ``c-sharedmem-client`` or ``c-attach`` may run before it is killed
#: (sharedMemApp's client reads for 3 s; a handshake the VMM never answers costs 10 s).
CLIENT_WAIT = 30.0
TESTS = os.path.join(REPO, "tests")
#: The second host program of ``share`` (argument: the region's resource id).
SHARER = r"""
import sys
from vsockcompat.sharedmem import SharedRegion
region = SharedRegion.attach((2, int(sys.argv[1])), %d)
assert bytes(region.buffer[:7]) == b"creator", bytes(region.buffer[:7])
region.buffer[64:72] = b"attacher"
region.detach()
""" % SHARE_SIZE


def child_env(core=None, **extra):
    """This process's environment (the bed's hybrid settings, our runtime directory) for a child."""
    env = dict(os.environ, VSOCKCOMPAT_DS_AUTOSTART="0", **extra)
    if core is not None:
        env["VSOCKCOMPAT_NO_EXTENSIONS"] = "1" if core == "pure" else "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return env


def built_cores(cores, who):
    """Those of ``cores`` that are built here; says which are not (they are not served)."""
    built = []
    for core in cores:
        try:
            load_core(core)
        except ImportError:
            print("%s: the %s core is not built: not served" % (who, core), flush=True)
            continue
        built.append(core)
    return built


def start_daemon(settings, log):
    """``vsockcompat ds`` on the hybrid transport; returns it once it answers from here."""
    proc = subprocess.Popen([sys.executable, "-m", "vsockcompat", "ds"], env=child_env(),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    runtime = Runtime(settings)
    deadline = time.monotonic() + START_WAIT
    while proc.poll() is None and time.monotonic() < deadline:
        if ds_client.lookup_status(VMCI_PUBLIC_GROUP_NAME, runtime, timeout=2)[0] == VMCI_SUCCESS:
            print("host-peer: discovery daemon (pid %d) serves (1, 1)" % proc.pid, flush=True)
            return proc
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError("the discovery daemon did not answer (status %s)" % proc.returncode)


def build_c_app(build_dir, name, source=None):
    """libvmci.so.0 and the SDK sample ``name`` (tests/c/<name>.c, or the file ``source``) built
    into ``build_dir``: ``(argv, environment additions)`` to run it with its output
    line-buffered. Raises ``clib.BuildError``, ``OSError`` or ``subprocess.SubprocessError``."""
    src_dir = os.path.join(REPO, "src")
    lib_dir = os.path.join(build_dir, "lib")
    clib.build_libvmci(lib_dir, src_dir=src_dir)
    cc = clib.find_compiler()
    exe = os.path.join(build_dir, name)
    subprocess.run(cc + ["-I", src_dir, source or os.path.join(TESTS, "c", name + ".c"), "-o", exe,
                         "-L", lib_dir, "-lvmci", "-pthread"], check=True, capture_output=True, timeout=300)
    return ["stdbuf", "-oL", exe], {"LD_LIBRARY_PATH": lib_dir}


def build_c_client(build_dir, name):
    """``build_c_app``'s answer for a host C client (``"sharedMemApp"``, or ``"shm_probe"``:
    test_clib_shm's probe), with tests/c/no_vsock_shim.c built too and preloaded."""
    source = None
    if name == "shm_probe":
        sys.path.insert(0, TESTS)
        from test_clib_shm import PROBE_SOURCE
        source = os.path.join(build_dir, "shm_probe.c")
        os.makedirs(build_dir, exist_ok=True)
        with open(source, "w") as f:
            f.write(PROBE_SOURCE)
    argv, extra = build_c_app(build_dir, name, source)
    shim = os.path.join(build_dir, "no_vsock_shim.so")
    subprocess.run(clib.find_compiler() + ["-shared", "-fPIC", os.path.join(TESTS, "c", "no_vsock_shim.c"),
                                           "-o", shim, "-ldl"], check=True, capture_output=True, timeout=300)
    return argv, dict(extra, LD_PRELOAD=shim)


def run_c_client(argv, extra, stdin=b""):
    """Run a host C client of ``build_c_client`` to its end, killed after ``CLIENT_WAIT``
    seconds: ``b"<status>\\n<stdout>\\0<stderr>"``, or ``b"failed: <reason>"`` when it timed out or
    its shim recorded an AF_VSOCK attempt (in a file of this run's own)."""
    fd, log = tempfile.mkstemp(prefix="no_vsock.", suffix=".log", dir=os.path.dirname(extra["LD_PRELOAD"]))
    os.close(fd)
    try:
        out = subprocess.run(argv, env=child_env(NO_VSOCK_LOG=log, **extra), input=stdin, capture_output=True,
                             timeout=CLIENT_WAIT)
    except subprocess.TimeoutExpired:
        out = None
    finally:
        with open(log, "rb") as f:
            records = f.read()
        os.unlink(log)
    if records:
        return b"failed: AF_VSOCK touched: " + records
    if out is None:
        return b"failed: %s killed after %d s" % (os.path.basename(argv[-1]).encode(), CLIENT_WAIT)
    return b"%d\n%s\0%s" % (out.returncode, out.stdout[:OUTPUT_MAX], out.stderr[:OUTPUT_MAX])


class Samples:
    """The one SDK sample server at a time that the guest's ``start`` runs here, and the regions
    of ``share``."""

    def __init__(self, build_dir=None):
        self.build_dir = build_dir  # where the C clients are built (default: the runtime directory)
        self.lock = threading.Lock()
        self.proc = None
        self.first = b""
        self.regions = {}
        self.c_apps = {}  # build_c_app's answers, once built

    def share(self, runtime, core):
        region = SharedRegion.create(SHARE_SIZE, runtime=runtime)
        with self.lock:
            self.regions[region.handle.resource] = region
        region.buffer[:7] = b"creator"
        out = subprocess.run([sys.executable, "-c", SHARER, str(region.handle.resource)],
                             env=child_env(core), stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=START_WAIT)
        return b"shared %d %d %s" % (region.handle.resource, out.returncode, out.stderr[-OUTPUT_MAX:])

    def peek(self, rid, offset, n):
        with self.lock:
            region = self.regions.get(rid)
        return b"failed: no region" if region is None else bytes(region.buffer[offset:offset + n])

    def c_client(self, name, args, stdin=b""):
        """A host C client (``build_c_client``'s ``name``) run with ``args``: see ``run_c_client``."""
        with self.lock:
            try:
                if name not in self.c_apps:
                    self.c_apps[name] = build_c_client(
                        self.build_dir or os.path.join(os.environ["VSOCKCOMPAT_RUNDIR"], "cc"), name)
            except (clib.BuildError, OSError, subprocess.SubprocessError) as exc:
                return b"failed: cannot build %s: %r" % (name.encode(), exc)
            argv, extra = self.c_apps[name]
        return run_c_client(argv + args, extra, stdin)

    def start(self, app, core):
        if app not in APPS or core not in HOST_RIDS:
            return b"failed: unknown app or core"
        with self.lock:
            if self.proc is not None:
                return b"failed: a server runs already"
            if app in C_APPS:
                try:
                    if app not in self.c_apps:
                        self.c_apps[app] = build_c_app(os.path.join(os.environ["VSOCKCOMPAT_RUNDIR"], "c"),
                                                       C_APPS[app])
                except (clib.BuildError, OSError, subprocess.SubprocessError) as exc:
                    return b"failed: cannot build %s: %r" % (C_APPS[app].encode(), exc)
                argv, extra = self.c_apps[app]
                cmd, env = argv + ["-s"], child_env(**extra)
                env.pop("LD_PRELOAD", None)
            else:
                cmd = [sys.executable, "-m", "vsockcompat", app, "-s"]
                env = child_env(core, VSOCKCOMPAT_SHM_MODE="mirrored")
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            line = self.first = self.proc.stdout.readline()  # blocks until the server is up (or gone)
        return (b"started: " if line else b"failed: no output: ") + line.rstrip(b"\n")

    def result(self):
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return b"failed: no server"
        try:
            out, err = proc.communicate(timeout=START_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        out = self.first + out
        return b"%d\n%s\0%s" % (proc.returncode, out[:OUTPUT_MAX], err[:OUTPUT_MAX])


def answer(ep, dg, runtime, samples, guest_cid):
    """The reply to one datagram (see the module docstring), or None once a ``call`` was made."""
    words = dg.payload.split(b" ")
    if words[0] == b"call":
        rid = int(words[1])
        try:
            ep.send(VMCIHandle(guest_cid, rid), b"host calls %d" % rid)
            return None
        except VMCIError as exc:
            return b"call %d failed: %s" % (rid, type(exc).__name__.encode())
    if words[0] in (b"deny", b"allow") and len(words) == 2:
        client = VMCIHandle(guest_cid, int(words[1]))
        if words[0] == b"deny":
            runtime.access.change(ep.handle, lambda acl: acl.add(client, [], [VMCI_PRIV_DG_SEND]))
        else:
            runtime.access.change(ep.handle, lambda acl: acl.remove_all(client))
        return dg.payload
    if words[0] == b"lookup":
        rc, handle = ds_client.lookup_status(dg.payload[len(b"lookup "):], runtime)
        return b"%d %d:%d" % (rc, handle.context, handle.resource)
    if words[0] == b"start" and len(words) == 3:
        return samples.start(words[1].decode(), words[2].decode())
    if dg.payload == b"result":
        return samples.result()
    if dg.payload == b"share":
        return samples.share(runtime, runtime.core.NAME)
    if words[0] == b"peek" and len(words) == 4:
        return samples.peek(*map(int, words[1:]))
    if dg.payload == b"c-sharedmem-client":
        return samples.c_client("sharedMemApp", ["-c"])
    if words[0] == b"c-attach" and len(words) == 6:
        cid, rid, size, offset, n = map(int, words[1:])
        script = "init\nattach %d %d %d\nread %d %d %d %d\ndetach %d %d\nquit\n" % (
            cid, rid, size, cid, rid, offset, n, cid, rid)
        return samples.c_client("shm_probe", [], script.encode())
    return dg.payload + b" from %d:%d" % (dg.src.context, dg.src.resource)


def serve(settings, core, stop, failures, samples):
    runtime = Runtime(settings, core=core)
    with DatagramEndpoint(HOST_RIDS[core], runtime=runtime) as ep:
        print("host-peer: %s endpoint %d:%d ready" % (core, ep.handle.context, ep.handle.resource),
              flush=True)
        while not stop.is_set():
            try:
                dg = ep.recv(timeout=0.5)
            except Timeout:
                continue
            try:
                reply = answer(ep, dg, runtime, samples, dg.src.context)
                if reply is not None:
                    ep.send(dg.src, reply)
            except (VMCIError, ValueError, IndexError) as exc:
                print("host-peer: %s: reply to %s failed: %r" % (core, dg.src, exc), flush=True)
                failures.append(exc)


def main():
    if Settings.from_environ().transport != "hybrid":
        # Checked before any transport is opened: another one (vsock) could use AF_VSOCK here.
        print("host-peer: refusing: VSOCKCOMPAT_TRANSPORT is %r, not 'hybrid'"
              % Settings.from_environ().transport, flush=True)
        return 2
    rundir = tempfile.mkdtemp(prefix="vsc-host-")
    os.environ["VSOCKCOMPAT_RUNDIR"] = rundir      # the daemon's files, the samples' too
    # The daemon is ours to start and watch: a lookup must not start another on demand.
    os.environ["VSOCKCOMPAT_DS_AUTOSTART"] = "0"
    settings = Settings.from_environ()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log = open(os.path.join(rundir, "ds.log"), "wb")
    try:
        daemon = start_daemon(settings, log)
    except RuntimeError as exc:
        print("host-peer: %s" % exc, flush=True)
        shutil.rmtree(rundir, ignore_errors=True)
        return 1
    failures = []
    threads = []
    samples = Samples()
    for core in built_cores(HOST_RIDS, "host-peer"):
        t = threading.Thread(target=serve, args=(settings, core, stop, failures, samples), daemon=True)
        t.start()
        threads.append(t)
    while not stop.is_set() and all(t.is_alive() for t in threads) and daemon.poll() is None:
        stop.wait(0.5)
    died = not stop.is_set()        # a serving thread or the daemon ended on its own
    stop.set()
    for t in threads:
        t.join(5)
    daemon.terminate()
    daemon_status = daemon.wait(10)
    log.close()
    with open(log.name, "rb") as f:
        sys.stdout.write(f.read().decode("utf-8", "replace"))
    shutil.rmtree(rundir, ignore_errors=True)
    return 1 if died or failures or not threads or daemon_status not in (0, -signal.SIGTERM) else 0


# ---------------------------------------------------------------- a VMM per guest
# Commands of test_cross_vmm_stop.py (``cross.py run --guests 2 --vmm-per-guest``), answered
# before those above:
# * ``b"stop-vmm <cid>"``: ends the bed's daemon of guest ``cid`` (testbed/vmm_stop.py: only
#   the process the bed started for that guest, checked; never the asking guest's own); answers
#   ``b"stopped: <what>"`` or ``b"refused: <why>"``;
# * ``b"relay <cid> <rid> <payload>"``: sends ``payload`` from a fresh endpoint here to
#   ``(cid, rid)`` and waits ``START_WAIT`` seconds for one reply there; answers ``b"reply "``
#   and that reply's payload, or ``b"failed: <VMCIError subclass>"``.

sys.path.insert(0, os.path.join(REPO, "testbed"))
import vmm_stop  # noqa: E402


def relay(runtime, words):
    cid, rid, payload = int(words[1]), int(words[2]), b" ".join(words[3:])
    try:
        with DatagramEndpoint(runtime=runtime) as ep:
            ep.send(VMCIHandle(cid, rid), payload)
            return b"reply " + ep.recv(timeout=START_WAIT).payload
    except VMCIError as exc:
        return b"failed: %s" % type(exc).__name__.encode()


def _vmm_answer(base):
    def vmm_answer(ep, dg, runtime, samples, guest_cid):
        words = dg.payload.split(b" ")
        if words[0] == b"stop-vmm" and len(words) == 2:
            if not words[1].isdigit():
                return b"refused: not a CID: %r" % words[1]
            if int(words[1]) == guest_cid:
                return b"refused: a guest may not stop its own VMM (no answer could reach it)"
            try:
                return b"stopped: " + vmm_stop.stop_vmm(int(words[1])).encode()
            except vmm_stop.Refused as exc:
                return b"refused: " + str(exc).encode()
        if words[0] == b"relay" and len(words) >= 4:
            return relay(runtime, words)
        return base(ep, dg, runtime, samples, guest_cid)
    return vmm_answer


answer = _vmm_answer(answer)    # serve() reads the name at each datagram


if __name__ == "__main__":
    sys.exit(main())
