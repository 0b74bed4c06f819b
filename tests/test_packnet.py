"""PackNet: ownership, bit-exact protection of old tasks, BWT = 0, pruning, capacity, state, plots."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from clm_hf import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments, ContinualTrainer, Replay, Strategy
from clm_hf.strategies.base import TaskInfo, load_tensor_json_state, save_tensor_json_state
from clm_hf.strategies.packnet import PackNet, PackNetCapacityError
from tests.conftest import small_args

METRICS = ("exact_match", "token_accuracy", "loss")


def _trainer(tmp_path, model, tokenizer, strategies, **overrides):
    return ContinualCausalLMTrainer(model=model, args=small_args(tmp_path, **overrides), processing_class=tokenizer,
                                    strategies=list(strategies))


def _assert_bwt_exactly_zero(results):
    """R[i][j] == R[j][j] for every metric and j < i: old tasks score exactly as right after training."""
    for metric in METRICS:
        matrix = results.matrix(metric)
        for i in range(len(matrix)):
            for j in range(i):
                assert matrix[i][j] == matrix[j][j], (metric, i, j, matrix)
    assert results.summary()["bwt"] == 0.0


class Probe(Strategy):
    """Listed after PackNet: checks the hooks' effects and snapshots the model after every task."""

    name = "packnet_probe"

    def __init__(self, packnet: PackNet):
        super().__init__()
        self.packnet = packnet
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.ownership: list[dict[str, torch.Tensor]] = []
        self.fixed_grad_violations = 0
        self.pruned_violations = 0
        self.retrain_steps = 0
        self.mid_task_state = None

    def edit_gradients(self, model):
        for p, fixed, _ in self.packnet._guard.values():
            if p.grad is not None and bool(p.grad[fixed].any()):
                self.fixed_grad_violations += 1
        if self.packnet.phase == "train" and self.packnet._guard and self.mid_task_state is None:
            self.mid_task_state = self.packnet.state_dict()

    def after_optimizer_step(self, model):
        if self.packnet.phase == "retrain":
            self.retrain_steps += 1
            params = dict(model.named_parameters())
            for name, pruned in self.packnet._pruned.items():
                if bool(params[name].detach()[pruned].any()):
                    self.pruned_violations += 1

    def after_task(self, trainer, task):
        self.snapshots.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        self.ownership.append({n: o.clone() for n, o in self.packnet.ownership.items()})


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tiny_stream):
    """Three tasks with AdamW and weight decay 0.1, so that restoring fixed weights matters."""
    from clm_hf.tasks import build_tiny_model, build_tokenizer

    tmp_path = tmp_path_factory.mktemp("packnet")
    tokenizer = build_tokenizer()
    model = build_tiny_model("gpt2", tokenizer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    packnet = PackNet(prune_percentage=0.75, retrain_epochs=1.0)
    probe = Probe(packnet)
    trainer = _trainer(tmp_path, model, tokenizer, [packnet, probe], optim="adamw_torch", weight_decay=0.1)
    trainer.fit(tiny_stream)
    return trainer, packnet, probe, tmp_path


def test_old_tasks_weights_are_bit_identical_after_later_tasks(gpt2_run):
    trainer, packnet, probe, _ = gpt2_run
    assert len(probe.snapshots) == 3
    for later in range(1, 3):
        for earlier in range(later):
            own = probe.ownership[earlier]
            for name, owner in own.items():
                held = owner != 0  # everything tasks <= earlier own
                assert torch.equal(probe.snapshots[later][name][held], probe.snapshots[earlier][name][held]), name
    # Shared parameters (embeddings, biases, norms) are trained with task 1 only, then frozen.
    for name in packnet.shared_names:
        assert torch.equal(probe.snapshots[2][name], probe.snapshots[0][name]), name
        assert not dict(trainer.model.named_parameters())[name].requires_grad
    assert probe.fixed_grad_violations == 0


def test_scores_of_old_tasks_are_exactly_those_after_their_training(gpt2_run):
    trainer, _, _, _ = gpt2_run
    _assert_bwt_exactly_zero(trainer.results)


def test_pruning_counts_ownership_and_usage(gpt2_run):
    trainer, packnet, probe, _ = gpt2_run
    p = packnet.config.prune_percentage
    for name, final in packnet.ownership.items():
        assert final.dtype == torch.uint8
        free = final.numel()
        for k in range(3):
            kept = free - math.floor(p * free)
            assert int((final == k + 1).sum()) == kept, (name, k)
            free -= kept
        assert int((final == 0).sum()) == free
    usage = packnet.parameter_usage()
    assert list(usage) == ["copy", "reverse", "sort", "free"]
    assert sum(usage.values()) == pytest.approx(1.0, abs=1e-12)
    assert usage["copy"] > usage["reverse"] > usage["sort"] > 0
    # After each task, the weights no task owns are exactly zero (pruned, waiting for the next task).
    for snapshot, own in zip(probe.snapshots, probe.ownership):
        for name, owner in own.items():
            assert not bool(snapshot[name][owner == 0].any()), name
    # Pruned weights stay exactly 0 through retraining, which did run.
    assert probe.retrain_steps > 0 and probe.pruned_violations == 0
    # The usage history the report plots: one row per stage, shares in task order.
    history = trainer.results.metadata["parameter_usage"]
    assert list(history) == ["copy", "reverse", "sort"]
    assert history["copy"] == [usage["copy"], 0.0, 0.0]
    assert history["sort"] == [usage["copy"], usage["reverse"], usage["sort"]]


def test_use_task_zeroes_later_weights_and_restores_exactly(gpt2_run):
    trainer, packnet, _, _ = gpt2_run
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with trainer.use_task("copy"):
        params = dict(trainer.model.named_parameters())
        for name, own in packnet.ownership.items():
            assert not bool(params[name].detach()[own != 1].any())
            assert torch.equal(params[name].detach()[own == 1], before[name][own == 1])
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n].detach(), before[n]) for n in before)


