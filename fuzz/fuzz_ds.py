"""Coverage-guided fuzzing of the discovery-service codec (vsockcompat.ds_protocol).

    python fuzz/fuzz_ds.py -max_total_time=60 [corpus_dir]

Properties: decode_request / decode_reply raise nothing but MalformedMessage, whose
msgid is set exactly when the payload carries one; what decodes re-encodes to bytes
that decode to the same message.
"""
import os
import struct
import sys

import importlib.util

import atheris

if importlib.util.find_spec("vsockcompat") is None:  # not installed: use the source tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports():
    from vsockcompat.ds_protocol import (MalformedMessage, decode_reply, decode_request, encode_reply,
                                         encode_request)


def _check(decoder, payload, msgid_end):
    try:
        return decoder(payload)
    except MalformedMessage as exc:
        if (exc.msgid is not None) != (len(payload) >= msgid_end):
            raise AssertionError("msgid %r for a %d-byte payload" % (exc.msgid, len(payload)))
        if exc.msgid is not None and exc.msgid != struct.unpack_from("<i", payload, msgid_end - 4)[0]:
            raise AssertionError("wrong msgid")
        return None


def TestOneInput(data: bytes) -> None:
    req = _check(decode_request, data, 8)
    if req is not None:
        again = decode_request(encode_request(req.action, req.msgid, req.handle, req.name))
        if again != req:
            raise AssertionError("request round trip: %r != %r" % (again, req))
    reply = _check(decode_reply, data, 4)
    if reply is not None and len(reply.msg) <= 275:
        again = decode_reply(encode_reply(reply.msgid, reply.code, reply.handle, reply.msg))
        if again != reply:
            raise AssertionError("reply round trip: %r != %r" % (again, reply))


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
