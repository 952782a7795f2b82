"""Datagram ping-pong over the vsock transport versus raw AF_VSOCK SOCK_SEQPACKET, in the guest only.

    python testbed/guest.py run -- python benchmarks/vsock_pingpong.py            # about 1-2 min (TCG)
    python testbed/guest.py run -- python benchmarks/vsock_pingpong.py --quick

Runs only inside the guest test bed (``testbed/guest.py``), behind the same gate as the
real-vsock tests (``tests/real_vsock/conftest.py``): anywhere else it refuses, with the reason,
and exits with status 2 before creating any socket.

Two processes, the same pair for both implementations: this one (the client) and an echo
server it starts. ``raw`` is a Python AF_VSOCK SOCK_SEQPACKET connection on CID 1 with blocking
``send`` / ``recv_into`` on both sides; ``vsockcompat`` is a ``DatagramEndpoint`` on the vsock
transport (``send_status`` / ``recv_status``, the calls ``VMCIDatagram_SendTo`` and
``VMCIDatagram_RecvFrom`` make) on the chosen core and mode. In SEQPACKET mode its links are
direct (the core sends on the vsock connection); ``--pumped`` also measures endpoints whose
links go through a pump thread (``VsockTransport.direct_links = False``, as before direct
links), in the same run. They take turns, ``--rounds`` times each per payload size; a round is
``--count`` round trips, timed by the client. It prints the median round-trip time of each and
their ratios to raw (target <= 1.3x with the Cython core). A benchmark reports, it never fails
on timing: status 0 when every round completed, 1 otherwise.

``--syscalls`` counts instead of timing (counts are not noisy under load): the system calls per
64 B round trip between two endpoints of one process (a client and an echo thread, receives
waiting with a timeout), direct then pumped links, each from ``strace -f -c`` over ``--count``
round trips minus the same program making none (its start, the endpoints, the links).
"""
import argparse
import importlib.util
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

AF_VSOCK = 40
VMADDR_CID_LOCAL = 1
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
SIZES = (64, 4096)
TARGET = 1.3
TIMEOUT = 120.0


