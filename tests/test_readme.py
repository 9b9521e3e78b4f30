"""README: the documented commands exist and the CLIs it lists answer --help."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_two_commands_documented_and_in_makefile():
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


MODULES = sorted(set(re.findall(r"python -m (pipelines\.\w+)", README)))


def test_readme_lists_entry_points():
    assert {"pipelines.run", "pipelines.ingest", "pipelines.features", "pipelines.bench"} <= set(MODULES)


# Runs each module as ``python -m`` does (runpy, as __main__, sys.argv set) with --help, all in
# one fresh process: each costs seconds of the same imports (torch, TorchRec, Ray), paid once here.
HELP_OF_EACH = """
import contextlib, io, json, runpy, sys
outputs = {}
for module in sys.argv[1:]:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [module, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code or 0
        except BaseException as exc:
            code, err = 1, io.StringIO(repr(exc))
    outputs[module] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(outputs))
"""


@pytest.fixture(scope="module")
def help_outputs() -> dict[str, tuple[int, str, str]]:
    """``python -m MODULE --help`` of every documented module: {module: (exit code, stdout, stderr)}."""
    done = subprocess.run(
        [sys.executable, "-c", HELP_OF_EACH, *MODULES], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {module: tuple(result) for module, result in json.loads(done.stdout.splitlines()[-1]).items()}


@pytest.mark.parametrize("module", MODULES)
def test_documented_cli_answers_help(module, help_outputs):
    code, out, err = help_outputs[module]
    assert code == 0, err[-2000:]
    assert "usage" in out.lower()


def test_make_clean_removes_run_outputs_and_keeps_committed_bench_results(tmp_path):
    """In a git checkout holding the project's Makefile: a committed bench JSON (README's figures)
    survives ``make clean``; an untracked one and the lake do not."""
    git = ["git", "-c", "user.email=test@example.com", "-c", "user.name=test"]
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "committed.json").write_text("{}")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-f", "Makefile", "bench/committed.json"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "results"], cwd=tmp_path, check=True)
    (tmp_path / "bench" / "local_run.json").write_text("{}")
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "events").write_text("x")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == ["committed.json"]
    assert not (tmp_path / "lake").exists()
