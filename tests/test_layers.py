"""The package's shape: no import cycle, no reads of another object's
privates (``tools/check_layers.py``), ``mypy --strict`` and pyflakes clean,
nothing newer than the oldest Python it claims (vermin), with ``py.typed``
shipped so that embedders get the types too."""

import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import check_layers  # noqa: E402


def test_the_package_has_no_import_cycle_and_reads_no_other_objects_privates():
    assert check_layers.check(ROOT / "wschat") == []


def test_the_check_finds_a_cycle_behind_type_checking_and_a_private_read(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\n")
    (package / "b.py").write_text(textwrap.dedent("""\
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from .a import B
        class B:
            def peek(self, other):
                return other._secret, self._own, other._replace()
        """))
    problems = check_layers.check(package)
    assert any("import cycle among a, b" in problem for problem in problems)
    assert [problem.split(": ", 1)[1] for problem in problems if "private" in problem] == [
        "reads another object's private attribute: other._secret"]
    assert check_layers.main([str(package)]) == 1


@pytest.mark.timeout(600)
def test_mypy_strict_is_clean():
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "wschat"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


@pytest.mark.timeout(120)
def test_pyflakes_finds_nothing():
    """No unused import or name, no undefined one, in the package, its tests and tools."""
    result = subprocess.run([sys.executable, "-m", "pyflakes", "wschat", "tests", "tools"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


@pytest.mark.timeout(120)
def test_nothing_needs_a_newer_python_than_setup_py_allows():
    """The package claims Python 3.10 (``python_requires``) and is tested on
    3.11: vermin finds what a module uses that 3.10 lacks (``typing.Self``, once)."""
    setup = (ROOT / "setup.py").read_text()
    oldest = re.search(r'python_requires=">=(3\.\d+)"', setup).group(1)
    vermin = Path(sys.executable).parent / "vermin"
    result = subprocess.run([str(vermin), "-q", "--no-tips", "--eval-annotations", f"-t={oldest}-", "--violations",
                             "wschat"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


@pytest.mark.timeout(300)
def test_the_wheel_ships_py_typed(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("wschat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "wschat/py.typed" in names and "wschat/static/index.html" in names
