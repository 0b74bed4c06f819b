"""O-LoRA: one adapter per task on a frozen base, old adapters frozen and summed in the forward
pass, and a penalty Σ|A_old A_newᵀ| that keeps the new adapter's input subspace away from the old ones."""

from __future__ import annotations

import pytest
import torch

from clm_hf import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments, Strategy
from clm_hf.strategies import build_strategy
from clm_hf.strategies.base import TaskInfo, unwrap_model
from tests.conftest import small_args

peft = pytest.importorskip("peft")

from clm_hf.strategies.olora import OLoRA, adapter_name  # noqa: E402


def _trainer(tmp_path, model, tokenizer, strategies, **overrides):
    return ContinualCausalLMTrainer(model=model, args=small_args(tmp_path, **overrides), processing_class=tokenizer,
                                    strategies=list(strategies))


def _tasks(n):
    return [TaskInfo(task_id=f"t{i}", name=f"t{i}", index=i) for i in range(n)]


def _lora_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and len(m.lora_A)]


@pytest.mark.parametrize(
    "options, message",
    [({"lambda_orth": -1.0}, "lambda_orth"), ({"lambda_l2": -0.1}, "lambda_l2"), ({"lora_rank": 0}, "lora_rank"),
     ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_target_modules": 3}, "lora_target_modules"),
     ({"use_task": "yes"}, "use_task"), ({"lambda_ortho": 1.0}, "Did you mean 'lambda_orth'")],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        OLoRA(**options)


def test_registered_by_name_with_the_paper_aliases():
    strategy = build_strategy("olora", lambda_1=0.25, lambda_2=0.1, lora_r=4)
    assert isinstance(strategy, OLoRA)
    assert (strategy.config.lambda_orth, strategy.config.lambda_l2, strategy.config.lora_rank) == (0.25, 0.1, 4)


def test_one_adapter_per_task_all_summed_only_the_newest_trains(make_model):
    olora = OLoRA(lora_rank=4)
    model = make_model("llama")
    for task in _tasks(3):
        model = olora.prepare_model(model, task)
    assert isinstance(model, peft.PeftModel)
    assert olora.adapter_names == [adapter_name(i) for i in range(3)]
    assert list(model.base_model.active_adapters) == olora.adapter_names
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".olora_task_2." in n for n in trainable)
    # The forward pass adds every adapter: W x + Σ_k s · B_k A_k x.
    layer = _lora_modules(model)[0]
    with torch.no_grad():
        for name in olora.adapter_names:
            layer.lora_B[name].weight.normal_()
        x = torch.randn(3, layer.in_features)
        expected = layer.base_layer(x) + sum(
            layer.scaling[n] * layer.lora_B[n](layer.lora_A[n](x)) for n in olora.adapter_names)
        torch.testing.assert_close(layer(x), expected)


def test_penalty_is_the_sum_of_absolute_a_products_and_reaches_only_the_new_a(make_model):
    olora = OLoRA(lora_rank=4, lambda_orth=0.3)
    model = make_model("llama")
    for task in _tasks(3):
        model = olora.prepare_model(model, task)
    olora._bind(model, 2)
    expected = 0.0
    for layer in _lora_modules(model):
        new = layer.lora_A[adapter_name(2)].weight
        for old in (adapter_name(0), adapter_name(1)):
            expected += float((layer.lora_A[old].weight @ new.T).abs().sum().detach())
    terms = olora.loss(model, {}, None)
    assert terms.keys() == {"olora_orthogonality"}
    assert float(terms["olora_orthogonality"]) == pytest.approx(0.3 * expected, rel=1e-5)
    terms["olora_orthogonality"].backward()
    for name, p in model.named_parameters():
        if ".lora_A.olora_task_2." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_first_task_has_no_orthogonality_term_and_l2_is_optional(make_model):
    olora = OLoRA(lora_rank=4, lambda_l2=0.5)
    model = olora.prepare_model(make_model("llama"), _tasks(1)[0])
    olora._bind(model, 0)
    terms = olora.loss(model, {}, None)
    assert set(terms) == {"olora_l2"}
    new = [p for n, p in model.named_parameters() if ".olora_task_0." in n]
    assert float(terms["olora_l2"]) == pytest.approx(0.5 * sum(float(p.square().sum()) for p in new), rel=1e-5)
    assert OLoRA().loss(model, {}, None) == {}


def _orthogonality(model, names):
    total = 0.0
    for layer in _lora_modules(model):
        total += float((layer.lora_A[names[0]].weight @ layer.lora_A[names[1]].weight.T).abs().sum())
    return total


