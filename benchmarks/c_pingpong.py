"""C datagram ping-pong: a legacy SDK program on libvmci.so.0 versus raw AF_UNIX SOCK_SEQPACKET.

    python benchmarks/c_pingpong.py            # about 40 s
    python benchmarks/c_pingpong.py --quick    # about 15 s
    python benchmarks/c_pingpong.py --quick --baseline OTHER/src   # also main's library, taking turns
    python benchmarks/c_pingpong.py --counts   # instructions and system calls per round trip (--size, --trips)

Builds, with the system C compiler and -O2, libvmci.so.0 (``clib.build_libvmci``),
``tests/c/pingpong.c`` (SDK calls only, run under ``vsockcompat run``) and
``tests/c/raw_pingpong.c`` (a bare AF_UNIX SOCK_SEQPACKET connection, blocking
send/recv), then measures both pairs in the same run, taking turns, in two process
layouts: server and client pinned to one CPU, and pinned to two different CPUs
(``os.sched_setaffinity``). Payloads of 64 B and 4 KiB. Each client run times
``--batches`` batches of N round trips (N calibrated so that a batch of the SDK pair
lasts about ``--batch-seconds``; the raw pair does the same N); each implementation
gets ``--rounds`` client runs per measurement. It prints a table with the ratio of
the SDK round trip to the raw one and PASS or MISS against the target (<= 1.15x),
and the CPU time both processes spend per round trip (the client's own count over its
batches, the server's from /proc/PID/schedstat over the client run), which a loaded
machine disturbs less than the wall clock.

``--baseline SRC`` also builds libvmci.so.0 and pingpong from another source tree
(e.g. a checkout of main's ``src``) and measures that pair in the same turns, as
``base``: the table then gives SDK/base too, old and new in the same minutes.

``--counts`` measures what load does not change instead of time: per round trip,
the user-space instructions of the client and of the server (``valgrind
--tool=callgrind``) and their system calls (``strace -c``), each pair run twice,
with N and 2N round trips after the same start, the difference divided by the
extra round trips (start-up, discovery and warm-up cancel out). Kernel work is
not in the instruction counts: the system calls stand for it.

A benchmark reports, it never fails on timing: exit status 0 when every run
completed, 1 when a child failed or timed out. Everything runs on this machine, in a
private directory /tmp/vscpXXXXXXXX that is removed at the end (the discovery daemons
the SDK servers start there are stopped first).
"""
import argparse
import glob
import os
import platform
import re
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
LABELS = {"raw": "raw SEQPACKET", "sdk": "SDK (libvmci)", "base": "SDK (baseline)"}
SERVER_CID, CLIENT_CID = 2, 3
CALIBRATION_TRIPS = 300


class BenchError(RuntimeError):
    """A build or a child went wrong."""


