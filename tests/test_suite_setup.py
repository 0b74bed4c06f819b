"""How the suite itself runs: on xdist workers by default (tests/conftest.py), serially on request.

The checks parse real pytest command lines in-process and run the two ``pytest_cmdline_main`` hooks
that decide the workers (this suite's, then xdist's) in pytest's own order; no worker is started.
"""

from __future__ import annotations

import os

import pytest
from _pytest.config import _prepareconfig

from tests.conftest import MAX_DEFAULT_WORKERS, default_workers


def test_default_workers_are_one_per_core_capped_and_none_on_one_core():
    assert [default_workers(n) for n in (1, 2, 3)] == [0, 2, 3]
    assert default_workers(64) == MAX_DEFAULT_WORKERS


def _workers(*args: str) -> tuple[object, object, list]:
    """(numprocesses, dist, tx) once pytest's hooks turned ``args`` into workers."""
    config = _prepareconfig(["tests/test_suite_setup.py", "-p", "no:cacheprovider", *args])
    try:
        hooks = list(reversed(config.hook.pytest_cmdline_main.get_hookimpls()))  # pluggy's call order
        ours = [h for h in hooks if h.plugin_name.endswith("conftest.py")]
        xdist = [h for h in hooks if h.plugin_name == "xdist"]
        assert ours, "tests/conftest.py does not choose the workers (no pytest_cmdline_main)"
        assert not xdist or hooks.index(ours[0]) < hooks.index(xdist[0]), "xdist would read -n before it is set"
        for hook in ours + xdist:
            hook.function(config=config)
        option = config.option
        return getattr(option, "numprocesses", None), getattr(option, "dist", None), list(getattr(option, "tx", []))
    finally:
        config._ensure_unconfigure()


def test_plain_pytest_runs_one_file_per_worker_and_no_xdist_runs_in_process():
    pytest.importorskip("xdist")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    expected = default_workers(cpus)
    assert _workers() == ((expected, "loadfile", ["popen"] * expected) if expected else (0, "no", []))
    assert _workers("-n", "3") == (3, "loadfile", ["popen"] * 3)  # a bare -n keeps files whole too
    assert _workers("-n", "3", "--dist", "load") == (3, "load", ["popen"] * 3)  # an explicit choice wins
    assert _workers("-n", "0") == (0, "no", [])
    assert _workers("--pdb")[1] == "no"  # the debugger needs one process
    # Without the plugin the default command still parses (no unknown "-n" in addopts) and runs serially.
    assert _workers("-p", "no:xdist") == (None, None, [])
