"""C datagram ping-pong: a legacy SDK program on libvmci.so.0 versus raw AF_UNIX SOCK_SEQPACKET.

    python benchmarks/c_pingpong.py            # about 40 s
    python benchmarks/c_pingpong.py --quick    # about 15 s

Builds, with the system C compiler and -O2, libvmci.so.0 (``clib.build_libvmci``),
``tests/c/pingpong.c`` (SDK calls only, run under ``vsockcompat run``) and
``tests/c/raw_pingpong.c`` (a bare AF_UNIX SOCK_SEQPACKET connection, blocking
send/recv), then measures both pairs in the same run, taking turns, in two process
layouts: server and client pinned to one CPU, and pinned to two different CPUs
(``os.sched_setaffinity``). Payloads of 64 B and 4 KiB. Each client run times
``--batches`` batches of N round trips (N calibrated so that a batch of the SDK pair
lasts about ``--batch-seconds``; the raw pair does the same N); each implementation
gets ``--rounds`` client runs per measurement. It prints a table with the ratio of
the SDK round trip to the raw one and PASS or MISS against the target (<= 1.15x).

A benchmark reports, it never fails on timing: exit status 0 when every run
completed, 1 when a child failed or timed out. Everything runs on this machine, in a
private directory /tmp/vscpXXXXXXXX that is removed at the end (the discovery daemon
the SDK server starts there is stopped first).
"""
import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vsockcompat import clib  # noqa: E402  (the source tree's, like the library built below)

SRC_DIR = os.path.join(ROOT, "src")
C_DIR = os.path.join(ROOT, "tests", "c")
SIZES = (64, 4096)
TARGET = 1.15
IMPLS = ("raw", "sdk")
LABELS = {"raw": "raw SEQPACKET", "sdk": "SDK (libvmci)"}
SERVER_CID, CLIENT_CID = 2, 3
CALIBRATION_TRIPS = 300


class BenchError(RuntimeError):
    """A build or a child went wrong."""


