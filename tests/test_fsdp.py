"""FSDP2, for real, on CPU: ``torchrun`` with 2 processes sharding a tiny model against 1 unsharded process.

``tests/distributed_driver.py --fsdp`` runs the real Trainer/Accelerate FSDP2 path (``fully_shard``
per decoder block over a ``DeviceMesh("cpu", (2,))``; ``tests/fsdp_cpu.py`` lets Accelerate take it
on CPU processes). Every rank gathers each weight and strategy tensor (``DTensor.full_tensor()``)
before and after each task. A strategy supports FSDP2 (``Strategy.supports_fsdp``) when:

- every strategy tensor and weight equals, to 1e-5, the same stream trained in one unsharded process
  with the global batch (the same rows at every step; SGD, no dropout, one row length), and
- both ranks hold the same gathered state.

Every strategy that declares ``supports_fsdp`` must be in ``RUNS`` (checked below), so the flag
cannot be set without this evidence.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._launch import assert_first_tasks_weights_held, launch, launch_pair
from tests._launch import ATOL, free_port, launch_env, load_dump, same

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parent.parent
# Driver runs (tests/distributed_driver.py RUNS) checked under FSDP2, and the strategy each covers.
RUNS = {"plain": None, "replay": "replay", "ewc": "ewc", "ewc-true": "ewc", "ewc-separate": "ewc", "lwf": "lwf",
        "lwf-cached": "lwf", "ewc-accum": "ewc", "lwf-accum": "lwf", "gem": "gem", "gem-nomargin": "gem", "agem": "agem",
        "packnet": "packnet", "packnet-random": "packnet", "pnn-3tasks": "pnn", "pnn-fresh": "pnn", "pnn-lora": "pnn",
        "olora": "olora"}


@pytest.fixture(scope="module")
def fsdp_launches(tmp_path_factory):
    return launch_pair(tmp_path_factory.mktemp("fsdp"), list(RUNS), ["--fsdp"], shared=tmp_path_factory)


@pytest.mark.parametrize("run", list(RUNS))
def test_fsdp2_two_ranks_match_one_unsharded_process(fsdp_launches, run):
    tasks = sorted(int(p.name[4:].split("_")[0]) for p in (fsdp_launches / "one" / run / "rank0").glob("task*_after.pt"))
    assert len(tasks) >= 2, f"{run}: the one-process run wrote {len(tasks)} task(s)"
    # "before" holds what a strategy prepared for the task (LwF's teacher cache, computed by the
    # sharded model's forward), "after" what it keeps from it (EWC's Fisher and anchor).
    for task, when in ((task, when) for task in tasks for when in ("before", "after")):
        r0, r1 = (load_dump(fsdp_launches / "two", run, rank, task, when) for rank in (0, 1))
        one = load_dump(fsdp_launches / "one", run, 0, task, when)
        assert r0["fsdp"] and r0["world_size"] == 2, "the launch did not shard with FSDP"
        assert not one["fsdp"] and one["world_size"] == 1
        assert r0["global_step"] == one["global_step"]
        assert r0.keys() == r1.keys() == one.keys() | {"fisher_row_losses"}, (run, set(r0) ^ set(one))
        differ = [k for k in r0 if k not in ("rank", "fisher_row_losses") and not same(r0[k], r1[k])]
        assert not differ, f"{run}: ranks differ {when} task {task} in {differ[:8]}"
        for key, value in one.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                sharded = r0[key]
                if "/frozen/" in key and sharded.shape != value.shape:
                    # PackNet's mid-task held values: 1-D over the owned positions in one process, a
                    # weight-shaped DTensor (0 where not owned) under FSDP2.
                    sharded = sharded[r0[key.replace("/frozen/", "/ownership/")] != 0]
                torch.testing.assert_close(sharded, value, atol=ATOL, rtol=1e-5, msg=lambda m, k=key: f"{run} {k}: {m}")
            elif key not in ("rank", "world_size", "fisher_rows", "fisher_row_losses", "fsdp", "device"):
                assert same(value, r0[key]), f"{run}: {key} differs between FSDP2 and one process"


@pytest.mark.parametrize("run", [run for run, strategy in RUNS.items() if strategy == "ewc"])
def test_fsdp2_ewc_splits_the_fisher_rows_between_the_ranks(fsdp_launches, run):
    """Each rank backpropagates half of the Fisher rows (one per-row loss each), as under DDP."""
    last = max(int(p.name[4:].split("_")[0]) for p in (fsdp_launches / "two" / run / "rank0").glob("task*_after.pt"))
    r0, r1 = (load_dump(fsdp_launches / "two", run, rank, last, "after") for rank in (0, 1))
    given = [-(-rows // 2) for rows in r0["fisher_rows"]]  # every rank is given all rows and takes its half
    assert r0["fisher_rows"] and r0["fisher_row_losses"] == r1["fisher_row_losses"] == sum(given), (
        run, r0["fisher_rows"], r0["fisher_row_losses"], r1["fisher_row_losses"])


@pytest.mark.parametrize("run", list(RUNS))
def test_fsdp2_scores_tasks_on_the_sharded_model_with_rows_split_across_ranks(fsdp_launches, run):
    """Per-task scoring under FSDP2 runs on the sharded model (each decoder block gathered in turn,
    never the whole model on one rank), each rank forwards its half of the eval rows, and the
    gathered scores give the same results matrix as one unsharded process."""
    r0, r1, one = (torch.load(root / run / f"rank{rank}" / "results.pt", weights_only=False)
                   for root, rank in ((fsdp_launches / "two", 0), (fsdp_launches / "two", 1), (fsdp_launches / "one", 0)))
    assert one["eval_rows"] > 0 and r0["eval_rows"] == r1["eval_rows"] == one["eval_rows"] // 2, (
        f"{run}: eval rows forwarded per rank {r0['eval_rows']}, {r1['eval_rows']} vs {one['eval_rows']} in one process")
    metrics = [k for k in one if k.startswith("scores/")]
    assert metrics and sorted(metrics) == sorted(k for k in r0 if k.startswith("scores/")), (run, metrics)
    for key in metrics:
        assert torch.equal(r0[key].isnan(), one[key].isnan()), f"{run} {key}: scored cells differ"
        assert torch.equal(r0[key], r1[key].to(r0[key].dtype)) or torch.equal(r0[key].nan_to_num(), r1[key].nan_to_num()), (
            f"{run} {key}: ranks hold different results")
        torch.testing.assert_close(r0[key].nan_to_num(), one[key].nan_to_num(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, k=key: f"{run} {k}: {m}")


def test_every_strategy_declaring_fsdp_support_is_checked_here():
    from clm_hf.strategies.base import STRATEGY_REGISTRY

    declared = {name for name, cls in STRATEGY_REGISTRY.items() if cls.supports_fsdp and not name.endswith("_test")}
    assert declared <= set(RUNS.values()), f"declared supports_fsdp without an FSDP2 run here: {declared - set(RUNS.values())}"


# Strategies that edit sharded weights between forward passes (PackNet's pruning and evaluation masks)
# or shard modules they add (PNN columns and lora, O-LoRA: right after an evaluation),
# also run with reshard_after_forward=False: FSDP2 then keeps unsharded plain copies of the weights in
# the parameters' places after an evaluation, which a strategy must not bind, edit or reuse.
KEEP_UNSHARDED_RUNS = ["packnet", "pnn-3tasks", "pnn-lora", "olora"]


@pytest.fixture(scope="module")
def fsdp_keep_unsharded(fsdp_launches, tmp_path_factory):
    out = launch(tmp_path_factory.mktemp("fsdp-keep-unsharded"), "two", KEEP_UNSHARDED_RUNS, ["--fsdp", "--keep-unsharded"],
                 processes=2)
    (out / "one").symlink_to(fsdp_launches / "one")  # the unsharded reference runs of the main launch
    return out


@pytest.mark.parametrize("run", KEEP_UNSHARDED_RUNS)
def test_fsdp2_without_reshard_after_forward_matches_one_unsharded_process(fsdp_keep_unsharded, run):
    assert run in RUNS
    test_fsdp2_two_ranks_match_one_unsharded_process(fsdp_keep_unsharded, run)


@pytest.mark.parametrize("run", [r for r, s in RUNS.items() if s == "packnet"])
def test_fsdp2_packnet_keeps_the_first_tasks_weights_bit_identical(fsdp_launches, run):
    # Under FSDP2 the held weights are restored shard by shard after every optimizer step.
    assert_first_tasks_weights_held(fsdp_launches / "two", run)


@pytest.mark.parametrize("run", [r for r, s in RUNS.items() if s == "pnn" and r != "pnn-lora"])
def test_fsdp2_pnn_columns_stay_frozen_and_score_their_tasks_unchanged(fsdp_launches, run):
    """The PNN property under FSDP2: a column added (and sharded) for a later task leaves every
    earlier column bit-identical, and each task scored through its own column keeps its score."""
    root = fsdp_launches / "two"
    last = max(int(p.name[4:].split("_")[0]) for p in (root / run / "rank0").glob("task*_after.pt"))
    assert last >= 1, run
    for rank in (0, 1):
        final = load_dump(root, run, rank, last, "after")
        assert any(k.startswith(f"model/columns.{last}.") for k in final), f"{run}: no column {last} on rank {rank}"
        for task in range(last):
            trained = load_dump(root, run, rank, task, "after")
            mine = [k for k in trained if k.startswith(f"model/columns.{task}.") or k.startswith(f"model/laterals.{task}.")]
            assert mine, (run, task)
            moved = [k for k in mine if not torch.equal(trained[k], final[k])]
            assert not moved, f"{run}: column {task} moved after task {last} on rank {rank}: {moved[:4]}"
        results = torch.load(root / run / f"rank{rank}" / "results.pt", weights_only=False)
        loss = results["scores/loss"]
        for task in range(last):
            assert torch.equal(loss[task:, task], loss[task, task].expand(last + 1 - task)), (run, task, loss)


# One process, FSDP2 with a world of 1 (gloo): column 0's blocks sharded with bf16 compute and
# reshard_after_forward=False, as Accelerate would; then PNN adds a column.
_PNN_UNIT_OPTIONS = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from clm_hf.strategies.pnn_model import ProgressiveModel, find_blocks
from clm_hf.tasks import build_tiny_model, build_tokenizer

torch.manual_seed(0)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
model = ProgressiveModel(build_tiny_model("gpt2", build_tokenizer(), hidden_size=32, num_layers=2, num_heads=2),
                         lateral_rank=4).eval()
for _, block in find_blocks(model.columns[0]):
    fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
fully_shard(model, mesh=mesh, mp_policy=policy)
ids = torch.tensor([[5, 6, 7, 8]])
with torch.no_grad():
    before = model(input_ids=ids).logits
model.add_column()
groups = [block._get_fsdp_state()._fsdp_param_group for _, block in find_blocks(model.columns[1])]
groups += [adapter._get_fsdp_state()._fsdp_param_group for adapter in model.laterals[1]]
with torch.no_grad():
    new = model(input_ids=ids).logits
    with model.use_column(0):
        old = model(input_ids=ids).logits
print({"param_dtypes": sorted({str(g.mp_policy.param_dtype) for g in groups}),
       "kept_unsharded": sorted({g.post_forward_mesh_info is None for g in groups}), "units": len(groups),
       "logits": str(new.dtype), "old_unchanged": torch.equal(old, before), "copy_starts_equal": torch.equal(new, old)})
dist.destroy_process_group()
"""


def test_fsdp2_pnn_new_column_takes_the_models_fsdp2_options():
    """A column added under FSDP2 is sharded with the options Accelerate gave the model's blocks: its
    mixed precision (bf16 compute here) and reshard_after_forward, not FSDP2's defaults."""
    import ast

    done = subprocess.run([sys.executable, "-c", _PNN_UNIT_OPTIONS, str(free_port())], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert seen == {"param_dtypes": ["torch.bfloat16"], "kept_unsharded": [True], "units": 4, "logits": "torch.bfloat16",
                    "old_unchanged": True, "copy_starts_equal": True}, seen
