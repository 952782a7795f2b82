"""The legacy SDK calls, under their SDK names, returning SDK codes.

Out-parameters of the C API are returned: ``VMCIDatagram_RecvFrom(h, buf)``
returns ``(rv, src)`` and ``VMCIDs_Lookup(name)`` returns ``(rv, handle)``;
``VMCISharedMem_Create(size)`` returns ``(handle, view)``, ``VMCISharedMem_Query(h)``
``(rv, size)`` and ``VMCISharedMem_Attach(h, size)`` ``(rv, view)``.
Nothing here raises for bad input: every failure is a VMCI code (or
``VMCI_INVALID_HANDLE`` where the SDK returns a handle). Choices where the SDK
is silent are listed in README.rst ("Where the SDK is silent").

``VMCILibrary`` holds what the C library kept in globals: whether
``VMCI_InitApp`` ran, and the handles created since. The module-level
functions are the methods of one default instance.
"""
import logging
import threading
from typing import Dict, Optional, Tuple

from . import ds_client
from .constants import (
    VMCI_ERROR_ALREADY_EXISTS,
    VMCI_ERROR_DEVICE_NOT_FOUND,
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_INVALID_PRIV,
    VMCI_ERROR_NO_ACCESS,
    VMCI_ERROR_NOT_FOUND,
    VMCI_ERROR_UNAVAILABLE,
    VMCI_INVALID_ID,
    VMCI_MAX_DG_PAYLOAD_SIZE,
    VMCI_SUCCESS,
)
from .datagram import DatagramEndpoint
from .errors import VMCIError
from .handles import VMCI_INVALID_HANDLE, VMCIHandle, as_handle
from .runtime import Runtime, default_runtime
from .sharedmem import SharedRegion, query as _shm_query
from .sdk_queuepair import QueuePairCalls
from .policy import PolicyError
from .privileges import PRIVILEGE_NAMES
from .transport import TransportUnavailable

log = logging.getLogger("vsockcompat")

