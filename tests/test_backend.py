"""Core selection and the backend contract."""
import ast
import inspect
import os
import subprocess
import sys

import pytest

import vsockcompat
from conftest import CYTHON_AVAILABLE, PACKAGE_PARENT
from vsockcompat._backend import CORE_API, BackendContractError, load_core, select_core

PYI = os.path.join(os.path.dirname(vsockcompat.__file__), "_core.pyi")


def test_cython_core_is_in_use_when_expected():
    """Guard: an environment built with the extension must not silently run pure Python."""
    if os.environ.get("VSOCKCOMPAT_EXPECT_CYTHON") != "1":
        pytest.skip("VSOCKCOMPAT_EXPECT_CYTHON is not set (pure or development run)")
    assert CYTHON_AVAILABLE, "the Cython core was expected but cannot be imported"
    assert vsockcompat.BACKEND == "cython"


def test_backend_names_the_core_in_use():
    expected = "pure" if os.environ.get("VSOCKCOMPAT_NO_EXTENSIONS") == "1" else (
        "cython" if CYTHON_AVAILABLE else "pure")
    assert vsockcompat.BACKEND == expected


def test_every_core_meets_the_contract(core):
    assert all(hasattr(core, name) for name in CORE_API)
    assert core.NAME in ("cython", "pure")


def test_the_stub_declares_exactly_the_contract():
    with open(PYI) as f:
        tree = ast.parse(f.read())
    declared = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            declared.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            declared.add(node.target.id)
    assert set(CORE_API) <= declared
    assert declared - set(CORE_API) <= {"Buffer", "WritableBuffer", "HeaderFields"}


def _parameters(obj):
    return [p.name for p in inspect.signature(obj).parameters.values()]


@pytest.mark.skipif(not CYTHON_AVAILABLE, reason="the Cython core is not built")
def test_both_cores_have_the_same_signatures():
    cy, py = load_core("cython"), load_core("pure")
    for name in CORE_API:
        a, b = getattr(cy, name), getattr(py, name)
        if inspect.isfunction(b):
            assert _parameters(a) == _parameters(b), name
        elif not inspect.isclass(b) and name != "NAME":
            assert a == b, name
    methods = {"Account": ("initialise", "is_valid", "mark_closed", "queued", "release_memory"),
               "Link": ("send", "close"),
               "Receiver": ("fileno", "add", "remove", "recv", "close"),
               "Fastpath": ("add_link", "drop_link", "clear_links", "send_status", "recv_status")}
    for cls, names in methods.items():
        for method in names:
            a, b = getattr(getattr(cy, cls), method), getattr(getattr(py, cls), method)
            assert _parameters(a) == _parameters(b), "%s.%s" % (cls, method)


def test_unknown_core_name():
    with pytest.raises(ValueError, match="no core called"):
        load_core("fortran")


def test_a_core_missing_names_is_refused(monkeypatch):
    pure = load_core("pure")
    monkeypatch.delattr(pure, "recv_datagram")
    with pytest.raises(BackendContractError, match="recv_datagram"):
        load_core("pure")


def test_asking_for_pure_gets_pure():
    assert select_core(no_extensions=True).NAME == "pure"


def _backend_in_child(value):
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    env.pop("VSOCKCOMPAT_NO_EXTENSIONS", None)
    if value is not None:
        env["VSOCKCOMPAT_NO_EXTENSIONS"] = value
    return subprocess.run([sys.executable, "-c", "import vsockcompat; print(vsockcompat.BACKEND)"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_no_extensions_switch_forces_pure_at_import():
    result = _backend_in_child("1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pure"


def test_a_bad_switch_value_is_an_error_naming_the_setting():
    result = _backend_in_child("yes")
    assert result.returncode != 0
    assert "VSOCKCOMPAT_NO_EXTENSIONS must be 0 or 1" in result.stderr


def test_a_pure_install_selects_pure_without_warning(monkeypatch, recwarn):
    import sys
    import types
    fake = types.SimpleNamespace(PURE_BUILD=True)
    monkeypatch.setitem(sys.modules, "vsockcompat._build_config", fake)
    monkeypatch.setattr(vsockcompat, "_build_config", fake, raising=False)
    assert select_core(no_extensions=False).NAME == "pure"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_an_unexpected_fallback_warns(monkeypatch):
    import sys
    import types
    monkeypatch.setitem(sys.modules, "vsockcompat._build_config", types.SimpleNamespace(PURE_BUILD=False))
    monkeypatch.setitem(sys.modules, "vsockcompat._cvsc", None)
    with pytest.warns(RuntimeWarning, match="Cython core is not available"):
        assert select_core(no_extensions=False).NAME == "pure"
