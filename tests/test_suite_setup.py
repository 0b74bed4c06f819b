"""How the suite itself runs: on xdist workers by default (tests/conftest.py), serially on request."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MAX_DEFAULT_WORKERS, default_workers

ROOT = Path(__file__).resolve().parent.parent
# A fast test whose module imports nothing heavy: the point is how pytest starts, not what runs.
PROBE = "tests/test_docs_examples.py::test_a_directive_without_a_reason_or_unknown_is_refused"


def test_default_workers_are_one_per_core_capped_and_none_on_one_core():
    assert [default_workers(n) for n in (1, 2, 3)] == [0, 2, 3]
    assert default_workers(64) == MAX_DEFAULT_WORKERS


def _pytest(tmp_path: Path, *flags: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run([sys.executable, "-m", "pytest", PROBE, "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / f"base{len(flags)}"), *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\b1 passed\b", done.stdout), done.stdout[-3000:]
    return done.stdout


def test_plain_pytest_runs_on_one_worker_per_core_and_no_xdist_runs_serially(tmp_path):
    pytest.importorskip("xdist")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    expected = default_workers(cpus)
    default = _pytest(tmp_path)
    if expected:
        assert f"created: {expected}/{expected} workers" in default, default[-3000:]
    else:
        assert "workers" not in default, default[-3000:]
    # Without the plugin (or with -n 0) the same command runs in-process: no unknown "-n" option.
    for flags in (["-p", "no:xdist"], ["-n", "0"]):
        assert "workers" not in _pytest(tmp_path, *flags)
