"""``vsockcompat bench``: datagram round trips and rates against raw Unix sockets.

Every measurement runs between two separate processes (a server and a client
child, started fresh for each implementation, each on a private runtime
directory under /tmp), in the same layout for all three implementations:

``raw``
    Python's AF_UNIX SOCK_SEQPACKET, blocking ``send``/``recv_into``: the floor
    the local transport is built on.
``cython`` / ``pure``
    ``DatagramEndpoint.send_status`` / ``recv_status`` on that core, the calls
    ``VMCIDatagram_SendTo`` / ``VMCIDatagram_RecvFrom`` make.

It prints the round-trip time (64 B and 4 KiB payloads) and the one-way rate
(64 B) of each, the ratios against raw and whether they meet the targets.
``--placement same`` pins both processes of every pair to one CPU (a round trip
then adds up the work of both sides), ``--placement split`` to two CPUs (it is
then dominated by cross-CPU wake-ups); by default the scheduler decides. A
benchmark reports: it never fails on timing. It fails (exit status 1) only if
a run goes wrong, e.g. the receiver counts a different number of datagrams than
the sender had accepted. Run ``python -m vsockcompat.bench --help``.
"""
import argparse
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

from ._backend import load_core
from .constants import VMCI_ERROR_NO_RESOURCES, VMCI_MAX_DATAGRAM_QUEUE_SIZE, VMCI_MAX_DG_PAYLOAD_SIZE

IMPLEMENTATIONS = ("raw", "cython", "pure")
RTT_SIZES = (64, 4096)
ONEWAY_SIZE = 64
METRICS = ("rtt_64", "rtt_4096", "oneway_64")
#: (metric, core) -> (relation, target): a round trip at most N times raw's, a rate at least N times raw's.
TARGETS = {
    ("rtt_64", "cython"): ("<=", 1.3),
    ("rtt_4096", "cython"): ("<=", 1.3),
    ("rtt_64", "pure"): ("<=", 2.0),
    ("rtt_4096", "pure"): ("<=", 2.0),
    ("oneway_64", "cython"): (">=", 0.70),
}
TARGET_SECONDS = 1.0
QUICK_SECONDS = 0.2
DEFAULT_TIMEOUT = 120.0

_BUF_SIZE = VMCI_MAX_DG_PAYLOAD_SIZE  # what a legacy program receives into: room for any datagram
_STOP = b"\x00"  # a 1-byte datagram ends an echo or sink loop; measured payloads are larger
_FIRST_CID = 2  # each implementation's pair gets two contexts of its own: server cid, client cid + 1
_SERVER_RESOURCE = 4000
_CHILD_CODE = "import sys; from vsockcompat.bench import _child_main; sys.exit(_child_main(sys.argv[1:]))"


class BenchError(RuntimeError):
    """A benchmark child failed, timed out or broke the protocol."""