def test_mid_task_state_and_round_trip(gpt2_run, tmp_path):
    trainer, packnet, probe, _ = gpt2_run
    # Mid-task (task 2), the state carries the values the first task's weights are held at.
    mid = probe.mid_task_state
    name = next(iter(mid["frozen"]))
    owned_by_first = probe.ownership[0][name] != 0
    assert torch.equal(mid["frozen"][name], probe.snapshots[0][name][owned_by_first])
    save_tensor_json_state(mid, tmp_path / "mid")
    fresh = PackNet()
    fresh.load_state_dict(load_tensor_json_state(tmp_path / "mid"))
    assert torch.equal(fresh._pending_frozen[name], mid["frozen"][name])
    # End of stream: ownership, shared names and packed tasks survive safetensors + JSON.
    packnet.save_state(tmp_path / "end")
    loaded = PackNet()
    loaded.load_state(tmp_path / "end")
    assert loaded.packed == packnet.packed and loaded.shared_names == packnet.shared_names
    assert all(torch.equal(loaded.ownership[n], o) and loaded.ownership[n].dtype == torch.uint8
               for n, o in packnet.ownership.items())
    assert loaded.parameter_usage() == packnet.parameter_usage()


def test_report_writes_packnet_plots(gpt2_run):
    from clm_hf.plots import write_report

    trainer, _, _, tmp_path = gpt2_run
    written = {p.name for p in write_report(tmp_path / "run")}
    assert {"packnet_parameter_usage.png", "packnet_task_accuracies.png"} <= written
    assert (tmp_path / "run" / "packnet_parameter_usage.png").stat().st_size > 0


def test_without_restoration_weight_decay_moves_old_weights(tmp_path, make_model, tokenizer, tiny_stream, monkeypatch):
    # The mutation the bit-identity test must catch: AdamW's decay moves weights with zero grads.
    monkeypatch.setattr(PackNet, "after_optimizer_step", lambda self, model: None)
    packnet = PackNet(retrain_epochs=0.0)
    probe = Probe(packnet)
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [packnet, probe], optim="adamw_torch",
                       weight_decay=0.1, save_continual_state=False)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    moved = [n for n, own in probe.ownership[0].items()
             if not torch.equal(probe.snapshots[1][n][own == 1], probe.snapshots[0][n][own == 1])]
    assert moved


