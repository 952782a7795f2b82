"""The backend contract: what the Cython core (_cvsc) and the pure core (_pure) both provide.

Only the data plane lives here; everything else is written once in pure modules.
Status codes: a non-negative frame size (header included), a negative VMCI
error code, or one of AGAIN / PEER_GONE / BAD_FRAME (below the VMCI range).
"""
import socket
from typing import Optional, Tuple, Union


Buffer = Union[bytes, bytearray, memoryview]
WritableBuffer = Union[bytearray, memoryview]

NAME: str  # "cython" or "pure"
AGAIN: int
PEER_GONE: int
BAD_FRAME: int
ACCOUNT_SIZE: int
ACCOUNT_MAGIC: int
ACCOUNT_VERSION: int

HeaderFields = Tuple[int, int, int, int, int]

def encode_header(
    dst_context: int, dst_resource: int, src_context: int, src_resource: int, payload_size: int
) -> bytes: ...
def decode_header(frame: Buffer) -> HeaderFields: ...
def encode_datagram(
    dst_context: int, dst_resource: int, src_context: int, src_resource: int, payload: Buffer
) -> bytes: ...

class Account:
    fd: int
    def __init__(self, fd: int, page: WritableBuffer) -> None: ...
    def initialise(self, limit: int) -> None: ...
    def is_valid(self) -> bool: ...
    def mark_closed(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def limit(self) -> int: ...
    def queued(self) -> int: ...
    def release_memory(self) -> None: ...

def send_datagram(
    sock: socket.socket,
    account: Account,
    dst_context: int,
    dst_resource: int,
    src_context: int,
    src_resource: int,
    payload: Buffer,
    length: int,
) -> int: ...
def recv_datagram(
    sock: socket.socket, account: Account, buf: WritableBuffer, spill: WritableBuffer
) -> Tuple[int, Optional[HeaderFields]]: ...
