"""DeepSpeed ZeRO-3, for real, on CPU: ``torchrun`` with 2 processes (DeepSpeed's CPU accelerator, gloo).

The same set-up as ``test_deepspeed.py`` (ZeRO-2; see its docstring), with ZeRO-3's partitioned
parameters: every rank gathers the whole weights after each task, and they and the strategies' state
must equal, to 1e-5, the same stream in one plain process with the global batch.
"""

from __future__ import annotations

import pytest

from tests._launch import assert_ranks_match_one_process, launch_pair

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'clm-hf[deepspeed]')")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# LwF with a live teacher copies whole weights: refused. EWC: online ("ewc") and separate terms over 3 tasks.
ZERO3 = ["replay", "lwf-cached", "ewc", "ewc-separate"]


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    # With continual checkpoints: rank 0 writes them while every rank holds only its partition.
    return launch_pair(tmp_path_factory.mktemp("zero3"), ZERO3, ["--deepspeed", "3"], env={"CLM_DRIVER_SAVE": "1"})


@pytest.mark.parametrize("run", ZERO3)
def test_zero3_two_ranks_match_one_process(zero3, run):
    assert_ranks_match_one_process(zero3, run)


def test_zero3_continual_checkpoint_holds_the_whole_trained_model(zero3):
    """Each end-of-task checkpoint of the ZeRO-3 run holds the gathered weights, not empty partitions."""
    import torch
    from safetensors.torch import load_file

    from tests._launch import load_dump

    for task in (0, 1):
        saved = load_file(zero3 / "two" / "replay" / "run" / "continual" / f"task-{task:03d}" / "model.safetensors")
        trained = load_dump(zero3 / "two", "replay", 0, task, "after")
        assert saved and all(f"model/{k}" in trained for k in saved)
        for key, value in saved.items():
            assert value.numel() > 0 and torch.equal(value, trained[f"model/{key}"]), key


def test_zero3_continual_checkpoint_holds_ewcs_whole_fisher_and_anchor(zero3):
    """Rank 0 writes EWC's state while each rank holds only its slices: the file has the whole, gathered tensors."""
    import torch
    from safetensors.torch import load_file

    from tests._launch import load_dump

    for task in (0, 1):
        saved = load_file(zero3 / "two" / "ewc" / "run" / "continual" / f"task-{task:03d}" / "strategies" / "00-ewc"
                          / "state.safetensors")
        dumped = load_dump(zero3 / "two", "ewc", 0, task, "after")
        assert {f"ewc/{k}" for k in saved} == {k for k in dumped if k.startswith("ewc/terms/")}
        for key, value in saved.items():
            assert value.shape == dumped[f"model/{key.split('/', 3)[3]}"].shape, key
            assert torch.equal(value, dumped[f"ewc/{key}"]), key


@pytest.fixture(scope="module")
def zero3_resumed(zero3):
    """EWC resumed after task 0 of the ZeRO-3 run, saving a Trainer checkpoint (with its continual state) at
    every step of task 1: mid-task checkpoints on ZeRO-3, whose EWC state every rank gathers in before_save."""
    from tests._launch import launch

    env = {"CLM_DRIVER_RESUME": str(zero3 / "two"), "CLM_DRIVER_SAVE": "1", "CLM_DRIVER_SAVE_STEPS": "1"}
    return launch(zero3, "resumed", ["ewc"], ["--deepspeed", "3"], processes=2, env=env)


def _assert_ewc_task1_as_uninterrupted(zero3, name: str) -> None:
    import torch

    from tests._launch import assert_resumed_as_uninterrupted, load_dump

    assert_resumed_as_uninterrupted(zero3, name, "ewc", state="ewc")
    straight = load_dump(zero3 / "two", "ewc", 0, 1, "after")  # the Fisher and anchor themselves were compared
    assert any(k.startswith("ewc/terms/") and isinstance(v, torch.Tensor) and v.is_floating_point() for k, v in straight.items())


def test_zero3_ewc_resumed_after_task_0_ends_as_the_uninterrupted_run(zero3, zero3_resumed):
    """The checkpoint's whole Fisher and anchor, loaded while the model is whole, are cut into the partitions
    when DeepSpeed partitions the model, and task 1 then trains as in the run that never stopped (here with a
    mid-task checkpoint at every step, which must not change the training either)."""
    _assert_ewc_task1_as_uninterrupted(zero3, "resumed")


def test_zero3_ewc_mid_task_checkpoint_holds_the_whole_fisher_and_anchor(zero3, zero3_resumed):
    """Each rank holds only its slices mid-task; rank 0's mid-task file has the whole, gathered terms."""
    import torch
    from safetensors.torch import load_file

    from tests._launch import load_dump

    dumped = load_dump(zero3 / "two", "ewc", 0, 0, "after")  # the terms task 1 trains against
    checkpoints = sorted((zero3_resumed / "resumed" / "ewc" / "run" / "task-001").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in checkpoints:
        saved = load_file(checkpoint / "continual_state" / "strategies" / "00-ewc" / "state.safetensors")
        assert {f"ewc/{k}" for k in saved} == {k for k in dumped if k.startswith("ewc/terms/")}
        for key, value in saved.items():
            assert value.shape == dumped[f"model/{key.split('/', 3)[3]}"].shape, key
            assert torch.equal(value, dumped[f"ewc/{key}"]), key


def test_zero3_ewc_resumed_from_a_mid_task_checkpoint_ends_as_the_uninterrupted_run(zero3, zero3_resumed):
    """Killed after step 1 of task 1 (its later checkpoints removed), the run resumes from the mid-task checkpoint on
    2 ranks: the gathered Fisher and anchor are cut into the partitions again, and it ends as the run that never stopped."""
    from tests._launch import killed_mid_task, launch

    killed = killed_mid_task(zero3, "ewc", continual=zero3 / "two" / "ewc" / "run" / "continual" / "task-000",
                             checkpoint=zero3_resumed / "resumed" / "ewc" / "run" / "task-001" / "checkpoint-1")
    launch(zero3, "mid-task", ["ewc"], ["--deepspeed", "3"], processes=2,
           env={"CLM_DRIVER_RESUME_RUN": str(killed), "CLM_DRIVER_SAVE_STEPS": "1"})
    # It trained step 2 only (a resume from the end of task 0 would save checkpoint-1 again).
    inner = sorted(p.name for p in (zero3 / "mid-task" / "ewc" / "run" / "task-001").glob("checkpoint-*"))
    assert inner == ["checkpoint-2"]
    _assert_ewc_task1_as_uninterrupted(zero3, "mid-task")
