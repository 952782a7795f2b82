"""The discovery-service wire format (vmci-sdk.md section 3.3), both directions.

Request payload, sent to ``(1, 1)``: the 20-byte header
``DS_REQUEST_HEADER_FORMAT`` (action, msgid, handle, nameLen), then the name and
its NUL. Like the 2008 client, ``encode_request`` makes the payload
``24 + nameLen`` bytes (``sizeof(VMCIDsRequestHeader)`` + nameLen): name, NUL
and 3 zero padding bytes. ``decode_request`` relies on ``nameLen`` and the NUL,
never on the payload size, so it accepts any padding.

Reply payload, sent from ``(1, 1)``: the 20-byte header
``DS_REPLY_HEADER_FORMAT`` (msgid, code, handle, msgLen), then the message and
its NUL. The doc gives ``payloadSize = 24 + msgLen + 1`` while the bytes it
describes need only ``20 + msgLen + 1``; the two agree once one sees that the
server adds ``sizeof(VMCIDsReplyHeader)`` (24, which already counts ``msg[1]``
and padding) to ``msgLen + 1``. ``encode_reply`` follows the doc's number and
fills the 4 extra bytes with zeros; ``decode_reply`` relies on ``msgLen`` and
the NUL. A reply is at most ``VMCI_DS_MAX_MSG_SIZE`` (300) bytes, so
``encode_reply`` takes messages of at most 275 bytes; ``decode_reply`` accepts
any message that fits, with its NUL, in a reply of at most 300 bytes.

Decoding errors raise ``MalformedMessage`` (a ``ValueError``) whose ``reason``
says what is wrong and whose ``msgid`` is the message id if the payload was long
enough to carry one (else ``None``); they never raise anything else.
"""
import struct
from typing import NamedTuple, Optional, Union

from .constants import (
    DS_REPLY_HEADER_FORMAT,
    DS_REQUEST_HEADER_FORMAT,
    VMCI_DS_MAX_MSG_SIZE,
    VMCI_DS_MAX_NAME_LEN,
    VMCI_DS_REPLY_HEADER_SIZE,
    VMCI_DS_REQUEST_HEADER_SIZE,
)
from .errors import InvalidArgs
from .handles import VMCIHandle, as_handle

__all__ = [
    "MalformedMessage", "Request", "Reply", "validate_name",
    "encode_request", "decode_request", "encode_reply", "decode_reply",
    "MAX_REPLY_MSG_LEN",
]

_REQUEST = struct.Struct(DS_REQUEST_HEADER_FORMAT)
_REPLY = struct.Struct(DS_REPLY_HEADER_FORMAT)
_MSGID = struct.Struct("<i")
_REQUEST_MSGID_OFFSET = 4
_REPLY_MSGID_OFFSET = 0

#: Longest reply message that keeps the reply within VMCI_DS_MAX_MSG_SIZE.
MAX_REPLY_MSG_LEN = VMCI_DS_MAX_MSG_SIZE - VMCI_DS_REPLY_HEADER_SIZE - 1


class MalformedMessage(ValueError):
    """A discovery-service payload that does not follow section 3.3."""

    def __init__(self, reason: str, msgid: Optional[int] = None):
        super().__init__(reason)
        self.reason = reason
        self.msgid = msgid


class Request(NamedTuple):
    action: int
    msgid: int
    handle: VMCIHandle
    name: bytes


class Reply(NamedTuple):
    msgid: int
    code: int
    handle: VMCIHandle
    msg: bytes


def validate_name(name: Union[str, bytes]) -> bytes:
    """A discovery-service name as bytes (a str is UTF-8 encoded).

    Raises ``errors.InvalidArgs`` for a type other than str/bytes, a name with a
    NUL, or a name over VMCI_DS_MAX_NAME_LEN (300) bytes. The empty name is
    accepted: the 2008 client's only check is ``nameLen + 24 > 324`` and the
    doc knows no other limit.
    """
    if isinstance(name, str):
        try:
            name = name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgs("name is not encodable as UTF-8: %s" % exc) from None
    elif isinstance(name, (bytes, bytearray, memoryview)):
        name = bytes(name)
    else:
        raise InvalidArgs("a name is str or bytes, not %s" % type(name).__name__)
    if b"\0" in name:
        raise InvalidArgs("a name cannot contain NUL")
    if len(name) > VMCI_DS_MAX_NAME_LEN:
        raise InvalidArgs("name of %d bytes exceeds %d" % (len(name), VMCI_DS_MAX_NAME_LEN))
    return name


