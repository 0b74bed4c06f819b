"""Smoke runs of the benchmark scripts (tiny sizes, a few steps) so they don't rot; no timing assertions.

Also the exactness of what the benchmarks led to change: EWC's fused penalty (value and gradient of
several merged terms, non-fp32 parameters).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def step_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steps")
    module = _load("step_overhead")
    report = module.main(["--quick", "--strategies", "ewc,replay", "--gem-scaling", "1,2", "--gem-curves", "per_task:1", "--gem-direct",
                          "--phases", "--output", str(tmp / "steps.json"), "--plot", str(tmp / "gem.png")])
    return report, tmp


def test_step_overhead_alternates_both_sides_and_plots_gem_scaling(step_report):
    report, tmp = step_report
    assert [r["strategy"] for r in report["rows"]] == ["ewc", "replay"]
    for row in report["rows"]:
        assert row["ratio_step"] > 0 and row["ratio_token"] > 0 and row["blocks"] >= 1
        assert row["tokens_per_step"]["plain"] > 0 and row["tokens_per_step"]["strategy"] > 0
    assert [r["past_tasks"] for r in report["gem_scaling"]] == [1, 2]
    # --gem-direct: K = 2 against K = 1, both GEM, side by side
    assert [(r["past_tasks"], r["baseline_past_tasks"]) for r in report["gem_direct"]] == [(2, 1)]
    assert report["gem_direct"][0]["ratio_step"] > 0
    assert (tmp / "gem.png").stat().st_size > 0
    assert json.loads((tmp / "steps.json").read_text())["rows"][0]["target"] == 1.03  # issue 13: EWC <= 1.03x


def test_step_overhead_phases_split_each_side(step_report):
    # --phases: where a strategy's extra time goes. EWC's edit is timed on its side only, and a
    # step's parts (rest = what the others leave) are all there for both sides.
    report, _ = step_report
    module = _load("step_overhead")
    phases = {r["strategy"]: r["phases_ms"] for r in report["rows"]}
    for row in phases.values():
        for side in ("plain", "strategy"):
            assert set(row[side]) == set(module.PHASES)
            assert row[side]["forward_backward"] > 0 and row[side]["optimizer"] > 0 and row[side]["clip"] > 0
    assert phases["ewc"]["strategy"]["edit_gradients"] > 0 and phases["ewc"]["plain"]["edit_gradients"] == 0.0
    assert phases["replay"]["strategy"]["edit_gradients"] == 0.0  # replay edits no gradient

    # The edits run inside the Trainer's clipping call: they are counted once, as edit_gradients.
    import time
    from types import SimpleNamespace

    strategy = SimpleNamespace(edit_gradients=lambda model: time.sleep(0.3))  # far above any sleep overshoot

    def clip(model):
        strategy.edit_gradients(model)
        time.sleep(0.01)

    trainer = SimpleNamespace(strategies=[strategy], training_step=lambda *a: None, _clip_grad_norm=clip,
                              _get_grad_norm=lambda model, grad_norm=None: None)
    clock = module.StepClock(module.Baton("a"), "a", "b", block=10, total=10)
    module._time_phases(trainer, clock)
    clock.on_step_begin(None, None, None)
    trainer._clip_grad_norm(None)
    assert clock._phase["edit_gradients"] >= 0.3 and 0.01 <= clock._phase["clip"] < 0.3  # the edit counted once, not as clipping


def test_baton_alternates_strictly():
    module = _load("step_overhead")
    import threading

    baton, order = module.Baton("a"), []

    def side(me, other):
        baton.wait(me)
        for i in range(3):
            order.append(me)
            baton.hand(me, other)
        baton.finish(me, other)

    threads = [threading.Thread(target=side, args=pair) for pair in (("a", "b"), ("b", "a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order == ["a", "b"] * 3


def test_between_tasks_smoke(tmp_path):
    report = _load("between_tasks").main(["--quick", "--output", str(tmp_path / "between.json")])
    assert {r["what"] for r in report["fisher"]} >= {"EWC Fisher (true, auto)", "EWC Fisher (true, vmap)", "EWC Fisher (true, loop)"}
    assert all(r["ratio"] > 0 for r in report["fisher"] + report["lwf"] + report["ratios"])
    # issue 13 item 4: PackNet's pruning and GEM's memory fill as multiples of a training pass
    assert {r["what"].split(" (")[0] for r in report["ratios"]} == {"PackNet prune", "GEM memory fill"}
    assert report["packnet"][0]["ms_per_million"] > 0 and report["replay"][0]["add_ms_per_10k_rows"] > 0


def test_micro_benchmarks_smoke(tmp_path):
    micro = _load("micro")
    report = micro.main(["--quick", "--output", str(tmp_path / "micro.json")])
    assert set(report["cases"]) == set(micro.CASES)  # every case runs by default
    assert {"ewc-step", "fisher-batch-size", "lwf-teacher", "pnn-breakdown"} <= set(report["cases"])
    assert all(v > 0 for v in report["cases"]["fisher-row-grads"]["ratio_to_training_pass"].values())
    assert all(math.isfinite(v) for case in report["cases"].values() for v in case["ms"].values())
    assert report["cases"]["gem-breakdown"]["ms"]["reference_gradients"] > 0


def test_memory_accounting_is_exact(tmp_path):
    report = _load("memory").main(["--quick", "--in-process", "--configs", "ewc,packnet,gem",
                                   "--output", str(tmp_path / "memory.json")])
    rows = {r["config"]: r for r in report["rows"]}
    assert rows["plain"]["state_B_per_param"] == [0.0, 0.0]
    assert rows["ewc"]["state_B_per_param"] == [8.0, 8.0]  # online: one fp32 Fisher + one anchor
    assert rows["packnet"]["state_B_per_prunable"] == [1.0, 1.0]  # one uint8 owner per weight
    assert rows["gem"]["rows"] == [8, 16]  # memory_per_task (64) capped by the 8 rows of each task


def test_quality_vs_cost_combines_and_plots(step_report, tmp_path):
    _, steps_dir = step_report
    quality = [{"name": "plain", "acc": 0.2, "bwt": -0.5, "forgetting": 0.5, "time_ratio": 1.0},
               {"name": "joint", "acc": 0.9, "bwt": 0.0, "forgetting": 0.0, "time_ratio": 1.1},
               {"name": "ewc", "acc": 0.4, "bwt": -0.3, "forgetting": 0.3, "time_ratio": 1.3}]
    (tmp_path / "q.json").write_text(json.dumps(quality))
    rows = _load("quality_vs_cost").main(["--quality", str(tmp_path / "q.json"), "--steps", str(steps_dir / "steps.json"),
                                          "--plot", str(tmp_path / "qc.png"), "--output", str(tmp_path / "qc.json")])
    by_name = {r["name"]: r for r in rows}
    assert by_name["plain"]["step_ratio"] == 1.0 and by_name["ewc"]["step_ratio"] > 0
    assert (tmp_path / "qc.png").stat().st_size > 0


# --- the EWC penalty the benchmarks made fused stays exact ---------------------------------------------
def _random_terms(model, count, seed=0):
    from clm_hf.strategies.base import trainable_parameters

    gen = torch.Generator().manual_seed(seed)
    params = trainable_parameters(model)
    terms = []
    for _ in range(count):
        fisher = {n: torch.rand(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) > 0.3) for n, p in params.items()}
        anchor = {n: p.detach().float() + 0.1 * torch.randn(p.shape, generator=gen) for n, p in params.items()}
        terms.append((fisher, anchor))
    return params, terms


def test_ewc_merged_separate_terms_equal_the_direct_sum(make_model):
    from clm_hf import EWC

    model = make_model("gpt2")
    params, terms = _random_terms(model, 3)
    ewc = EWC(mode="separate", ewc_lambda=7.0)
    ewc.terms = terms
    ewc._bind(model)
    penalty = ewc.penalty()
    penalty.backward()
    direct = 3.5 * sum((f[n] * (p.detach() - a[n]) ** 2).sum() for f, a in terms for n, p in params.items())
    torch.testing.assert_close(penalty.detach(), direct, rtol=1e-5, atol=1e-4)
    for name, p in params.items():
        expected = 7.0 * sum(f[name] * (p.detach() - a[name]) for f, a in terms)
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5)


def test_ewc_penalty_keeps_the_parameter_dtype(make_model):
    from clm_hf import EWC

    model = make_model("gpt2").to(torch.bfloat16)
    params, terms = _random_terms(model, 1)
    ewc = EWC(ewc_lambda=2.0)
    ewc.terms = terms
    ewc._bind(model)
    ewc.penalty().backward()
    for name, p in params.items():
        assert p.grad.dtype == torch.bfloat16
        expected = 2.0 * terms[0][0][name] * (p.detach().float() - terms[0][1][name])
        torch.testing.assert_close(p.grad.float(), expected, rtol=2e-2, atol=1e-3)


def test_gpu_check_model_and_compare(tmp_path, capsys):
    # The pieces of benchmarks/gpu_run.sh that a CPU can run: the local model folder a recipe
    # loads, and the run-by-run comparison of two distributed-driver outputs (which must flag a change).
    module = _load("gpu_check")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = module.build_model(tmp_path / "m", layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, vocab=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "qwen2" and model.config.num_key_value_heads == 1
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer)

    for name, shift in (("a", 0.0), ("b", 0.0), ("c", 1e-3)):
        folder = tmp_path / name / "ewc" / "rank0"
        folder.mkdir(parents=True)
        torch.save({"model/w": torch.ones(3) + shift, "ewc/fisher": torch.zeros(2), "fsdp": name != "a"}, folder / "task0_after.pt")
    same = module.compare(tmp_path / "a", tmp_path / "b", ["ewc", "lwf"], atol=1e-5)
    assert same["ewc"]["ok"] and same["ewc"]["max_abs_diff"] == 0.0 and same["ewc"]["second_run_fsdp"] is True
    assert not same["lwf"]["ok"] and "no output" in same["lwf"]["error"]
    moved = module.compare(tmp_path / "a", tmp_path / "c", ["ewc"], atol=1e-5)["ewc"]
    assert not moved["ok"] and moved["at"] == "model/w" and moved["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)

    log = tmp_path / "mem.csv"
    log.write_text("1024\n80512\n512\n")
    assert module.peak_memory(log) == 80512