def test_llama_without_biases(tmp_path, make_model, tokenizer, tiny_stream):
    model = make_model("llama")
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    packnet = PackNet()
    trainer = _trainer(tmp_path, model, tokenizer, [packnet], optim="adamw_torch", weight_decay=0.1,
                       save_continual_state=False)
    results = trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    _assert_bwt_exactly_zero(results)
    assert "lm_head.weight" in packnet.shared_names and "model.embed_tokens.weight" in packnet.shared_names
    assert any(n.endswith("down_proj.weight") for n in packnet.ownership)


def test_t5_seq2seq(tmp_path, make_model, tokenizer, tiny_stream):
    model = make_model("t5")
    packnet = PackNet(retrain_epochs=0.5)
    args = small_args(tmp_path, args_class=ContinualSeq2SeqTrainingArguments, save_continual_state=False)
    trainer = ContinualSeq2SeqTrainer(model=model, args=args, processing_class=tokenizer, strategies=[packnet])
    results = trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    _assert_bwt_exactly_zero(results)
    assert any("EncDecAttention" in n for n in packnet.ownership)
    assert not any("relative_attention_bias" in n or n == "shared.weight" for n in packnet.ownership)


def test_prunable_selection_excludes_embeddings(make_model):
    model = make_model("gpt2")
    names = PackNet().select_prunable(model)
    assert len(names) == 8 and all(n.startswith("transformer.h.") and n.endswith(".weight") for n in names)
    only_mlp = PackNet(prunable=[r"mlp\.c_fc"]).select_prunable(model)
    assert only_mlp == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match="no prunable weight"):
        PackNet(prunable=["nothing_matches"]).select_prunable(model)


def test_magnitude_and_random_pruning_masks():
    packnet = PackNet(prune_percentage=0.5)
    weight = torch.tensor([[0.1, -5.0, 0.2, 3.0], [-0.05, 0.3, 4.0, -0.4]])
    candidates = torch.tensor([[True, False, True, True], [True, True, False, True]])
    mask = packnet._prune_mask(weight, candidates, 0)
    # 6 candidates -> 3 pruned: the smallest |w| among them, never a weight an earlier task owns.
    assert mask.tolist() == [[True, False, True, False], [True, False, False, False]]
    random = PackNet(prune_percentage=0.5, use_magnitude_pruning=False)._prune_mask(weight, candidates, 0)
    assert int(random.sum()) == 3 and not bool((random & ~candidates).any())


def test_out_of_capacity_error(tmp_path, make_model, tokenizer, tiny_stream):
    # With 0.1% pruned, the first task keeps nearly everything and the second takes the rest.
    packnet = PackNet(prune_percentage=0.001, retrain_epochs=0.0)
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [packnet], save_continual_state=False)
    with pytest.raises(PackNetCapacityError, match=r"2 task\(s\) packed.*lower prune_percentage"):
        trainer.fit(tiny_stream)
    assert packnet.parameter_usage()["free"] == 0.0


def test_composes_with_replay(tmp_path, make_model, tokenizer, tiny_stream):
    replay = Replay(buffer_size=64, replay_ratio=1.0)
    packnet = PackNet(retrain_epochs=0.5)
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [replay, packnet], save_continual_state=False)
    results = trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    _assert_bwt_exactly_zero(results)
    assert len(replay.buffer) == 64 and len(packnet.packed) == 2