def encode_request(action: int, msgid: int, handle, name: Union[str, bytes]) -> bytes:
    """The request payload (``24 + nameLen`` bytes).

    ``InvalidArgs`` for a bad name (see ``validate_name``) or handle, or if
    action/msgid do not fit an int32.
    """
    name = validate_name(name)
    handle = as_handle(handle)
    header = _pack(_REQUEST, action, msgid, handle.context, handle.resource, len(name))
    return header + name + bytes(VMCI_DS_REQUEST_HEADER_SIZE - _REQUEST.size)


def _pack(layout: struct.Struct, *fields) -> bytes:
    try:
        return layout.pack(*fields)
    except struct.error as exc:
        raise InvalidArgs("cannot encode %r: %s" % (fields, exc)) from None


def _text(payload: bytes, offset: int, length: int, what: str, msgid: int, limit: int) -> bytes:
    if length < 0:
        raise MalformedMessage("negative %sLen %d" % (what, length), msgid)
    if length > limit:
        raise MalformedMessage("%sLen %d exceeds %d" % (what, length, limit), msgid)
    end = offset + length
    if end >= len(payload):
        raise MalformedMessage("%s of %d bytes and its NUL run past the %d-byte payload"
                               % (what, length, len(payload)), msgid)
    text = payload[offset:end]
    if b"\0" in text:
        raise MalformedMessage("NUL inside the %s" % what, msgid)
    if payload[end] != 0:
        raise MalformedMessage("%s is not NUL-terminated" % what, msgid)
    return text


def _header(payload, layout: struct.Struct, msgid_offset: int, what: str):
    try:
        payload = memoryview(payload).tobytes()
    except TypeError:
        raise MalformedMessage("a %s payload is bytes, not %s" % (what, type(payload).__name__)) from None
    if len(payload) < layout.size:
        msgid = None
        if len(payload) >= msgid_offset + _MSGID.size:
            msgid = _MSGID.unpack_from(payload, msgid_offset)[0]
        raise MalformedMessage("%s of %d bytes is shorter than its %d-byte header"
                               % (what, len(payload), layout.size), msgid)
    return payload, layout.unpack_from(payload)


def decode_request(payload) -> Request:
    """Parse a request payload; ``MalformedMessage`` if it does not follow 3.3."""
    payload, (action, msgid, hc, hr, name_len) = _header(
        payload, _REQUEST, _REQUEST_MSGID_OFFSET, "request")
    name = _text(payload, _REQUEST.size, name_len, "name", msgid, VMCI_DS_MAX_NAME_LEN)
    return Request(action, msgid, VMCIHandle(hc, hr), name)


def encode_reply(msgid: int, code: int, handle, msg: Union[str, bytes] = b"") -> bytes:
    """The reply payload (``24 + msgLen + 1`` bytes).

    ``InvalidArgs`` if ``msg`` has a NUL or is over MAX_REPLY_MSG_LEN (275) bytes,
    for a bad handle, or if msgid/code do not fit an int32.
    """
    if isinstance(msg, str):
        msg = msg.encode("utf-8")
    msg = bytes(msg)
    if b"\0" in msg:
        raise InvalidArgs("a reply message cannot contain NUL")
    if len(msg) > MAX_REPLY_MSG_LEN:
        raise InvalidArgs("reply message of %d bytes exceeds %d" % (len(msg), MAX_REPLY_MSG_LEN))
    handle = as_handle(handle)
    header = _pack(_REPLY, msgid, code, handle.context, handle.resource, len(msg))
    return header + msg + bytes(VMCI_DS_REPLY_HEADER_SIZE + 1 - _REPLY.size)


def decode_reply(payload) -> Reply:
    """Parse a reply payload; ``MalformedMessage`` if it does not follow 3.3 or exceeds 300 bytes."""
    payload, (msgid, code, hc, hr, msg_len) = _header(payload, _REPLY, _REPLY_MSGID_OFFSET, "reply")
    if len(payload) > VMCI_DS_MAX_MSG_SIZE:
        raise MalformedMessage("reply of %d bytes exceeds %d" % (len(payload), VMCI_DS_MAX_MSG_SIZE),
                               msgid)
    msg = _text(payload, _REPLY.size, msg_len, "msg", msgid, VMCI_DS_MAX_MSG_SIZE)
    return Reply(msgid, code, VMCIHandle(hc, hr), msg)
