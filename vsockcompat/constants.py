"""Every constant of the legacy VMCI SDK, under the SDK's own names.

This module is the single source of truth: the C header ``src/vsc_constants.h``
is generated from it (``python -m vsockcompat._genheader``) and the tests check
both against the tables of vmci-sdk.md. Where the SDK (2008) and later drivers
disagree, the plain name carries the 2008/SDK value; later-only values appear
only when they do not collide with an SDK name or value.

Byte layouts (section 3) are ``struct`` format strings, little-endian and
explicit; ``*_FIELDS`` name their fields in order and ``*_SIZE`` give
``struct.calcsize`` of each format.

``ERROR_CODES`` maps every status-code name (``VMCI_SUCCESS*``, ``VMCI_ERROR_*``
and ``VMCI_SHAREDMEM_ERROR_BAD_CONTEXT``; not the client range bounds) to its
value. ``ALL_INT_CONSTANTS`` maps every integer constant of this module to its
value, in definition order.
"""

import struct as _struct

# 2.1 Identifiers and handles
VMCI_INVALID_ID = 0xFFFFFFFF
VMCI_ANON_SRC_CONTEXT_ID = VMCI_INVALID_ID
VMCI_ANON_SRC_RESOURCE_ID = VMCI_INVALID_ID
VMCI_CONTEXT_RESOURCE_ID = 0
VMCI_RESERVED_RESOURCE_ID_MAX = 1023
VMCI_RESERVED_CID_LIMIT = 16
VMCI_PATH_MAX = 256
VMCI_DOMAIN_NAME_MAXLEN = 32
VMCI_PUBLIC_GROUP_NAME = "vmci public group"
VMCI_LGPFX = "VMCI: "

# 2.2 Well-known context ids
VMCI_HYPERVISOR_CONTEXT_ID = 0
VMCI_WELL_KNOWN_CONTEXT_ID = 1
VMCI_HOST_CONTEXT_ID = 2

# 2.3 Hypervisor resource ids (2008 column)
VMCI_RESOURCES_QUERY = 0
VMCI_GET_CONTEXT_ID = 1
VMCI_SHAREDMEM_CREATE = 2
VMCI_SHAREDMEM_ATTACH = 3
VMCI_SHAREDMEM_DETACH = 4
VMCI_SHAREDMEM_QUERY = 5
VMCI_DATAGRAM_REQUEST_MAP = 6
VMCI_DATAGRAM_REMOVE_MAP = 7
VMCI_EVENT_SUBSCRIBE = 8
VMCI_EVENT_UNSUBSCRIBE = 9
VMCI_QUEUEPAIR_ALLOC = 10
VMCI_QUEUEPAIR_DETACH = 11
VMCI_RESOURCE_MAX = 12

# 2.3 Other reserved resources
VMCI_DS_RESOURCE_ID = 1
VMCI_EVENT_HANDLER = 0

# 2.4 Status codes
VMCI_SUCCESS_QUEUEPAIR_ATTACH = 5
VMCI_SUCCESS_QUEUEPAIR_CREATE = 4
VMCI_SUCCESS_LAST_DETACH = 3
VMCI_SUCCESS_ACCESS_GRANTED = 2
VMCI_SUCCESS_ENTRY_DEAD = 1
VMCI_SUCCESS = 0

# 2.4 Error codes (-1..-37 exist in 2008; -38..-41 are later)
VMCI_ERROR_INVALID_RESOURCE = -1
VMCI_ERROR_INVALID_ARGS = -2
VMCI_ERROR_NO_MEM = -3
VMCI_ERROR_DATAGRAM_FAILED = -4
VMCI_ERROR_MORE_DATA = -5
VMCI_ERROR_NO_MORE_DATAGRAMS = -6
VMCI_ERROR_NO_ACCESS = -7
VMCI_ERROR_NO_HANDLE = -8
VMCI_ERROR_DUPLICATE_ENTRY = -9
VMCI_ERROR_DST_UNREACHABLE = -10
VMCI_ERROR_PAYLOAD_TOO_LARGE = -11
VMCI_ERROR_INVALID_PRIV = -12
VMCI_ERROR_GENERIC = -13
VMCI_ERROR_PAGE_ALREADY_SHARED = -14
VMCI_ERROR_CANNOT_SHARE_PAGE = -15
VMCI_ERROR_CANNOT_UNSHARE_PAGE = -16
VMCI_ERROR_NO_PROCESS = -17
VMCI_ERROR_NO_DATAGRAM = -18
VMCI_ERROR_NO_RESOURCES = -19
VMCI_ERROR_UNAVAILABLE = -20
VMCI_ERROR_NOT_FOUND = -21
VMCI_ERROR_ALREADY_EXISTS = -22
VMCI_ERROR_NOT_PAGE_ALIGNED = -23
VMCI_ERROR_INVALID_SIZE = -24
VMCI_ERROR_REGION_ALREADY_SHARED = -25
VMCI_ERROR_TIMEOUT = -26
VMCI_ERROR_DATAGRAM_INCOMPLETE = -27
VMCI_ERROR_INCORRECT_IRQL = -28
VMCI_ERROR_EVENT_UNKNOWN = -29
VMCI_ERROR_OBSOLETE = -30
VMCI_ERROR_QUEUEPAIR_MISMATCH = -31
VMCI_ERROR_QUEUEPAIR_NOTSET = -32
VMCI_ERROR_QUEUEPAIR_NOTOWNER = -33
VMCI_ERROR_QUEUEPAIR_NOTATTACHED = -34
VMCI_ERROR_QUEUEPAIR_NOSPACE = -35
VMCI_ERROR_QUEUEPAIR_NODATA = -36
VMCI_ERROR_BUSMEM_INVALIDATION = -37
VMCI_ERROR_MODULE_NOT_LOADED = -38
VMCI_ERROR_DEVICE_NOT_FOUND = -39
VMCI_ERROR_QUEUEPAIR_NOT_READY = -40
VMCI_ERROR_WOULD_BLOCK = -41
VMCI_SHAREDMEM_ERROR_BAD_CONTEXT = -1000

