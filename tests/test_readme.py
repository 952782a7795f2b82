"""The README's Python examples run as written."""
import os
import re
import subprocess
import textwrap

import pytest

from conftest import PYTHON, child_env

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")


def _examples():
    if not os.path.exists(README):  # an installed package tested without its source tree
        return []
    with open(README) as f:
        text = f.read()
    return [textwrap.dedent(block) for block in re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text)]


@pytest.mark.parametrize("index", range(len(_examples()) or 1))
def test_readme_example_runs(rundir, core, index):
    examples = _examples()
    if not examples:
        pytest.skip("README.rst is not beside the tests")
    code = examples[index]
    if "import vsockcompat as vmci" not in code:
        code = "import vsockcompat as vmci\n" + code
    result = subprocess.run([PYTHON, "-c", code], env=child_env(rundir, core.NAME), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_readme_is_valid_restructuredtext():
    docutils_core = pytest.importorskip("docutils.core", reason="docutils is not installed")
    if not os.path.exists(README):
        pytest.skip("README.rst is not beside the tests")
    with open(README) as f:
        docutils_core.publish_doctree(f.read(), settings_overrides={"halt_level": 2, "report_level": 2})
