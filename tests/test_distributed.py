"""Multi-process correctness, for real: ``torchrun`` with 2 CPU processes (gloo) against 1 process.

``tests/distributed_driver.py`` trains every strategy on 2 tiny tasks, once under
``torchrun --nproc_per_node 2`` with a per-device batch of 4 and once in a single process with a
batch of 8, and every rank writes each strategy's state and the weights before and after each task.
The checks:

- the ranks hold *identical* state after every task (Fisher and anchors, replay buffer, GEM
  memories, PackNet ownership, PNN columns and adapters, LwF teacher, O-LoRA adapters, weights);
- 2 processes x batch 4 train the same model as 1 process x batch 8 (SGD, no dropout, one row
  length): the per-rank gradients are averaged by DDP, so the runs differ only by float
  summation order. After 4-8 SGD steps of lr 0.1 on weights of size ~0.1 that is ~1e-7; the
  tolerance 1e-5 leaves two orders of magnitude, while a real mistake (an unreduced gradient,
  a doubled penalty, a stale DDP wrapper) moves weights by 1e-3 or more;
- EWC estimates its Fisher on half the rows per rank and all-reduces the sums of squared per-row
  gradients: the 2-rank Fisher equals the 1-process Fisher on the same rows, and differs from
  the square of the rank-averaged gradient.

Launched once per session (about a minute of wall time on 2 cores for both launches together); the one-process
runs are shared with test_fsdp.py and test_deepspeed.py (``tests._launch.one_process_reference``).
"""

from __future__ import annotations

import pytest
import torch

