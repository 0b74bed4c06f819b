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

from tests._launch import (assert_first_tasks_weights_held, assert_ranks_match_one_process,
                           assert_zero2_master_is_the_model, launch_pair, load_dump)

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'clm-hf[deepspeed]')")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Driver runs per ZeRO stage: every strategy the trainer lets run on that stage.
ZERO2 = ["plain", "replay", "ewc", "lwf", "pnn", "olora", "gem", "gem-nomargin", "gem-3tasks", "agem", "packnet",
         "packnet-decay", "packnet-clip"]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return launch_pair(tmp_path_factory.mktemp("zero2"), ZERO2, ["--deepspeed", "2"], shared=tmp_path_factory)


@pytest.mark.parametrize("run", ZERO2)
def test_zero2_two_ranks_match_one_process(zero2, run):
    # gem-3tasks: at the third task GEM's two past tasks take the hooked reference pass inside ZeRO-2's step.
    assert_ranks_match_one_process(zero2, run, tasks=(0, 1, 2) if run == "gem-3tasks" else (0, 1))


@pytest.mark.parametrize("run", ["gem", "gem-nomargin", "agem"])
def test_zero2_gem_and_agem_project_the_reduced_gradient_as_one_process(zero2, run):
    # The projection runs inside ZeRO-2's optimizer step (clm_hf.deepspeed_support.hook_zero2_step): a
    # projection skipped, or taken on the ranks' own partial sums, leaves the counts or the weights apart.
    name = run.split("-")[0]
    for rank in (0, 1):
        two, one = (load_dump(zero2 / kind, run, rank if kind == "two" else 0, 1, "after") for kind in ("two", "one"))
        assert two[f"{name}/steps"] == one[f"{name}/steps"] > 0, run
        assert two[f"{name}/projected_steps"] == one[f"{name}/projected_steps"] > 0, run


@pytest.mark.parametrize("run", ["packnet", "packnet-decay", "packnet-clip"])
def test_zero2_packnet_keeps_the_first_tasks_weights_bit_identical_in_the_model_and_zero2_master(zero2, run):
    # The gradient is masked on ZeRO-2's reduced partition and the held weights are written into its fp32 master
    # partition inside the step (clm_hf.deepspeed_support.hook_zero2_step): held in the model's weights only, they
    # would move in the master (weight decay, packnet-decay), which the next step copies over the model.
    assert_first_tasks_weights_held(zero2 / "two", run)
    # After each task, the last engine's master partitions are the model's weights, exactly.
    assert_zero2_master_is_the_model(zero2 / "two" / run, ("task0_zero2_master.pt", "task1_zero2_master.pt"), run)
