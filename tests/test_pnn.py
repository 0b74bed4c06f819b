"""PNN: frozen columns keep their outputs, laterals route gradient only into the new column,
the wrapper behaves like a HF model, checkpoints rebuild the columns, and the LoRA form."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from clm_hf import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments
from clm_hf.strategies import build_strategy
from clm_hf.strategies.base import TaskInfo
from clm_hf.strategies.pnn import PNN, adapter_name
from clm_hf.strategies.pnn_model import ProgressiveModel, find_blocks
from tests.conftest import AtTaskStep, small_args


def _trainer(tmp_path, model, tokenizer, strategies, arch="gpt2", **overrides):
    if arch == "t5":
        return ContinualSeq2SeqTrainer(model=model, processing_class=tokenizer, strategies=list(strategies),
                                       args=small_args(tmp_path, args_class=ContinualSeq2SeqTrainingArguments, **overrides))
    return ContinualCausalLMTrainer(model=model, args=small_args(tmp_path, **overrides), processing_class=tokenizer,
                                    strategies=list(strategies))


def _batch(trainer, task_id, rows=8):
    dataset = trainer._eval_sets[task_id]
    features = [dataset[i] for i in range(rows)]
    batch = trainer.data_collator([{k: v for k, v in f.items() if k != "task_id"} for f in features])
    return batch


@torch.no_grad()
def _logits(trainer, task_id, batch):
    # The same grad mode each time: some CPU kernels round differently with and without autograd.
    with trainer.use_task(task_id), torch.no_grad():
        trainer.model.eval()
        return trainer.model(**batch).logits


def _tasks(n):
    return [TaskInfo(task_id=f"t{i}", name=f"t{i}", index=i) for i in range(n)]


def _columns(model, n, **options):
    pnn = PNN(lateral_rank=4, **options)
    for task in _tasks(n):
        model = pnn.prepare_model(model, task)
    return pnn, model


# --- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [({"mode": "packnet"}, "mode"), ({"lateral_rank": 0}, "lateral_rank"), ({"column_init": "random"}, "column_init"),
     ({"lateral_activation": "swish"}, "lateral_activation"), ({"lora_dropout": 1.0}, "lora_dropout"),
     ({"lora_target_modules": 3}, "lora_target_modules"), ({"lateral_rnk": 3}, "Did you mean 'lateral_rank'")],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        PNN(**options)


def test_registered_by_name():
    assert isinstance(build_strategy("pnn", rank=8), PNN) and build_strategy("pnn", rank=8).config.lateral_rank == 8


# --- the wrapper ------------------------------------------------------------------------------------
def test_wrapper_keeps_the_hf_forward_and_a_new_column_starts_as_its_copy(make_model, tokenizer):
    model = make_model("gpt2")
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(3))
    _, pnn_model = _columns(model, 2)
    assert isinstance(pnn_model, ProgressiveModel) and pnn_model.num_columns == 2
    assert pnn_model.config.model_type == "gpt2" and not pnn_model.config.is_encoder_decoder
    with torch.no_grad():
        out = pnn_model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(3))
    # zero-initialised laterals: column 1 is exactly the copy of column 0; num_items_in_batch reached it
    assert torch.equal(out.logits, reference.logits)
    assert torch.equal(out.loss, reference.loss)
    # a ProgressiveModel saves with plain safetensors (tied embeddings appear once) and loads strictly
    state = pnn_model.state_dict()
    assert "columns.1.lm_head.weight" not in state and "columns.1.transformer.wte.weight" in state


def test_laterals_change_the_new_column_and_generate_uses_them(make_model, tmp_path):
    _, pnn_model = _columns(make_model("llama"), 2)
    ids = torch.tensor([[5, 6, 7, 8]])
    pnn_model.eval()
    with torch.no_grad():
        before = pnn_model(input_ids=ids).logits
        for adapter in pnn_model.laterals[1]:
            adapter.up.weight.normal_(std=0.5)
        after = pnn_model(input_ids=ids).logits
        with pnn_model.use_column(0):
            column0 = pnn_model(input_ids=ids).logits
    assert not torch.allclose(before, after) and torch.equal(before, column0)
    generated = pnn_model.generate(ids, max_new_tokens=1, do_sample=False)
    assert generated[0, -1] == after[0, -1].argmax()
    save_file(pnn_model.state_dict(), str(tmp_path / "m.safetensors"))
    assert not pnn_model.load_state_dict(load_file(str(tmp_path / "m.safetensors"))).missing_keys


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_gradient_reaches_only_the_newest_column_and_its_laterals(arch, make_model):
    _, pnn_model = _columns(make_model(arch), 3)
    with torch.no_grad():  # make every lateral non-zero, old ones included
        for adapters in pnn_model.laterals:
            for adapter in adapters:
                adapter.up.weight.normal_(std=0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pnn_model.train()
    pnn_model(input_ids=ids, labels=ids).loss.backward()
    for k in (0, 1):
        assert all(p.grad is None and not p.requires_grad for p in pnn_model.columns[k].parameters())
        assert all(p.grad is None and not p.requires_grad for p in pnn_model.laterals[k].parameters())
    newest = dict(pnn_model.columns[2].named_parameters())
    assert all(p.grad is not None for p in newest.values())
    assert sum(float(p.grad.abs().sum()) > 0 for p in newest.values()) >= 0.9 * len(newest)
    assert len(pnn_model.laterals[2]) == len(find_blocks(pnn_model.columns[2])) == (4 if arch == "t5" else 2)
    for name, p in pnn_model.laterals[2].named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_gradient_checkpointing_recomputes_the_same_laterals(make_model):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        _, pnn_model = _columns(make_model("gpt2"), 2)
        with torch.no_grad():
            for adapter in pnn_model.laterals[1]:
                adapter.up.weight.normal_(std=0.1)
        if checkpointing:
            pnn_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert pnn_model.is_activation_checkpointing
        pnn_model.train()
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        pnn_model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in pnn_model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("laterals.1" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6)


def test_fresh_columns_are_random_as_in_the_paper(make_model):
    _, pnn_model = _columns(make_model("gpt2"), 2, column_init="fresh")
    old, new = (dict(c.named_parameters()) for c in pnn_model.columns)
    assert old.keys() == new.keys()
    assert not torch.equal(old["transformer.h.0.attn.c_attn.weight"], new["transformer.h.0.attn.c_attn.weight"])
    fresh = pnn_model.columns[1]
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied, as the config says


# --- through the trainer ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_fit_freezes_old_columns_exactly_and_new_columns_learn(arch, tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model(arch), tokenizer, [PNN(lateral_rank=8)], arch=arch, save_continual_state=False)
    names = list(tiny_stream)
    for name in names:
        trainer.add_eval_task(name, tiny_stream[name]["eval"])
    batch = _batch(trainer, "copy")
    recorded = {}
    for name in names:
        trainer.train_task(tiny_stream[name]["train"], task_id=name)
        recorded[name] = _logits(trainer, name, batch)
    assert trainer.model.num_columns == 3
    for name in names:  # every column answers exactly as when its task ended
        assert torch.equal(_logits(trainer, name, batch), recorded[name]), name
    results = trainer.results
    loss = results.matrix("loss")
    for j in range(3):
        assert all(loss[i][j] == loss[j][j] for i in range(j, 3))  # no forgetting at all
        if j:  # the new column starts as the previous one and learns its task
            assert loss[j][j] < loss[j - 1][j]
    assert results.summary()["bwt"] == 0.0
    growth = trainer.strategies[0].parameter_growth()
    assert results.metadata["pnn_parameters"] == growth and [g["columns"] for g in growth] == [1, 2, 3]
    column = sum(p.numel() for p in trainer.model.columns[0].parameters())
    assert growth[0]["added"] == 0 and growth[1]["added"] > column and growth[2]["added"] > growth[1]["added"]
    assert growth[2]["trainable"] == growth[2]["added"]


def test_checkpoint_round_trip_rebuilds_the_columns(tmp_path, make_model, tokenizer, tiny_stream):
    first = _trainer(tmp_path, make_model("gpt2"), tokenizer, [PNN(lateral_rank=8)])
    first.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    batch = _batch(first, "copy")
    expected = {name: _logits(first, name, batch) for name in ("copy", "reverse")}
    # A new process: other weights, the same settings; the stream has grown by one task.
    resumed = _trainer(tmp_path, make_model("gpt2", seed=123), tokenizer, [PNN(lateral_rank=8)])
    resumed.fit(tiny_stream, resume_from_checkpoint=True)
    assert resumed.model.num_columns == 3 and [t.task_id for t in resumed.tasks] == ["copy", "reverse", "sort"]
    for name, logits in expected.items():
        assert torch.equal(_logits(resumed, name, batch), logits), name
    assert [g["columns"] for g in resumed.results.metadata["pnn_parameters"]] == [1, 2, 3]


_CrashAt = AtTaskStep


@pytest.mark.parametrize("mode", ["columns", "lora"])
def test_resume_inside_a_task_matches_the_uninterrupted_run(mode, tmp_path, make_model, tokenizer, tiny_stream):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    settings = dict(save_strategy="steps", save_steps=2)
    full = _trainer(tmp_path / "full", make_model("gpt2"), tokenizer, [PNN(mode=mode, lateral_rank=8)], **settings)
    full.fit(stream)
    crashing = _trainer(tmp_path / "cut", make_model("gpt2"), tokenizer, [PNN(mode=mode, lateral_rank=8)], **settings)
    crashing.add_callback(_CrashAt(crashing, 1, 3))
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(stream)
    resumed = _trainer(tmp_path / "cut", make_model("gpt2", seed=123), tokenizer, [PNN(mode=mode, lateral_rank=8)], **settings)
    resumed.fit(stream, resume_from_checkpoint=True)
    reference = dict(full.model.named_parameters())
    final = dict(resumed.model.named_parameters())
    assert final.keys() == reference.keys()
    for name, value in final.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)


# --- lora mode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_lora_mode_one_adapter_per_task_on_a_frozen_base(arch, tmp_path, make_model, tokenizer, tiny_stream):
    from peft import PeftModel

    base = make_model(arch)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    pnn = PNN(mode="lora", lora_rank=4)
    trainer = _trainer(tmp_path, base, tokenizer, [pnn], arch=arch)
    for name in stream:
        trainer.add_eval_task(name, stream[name]["eval"])
    batch = _batch(trainer, "copy")
    trainer.train_task(stream["copy"]["train"], task_id="copy")
    copy_logits = _logits(trainer, "copy", batch)
    trainer.train_task(stream["reverse"]["train"], task_id="reverse")
    model = trainer.model
    assert isinstance(model, PeftModel) and set(model.peft_config) == {adapter_name(0), adapter_name(1)}
    # the base never moved and never trains; only the newest adapter trains
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad
            assert torch.equal(p, original[name.replace(".base_layer", "")])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{adapter_name(1)}." in n for n in trainable)
    # use_task switches adapters; the old adapter's outputs did not change
    assert torch.equal(_logits(trainer, "copy", batch), copy_logits)
    assert not torch.allclose(_logits(trainer, "reverse", batch), copy_logits)
    assert trainer.results.summary()["bwt"] == 0.0
    loss = trainer.results.matrix("loss")
    assert loss[1][1] < loss[0][1]  # the new adapter learns its task
    assert model.active_adapter == adapter_name(1) and [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    growth = pnn.parameter_growth()
    adapter_size = sum(p.numel() for n, p in model.named_parameters() if f".{adapter_name(1)}." in n)
    assert growth[1]["added"] == adapter_size == growth[1]["trainable"]
    # checkpoint round trip: a fresh base gets its adapters back before the weights load
    resumed = _trainer(tmp_path, make_model(arch, seed=123), tokenizer, [PNN(mode="lora", lora_rank=4)], arch=arch)
    resumed.fit(stream, resume_from_checkpoint=True)
    assert torch.equal(_logits(resumed, "copy", batch), copy_logits)


def test_lateral_adapter_loads_a_scalar_alpha_saved_before_it_became_shape_1():
    import torch

    from clm_hf.strategies.pnn_model import LateralAdapter

    adapter = LateralAdapter(1, 8, 2)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    state["alpha"] = torch.tensor(0.25)  # the 0-dim form of earlier checkpoints
    adapter.load_state_dict(state)
    assert adapter.alpha.shape == (1,) and float(adapter.alpha) == 0.25


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_column_rebuilt_for_fsdp2_equals_a_deep_copy_and_draws_nothing(make_model, arch):
    """Under FSDP2 a new column is built from the config on the meta device and filled from the
    previous column's shards (a deep copy is refused there); on a plain column the same path must
    give the deep copy exactly:
    every parameter and buffer (Llama's rotary inv_freq), tied weights still tied, the RNG untouched
    (the unsharded run's deep copy draws nothing, so both runs keep one random stream)."""
    import copy

    from clm_hf.strategies.pnn_model import _fill_from, _meta_like

    source = make_model(arch)
    state = torch.random.get_rng_state()
    rebuilt = _meta_like(source)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.is_meta for p in rebuilt.parameters())
    _fill_from(rebuilt, source, torch.device("cpu"))  # under FSDP2: after sharding, shard by shard
    twin = copy.deepcopy(source)
    params, buffers = dict(rebuilt.named_parameters()), dict(rebuilt.named_buffers())
    assert params.keys() == dict(twin.named_parameters()).keys()
    for name, value in [*twin.named_parameters(), *twin.named_buffers()]:
        mine = params.get(name, buffers.get(name))
        assert mine is not None and mine.dtype == value.dtype and torch.equal(mine, value), name
        assert mine.data_ptr() != value.data_ptr() or value.numel() == 0, f"{name} shares storage with the source"
    if arch == "gpt2":
        assert rebuilt.lm_head.weight is rebuilt.transformer.wte.weight
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(input_ids=ids).logits, twin.eval()(input_ids=ids).logits, rtol=0, atol=0)