def _payload(size):
    return (bytes(range(256)) * (size // 256 + 1))[:size]


# The children. Each serves one line of JSON per command on stdin and answers
# one line on its original stdout. SIGALRM (default action: terminate) bounds
# every wait, so a child exits by itself even if its peer or the parent hangs;
# the hot loops themselves carry no timeout bookkeeping.


class _RawPeer:
    """Blocking AF_UNIX SOCK_SEQPACKET, as a plain Python program would use it."""

    def __init__(self, rundir, cid):
        self.path = os.path.join(rundir, "raw%d" % cid)
        self.listener = None
        self.sock = None

    def op_open(self):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listener.bind(self.path)
        self.listener.listen(1)
        return self.path

    def op_accept(self):
        self.sock, _ = self.listener.accept()
        return None

    def op_connect(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(address)
        return None

    def op_echo(self):
        recv_into, send = self.sock.recv_into, self.sock.send
        view = memoryview(bytearray(_BUF_SIZE))
        count = 0
        cpu0 = time.process_time()
        while True:
            n = recv_into(view)
            if n <= 1:
                if n == 0:
                    raise BenchError("the client hung up")
                return {"echoed": count, "cpu": time.process_time() - cpu0}
            send(view[:n])
            count += 1

    def op_ping(self, size, n):
        recv_into, send = self.sock.recv_into, self.sock.send
        payload = _payload(size)
        view = memoryview(bytearray(_BUF_SIZE))
        bad = 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(n):
            send(payload)
            if recv_into(view) != size:
                bad += 1
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        send(_STOP)
        return {"elapsed": elapsed, "cpu": cpu, "bad": bad}

    def op_sink(self):
        recv_into = self.sock.recv_into
        view = memoryview(bytearray(_BUF_SIZE))
        count = 0
        cpu0 = time.process_time()
        while True:
            n = recv_into(view)
            if n <= 1:
                if n == 0:
                    raise BenchError("the sender hung up")
                return {"received": count, "t_end": time.perf_counter(), "cpu": time.process_time() - cpu0}
            count += 1

    def op_blast(self, size, n):
        send = self.sock.send
        payload = _payload(size)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(n):
            send(payload)
        send(_STOP)
        return {"t0": t0, "accepted": n, "retries": 0, "cpu": time.process_time() - cpu0}

    def close(self):
        for sock in (self.sock, self.listener):
            if sock is not None:
                sock.close()


class _VscPeer:
    """A DatagramEndpoint on its own Runtime, driven through the SDK-level calls."""

    def __init__(self, rundir, cid, core):
        from ._settings import Settings
        from .datagram import DatagramEndpoint
        from .runtime import Runtime

        settings = Settings(no_extensions=(core == "pure"), rundir=rundir, cid=cid, transport="local",
                            ds_autostart=False)
        self.runtime = Runtime(settings, core=core)
        self._endpoint_class = DatagramEndpoint
        self.ep = None
        self.dst = None

    def op_open(self):
        self.ep = self._endpoint_class(_SERVER_RESOURCE, runtime=self.runtime)
        return list(self.ep.handle)

    def op_accept(self):
        return None  # the endpoint accepts links inside recv_status

    def op_connect(self, address):
        from .handles import VMCIHandle

        self.ep = self._endpoint_class(runtime=self.runtime)
        self.dst = VMCIHandle(*address)
        return None

    def op_echo(self):
        recv_status, send_status = self.ep.recv_status, self.ep.send_status
        view = memoryview(bytearray(_BUF_SIZE))
        count = 0
        cpu0 = time.process_time()
        while True:
            n, src = recv_status(view)
            if n <= 1:
                if n < 0:
                    raise BenchError("recv_status returned %d" % n)
                return {"echoed": count, "cpu": time.process_time() - cpu0}
            rc = send_status(src, view, n)
            if rc < 0:
                raise BenchError("send_status returned %d" % rc)
            count += 1

    def _send_stop(self):
        while True:
            rc = self.ep.send_status(self.dst, _STOP, 1)
            if rc != VMCI_ERROR_NO_RESOURCES:
                break
        if rc < 0:
            raise BenchError("send_status returned %d" % rc)

    def op_ping(self, size, n):
        recv_status, send_status = self.ep.recv_status, self.ep.send_status
        dst = self.dst
        payload = _payload(size)
        view = memoryview(bytearray(_BUF_SIZE))
        bad = 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(n):
            rc = send_status(dst, payload, size)
            if rc < 0:
                raise BenchError("send_status returned %d" % rc)
            if recv_status(view)[0] != size:
                bad += 1
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        self._send_stop()
        return {"elapsed": elapsed, "cpu": cpu, "bad": bad}

    def op_sink(self):
        recv_status = self.ep.recv_status
        view = memoryview(bytearray(_BUF_SIZE))
        count = 0
        cpu0 = time.process_time()
        while True:
            n = recv_status(view)[0]
            if n <= 1:
                if n < 0:
                    raise BenchError("recv_status returned %d" % n)
                return {"received": count, "t_end": time.perf_counter(), "cpu": time.process_time() - cpu0}
            count += 1

    def op_blast(self, size, n):
        send_status = self.ep.send_status
        dst = self.dst
        payload = _payload(size)
        accepted = retries = 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        while accepted < n:
            rc = send_status(dst, payload, size)
            if rc >= 0:
                accepted += 1
            elif rc == VMCI_ERROR_NO_RESOURCES:  # the receiver's queue is full: try again
                retries += 1
            else:
                raise BenchError("send_status returned %d" % rc)
        self._send_stop()
        return {"t0": t0, "accepted": accepted, "retries": retries, "cpu": time.process_time() - cpu0}

    def close(self):
        if self.ep is not None:
            self.ep.close()


def serve_peer(make_peer, timeout):
    """Run a benchmark child: answer JSON commands on stdin with ``peer.op_<name>(*args)``
    until ``exit``; every wait is bounded by SIGALRM after ``timeout`` seconds."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(timeout)
    # Answers go to the original stdout; anything printed goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    commands = sys.stdin.buffer
    peer = make_peer()
    try:
        while True:
            signal.alarm(timeout)
            line = commands.readline()
            if not line:
                return 0
            msg = json.loads(line)
            if msg["op"] == "exit":
                out.write('{"ok": null}\n')
                return 0
            try:
                result = getattr(peer, "op_" + msg["op"])(*msg.get("args", ()))
            except Exception:
                out.write(json.dumps({"error": traceback.format_exc()}) + "\n")
            else:
                out.write(json.dumps({"ok": result}) + "\n")
    finally:
        signal.alarm(timeout)
        peer.close()
        signal.alarm(0)


def _child_main(argv):
    """Entry point of a child: ``ROLE IMPL RUNDIR CID TIMEOUT [CPU]``."""
    _role, impl, rundir, cid, timeout = argv[:5]
    if len(argv) > 5:
        os.sched_setaffinity(0, {int(argv[5])})
    timeout = max(1, int(float(timeout)))
    return serve_peer(lambda: _RawPeer(rundir, int(cid)) if impl == "raw" else _VscPeer(rundir, int(cid), impl),
                      timeout)


# The parent.


class _Child:
    """One child process and its command pipe."""

    def __init__(self, role, impl, rundir, cid, timeout, env, cpu=None):
        self.name = "%s %s" % (impl, role)
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, role, impl, rundir, str(cid), str(timeout)]
            + ([] if cpu is None else [str(cpu)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self._pending = b""

    def send(self, op, *args):
        try:
            self.proc.stdin.write((json.dumps({"op": op, "args": args}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as exc:
            raise BenchError("%s: cannot send %r: %s (exit status %s)"
                             % (self.name, op, exc, self.proc.poll())) from None

    def result(self):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout + 5
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise BenchError("%s: no answer within %.0f s" % (self.name, self.timeout + 5))
            chunk = os.read(fd, 65536)
            if not chunk:
                raise BenchError("%s exited (status %s)" % (self.name, self.proc.wait(5)))
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            raise BenchError("%s failed:\n%s" % (self.name, msg["error"]))
        return msg["ok"]

    def call(self, op, *args):
        self.send(op, *args)
        return self.result()

    def stop(self, kill=False):
        """Ask the child to exit (or kill it at once); kill it if it has not exited within 5 s."""
        if kill:
            self.proc.kill()
        try:
            if self.proc.poll() is None:
                self.timeout = 0
                self.call("exit")
        except BenchError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _child_env(impl, rundir):
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    # The default runtime of a child (built on import) stays in the private directory too.
    env.update(VSOCKCOMPAT_RUNDIR=rundir, VSOCKCOMPAT_TRANSPORT="local", VSOCKCOMPAT_DS_AUTOSTART="0",
               VSOCKCOMPAT_NO_EXTENSIONS="0" if impl == "cython" else "1")
    return env


class _Pair:
    """A server and a client child of one implementation."""

    def __init__(self, impl, rundir, timeout, cpus=(None, None)):
        env = _child_env(impl, rundir)
        cid = _FIRST_CID + 2 * IMPLEMENTATIONS.index(impl)
        self.server = _Child("server", impl, rundir, cid, timeout, env, cpus[0])
        self.client = None
        try:
            self.client = _Child("client", impl, rundir, cid + 1, timeout, env, cpus[1])
            address = self.server.call("open")
            self.client.call("connect", address)
            self.server.call("accept")
        except BaseException:
            self.close(kill=True)
            raise

    def ping(self, size, n):
        """``(seconds, CPU seconds of both processes)`` for ``n`` round trips of ``size`` bytes."""
        self.server.send("echo")
        run = self.client.call("ping", size, n)
        echo = self.server.result()
        if run["bad"] or echo["echoed"] != n:
            raise BenchError("ping-pong of %d x %d B: %d wrong replies, %d echoed"
                             % (n, size, run["bad"], echo["echoed"]))
        return run["elapsed"], run["cpu"] + echo["cpu"]

    def oneway(self, size, n):
        """``(seconds, accepted, received, retries, CPU seconds)`` for ``n`` datagrams one way."""
        self.server.send("sink")
        sent = self.client.call("blast", size, n)
        got = self.server.result()
        return (got["t_end"] - sent["t0"], sent["accepted"], got["received"], sent["retries"],
                sent["cpu"] + got["cpu"])

    def close(self, kill=False):
        for child in (self.client, self.server):
            if child is not None:
                child.stop(kill)


def _calibrate(run, target, n_fixed):
    """Warm up with ``run`` (n -> seconds) and return the iteration count for ``target`` seconds."""
    if n_fixed is not None:
        run(max(20, n_fixed // 10))
        return n_fixed
    n, least = 50, target / 8
    while True:
        elapsed = run(n)
        if elapsed >= least or n >= 1 << 26:
            return max(20, int(n * target / max(elapsed, 1e-9)))
        n = min(n * 8, max(n * 2, int(n * least * 1.5 / max(elapsed, 1e-9))))


def _summary(unit, samples, **extra):
    return dict(unit=unit, median=statistics.median(samples), min=min(samples), max=max(samples),
                samples=samples, **extra)


def _measure(pairs, target, n_fixed, repeat, log=None):
    """Every metric of every pair: calibrate each, then ``repeat`` rounds taking turns.

    Taking turns (raw, cython, pure, raw, ...) puts every implementation under the
    same conditions over time: the placement of the two processes on the CPUs,
    which the scheduler changes as it likes, moves round-trip times a lot.
    """
    results = {impl: {} for impl in pairs}
    for size in RTT_SIZES:
        if log:
            log("round trips of %d B ..." % size)
        counts = {impl: _calibrate(lambda k: pair.ping(size, k)[0], target, n_fixed)
                  for impl, pair in pairs.items()}
        samples = {impl: [] for impl in pairs}
        cpu = {impl: [] for impl in pairs}
        for _ in range(repeat):
            for impl, pair in pairs.items():
                elapsed, used = pair.ping(size, counts[impl])
                samples[impl].append(elapsed / counts[impl] * 1e6)
                cpu[impl].append(used / counts[impl] * 1e6)
        for impl in pairs:
            results[impl]["rtt_%d" % size] = _summary("us", samples[impl], iterations=counts[impl],
                                                      cpu_us=statistics.median(cpu[impl]))

    if log:
        log("one-way datagrams of %d B ..." % ONEWAY_SIZE)
    runs = {impl: [] for impl in pairs}

    def oneway(impl, k):
        elapsed, accepted, received, retries, used = pairs[impl].oneway(ONEWAY_SIZE, k)
        runs[impl].append((k / elapsed, accepted, received, retries, accepted == received == k, used / k))
        return elapsed

    counts = {impl: _calibrate(lambda k: oneway(impl, k), target, n_fixed) for impl in pairs}
    warmups = {impl: list(r) for impl, r in runs.items()}
    for impl in pairs:
        runs[impl].clear()
    for _ in range(repeat):
        for impl in pairs:
            oneway(impl, counts[impl])
    for impl in pairs:
        r = runs[impl]
        results[impl]["oneway_%d" % ONEWAY_SIZE] = _summary(
            "datagrams/s", [x[0] for x in r], datagrams=counts[impl],
            sent=[x[1] for x in r], received=[x[2] for x in r], retries=[x[3] for x in r],
            cpu_us=statistics.median(x[5] for x in r) * 1e6,
            # Warm-up and calibration runs are checked too.
            totals_agree=all(x[4] for x in r + warmups[impl]))
    return results


def _cython_status():
    try:
        load_core("cython")
    except ImportError as exc:
        return False, str(exc)
    return True, None


def machine_info():
    cython, _ = _cython_status()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import vsockcompat

        backend = getattr(vsockcompat, "BACKEND", None)
    except Exception:  # the package facade is not importable: report, do not fail
        backend = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cython_core_available": cython,
        "default_backend": backend,
    }


def _compare(results):
    rows = []
    raw = results["raw"]
    for metric in METRICS:
        for core in ("cython", "pure"):
            relation, target = TARGETS.get((metric, core), (None, None))
            row = {"metric": metric, "core": core, "value": None, "raw": raw[metric]["median"],
                   "ratio": None, "relation": relation, "target": target, "verdict": "skipped"}
            if results[core].get("available"):
                value = results[core][metric]["median"]
                row["value"] = value
                row["ratio"] = value / row["raw"]
                if target is None:
                    row["verdict"] = "n/a"
                elif relation == "<=":
                    row["verdict"] = "PASS" if row["ratio"] <= target else "MISS"
                else:
                    row["verdict"] = "PASS" if row["ratio"] >= target else "MISS"
            rows.append(row)
    return rows


_LABELS = {"rtt_64": "RTT 64 B (us)", "rtt_4096": "RTT 4 KiB (us)", "oneway_64": "one-way 64 B (dg/s)"}


def _fmt_value(metric, value):
    if value is None:
        return "-"
    return "{:,.0f}".format(value) if metric.startswith("oneway") else "%.1f" % value


def _fmt_ratio(metric, ratio):
    if ratio is None:
        return "-"
    return "%.0f%%" % (ratio * 100) if metric.startswith("oneway") else "%.2fx" % ratio


def _fmt_target(metric, relation, target):
    if target is None:
        return "-"
    return "%s %s" % (relation, _fmt_ratio(metric, target))


def render_table(report):
    """The human-readable report."""
    m = report["machine"]
    lines = [
        "vsockcompat bench: datagrams between two processes, vsockcompat vs raw AF_UNIX SOCK_SEQPACKET",
        "machine: %s CPUs, %s %s on %s; Cython core %s; default backend %s" % (
            m["cpu_count"], m["implementation"], m["python"], m["platform"],
            "built" if m["cython_core_available"] else "NOT built", m["default_backend"]),
        "placement: %s; each value: median of %d runs (%s)" % (
            {None: "as the scheduler likes", "same": "server and client on one CPU (%s)",
             "split": "server and client on two CPUs (%s)"}[report["settings"].get("placement")]
            .replace("%s", ", ".join(str(c) for c in report["settings"].get("cpus", ()) if c is not None)),
            report["settings"]["repeat"],
            "%d iterations each" % report["settings"]["iterations"] if report["settings"]["iterations"]
            else "about %.1f s each" % report["settings"]["target_seconds"]),
        "",
    ]
    header = ("measurement", "impl", "median", "min..max", "CPU us/op", "vs raw", "target", "result")
    rows = []
    results = report["results"]
    by_key = {(c["metric"], c["core"]): c for c in report["comparisons"]}

    def spread(impl, metric):
        r = results[impl]
        if not r.get("available"):
            return "-"
        return "%s..%s" % (_fmt_value(metric, r[metric]["min"]), _fmt_value(metric, r[metric]["max"]))

    def cpu(impl, metric):
        r = results[impl]
        return "%.1f" % r[metric]["cpu_us"] if r.get("available") else "-"

    for metric in METRICS:
        rows.append((_LABELS[metric], "raw", _fmt_value(metric, results["raw"][metric]["median"]),
                     spread("raw", metric), cpu("raw", metric), "", "", ""))
        for core in ("cython", "pure"):
            c = by_key[(metric, core)]
            rows.append(("", core, _fmt_value(metric, c["value"]), spread(core, metric), cpu(core, metric),
                         _fmt_ratio(metric, c["ratio"]), _fmt_target(metric, c["relation"], c["target"]),
                         c["verdict"]))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    align = ("<", "<", ">", ">", ">", ">", ">", "<")
    for row in [header] + rows:
        lines.append("  ".join(format(cell, a + str(w)) for cell, a, w in zip(row, align, widths)).rstrip())
    lines.append("")
    for impl in IMPLEMENTATIONS:
        r = results[impl]
        if not r.get("available"):
            lines.append("%s: skipped (%s)" % (impl, r.get("note")))
            continue
        ow = r["oneway_%d" % ONEWAY_SIZE]
        lines.append("%s one-way totals: sent %s, received %s -> %s; sender retries %s" % (
            impl, ow["sent"], ow["received"], "agree" if ow["totals_agree"] else "DISAGREE",
            ow["retries"]))
    return "\n".join(lines)


def placement_cpus(placement):
    """``(server CPU, client CPU)`` for a placement: None (the scheduler's choice), "same"
    (both on one CPU: every microsecond of either side adds to a round trip) or "split"
    (two CPUs: wake-ups cross CPUs). ValueError if the machine cannot do it."""
    if placement is None:
        return None, None
    usable = sorted(os.sched_getaffinity(0))
    if placement == "same":
        return usable[0], usable[0]
    if placement == "split":
        if len(usable) < 2:
            raise ValueError("--placement split needs two usable CPUs")
        return usable[0], usable[1]
    raise ValueError("unknown placement %r" % (placement,))


def run(quick=False, iterations=None, repeat=None, timeout=DEFAULT_TIMEOUT, log=None, placement=None):
    """Run every measurement and return the report (a JSON-serialisable dict)."""
    cpus = placement_cpus(placement)
    target = QUICK_SECONDS if quick else TARGET_SECONDS
    repeat = repeat if repeat is not None else (3 if quick else 5)
    cython, why = _cython_status()
    report = {
        "benchmark": "vsockcompat datagrams vs raw AF_UNIX SOCK_SEQPACKET, two processes",
        "machine": machine_info(),
        "settings": {"quick": quick, "iterations": iterations, "repeat": repeat, "target_seconds": target,
                     "placement": placement, "cpus": list(cpus),
                     "rtt_sizes": list(RTT_SIZES), "oneway_size": ONEWAY_SIZE,
                     "queue_limit_bytes": VMCI_MAX_DATAGRAM_QUEUE_SIZE},
        "results": {},
    }
    rundir = tempfile.mkdtemp(prefix="vscb", dir="/tmp")
    pairs = {}
    try:
        for impl in IMPLEMENTATIONS:
            if impl == "cython" and not cython:
                note = "the Cython core is not built: %s" % why
                if log:
                    log("note: skipping the cython runs: %s" % note)
                report["results"][impl] = {"available": False, "note": note}
                continue
            if log:
                log("starting the %s server and client ..." % impl)
            pairs[impl] = _Pair(impl, rundir, timeout, cpus)
        measured = _measure(pairs, target, iterations, repeat, log)
        for impl in IMPLEMENTATIONS:
            if impl in measured:
                report["results"][impl] = dict(available=True, note=None, **measured[impl])
        report["results"] = {impl: report["results"][impl] for impl in IMPLEMENTATIONS}
    except BaseException:
        for pair in pairs.values():
            pair.close(kill=True)
        raise
    else:
        for pair in pairs.values():
            pair.close()
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    report["comparisons"] = _compare(report["results"])
    report["oneway_totals_agree"] = all(
        r["oneway_%d" % ONEWAY_SIZE]["totals_agree"] for r in report["results"].values() if r.get("available"))
    return report


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="vsockcompat bench",
        description="Measure datagram round trips and one-way rates between two processes: "
                    "raw AF_UNIX SOCK_SEQPACKET vs vsockcompat with the Cython and the pure core.")
    parser.add_argument("--quick", action="store_true", help="about 0.2 s per measurement instead of 1 s")
    parser.add_argument("--iterations", type=_positive_int, metavar="N",
                        help="round trips / datagrams per run (default: as many as fill the time)")
    parser.add_argument("--repeat", type=_positive_int, metavar="R",
                        help="runs per measurement, the median is reported (default 5, 3 with --quick)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help="longest wait for any one step, in seconds (default %(default)s)")
    parser.add_argument("--placement", choices=("same", "split"),
                        help="pin each server and client: both on one CPU, or on two CPUs "
                             "(default: where the scheduler puts them)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report = run(quick=args.quick, iterations=args.iterations, repeat=args.repeat,
                     timeout=args.timeout, log=log, placement=args.placement)
    except ValueError as exc:
        print("vsockcompat bench: error: %s" % exc, file=sys.stderr)
        return 2
    except BenchError as exc:
        print("vsockcompat bench: error: %s" % exc, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_table(report))
    if not report["oneway_totals_agree"]:
        print("vsockcompat bench: error: a receiver did not count what its sender had sent",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