# 2.4 Range reserved for VMCI clients (bounds as the SDK spells them)
VMCI_ERROR_CLIENT_MIN = -500
VMCI_ERROR_CLIENT_MAX = -550

# 2.5 Events (0..4 and MAX from 2008; 5..8 later, VMware only)
VMCI_EVENT_CTX_ID_UPDATE = 0
VMCI_EVENT_CTX_REMOVED = 1
VMCI_EVENT_QP_RESUMED = 2
VMCI_EVENT_QP_PEER_ATTACH = 3
VMCI_EVENT_QP_PEER_DETACH = 4
VMCI_EVENT_MEM_ACCESS_ON = 5
VMCI_EVENT_MEM_ACCESS_OFF = 6
VMCI_EVENT_GUEST_PAUSED = 7
VMCI_EVENT_GUEST_UNPAUSED = 8
VMCI_EVENT_MAX = 5

# 2.5 Event flags (later)
VMCI_FLAG_EVENT_NONE = 0
VMCI_FLAG_EVENT_DELAYED_CB = 0x1

# 2.6 Coarse privilege flags
VMCI_NO_PRIVILEGE_FLAGS = 0x00
VMCI_PRIVILEGE_FLAG_RESTRICTED = 0x01
VMCI_PRIVILEGE_FLAG_TRUSTED = 0x02
VMCI_PRIVILEGE_ALL_FLAGS = 0x03
VMCI_DEFAULT_PROC_PRIVILEGE_FLAGS = 0x00
VMCI_LEAST_PRIVILEGE_FLAGS = 0x01
VMCI_MAX_PRIVILEGE_FLAGS = 0x02

# 2.7 Fine-grained resource privileges (2008 column)
VMCI_PRIV_CH_PRIV = 0
VMCI_PRIV_DESTROY_RESOURCE = 1
VMCI_PRIV_ASSIGN_CLIENT = 2
VMCI_PRIV_DG_CREATE = 3
VMCI_PRIV_DG_SEND = 4
VMCI_PRIV_SM_CREATE = 5
VMCI_PRIV_SM_ATTACH = 6
VMCI_NUM_PRIVILEGES = 7

# 2.7 Per-client privilege states
VMCI_PRIV_ALLOW = 0x1000
VMCI_PRIV_DENY = 0x1001
VMCI_PRIV_VALID = 0x1002
VMCI_PRIV_NOT_SET = 0x1003

# 2.7 Resource types
VMCI_RESOURCE_TYPE_ANY = 0
VMCI_RESOURCE_TYPE_API = 1
VMCI_RESOURCE_TYPE_GROUP = 2
VMCI_RESOURCE_TYPE_DATAGRAM = 3
VMCI_RESOURCE_TYPE_SHAREDMEM = 4

# 2.8 Datagram flags and sizes
VMCI_FLAG_DG_NONE = 0
VMCI_FLAG_WELLKNOWN_DG_HND = 0x1
VMCI_FLAG_ANYCID_DG_HND = 0x2
VMCI_FLAG_DG_DELAYED_CB = 0x4
VMCI_MAX_DG_SIZE = 17 * 4096
VMCI_DG_HEADERSIZE = 24
VMCI_MAX_DG_PAYLOAD_SIZE = VMCI_MAX_DG_SIZE - VMCI_DG_HEADERSIZE
VMCI_MAX_DATAGRAM_QUEUE_SIZE = 2 * VMCI_MAX_DG_SIZE