def _cc(cc, args):
    result = subprocess.run(cc + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0 or result.stdout:
        raise BenchError("%s:\n%s" % (" ".join(cc + args), result.stdout))


def build(out_dir):
    """libvmci.so.0, pingpong (linked against it) and raw_pingpong, all -O2."""
    cc = clib.find_compiler()
    if cc is None:
        raise BenchError("no C compiler (cc, gcc or clang) on PATH, and CC unset")
    lib_dir = os.path.join(out_dir, "lib")
    try:
        library = clib.build_libvmci(lib_dir, src_dir=SRC_DIR)
    except clib.BuildError as exc:
        raise BenchError(str(exc)) from None
    sdk = os.path.join(out_dir, "pingpong")
    raw = os.path.join(out_dir, "raw_pingpong")
    _cc(cc, ["-O2", "-Wall", "-Wextra", "-I", SRC_DIR, os.path.join(C_DIR, "pingpong.c"), "-o", sdk,
             "-L", lib_dir, "-lvmci", "-pthread"])
    _cc(cc, ["-O2", "-Wall", "-Wextra", os.path.join(C_DIR, "raw_pingpong.c"), "-o", raw])
    version = subprocess.run(cc + ["--version"], capture_output=True, text=True).stdout.splitlines()
    return library, sdk, raw, version[0] if version else " ".join(cc)


def _pinned(cpus):
    return lambda: os.sched_setaffinity(0, cpus)


class Bench:
    def __init__(self, workdir, library, sdk, raw, timeout):
        self.rundir = os.path.join(workdir, "run")
        os.mkdir(self.rundir)
        self.sdk, self.raw, self.timeout = sdk, raw, timeout
        self.socket_path = os.path.join(self.rundir, "raw.sock")
        base = dict(os.environ, VSOCKCOMPAT_RUNDIR=self.rundir, VSOCKCOMPAT_TRANSPORT="local",
                    VSOCKCOMPAT_LIBVMCI=library, VSOCKCOMPAT_PYTHON=sys.executable)
        base["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, base.get("PYTHONPATH")) if p)
        for name in ("LD_PRELOAD", "LD_LIBRARY_PATH"):
            base.pop(name, None)
        self.env = {"server": dict(base, VSOCKCOMPAT_CID=str(SERVER_CID)),
                    "client": dict(base, VSOCKCOMPAT_CID=str(CLIENT_CID))}
        self.servers = {}

    def _command(self, impl, args):
        if impl == "sdk":
            return [sys.executable, "-m", "vsockcompat", "run", "--", self.sdk] + args
        if args[0] == "-s":
            return [self.raw, "-s", self.socket_path]
        return [self.raw] + args[:-2] + [self.socket_path] + args[-2:]  # ... -c PATH N SIZE

    def start_servers(self, cpus):
        for impl in IMPLS:
            proc = subprocess.Popen(self._command(impl, ["-s"]), env=self.env["server"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, preexec_fn=_pinned(cpus))
            self.servers[impl] = proc
            line = proc.stdout.readline()  # "registered" / "listening", or "" if it died
            if not line.strip():
                proc.wait(self.timeout)
                raise BenchError("the %s server did not start: %s" % (impl, proc.stderr.read().strip()))

    def client(self, impl, cpus, n, size, batches, quit=False):
        args = ["-b", str(batches)] + (["-q"] if quit else []) + ["-c", str(n), str(size)]
        try:
            result = subprocess.run(self._command(impl, args), env=self.env["client"], capture_output=True,
                                    text=True, timeout=self.timeout, preexec_fn=_pinned(cpus))
        except subprocess.TimeoutExpired:
            raise BenchError("the %s client timed out after %.0f s" % (impl, self.timeout)) from None
        if result.returncode != 0:
            raise BenchError("the %s client failed (status %d): %s" % (impl, result.returncode,
                                                                       result.stderr.strip()))
        return {k: float(v) for k, v in (line.split("=", 1) for line in result.stdout.split())}

    def stop_servers(self, cpus):
        for impl, proc in list(self.servers.items()):
            if proc.poll() is None:
                self.client(impl, cpus, 1, 1, 1, quit=True)
                try:
                    proc.wait(self.timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise BenchError("the %s server did not stop" % impl) from None
            proc.communicate()
            del self.servers[impl]
            if proc.returncode != 0:
                raise BenchError("the %s server exited with status %d" % (impl, proc.returncode))

    def kill_servers(self):
        for proc in self.servers.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        self.servers.clear()

    def stop_daemon(self):
        """The discovery daemon the SDK server started in our runtime directory."""
        try:
            with open(os.path.join(self.rundir, "ds.pid")) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)


def measure(bench, layouts, rounds, batches, batch_seconds, log):
    """{(layout, size, impl): [client results]}, plus the N used per (layout, size)."""
    results, trips = {}, {}
    for layout, server_cpus, client_cpus in layouts:
        log("%s: starting the servers (server on CPU %s, client on CPU %s)"
            % (layout, _cpus(server_cpus), _cpus(client_cpus)))
        bench.start_servers(server_cpus)
        for size in SIZES:
            probe = bench.client("sdk", client_cpus, CALIBRATION_TRIPS, size, 1)
            n = max(100, int(batch_seconds * 1e6 / probe["median_us"]))
            trips[(layout, size)] = n
            log("  %d B: %d round trips per batch, %d batches, %d rounds" % (size, n, batches, rounds))
            for r in range(rounds):
                order = IMPLS if r % 2 == 0 else IMPLS[::-1]
                for impl in order:
                    results.setdefault((layout, size, impl), []).append(
                        bench.client(impl, client_cpus, n, size, batches))
        bench.stop_servers(client_cpus)
    return results, trips


def _cpus(cpus):
    return ",".join(str(c) for c in sorted(cpus))


def summary(runs):
    """Median of the runs' medians, mean of their means, min and max over every batch."""
    return {"median": statistics.median(r["median_us"] for r in runs),
            "mean": statistics.mean(r["mean_us"] for r in runs),
            "min": min(r["min_us"] for r in runs), "max": max(r["max_us"] for r in runs)}


def render(results, layouts, machine):
    lines = ["C datagram ping-pong, SDK program under `vsockcompat run` vs raw AF_UNIX SOCK_SEQPACKET",
             machine, "us per round trip; median of the client runs' batch medians; min..max over all batches",
             ""]
    header = ("layout", "size", "impl", "median", "mean", "min..max", "vs raw", "target", "result")
    rows = []
    for layout, _, _ in layouts:
        for size in SIZES:
            raw = summary(results[(layout, size, "raw")])
            sdk = summary(results[(layout, size, "sdk")])
            ratio = sdk["median"] / raw["median"]
            for impl, s in (("raw", raw), ("sdk", sdk)):
                last = impl == "sdk"
                rows.append((layout if impl == "raw" and size == SIZES[0] else "",
                             "%d B" % size if impl == "raw" else "", LABELS[impl],
                             "%.1f" % s["median"], "%.1f" % s["mean"], "%.1f..%.1f" % (s["min"], s["max"]),
                             "%.2fx" % ratio if last else "", "<= %.2fx" % TARGET if last else "",
                             ("PASS" if ratio <= TARGET else "MISS") if last else ""))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    align = ("<", "<", "<", ">", ">", ">", ">", ">", "<")
    for row in [header] + rows:
        lines.append("  ".join(format(cell, a + str(w)) for cell, a, w in zip(row, align, widths)).rstrip())
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 batches of about 0.05 s")
    parser.add_argument("--rounds", type=int, help="client runs per implementation and measurement (default 3)")
    parser.add_argument("--batches", type=int, help="timed batches per client run (default 7)")
    parser.add_argument("--batch-seconds", type=float, help="length of an SDK batch (default 0.15)")
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait for any child (s)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    batches = args.batches or (5 if args.quick else 7)
    batch_seconds = args.batch_seconds or (0.05 if args.quick else 0.15)
    if rounds < 1 or not 1 <= batches <= 1000 or batch_seconds <= 0:
        parser.error("--rounds and --batches must be at least 1 (batches at most 1000), --batch-seconds positive")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    allowed = sorted(os.sched_getaffinity(0))
    layouts = [("one CPU", {allowed[0]}, {allowed[0]})]
    if len(allowed) > 1:
        layouts.append(("two CPUs", {allowed[1]}, {allowed[0]}))
    else:
        log("note: only one CPU is available to this process: the two-CPU layout is skipped")
    workdir = tempfile.mkdtemp(prefix="vscp", dir="/tmp")
    bench = None
    try:
        log("building libvmci.so.0, pingpong and raw_pingpong (-O2) ...")
        library, sdk, raw, compiler = build(workdir)
        machine = "%d CPUs (%d usable), Linux %s %s, %s; %d rounds x %d batches of about %.2f s" % (
            os.cpu_count(), len(allowed), platform.release(), platform.machine(), compiler, rounds, batches,
            batch_seconds)
        bench = Bench(workdir, library, sdk, raw, args.timeout)
        results, _ = measure(bench, layouts, rounds, batches, batch_seconds, log)
    except BenchError as exc:
        print("c_pingpong: error: %s" % exc, file=sys.stderr)
        return 1
    finally:
        if bench is not None:
            bench.kill_servers()
            bench.stop_daemon()
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(results, layouts, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
