"""DeepSpeed ZeRO-2, for real, on CPU (ZeRO-3: ``test_deepspeed_zero3.py``, a file of its own so that
pytest-xdist's workers, which take whole files, run the two stages' launches side by side): ``torchrun`` with 2 processes (DeepSpeed's CPU accelerator, gloo).

DeepSpeed runs its CPU accelerator when no GPU is found, and the Trainer's DeepSpeed path (its
engine, ZeRO's partitioned optimizer state and gradients, ZeRO-3's partitioned parameters) then
trains 2 CPU processes. ``tests/distributed_driver.py --deepspeed STAGE`` trains each strategy on 2
tasks; every rank writes its strategy state and the whole weights (gathered under ZeRO-3) after
each task, and they must equal, to 1e-5, the same stream in one plain process with the global
batch. Strategies the trainer refuses on a stage (docs/distributed.md) are not run here; the
refusals are checked in ``tests/test_recipes_accelerate.py``.
"""

from __future__ import annotations

import pytest

from tests._launch import assert_ranks_match_one_process, launch_pair

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'clm-hf[deepspeed]')")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Driver runs per ZeRO stage: every strategy the trainer lets run on that stage.
ZERO2 = ["plain", "replay", "ewc", "lwf", "pnn", "olora"]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return launch_pair(tmp_path_factory.mktemp("zero2"), ZERO2, ["--deepspeed", "2"], shared=tmp_path_factory)


@pytest.mark.parametrize("run", ZERO2)
def test_zero2_two_ranks_match_one_process(zero2, run):
    assert_ranks_match_one_process(zero2, run)
