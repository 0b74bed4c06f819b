"""Launches test drivers under ``torchrun`` or in one process, and compares sharded with unsharded runs.

Shared by the multi-process tests: :func:`torchrun` builds a launch command, :func:`run_logged`
runs it into a log file and, when it hangs past its timeout, writes every process's Python stack
into that log (``SIGUSR1``, see ``tests/_stacks/sitecustomize.py``) before killing the whole process
group, so a CI log says where each rank waited and no orphaned rank keeps running.

:func:`launch` runs ``tests/distributed_driver.py`` sharded (2 processes, a per-device batch of 4)
or unsharded (1 process, batch 8); the backend tests (``test_fsdp.py``, ``test_deepspeed*.py``) check
that both end with the same weights and strategy state (SGD, no dropout, one row length: see the driver).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STACKS = Path(__file__).resolve().parent / "_stacks"
IGNORED = ("rank", "world_size", "fisher_rows", "fsdp", "device")
ATOL = 1e-5  # sharded vs one process: float summation order only (see tests/test_distributed.py)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a launch's ``--master_port``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launched driver: one thread, this checkout importable, no inherited rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(STACKS)]), **extra)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def torchrun(processes: int, *command: str) -> list[str]:
    """``python -m torch.distributed.run`` with ``processes`` CPU ranks on a free local port, running ``command``
    (``"-m", "tests.some_driver", ...``)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *command]


def start_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``command`` in a process group of its own, stdout and stderr into ``log``."""
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=ROOT, env=env or launch_env(), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_logged(process: subprocess.Popen, log: Path, *, timeout: float) -> int:
    """The exit code of ``process``; past ``timeout`` seconds its stacks go to ``log``, its group is killed and
    the test fails with the log's tail."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGUSR1)  # every process writes its stacks into the log
        time.sleep(5)
        _signal_group(process, signal.SIGKILL)
        process.wait()
        pytest.fail(f"{log.name}: the launch hung for {timeout:.0f} s and was killed; the stacks of its processes "
                    f"are at the end of its log:\n{log.read_text(errors='replace')[-12000:]}")


def _signal_group(process: subprocess.Popen, number: int) -> None:
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass


def run_logged(command: list[str], log: Path, *, timeout: float, env: dict[str, str] | None = None) -> int:
    """Run ``command`` into ``log`` (see :func:`wait_logged`) and return its exit code."""
    return wait_logged(start_logged(command, log, env), log, timeout=timeout)


def load_dump(root: Path, run: str, rank: int, task: int, when: str) -> dict:
    return torch.load(root / run / f"rank{rank}" / f"task{task}_{when}.pt", weights_only=False)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def launch(out: Path, name: str, runs: list[str], flags: list[str], *, processes: int,
           env: dict[str, str] | None = None) -> Path:
    """Run ``runs`` with ``flags`` into ``out/name``: under torchrun (batch 4 a rank) or in one process (batch 8)."""
    driver = ["-m", "tests.distributed_driver", str(out / name)]
    if processes > 1:
        start = torchrun(processes, *driver, "--batch", "4")
    else:
        start = [sys.executable, *driver, "--batch", "8"]
    log = out / f"{name}.log"
    code = run_logged([*start, "--runs", ",".join(runs), *flags], log, timeout=900, env=launch_env(**(env or {})))
    if code != 0:
        pytest.fail(f"the {name} launch failed with exit code {code}:\n{log.read_text()[-6000:]}")
    return out


def launch_pair(out: Path, runs: list[str], flags: list[str], env: dict[str, str] | None = None) -> Path:
    """Run ``runs`` with ``flags`` under torchrun (2 ranks, batch 4) into ``out/two``, and plainly into ``out/one``.

    ``env`` adds environment variables to both launches (``CLM_DRIVER_SAVE=1``: write continual checkpoints).
    """
    launch(out, "two", runs, flags, processes=2, env=env)
    return launch(out, "one", runs, [], processes=1, env=env)


def assert_ranks_match_one_process(out: Path, run: str, *, tasks: tuple[int, ...] = (0, 1)) -> None:
    """Both ranks hold the same gathered state, equal to 1e-5 to the one-process run, after every task."""
    for task in tasks:
        r0, r1 = (load_dump(out / "two", run, rank, task, "after") for rank in (0, 1))
        one = load_dump(out / "one", run, 0, task, "after")
        assert r0["world_size"] == 2 and one["world_size"] == 1, "the launch did not run distributed"
        assert r0["global_step"] == one["global_step"]
        assert r0.keys() == r1.keys() == one.keys(), (run, set(r0) ^ set(one))
        differ = [k for k in r0 if k != "rank" and not same(r0[k], r1[k])]
        assert not differ, f"{run}: ranks differ after task {task} in {differ[:8]}"
        for key, value in one.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                rtol = 1e-4 if "/fisher/" in key else 1e-5  # squared per-row gradients: see test_distributed
                torch.testing.assert_close(r0[key], value, atol=ATOL, rtol=rtol, msg=lambda m, k=key: f"{run} {k}: {m}")
            elif key not in IGNORED:
                assert same(value, r0[key]), f"{run}: {key} differs between the sharded run and one process"
