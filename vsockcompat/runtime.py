"""A runtime: the settings, the data-plane core and the transport one program uses.

Most programs use the default runtime, built from the environment on first
use. Tests build their own, one per core, to run the same behaviour on both.
"""
import os
import threading
from typing import Optional

from ._backend import load_core, select_core
from .access import AccessControl
from .errors import NoAccess
from .policy import Policy, load_policy, policy_path
from ._settings import Settings
from .transport import open_transport


class Runtime:
    """Settings + core + transport. The transport is opened on first use."""

    def __init__(self, settings: Optional[Settings] = None, core=None):
        self.settings = settings if settings is not None else Settings.from_environ()
        if isinstance(core, str):
            core = load_core(core)
        self.core = core if core is not None else select_core(self.settings.no_extensions)
        self._transport = None
        self._policy = None
        self._access = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self.core.NAME

    @property
    def transport(self):
        if self._transport is None:
            with self._lock:
                if self._transport is None:
                    transport = open_transport(self.settings, self.core)
                    self._check_identity(transport)
                    if hasattr(transport, "add_resource_kind"):
                        # Every kind of resource shares one id space per context.
                        from . import access, queuepair, sharedmem

                        sharedmem.register_kind(transport)
                        queuepair.register_kind(transport)
                        access.register_kind(transport)
                    self._transport = transport
        return self._transport

    @property
    def policy(self) -> Policy:
        """The operator's access policy (loaded once; PolicyError if the file is malformed)."""
        if self._policy is None:
            s = self.settings
            self._policy = load_policy(policy_path(s.rundir, s.policy)).with_register_rule(s.ds_register)
        return self._policy

    @property
    def access(self) -> AccessControl:
        """Access control (flags, privileges, groups) over this runtime's transport."""
        if self._access is None:
            transport = self.transport
            with self._lock:
                if self._access is None:
                    self._access = AccessControl(transport, self.policy)
        return self._access

    def _check_identity(self, transport) -> None:
        """Refuse to act as a context the policy reserves for another user."""
        owner = self.policy.uid(transport.local_cid)
        if owner is not None and owner != os.getuid():
            raise NoAccess("context %d belongs to user %d by policy %s, not to user %d"
                           % (transport.local_cid, owner, self.policy.path, os.getuid()))

    def __repr__(self):
        s = self.settings
        return "<Runtime backend=%s transport=%s cid=%d rundir=%r>" % (
            self.backend, s.transport, s.cid, s.rundir)


_default: Optional[Runtime] = None
_default_lock = threading.Lock()


def default_runtime() -> Runtime:
    """The process-wide runtime built from the environment."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Runtime()
    return _default
