"""VSOCKCOMPAT_* settings, parsed strictly in one place."""
import os

import pytest

from vsockcompat._settings import SettingError, Settings


def settings(**env):
    return Settings.from_environ({"VSOCKCOMPAT_" + k: v for k, v in env.items()})


def test_defaults():
    s = Settings.from_environ({})
    assert (s.no_extensions, s.cid, s.transport, s.ds_autostart) == (False, 2, "auto", True)
    assert s.rundir == "/tmp/vsockcompat-%d" % os.getuid()


def test_rundir_follows_xdg_runtime_dir(tmp_path):
    s = Settings.from_environ({"XDG_RUNTIME_DIR": str(tmp_path)})
    assert s.rundir == str(tmp_path / "vsockcompat")


def test_explicit_values():
    s = settings(NO_EXTENSIONS="1", CID="3", TRANSPORT="local", RUNDIR="/tmp/x", DS_AUTOSTART="0")
    assert s == Settings(True, "/tmp/x", 3, "local", False)


@pytest.mark.parametrize("env,message", [
    ({"NO_EXTENSIONS": "yes"}, "VSOCKCOMPAT_NO_EXTENSIONS must be 0 or 1"),
    ({"DS_AUTOSTART": "true"}, "VSOCKCOMPAT_DS_AUTOSTART must be 0 or 1"),
    ({"CID": "two"}, "VSOCKCOMPAT_CID must be a decimal"),
    ({"CID": "-1"}, "VSOCKCOMPAT_CID must be in"),
    ({"CID": str(0xFFFFFFFF)}, "VSOCKCOMPAT_CID must be in"),
    ({"TRANSPORT": "tcp"}, "VSOCKCOMPAT_TRANSPORT must be one of"),
])
def test_bad_values_name_the_setting(env, message):
    with pytest.raises(SettingError, match=message):
        settings(**env)


# The hybrid transport's VMM sockets: VSOCKCOMPAT_HYBRID_UDS and VSOCKCOMPAT_HYBRID_CID

def test_hybrid_sockets_pair_with_their_guest_cids():
    s = settings(HYBRID_UDS="/run/a.vsock:b.vsock", HYBRID_CID="3:4")
    assert s.hybrid == (("/run/a.vsock", 3), (os.path.abspath("b.vsock"), 4))
    assert settings(HYBRID_UDS="/run/a.vsock").hybrid == (("/run/a.vsock", 3),)  # one: 3 unless told
    assert settings(HYBRID_UDS="/run/a.vsock", HYBRID_CID="9").hybrid == (("/run/a.vsock", 9),)
    assert settings().hybrid == () and settings(HYBRID_CID="5").hybrid == ()


@pytest.mark.parametrize("uds,cids,message", [
    ("/a:/b", "3", "one guest CID per socket of VSOCKCOMPAT_HYBRID_UDS: 2 sockets, 1 CIDs"),
    ("/a:/b", None, "one guest CID per socket of VSOCKCOMPAT_HYBRID_UDS: 2 sockets, 0 CIDs"),
    ("/a", "3:4", "one guest CID per socket of VSOCKCOMPAT_HYBRID_UDS: 1 sockets, 2 CIDs"),
    ("/a:/b", "3:3", "VSOCKCOMPAT_HYBRID_CID names a guest CID twice"),
    ("/a:/a", "3:4", "VSOCKCOMPAT_HYBRID_UDS names a socket twice"),
    ("/a::/b", "3:4:5", "VSOCKCOMPAT_HYBRID_UDS has an empty path"),
    ("/a:/b", "3:2", r"guest CIDs in 3\.\.4294967294, not 2"),
    ("/a", "0", r"guest CIDs in 3\.\.4294967294, not 0"),
    ("/a", str(0xFFFFFFFF), r"guest CIDs in 3\.\.4294967294, not 4294967295"),
    ("/a:/b", "3:four", "VSOCKCOMPAT_HYBRID_CID must be decimal guest CIDs"),
    ("/a:/b", "3:", "VSOCKCOMPAT_HYBRID_CID must be decimal guest CIDs"),
    (None, "2", r"guest CIDs in 3\.\.4294967294, not 2"),
])
def test_bad_hybrid_combinations_are_refused_when_read(uds, cids, message):
    env = {k: v for k, v in (("HYBRID_UDS", uds), ("HYBRID_CID", cids)) if v is not None}
    with pytest.raises(SettingError, match=message):
        settings(**env)