def test_stream_freezes_old_adapters_and_the_penalty_makes_subspaces_orthogonal(tmp_path, make_model, tokenizer, tiny_stream):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    overlaps = {}
    for lam in (0.0, 5.0):
        olora = OLoRA(lora_rank=4, lambda_orth=lam)
        model = make_model("llama")
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        snapshots = []

        class Snapshot(Strategy):  # listed after O-LoRA
            name = "snapshot"

            def after_task(self, trainer, task):
                snapshots.append({n: p.detach().clone() for n, p in unwrap_model(trainer.model).named_parameters()})

        trainer = _trainer(tmp_path / str(lam), model, tokenizer, [olora, Snapshot()], learning_rate=1e-2,
                           save_continual_state=False)
        trainer.fit(stream)
        peft_model = unwrap_model(trainer.model)
        first = [n for n in snapshots[0] if ".olora_task_0." in n]
        assert first and all(torch.equal(snapshots[1][n], snapshots[0][n]) for n in first), "old adapter moved"
        assert any(bool(v.abs().sum() > 0) for n, v in snapshots[1].items() if ".lora_B.olora_task_1." in n), \
            "the new adapter did not train (LoRA's B starts at zero)"
        for name, value in base.items():  # the base model never moves
            assert torch.equal(peft_model.get_base_model().get_parameter(name), value), name
        overlaps[lam] = _orthogonality(peft_model, olora.adapter_names)
    assert overlaps[5.0] < 0.5 * overlaps[0.0], overlaps


def test_use_task_scores_each_task_with_its_own_adapters(tmp_path, make_model, tokenizer, tiny_stream):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    aware = _trainer(tmp_path / "aware", make_model("llama"), tokenizer, [OLoRA(lora_rank=4, use_task=True)],
                     learning_rate=1e-2, save_continual_state=False)
    loss = aware.fit(stream).matrix("loss")
    assert loss[1][0] == loss[0][0]  # task 0 is scored with adapter 0 only: exactly as it was
    blind = _trainer(tmp_path / "blind", make_model("llama"), tokenizer, [OLoRA(lora_rank=4)],
                     learning_rate=1e-2, save_continual_state=False)
    assert blind.fit(stream).matrix("loss")[1][0] != loss[0][0]  # the paper's setting: all adapters


def test_runs_on_t5(tmp_path, make_model, tokenizer, tiny_stream):
    args = small_args(tmp_path, args_class=ContinualSeq2SeqTrainingArguments, save_continual_state=False)
    olora = OLoRA(lora_rank=4)
    trainer = ContinualSeq2SeqTrainer(model=make_model("t5"), args=args, processing_class=tokenizer, strategies=[olora])
    results = trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    assert results.matrix("loss")[0][0] < results.baseline["loss"][0]
    assert len(olora.adapter_names) == 2


def test_a_peft_model_with_several_adapters_is_refused(make_model):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(make_model("llama"), config)
    model.add_adapter("other", peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="one LoRA adapter"):
        OLoRA().prepare_model(model, _tasks(1)[0])


def test_state_round_trip_rebuilds_the_adapters(make_model):
    olora = OLoRA(lora_rank=4)
    model = make_model("llama")
    for task in _tasks(2):
        model = olora.prepare_model(model, task)
    restored = OLoRA(lora_rank=4)
    restored.load_state_dict(olora.state_dict())
    rebuilt = restored.restore_model(make_model("llama"))
    assert sorted(rebuilt.peft_config) == sorted(model.peft_config)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("use_task", [False, True])
def test_export_merges_the_adapters_into_a_model_from_pretrained_loads(use_task, tmp_path, make_model, tokenizer,
                                                                       tiny_stream):
    from transformers import AutoModelForCausalLM

    trainer = _trainer(tmp_path, make_model("llama"), tokenizer, [OLoRA(lora_rank=4, use_task=use_task)],
                       learning_rate=1e-2, max_steps=2, save_continual_state=False)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
        with trainer.use_task("copy"):
            trained_copy = trainer.model(input_ids=ids).logits
    cases = [(None, trained)] + ([("copy", trained_copy)] if use_task else [])
    for task, expected in cases:
        folder = trainer.export_model(tmp_path / f"export-{task}", task=task)
        assert (folder / "config.json").is_file() and not list(folder.glob("adapter_*"))
        loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    # The trainer's model keeps its adapters, unmerged: the next task trains as before.
    model = unwrap_model(trainer.model)
    assert isinstance(model, peft.PeftModel) and sorted(model.peft_config) == [adapter_name(0), adapter_name(1)]
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(input_ids=ids).logits, trained, rtol=0, atol=0)
