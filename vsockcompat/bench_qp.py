"""Queue-pair throughput between two processes against same-run baselines.

Every stream runs from a *producer* child to a *consumer* child (two fresh
processes per implementation, on a private runtime directory under /tmp), with
64 B, 4 KiB and 64 KiB messages:

``qp-cython`` / ``qp-pure``
    ``QueuePair.enqueue_status`` (one message per call) and, for 64 B,
    ``enqueue_many_status`` (``BATCH`` messages per call) into a produce queue
    of ``RING`` bytes (256 KiB, see below); the consumer ``dequeue_status`` into 1 MiB chunks and sleeps in
    ``wait_for_data_status`` when the queue is empty. For 64 KiB also *in place*
    (``qp_view_65536``): the consumer checks the messages where they lie in the
    ring (``peek_view_status``, then ``consume_status``), so each byte is copied
    once, by the producer; a message split by the ring's wrap point is copied
    into a scratch buffer first.
``unix``
    a raw AF_UNIX SOCK_STREAM socket: ``sendall`` per message, ``recv_into``
    the same 1 MiB chunks.
``shm``
    ``multiprocessing.shared_memory`` with a hand-rolled single-producer ring of
    the same size (memoryview slice copies in and out, index words published
    after the copy, ``os.sched_yield`` while full or empty).
``mpqueue``
    ``multiprocessing.Queue``, one ``put`` / ``get`` per 64 B message (the
    consumer is forked by the producer child).
``memcpy``
    one process copying a message-sized buffer (``memoryview`` slice
    assignment): *cached* (the same two message-sized buffers, copied over and
    over: the copy runs from and to L1/L2) and across a *span* as large as the
    ring (message after message through two ring-sized buffers, as the producer
    writes the ring).

The ring size: 256 KiB by default, the queue a VMCI vSockets stream used by
default (``VMCI_TRANSPORT_DEFAULT_QP_SIZE`` in Linux's ``vmci_transport.c``) and
close to an AF_UNIX socket's default buffer (``net.core.wmem_default``, 208 KiB
here), so that the queue pair and the socket it is compared with buffer about
as much; ``--ring-kib``/``--ring-mib`` set it. A larger ring lets the producer
run further ahead, so the two processes sleep and wake each other less often.

Each measurement first runs untimed (the calibration of its message count is
the warm-up: caches, the ring's first pass), then ``repeat`` timed runs taking
turns with the other implementations; the same queue pairs and sockets serve
all runs.

Every message carries ``salt << 40 | sequence number`` in its first 8 bytes and a
fixed pattern after it. The consumer always checks the byte count; it compares
every ``CHECK_EVERY``-th message (and the last) byte for byte (memcmp) with what
the producer must have sent, so data that is lost, duplicated, reordered or
shifted is noticed without the check dominating the run. Every 64 KiB message is
compared, so each consumer reads every byte it receives (an in-place consumer
could otherwise skip most of the data).

A last step shows that a ``SharedRegion`` write is seen by a reader process with
no copy: the reader spins on the mapping and checksums (crc32) what the writer
wrote in place; around that window the parent reads the reader's
``/proc/<pid>/io`` (syscr, syscw: read/write-family system calls; rchar,
wchar: bytes they moved) and its voluntary context switches, which must not
move. (``/proc/<pid>/io`` does not count send/recv-family socket calls; the
unchanged voluntary switch count shows the reader never slept in the kernel.)

A benchmark reports: it never fails on timing. It fails (exit status 1) only if
a run goes wrong (a child fails or times out, a checksum or count differs, or
the region reader made a system call). Run ``python -m vsockcompat.bench_qp --help``.
"""
import argparse
import json
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from array import array

from . import bench
from .bench import BenchError, _calibrate, _child_env, _cython_status, _payload, _positive_int, _summary, serve_peer
from .constants import VMCI_ERROR_QUEUEPAIR_NODATA, VMCI_ERROR_QUEUEPAIR_NOSPACE

SIZES = (64, 4096, 65536)
BATCH = 256  # 64 B messages per enqueue_many call
RING = 256 << 10  # bytes of the data direction of a queue pair and of the shm ring (see above)
MAX_RING = 64 << 20  # a pair holds at most 128 MiB
BACK = 4096  # the unused consumer -> producer direction of a queue pair
CHUNK = 1 << 20  # the consumer reads into chunks of this many bytes (whole messages)
#: size -> the consumer compares every Nth message byte for byte (and always the last one)
CHECK_EVERY = {64: 64, 4096: 16, 65536: 1}
TARGET_SECONDS = 1.0
QUICK_SECONDS = 0.2
DEFAULT_TIMEOUT = 120.0
#: (stream, core, baseline) -> (relation, target): the stream's rate as a multiple of the baseline's;
#: the baseline "absolute" compares messages/s with the number itself.
TARGETS = {
    ("qp_view_65536", "cython", "unix_65536"): (">=", 2.0),
    ("qp_view_65536", "cython", "memcpy_65536"): (">=", 0.40),
    ("qp_batch_64", "cython", "absolute"): (">=", 2e6),
    ("qp_batch_64", "cython", "mpqueue_64"): (">=", 5.0),
}
IMPLEMENTATIONS = ("qp-cython", "qp-pure", "unix", "shm", "mpqueue")