# 2.9 Queue-pair flags (ALL_FLAGS as in 2008) and limits
VMCI_QPFLAG_ATTACH_ONLY = 0x1
VMCI_QPFLAG_LOCAL = 0x2
VMCI_QPFLAG_NONBLOCK = 0x4
VMCI_QPFLAG_PINNED = 0x8
VMCI_QP_ALL_FLAGS = VMCI_QPFLAG_ATTACH_ONLY | VMCI_QPFLAG_LOCAL
VMCI_MAX_GUEST_QP_MEMORY = 128 * 1024 * 1024

# 2.10 Driver versions, (major << 16) | minor; VMCI_VERSION is the 2008 driver
VMCI_VERSION_SHIFT_WIDTH = 16
VMCI_VERSION_PREVERS2 = 1 << VMCI_VERSION_SHIFT_WIDTH
VMCI_VERSION_PREHOSTQP = 8 << VMCI_VERSION_SHIFT_WIDTH
VMCI_VERSION_HOSTQP = 9 << VMCI_VERSION_SHIFT_WIDTH
VMCI_VERSION_NOTIFY = 10 << VMCI_VERSION_SHIFT_WIDTH
VMCI_VERSION_NOVMVM = 11 << VMCI_VERSION_SHIFT_WIDTH
VMCI_VERSION = VMCI_VERSION_PREHOSTQP

# 3.2 Resources query
VMCI_RESOURCE_QUERY_MAX_NUM = 31

# 3.3 Discovery service
VMCI_DS_ACTION_LOOKUP = 0
VMCI_DS_ACTION_REGISTER = 1
VMCI_DS_ACTION_UNREGISTER = 2
VMCI_DS_MAX_MSG_SIZE = 300
VMCI_DS_REQUEST_HEADER_SIZE = 24
VMCI_DS_REPLY_HEADER_SIZE = 24
# Derived from the 2008 client's check nameLen + 24 > 324 (3.3); not an SDK name.
VMCI_DS_MAX_NAME_LEN = 300

# 10.1 AF_VSOCK (Linux names)
AF_VSOCK = 40
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
VMADDR_FLAG_TO_HOST = 0x01
IOCTL_VM_SOCKETS_GET_LOCAL_CID = 1977
SO_VM_SOCKETS_BUFFER_SIZE = 0
SO_VM_SOCKETS_BUFFER_MIN_SIZE = 1
SO_VM_SOCKETS_BUFFER_MAX_SIZE = 2
SO_VM_SOCKETS_PEER_HOST_VM_ID = 3
SO_VM_SOCKETS_TRUSTED = 5
SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD = 6
SO_VM_SOCKETS_NONBLOCK_TXRX = 7
SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW = 8

# 3.1 Datagram header; the payload follows at DG_HEADER_SIZE
DG_HEADER_FORMAT = "<IIIIQ"
DG_HEADER_FIELDS = ("dst_context", "dst_resource", "src_context", "src_resource",
                    "payload_size")
DG_HEADER_SIZE = _struct.calcsize(DG_HEADER_FORMAT)

# 3.3 DS request; the NUL-terminated name follows at DS_REQUEST_HEADER_SIZE
DS_REQUEST_HEADER_FORMAT = "<iiIIi"
DS_REQUEST_HEADER_FIELDS = ("action", "msgid", "handle_context", "handle_resource",
                            "name_len")
DS_REQUEST_HEADER_SIZE = _struct.calcsize(DS_REQUEST_HEADER_FORMAT)

# 3.3 DS reply; the NUL-terminated msg follows at DS_REPLY_HEADER_SIZE
DS_REPLY_HEADER_FORMAT = "<iiIIi"
DS_REPLY_HEADER_FIELDS = ("msgid", "code", "handle_context", "handle_resource",
                          "msg_len")
DS_REPLY_HEADER_SIZE = _struct.calcsize(DS_REPLY_HEADER_FORMAT)

# 3.4 Queue header
QUEUE_HEADER_FORMAT = "<IIQQ"
QUEUE_HEADER_FIELDS = ("handle_context", "handle_resource", "producer_tail",
                       "consumer_head")
QUEUE_HEADER_SIZE = _struct.calcsize(QUEUE_HEADER_FORMAT)

