"""``vsockcompat soak``: a bounded load test of datagrams and queue pairs on the local transport.

Three phases, each in a private runtime directory under /tmp (removed at the end):

1. **Datagrams.** ``--senders`` processes (each its own context 10, 11, ...)
   send ``--datagrams`` sequence-numbered datagrams in total to one receiver
   (this process, context 2). A sender retries a send refused with
   VMCI_ERROR_NO_RESOURCES (the queue bound) and counts a datagram as accepted
   only when the send returned its size. The receiver checks every datagram:
   the source is the sender's context, the sequence number is exactly the next
   one of that sender (a smaller one is a duplicate, a larger one a loss or a
   reordering), the padding is intact; and at the end that it received exactly
   what each sender was told was accepted.
2. **Queue pair.** One process writes ``--qp-bytes`` pseudo-random bytes into
   a queue pair this process created and reads; both sides hash every byte
   (BLAKE2b) and the digests and counts must match.
3. **Latency.** ``--latency-samples`` datagram round trips (ping-pong with an
   echo process), timed one by one: p50, p99, p99.9.

Everything is bounded: a run that passes ``--time-limit`` seconds stops and
fails, children (which also carry the deadline themselves) are killed at the
end, and the runtime directory and any shared memory left in it are removed.
Exit status: 0 when every check held, 1 on any violation, 2 for bad arguments.
"""
import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from . import constants as C

__all__ = ["main"]

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RECEIVER_CID = 2
_FIRST_SENDER_CID = 10
_QP_WRITER_CID = 3
_ECHO_CID = 4
_SEQ = struct.Struct("<IQ")  # sender index, sequence number
_PING = struct.Struct("<Q")
_QP_CHUNK = 1 << 16
_QP_BLOCK = 1 << 20  # the writer's stream repeats fresh random blocks of this size
_BACKOFF_MIN, _BACKOFF_MAX = 20e-6, 2e-3


def _runtime(rundir: str, cid: int, core: str):
    from ._settings import Settings
    from .runtime import Runtime
    return Runtime(Settings(no_extensions=core == "pure", rundir=rundir, cid=cid, transport="local",
                            ds_autostart=False), core=core)


def _padding(size: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(max(size - _SEQ.size, 0)))


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


# Children: each prints one JSON line on stdout when done.

def _child_sender(args) -> int:
    from .datagram import DatagramEndpoint
    from .handles import VMCIHandle
    rt = _runtime(args.rundir, _FIRST_SENDER_CID + args.index, args.core)
    dst = VMCIHandle(_RECEIVER_CID, args.dst)
    pad = _padding(args.payload_size)
    buf = bytearray(_SEQ.size + len(pad))
    buf[_SEQ.size:] = pad
    accepted = retries = 0
    error = None
    with DatagramEndpoint(runtime=rt) as ep:
        send, pack = ep.send_status, _SEQ.pack_into
        for seq in range(args.count):
            pack(buf, 0, args.index, seq)
            backoff = _BACKOFF_MIN
            while True:
                rc = send(dst, buf, len(buf))
                if rc >= 0:
                    break
                if rc != C.VMCI_ERROR_NO_RESOURCES:
                    error = "send of #%d returned %d" % (seq, rc)
                    break
                retries += 1
                if time.time() > args.deadline or _orphaned(args.parent):
                    error = "time limit reached at #%d" % seq
                    break
                time.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            if error:
                break
            accepted += 1
    print(json.dumps({"accepted": accepted, "retries": retries, "error": error}), flush=True)
    return 0 if error is None else 1