# --- export and generation -----------------------------------------------------------------------------
def test_lora_mode_exports_one_tasks_adapter_merged_and_asks_which(tmp_path, make_model, tokenizer, tiny_stream):
    from transformers import AutoModelForCausalLM

    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [PNN(mode="lora", lora_rank=4)], learning_rate=1e-2,
                       max_steps=2, save_continual_state=False)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    with pytest.raises(ValueError, match=r"export_model\(folder, task=task_id\).*from_pretrained\(run_dir\)"):
        trainer.export_model(tmp_path / "export")
    assert not (tmp_path / "export").exists()  # refused before anything was written
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    per_task = {}
    for task in ("copy", "reverse"):
        with trainer.use_task(task), torch.no_grad():
            trainer.model.eval()
            expected = per_task[task] = trainer.model(input_ids=ids).logits
        folder = trainer.export_model(tmp_path / f"export-{task}", task=task)
        loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    assert (per_task["copy"] - per_task["reverse"]).abs().max() > 1e-3  # the two exports are two different models
    assert list(trainer.model.peft_config) == [adapter_name(0), adapter_name(1)]  # the trainer's model is unmerged


def test_columns_mode_export_is_refused_at_once_naming_what_to_keep(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [PNN(lateral_rank=4)], max_steps=1,
                       save_continual_state=False)
    trainer.fit({"copy": tiny_stream["copy"]})
    for task in (None, "copy"):
        with pytest.raises(ValueError, match=r"mode='columns'.*save_continual_checkpoint.*from_pretrained\(run_dir\)"):
            trainer.export_model(tmp_path / "export", task=task)
    assert not (tmp_path / "export").exists()


def test_columns_mode_with_a_seq2seq_model_and_generation_metrics_is_refused_before_training(
        tmp_path, make_model, tokenizer, tiny_stream):
    with pytest.raises(NotImplementedError, match=r"'pnn' cannot generate.*generation_metrics=\['exact_match'\].*mode='lora'"):
        _trainer(tmp_path, make_model("t5"), tokenizer, [PNN(lateral_rank=4)], arch="t5",
                 generation_metrics=["exact_match"])
    # Set after the trainer was built: refused when fit starts, before the first task trains.
    trainer = _trainer(tmp_path, make_model("t5"), tokenizer, [PNN(lateral_rank=4)], arch="t5", max_steps=1)
    trainer.args.generation_metrics = ["exact_match"]
    with pytest.raises(NotImplementedError, match="generation_metrics"):
        trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    assert trainer.tasks == [] and trainer.state.global_step == 0
    # lora mode generates with any model; columns generate with a causal LM.
    _trainer(tmp_path, make_model("t5"), tokenizer, [PNN(mode="lora")], arch="t5", generation_metrics=["exact_match"])
    _trainer(tmp_path, make_model("gpt2"), tokenizer, [PNN()], generation_metrics=["exact_match"])
