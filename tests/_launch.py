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
import tempfile
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
        # Every process writes its stacks into the log, one after the other (at once, their lines interleave).
        for pid in _group_members(process.pid):
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            time.sleep(1)
        time.sleep(2)
        _signal_group(process, signal.SIGKILL)
        process.wait()
        pytest.fail(f"{log.name}: the launch hung for {timeout:.0f} s and was killed; the stacks of its processes "
                    f"are at the end of its log:\n{log.read_text(errors='replace')[-12000:]}")


def _group_members(group: int) -> list[int]:
    """The processes of process group ``group``, from ``/proc`` (only the leader where there is none)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, pgrp
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == group:
            members.append(int(stat.parent.name))
    return sorted(members) or [group]


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


def launch_pair(out: Path, runs: list[str], flags: list[str], env: dict[str, str] | None = None, *,
                shared: pytest.TempPathFactory | None = None) -> Path:
    """Run ``runs`` with ``flags`` under torchrun (2 ranks, batch 4) into ``out/two``, and plainly into ``out/one``.

    ``env`` adds environment variables to both launches (``CLM_DRIVER_SAVE=1``: write continual checkpoints).
    With ``shared`` (the session's ``tmp_path_factory``) and no ``env``, ``out/one`` links to the session's
    one-process runs (:func:`one_process_reference`), computed once for every file that needs them.
    """
    launch(out, "two", runs, flags, processes=2, env=env)
    if shared is not None and not env:
        (out / "one").symlink_to(one_process_reference(shared, runs))
        return out
    return launch(out, "one", runs, [], processes=1, env=env)


def _session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every pytest-xdist worker of this session sees: the parent of a worker's base temp folder
    (``<session>/popen-gwN``), or the base temp folder itself in one process."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def one_process_reference(tmp_path_factory: pytest.TempPathFactory, runs: list[str], *, timeout: float = 900) -> Path:
    """The unsharded reference of ``runs`` (``tests/distributed_driver.py --batch 8``, one process, no flags, no
    extra environment), computed once per test session and shared by the files and xdist workers that need it.

    ``tests/test_distributed.py``, ``test_fsdp.py`` and ``test_deepspeed.py`` compare their sharded launches with
    the same one-process runs; each run builds its own seeded model and stream, so a run's dumps do not depend
    on the other runs of its launch (checked: identical bit for bit whatever the launch's list). A run is
    computed under a file lock of its own (pytest-xdist's documented pattern for session-wide data), in a
    staging folder renamed into place once its launch succeeded: a worker launches the missing runs it can
    lock, in one process, and waits for the runs another worker is computing (and computes them itself if
    that launch failed).

    Args:
        tmp_path_factory: the session's ``tmp_path_factory``.
        runs: names of ``tests/distributed_driver.py`` RUNS.
        timeout: seconds to wait, in all, for runs another worker computes.

    Returns:
        A folder holding ``<run>/rank0/task<i>_<before|after>.pt`` and ``<run>/rank0/results.pt`` for each run.

    Example:

    >>> one = one_process_reference(tmp_path_factory, ["plain", "ewc"])  # doctest: +SKIP
    >>> load_dump(one, "ewc", 0, 1, "after")["world_size"]  # doctest: +SKIP
    1
    """
    from filelock import FileLock, Timeout  # a dependency of datasets and huggingface_hub

    root = _session_folder(tmp_path_factory) / "one-process-reference"
    (root / "one").mkdir(parents=True, exist_ok=True)

    def missing() -> list[str]:
        return [run for run in dict.fromkeys(runs) if not (root / "one" / run).is_dir()]

    deadline = time.monotonic() + timeout
    while todo := missing():
        held, mine = [], []
        try:
            for run in todo:
                lock = FileLock(str(root / f"{run}.lock"))
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue  # another worker is running it
                held.append(lock)
                if not (root / "one" / run).is_dir():  # it may have been finished since todo was listed
                    mine.append(run)
            if mine:
                staging = Path(tempfile.mkdtemp(prefix="staging-", dir=root))
                launch(staging, "one", mine, [], processes=1)
                for run in mine:
                    os.replace(staging / "one" / run, root / "one" / run)
        finally:
            for lock in held:
                lock.release()
        if not mine and (todo := missing()):
            left = deadline - time.monotonic()
            try:  # the first run another worker holds: returns once that launch ended, done or failed
                with FileLock(str(root / f"{todo[0]}.lock"), timeout=max(left, 0)):
                    pass
            except Timeout:
                pytest.fail(f"the one-process runs {todo} of another worker did not finish in {timeout:.0f} s")
    return root / "one"


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


def assert_first_tasks_weights_held(two: Path, run: str, later: Path | None = None) -> None:
    """PackNet's defining property across a launch: on each rank, the weights the first task owns after
    task 2 are the ones it owned after task 1, bit for bit, and none of them moved. ``later``: take task 2
    from that launch (a resumed one) and task 1 from ``two``."""
    for rank in (0, 1):
        first, second = load_dump(two, run, rank, 0, "after"), load_dump(later or two, run, rank, 1, "after")
        owned = [k for k in second if k.startswith("packnet/ownership/")]
        assert owned
        for key in owned:
            mine = second[key] == 1  # owned by the first task
            weight = "model/" + key.removeprefix("packnet/ownership/")
            assert bool(mine.any()) and torch.equal(first[key] == 1, mine), key
            assert torch.equal(second[weight][mine], first[weight][mine]), f"{run}: {weight} moved on rank {rank}"


def assert_resumed_as_uninterrupted(out: Path, name: str, run: str, *, straight: str = "two", task: int = 1,
                                    state: str | None = None) -> None:
    """After ``task``, the resumed launch ``out/name`` holds on each rank the floating-point weights and strategy
    tensors of the uninterrupted launch ``out/straight`` (to 1e-5: float summation order only), and its
    non-tensor strategy state (memories, counters) exactly.

    ``state`` is the strategy's prefix in the dumps (``"ewc"``): at least one of its entries (a tensor, or GEM's
    memories and counters) must be there, and so compared.
    """
    for rank in (0, 1):
        resumed, uninterrupted = (load_dump(out / folder, run, rank, task, "after") for folder in (name, straight))
        floats = [k for k, v in uninterrupted.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        assert any(k.startswith("model/") for k in floats), run
        assert state is None or any(k.startswith(f"{state}/") for k in uninterrupted), (run, state)
        for key in floats:
            torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=1e-5,
                                       msg=lambda m, k=key: f"{run} {k}: {m}")
        for key, value in uninterrupted.items():
            if state is not None and key.startswith(f"{state}/") and key not in floats:
                assert same(resumed.get(key), value), f"{run}: {key} differs from the uninterrupted run on rank {rank}"


def killed_mid_task(out: Path, run: str, *, continual: Path, checkpoint: Path) -> Path:
    """A run folder ``out/killed/<run>/run`` as a run killed mid-task leaves it: the ``continual`` checkpoint of the
    last finished task and the Trainer's ``checkpoint`` of the task in progress (its later ones gone). Returns
    ``out/killed``, for ``CLM_DRIVER_RESUME_RUN``."""
    import shutil

    source = out / "killed" / run / "run"
    shutil.copytree(continual, source / "continual" / continual.name)
    shutil.copytree(checkpoint, source / checkpoint.parent.name / checkpoint.name)
    return out / "killed"


def assert_zero2_master_is_the_model(folder: Path, dumps: tuple[str, ...], label: str) -> None:
    """Each ``folder/rank<r>/<dump>`` (the driver's ``*_zero2_master.pt``): ZeRO-2's fp32 master partitions equal
    this rank's part of the model's weights, exactly (what DeepSpeed checkpoints save is what trained)."""
    for rank in (0, 1):
        for dump in dumps:
            zero = torch.load(folder / f"rank{rank}" / dump)
            assert len(zero["master"]) == len(zero["model"]) > 0
            for master, model in zip(zero["master"], zero["model"]):
                assert torch.equal(master, model), f"{label} {dump}: ZeRO-2's master differs from the model on rank {rank}"