def _child_qp_writer(args) -> int:
    from .handles import VMCIHandle
    from .queuepair import QueuePair
    rt = _runtime(args.rundir, _QP_WRITER_CID, args.core)
    qp = QueuePair.alloc(VMCIHandle(_RECEIVER_CID, args.dst), produce_size=args.qp_size,
                         consume_size=4096, runtime=rt)
    rng = random.Random(args.seed)
    digest = hashlib.blake2b()
    written = 0
    error = None
    try:
        while written < args.qp_bytes and error is None:
            block = memoryview(rng.randbytes(min(_QP_BLOCK, args.qp_bytes - written)))
            off = 0
            while off < len(block):
                rc = qp.enqueue_status(block[off:off + _QP_CHUNK])
                if rc > 0:
                    digest.update(block[off:off + rc])
                    off += rc
                    written += rc
                elif rc == C.VMCI_ERROR_QUEUEPAIR_NOSPACE:
                    if time.time() > args.deadline or _orphaned(args.parent):
                        error = "time limit reached after %d bytes" % written
                        break
                    qp.wait_for_space_status(min(_QP_CHUNK, args.qp_size - 1), timeout=0.5)
                else:
                    error = "enqueue returned %d after %d bytes" % (rc, written)
                    break
        # Wait until the reader took everything, so the detach never races the last bytes.
        while error is None and qp.produce_buf_ready() > 0:
            if time.time() > args.deadline or _orphaned(args.parent):
                error = "time limit reached with %d bytes unread" % qp.produce_buf_ready()
            time.sleep(0.001)
    finally:
        qp.detach_status()
    print(json.dumps({"written": written, "digest": digest.hexdigest(), "error": error}), flush=True)
    return 0 if error is None else 1


def _child_echo(args) -> int:
    from .datagram import DatagramEndpoint
    rt = _runtime(args.rundir, _ECHO_CID, args.core)
    buf = bytearray(C.VMCI_MAX_DG_PAYLOAD_SIZE)
    with DatagramEndpoint(runtime=rt) as ep:
        print(json.dumps({"resource": ep.handle.resource}), flush=True)
        echoed = 0
        while echoed < args.count and time.time() < args.deadline and not _orphaned(args.parent):
            n, src = ep.recv_status(buf, 0.5)
            if n >= 0:
                ep.send_status(src, buf, n)
                echoed += 1
    return 0


# The supervisor.

