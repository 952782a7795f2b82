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
