"""The discovery-service codec (vmci-sdk.md 3.3): golden bytes, round trips, malformed shapes."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsockcompat import constants as C
from vsockcompat.ds_protocol import (
    MAX_REPLY_MSG_LEN,
    MalformedMessage,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    validate_name,
)
from vsockcompat.errors import InvalidArgs
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle

u32 = st.integers(0, 0xFFFFFFFF)
i32 = st.integers(-2**31, 2**31 - 1)
handles = st.builds(VMCIHandle, u32, u32)
names = st.binary(max_size=C.VMCI_DS_MAX_NAME_LEN).filter(lambda b: b"\0" not in b)
msgs = st.binary(max_size=MAX_REPLY_MSG_LEN).filter(lambda b: b"\0" not in b)

# REGISTER, msgid 0, handle (2, 1024), name "svc": header, name, NUL, 3 padding bytes.
GOLDEN_REQUEST = bytes.fromhex(
    "01000000" "00000000" "02000000" "00040000" "03000000" "737663" "00" "000000")
# msgid 5, VMCI_ERROR_NO_ACCESS (-7), invalid handle, "access denied": 24 + 13 + 1 bytes.
GOLDEN_REPLY = bytes.fromhex(
    "05000000" "f9ffffff" "ffffffff" "ffffffff" "0d000000"
    "6163636573732064656e696564" "00" "00000000")


def request_bytes(action=0, msgid=9, handle=(0xFFFFFFFF, 0xFFFFFFFF), name_len=None, body=b"abc\0"):
    if name_len is None:
        name_len = body.index(b"\0") if b"\0" in body else len(body)
    return struct.pack("<iiIIi", action, msgid, handle[0], handle[1], name_len) + body


def reply_bytes(msgid=9, code=0, handle=(1, 2), msg_len=None, body=b"\0"):
    if msg_len is None:
        msg_len = body.index(b"\0") if b"\0" in body else len(body)
    return struct.pack("<iiIIi", msgid, code, handle[0], handle[1], msg_len) + body


def test_golden_request():
    payload = encode_request(C.VMCI_DS_ACTION_REGISTER, 0, (2, 1024), b"svc")
    assert payload == GOLDEN_REQUEST
    assert len(payload) == 24 + 3
    assert decode_request(GOLDEN_REQUEST) == Request(1, 0, VMCIHandle(2, 1024), b"svc")


def test_golden_reply():
    payload = encode_reply(5, C.VMCI_ERROR_NO_ACCESS, VMCI_INVALID_HANDLE, b"access denied")
    assert payload == GOLDEN_REPLY
    assert len(payload) == 24 + 13 + 1
    assert decode_reply(GOLDEN_REPLY) == Reply(5, -7, VMCI_INVALID_HANDLE, b"access denied")


def test_empty_reply_is_25_bytes():
    payload = encode_reply(0, C.VMCI_SUCCESS, (2, 1024))
    assert len(payload) == 25
    assert decode_reply(payload) == Reply(0, 0, VMCIHandle(2, 1024), b"")


@pytest.mark.parametrize("name", [b"", b"x", "vmci public group", "ünïcode", b"\xff\xfe", b"n" * 300])
def test_request_round_trip(name):
    payload = encode_request(C.VMCI_DS_ACTION_LOOKUP, 2**31 - 1, VMCI_INVALID_HANDLE, name)
    raw = name.encode() if isinstance(name, str) else name
    assert len(payload) == 24 + len(raw)
    assert decode_request(payload) == Request(0, 2**31 - 1, VMCI_INVALID_HANDLE, raw)


def test_request_padding_is_not_trusted():
    # The server uses nameLen and the NUL, whatever follows (or does not).
    assert decode_request(request_bytes(body=b"abc\0")).name == b"abc"
    assert decode_request(request_bytes(body=b"abc\0garbage")).name == b"abc"


def test_reply_decoder_takes_any_message_that_fits():
    assert decode_reply(reply_bytes(body=b"m" * 279 + b"\0")).msg == b"m" * 279


def test_reply_message_at_the_limit():
    msg = b"m" * MAX_REPLY_MSG_LEN
    payload = encode_reply(1, -13, VMCI_INVALID_HANDLE, msg)
    assert len(payload) == C.VMCI_DS_MAX_MSG_SIZE
    assert decode_reply(payload).msg == msg


@pytest.mark.parametrize("payload, msgid, reason", [
    (b"", None, "shorter"),
    (b"\0" * 7, None, "shorter"),
    (request_bytes(msgid=3)[:8], 3, "shorter"),
    (request_bytes(msgid=3)[:19], 3, "shorter"),
    (request_bytes(msgid=3, body=b""), 3, "past"),
    (request_bytes(name_len=-1, body=b"\0"), 9, "negative"),
    (request_bytes(name_len=301, body=b"n" * 301 + b"\0"), 9, "exceeds 300"),
    (request_bytes(name_len=10, body=b"abc\0"), 9, "past"),
    (request_bytes(name_len=3, body=b"abc"), 9, "past"),
    (request_bytes(name_len=3, body=b"a\0c\0"), 9, "NUL inside"),
    (request_bytes(name_len=3, body=b"abcd"), 9, "not NUL-terminated"),
])
def test_malformed_requests(payload, msgid, reason):
    with pytest.raises(MalformedMessage, match=reason) as info:
        decode_request(payload)
    assert info.value.msgid == msgid
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("payload, reason", [
    (b"\0" * 19, "shorter"),
    (reply_bytes(msg_len=-5), "negative"),
    (reply_bytes(msg_len=4, body=b"ab\0"), "past"),
    (reply_bytes(msg_len=2, body=b"\0b\0"), "NUL inside"),
    (reply_bytes(msg_len=2, body=b"abc"), "not NUL-terminated"),
    (reply_bytes(body=b"\0" * 281), "exceeds 300"),
    (reply_bytes(msg_len=280, body=b"m" * 280), "past"),
    (reply_bytes(msg_len=301, body=b"m" * 279 + b"\0"), "exceeds 300"),
])
def test_malformed_replies(payload, reason):
    with pytest.raises(MalformedMessage, match=reason):
        decode_reply(payload)


@pytest.mark.parametrize("decode", [decode_request, decode_reply])
@pytest.mark.parametrize("payload", [None, 5, "text"])
def test_decode_rejects_non_bytes(decode, payload):
    with pytest.raises(MalformedMessage):
        decode(payload)


def test_validate_name():
    assert validate_name("café") == "café".encode()
    assert validate_name(b"x") == b"x"
    assert validate_name(bytearray(b"x")) == b"x"
    assert validate_name("") == b""
    assert validate_name("n" * 300) == b"n" * 300
    assert validate_name("é" * 150) == "é".encode() * 150


@pytest.mark.parametrize("name", [b"n" * 301, "é" * 151, "a\0b", b"\0", None, 7, ["x"], "\udcff"])
def test_validate_name_rejects(name):
    with pytest.raises(InvalidArgs):
        validate_name(name)


def test_encoders_reject_bad_arguments():
    with pytest.raises(InvalidArgs):
        encode_request(0, 0, VMCI_INVALID_HANDLE, b"a\0")
    with pytest.raises(InvalidArgs):
        encode_request(0, 2**31, VMCI_INVALID_HANDLE, b"a")
    with pytest.raises(InvalidArgs):
        encode_request(0, 0, (1, 2, 3), b"a")
    with pytest.raises(InvalidArgs):
        encode_reply(0, 0, VMCI_INVALID_HANDLE, b"m" * (MAX_REPLY_MSG_LEN + 1))
    with pytest.raises(InvalidArgs):
        encode_reply(0, 0, VMCI_INVALID_HANDLE, b"a\0b")


@settings(max_examples=300)
@given(action=i32, msgid=i32, handle=handles, name=names)
def test_request_round_trip_property(action, msgid, handle, name):
    payload = encode_request(action, msgid, handle, name)
    assert len(payload) == 24 + len(name)
    assert decode_request(payload) == Request(action, msgid, handle, name)


@settings(max_examples=300)
@given(msgid=i32, code=i32, handle=handles, msg=msgs)
def test_reply_round_trip_property(msgid, code, handle, msg):
    payload = encode_reply(msgid, code, handle, msg)
    assert len(payload) == 25 + len(msg)
    assert decode_reply(payload) == Reply(msgid, code, handle, msg)


@settings(max_examples=500)
@given(st.one_of(
    st.binary(max_size=400),
    st.builds(lambda h, n, t: h + struct.pack("<i", n) + t,
              st.binary(min_size=16, max_size=16), st.integers(-2, 45), st.binary(max_size=40)),
))
def test_decoders_raise_only_malformed(payload):
    for decode in (decode_request, decode_reply):
        try:
            decode(payload)
        except MalformedMessage as exc:
            assert exc.reason
            assert exc.msgid is None or -2**31 <= exc.msgid < 2**31
