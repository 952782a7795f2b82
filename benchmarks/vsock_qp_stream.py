"""Queue-pair stream throughput over vsock versus raw AF_VSOCK SOCK_STREAM, in the guest only.

    python testbed/guest.py run -- python benchmarks/vsock_qp_stream.py            # about 1-2 min (TCG)
    python testbed/guest.py run -- python benchmarks/vsock_qp_stream.py --quick

Runs only inside the guest test bed (``testbed/guest.py``), behind the same gate as the
real-vsock tests (``tests/real_vsock/conftest.py``): anywhere else it refuses, with the reason,
and exits with status 2 before creating any socket.

Two processes, the same pair for both implementations: this one (the consumer) and a producer
child it starts. ``raw`` is a Python AF_VSOCK SOCK_STREAM connection on CID 1: the producer
``sendall``s each write, the consumer ``recv_into``s a 64 KiB buffer. ``queue pair`` is a
``StreamQueuePair`` (the vsock transport's queue pairs) of ``--queue`` bytes each way (default
256 KiB, the vsock socket buffer): the producer ``enqueue_status``es each write (the rest of a
partial enqueue again; on NOSPACE, ``wait_for_space_status`` for the rest, as ``sendall`` waits
for room), the consumer ``dequeue_status``es
into the same 64 KiB buffer (``wait_for_data_status`` on NODATA). They take turns, ``--rounds``
times each per write size; a round moves ``--mib`` MiB, timed by the consumer from its request to
the last byte. Before the timed rounds, one round of each checks the bytes (crc32 of the whole
stream on both sides). It prints the median MB/s of each, the queue pair's share of raw (target
>= 90% with the Cython core) and both processes' CPU time per MiB, then the queue pair's counts
per MiB over its timed rounds (``StreamQueuePair.stream_counts``; not noisy): the producer's
``sendmsg`` and ``recvmsg`` calls, DATA and WANT frames, the consumer's ``recvmsg`` and
``sendmsg`` calls and CREDIT frames.
Raw sends one vsock packet per 64 KiB ``send`` (16 per MiB): a DATA frame's header makes a
64 KiB write two (the kernel cuts each ``sendmsg`` into packets of at most 64 KiB). ``raw+hdr``
prices that alone: raw ``SOCK_STREAM`` again, each write sent as one ``sendmsg`` of a frame
header's worth of bytes (``mirror_wire.HEADER.size``) and the payload, so 64 KiB writes also
make two packets; its rate counts payload bytes only, and its share of raw is printed. A benchmark
reports, it never fails on timing: status 0 when every round completed and the checks agreed,
1 otherwise.
"""
import argparse
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

from vsockcompat.mirror_wire import HEADER
from vsock_pingpong import AF_VSOCK, VMADDR_CID_ANY, VMADDR_CID_LOCAL, VMADDR_PORT_ANY, base_parser, refusal, runtime

SIZES = (65536, 4096)
COUNTED = ("sendmsg", "recvmsg", "DATA", "CREDIT", "WANT")
TARGET = 0.9
TIMEOUT = 120.0
RECV = 1 << 16
#: What ``raw+hdr`` adds to each write: a queue-pair DATA frame's header bytes.
PAD = HEADER.size
KINDS = ("raw", "rawhdr", "qp")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def counts_since(qp, before):
    """The queue pair's ``stream_counts`` minus ``before`` (a tuple in ``COUNTED`` order)."""
    now = qp.stream_counts()
    return tuple(now[k] - b for k, b in zip(COUNTED, before))