_NO_HANDLE = (VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _handle_or_none(obj) -> Optional[VMCIHandle]:
    try:
        return as_handle(obj)
    except VMCIError:
        return None


def _byte_view_or_none(buf, writable: bool = False) -> Optional[memoryview]:
    """``buf`` as a contiguous 1-D byte view (writable if asked), or None if it cannot be."""
    try:
        view = memoryview(buf)
    except TypeError:
        return None
    if not view.c_contiguous or (writable and view.readonly):
        return None
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


class VMCILibrary(QueuePairCalls):
    """One instance of the SDK library state (the C library's globals)."""

    def __init__(self, runtime: Optional[Runtime] = None):
        self._runtime = runtime
        self._initialised = False
        self._endpoints: Dict[VMCIHandle, DatagramEndpoint] = {}
        self._regions: Dict[VMCIHandle, SharedRegion] = {}
        self._lock = threading.Lock()

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = default_runtime()
        return self._runtime

    @property
    def initialised(self) -> bool:
        return self._initialised

    # 4.1 Library setup

    def VMCI_InitApp(self, devName=None) -> int:
        """Initialise the library. ``devName`` (the SDK's device, e.g. "/dev/vmci") is accepted
        for compatibility and not opened. VMCI_ERROR_DEVICE_NOT_FOUND if the transport cannot run."""
        if devName is not None and not isinstance(devName, (str, bytes)):
            return VMCI_ERROR_INVALID_ARGS
        try:
            self.runtime.access
        except PolicyError as exc:
            log.error("vsockcompat: %s", exc)
            return VMCI_ERROR_NO_ACCESS
        except VMCIError as exc:  # e.g. NoAccess: the policy gives this context to another user
            log.error("vsockcompat: %s", exc)
            return exc.code
        except (TransportUnavailable, ValueError, OSError):
            return VMCI_ERROR_DEVICE_NOT_FOUND
        self._initialised = True
        return VMCI_SUCCESS

    def VMCI_CleanupApp(self) -> None:
        """Destroy every handle created through this library, detach its shared memory regions
        and queue pairs, and forget the initialisation."""
        with self._lock:
            endpoints, self._endpoints = self._endpoints, {}
            regions, self._regions = self._regions, {}
            self._initialised = False
        for endpoint in endpoints.values():
            endpoint.close()
        for region in regions.values():
            region.detach()
        self._detach_all_queue_pairs()

    # 4.2 Datagram API

    def VMCIDatagram_CreateHnd(self, resourceID=0) -> VMCIHandle:
        """Create a datagram endpoint; VMCI_INVALID_HANDLE on failure.

        The SDK passes 0: a fresh resource id >= 1024. Any other value
        (except VMCI_INVALID_ID, also "fresh") asks for that resource id and
        fails if it is taken.
        """
        if not self._initialised or not _is_int(resourceID) or not 0 <= resourceID <= VMCI_INVALID_ID:
            return VMCI_INVALID_HANDLE
        resource = None if resourceID in (0, VMCI_INVALID_ID) else resourceID
        try:
            endpoint = DatagramEndpoint(resource, runtime=self.runtime)
        except (VMCIError, OSError):
            return VMCI_INVALID_HANDLE
        with self._lock:
            self._endpoints[endpoint.handle] = endpoint
        return endpoint.handle

    def VMCIDatagram_DestroyHnd(self, handle) -> int:
        """Destroy an endpoint created here; its pending datagrams are dropped."""
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE
        handle = _handle_or_none(handle)
        if handle is None:
            return VMCI_ERROR_INVALID_ARGS
        with self._lock:
            endpoint = self._endpoints.pop(handle, None)
        if endpoint is None:
            return VMCI_ERROR_NOT_FOUND
        endpoint.close()
        return VMCI_SUCCESS

    def VMCIDatagram_SendTo(self, dst, src, length, buf) -> int:
        """Send ``length`` bytes of ``buf`` from our endpoint ``src`` to ``dst`` (SDK order).

        Returns the datagram's size including its 24-byte header, as the driver did.
        """
        # The common case, one core call: handles as the SDK calls return them (exact ints
        # in range: ``src`` found among ours is; the very handle CreateHnd returned, at once),
        # an int length, a bytes-like buffer.
        if (type(dst) is VMCIHandle and type(src) is VMCIHandle and type(length) is int
                and (type(buf) is bytes or type(buf) is bytearray)):
            context, resource = dst
            if type(context) is int and type(resource) is int and 0 <= context <= VMCI_INVALID_ID \
                    and 0 <= resource <= VMCI_INVALID_ID:  # ids are 32-bit
                try:
                    endpoint = self._endpoints.get(src)  # none unless initialised
                except TypeError:  # a field that cannot be hashed: checked below
                    endpoint = None
                if endpoint is not None and (src is endpoint.handle or type(src[0]) is int
                                             and type(src[1]) is int):
                    return endpoint.send_status(dst, buf, length)
        return self._send_to_checked(dst, src, length, buf)

    def _send_to_checked(self, dst, src, length, buf) -> int:
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE
        dst = _handle_or_none(dst)
        src = _handle_or_none(src)
        if dst is None or src is None or not _is_int(length):
            return VMCI_ERROR_INVALID_ARGS
        view = _byte_view_or_none(buf)
        if view is None or not 0 <= length <= len(view) or length > VMCI_MAX_DG_PAYLOAD_SIZE:
            return VMCI_ERROR_INVALID_ARGS
        endpoint = self._endpoints.get(src)
        if endpoint is None:
            return VMCI_ERROR_INVALID_ARGS
        return endpoint.send_status(dst, view, length)

    def VMCIDatagram_RecvFrom(self, handle, buf) -> Tuple[int, VMCIHandle]:
        """Block until a datagram arrives at ``handle``; copy its payload into ``buf``.

        Returns ``(payload_length, src)``, or ``(negative code, VMCI_INVALID_HANDLE)``;
        VMCI_ERROR_NO_MEM if ``buf`` is too small (the datagram stays queued).
        """
        if type(handle) is VMCIHandle and type(buf) is bytearray:  # the common case, one core call
            try:
                endpoint = self._endpoints.get(handle)  # none unless initialised
            except TypeError:  # a field that cannot be hashed: checked below
                endpoint = None
            if endpoint is not None and handle is not endpoint.handle \
                    and not (type(handle[0]) is int and type(handle[1]) is int):
                endpoint = None  # equal to one of ours, but not exact ints: checked below
        else:
            endpoint = None
        if endpoint is None:
            if not self._initialised:
                return VMCI_ERROR_UNAVAILABLE, VMCI_INVALID_HANDLE
            handle = _handle_or_none(handle)
            endpoint = None if handle is None else self._endpoints.get(handle)
            buf = _byte_view_or_none(buf, writable=True)
            if endpoint is None or buf is None:
                return _NO_HANDLE
        result = endpoint.recv_status(buf)  # (rv, src): returned as it is when rv >= 0
        return result if result[0] >= 0 else (result[0], VMCI_INVALID_HANDLE)

    # 4.5 Discovery service

    def VMCIDs_Lookup(self, name) -> Tuple[int, VMCIHandle]:
        """Look ``name`` up: ``(VMCI_SUCCESS, handle)`` or ``(VMCI_ERROR_NOT_FOUND, VMCI_INVALID_HANDLE)``."""
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE, VMCI_INVALID_HANDLE
        return ds_client.lookup_status(name, runtime=self.runtime)

    def VMCIDs_Register(self, name, handle) -> int:
        """Publish ``name -> handle``; VMCI_ERROR_ALREADY_EXISTS if the name is taken."""
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE
        handle = _handle_or_none(handle)
        if handle is None:
            return VMCI_ERROR_INVALID_ARGS
        return ds_client.register_status(name, handle, runtime=self.runtime)

    def VMCIDs_Unregister(self, name) -> int:
        """Remove ``name``; VMCI_ERROR_NO_ACCESS if another context registered it."""
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE
        return ds_client.unregister_status(name, runtime=self.runtime)

    # 4.3 Shared memory API

    def VMCISharedMem_Create(self, size) -> Tuple[VMCIHandle, Optional[memoryview]]:
        """Create a region of ``size`` bytes and map it: ``(handle, view of exactly size bytes)``,
        or ``(VMCI_INVALID_HANDLE, None)``. See ``sharedmem`` for sizes, lifetime and who may attach."""
        if not self._initialised:
            return VMCI_INVALID_HANDLE, None
        try:
            region = SharedRegion.create(size, runtime=self.runtime)
        except VMCIError:
            return VMCI_INVALID_HANDLE, None
        with self._lock:
            self._regions[region.handle] = region
        return region.handle, region.buffer

    def VMCISharedMem_Query(self, handle) -> Tuple[int, int]:
        """``(VMCI_SUCCESS, requested size)`` of a live region, or ``(error code, 0)``:
        VMCI_ERROR_NOT_FOUND if no region lives at ``handle``."""
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE, 0
        try:
            return VMCI_SUCCESS, _shm_query(handle, runtime=self.runtime)
        except VMCIError as exc:
            return exc.code, 0

    def VMCISharedMem_Attach(self, handle, size) -> Tuple[int, Optional[memoryview]]:
        """Map the live region ``handle``: ``(VMCI_SUCCESS, view)`` or ``(error code, None)``.

        ``size`` must be the region's size (VMCI_ERROR_INVALID_SIZE) or 0 for any; the view's
        length is the size. VMCI_ERROR_NOT_FOUND if no region lives there,
        VMCI_ERROR_ALREADY_EXISTS if this library has it mapped already.
        """
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE, None
        handle = _handle_or_none(handle)
        if handle is None or not _is_int(size):
            return VMCI_ERROR_INVALID_ARGS, None
        with self._lock:
            if handle in self._regions:
                return VMCI_ERROR_ALREADY_EXISTS, None
        try:
            region = SharedRegion.attach(handle, size or None, runtime=self.runtime)
        except VMCIError as exc:
            return exc.code, None
        with self._lock:
            if handle not in self._regions:
                self._regions[handle] = region
                return VMCI_SUCCESS, region.buffer
        region.detach()
        return VMCI_ERROR_ALREADY_EXISTS, None

    def VMCISharedMem_Detach(self, handle) -> int:
        """Unmap a region this library created or attached; the last user's detach removes it.
        VMCI_ERROR_NOT_FOUND if this library has no mapping of ``handle`` (e.g. twice)."""
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE
        handle = _handle_or_none(handle)
        if handle is None:
            return VMCI_ERROR_INVALID_ARGS
        with self._lock:
            region = self._regions.pop(handle, None)
        if region is None:
            return VMCI_ERROR_NOT_FOUND
        try:
            region.detach()
        except VMCIError as exc:
            return exc.code
        return VMCI_SUCCESS


    # 4.4 Access control

    def VMCIResource_AddClientPrivileges(self, resourceHandle, clientHandle, allowPrivs=(), denyPrivs=()) -> int:
        """Allow ``allowPrivs`` and deny ``denyPrivs`` (VMCI_PRIV_* values) to ``clientHandle`` on
        ``resourceHandle``; deny wins. The C call's counts are the lists' lengths.

        VMCI_ERROR_INVALID_ARGS for invalid handles, no privilege at all or no such resource;
        VMCI_ERROR_INVALID_PRIV for a privilege the resource's kind does not take (checked
        before anything changes); VMCI_ERROR_NO_ACCESS unless this context owns the resource
        or holds CH_PRIV on it. Enforced: a client denied DG_SEND gets VMCI_ERROR_NO_ACCESS
        from ``VMCIDatagram_SendTo`` and the receiver never sees its datagrams.
        """
        return self._change_privileges(resourceHandle, clientHandle,
                                       lambda acl, client: acl.add(client, allowPrivs, denyPrivs))

    def VMCIResource_RemoveClientPrivileges(self, resourceHandle, clientHandle, privs=()) -> int:
        """Reset ``privs`` of ``clientHandle`` on ``resourceHandle`` to not set (a client left with
        none is removed). VMCI_ERROR_INVALID_ARGS if the client has no privileges there."""
        return self._change_privileges(resourceHandle, clientHandle,
                                       lambda acl, client: acl.remove(client, privs))

    def VMCIResource_RemoveAllClientPrivileges(self, resourceHandle, clientHandle) -> int:
        """Forget every privilege of ``clientHandle`` on ``resourceHandle``."""
        return self._change_privileges(resourceHandle, clientHandle,
                                       lambda acl, client: acl.remove_all(client))

    def VMCIResource_CheckClientPrivilege(self, resourceHandle, clientHandle, priv) -> int:
        """VMCI_SUCCESS_ACCESS_GRANTED, VMCI_ERROR_NO_ACCESS, or VMCI_ERROR_INVALID_PRIV when the
        privilege is not set for the client, its context or any of their groups."""
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE
        resource, client = _handle_or_none(resourceHandle), _handle_or_none(clientHandle)
        if resource is None or client is None or resource.is_invalid or client.is_invalid or not _is_int(priv):
            return VMCI_ERROR_INVALID_ARGS
        if priv not in PRIVILEGE_NAMES:
            return VMCI_ERROR_INVALID_PRIV
        try:
            return self.runtime.access.check_privilege(resource, client, priv)
        except VMCIError as exc:
            return exc.code

    def _change_privileges(self, resourceHandle, clientHandle, edit) -> int:
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE
        resource, client = _handle_or_none(resourceHandle), _handle_or_none(clientHandle)
        if resource is None or client is None or resource.is_invalid or client.is_invalid:
            return VMCI_ERROR_INVALID_ARGS
        try:
            self.runtime.access.change(resource, lambda acl: edit(acl, client))
        except VMCIError as exc:
            return exc.code
        return VMCI_SUCCESS

    def VMCIGroup_Create(self) -> VMCIHandle:
        """A new group ``(2, rid)`` owned by this context; VMCI_INVALID_HANDLE on failure.
        It lives until ``VMCIGroup_Destroy`` or until this process exits."""
        if not self._initialised:
            return VMCI_INVALID_HANDLE
        try:
            return self.runtime.access.create_group()
        except VMCIError:
            return VMCI_INVALID_HANDLE

    def VMCIGroup_Destroy(self, group) -> int:
        """Destroy a group this context created (VMCI_ERROR_NO_ACCESS for another's)."""
        return self._group_call(group, None, lambda access, g, _: access.destroy_group(g))

    def VMCIGroup_AddMember(self, group, member, canAssign=False) -> int:
        """Add ``member``; ``canAssign`` lets it add and remove members too."""
        if not isinstance(canAssign, (bool, int)):
            return VMCI_ERROR_INVALID_ARGS
        return self._group_call(group, member, lambda access, g, m: access.add_member(g, m, bool(canAssign)))

    def VMCIGroup_RemoveMember(self, group, member) -> int:
        """Remove ``member`` (VMCI_ERROR_INVALID_ARGS if it is not one)."""
        return self._group_call(group, member, lambda access, g, m: access.remove_member(g, m))

    def VMCIGroup_IsMember(self, group, member) -> bool:
        """Whether ``member`` is in ``group`` (every handle is in the public group)."""
        group, member = _handle_or_none(group), _handle_or_none(member)
        if not self._initialised or group is None or member is None or member.is_invalid:
            return False
        return self.runtime.access.is_member(group, member)

    def _group_call(self, group, member, call) -> int:
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE
        group = _handle_or_none(group)
        if member is not None:
            member = _handle_or_none(member)
            if member is None or member.is_invalid:
                return VMCI_ERROR_INVALID_ARGS
        if group is None or group.is_invalid:
            return VMCI_ERROR_INVALID_ARGS
        try:
            call(self.runtime.access, group, member)
        except VMCIError as exc:
            return exc.code
        return VMCI_SUCCESS


_default = VMCILibrary()

VMCI_InitApp = _default.VMCI_InitApp
VMCI_CleanupApp = _default.VMCI_CleanupApp
VMCIDatagram_CreateHnd = _default.VMCIDatagram_CreateHnd
VMCIDatagram_DestroyHnd = _default.VMCIDatagram_DestroyHnd
VMCIDatagram_SendTo = _default.VMCIDatagram_SendTo
VMCIDatagram_RecvFrom = _default.VMCIDatagram_RecvFrom
VMCIDs_Lookup = _default.VMCIDs_Lookup
VMCIDs_Register = _default.VMCIDs_Register
VMCIDs_Unregister = _default.VMCIDs_Unregister
VMCIResource_AddClientPrivileges = _default.VMCIResource_AddClientPrivileges
VMCIResource_RemoveClientPrivileges = _default.VMCIResource_RemoveClientPrivileges
VMCIResource_RemoveAllClientPrivileges = _default.VMCIResource_RemoveAllClientPrivileges
VMCIResource_CheckClientPrivilege = _default.VMCIResource_CheckClientPrivilege
VMCIGroup_Create = _default.VMCIGroup_Create
VMCIGroup_Destroy = _default.VMCIGroup_Destroy
VMCIGroup_AddMember = _default.VMCIGroup_AddMember
VMCIGroup_RemoveMember = _default.VMCIGroup_RemoveMember
VMCIGroup_IsMember = _default.VMCIGroup_IsMember
VMCISharedMem_Create = _default.VMCISharedMem_Create
VMCISharedMem_Query = _default.VMCISharedMem_Query
VMCISharedMem_Attach = _default.VMCISharedMem_Attach
VMCISharedMem_Detach = _default.VMCISharedMem_Detach
VMCIQueuePair_Alloc = _default.VMCIQueuePair_Alloc
VMCIQueuePair_AllocPriv = _default.VMCIQueuePair_AllocPriv
VMCIQueuePair_Detach = _default.VMCIQueuePair_Detach
vmci_qpair_alloc = _default.vmci_qpair_alloc
vmci_qpair_detach = _default.vmci_qpair_detach
vmci_qpair_enqueue = _default.vmci_qpair_enqueue
vmci_qpair_dequeue = _default.vmci_qpair_dequeue
vmci_qpair_peek = _default.vmci_qpair_peek
vmci_qpair_enquev = _default.vmci_qpair_enquev
vmci_qpair_dequev = _default.vmci_qpair_dequev
vmci_qpair_peekv = _default.vmci_qpair_peekv
vmci_qpair_produce_free_space = _default.vmci_qpair_produce_free_space
vmci_qpair_produce_buf_ready = _default.vmci_qpair_produce_buf_ready
vmci_qpair_consume_free_space = _default.vmci_qpair_consume_free_space
vmci_qpair_consume_buf_ready = _default.vmci_qpair_consume_buf_ready
vmci_qpair_get_produce_indexes = _default.vmci_qpair_get_produce_indexes
vmci_qpair_get_consume_indexes = _default.vmci_qpair_get_consume_indexes

SDK_FUNCTIONS = (
    "VMCI_InitApp",
    "VMCI_CleanupApp",
    "VMCIDatagram_CreateHnd",
    "VMCIDatagram_DestroyHnd",
    "VMCIDatagram_SendTo",
    "VMCIDatagram_RecvFrom",
    "VMCIDs_Lookup",
    "VMCIDs_Register",
    "VMCIDs_Unregister",
    "VMCIResource_AddClientPrivileges",
    "VMCIResource_RemoveClientPrivileges",
    "VMCIResource_RemoveAllClientPrivileges",
    "VMCIResource_CheckClientPrivilege",
    "VMCIGroup_Create",
    "VMCIGroup_Destroy",
    "VMCIGroup_AddMember",
    "VMCIGroup_RemoveMember",
    "VMCIGroup_IsMember",
    "VMCISharedMem_Create",
    "VMCISharedMem_Query",
    "VMCISharedMem_Attach",
    "VMCISharedMem_Detach",
    "VMCIQueuePair_Alloc",
    "VMCIQueuePair_AllocPriv",
    "VMCIQueuePair_Detach",
    "vmci_qpair_alloc",
    "vmci_qpair_detach",
    "vmci_qpair_enqueue",
    "vmci_qpair_dequeue",
    "vmci_qpair_peek",
    "vmci_qpair_enquev",
    "vmci_qpair_dequev",
    "vmci_qpair_peekv",
    "vmci_qpair_produce_free_space",
    "vmci_qpair_produce_buf_ready",
    "vmci_qpair_consume_free_space",
    "vmci_qpair_consume_buf_ready",
    "vmci_qpair_get_produce_indexes",
    "vmci_qpair_get_consume_indexes",
)
