"""vsockcompat: programs written for VMware's VMCI SDK, unchanged, on today's systems.

``import vsockcompat as vmci`` gives the SDK's calls and constants under their
SDK names and values (``vmci.VMCIDatagram_SendTo``, ``vmci.VMCI_ERROR_NOT_FOUND``),
and a Pythonic API over the same machinery (``vmci.DatagramEndpoint``,
``vmci.discovery``) whose errors are ``vmci.VMCIError`` subclasses.

``BACKEND`` names the data-plane core in use: "cython" or "pure"
(``VSOCKCOMPAT_NO_EXTENSIONS=1`` forces "pure").
"""
from . import ds_client as discovery
from . import constants as _constants
from . import errors
from .constants import *  # noqa: F401,F403 - the SDK's names are the API
from .datagram import Datagram, DatagramEndpoint
from .errors import VMCIError
from .handles import (
    VMCI_ANON_SRC_HANDLE,
    VMCI_DS_CONTEXT,
    VMCI_DS_HANDLE,
    VMCI_HANDLE_EQUAL,
    VMCI_HANDLE_INVALID,
    VMCI_HANDLE_TO_CONTEXT_ID,
    VMCI_HANDLE_TO_RESOURCE_ID,
    VMCI_HANDLE_TO_UINT64,
    VMCI_INVALID_HANDLE,
    VMCI_MAKE_HANDLE,
    VMCIHandle,
)
from .runtime import Runtime, default_runtime
from .sdk import (
    VMCI_CleanupApp,
    VMCI_InitApp,
    VMCIDatagram_CreateHnd,
    VMCIDatagram_DestroyHnd,
    VMCIDatagram_RecvFrom,
    VMCIDatagram_SendTo,
    VMCIDs_Lookup,
    VMCIDs_Register,
    VMCIDs_Unregister,
    VMCIGroup_AddMember,
    VMCIGroup_Create,
    VMCIGroup_Destroy,
    VMCIGroup_IsMember,
    VMCIGroup_RemoveMember,
    VMCIResource_AddClientPrivileges,
    VMCIResource_CheckClientPrivilege,
    VMCIResource_RemoveAllClientPrivileges,
    VMCIResource_RemoveClientPrivileges,
    VMCILibrary,
    VMCISharedMem_Attach,
    VMCISharedMem_Create,
    VMCISharedMem_Detach,
    VMCISharedMem_Query,
    VMCIQueuePair_Alloc,
    VMCIQueuePair_AllocPriv,
    VMCIQueuePair_Detach,
    vmci_qpair_alloc,
    vmci_qpair_detach,
    vmci_qpair_enqueue,
    vmci_qpair_dequeue,
    vmci_qpair_peek,
    vmci_qpair_enquev,
    vmci_qpair_dequev,
    vmci_qpair_peekv,
    vmci_qpair_produce_free_space,
    vmci_qpair_produce_buf_ready,
    vmci_qpair_consume_free_space,
    vmci_qpair_consume_buf_ready,
    vmci_qpair_get_produce_indexes,
    vmci_qpair_get_consume_indexes,
    SDK_FUNCTIONS,
)
from .sharedmem import SharedRegion
from ._version import __version__

BACKEND = default_runtime().backend

__all__ = [
    "BACKEND", "__version__", "discovery", "errors", "VMCIError", "Runtime", "default_runtime",
    "Datagram", "DatagramEndpoint", "SharedRegion", "VMCILibrary", "VMCIHandle",
    "VMCI_ANON_SRC_HANDLE", "VMCI_DS_CONTEXT", "VMCI_DS_HANDLE", "VMCI_INVALID_HANDLE",
    "VMCI_MAKE_HANDLE", "VMCI_HANDLE_EQUAL", "VMCI_HANDLE_INVALID", "VMCI_HANDLE_TO_CONTEXT_ID",
    "VMCI_HANDLE_TO_RESOURCE_ID", "VMCI_HANDLE_TO_UINT64",
] + list(SDK_FUNCTIONS) + [name for name in dir(_constants) if name.isupper() and not name.startswith("_")]
