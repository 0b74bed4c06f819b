"""DeepSpeed ZeRO, for real, on CPU: ``torchrun`` with 2 processes (DeepSpeed's CPU accelerator, gloo).

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
# LwF with a live teacher copies whole weights: refused. EWC: online ("ewc") and separate terms over 3 tasks.
ZERO3 = ["replay", "lwf-cached", "ewc", "ewc-separate"]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return launch_pair(tmp_path_factory.mktemp("zero2"), ZERO2, ["--deepspeed", "2"])


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    # With continual checkpoints: rank 0 writes them while every rank holds only its partition.
    return launch_pair(tmp_path_factory.mktemp("zero3"), ZERO3, ["--deepspeed", "3"], env={"CLM_DRIVER_SAVE": "1"})


@pytest.mark.parametrize("run", ZERO2)
def test_zero2_two_ranks_match_one_process(zero2, run):
    assert_ranks_match_one_process(zero2, run)


@pytest.mark.parametrize("run", ZERO3)
def test_zero3_two_ranks_match_one_process(zero3, run):
    assert_ranks_match_one_process(zero3, run)


def test_zero3_continual_checkpoint_holds_the_whole_trained_model(zero3):
    """Each end-of-task checkpoint of the ZeRO-3 run holds the gathered weights, not empty partitions."""
    import torch
    from safetensors.torch import load_file

    from tests.test_distributed import _load

    for task in (0, 1):
        saved = load_file(zero3 / "two" / "replay" / "run" / "continual" / f"task-{task:03d}" / "model.safetensors")
        trained = _load(zero3 / "two", "replay", 0, task, "after")
        assert saved and all(f"model/{k}" in trained for k in saved)
        for key, value in saved.items():
            assert value.numel() > 0 and torch.equal(value, trained[f"model/{key}"]), key


def test_zero3_continual_checkpoint_holds_ewcs_whole_fisher_and_anchor(zero3):
    """Rank 0 writes EWC's state while each rank holds only its slices: the file has the whole, gathered tensors."""
    import torch
    from safetensors.torch import load_file

    from tests.test_distributed import _load

    for task in (0, 1):
        saved = load_file(zero3 / "two" / "ewc" / "run" / "continual" / f"task-{task:03d}" / "strategies" / "00-ewc"
                          / "state.safetensors")
        dumped = _load(zero3 / "two", "ewc", 0, task, "after")
        assert {f"ewc/{k}" for k in saved} == {k for k in dumped if k.startswith("ewc/terms/")}
        for key, value in saved.items():
            assert value.shape == dumped[f"model/{key.split('/', 3)[3]}"].shape, key
            assert torch.equal(value, dumped[f"ewc/{key}"]), key


def test_zero3_ewc_resumed_after_task_0_ends_as_the_uninterrupted_run(zero3):
    """The checkpoint's whole Fisher and anchor, loaded while the model is whole, are cut into the partitions
    when DeepSpeed partitions the model, and task 1 then trains as in the run that never stopped."""
    import torch

    from tests._launch import launch
    from tests.test_distributed import _load

    launch(zero3, "resumed", ["ewc"], ["--deepspeed", "3"], processes=2, env={"CLM_DRIVER_RESUME": str(zero3 / "two")})
    for rank in (0, 1):
        resumed, straight = _load(zero3 / "resumed", "ewc", rank, 1, "after"), _load(zero3 / "two", "ewc", rank, 1, "after")
        floats = [k for k, v in straight.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        assert any(k.startswith("ewc/terms/") for k in floats) and any(k.startswith("model/") for k in floats)
        for key in floats:
            torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