def test_resume_restores_ownership_and_keeps_old_scores(tmp_path, make_model, tokenizer, tiny_stream):
    first = PackNet(retrain_epochs=0.5)
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [first])
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    resumed = PackNet(retrain_epochs=0.5)
    trainer2 = _trainer(tmp_path, make_model("gpt2", seed=1), tokenizer, [resumed])
    results = trainer2.fit(tiny_stream, resume_from_checkpoint=True)
    assert [t["name"] for t in resumed.packed] == ["copy", "reverse", "sort"]
    for name, own in first.ownership.items():
        old = resumed.ownership[name]
        assert torch.equal(torch.where(old <= 2, old, 0), own)
    assert all(not dict(trainer2.model.named_parameters())[n].requires_grad for n in resumed.shared_names)
    _assert_bwt_exactly_zero(results)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prune_percentage": 0.0}, "prune_percentage"),
        ({"prune_percentage": 1.0}, "prune_percentage"),
        ({"retrain_epochs": -1}, "retrain_epochs"),
        ({"prunable": "linear"}, "prunable"),
        ({"prunable": ["("]}, "prunable"),
        ({"prune_percentge": 0.5}, "Did you mean 'prune_percentage'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        PackNet(**options)


def test_original_config_dict(tmp_path, make_model):
    trainer = ContinualTrainer(model=make_model("gpt2"), config={
        "optimizer": {"type": "adam", "lr": 0.001},
        "continual_strategy": {"packnet": {"enabled": True, "prune_percentage": 0.75, "use_magnitude_pruning": True}},
        "output_dir": str(tmp_path), "training": {"report_to": "none"},
    })
    (packnet,) = trainer.strategies
    assert isinstance(packnet, PackNet) and packnet.config.prune_percentage == 0.75


def test_use_task_of_an_unpacked_task_is_a_no_op(make_model):
    model = make_model("gpt2")
    packnet = PackNet()
    packnet.prepare_model(model, TaskInfo("a", "a", 0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with packnet.use_task(model, TaskInfo("a", "a", 0)):
        assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_example_runs(tmp_path):
    path = Path(__file__).resolve().parents[1] / "recipes" / "packnet" / "packnet_example.py"
    spec = importlib.util.spec_from_file_location("packnet_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.main(str(tmp_path / "example"), num_train=32, num_eval=16, num_epochs=1, print_fn=lambda *a: None)
    assert trainer.results.summary()["bwt"] == 0.0
    assert (tmp_path / "example" / "packnet_parameter_usage.png").is_file()


class _GradientNorms(Strategy):
    """Listed after PackNet: the norm of the gradient the optimizer gets, as the edits leave it."""

    name = "packnet_norms"

    def __init__(self, packnet: PackNet):
        super().__init__()
        self.packnet = packnet
        self.norms: list[float] = []
        self.free_norms: list[float] = []

    def edit_gradients(self, model):
        if not self.packnet._guard:  # the first task has no fixed weight
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        # The same by hand from the free weights alone: fixed entries of packed weights left out.
        fixed = {id(p): mask for p, mask, _ in self.packnet._guard.values()}
        squares = sum(float((p.grad[~fixed[id(p)]] if id(p) in fixed else p.grad).double().square().sum())
                      for p in model.parameters() if p.grad is not None)
        self.free_norms.append(math.sqrt(squares))


def test_clip_norm_sees_only_the_free_weights(tmp_path, make_model, tokenizer, tiny_stream):
    # The masks are applied before clipping: the norm the Trainer clips with (and logs as grad_norm)
    # is that of the free weights' gradients, and the fixed weights stay bit-identical.
    packnet = PackNet(retrain_epochs=0.0)
    norms = _GradientNorms(packnet)
    probe = Probe(packnet)
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [packnet, norms, probe], max_grad_norm=1e-3,
                       optim="adamw_torch", weight_decay=0.1, save_continual_state=False)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]  # the second task
    assert len(norms.norms) == len(logged) == 4
    for clip_norm, seen, free in zip(logged, norms.norms, norms.free_norms):
        assert seen == pytest.approx(free, rel=1e-5)  # unclipped: the edits run before clipping
        assert clip_norm == pytest.approx(free, rel=1e-5)
        assert clip_norm > 1e-3  # so the step was clipped
    for name, owner in probe.ownership[0].items():
        held = owner != 0
        assert torch.equal(probe.snapshots[1][name][held], probe.snapshots[0][name][held]), name
    assert probe.fixed_grad_violations == 0