def gate_reason():
    """None inside the guest test bed, else why AF_VSOCK must not be used here (no socket made)."""
    path = os.path.join(ROOT, "tests", "real_vsock", "conftest.py")
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.append(tests)   # the gate's conftest imports bed_gates from there
    spec = importlib.util.spec_from_file_location("_vsock_gate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gate()


def refusal(name):
    """None inside the guest test bed; elsewhere print why ``name`` refuses to run and return 2."""
    reason = gate_reason()
    if reason is None:
        return None
    print("%s: refusing to run: %s" % (name, reason), file=sys.stderr)
    return 2


def base_parser(doc):
    """The options of every guest benchmark: ``--core`` and ``--mode``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--core", choices=("cython", "pure"), default="cython")
    parser.add_argument("--mode", choices=("auto", "seqpacket", "stream"), default="auto")
    return parser


def runtime(core, mode, rundir, pumped=False):
    """A vsock runtime; ``pumped``: its links go through a pump thread, not direct."""
    from vsockcompat._settings import Settings
    from vsockcompat.runtime import Runtime

    settings = Settings(no_extensions=core == "pure", rundir=rundir, cid=2, transport="vsock",
                        ds_autostart=False)._replace(vsock_mode=mode)
    rt = Runtime(settings, core=core)
    if pumped:
        rt.transport.direct_links = False
    return rt


# ------------------------------------------------------------------ the echo server (child)

def serve(core, mode, rundir):
    from vsockcompat.datagram import DatagramEndpoint

    listener = socket.socket(AF_VSOCK, socket.SOCK_SEQPACKET)
    listener.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
    listener.listen(1)
    eps = {"vsc": DatagramEndpoint(runtime=runtime(core, mode, rundir)),
           "pumped": DatagramEndpoint(runtime=runtime(core, mode, rundir, pumped=True))}
    print("ports %d %d %d" % (listener.getsockname()[1], eps["vsc"].handle.resource,
                              eps["pumped"].handle.resource), flush=True)
    conn, _ = listener.accept()
    buf = bytearray(70000)
    view = memoryview(buf)
    for line in sys.stdin:
        what, count = line.split()
        count = int(count)
        if what == "raw":
            for _ in range(count):
                n = conn.recv_into(buf)
                conn.send(view[:n])
        else:
            ep = eps[what]
            for _ in range(count):
                n, src = ep.recv_status(view, TIMEOUT)
                if n < 0:
                    print("error %d" % n, flush=True)
                    return 1
                ep.send_status(src, view, n)
        print("done", flush=True)
    conn.close()
    for ep in eps.values():
        ep.close()
    listener.close()
    return 0


# ------------------------------------------------------------------ the client (this process)

def measure(args):
    from vsockcompat.datagram import DatagramEndpoint
    from vsockcompat.handles import VMCIHandle

    rundir = tempfile.mkdtemp(prefix="vscv")
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", "--core", args.core,
                              "--mode", args.mode, "--rundir", rundir],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        first = child.stdout.readline().split()
        if len(first) != 4:
            print("vsock_pingpong: the echo server did not start (status %s)" % child.wait(TIMEOUT),
                  file=sys.stderr)
            return [], False, args.core, args.mode
        _, raw_port, rid, pumped_rid = first
        raw = socket.socket(AF_VSOCK, socket.SOCK_SEQPACKET)
        raw.settimeout(TIMEOUT)
        raw.connect((VMADDR_CID_LOCAL, int(raw_port)))
        rt = runtime(args.core, args.mode, rundir)
        eps = {"vsc": DatagramEndpoint(runtime=rt),
               "pumped": DatagramEndpoint(runtime=runtime(args.core, args.mode, rundir, pumped=True))}
        dsts = {"vsc": VMCIHandle(rt.transport.local_cid, int(rid)),
                "pumped": VMCIHandle(rt.transport.local_cid, int(pumped_rid))}
        rbuf = bytearray(70000)
        rview = memoryview(rbuf)

        def run_raw(payload, count):
            child.stdin.write("raw %d\n" % count)
            start = time.perf_counter()
            for _ in range(count):
                raw.send(payload)
                raw.recv_into(rbuf)
            elapsed = time.perf_counter() - start
            return elapsed, child.stdout.readline() == "done\n"

        def vsc_runner(what):
            ep, dst = eps[what], dsts[what]

            def run_vsc(payload, count):
                child.stdin.write("%s %d\n" % (what, count))
                size = len(payload)
                start = time.perf_counter()
                for _ in range(count):
                    if ep.send_status(dst, payload, size) < 0 or ep.recv_status(rview, TIMEOUT)[0] != size:
                        return None, False
                elapsed = time.perf_counter() - start
                return elapsed, child.stdout.readline() == "done\n"
            return run_vsc

        runs = [("raw", run_raw), ("vsockcompat", vsc_runner("vsc"))]
        if args.pumped:
            runs.append(("pumped", vsc_runner("pumped")))
        results = []
        ok = True
        for size in SIZES:
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            for _, run in runs:  # warm-up
                run(payload, args.count // 4)
            times = {name: [] for name, _ in runs}
            for _ in range(args.rounds):
                for name, run in runs:
                    elapsed, done = run(payload, args.count)
                    if not done:
                        ok = False
                        break
                    times[name].append(elapsed / args.count * 1e6)
            if not ok:
                break
            results.append((size, {name: statistics.median(us) for name, us in times.items()}))
        child.stdin.close()
        ok = child.wait(TIMEOUT) == 0 and ok
        for ep in eps.values():
            ep.close()
        raw.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(rundir, ignore_errors=True)
    return results, ok, rt.core.NAME, rt.transport.mode


# ------------------------------------------------------------------ system calls (--syscalls)

#: Calls of the Python runtime and this harness rather than of the datagram path: the GIL's
#: futexes, the allocator's, the receive timeouts' clock reads (system calls under TCG).
RUNTIME_CALLS = ("futex", "mmap", "munmap", "madvise", "brk", "mprotect", "clock_gettime")


def round_trips(core, kind, count):
    """The program ``strace`` counts: one warm-up, then ``count`` 64 B round trips."""
    import threading

    from vsockcompat.datagram import DatagramEndpoint

    rundir = tempfile.mkdtemp(prefix="vsc", dir="/tmp")
    rt = runtime(core, "seqpacket", rundir, pumped=kind == "pumped")
    client, echo = DatagramEndpoint(runtime=rt), DatagramEndpoint(runtime=rt)

    def serve():
        view = memoryview(bytearray(70000))
        for _ in range(count + 1):
            n, src = echo.recv_status(view, TIMEOUT)
            echo.send_status(src, view, n)

    server = threading.Thread(target=serve)
    server.start()
    payload, view = bytes(64), memoryview(bytearray(70000))
    ok = True
    for _ in range(count + 1):
        ok = ok and client.send_status(echo.handle, payload, 64) >= 0 and client.recv_status(view, TIMEOUT)[0] == 64
    server.join(TIMEOUT)
    client.close()
    echo.close()
    shutil.rmtree(rundir, ignore_errors=True)
    return 0 if ok else 1


def strace_counts(text):
    """``{syscall: calls}`` from the table of ``strace -c``."""
    counts = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] != "total" and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])
    return counts


def count_calls(args):
    """Print the system calls per round trip of direct and pumped links; False if a run failed."""
    strace = shutil.which("strace")
    if strace is None:
        print("vsock_pingpong: --syscalls needs strace", file=sys.stderr)
        return False
    per_trip = {}
    for kind in ("direct", "pumped"):
        runs = {}
        for count in (0, args.count):
            with tempfile.NamedTemporaryFile("r", prefix="vsc-strace") as out:
                cmd = [strace, "-f", "-c", "-o", out.name, sys.executable, os.path.abspath(__file__),
                       "--core", args.core, "--calls-of", kind, "--count", str(count)]
                if subprocess.run(cmd, timeout=TIMEOUT * 5).returncode != 0:
                    return False
                runs[count] = strace_counts(out.read())
        per_trip[kind] = {name: (runs[args.count].get(name, 0) - runs[0].get(name, 0)) / args.count
                          for name in set(runs[0]) | set(runs[args.count])}
    print("vsock system calls per 64 B round trip, Linux %s, core %s, one process, %d round trips "
          "minus none (strace -f -c)" % (platform.release(), args.core, args.count))
    names = sorted({n for calls in per_trip.values() for n, v in calls.items() if abs(v) >= 0.05})
    print("%-16s %8s %8s" % ("call", "direct", "pumped"))
    for name in names:
        print("%-16s %8.2f %8.2f" % (name, per_trip["direct"].get(name, 0), per_trip["pumped"].get(name, 0)))
    for title, left_out in (("total", ()), ("datagram path", RUNTIME_CALLS)):
        totals = [sum(v for n, v in per_trip[kind].items() if n not in left_out) for kind in ("direct", "pumped")]
        print("%-16s %8.2f %8.2f   direct/pumped %.2fx" % (title, totals[0], totals[1], totals[0] / totals[1]))
    return True


def main(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--count", type=int, default=2000, help="round trips per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per implementation and size")
    parser.add_argument("--quick", action="store_true", help="--count 500 --rounds 3")
    parser.add_argument("--pumped", action="store_true",
                        help="also measure pumped links (as before direct links), in the same run")
    parser.add_argument("--syscalls", action="store_true",
                        help="count system calls per round trip (strace), direct and pumped, instead of timing")
    parser.add_argument("--calls-of", choices=("direct", "pumped"), help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rundir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    refused = refusal("vsock_pingpong")
    if refused:
        return refused
    if args.serve:
        return serve(args.core, args.mode, args.rundir)
    if args.calls_of:
        return round_trips(args.core, args.calls_of, args.count)
    if args.syscalls:
        return 0 if count_calls(args) else 1
    if args.quick:
        args.count, args.rounds = 500, 3
    results, ok, core, mode = measure(args)
    print("vsock ping-pong, Linux %s, %s, core %s, mode %s, %d x %d round trips, medians"
          % (platform.release(), platform.python_implementation() + " " + platform.python_version(),
             core, mode, args.rounds, args.count))
    print("%-8s %12s %16s %8s %6s %12s %8s %14s" % ("payload", "raw (us)", "vsockcompat (us)", "ratio", "",
                                                  "pumped (us)", "ratio", "direct/pumped"))
    for size, us in results:
        ratio = us["vsockcompat"] / us["raw"]
        verdict = ("PASS" if ratio <= TARGET else "MISS") if core == "cython" else ""
        line = "%-8s %12.1f %16.1f %7.2fx %6s" % ("%d B" % size, us["raw"], us["vsockcompat"], ratio, verdict)
        if "pumped" in us:
            line += " %12.1f %7.2fx %13.2fx" % (us["pumped"], us["pumped"] / us["raw"],
                                                us["vsockcompat"] / us["pumped"])
        print(line)
    if not ok:
        print("a round did not complete", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
