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


def test_a_hung_launch_is_killed_with_its_processes_stacks_in_its_log(tmp_path):
    """tests/_launch.py: past its timeout a launch's group gets SIGUSR1 (each Python process writes its
    stacks, tests/_stacks/sitecustomize.py) and is then killed, and the test fails with that log."""
    import shutil
    import subprocess
    import sys

    from tests._launch import run_logged

    log = tmp_path / "hung.log"
    # A parent that waits on a child, as torchrun waits on its ranks: both must leave stacks and die.
    hang = ("import subprocess, sys\n"
            "def wait_for_the_child():\n"
            "    subprocess.run([sys.executable, '-c', 'import time\\ndef child_sleeps():\\n    time.sleep(120)\\nchild_sleeps()'])\n"
            "wait_for_the_child()\n")
    with pytest.raises(pytest.fail.Exception, match="hung for 3 s"):
        run_logged([sys.executable, "-c", hang], log, timeout=3)
    text = log.read_text()
    assert "in wait_for_the_child" in text and "in child_sleeps" in text, text
    if shutil.which("pgrep"):
        alive = subprocess.run(["pgrep", "-f", "child_sleeps"], capture_output=True, text=True).stdout.split()
        assert not alive, f"the launch's child outlived the kill: {alive}"
