"""Coverage-guided differential fuzzing of the datagram receive path of both cores.

    python fuzz/fuzz_datagram.py -max_total_time=60 [corpus_dir]

Each input is split into receive-buffer sizes and one frame as a peer could write it
on the SOCK_SEQPACKET link; the frame is written on a socketpair and read with
``recv_datagram`` of the Cython core and of the pure core, and ``decode_header`` of
both decodes its first bytes. Both must give the same status, header fields, bytes in
the receive and spill buffers and queue account; an accepted frame must be exactly
its header plus the payload size it declares. Any difference raises (a crash for
libFuzzer, which saves the input).

Coverage guidance comes from the instrumented pure-Python modules. The Cython
extension is exercised on every input but guides the fuzzer only if it was built
with libFuzzer's coverage instrumentation (see fuzz/README.rst).
"""
import mmap
import os
import socket
import struct
import sys

import importlib.util

import atheris

if importlib.util.find_spec("vsockcompat") is None:  # not installed: use the source tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["vsockcompat"]):
    from vsockcompat._backend import load_core
    CORES = [load_core("cython"), load_core("pure")]
ACCOUNTS = []
for _core in CORES:
    _page = mmap.mmap(-1, _core.ACCOUNT_SIZE)
    _account = _core.Account(-1, _page)
    _account.initialise(139264)
    ACCOUNTS.append((_account, _page))


def _recv(core, account, frame, buf_len, spill_len):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        b.send(frame)
        if not frame:
            b.close()
        buf, spill = bytearray(b"\xaa" * buf_len), bytearray(b"\x55" * spill_len)
        status, fields = core.recv_datagram(a, account, buf, spill)
        return status, fields, bytes(buf), bytes(spill), account.queued()
    finally:
        a.close()
        b.close()


def _header(core, frame):
    try:
        return core.decode_header(frame)
    except ValueError:
        return "ValueError"


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    buf_len = fdp.ConsumeIntInRange(0, 512)
    spill_len = fdp.ConsumeIntInRange(0, 512)
    frame = fdp.ConsumeBytes(fdp.remaining_bytes())
    results = [_recv(core, acc, frame, buf_len, spill_len) for core, (acc, _) in zip(CORES, ACCOUNTS)]
    if results[0] != results[1]:
        raise AssertionError("cores disagree on %r: %r" % (frame, results))
    status, fields = results[0][:2]
    if status >= 0:
        if status != len(frame) or fields != struct.unpack_from("<IIIIQ", frame) or fields[4] != len(frame) - 24:
            raise AssertionError("accepted a frame that is not header + declared payload: %r" % frame)
    headers = [_header(core, frame) for core in CORES]
    if headers[0] != headers[1]:
        raise AssertionError("decode_header disagrees on %r: %r" % (frame, headers))


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
