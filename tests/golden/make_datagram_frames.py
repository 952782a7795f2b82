"""Generate datagram_frames.json: golden VMCI datagram frames, built field by field.

Independent of both cores (plain int.to_bytes), so the cores are checked
against the SDK layout (vmci-sdk.md section 3.1), not against each other.
Run: python tests/golden/make_datagram_frames.py
"""
import json
import os

CASES = [
    ((2, 1024), (3, 1025), b""),
    ((1, 1), (2, 1024), b"HOST INFO"),
    ((2, 1024), (3, 1025), b"HELLO, SERVER!"),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), b"\x00\xff" * 8),
    ((4294967294, 7), (16, 0), bytes(range(256))),
]


def frame(dst, src, payload):
    fields = (dst[0], dst[1], src[0], src[1])
    header = b"".join(v.to_bytes(4, "little") for v in fields) + len(payload).to_bytes(8, "little")
    return header + payload


def main():
    rows = [{"dst": list(dst), "src": list(src), "payload": payload.hex(), "frame": frame(dst, src, payload).hex()}
            for dst, src, payload in CASES]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datagram_frames.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