# vsockcompat's own link wire format over vsock and hybrid (not the SDK's; transport/vsock.py).
# A connector's first message, the hello: u32 magic, u32 its resource id (both little-endian).
HELLO_FORMAT = "<II"
HELLO_SIZE = _struct.calcsize(HELLO_FORMAT)
HELLO_MAGIC = 0x31435356  # b"VSC1" read as a little-endian u32
HELLO_WELL_KNOWN_MAGIC = 0x31575356  # b"VSW1": the sender speaks for context 1
#: Milliseconds a receiver waits for a new connection's hello.
HELLO_TIMEOUT_MS = 5000
# A receiver's verdict on its sender (transport/verdicts.py): u32 magic, u32 word.
VERDICT_FORMAT = "<II"
VERDICT_SIZE = _struct.calcsize(VERDICT_FORMAT)
VERDICT_MAGIC = 0x31565356  # b"VSV1" read as a little-endian u32
VERDICT_MAY_SEND = 0
VERDICT_DENIED = 1
#: The queue-account limit of links and endpoints across kernels: no user-space bound.
UNBOUNDED_ACCOUNT_LIMIT = 1 << 62
#: The kernel buffer (``SO_VM_SOCKETS_BUFFER_SIZE``) of a datagram endpoint's vsock SEQPACKET
#: connections: a sender's datagrams queued there (24-byte header and payload each, as the SDK
#: counts them) stay below ``VMCI_MAX_DATAGRAM_QUEUE_SIZE``, the kernel refusing the one that
#: would reach it; until the receiver has read the link's hello, the hello's ``HELLO_SIZE``
#: bytes take their room too (the buffer never shrinks under a sender: the kernel would drop
#: packets already in flight).
VSOCK_DG_LINK_BUFFER = VMCI_MAX_DATAGRAM_QUEUE_SIZE - 1
#: Bytes per ``send()`` on a stream between two sibling guests (both CIDs above 2, distinct):
#: vhost-device-vsock drops a packet bigger than one ~4 KiB guest receive buffer
#: (transport/pieces.py says why; src/vsc_link.c cuts the C library's writes the same way).
SIBLING_PIECE = 2048
# The hybrid transport's handshake with a VMM (transport/hybrid.py; src/vsc_hybrid.c): the host
# sends "CONNECT <port>\n" on the VMM's Unix socket and reads one line, "OK <hostport>\n".
#: Milliseconds the VMM has to accept and answer ``CONNECT <port>``.
HYBRID_HANDSHAKE_TIMEOUT_MS = 5000
#: The longest answer read: "OK 4294967295\n" is 14 bytes.
HYBRID_MAX_REPLY = 32
#: Milliseconds a process waits to claim a port (``flock`` on the VMM sockets' directories, held
#: for microseconds by each claimer) before endpoint creation gives VMCI_ERROR_TIMEOUT.
HYBRID_CLAIM_TIMEOUT_MS = 10000

# The frames of the mirror streams (mirrored regions, streamed queue pairs; mirror_wire.py):
# u32 magic, u8 type, u8 0, u16 0, u64 arg, u32 payload length (little-endian), then the payload.
MIRROR_HEADER_FORMAT = "<IBBHQI"
MIRROR_HEADER_FIELDS = ("magic", "type", "flags", "reserved", "arg", "length")
MIRROR_HEADER_SIZE = _struct.calcsize(MIRROR_HEADER_FORMAT)
MIRROR_MAGIC = 0x4D435356  # b"VSCM" read as a little-endian u32
MIRROR_MAX_PAYLOAD = 1 << 20
MIRROR_HELLO, MIRROR_SIZE, MIRROR_REFUSE, MIRROR_BYE = 1, 2, 3, 4
MIRROR_QUERY, MIRROR_UPDATE, MIRROR_FLUSH, MIRROR_FLUSHED, MIRROR_ACK = 5, 6, 7, 8, 12
MIRROR_WELCOME, MIRROR_DATA, MIRROR_CREDIT, MIRROR_WANT = 9, 10, 11, 13
#: Change detection of a mirrored region (mirror_diff.py): 64-byte lines in 64 KiB blocks,
#: scanned every MIRROR_INTERVAL_MS milliseconds.
MIRROR_LINE = 64
MIRROR_BLOCK = 65536
MIRROR_INTERVAL_MS = 10


def _is_int_constant(name, value):
    return (name.isupper() and not name.startswith("_")
            and isinstance(value, int) and not isinstance(value, bool))


ALL_INT_CONSTANTS = {n: v for n, v in dict(globals()).items() if _is_int_constant(n, v)}

_CLIENT_RANGE = ("VMCI_ERROR_CLIENT_MIN", "VMCI_ERROR_CLIENT_MAX")

ERROR_CODES = {
    n: v for n, v in ALL_INT_CONSTANTS.items()
    if (n.startswith(("VMCI_SUCCESS", "VMCI_ERROR_")) and n not in _CLIENT_RANGE)
    or n == "VMCI_SHAREDMEM_ERROR_BAD_CONTEXT"
}

__all__ = sorted(n for n in dict(globals()) if n.isupper() and not n.startswith("_"))

del _is_int_constant
