"""How the suite itself runs: on xdist workers by default (tests/conftest.py), serially on request.

The checks parse real pytest command lines in-process and run the two ``pytest_cmdline_main`` hooks
that decide the workers (this suite's, then xdist's) in pytest's own order; no worker is started.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    # One process at a time: the two dumps do not interleave (each header and frame line is whole).
    import re

    headers = [line for line in text.splitlines() if "Current thread" in line]
    assert len(headers) == 2 and all(re.fullmatch(r"Current thread 0x[0-9a-f]+ \(most recent call first\):", h)
                                     for h in headers), text
    assert re.search(r'File "<string>", line \d+ in child_sleeps\n', text), text
    if shutil.which("pgrep"):
        alive = subprocess.run(["pgrep", "-f", "child_sleeps"], capture_output=True, text=True).stdout.split()
        assert not alive, f"the launch's child outlived the kill: {alive}"


class _Worker:
    """What xdist's scheduler uses of a worker: an id, it receives test indexes and may be shut down."""

    shutting_down = False

    def __init__(self, name: str) -> None:
        self.gateway = type("Gateway", (), {"id": name})()

    def send_runtest_some(self, indexes):
        pass

    def shutdown(self):
        self.shutting_down = True


def test_xdist_hands_out_the_longest_files_first(monkeypatch):
    """The files of a few long tests start first, one per worker, instead of last (xdist's own order goes
    by number of tests); files without a measured time follow in xdist's order."""
    pytest.importorskip("xdist")
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "FILE_SECONDS", {"tests/long.py": 300.0, "tests/mid.py": 60.0})
    collection = ["tests/short.py::a", "tests/short.py::b", "tests/short.py::c", "tests/mid.py::m", "tests/long.py::l",
                  *(f"tests/many.py::t{i}" for i in range(4))]
    config = _prepareconfig(["tests/test_suite_setup.py", "-p", "no:cacheprovider", "-n", "2"])
    try:
        for hook in reversed(config.hook.pytest_cmdline_main.get_hookimpls()):
            if hook.plugin_name.endswith("conftest.py") or hook.plugin_name == "xdist":
                hook.function(config=config)
        assert config.option.dist == "loadfile"
        scheduler = conftest.pytest_xdist_make_scheduler(config, None)
        workers = [_Worker("gw0"), _Worker("gw1")]
        for worker in workers:
            scheduler.add_node(worker)
        for worker in workers:
            scheduler.add_node_collection(worker, collection)
        scheduler.schedule()
        assigned = [list(scheduler.assigned_work[worker]) for worker in workers]
        assert assigned == [["tests/long.py", "tests/many.py"], ["tests/mid.py", "tests/short.py"]], assigned
        config.option.dist = "load"
        assert conftest.pytest_xdist_make_scheduler(config, None) is None  # an explicit --dist is xdist's own
    finally:
        config._ensure_unconfigure()


def test_every_file_with_a_measured_time_exists():
    """A renamed or removed file in FILE_SECONDS would silently lose its place at the front."""
    from tests.conftest import FILE_SECONDS

    root = Path(__file__).resolve().parents[1]
    assert FILE_SECONDS, "no measured file times: xdist would order the files by their number of tests"
    missing = [name for name in FILE_SECONDS if not (root / name).is_file()]
    assert not missing, f"tests/conftest.py FILE_SECONDS names files that do not exist: {missing}"


def test_one_process_reference_runs_each_run_once_per_session(tmp_path, monkeypatch):
    """tests/_launch.one_process_reference: a run is launched once, whichever file asks first; a run another
    worker holds (its lock) is waited for, not launched again; a run whose launch failed is launched anew."""
    import threading
    import time

    from filelock import FileLock

    import tests._launch as launching

    launched: list[list[str]] = []

    def fake_launch(out, name, runs, flags, *, processes, env=None):
        assert (name, flags, processes, env) == ("one", [], 1, None)
        launched.append(list(runs))
        if "broken" in runs and launched.count(list(runs)) == 1:
            pytest.fail("the launch failed")
        for run in runs:
            (out / name / run / "rank0").mkdir(parents=True)
        return out

    monkeypatch.setattr(launching, "launch", fake_launch)
    # Not the session's folder: the real reference runs of test_distributed.py and the like live there.
    monkeypatch.setattr(launching, "_session_folder", lambda factory: tmp_path)
    tmp_path_factory = None
    one = launching.one_process_reference(tmp_path_factory, ["plain", "ewc"])
    assert launching.one_process_reference(tmp_path_factory, ["ewc", "gem", "plain"]) == one
    assert launched == [["plain", "ewc"], ["gem"]]
    assert sorted(p.name for p in one.iterdir()) == ["ewc", "gem", "plain"]

    # "lwf" is being computed by another worker: this one launches "pnn" and waits for "lwf".
    other = FileLock(str(one.parent / "lwf.lock"))
    other.acquire()
    done: list[Path] = []
    waiting = threading.Thread(target=lambda: done.append(launching.one_process_reference(tmp_path_factory, ["pnn", "lwf"])))
    waiting.start()
    for _ in range(300):
        if launched[-1] == ["pnn"]:
            break
        time.sleep(0.1)
    assert waiting.is_alive() and launched[-1] == ["pnn"], launched  # it waits on the lock of "lwf"
    (one / "lwf" / "rank0").mkdir(parents=True)  # the other worker's launch succeeded
    other.release()
    waiting.join(timeout=30)
    assert done == [one] and launched[-1] == ["pnn"]

    with pytest.raises(pytest.fail.Exception, match="the launch failed"):
        launching.one_process_reference(tmp_path_factory, ["broken"])
    assert launching.one_process_reference(tmp_path_factory, ["broken"]) == one and launched[-1] == ["broken"]
