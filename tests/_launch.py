"""Launches ``tests/distributed_driver.py`` sharded (2 processes) and unsharded (1 process), and compares them.

Shared by the backend tests (``test_fsdp.py``, ``test_deepspeed.py``): the same stream trained by 2
ranks with a per-device batch of 4 under the backend, and by one plain process with a batch of 8,
must end with the same weights and strategy state (SGD, no dropout, one row length: see the driver).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_distributed import ATOL, _env, _free_port, _load, _same

ROOT = Path(__file__).resolve().parent.parent
IGNORED = ("rank", "world_size", "fisher_rows", "fsdp", "device")


def launch(out: Path, name: str, runs: list[str], flags: list[str], *, processes: int,
           env: dict[str, str] | None = None) -> Path:
    """Run ``runs`` with ``flags`` into ``out/name``: under torchrun (batch 4 a rank) or in one process (batch 8)."""
    if processes > 1:
        if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
            pytest.skip("torch.distributed with gloo is not available")
        start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "tests.distributed_driver",
                 str(out / name), "--batch", "4"]
    else:
        start = [sys.executable, "-m", "tests.distributed_driver", str(out / name), "--batch", "8"]
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.run([*start, "--runs", ",".join(runs), *flags], cwd=ROOT, env={**_env(), **(env or {})},
                              stdout=log, stderr=subprocess.STDOUT, timeout=900).returncode
    if code != 0:
        pytest.fail(f"the {name} launch failed with exit code {code}:\n{(out / f'{name}.log').read_text()[-6000:]}")
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
        r0, r1 = (_load(out / "two", run, rank, task, "after") for rank in (0, 1))
        one = _load(out / "one", run, 0, task, "after")
        assert r0["world_size"] == 2 and one["world_size"] == 1, "the launch did not run distributed"
        assert r0["global_step"] == one["global_step"]
        assert r0.keys() == r1.keys() == one.keys(), (run, set(r0) ^ set(one))
        differ = [k for k in r0 if k != "rank" and not _same(r0[k], r1[k])]
        assert not differ, f"{run}: ranks differ after task {task} in {differ[:8]}"
        for key, value in one.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                rtol = 1e-4 if "/fisher/" in key else 1e-5  # squared per-row gradients: see test_distributed
                torch.testing.assert_close(r0[key], value, atol=ATOL, rtol=rtol, msg=lambda m, k=key: f"{run} {k}: {m}")
            elif key not in IGNORED:
                assert _same(value, r0[key]), f"{run}: {key} differs between the sharded run and one process"