_FIRST_CID = 20  # each queue-pair implementation gets two contexts: consumer cid, producer cid + 1
_SEQ_BITS = 40
_CHILD_CODE = "import sys; from vsockcompat.bench_qp import _child_main; sys.exit(_child_main(sys.argv[1:]))"
_SHM_PREFIX = "vscqb."  # multiprocessing.shared_memory names of this benchmark (/dev/shm/vscqb.*)
_HEAD, _TAIL = 0, 8  # Q-word indexes in the hand-rolled ring's header page (separate cache lines)
# Control words of the zero-copy region (Q-word indexes in its first page).
_Z_READY, _Z_GO, _Z_DONE, _Z_ACK, _Z_WRITER_CRC, _Z_READER_CRC = 0, 8, 16, 24, 32, 40
ZC_SIZE = 4 << 20  # bytes written through the region


def _expected(size, salt, seq):
    """The bytes of message ``seq``."""
    msg = bytearray(_payload(size))
    struct.pack_into("<Q", msg, 0, salt << _SEQ_BITS | seq)
    return msg


def _differs(template, view):
    """Whether ``view`` is not ``template`` byte for byte (a memcmp: comparing
    memoryviews with ``!=`` goes item by item, over 50 times slower)."""
    return len(view) != len(template) or not template.startswith(view)


def read_io(pid="self"):
    """``/proc/<pid>/io`` plus the context switches of ``/proc/<pid>/status``, or None."""
    try:
        with open("/proc/%s/io" % pid) as f:
            out = {k: int(v) for k, v in (line.split(":") for line in f if ":" in line)}
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    key, value = line.split(":")
                    out[key] = int(value)
        return out
    except (OSError, ValueError):
        return None


# The children: one line of JSON per command on stdin, one answer on the original
# stdout; SIGALRM bounds every step (see bench.py).


