"""Every strategy on a PEFT LoRA model: it acts only on the adapter weights, never moves the frozen
base, and the adapters save, load and resume through the continual checkpoint."""

from __future__ import annotations

import pytest
import torch

from clm_hf import ContinualCausalLMTrainer, Strategy
from clm_hf.strategies import build_strategy
from clm_hf.strategies.base import unwrap_model
from tests.conftest import FAST_OPTIONS, small_args

peft = pytest.importorskip("peft")

import clm_hf.strategies.gem  # noqa: E402,F401 - registers gem / agem
import clm_hf.strategies.olora  # noqa: E402,F401 - registers olora

# The common fast options, with PNN's lateral rank and O-LoRA's default rank for these LoRA runs.
OPTIONS = {**FAST_OPTIONS, "pnn": {"lateral_rank": 4}, "olora": {}}


def _lora(make_model, seed: int = 0):
    model = make_model("llama")
    torch.manual_seed(seed)  # LoRA's A is drawn from the global RNG
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


class _Spy(Strategy):
    """Listed after the strategy under test: records what it holds while each task trains."""

    name = "spy"

    def __init__(self, watched: Strategy) -> None:
        super().__init__()
        self.watched = watched
        self.teacher_keys: list[set[str]] = []
        self.trained: list[set[str]] = []
        self.projected: set[int] = set()  # ids of the parameters GEM's projection covered

    def before_task(self, trainer, task) -> None:
        teacher = getattr(self.watched, "teacher", None)
        self.teacher_keys.append(set(teacher or {}))
        self.trained.append({n for n, p in unwrap_model(trainer.model).named_parameters() if p.requires_grad})

    def edit_gradients(self, model) -> None:
        binding = getattr(self.watched, "_binding", None)
        if binding is not None:
            self.projected.update(id(p) for p in binding[1])


def _trainer(tmp_path, model, tokenizer, strategies, **overrides):
    return ContinualCausalLMTrainer(model=model, args=small_args(tmp_path, **overrides), processing_class=tokenizer,
                                    strategies=list(strategies))


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_strategy_acts_only_on_adapters_and_leaves_the_base_unchanged(name, tmp_path, make_model, tokenizer, tiny_stream):
    model = _lora(make_model)
    base = _base_weights(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    strategy = build_strategy(name, **OPTIONS[name])
    spy = _Spy(strategy)
    trainer = _trainer(tmp_path, model, tokenizer, [strategy, spy], save_continual_state=False)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})

    final = unwrap_model(trainer.model)
    if name == "pnn":  # every column (a copy of the PeftModel) keeps the original frozen base
        columns = list(final.columns)
        assert len(columns) == 2
        models = columns
    else:
        assert final is model
        models = [final]
    for column in models:
        weights = dict(column.named_parameters())
        for key, value in base.items():
            assert torch.equal(weights[key], value), f"{name} moved base weight {key}"
    for trained in spy.trained:
        assert trained and all("lora_" in n or "laterals." in n for n in trained), sorted(trained)[:5]
    moved = [n for n, p in models[0].named_parameters() if n in lora_before and not torch.equal(p, lora_before[n])]
    assert moved, f"{name}: the adapters did not train"

    if name == "ewc":
        fisher, anchor = strategy.terms[0]
        lora = {n for n, p in model.named_parameters() if "lora_" in n}
        assert set(fisher) == set(anchor) == lora  # adapter parameters only, all of them
    if name == "lwf":
        assert spy.teacher_keys[0] == set() and spy.teacher_keys[1]
        assert all("lora_" in n for n in spy.teacher_keys[1])
    if name in ("gem", "agem"):
        names = {n for n, p in model.named_parameters() if id(p) in spy.projected}
        assert names and all("lora_" in n for n in names) and strategy.steps > 0
    if name == "packnet":  # it packs the adapter matrices; nothing else trains
        assert strategy.ownership and all("lora_" in n for n in strategy.ownership)
        assert strategy.shared_names == []
        owners = torch.cat([o.flatten() for o in strategy.ownership.values()])
        assert {1, 2} <= set(owners.unique().tolist())
    if name == "olora":  # the PeftModel's adapter is the first task's; later ones copy its config
        assert strategy.adapter_names == ["default", "olora_task_1"]
        assert model.peft_config["olora_task_1"].r == 4
        assert list(model.base_model.active_adapters) == ["default", "olora_task_1"]


def test_packnet_on_lora_keeps_old_tasks_exactly(tmp_path, make_model, tokenizer, tiny_stream):
    """Pruning the adapter matrices packs tasks as it does full weights: BWT is exactly 0."""
    trainer = _trainer(tmp_path, _lora(make_model), tokenizer, [build_strategy("packnet")], save_continual_state=False,
                       learning_rate=1e-2)
    results = trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    loss = results.matrix("loss")
    assert loss[1][0] == loss[0][0]
    assert loss[0][0] < results.baseline["loss"][0]


@pytest.mark.parametrize("name", ["ewc", "olora"])
def test_adapters_save_load_and_resume_through_the_continual_checkpoint(name, tmp_path, make_model, tokenizer, tiny_stream):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    whole = _trainer(tmp_path / "whole", _lora(make_model), tokenizer, [build_strategy(name, **OPTIONS[name])])
    whole.fit(stream)
    # Stop after the first task, then resume from a fresh PeftModel whose adapters start elsewhere.
    first = _trainer(tmp_path / "split", _lora(make_model), tokenizer, [build_strategy(name, **OPTIONS[name])])
    first.fit({"copy": stream["copy"]})
    saved = tmp_path / "split" / "run" / "continual" / "task-000" / "model.safetensors"
    from safetensors.torch import load_file

    assert any("lora_A" in k for k in load_file(saved))
    resumed = _trainer(tmp_path / "split", _lora(make_model, seed=5), tokenizer, [build_strategy(name, **OPTIONS[name])])
    resumed.fit(stream, resume_from_checkpoint=True)
    a, b = unwrap_model(whole.model).state_dict(), unwrap_model(resumed.model).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    # (the interrupted run's first row lacks 'reverse': its stream did not have it yet)
    assert resumed.results.matrix("loss")[-1] == pytest.approx(whole.results.matrix("loss")[-1], abs=1e-5)


def test_pnn_lora_mode_wants_the_base_model(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, _lora(make_model), tokenizer, [build_strategy("pnn", mode="lora")],
                       save_continual_state=False)
    with pytest.raises(ValueError, match="pass the base model, not a PeftModel"):
        trainer.fit({"copy": tiny_stream["copy"]})