def pattern(size: int) -> bytes:
    return bytes(range(251)) * (size // 251 + 1)


# ------------------------------------------------------------------ the producer (child)

def send_padded(sock, payload):
    """``PAD`` zero bytes and ``payload`` in one ``sendmsg`` (as a DATA frame goes), the rest
    of a partial send after it."""
    parts = [memoryview(bytes(PAD)), payload]
    left = PAD + len(payload)
    while left:
        n = sock.sendmsg(parts)
        left -= n
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts.pop(0)
        if n:
            parts[0] = parts[0][n:]


def produce(core, mode, rundir, raw_port, qp_rid, queue):
    from vsockcompat import constants as C
    from vsockcompat.handles import VMCIHandle
    from vsockcompat.queuepair import QueuePair

    rt = runtime(core, mode, rundir)
    raw = socket.socket(AF_VSOCK, socket.SOCK_STREAM)
    raw.settimeout(TIMEOUT)
    raw.connect((VMADDR_CID_LOCAL, raw_port))
    qp = QueuePair.alloc(VMCIHandle(rt.transport.local_cid, qp_rid), queue, queue,
                         flags=C.VMCI_QPFLAG_LOCAL, runtime=rt)
    print("attached", flush=True)
    data = pattern(1 << 17)
    for line in sys.stdin:
        what, size, count = line.split()
        size, count, check = int(size), int(count), what.startswith("check-")
        what = what[len("check-"):] if check else what
        crc = 0
        cpu = cpu_seconds()
        before = counts_since(qp, (0,) * len(COUNTED))
        for i in range(count):
            payload = memoryview(data)[i % 251:i % 251 + size]
            if what == "raw":
                raw.sendall(payload)
            elif what == "rawhdr":
                send_padded(raw, payload)
            else:
                while payload:
                    n = qp.enqueue_status(payload)
                    if n == C.VMCI_ERROR_QUEUEPAIR_NOSPACE:   # as sendall: wait for room for the rest
                        n = qp.wait_for_space_status(min(len(payload), queue - 1), TIMEOUT)
                        if n < 0:
                            print("error %d" % n, flush=True)
                            return 1
                        continue
                    if n < 0:
                        print("error %d" % n, flush=True)
                        return 1
                    payload = payload[n:]
            if check:
                if what == "rawhdr":
                    crc = zlib.crc32(bytes(PAD), crc)
                crc = zlib.crc32(data[i % 251:i % 251 + size], crc)
        print("done %d %.6f %s" % (crc, cpu_seconds() - cpu, " ".join(map(str, counts_since(qp, before)))),
              flush=True)
    qp.detach()
    raw.close()
    return 0


# ------------------------------------------------------------------ the consumer (this process)

def measure(args):
    from vsockcompat import constants as C
    from vsockcompat.queuepair import QueuePair

    rundir = tempfile.mkdtemp(prefix="vscq")
    rt = runtime(args.core, args.mode, rundir)
    listener = socket.socket(AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
    listener.listen(1)
    qp = QueuePair.alloc(None, args.queue, args.queue, flags=C.VMCI_QPFLAG_LOCAL, runtime=rt)
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--produce", "--core", args.core,
                              "--mode", args.mode, "--rundir", rundir, "--queue", str(args.queue),
                              "--port", str(listener.getsockname()[1]), "--rid", str(qp.handle.resource)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    raw = None
    buf = bytearray(RECV)
    view = memoryview(buf)
    try:
        listener.settimeout(TIMEOUT)
        raw, _ = listener.accept()
        raw.settimeout(TIMEOUT)
        if child.stdout.readline() != "attached\n":
            print("vsock_qp_stream: the producer did not attach (status %s)" % child.wait(TIMEOUT),
                  file=sys.stderr)
            return [], False, args.core, args.mode

        def run(what, size, count, check=False):
            """(seconds, consumer CPU s, producer CPU s, the consumer's and the producer's counts),
            or None when the round failed."""
            total, got, crc = (size + PAD if what == "rawhdr" else size) * count, 0, 0
            cpu = cpu_seconds()
            before = counts_since(qp, (0,) * len(COUNTED))
            child.stdin.write("%s%s %d %d\n" % ("check-" if check else "", what, size, count))
            start = time.perf_counter()
            while got < total:
                if what != "qp":
                    n = raw.recv_into(buf)
                    if not n:
                        return None
                else:
                    n = qp.dequeue_status(buf)
                    if n == C.VMCI_ERROR_QUEUEPAIR_NODATA:
                        if qp.wait_for_data_status(TIMEOUT) < 0:
                            return None
                        continue
                    if n < 0:
                        return None
                if check:
                    crc = zlib.crc32(view[:n], crc)
                got += n
            elapsed = time.perf_counter() - start
            mine = cpu_seconds() - cpu
            done = child.stdout.readline().split()
            if len(done) != 3 + len(COUNTED) or done[0] != "done" or got != total or (check and int(done[1]) != crc):
                return None
            return elapsed, mine, float(done[2]), counts_since(qp, before), tuple(map(int, done[3:]))

        results, ok = [], True
        for size in args.sizes:
            count = args.mib * (1 << 20) // size
            ok = all(run(what, size, count, check=True) for what in KINDS)
            if not ok:
                break
            runs = {what: [] for what in KINDS}
            for _ in range(args.rounds):
                for what in KINDS:
                    r = run(what, size, count)
                    if r is None:
                        ok = False
                        break
                    runs[what].append(r)
            if not ok:
                break
            mib = count * size / (1 << 20)

            def summary(rs):
                rate = statistics.median(count * size / r[0] / 1e6 for r in rs)
                return (rate, min(count * size / r[0] / 1e6 for r in rs), max(count * size / r[0] / 1e6 for r in rs),
                        statistics.median(r[1] / mib for r in rs), statistics.median(r[2] / mib for r in rs))
            raw_s, hdr_s, qp_s = (summary(runs[what]) for what in KINDS)
            per_mib = {}
            for side, index in (("consumer", 3), ("producer", 4)):
                sums = [sum(r[index][k] for r in runs["qp"]) for k in range(len(COUNTED))]
                per_mib[side] = dict(zip(COUNTED, (x / (mib * len(runs["qp"])) for x in sums)))
            results.append((size, raw_s, qp_s, qp_s[0] / raw_s[0], per_mib, hdr_s))
        child.stdin.close()
        ok = child.wait(TIMEOUT) == 0 and ok
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for sock in (raw, listener):
            if sock is not None:
                sock.close()
        qp.detach()
        shutil.rmtree(rundir, ignore_errors=True)
    return results, ok, rt.core.NAME, rt.transport.mode


def main(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--queue", type=int, default=1 << 18, help="queue-pair size each way (bytes)")
    parser.add_argument("--mib", type=int, default=4, help="MiB per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per implementation and write size")
    parser.add_argument("--quick", action="store_true", help="--mib 2 --rounds 3")
    parser.add_argument("--sizes", type=lambda v: tuple(int(x) for x in v.split(",")), default=SIZES,
                        help="write sizes, comma-separated (default %s)" % ",".join(map(str, SIZES)))
    parser.add_argument("--produce", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rundir", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    refused = refusal("vsock_qp_stream")
    if refused:
        return refused
    if args.produce:
        return produce(args.core, args.mode, args.rundir, args.port, args.rid, args.queue)
    if args.quick:
        args.mib, args.rounds = 2, 3
    results, ok, core, mode = measure(args)
    print("vsock queue-pair stream, Linux %s, %s, core %s, %d-byte queues, %d x %d MiB per write size, "
          "medians (min..max); load average %s"
          % (platform.release(), platform.python_implementation() + " " + platform.python_version(),
             core, args.queue, args.rounds, args.mib, " ".join("%.2f" % x for x in os.getloadavg())))
    print("%-7s %-22s %-22s %7s  %s" % ("write", "raw MB/s", "queue pair MB/s", "qp/raw",
                                      "CPU s/MiB raw, qp (consumer+producer)"))
    for size, raw_s, qp_s, ratio, _, _ in results:
        verdict = ("PASS" if ratio >= TARGET else "MISS") if core == "cython" else ""
        print("%-7s %-22s %-22s %6.0f%% %s  %.3f+%.3f, %.3f+%.3f"
              % ("%d B" % size, "%.1f (%.1f..%.1f)" % raw_s[:3], "%.1f (%.1f..%.1f)" % qp_s[:3],
                 100 * ratio, verdict, raw_s[3], raw_s[4], qp_s[3], qp_s[4]))
    for size, raw_s, _, _, _, hdr_s in results:
        print("%-7s raw+hdr (%d more bytes per write) %.1f MB/s (%.1f..%.1f) of payload: %.0f%% of raw"
              % ("%d B" % size, PAD, hdr_s[0], hdr_s[1], hdr_s[2], 100 * hdr_s[0] / raw_s[0]))
    for size, _, _, _, per_mib, _ in results:
        prod, cons = per_mib["producer"], per_mib["consumer"]
        print("%-7s queue pair per MiB: producer %.1f sendmsg, %.1f recvmsg, %.1f DATA, %.1f WANT (writes: %.1f); "
              "consumer %.1f recvmsg, %.1f sendmsg, %.1f CREDIT"
              % ("%d B" % size, prod["sendmsg"], prod["recvmsg"], prod["DATA"], prod["WANT"], (1 << 20) / size,
                 cons["recvmsg"], cons["sendmsg"], cons["CREDIT"]))
    if not ok:
        print("a round did not complete or a check failed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