class _Run:
    def __init__(self, args):
        self.args = args
        self.core = args.core
        self.rundir = tempfile.mkdtemp(prefix="vscsoak", dir="/tmp")
        self.deadline = time.time() + args.time_limit
        self.children: List[subprocess.Popen] = []
        self.violations: List[str] = []
        self.report: Dict[str, dict] = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def spawn(self, role: str, *extra: str) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        env["VSOCKCOMPAT_NO_EXTENSIONS"] = "1" if self.core == "pure" else "0"
        err = open(os.path.join(self.rundir, "%s.%d.err" % (role, len(self.children))), "wb")
        with err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vsockcompat.soak", "--child", role, "--rundir", self.rundir,
                 "--core", self.core, "--deadline", repr(self.deadline), "--parent", str(os.getpid())]
                + list(extra), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                cwd="/")
        proc.errfile = err.name
        self.children.append(proc)
        return proc

    def result(self, proc: subprocess.Popen, what: str) -> Optional[dict]:
        try:
            out, _ = proc.communicate(timeout=max(self.left(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.violations.append("%s did not finish within the time limit" % what)
            return None
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            with open(proc.errfile, errors="replace") as f:
                tail = f.read()[-2000:]
            self.violations.append("%s exited %s without a result: %s" % (what, proc.returncode, tail))
            return None

    def close(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=5)
        from .queuepair import shm_name
        from .handles import VMCIHandle
        prefix = shm_name(self.rundir, VMCIHandle(0, 0))[:-len("qp.0.0")]
        with contextlib.suppress(OSError):
            for name in os.listdir("/dev/shm"):
                if name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join("/dev/shm", name))
        shutil.rmtree(self.rundir, ignore_errors=True)

    # Phase 1

    def datagrams(self) -> None:
        from .datagram import DatagramEndpoint
        args = self.args
        n = args.senders
        counts = [args.datagrams // n + (1 if i < args.datagrams % n else 0) for i in range(n)]
        pad = _padding(args.payload_size)
        size = _SEQ.size + len(pad)
        expected = [0] * n
        violations = self.violations
        received = 0
        with DatagramEndpoint(runtime=_runtime(self.rundir, _RECEIVER_CID, self.core)) as ep:
            start = time.perf_counter()
            senders = [self.spawn("sender", "--index", str(i), "--count", str(counts[i]),
                                  "--dst", str(ep.handle.resource), "--payload-size", str(args.payload_size))
                       for i in range(n)]
            buf = bytearray(C.VMCI_MAX_DG_PAYLOAD_SIZE)
            view = memoryview(buf)
            unpack = _SEQ.unpack_from
            recv = ep.recv_status
            live = set(senders)
            results: Dict[int, dict] = {}
            target = None
            while True:
                got, src = recv(view, 0.2)
                if got >= 0:
                    received += 1
                    if got != size:
                        violations.append("datagram of %d bytes, expected %d" % (got, size))
                        continue
                    index, seq = unpack(buf)
                    if index >= n or src.context != _FIRST_SENDER_CID + index:
                        violations.append("datagram claiming sender %d from %s" % (index, tuple(src)))
                        continue
                    want = expected[index]
                    if seq != want:
                        violations.append("sender %d: got #%d, expected #%d (%s)" % (
                            index, seq, want, "duplicate or reordered" if seq < want else "lost datagrams"))
                        if seq < want:
                            continue
                    expected[index] = seq + 1
                    if buf[_SEQ.size:size] != pad:
                        violations.append("sender %d: #%d corrupted" % (index, seq))
                    if len(violations) > 20:
                        break
                    if target is not None and received >= target:
                        break
                    continue
                if got != C.VMCI_ERROR_TIMEOUT:
                    violations.append("receive returned %d" % got)
                    break
                for proc in [p for p in live if p.poll() is not None]:
                    live.discard(proc)
                    results[senders.index(proc)] = self.result(proc, "sender %d" % senders.index(proc))
                if not live:
                    target = sum(r["accepted"] for r in results.values() if r)
                    if received >= target:
                        break
                if self.left() <= 0:
                    violations.append("time limit reached in the datagram phase (%d received)" % received)
                    break
            elapsed = time.perf_counter() - start
            # Anything still queued would be a duplicate or something nobody was told was accepted.
            while not violations:
                got, src = recv(view, 0.2)
                if got < 0:
                    break
                violations.append("extra datagram after all accepted ones arrived")
        accepted = [r["accepted"] if r else 0 for r in (results.get(i) for i in range(n))]
        retries = sum(r["retries"] for r in results.values() if r)
        for i, r in sorted(results.items()):
            if r and r["error"]:
                violations.append("sender %d: %s" % (i, r["error"]))
            if r and expected[i] != r["accepted"]:
                violations.append("sender %d: %d accepted, %d received" % (i, r["accepted"], expected[i]))
        self.report["datagrams"] = {
            "senders": n, "sent": sum(counts), "accepted": sum(accepted), "received": received,
            "retries_no_resources": retries, "payload_size": size, "seconds": round(elapsed, 3),
            "per_second": round(received / elapsed) if elapsed else 0,
            "mib_per_second": round(received * size / elapsed / 2**20, 2) if elapsed else 0,
        }

    # Phase 2

    def queue_pair(self) -> None:
        from .queuepair import QueuePair
        args = self.args
        if args.qp_bytes == 0:
            return
        rt = _runtime(self.rundir, _RECEIVER_CID, self.core)
        qp = QueuePair.alloc(None, produce_size=4096, consume_size=args.qp_size, runtime=rt)
        digest = hashlib.blake2b()
        got = 0
        try:
            start = time.perf_counter()
            writer = self.spawn("qp-writer", "--dst", str(qp.handle.resource), "--qp-size", str(args.qp_size),
                                "--qp-bytes", str(args.qp_bytes), "--seed", str(args.seed))
            buf = bytearray(_QP_CHUNK * 4)
            view = memoryview(buf)
            while True:
                rc = qp.dequeue_status(view)
                if rc > 0:
                    digest.update(view[:rc])
                    got += rc
                    continue
                if rc == C.VMCI_ERROR_QUEUEPAIR_NOTATTACHED:
                    break  # the writer detached and everything it wrote was read
                if rc != C.VMCI_ERROR_QUEUEPAIR_NODATA:
                    self.violations.append("dequeue returned %d after %d bytes" % (rc, got))
                    break
                if self.left() <= 0:
                    self.violations.append("time limit reached in the queue-pair phase (%d bytes)" % got)
                    break
                qp.wait_for_data_status(timeout=min(0.5, max(self.left(), 0.01)))
            elapsed = time.perf_counter() - start
        finally:
            qp.detach_status()
        result = self.result(writer, "the queue-pair writer")
        if result:
            if result["error"]:
                self.violations.append("queue-pair writer: %s" % result["error"])
            if result["written"] != got or result["digest"] != digest.hexdigest():
                self.violations.append("queue pair: %d bytes written (%s), %d read (%s)" % (
                    result["written"], result["digest"][:16], got, digest.hexdigest()[:16]))
            elif got != args.qp_bytes:
                self.violations.append("queue pair: %d of %d bytes" % (got, args.qp_bytes))
        self.report["queue_pair"] = {
            "bytes": got, "queue_size": args.qp_size, "blake2b": digest.hexdigest()[:32],
            "seconds": round(elapsed, 3), "mib_per_second": round(got / elapsed / 2**20, 1) if elapsed else 0,
        }

    # Phase 3

    def latency(self) -> None:
        from .datagram import DatagramEndpoint
        from .handles import VMCIHandle
        args = self.args
        if args.latency_samples == 0:
            return
        echo = self.spawn("echo", "--count", str(args.latency_samples))
        line = echo.stdout.readline()
        try:
            dst = VMCIHandle(_ECHO_CID, json.loads(line)["resource"])
        except (ValueError, KeyError):
            self.result(echo, "the echo process")
            self.violations.append("the echo process did not start")
            return
        samples = []
        buf = bytearray(64)
        with DatagramEndpoint(runtime=_runtime(self.rundir, _RECEIVER_CID, self.core)) as ep:
            for i in range(args.latency_samples):
                if self.left() <= 0:
                    self.violations.append("time limit reached in the latency phase")
                    break
                ping = _PING.pack(i)
                t0 = time.perf_counter_ns()
                rc = ep.send_status(dst, ping, len(ping))
                n, _ = ep.recv_status(buf, max(min(self.left(), 5.0), 0.01))
                t1 = time.perf_counter_ns()
                if rc < 0 or n != _PING.size or bytes(buf[:n]) != ping:
                    self.violations.append("round trip #%d failed (send %d, recv %d)" % (i, rc, n))
                    break
                samples.append(t1 - t0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            echo.wait(timeout=5)
        if samples:
            samples.sort()
            pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] / 1000.0  # noqa: E731
            self.report["latency_us"] = {"samples": len(samples), "p50": round(pick(0.50), 1),
                                         "p99": round(pick(0.99), 1), "p99.9": round(pick(0.999), 1)}


def _print_report(run: _Run) -> None:
    r = run.report
    print("vsockcompat soak: core %s, %d senders" % (run.core, run.args.senders))
    d = r.get("datagrams")
    if d:
        print("  datagrams: %d sent, %d accepted, %d received in %.2fs: %d/s, %.2f MiB/s"
              " (%d retries on NO_RESOURCES)" % (d["sent"], d["accepted"], d["received"], d["seconds"],
                                                 d["per_second"], d["mib_per_second"], d["retries_no_resources"]))
    q = r.get("queue_pair")
    if q:
        print("  queue pair: %d bytes in %.2fs: %.1f MiB/s, blake2b %s" % (
            q["bytes"], q["seconds"], q["mib_per_second"], q["blake2b"][:16]))
    lat = r.get("latency_us")
    if lat:
        print("  round trip: p50 %.1f us, p99 %.1f us, p99.9 %.1f us (%d samples)" % (
            lat["p50"], lat["p99"], lat["p99.9"], lat["samples"]))
    for v in run.violations:
        print("  VIOLATION: %s" % v)
    print("  %s" % ("FAILED (%d violations)" % len(run.violations) if run.violations else "OK"))


def _child_main(argv) -> int:
    p = argparse.ArgumentParser(prog="vsockcompat soak --child")
    p.add_argument("--child", required=True, choices=("sender", "qp-writer", "echo"))
    p.add_argument("--rundir", required=True)
    p.add_argument("--core", required=True)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--dst", type=int, default=0)
    p.add_argument("--payload-size", type=int, default=64)
    p.add_argument("--qp-size", type=int, default=1 << 20)
    p.add_argument("--qp-bytes", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return {"sender": _child_sender, "qp-writer": _child_qp_writer, "echo": _child_echo}[args.child](args)


def main(argv) -> int:
    """``vsockcompat soak [options]``: run the load test; 0 if every check held."""
    argv = list(argv)
    if argv[:1] == ["--child"]:
        return _child_main(argv)
    from ._backend import load_core, select_core
    from ._settings import Settings
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(prog="vsockcompat soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", choices=("cython", "pure"),
                        help="data-plane core (default: the one this environment selects)")
    parser.add_argument("--senders", type=int, default=min(4, cores * 8),
                        help="sender processes, 1..%d (cores x 8; default %%(default)s)" % (cores * 8))
    parser.add_argument("--datagrams", type=int, default=1_000_000, help="datagrams in total (%(default)s)")
    parser.add_argument("--payload-size", type=int, default=64,
                        help="bytes per datagram payload, %d..%d (%%(default)s)"
                        % (_SEQ.size, C.VMCI_MAX_DG_PAYLOAD_SIZE))
    parser.add_argument("--qp-bytes", type=int, default=256 << 20,
                        help="bytes through the queue pair, 0 to skip (%(default)s)")
    parser.add_argument("--qp-size", type=int, default=1 << 20, help="queue size in bytes (%(default)s)")
    parser.add_argument("--latency-samples", type=int, default=10_000,
                        help="timed round trips, 0 to skip (%(default)s)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds for everything (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the queue-pair byte stream")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.senders <= cores * 8:
        parser.error("--senders must be in 1..%d (cores x 8)" % (cores * 8))
    if args.datagrams < 0 or args.qp_bytes < 0 or args.latency_samples < 0:
        parser.error("counts must be >= 0")
    if not _SEQ.size <= args.payload_size <= C.VMCI_MAX_DG_PAYLOAD_SIZE:
        parser.error("--payload-size must be in %d..%d" % (_SEQ.size, C.VMCI_MAX_DG_PAYLOAD_SIZE))
    if not 2 * _QP_CHUNK <= args.qp_size <= C.VMCI_MAX_GUEST_QP_MEMORY // 2:
        parser.error("--qp-size must be in %d..%d" % (2 * _QP_CHUNK, C.VMCI_MAX_GUEST_QP_MEMORY // 2))
    if not args.time_limit > 0:
        parser.error("--time-limit must be positive")
    if args.core is None:
        args.core = select_core(Settings.from_environ().no_extensions).NAME
    else:
        load_core(args.core)  # fail here, not in every child
    run = _Run(args)
    try:
        if args.datagrams:
            run.datagrams()
        if not run.violations:
            run.queue_pair()
        if not run.violations:
            run.latency()
    finally:
        run.close()
    if args.json:
        print(json.dumps({"core": run.core, "ok": not run.violations, "violations": run.violations,
                          "rundir": run.rundir, **run.report}, indent=1))
    else:
        _print_report(run)
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