from tests._launch import ATOL, load_dump, one_process_reference, same, start_logged, torchrun, wait_logged

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Runs whose 1-process and 2-process results must agree. "ewc-true" samples the Fisher's answers
# per rank (a different Monte-Carlo draw of the same Fisher), so only its ranks must agree.
EQUIVALENT = ["plain", "replay", "ewc", "lwf", "gem", "agem", "packnet", "pnn", "pnn-lora", "olora", "replay+ewc"]
RUNS = [*EQUIVALENT, "ewc-true"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    command = torchrun(2, "-m", "tests.distributed_driver", str(out / "two"), "--batch", "4", "--runs", ",".join(RUNS))
    two = start_logged(command, out / "two.log")
    try:
        # Meanwhile the one-process runs, shared with test_fsdp.py and test_deepspeed.py (computed once a session).
        (out / "one").symlink_to(one_process_reference(tmp_path_factory, RUNS))
        code = wait_logged(two, out / "two.log", timeout=900)
    finally:
        if two.poll() is None:
            two.kill()
    if code != 0:
        pytest.fail(f"the two-process launch failed with exit code {code}:\n{(out / 'two.log').read_text()[-6000:]}")
    return out


@pytest.mark.parametrize("run", RUNS)
def test_every_rank_holds_identical_state_after_each_task(launches, run):
    for task in (0, 1):
        for when in ("before", "after"):
            r0, r1 = (load_dump(launches / "two", run, rank, task, when) for rank in (0, 1))
            assert r0["world_size"] == r1["world_size"] == 2, "the launch did not run distributed"
            assert r0.keys() == r1.keys(), (run, task, when)
            differ = [k for k in r0 if k != "rank" and not same(r0[k], r1[k])]
            assert not differ, f"{run}: ranks differ {when} task {task} in {differ[:8]}"


@pytest.mark.parametrize("run", EQUIVALENT)
def test_two_processes_with_batch_b_match_one_process_with_batch_2b(launches, run):
    for task in (0, 1):
        one, two = load_dump(launches / "one", run, 0, task, "after"), load_dump(launches / "two", run, 0, task, "after")
        assert one["world_size"] == 1 and two["world_size"] == 2
        assert one["global_step"] == two["global_step"], "the 2 ranks together took a different number of steps"
        assert one.keys() == two.keys()
        moved = 0.0
        for key, value in one.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                # EWC's Fisher squares per-row gradients summed over the answer tokens (values up to ~50
                # here), so the other reduction order of 2 ranks shows at a relative 1e-5.
                rtol = 1e-4 if "/fisher/" in key else 1e-5
                torch.testing.assert_close(two[key], value, atol=ATOL, rtol=rtol, msg=lambda m, k=key: f"{run} {k}: {m}")
                if key.startswith("model/"):
                    start = load_dump(launches / "one", run, 0, 0, "before")[key] if task == 0 else None
                    if start is not None and start.shape == value.shape:
                        moved = max(moved, float((value - start).abs().max()))
            elif key not in ("rank", "world_size", "fisher_rows"):
                assert same(value, two[key]), f"{run}: {key} differs between 1 and 2 processes"
        if task == 0:
            assert moved > 100 * ATOL, f"{run}: training barely moved the weights, so the comparison proves nothing"


def test_ewc_fisher_is_estimated_on_shards_and_summed_before_averaging(launches, tokenizer):
    one = load_dump(launches / "one", "ewc", 0, 0, "after")
    ranks = [load_dump(launches / "two", "ewc", r, 0, "after") for r in (0, 1)]
    assert one["fisher_rows"] == [8] and [r["fisher_rows"] for r in ranks] == [[4], [4]], "rows were not split"
    fisher_keys = [k for k in one if k.startswith("ewc/terms/0/fisher/")]
    assert fisher_keys
    for key in fisher_keys:
        torch.testing.assert_close(ranks[0][key], one[key], atol=1e-9, rtol=1e-5)
    # The wrong estimate, the square of the rank-averaged gradient, is far from it on these rows.
    from clm_hf.strategies.ewc import estimate_fisher
    from clm_hf.tasks import build_tiny_model, make_suite, tokenize_task

    model = build_tiny_model("gpt2", tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.load_state_dict({k[len("model/"):]: v for k, v in one.items() if k.startswith("model/")})
    train = make_suite(["copy"], num_train=8, num_eval=4, min_len=3, max_len=3, seed=0)["copy"]["train"]
    rows = tokenize_task(train, tokenizer, False, answer_only_loss=True).shuffle(seed=0).select(range(8))
    exact = estimate_fisher(model, rows, batch_size=8, method="loop")
    assert all(torch.allclose(exact[k[len("ewc/terms/0/fisher/"):]], one[k], rtol=1e-4, atol=1e-10) for k in fisher_keys)
    grads = []
    for r in range(2):
        half = rows.select(range(4 * r, 4 * r + 4))
        batch = {c: torch.tensor(half[c]) for c in ("input_ids", "labels")}
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    squared_mean = sum(float(((grads[0][n] + grads[1][n]) / 2).square().sum()) for n in grads[0])
    total = sum(float(one[k].sum()) for k in fisher_keys)
    assert squared_mean < 0.7 * total, "the test cannot tell the right Fisher from the squared mean gradient"


def test_replay_buffer_is_the_same_on_every_rank_and_holds_each_row_once(launches):
    ranks = [load_dump(launches / "two", "replay", r, 1, "after") for r in (0, 1)]
    assert ranks[0]["replay/buffer_rows"] == ranks[1]["replay/buffer_rows"]
    assert ranks[0]["replay/buffer_seen"] == 16, "each task's 8 rows are offered to the reservoir once per rank"
    rows = ranks[0]["replay/buffer_rows"]
    keys = list(zip(rows["task_id"], map(tuple, rows["input_ids"])))
    assert len(keys) == 6 and len(set(keys)) == len(keys), "a row sits in the buffer twice"


def test_gem_memories_and_projection_agree_across_ranks(launches):
    for run in ("gem", "agem"):
        ranks = [load_dump(launches / "two", run, r, 1, "after") for r in (0, 1)]
        memory = [k for k in ranks[0] if k.startswith(f"{run}/memory/")]
        assert memory and all(ranks[0][k] == ranks[1][k] for k in memory)
        assert ranks[0][f"{run}/steps"] == ranks[1][f"{run}/steps"] > 0
        assert ranks[0][f"{run}/projected_steps"] == ranks[1][f"{run}/projected_steps"] > 0, "nothing was projected"


def test_packnet_ownership_pnn_columns_lwf_teacher_and_olora_adapters_are_real(launches):
    """The identical-state check above compares something: each of these holds non-trivial state."""
    packnet = load_dump(launches / "two", "packnet", 0, 1, "after")
    owners = [v for k, v in packnet.items() if k.startswith("packnet/ownership/")]
    assert owners and {1, 2} <= set(torch.cat([o.flatten() for o in owners]).unique().tolist())
    lwf = load_dump(launches / "two", "lwf", 0, 1, "before")
    assert any(k.startswith("lwf/teacher/") for k in lwf)
    for run, marker in (("pnn", "columns.1."), ("pnn-lora", "pnn_task_1"), ("olora", "olora_task_1")):
        before, after = (load_dump(launches / "two", run, 0, 1, w) for w in ("before", "after"))
        new = [k for k in after if k.startswith("model/") and marker in k]
        assert new, f"{run}: no parameter of the second task's column/adapter"
        assert any(not torch.equal(before[k], after[k]) for k in new if k in before), f"{run}: the new column did not train"