class _Peer:
    """A producer or consumer of one implementation."""

    def __init__(self, impl, rundir, cid, timeout):
        self.impl, self.rundir, self.cid, self.timeout = impl, rundir, cid, timeout
        self.qp = self.sock = self.listener = self.shm = self.region = None
        self.shm_owner = False
        self.runtime = None
        if impl.startswith("qp-") or impl == "region":
            from ._settings import Settings
            from .runtime import Runtime

            core = impl[3:] if impl.startswith("qp-") else ("cython" if _cython_status()[0] else "pure")
            settings = Settings(no_extensions=(core == "pure"), rundir=rundir, cid=cid, transport="local",
                                ds_autostart=False)
            self.runtime = Runtime(settings, core=core)

    # Set-up

    def op_open(self, ring):
        self.ring = ring
        if self.impl.startswith("qp-"):
            from .queuepair import QueuePair

            self.qp = QueuePair.alloc(None, BACK, ring, runtime=self.runtime)
            return list(self.qp.handle)
        if self.impl == "unix":
            import socket

            path = os.path.join(self.rundir, "unix%d" % self.cid)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.listener.bind(path)
            self.listener.listen(1)
            return path
        if self.impl == "shm":
            from multiprocessing import shared_memory

            name = "%s%d.%d" % (_SHM_PREFIX, os.getpid(), self.cid)
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=4096 + ring)
            self.shm_owner = True
            self._shm_views()
            self.ctl[_HEAD] = self.ctl[_TAIL] = 0
            return name
        return None

    def op_connect(self, address, ring):
        self.ring = ring
        if self.impl.startswith("qp-"):
            from .queuepair import QueuePair

            self.qp = QueuePair.alloc(tuple(address), ring, BACK, runtime=self.runtime)
        elif self.impl == "unix":
            import socket

            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.sock.connect(address)
        elif self.impl == "shm":
            from multiprocessing import resource_tracker, shared_memory

            self.shm = shared_memory.SharedMemory(name=address)
            # Python < 3.13 registers attachers too: the creator alone owns the object.
            resource_tracker.unregister(self.shm._name, "shared_memory")
            self._shm_views()
        return None

    def op_accept(self):
        if self.impl.startswith("qp-"):
            from .constants import VMCI_EVENT_QP_PEER_ATTACH

            events = self.qp.events(self.timeout)
            if not any(e.event == VMCI_EVENT_QP_PEER_ATTACH for e in events):
                raise BenchError("the producer did not attach: %r" % (events,))
        elif self.impl == "unix":
            self.sock, _ = self.listener.accept()
        return None

    def _shm_views(self):
        buf = self.shm.buf
        self.ctl = buf[:4096].cast("Q")
        self.data = buf[4096:4096 + self.ring]

    # Readers and writers of each implementation

    def _reader(self):
        """``read_into(view) -> count > 0``, waiting as the implementation waits."""
        if self.impl.startswith("qp-"):
            dequeue, wait, timeout = self.qp.dequeue_status, self.qp.wait_for_data_status, self.timeout

            def read_into(view):
                while True:
                    rc = dequeue(view)
                    if rc > 0:
                        return rc
                    if rc != VMCI_ERROR_QUEUEPAIR_NODATA:
                        raise BenchError("dequeue_status returned %d" % rc)
                    rc = wait(timeout)
                    if rc < 0:
                        raise BenchError("wait_for_data_status returned %d" % rc)
            return read_into
        if self.impl == "unix":
            recv_into = self.sock.recv_into

            def read_into(view):
                n = recv_into(view)
                if n == 0:
                    raise BenchError("the producer hung up")
                return n
            return read_into
        ctl, data, size, yield_ = self.ctl, self.data, self.ring, os.sched_yield

        def read_into(view):
            head = ctl[_HEAD]
            while True:
                tail = ctl[_TAIL]
                if tail != head:
                    break
                yield_()
            ready = tail - head if tail > head else size - head + tail
            n = min(len(view), ready)
            first = min(size - head, n)
            view[:first] = data[head:head + first]
            if n > first:
                view[first:n] = data[:n - first]
            head += n
            ctl[_HEAD] = head - size if head >= size else head
            return n
        return read_into

    def _writer(self):
        """``write(view)``: the whole message, waiting for space as the implementation waits."""
        if self.impl.startswith("qp-"):
            enqueue, wait, timeout = self.qp.enqueue_status, self.qp.wait_for_space_status, self.timeout

            def write(view):
                want = len(view)
                rc = enqueue(view)
                while rc != want:
                    if rc > 0:
                        view, want = view[rc:], want - rc
                    elif rc == VMCI_ERROR_QUEUEPAIR_NOSPACE:
                        rc = wait(min(want, self.ring - 1), timeout)
                        if rc < 0:
                            raise BenchError("wait_for_space_status returned %d" % rc)
                    else:
                        raise BenchError("enqueue_status returned %d" % rc)
                    rc = enqueue(view)
            return write
        if self.impl == "unix":
            return self.sock.sendall
        ctl, data, size, yield_ = self.ctl, self.data, self.ring, os.sched_yield

        def write(view):
            tail, n, at = ctl[_TAIL], len(view), 0
            while at < n:
                head = ctl[_HEAD]
                free = head - tail - 1 if head > tail else size - (tail - head) - 1
                if free == 0:
                    yield_()
                    continue
                k = min(free, n - at)
                first = min(size - tail, k)
                data[tail:tail + first] = view[at:at + first]
                if k > first:
                    data[:k - first] = view[at + first:at + k]
                at += k
                tail += k
                tail = tail - size if tail >= size else tail
                ctl[_TAIL] = tail
        return write

    # The runs

    def op_sink(self, size, n, salt):
        """Receive ``n`` messages of ``size`` bytes; check the count and every CHECK_EVERY-th message."""
        read_into = self._reader()
        per_chunk = max(1, CHUNK // size)
        every = CHECK_EVERY[size]
        view = memoryview(bytearray(per_chunk * size))
        template = _expected(size, salt, 0)
        stamp = salt << _SEQ_BITS
        got = checked = bad = 0
        received = 0
        cpu0 = time.process_time()
        while got < n:
            count = min(per_chunk, n - got)
            want = count * size
            filled = 0
            while filled < want:
                filled += read_into(view[filled:want])
            received += filled
            # got is a multiple of per_chunk, itself a multiple of every: messages j with j % every == 0.
            last = count - 1 if got + count == n else -1
            for j in list(range(0, count, every)) + ([last] if last >= 0 and last % every else []):
                struct.pack_into("<Q", template, 0, stamp | (got + j))
                checked += 1
                if _differs(template, view[j * size:(j + 1) * size]):
                    bad += 1
            got += count
        t_end = time.perf_counter()
        cpu = time.process_time() - cpu0
        return {"t_end": t_end, "cpu": cpu, "received": got, "bytes": received, "checked": checked,
                "bad": bad}

    def op_sink_view(self, size, n, salt):
        """``op_sink`` reading the queue pair in place: check messages in the ring, then consume them."""
        peek, consume = self.qp.peek_view_status, self.qp.consume_status
        wait, timeout = self.qp.wait_for_data_status, self.timeout
        every = CHECK_EVERY[size]
        template = _expected(size, salt, 0)
        scratch = memoryview(bytearray(size))
        stamp = salt << _SEQ_BITS
        got = checked = bad = received = pending = 0

        def check(msg, seq):
            if seq % every == 0 or seq == n - 1:
                struct.pack_into("<Q", template, 0, stamp | seq)
                return 1, _differs(template, msg)
            return 0, False

        cpu0 = time.process_time()
        while got < n:
            view = peek((n - got) * size - pending)
            if isinstance(view, int):
                if view != VMCI_ERROR_QUEUEPAIR_NODATA:
                    raise BenchError("peek_view_status returned %d" % view)
                rc = wait(timeout)
                if rc < 0:
                    raise BenchError("wait_for_data_status returned %d" % rc)
                continue
            length, at = len(view), 0
            if pending:  # the rest of a message split by the wrap point
                k = min(size - pending, length)
                scratch[pending:pending + k] = view[:k]
                pending += k
                at = k
                if pending == size:
                    c, b = check(scratch, got)
                    checked, bad, got, pending = checked + c, bad + b, got + 1, 0
            while length - at >= size:
                c, b = check(view[at:at + size], got)
                checked, bad, got, at = checked + c, bad + b, got + 1, at + size
            if at < length:
                scratch[:length - at] = view[at:]
                pending = length - at
            received += length
            rc = consume(length)
            if rc != length:
                raise BenchError("consume_status returned %d" % rc)
        t_end = time.perf_counter()
        return {"t_end": t_end, "cpu": time.process_time() - cpu0, "received": got, "bytes": received,
                "checked": checked, "bad": bad}

    def op_blast(self, size, n, salt, batch):
        """Send ``n`` messages of ``size`` bytes, ``batch`` per call (queue pairs; 1: one per call)."""
        stamp = salt << _SEQ_BITS
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        if batch > 1:
            self._blast_many(size, n, stamp, batch)
        else:
            write = self._writer()
            msg = _expected(size, salt, 0)
            view = memoryview(msg)
            pack_into = struct.pack_into
            for i in range(n):
                pack_into("<Q", msg, 0, stamp | i)
                write(view)
        t1 = time.perf_counter()
        return {"t0": t0, "t1": t1, "cpu": time.process_time() - cpu0, "sent": n}

    def _blast_many(self, size, n, stamp, batch):
        enqueue_many, wait, timeout = self.qp.enqueue_many_status, self.qp.wait_for_space_status, self.timeout
        buf = bytearray(_payload(size) * batch)
        view = memoryview(buf)
        stamps = view.cast("Q")[::size // 8]
        msgs = [view[j * size:(j + 1) * size] for j in range(batch)]
        sent = 0
        while sent < n:
            k = min(batch, n - sent)
            stamps[:k] = array("Q", range(stamp | sent, (stamp | sent) + k))
            todo = msgs if k == batch else msgs[:k]
            while True:
                rc = enqueue_many(todo)
                if rc == len(todo):
                    break
                if rc > 0:
                    todo = todo[rc:]
                elif rc == VMCI_ERROR_QUEUEPAIR_NOSPACE:
                    rc = wait(min(len(todo) * size, self.ring // 4), timeout)
                    if rc < 0:
                        raise BenchError("wait_for_space_status returned %d" % rc)
                else:
                    raise BenchError("enqueue_many_status returned %d" % rc)
            sent += k

    def op_mpqueue(self, size, n, salt):
        """``n`` messages through a multiprocessing.Queue to a forked consumer, one put/get each."""
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        q, answers = ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=_mpq_consumer, args=(q, answers, size, n, salt, self.timeout), daemon=True)
        proc.start()
        try:
            if answers.get(timeout=self.timeout) != "ready":
                raise BenchError("the multiprocessing.Queue consumer did not start")
            msg = _expected(size, salt, 0)
            stamp, pack_into, put = salt << _SEQ_BITS, struct.pack_into, q.put
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            for i in range(n):
                pack_into("<Q", msg, 0, stamp | i)
                put(bytes(msg))
            cpu = time.process_time() - cpu0
            got = answers.get(timeout=self.timeout)
        finally:
            proc.join(self.timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            for queue in (q, answers):
                queue.close()
                queue.join_thread()
        got.update(t0=t0, sent=n, cpu=cpu + got["cpu"])
        return got

    # Zero copy through a SharedRegion

    def op_region_create(self):
        from .sharedmem import SharedRegion

        self.region = SharedRegion.create(4096 + ZC_SIZE, runtime=self.runtime)
        return list(self.region.handle)

    def op_region_attach(self, handle):
        from .sharedmem import SharedRegion

        self.region = SharedRegion.attach(tuple(handle), runtime=self.runtime)
        return os.getpid()

    def op_region_watch(self, gen):
        """Reader: announce, spin until the writer says GO, checksum the mapping, report, spin until ACK."""
        buf = self.region.buffer
        ctl, data = buf[:4096].cast("Q"), buf[4096:]
        deadline = time.monotonic() + self.timeout  # vDSO: no system call
        ctl[_Z_READY] = gen
        while ctl[_Z_GO] != gen:
            if time.monotonic() > deadline:
                raise BenchError("the writer never wrote")
        crc = zlib.crc32(data)
        ctl[_Z_READER_CRC] = crc
        ctl[_Z_DONE] = gen
        while ctl[_Z_ACK] != gen:
            if time.monotonic() > deadline:
                raise BenchError("the parent never acknowledged")
        ctl.release()
        data.release()
        return {"crc": crc, "bytes_seen": ZC_SIZE}

    def op_region_wait_ready(self, gen):
        ctl = self.region.buffer[:4096].cast("Q")
        deadline = time.monotonic() + self.timeout
        try:
            while ctl[_Z_READY] != gen:
                if time.monotonic() > deadline:
                    raise BenchError("the reader never got ready")
                time.sleep(0.001)
        finally:
            ctl.release()

    def op_region_write(self, gen):
        """Writer: fill the data area with a fresh pattern, GO, wait until the reader is DONE."""
        buf = self.region.buffer
        ctl, data = buf[:4096].cast("Q"), buf[4096:]
        try:
            pattern = random.Random(gen).randbytes(4096)
            for at in range(0, ZC_SIZE, 4096):
                data[at:at + 4096] = pattern
            crc = zlib.crc32(data)
            ctl[_Z_WRITER_CRC] = crc
            ctl[_Z_GO] = gen
            deadline = time.monotonic() + self.timeout
            while ctl[_Z_DONE] != gen:
                if time.monotonic() > deadline:
                    raise BenchError("the reader never finished")
                time.sleep(0.001)
            return {"crc": crc, "reader_crc": ctl[_Z_READER_CRC], "bytes_written": ZC_SIZE}
        finally:
            ctl.release()
            data.release()

    def op_region_ack(self, gen):
        ctl = self.region.buffer[:4096].cast("Q")
        ctl[_Z_ACK] = gen
        ctl.release()

    def close(self):
        if self.qp is not None:
            self.qp.detach_status()
        for sock in (self.sock, self.listener):
            if sock is not None:
                sock.close()
        if self.shm is not None:
            self.ctl.release()
            self.data.release()
            self.shm.close()
            if self.shm_owner:
                self.shm.unlink()
        if self.region is not None and not self.region.closed:
            self.region.detach()


def _mpq_consumer(q, answers, size, n, salt, timeout):
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(max(1, int(timeout)))
    every = CHECK_EVERY[size]
    template = _expected(size, salt, 0)
    stamp, get = salt << _SEQ_BITS, q.get
    checked = bad = received = 0
    answers.put("ready")
    cpu0 = time.process_time()
    for i in range(n):
        msg = get()
        received += len(msg)
        if i % every == 0 or i == n - 1:
            struct.pack_into("<Q", template, 0, stamp | i)
            checked += 1
            if msg != template:
                bad += 1
    t_end = time.perf_counter()
    answers.put({"t_end": t_end, "cpu": time.process_time() - cpu0, "received": n, "bytes": received,
                 "checked": checked, "bad": bad})


def _child_main(argv):
    """Entry point of a child: ``ROLE IMPL RUNDIR CID TIMEOUT``."""
    _role, impl, rundir, cid, timeout = argv
    timeout = max(1, int(float(timeout)))
    return serve_peer(lambda: _Peer(impl, rundir, int(cid), timeout), timeout)


# The parent.


class _Child(bench._Child):
    """A child of this benchmark, driven like bench.py's."""

    def __init__(self, role, impl, rundir, cid, timeout, env):  # pylint: disable=super-init-not-called
        self.name = "%s %s" % (impl, role)
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, role, impl, rundir, str(cid), str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self._pending = b""


class _Stream:
    """A consumer and a producer child of one implementation (mpqueue: the producer forks its consumer)."""

    def __init__(self, impl, rundir, timeout, ring=RING):
        self.impl = impl
        env = _child_env("cython" if impl == "qp-cython" else "pure", rundir)
        cid = _FIRST_CID + 2 * IMPLEMENTATIONS.index(impl)
        self.consumer = self.producer = None
        try:
            self.producer = _Child("producer", impl, rundir, cid + 1, timeout, env)
            if impl != "mpqueue":
                self.consumer = _Child("consumer", impl, rundir, cid, timeout, env)
                address = self.consumer.call("open", ring)
                self.producer.call("connect", address, ring)
                self.consumer.call("accept")
        except BaseException:
            self.close(kill=True)
            raise

    def run(self, size, n, batch=1, in_place=False):
        """One run of ``n`` messages (``in_place``: the queue-pair consumer reads the ring in place)."""
        salt = random.getrandbits(20) or 1
        if self.impl == "mpqueue":
            got = self.producer.call("mpqueue", size, n, salt)
            sent = {"t0": got["t0"], "cpu": 0.0, "sent": n}
        else:
            self.consumer.send("sink_view" if in_place else "sink", size, n, salt)
            sent = self.producer.call("blast", size, n, salt, batch)
            got = self.consumer.result()
        elapsed = max(got["t_end"] - sent["t0"], 1e-9)
        return {"elapsed": elapsed, "mb_s": n * size / elapsed / 1e6, "msg_s": n / elapsed,
                "cpu_us": (sent["cpu"] + got["cpu"]) / n * 1e6,
                "ok": got["received"] == n and got["bytes"] == n * size and got["bad"] == 0,
                "received": got["received"], "checked": got["checked"], "bad": got["bad"]}

    def close(self, kill=False):
        for child in (self.producer, self.consumer):
            if child is not None:
                child.stop(kill)


def _streams():
    """(key, implementation, size, batch) of every two-process measurement, in table order."""
    out = []
    for size in SIZES:
        for impl in ("qp-cython", "qp-pure"):
            out.append(("qp_%d" % size, impl, size, 1))
            if size == 64:
                out.append(("qp_batch_64", impl, 64, BATCH))
            if size == 65536:
                out.append(("qp_view_65536", impl, size, 1))
        out.append(("unix_%d" % size, "unix", size, 1))
        out.append(("shm_%d" % size, "shm", size, 1))
        if size == 64:
            out.append(("mpqueue_64", "mpqueue", 64, 1))
    return out


def _stream_summary(runs, n):
    return _summary("MB/s", [r["mb_s"] for r in runs], messages=n,
                    msg_s=statistics.median(r["msg_s"] for r in runs),
                    msg_s_min=min(r["msg_s"] for r in runs), msg_s_max=max(r["msg_s"] for r in runs),
                    cpu_us=statistics.median(r["cpu_us"] for r in runs),
                    checked=sum(r["checked"] for r in runs), bad=sum(r["bad"] for r in runs),
                    checksums_ok=all(r["ok"] for r in runs))


def _measure_streams(streams, target, n_fixed, repeat, log=None):
    """Calibrate every measurement, then ``repeat`` rounds taking turns across implementations."""
    plan = [s for s in _streams() if s[1] in streams]
    results = {}
    for size in SIZES:
        keys = [s for s in plan if s[2] == size]
        if log:
            log("%d B messages: %s ..." % (size, ", ".join(sorted({s[1] for s in keys}))))
        runs = {s: [] for s in keys}
        warm = {s: [] for s in keys}

        def timed(s, k, into):
            r = streams[s[1]].run(s[2], k, s[3], in_place=s[0].startswith("qp_view_"))
            into.append(r)
            return r["elapsed"]

        counts = {s: _calibrate(lambda k, s=s: timed(s, k, warm[s]), target, n_fixed) for s in keys}
        for _ in range(repeat):
            for s in keys:
                timed(s, counts[s], runs[s])
        for s in keys:
            summary = _stream_summary(runs[s], counts[s])
            summary["checksums_ok"] = summary["checksums_ok"] and all(r["ok"] for r in warm[s])
            summary["batch"] = s[3]
            summary["size"] = size
            results.setdefault(s[1], {})[s[0]] = summary
    return results


def _memcpy(size, target, n_fixed, repeat, span):
    """Single-process copies of ``size`` bytes: in cache (same buffers) and across ``span`` bytes."""
    out = {}
    src_small, dst_small = memoryview(bytearray(_payload(size))), memoryview(bytearray(size))
    span = max(size, span // size * size)
    src_big, dst_big = memoryview(bytearray(span)), memoryview(bytearray(span))
    src_big[:] = _payload(span)

    def cached(n):
        t0 = time.perf_counter()
        for _ in range(n):
            dst_small[:] = src_small
        return time.perf_counter() - t0

    def spread(n):
        offsets = range(0, span, size)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            for at in offsets:
                dst_big[at:at + size] = src_big[at:at + size]
            done += len(offsets)
        return time.perf_counter() - t0, done

    n = _calibrate(cached, target, n_fixed)
    samples = [n * size / cached(n) / 1e6 for _ in range(repeat)]
    out["memcpy_%d" % size] = _summary("MB/s", samples, messages=n, msg_s=statistics.median(samples) * 1e6 / size,
                                       size=size, span=size)
    n = _calibrate(lambda k: spread(k)[0], target, n_fixed)
    samples = []
    for _ in range(repeat):
        elapsed, done = spread(n)
        samples.append(done * size / elapsed / 1e6)
    out["memcpy_span_%d" % size] = _summary("MB/s", samples, messages=n,
                                            msg_s=statistics.median(samples) * 1e6 / size, size=size, span=span)
    if not dst_small.tobytes() == src_small.tobytes() or dst_big[:size] != src_big[:size]:
        raise BenchError("memcpy copied the wrong bytes")
    return out


def _zero_copy(rundir, timeout, log=None):
    """A SharedRegion written by one process and checksummed by another, with the reader's I/O counters."""
    if log:
        log("zero copy: a SharedRegion written by one process, read by another ...")
    env = _child_env("cython" if _cython_status()[0] else "pure", rundir)
    writer = reader = None
    try:
        writer = _Child("writer", "region", rundir, _FIRST_CID - 2, timeout, env)
        reader = _Child("reader", "region", rundir, _FIRST_CID - 1, timeout, env)
        handle = writer.call("region_create")
        pid = reader.call("region_attach", handle)
        if read_io(pid) is None:
            return {"available": False, "note": "/proc/%d/io is not readable here" % pid}
        gen = 1
        reader.send("region_watch", gen)
        writer.call("region_wait_ready", gen)
        before = read_io(pid)
        wrote = writer.call("region_write", gen)
        after = read_io(pid)
        writer.call("region_ack", gen)
        seen = reader.result()
        delta = {k: after.get(k, 0) - before.get(k, 0)
                 for k in ("rchar", "wchar", "syscr", "syscw", "voluntary_ctxt_switches")}
        return {"available": True, "note": None, "bytes_written": wrote["bytes_written"],
                "bytes_seen": seen["bytes_seen"], "writer_crc": wrote["crc"], "reader_crc": seen["crc"],
                "checksums_ok": wrote["crc"] == seen["crc"] == wrote["reader_crc"],
                "reader_read_syscalls": delta["syscr"], "reader_write_syscalls": delta["syscw"],
                "kernel_bytes_copied": delta["rchar"] + delta["wchar"],
                "reader_sleeps": delta["voluntary_ctxt_switches"],
                "zero_copy": not any(delta.values())}
    except BaseException:
        for child in (reader, writer):
            if child is not None:
                child.stop(kill=True)
        writer = reader = None
        raise
    finally:
        for child in (reader, writer):
            if child is not None:
                child.stop()


def _rate(results, key):
    for impl in results.values():
        if isinstance(impl, dict) and key in impl:
            return impl[key]
    return None


def _compare(results):
    rows = []
    for (key, core, base), (relation, target) in TARGETS.items():
        impl = "qp-" + core
        row = {"metric": key, "core": core, "baseline": base, "value": None, "base_value": None,
               "ratio": None, "relation": relation, "target": target, "verdict": "skipped"}
        r = results.get(impl, {})
        if r.get("available") and key in r:
            if base == "absolute":
                row["value"] = row["ratio"] = r[key]["msg_s"]
            else:
                b = _rate(results, base)
                row["value"], row["base_value"] = r[key]["median"], b["median"]
                row["ratio"] = row["value"] / row["base_value"]
            row["verdict"] = "PASS" if row["ratio"] >= target else "MISS"
        rows.append(row)
    return rows


def _ratios(results):
    """Every queue-pair stream against the same-size baselines: (key, impl) -> {baseline: ratio}."""
    out = {}
    for impl in ("qp-cython", "qp-pure"):
        r = results.get(impl, {})
        if not r.get("available"):
            continue
        for key, s in r.items():
            if not isinstance(s, dict) or "size" not in s:
                continue
            ratios = {}
            for base in ("unix", "shm", "memcpy", "mpqueue"):
                b = _rate(results, "%s_%d" % (base, s["size"]))
                if b is not None:
                    ratios[base] = s["median"] / b["median"]
            out["%s %s" % (impl, key)] = ratios
    return out


def _fmt_size(size):
    return "%d B" % size if size < 1024 else "%d KiB" % (size // 1024)


def _fmt_bytes(n):
    return "%d MiB" % (n >> 20) if n >= 1 << 20 and not n % (1 << 20) else "%d KiB" % (n >> 10)


def _fmt_num(value, digits=0):
    return "-" if value is None else "{:,.{}f}".format(value, digits)


def _fmt_ratio(value):
    return "-" if value is None else ("%.2fx" % value)


def render_table(report):
    """The human-readable report."""
    m = report["machine"]
    s = report["settings"]
    results = report["results"]
    lines = [
        "vsockcompat bench_qp: queue-pair streams between two processes vs AF_UNIX SOCK_STREAM, "
        "a shared-memory ring, multiprocessing.Queue and memcpy",
        "machine: %s CPUs, %s %s on %s; Cython core %s" % (
            m["cpu_count"], m["implementation"], m["python"], m["platform"],
            "built" if m["cython_core_available"] else "NOT built"),
        "each value: median of %d timed runs (%s) after an untimed warm-up; 64 B batches of %d messages"
        % (s["repeat"], "%d messages each" % s["iterations"] if s["iterations"]
           else "about %.1f s each" % s["target_seconds"], BATCH),
        "rings of %s%s; AF_UNIX socket buffers: %s" % (
            _fmt_bytes(s["ring_bytes"]), " (the default: VMCI vSockets' queue size)" if s["ring_bytes"] == RING
            else "", _fmt_bytes(s["unix_buffer"]) if s.get("unix_buffer") else "unknown"),
        "memcpy: one process; cached = the same two message-sized buffers, span = message after message "
        "through two buffers as large as the ring",
    ]
    load = report.get("load_average")
    if load:
        lines.append("1-minute load average: %s at the start, %s at the end (other work on the CPUs "
                     "disturbs two-process streams most)" % (load.get("start"), load.get("end")))
    lines.append("")
    header = ("size", "implementation", "MB/s", "msg/s", "min..max MB/s", "CPU us/msg",
              "vs unix", "vs shm", "vs memcpy")
    rows = []
    labels = {"qp-cython": "qp cython", "qp-pure": "qp pure", "unix": "unix stream", "shm": "shm ring",
              "mpqueue": "mp.Queue"}
    for size in SIZES:
        first = True
        entries = []
        for key, impl, sz, batch in _streams():
            if sz == size:
                entries.append((key, impl, labels[impl] + (" batch %d" % batch if batch > 1 else "")
                                + (" in place" if key.startswith("qp_view_") else "")))
        entries.append(("memcpy_%d" % size, "memcpy", "memcpy (cached)"))
        entries.append(("memcpy_span_%d" % size, "memcpy", "memcpy (%s span)" % _fmt_bytes(s["ring_bytes"])))
        for key, impl, label in entries:
            r = results.get(impl, {})
            cell = _fmt_size(size) if first else ""
            first = False
            if not r.get("available") or key not in r:
                rows.append((cell, label, "skipped") + ("",) * 6)
                continue
            x = r[key]
            ratio = {}
            if impl.startswith("qp-"):
                for base in ("unix", "shm", "memcpy"):
                    b = _rate(results, "%s_%d" % (base, size))
                    ratio[base] = None if b is None else x["median"] / b["median"]
            rows.append((cell, label, _fmt_num(x["median"]), _fmt_num(x.get("msg_s")),
                         "%s..%s" % (_fmt_num(x["min"]), _fmt_num(x["max"])),
                         _fmt_num(x.get("cpu_us"), 2) if "cpu_us" in x else "-",
                         _fmt_ratio(ratio.get("unix")), _fmt_ratio(ratio.get("shm")),
                         ("%.0f%%" % (ratio["memcpy"] * 100)) if ratio.get("memcpy") else ""))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    align = ("<", "<") + (">",) * 7
    for row in [header] + rows:
        lines.append("  ".join(format(c, a + str(w)) for c, a, w in zip(row, align, widths)).rstrip())
    lines += ["", "targets (Cython core):"]
    names = {"unix_65536": "AF_UNIX stream 64 KiB", "memcpy_65536": "memcpy 64 KiB (cached)",
             "mpqueue_64": "multiprocessing.Queue 64 B", "absolute": "messages/s"}
    for c in report["comparisons"]:
        what = "qp %s" % {"qp_batch_64": "64 B batch", "qp_view_65536": "64 KiB in place"}.get(
            c["metric"], "64 KiB")
        if c["baseline"] == "absolute":
            value, target = _fmt_num(c["ratio"]), _fmt_num(c["target"])
        else:
            value = "-" if c["ratio"] is None else (
                "%.0f%%" % (c["ratio"] * 100) if c["target"] < 1 else "%.2fx" % c["ratio"])
            target = "%.0f%%" % (c["target"] * 100) if c["target"] < 1 else "%.2fx" % c["target"]
        lines.append("  %-18s vs %-27s %12s  %s %-9s  %s" % (what, names[c["baseline"]], value,
                                                             c["relation"], target, c["verdict"]))
    zc = report["zero_copy"]
    lines.append("")
    if zc.get("available"):
        lines.append("zero copy: a SharedRegion writer wrote %s bytes; the reader process checksummed them "
                     "in place (crc32 %s): %d read + %d write system calls, %d bytes copied by the kernel, "
                     "%d sleeps -> %s"
                     % (_fmt_num(zc["bytes_written"]), "equal" if zc["checksums_ok"] else "DIFFERENT",
                        zc["reader_read_syscalls"], zc["reader_write_syscalls"], zc["kernel_bytes_copied"],
                        zc["reader_sleeps"], "PASS" if zc["zero_copy"] else "MISS"))
    else:
        lines.append("zero copy: skipped (%s)" % zc.get("note"))
    lines.append("checks: the consumer counted every byte and compared messages byte for byte, %s "
                 "(and the last): %s messages compared, %s wrong -> %s" % (
                     ", ".join(("all (%s)" if CHECK_EVERY[sz] == 1 else "1 in %d (%%s)" % CHECK_EVERY[sz])
                               % _fmt_size(sz) for sz in SIZES),
                     _fmt_num(report["checked"]), report["bad"],
                     "all checksums matched" if report["checksums_ok"] else "MISMATCH"))
    for impl in IMPLEMENTATIONS:
        if not results.get(impl, {}).get("available"):
            lines.append("%s: skipped (%s)" % (impl, results.get(impl, {}).get("note")))
    return "\n".join(lines)


def shm_leftovers(rundir):
    """/dev/shm objects of this benchmark's runtime directory or of its shared_memory rings."""
    from .sharedmem import SHM_DIR, shm_prefix

    prefix = shm_prefix(rundir)
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(prefix) or n.startswith(_SHM_PREFIX))


def _unix_buffer():
    """Bytes an AF_UNIX stream socket buffers by default (``net.core.wmem_default``), or None."""
    try:
        with open("/proc/sys/net/core/wmem_default") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _load():
    """The 1-minute load average, or None: two processes need the machine's CPUs to themselves."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(quick=False, iterations=None, repeat=None, timeout=DEFAULT_TIMEOUT, ring=RING, log=None):
    """Run every measurement and return the report (a JSON-serialisable dict)."""
    target = QUICK_SECONDS if quick else TARGET_SECONDS
    repeat = repeat if repeat is not None else (3 if quick else 5)
    cython, why = _cython_status()
    report = {
        "benchmark": "vsockcompat queue pairs vs AF_UNIX SOCK_STREAM, shared-memory ring, "
                     "multiprocessing.Queue, memcpy; two processes",
        "machine": bench.machine_info(),
        "settings": {"quick": quick, "iterations": iterations, "repeat": repeat, "target_seconds": target,
                     "sizes": list(SIZES), "batch": BATCH, "ring_bytes": ring, "chunk_bytes": CHUNK,
                     "check_every": {str(k): v for k, v in CHECK_EVERY.items()},
                     "unix_buffer": _unix_buffer()},
        "results": {},
        "load_average": {"start": _load()},
    }
    rundir = tempfile.mkdtemp(prefix="vscq", dir="/tmp")
    streams = {}
    try:
        for impl in IMPLEMENTATIONS:
            if impl == "qp-cython" and not cython:
                note = "the Cython core is not built: %s" % why
                if log:
                    log("note: skipping the qp-cython runs: %s" % note)
                report["results"][impl] = {"available": False, "note": note}
                continue
            if log:
                log("starting the %s children ..." % impl)
            streams[impl] = _Stream(impl, rundir, timeout, ring)
        measured = _measure_streams(streams, target, iterations, repeat, log)
        for impl in streams:
            report["results"][impl] = dict(available=True, note=None, **measured[impl])
        for impl in list(streams):
            streams.pop(impl).close()
        if log:
            log("memcpy in one process ...")
        copies = {}
        for size in SIZES:
            copies.update(_memcpy(size, target, iterations, repeat, ring))
        report["results"]["memcpy"] = dict(available=True, note=None, **copies)
        report["results"] = {impl: report["results"][impl] for impl in IMPLEMENTATIONS + ("memcpy",)}
        report["zero_copy"] = _zero_copy(rundir, timeout, log)
    except BaseException:
        for stream in streams.values():
            stream.close(kill=True)
        raise
    finally:
        leftovers = shm_leftovers(rundir)
        for name in leftovers:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
        shutil.rmtree(rundir, ignore_errors=True)
    report["load_average"]["end"] = _load()
    report["shm_leftovers"] = leftovers
    report["rundir_removed"] = not os.path.exists(rundir)
    report["comparisons"] = _compare(report["results"])
    report["ratios"] = _ratios(report["results"])
    stream_results = [x for impl in IMPLEMENTATIONS for x in report["results"][impl].values()
                      if isinstance(x, dict) and "checksums_ok" in x]
    report["checked"] = sum(x["checked"] for x in stream_results)
    report["bad"] = sum(x["bad"] for x in stream_results)
    zc = report["zero_copy"]
    report["checksums_ok"] = (all(x["checksums_ok"] for x in stream_results)
                              and (not zc.get("available") or zc["checksums_ok"]))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vsockcompat.bench_qp",
        description="Measure queue-pair throughput between two processes (64 B, 4 KiB, 64 KiB messages, "
                    "both cores) against AF_UNIX SOCK_STREAM, a multiprocessing.shared_memory ring, "
                    "multiprocessing.Queue and memcpy, measured in the same run; and show that a "
                    "SharedRegion is read with no copy.")
    parser.add_argument("--quick", action="store_true", help="about 0.2 s per measurement instead of 1 s")
    parser.add_argument("--iterations", type=_positive_int, metavar="N",
                        help="messages per run (default: as many as fill the time)")
    parser.add_argument("--repeat", type=_positive_int, metavar="R",
                        help="runs per measurement, the median is reported (default 5, 3 with --quick)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help="longest wait for any one step, in seconds (default %(default)s)")
    rings = parser.add_mutually_exclusive_group()
    rings.add_argument("--ring-kib", type=_positive_int, metavar="K",
                       help="KiB of the data direction of each queue pair and of the shm ring "
                            "(default %d: VMCI vSockets' default queue)" % (RING >> 10))
    rings.add_argument("--ring-mib", type=_positive_int, metavar="M", help="the same in MiB")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    ring = args.ring_kib << 10 if args.ring_kib else args.ring_mib << 20 if args.ring_mib else RING
    if not 8 << 10 <= ring <= MAX_RING:
        print("vsockcompat bench_qp: error: the ring is 8 KiB to 64 MiB (a pair holds 128 MiB)", file=sys.stderr)
        return 2
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report = run(quick=args.quick, iterations=args.iterations, repeat=args.repeat,
                     timeout=args.timeout, ring=ring, log=log)
    except BenchError as exc:
        print("vsockcompat bench_qp: error: %s" % exc, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_table(report))
    problems = []
    if not report["checksums_ok"]:
        problems.append("a consumer received bytes other than those sent")
    if report["zero_copy"].get("available") and not report["zero_copy"]["zero_copy"]:
        problems.append("the SharedRegion reader made system calls or the kernel copied bytes")
    if report["shm_leftovers"]:
        problems.append("shared memory left in /dev/shm: %s" % ", ".join(report["shm_leftovers"]))
    for problem in problems:
        print("vsockcompat bench_qp: error: %s" % problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