def _cc(cc, args):
    result = subprocess.run(cc + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0 or result.stdout:
        raise BenchError("%s:\n%s" % (" ".join(cc + args), result.stdout))


def build(out_dir, baseline=None):
    """libvmci.so.0 and pingpong (linked against it) per source tree, and raw_pingpong, all -O2:
    ({impl: (library, program)}, raw_pingpong, the compiler's version line)."""
    cc = clib.find_compiler()
    if cc is None:
        raise BenchError("no C compiler (cc, gcc or clang) on PATH, and CC unset")
    sdks = {}
    for impl, src in (("sdk", SRC_DIR), ("base", baseline)):
        if src is None:
            continue
        lib_dir = os.path.join(out_dir, impl, "lib")
        # An older baseline lacks this tree's newer files: its own are the ones it has.
        sources = [name for name in clib.SOURCES if os.path.isfile(os.path.join(src, name))]
        try:
            library = clib.build_libvmci(lib_dir, src_dir=src, sources=sources)
        except clib.BuildError as exc:
            raise BenchError(str(exc)) from None
        program = os.path.join(out_dir, impl, "pingpong")
        _cc(cc, ["-O2", "-Wall", "-Wextra", "-I", src, os.path.join(C_DIR, "pingpong.c"), "-o", program,
                 "-L", lib_dir, "-lvmci", "-pthread"])
        sdks[impl] = (library, program)
    raw = os.path.join(out_dir, "raw_pingpong")
    _cc(cc, ["-O2", "-Wall", "-Wextra", os.path.join(C_DIR, "raw_pingpong.c"), "-o", raw])
    version = subprocess.run(cc + ["--version"], capture_output=True, text=True).stdout.splitlines()
    return sdks, raw, version[0] if version else " ".join(cc)


def _pinned(cpus):
    return lambda: os.sched_setaffinity(0, cpus)


class Bench:
    def __init__(self, workdir, sdks, raw, timeout):
        self.sdks, self.raw, self.timeout = sdks, raw, timeout
        self.impls = ("raw",) + tuple(sorted(sdks, reverse=True))  # raw, sdk[, base]
        # A runtime directory (so a discovery service) per implementation: each server registers "PINGPONG".
        self.rundirs = {impl: os.path.join(workdir, "run-" + impl) for impl in self.impls}
        for path in self.rundirs.values():
            os.mkdir(path)
        self.socket_path = os.path.join(self.rundirs["raw"], "raw.sock")
        base = dict(os.environ, VSOCKCOMPAT_TRANSPORT="local", VSOCKCOMPAT_PYTHON=sys.executable)
        base["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, base.get("PYTHONPATH")) if p)
        for name in ("LD_PRELOAD", "LD_LIBRARY_PATH"):
            base.pop(name, None)
        self.env = {}
        for impl in self.impls:
            env = dict(base, VSOCKCOMPAT_RUNDIR=self.rundirs[impl])
            if impl in sdks:
                env["VSOCKCOMPAT_LIBVMCI"] = sdks[impl][0]
            self.env[impl] = {"server": dict(env, VSOCKCOMPAT_CID=str(SERVER_CID)),
                              "client": dict(env, VSOCKCOMPAT_CID=str(CLIENT_CID))}
        self.servers = {}
        self.tool = lambda impl, role: []  # a prefix for the program (--counts)

    def _command(self, impl, args, role):
        tool = self.tool(impl, role)
        if impl in self.sdks:
            return [sys.executable, "-m", "vsockcompat", "run", "--"] + tool + [self.sdks[impl][1]] + args
        if args[0] == "-s":
            return tool + [self.raw, "-s", self.socket_path]
        return tool + [self.raw] + args[:-2] + [self.socket_path] + args[-2:]  # ... -c PATH N SIZE

    def start_servers(self, cpus, impls=None):
        for impl in impls or self.impls:
            proc = subprocess.Popen(self._command(impl, ["-s"], "server"), env=self.env[impl]["server"],
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, preexec_fn=_pinned(cpus))
            self.servers[impl] = proc
            line = proc.stdout.readline()  # "registered" / "listening", or "" if it died
            if not line.strip():
                proc.wait(self.timeout)
                raise BenchError("the %s server did not start: %s" % (impl, proc.stderr.read().strip()))

    def client(self, impl, cpus, n, size, batches, quit=False):
        """The client's name=value lines, plus server_cpu_us: the server's CPU time per round
        trip while this client ran (its warm-up included), if the kernel shows it."""
        args = ["-b", str(batches)] + (["-q"] if quit else []) + ["-c", str(n), str(size)]
        server = self.servers.get(impl)
        before = _cpu_ns(server.pid) if server is not None else None
        try:
            result = subprocess.run(self._command(impl, args, "client"), env=self.env[impl]["client"],
                                    capture_output=True,
                                    text=True, timeout=self.timeout, preexec_fn=_pinned(cpus))
        except subprocess.TimeoutExpired:
            raise BenchError("the %s client timed out after %.0f s" % (impl, self.timeout)) from None
        if result.returncode != 0:
            raise BenchError("the %s client failed (status %d): %s" % (impl, result.returncode,
                                                                       result.stderr.strip()))
        out = {k: float(v) for k, v in (line.split("=", 1) for line in result.stdout.split())}
        after = _cpu_ns(server.pid) if before is not None else None
        if after is not None:
            out["server_cpu_us"] = (after - before) / 1e3 / (n * batches + n // 10 + 1)
        return out

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

    def stop_daemons(self):
        """The discovery daemons the SDK servers started in our runtime directories."""
        for rundir in self.rundirs.values():
            _stop_daemon(rundir)


def _cpu_ns(pid):
    """CPU time of process pid so far, in ns (/proc/PID/schedstat), or None."""
    try:
        with open("/proc/%d/schedstat" % pid) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_daemon(rundir):
    try:
        with open(os.path.join(rundir, "ds.pid")) as f:
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
                order = bench.impls if r % 2 == 0 else bench.impls[::-1]
                for impl in order:
                    results.setdefault((layout, size, impl), []).append(
                        bench.client(impl, client_cpus, n, size, batches))
        bench.stop_servers(client_cpus)
    return results, trips


def _cpus(cpus):
    return ",".join(str(c) for c in sorted(cpus))


def summary(runs):
    """Median of the runs' medians, mean of their means, min and max over every batch; cpu: the
    median over the runs of the two processes' CPU time per round trip (None if not shown)."""
    cpus = [r["cpu_us"] + r["server_cpu_us"] for r in runs if "cpu_us" in r and "server_cpu_us" in r]
    return {"median": statistics.median(r["median_us"] for r in runs),
            "mean": statistics.mean(r["mean_us"] for r in runs),
            "min": min(r["min_us"] for r in runs), "max": max(r["max_us"] for r in runs),
            "cpu": statistics.median(cpus) if cpus else None}


def render(results, layouts, machine, impls):
    lines = ["C datagram ping-pong, SDK program under `vsockcompat run` vs raw AF_UNIX SOCK_SEQPACKET",
             machine, "us per round trip; median of the client runs' batch medians; min..max over all batches;",
             "CPU: CPU time of server and client per round trip (median of the runs), less sensitive to load",
             ""]
    header = ("layout", "size", "impl", "median", "mean", "min..max", "vs raw", "target", "result", "vs base",
              "CPU", "vs raw")
    rows = []
    for layout, _, _ in layouts:
        for size in SIZES:
            s = {impl: summary(results[(layout, size, impl)]) for impl in impls}
            for impl in impls:
                ratio = s[impl]["median"] / s["raw"]["median"]
                sdk = impl != "raw"
                rows.append((layout if impl == "raw" and size == SIZES[0] else "",
                             "%d B" % size if impl == "raw" else "", LABELS[impl],
                             "%.1f" % s[impl]["median"], "%.1f" % s[impl]["mean"],
                             "%.1f..%.1f" % (s[impl]["min"], s[impl]["max"]),
                             "%.2fx" % ratio if sdk else "", "<= %.2fx" % TARGET if sdk else "",
                             ("PASS" if ratio <= TARGET else "MISS") if sdk else "",
                             "%.2fx" % (s["sdk"]["median"] / s["base"]["median"])
                             if impl == "sdk" and "base" in s else "",
                             "%.2f" % s[impl]["cpu"] if s[impl]["cpu"] is not None else "",
                             "%.2fx" % (s[impl]["cpu"] / s["raw"]["cpu"])
                             if sdk and s[impl]["cpu"] is not None and s["raw"]["cpu"] else ""))
    return "\n".join(lines + _table(header, rows, ("<", "<", "<", ">", ">", ">", ">", ">", "<", ">", ">", ">")))


def _table(header, rows, align):
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return ["  ".join(format(cell, a + str(w)) for cell, a, w in zip(row, align, widths)).rstrip()
            for row in [header] + rows]


# --counts: instructions (callgrind) and system calls (strace -c) per round trip

STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", re.M)


def _trips(n):
    """Round trips of a client run of ``-b 1 -c n``: pingpong's warm-up (n/10 + 1), then n."""
    return n + n // 10 + 1


def _callgrind_total(prefix):
    """Instructions of the process callgrind wrote prefix.<pid> for: the largest total among
    them (a server also leaves the few of the child it forks to start the discovery daemon)."""
    totals = []
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            totals += [int(line.split()[1]) for line in f if line.startswith(("totals:", "summary:"))]
    if not totals:
        raise BenchError("callgrind wrote no count for " + prefix)
    return max(totals)


def _strace_calls(path):
    with open(path) as f:
        return {name: int(calls) for calls, name in STRACE_ROW.findall(f.read()) if name != "total"}


def _counted_pair(bench, impl, n, size, cpus, tool, outdir):
    """impl's server and one client of n round trips, both under tool: the server's and the
    client's output paths."""
    paths = []

    def prefix(impl_, role):
        paths.append(os.path.join(outdir, "%s-%d-%s-%d" % (impl_, n, role, len(paths))))
        return tool(paths[-1])

    bench.tool = prefix
    try:
        bench.start_servers(cpus, [impl])
        bench.client(impl, cpus, n, size, 1)
        bench.stop_servers(cpus)  # its quit client is counted too, and ignored
    finally:
        bench.tool = lambda impl_, role: []
    return paths[0], paths[1]


def counts(bench, size, n, cpus, workdir, log):
    """{(impl, role): (instructions, {syscall: calls}) per round trip}."""
    tools = {"instructions": lambda path: ["valgrind", "--tool=callgrind", "--callgrind-out-file=%s.%%p" % path],
             "syscalls": lambda path: ["strace", "-c", "-o", path]}
    readers = {"instructions": _callgrind_total, "syscalls": _strace_calls}
    out = {}
    for what, tool in tools.items():
        for impl in bench.impls:
            log("  %s of %s, %d B: %d and %d round trips" % (what, impl, size, n, 2 * n))
            outdir = tempfile.mkdtemp(dir=workdir)
            got = [_counted_pair(bench, impl, k, size, cpus, tool, outdir) for k in (n, 2 * n)]
            extra = _trips(2 * n) - _trips(n)
            for role, i in (("client", 1), ("server", 0)):
                one, two = readers[what](got[0][i]), readers[what](got[1][i])
                if what == "instructions":
                    value = (two - one) / extra
                else:
                    value = {k: (two.get(k, 0) - one.get(k, 0)) / extra for k in set(one) | set(two)}
                    value = {k: v for k, v in value.items() if v >= 0.005}
                out.setdefault((impl, role), {})[what] = value
    return out


def render_counts(found, impls, size, machine):
    lines = ["C datagram ping-pong, %d B, per round trip: user-space instructions (callgrind) and "
             "system calls (strace -c)" % size, machine, ""]
    header = ("impl", "side", "instructions", "vs raw", "system calls", "")
    rows = []
    for impl in impls:
        for role in ("client", "server"):
            got = found[(impl, role)]
            calls = got["syscalls"]
            rows.append((LABELS[impl] if role == "client" else "", role, "%.0f" % got["instructions"],
                         "%+.0f" % (got["instructions"] - found[("raw", role)]["instructions"]) if impl != "raw"
                         else "", "%.2f" % sum(calls.values()),
                         " ".join("%s %.2f" % kv for kv in sorted(calls.items(), key=lambda kv: -kv[1]))))
    return "\n".join(lines + _table(header, rows, ("<", "<", ">", ">", ">", "<")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 batches of about 0.05 s")
    parser.add_argument("--rounds", type=int, help="client runs per implementation and measurement (default 3)")
    parser.add_argument("--batches", type=int, help="timed batches per client run (default 7)")
    parser.add_argument("--batch-seconds", type=float, help="length of an SDK batch (default 0.15)")
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait for any child (s)")
    parser.add_argument("--baseline", metavar="SRC", help="also measure libvmci.so.0 built from this source tree")
    parser.add_argument("--counts", action="store_true",
                        help="instructions and system calls per round trip instead of times (valgrind, strace)")
    parser.add_argument("--trips", type=int, default=2000, help="N of --counts (it also runs 2N; default 2000)")
    parser.add_argument("--size", type=int, default=64, help="payload bytes of --counts (default 64)")
    args = parser.parse_args(argv)
    if args.baseline is not None and not os.path.isfile(os.path.join(args.baseline, "vsc_lib.c")):
        parser.error("--baseline %s: not a source tree of libvmci.so.0 (no vsc_lib.c)" % args.baseline)
    if args.counts:
        missing = [tool for tool in ("valgrind", "strace") if shutil.which(tool) is None]
        if missing:
            parser.error("--counts needs %s on PATH" % " and ".join(missing))
        if args.trips < 10 or not 1 <= args.size <= 69608:
            parser.error("--trips must be at least 10, --size 1..69608")
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
        sdks, raw, compiler = build(workdir, args.baseline)
        machine = "%d CPUs (%d usable), Linux %s %s, %s" % (
            os.cpu_count(), len(allowed), platform.release(), platform.machine(), compiler)
        bench = Bench(workdir, sdks, raw, args.timeout)
        if args.counts:
            log("counting on CPU %d (server and client) ..." % allowed[0])
            found = counts(bench, args.size, args.trips, {allowed[0]}, workdir, log)
            report = render_counts(found, bench.impls, args.size, machine + "; N = %d and %d" % (
                args.trips, 2 * args.trips))
        else:
            results, _ = measure(bench, layouts, rounds, batches, batch_seconds, log)
            report = render(results, layouts, machine + "; %d rounds x %d batches of about %.2f s" % (
                rounds, batches, batch_seconds), bench.impls)
    except BenchError as exc:
        print("c_pingpong: error: %s" % exc, file=sys.stderr)
        return 1
    finally:
        if bench is not None:
            bench.kill_servers()
            bench.stop_daemons()
        shutil.rmtree(workdir, ignore_errors=True)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
