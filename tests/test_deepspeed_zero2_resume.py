"""Resuming PackNet, GEM and A-GEM under DeepSpeed ZeRO-2, for real, on CPU (2 ``torchrun`` processes; see ``test_deepspeed.py``).

The three edit inside ZeRO-2's optimizer step (``clm_hf.deepspeed_support.hook_zero2_step``): GEM projects
(and A-GEM) the reduced gradient partition, PackNet masks it and writes its held weights into the fp32 master partition, which
DeepSpeed's checkpoint saves and reloads. Three launches, each running the three: the uninterrupted run with
its continual checkpoints, a run resumed from the continual checkpoint after task 0 (writing a Trainer checkpoint at
every step of task 1), and a run resumed from the first of those mid-task checkpoints (DeepSpeed's engine state plus
clm-hf's continual state). Each resumed run must end as the uninterrupted one.
"""

from __future__ import annotations

import pytest

from tests._launch import (assert_first_tasks_weights_held, assert_resumed_as_uninterrupted,
                           assert_zero2_master_is_the_model, killed_mid_task, launch, load_dump)

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'clm-hf[deepspeed]')")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RUNS = ["packnet", "gem", "agem"]
ZERO2 = ["--deepspeed", "2"]


@pytest.fixture(scope="module")
def zero2_resumed(tmp_path_factory):
    """The uninterrupted launch (``two``, with continual checkpoints), the one resumed after task 0 (``resumed``,
    with a Trainer checkpoint at every step of task 1) and the one resumed from its step-1 checkpoint (``mid-task``)."""
    out = tmp_path_factory.mktemp("zero2-resume")
    launch(out, "two", RUNS, ZERO2, processes=2, env={"CLM_DRIVER_SAVE": "1"})
    launch(out, "resumed", RUNS, ZERO2, processes=2,
           env={"CLM_DRIVER_RESUME": str(out / "two"), "CLM_DRIVER_SAVE": "1", "CLM_DRIVER_SAVE_STEPS": "1"})
    for run in RUNS:  # killed after step 1 of task 1: its later checkpoints gone
        killed = killed_mid_task(out, run, continual=out / "two" / run / "run" / "continual" / "task-000",
                                 checkpoint=out / "resumed" / run / "run" / "task-001" / "checkpoint-1")
    launch(out, "mid-task", RUNS, ZERO2, processes=2,
           env={"CLM_DRIVER_RESUME_RUN": str(killed), "CLM_DRIVER_SAVE_STEPS": "1"})
    return out


@pytest.mark.parametrize("run", RUNS)
def test_zero2_resumed_after_task_0_ends_as_the_uninterrupted_run(zero2_resumed, run):
    """A new engine is hooked for the resumed task: GEM projects task 1's first step against the restored memory
    (its counters and memory rows equal the uninterrupted run's), PackNet masks and holds the restored masks."""
    assert_resumed_as_uninterrupted(zero2_resumed, "resumed", run, state=run)
    if run == "gem":
        for name in ("resumed", "two"):
            assert load_dump(zero2_resumed / name, run, 0, 1, "after")["gem/projected_steps"] > 0, name


@pytest.mark.parametrize("run", RUNS)
def test_zero2_resumed_from_a_mid_task_checkpoint_ends_as_the_uninterrupted_run(zero2_resumed, run):
    """DeepSpeed reloads the engine's state, clm-hf its continual state, and the reloaded engine is hooked: without
    the hooks PackNet's first-task weights move at step 2 (3.8e-3 off) and GEM's step count stays at 1."""
    # It trained step 2 only (a resume from the end of task 0 would save checkpoint-1 again).
    inner = sorted(p.name for p in (zero2_resumed / "mid-task" / run / "run" / "task-001").glob("checkpoint-*"))
    assert inner == ["checkpoint-2"]
    assert_resumed_as_uninterrupted(zero2_resumed, "mid-task", run, state=run)


@pytest.mark.parametrize("name", ["resumed", "mid-task"])
def test_zero2_packnet_resumed_holds_the_first_tasks_weights_in_the_model_and_zero2_master(zero2_resumed, name):
    """The first task's weights after the resumed task 1 are those of the uninterrupted task 0, bit for bit, and the
    resumed engine's fp32 master equals the model's weights, exactly, both when training resumes (after DeepSpeed
    loaded a mid-task checkpoint's master) and at the end of the task."""
    assert_first_tasks_weights_held(zero2_resumed / "two", "packnet", later=zero2_resumed / name)
    assert_zero2_master_is_the_model(zero2_resumed / name / "packnet", ("resumed_zero2_master.pt", "task1_zero2_master.pt"), name)
