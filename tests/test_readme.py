"""README.rst's two commands are the ones the project really uses."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    lines = (ROOT / "README.rst").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python3 -m venv .venv")]


def test_ci_runs_the_readme_test_command():
    run, test = readme_commands()
    assert "python -m wschat" in run
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test in [line.strip() for line in ci]


@pytest.mark.timeout(300)
def test_the_run_command_as_written_runs_the_c_accelerator(tmp_path):
    """The first command, run in a fresh copy of the repository, starts the
    accelerated build where a compiler exists (``python -m wschat`` from the
    clone's root imports the source tree: the extension must be built there)."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the pure-Python path is the expected one")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    run, _ = readme_commands()
    command = run.replace("python3 -m venv", f"{sys.executable} -m venv") + " --version"
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "C accelerator in use" in result.stdout, result.stdout + result.stderr[-2000:]


@pytest.mark.parametrize("name", ["README.rst", "docs/deploying.rst"])
def test_the_documents_render_without_a_warning(name):
    import docutils.core

    docutils.core.publish_string((ROOT / name).read_text(encoding="utf-8"), writer="null",
                                 settings_overrides={"halt_level": 2, "report_level": 2})
