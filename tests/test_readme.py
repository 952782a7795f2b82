"""The README's Python examples run as written; the README and docs/performance.rst are valid reStructuredText."""
import os
import re
import subprocess
import textwrap

import pytest

from conftest import PYTHON, child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.rst")
#: The documents checked for validity: the README and the performance record it links to.
DOCUMENTS = ("README.rst", os.path.join("docs", "performance.rst"))


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


@pytest.mark.parametrize("document", DOCUMENTS)
def test_document_is_valid_restructuredtext(document):
    docutils_core = pytest.importorskip("docutils.core", reason="docutils is not installed")
    path = os.path.join(ROOT, document)
    if not os.path.exists(README):
        pytest.skip("README.rst is not beside the tests")
    with open(path) as f:  # a document missing from a source tree is an error, not a skip
        docutils_core.publish_doctree(f.read(), settings_overrides={"halt_level": 2, "report_level": 2})


def test_readme_links_to_files_that_exist():
    if not os.path.exists(README):
        pytest.skip("README.rst is not beside the tests")
    with open(README) as f:
        targets = re.findall(r"`[^`<]*<([^>`]+)>`_", f.read())
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "the README links to no file of its tree (docs/performance.rst at least)"
    missing = [t for t in local if not os.path.exists(os.path.join(ROOT, t))]
    assert not missing, missing
