"""ContinualSFTTrainer: the continual mixin over trl.SFTTrainer (optional extra clm-hf[trl])."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from clm_hf.strategies import STRATEGY_REGISTRY, build_strategy  # noqa: E402
from clm_hf.strategies.base import unwrap_model  # noqa: E402

# A chat template whose words are all in the test tokenizer's vocabulary (it splits on whitespace).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% if m['role'] == 'assistant' %}<eos> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)
TASKS = ("copy", "rev")


@pytest.fixture(scope="module")
def chat_tokenizer():
    from clm_hf.tasks import build_tokenizer

    tok = build_tokenizer(extra_tokens=["user", "assistant"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def rows(layout: str, task: str, n: int = 8) -> Dataset:
    rng = random.Random(task)
    prompts = [" ".join(rng.choice("abcd") for _ in range(3)) for _ in range(n)]
    answers = [p[::-1] if task == "rev" else p for p in prompts]
    if layout == "prompt_completion":
        return Dataset.from_dict({"prompt": [p + " =" for p in prompts], "completion": [" " + a for a in answers]})
    if layout == "messages":
        return Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
                                               for p, a in zip(prompts, answers)]})
    return Dataset.from_dict({"text": [f"{p} = {a}" for p, a in zip(prompts, answers)]})


def sft_args(tmp_path, **overrides):
    from clm_hf.sft import ContinualSFTConfig

    settings = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                    report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, max_length=32,
                    dataloader_pin_memory=False, use_cpu=True, seed=0,
                    # Keeps each stream to seconds: checkpoints and the baseline are tested elsewhere.
                    save_continual_state=False, eval_before_training=False)
    settings.update(overrides)
    return ContinualSFTConfig(**settings)


def sft_trainer(tmp_path, tokenizer, strategies=(), arch="gpt2", **overrides):
    from clm_hf.sft import ContinualSFTTrainer
    from clm_hf.tasks import build_tiny_model

    peft_config = overrides.pop("peft_config", None)
    return ContinualSFTTrainer(model=build_tiny_model(arch, tokenizer), args=sft_args(tmp_path, **overrides),
                               processing_class=tokenizer, strategies=list(strategies), peft_config=peft_config)


def stream(layout: str) -> dict:
    # Text rows have no prompt: their tasks are scored on prompt/completion rows of the same task.
    eval_layout = "prompt_completion" if layout == "text" else layout
    return {t: {"train": rows(layout, t), "eval": rows(eval_layout, t, n=4)} for t in TASKS}


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


# What each strategy leaves behind once two tasks are trained: the proof it acted.
ACTED = {
    "replay": lambda s, tr: len(s.buffer) > 0,
    "ewc": lambda s, tr: len(s.terms) > 0 and any(v > 0 for v in logged(tr, "ewc_penalty")),
    "gem": lambda s, tr: list(s.memories) == list(TASKS) and s.steps > 0,
    "agem": lambda s, tr: list(s.memories) == list(TASKS) and s.steps > 0,
    "lwf": lambda s, tr: any(v > 0 for v in logged(tr, "lwf_distillation")),
    "olora": lambda s, tr: len(logged(tr, "olora_orthogonality")) > 0,
    "packnet": lambda s, tr: len(s.packed) == 2,
    "pnn": lambda s, tr: s.task_ids == list(TASKS) and unwrap_model(tr.model).num_columns == 2,
}
PACKING_REFUSED = {name for name, cls in STRATEGY_REGISTRY.items() if not cls.supports_packed_rows or cls.side_columns}


def test_every_registered_strategy_has_a_check():
    # Strategies that tests register for themselves end in "_test" (tests/test_trainer.py).
    assert set(ACTED) == {n for n in STRATEGY_REGISTRY if not n.endswith("_test")}
    assert PACKING_REFUSED == {"lwf", "gem", "agem"}


@pytest.mark.parametrize("layout", ["prompt_completion", "messages", "text_packed"])
@pytest.mark.parametrize("name", sorted(n for n in STRATEGY_REGISTRY if not n.endswith("_test")))
def test_strategy_by_layout(tmp_path, chat_tokenizer, name, layout):
    packing = layout == "text_packed"
    build = lambda: sft_trainer(tmp_path, chat_tokenizer, [build_strategy(name)], packing=packing)  # noqa: E731
    if packing and name in PACKING_REFUSED:
        with pytest.raises(NotImplementedError, match=rf"Strategy '{name}' needs one row per example.*padding-free"):
            build()
        return
    trainer = build()
    results = trainer.fit(stream("text" if packing else layout))
    assert results.num_trained == 2
    assert all(v is not None for v in results.scores["loss"][-1])
    assert ACTED[name](trainer.strategies[0], trainer), f"{name} left no trace on {layout}"
    if packing:  # TRL packed the rows (several documents per row)
        assert "seq_lengths" in trainer.tasks[-1].train_dataset.column_names
        assert max(len(r) for r in trainer.tasks[-1].train_dataset["seq_lengths"]) > 1


def test_logit_strategies_refuse_a_loss_without_logits(tmp_path, chat_tokenizer):
    with pytest.raises(NotImplementedError, match=r"Strategy 'lwf' reads the model's logits.*loss_type='dft'"):
        sft_trainer(tmp_path, chat_tokenizer, [build_strategy("lwf")], loss_type="dft")


def test_lwf_with_wrapped_packing(tmp_path, chat_tokenizer):
    """Wrapped packing keeps padded rows, so a per-row strategy works; TRL's seq_lengths never reaches the model."""
    trainer = sft_trainer(tmp_path, chat_tokenizer, [build_strategy("lwf")], packing=True, packing_strategy="wrapped")
    trainer.fit(stream("text"))
    assert any(v > 0 for v in logged(trainer, "lwf_distillation"))
    # Pre-packed rows may carry TRL's seq_lengths: only the padding-free collator reads it, forward() would reject it.
    batch = trainer.data_collator([{"input_ids": [4, 5], "labels": [4, 5], "seq_lengths": [1, 1]}])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


def test_completion_only_loss_masks_the_prompt(tmp_path, chat_tokenizer):
    trainer = sft_trainer(tmp_path, chat_tokenizer)
    data = rows("prompt_completion", "copy", n=3)
    prepared = trainer._prepare_rows(data, "train rows")
    for raw, ids, labels in zip(data, prepared["input_ids"], prepared["labels"]):
        prompt_len = len(chat_tokenizer(raw["prompt"])["input_ids"])
        assert labels[:prompt_len] == [-100] * prompt_len
        assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == chat_tokenizer.eos_token_id
    # Full-sequence loss when asked, but scoring rows stay answer-only.
    full = sft_trainer(tmp_path, chat_tokenizer, completion_only_loss=False)
    assert full._prepare_rows(data, "train rows")["labels"] == prepared["input_ids"]
    assert full._prepare_rows(data, "eval rows", scoring=True)["labels"] == prepared["labels"]


def test_messages_scored_on_the_last_assistant_turn(tmp_path, chat_tokenizer):
    trainer = sft_trainer(tmp_path, chat_tokenizer)
    data = rows("messages", "rev", n=2)
    scored = trainer._prepare_rows(data, "eval rows", scoring=True)
    for raw, ids, labels in zip(data, scored["input_ids"], scored["labels"]):
        answer = chat_tokenizer.decode([i for i, l in zip(ids, labels) if l != -100])
        assert answer.split() == raw["messages"][-1]["content"].split() + ["<eos>"]
    bad = Dataset.from_dict({"messages": [[{"role": "user", "content": "a b"}]]})
    with pytest.raises(ValueError, match=r"Row 0 of the eval rows must end with an 'assistant' message"):
        trainer._prepare_rows(bad, "eval rows", scoring=True)


@pytest.mark.parametrize("name", ["replay", "ewc"])
def test_peft_config_lora(tmp_path, chat_tokenizer, name):
    from peft import LoraConfig, PeftModel

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = sft_trainer(tmp_path, chat_tokenizer, [build_strategy(name)], peft_config=config)
    assert isinstance(trainer.model, PeftModel)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.fit(stream("prompt_completion"))
    assert ACTED[name](trainer.strategies[0], trainer)
    after = dict(trainer.model.named_parameters())
    assert all((after[n] == v).all() for n, v in frozen.items())  # only the adapters trained


def test_config_carries_the_continual_fields(tmp_path):
    from clm_hf import ContinualTrainingArguments
    from clm_hf.sft import ContinualSFTConfig

    shared = set(ContinualTrainingArguments.__dataclass_fields__) - set(ContinualTrainingArguments.__mro__[1].__dataclass_fields__)
    assert shared <= set(ContinualSFTConfig.__dataclass_fields__)
    with pytest.raises(ValueError, match="eval_metrics has unknown metric"):
        ContinualSFTConfig(output_dir=str(tmp_path), use_cpu=True, eval_metrics=["bogus"])


def test_import_clm_hf_never_imports_trl_and_missing_trl_names_the_extra():
    code = ("import sys, clm_hf; assert 'trl' not in sys.modules\n"
            "sys.modules['trl'] = None\n"
            "try:\n    import clm_hf.sft\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'clm-hf[trl]'" in out


def test_lazy_top_level_names():
    import clm_hf
    from clm_hf import sft

    assert clm_hf.ContinualSFTTrainer is sft.ContinualSFTTrainer and clm_hf.ContinualSFTConfig is sft.ContinualSFTConfig
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        clm_hf.Nope  # noqa: B018


def test_assistant_only_loss_trains_on_assistant_turns(tmp_path):
    from clm_hf.tasks import build_tokenizer

    tok = build_tokenizer(extra_tokens=["user", "assistant"])
    tok.chat_template = (  # {% generation %} marks the assistant tokens for TRL's assistant mask
        "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant : {% generation %}{{ m['content'] }} <eos> "
        "{% endgeneration %}{% else %}{{ m['role'] }} : {{ m['content'] }} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}")
    trainer = sft_trainer(tmp_path, tok, [build_strategy("replay")], assistant_only_loss=True)
    data = rows("messages", "copy", n=2)
    prepared = trainer._prepare_rows(data, "train rows")
    for raw, ids, labels in zip(data, prepared["input_ids"], prepared["labels"]):
        assert tok.decode([i for i, l in zip(ids, labels) if l != -100]).split() == raw["messages"][1]["content"].split() + ["<eos>"]
    assert trainer.fit(stream("messages")).num_trained == 2


def test_checkpoints_and_resume(tmp_path, chat_tokenizer):
    """Mid-task Trainer checkpoints (SFTTrainer writes a model card there) and the continual state resume."""
    trainer = sft_trainer(tmp_path, chat_tokenizer, [build_strategy("ewc")], save_strategy="steps", save_steps=1,
                          save_continual_state=True)
    trainer.fit(stream("prompt_completion"))
    run = tmp_path / "run"
    assert (run / "continual").is_dir() and list((run / "task-001").glob("checkpoint-*/continual_state"))
    again = sft_trainer(tmp_path, chat_tokenizer, [build_strategy("ewc")], save_continual_state=True)
    results = again.fit(stream("prompt_completion"), resume_from_checkpoint=True)
    assert [t.task_id for t in again.tasks] == list(TASKS) and results.num_trained == 2
    assert len(again.strategies[0].terms) > 0  # the Fisher came back from the checkpoint


# --- recipes and the CLI build ContinualSFTTrainer (`trainer: sft`) ----------------------------------------
def sft_recipe(tmp_path, **training) -> dict:
    """Two tasks of question/reply JSONL rows (mapped to prompt/completion), a tiny GPT-2, `trainer: sft`."""
    files = {}
    for task in TASKS:
        for split, n in (("train", 8), ("eval", 4)):
            data = rows("prompt_completion", task, n).rename_columns({"prompt": "question", "completion": "reply"})
            files[task, split] = str(tmp_path / f"{task}_{split}.jsonl")
            data.to_json(files[task, split])
    return {
        "trainer": "sft",
        "model": {"arch": "gpt2"},
        "tasks": [{"name": t, "prompt_column": "question", "completion_column": "reply",
                   "train": {"path": "json", "data_files": files[t, "train"]},
                   "eval": {"path": "json", "data_files": files[t, "eval"]}} for t in TASKS],
        "strategies": [{"name": "replay", "buffer_size": 8}],
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 4,
                     "max_length": 32, "use_cpu": True, "report_to": "none", "disable_tqdm": True,
                     "save_continual_state": False, "eval_before_training": False, **training},
    }


def test_recipe_trainer_sft_builds_the_sft_trainer_with_sft_config_fields(tmp_path):
    from clm_hf.recipe import run_recipe
    from clm_hf.sft import ContinualSFTConfig, ContinualSFTTrainer

    recipe = sft_recipe(tmp_path, packing=True, packing_strategy="wrapped", completion_only_loss=False)
    results, trainer = run_recipe(recipe)
    assert type(trainer) is ContinualSFTTrainer and isinstance(trainer.args, ContinualSFTConfig)
    assert trainer.args.packing and trainer.args.packing_strategy == "wrapped" and trainer.args.completion_only_loss is False
    assert results.task_names == list(TASKS) and results.num_trained == 2
    assert len(trainer.strategies[0].buffer) > 0  # replay acted inside the SFT trainer


def test_cli_train_with_trainer_sft_writes_results(tmp_path, capsys):
    import yaml

    from clm_hf.cli import main
    from clm_hf.results import ContinualResults

    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(sft_recipe(tmp_path, completion_only_loss=True)))
    assert main(["train", str(path), "--training.output_dir", str(tmp_path / "cli")]) == 0
    results = ContinualResults.load(tmp_path / "cli" / "results.json")
    assert results.task_names == list(TASKS) and results.num_trained == 2
    assert "exact_match" in capsys.readouterr().out


def test_recipe_sft_errors_are_one_clear_line(tmp_path, monkeypatch, capsys):
    import yaml

    from clm_hf.cli import main

    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(sft_recipe(tmp_path)))
    assert main(["train", str(path), "--trainer", "sftt"]) == 2
    assert "trainer must be one of continual, sft, got str 'sftt'. Did you mean 'sft'?" in capsys.readouterr().err
    # An SFTConfig field needs `trainer: sft`: the continual trainer's arguments do not have it.
    assert main(["train", str(path), "--trainer", "continual"]) == 2
    assert "Unknown key 'max_length' in training" in capsys.readouterr().err
    assert main(["train", str(path), "--training.packin", "true"]) == 2
    assert "Did you mean 'packing'?" in capsys.readouterr().err
    # Without TRL: the error names the extra, before any model or data is loaded.
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "clm_hf.sft")
    assert main(["train", str(path)]) == 2
    assert "needs TRL: pip install 'clm-hf[trl]'" in capsys.readouterr().err


def _long_rows(prompts: list[str], completions: list[str]) -> Dataset:
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def test_eval_rows_are_never_truncated_or_dropped_and_too_long_rows_are_named(tmp_path, chat_tokenizer):
    """TRL truncates to max_length and drops rows left with no supervised token: scoring rows skip that, so every
    row is scored on its whole answer; one longer than the model's positions is refused, naming it."""
    trainer = sft_trainer(tmp_path, chat_tokenizer, max_length=8)
    data = _long_rows(["a b =", "c d =", "a b c d a b c d a b c d =", "d c b a d c b a d c ="],
                      [" b a", " d c", " d c", " a b"])
    scored = trainer._prepare_rows(data, "eval dataset of task 't'", scoring=True)
    whole = sft_trainer(tmp_path, chat_tokenizer, max_length=None)._prepare_rows(data, "eval rows", scoring=True)
    assert len(scored) == 4 and scored["labels"] == whole["labels"]
    assert max(len(r) for r in scored["input_ids"]) > 8
    positions = trainer.model.config.max_position_embeddings
    too_long = _long_rows(["a b =", " ".join(["a"] * positions) + " ="], [" b a", " a"])
    with pytest.raises(ValueError, match=rf"Row 1 of the eval dataset of task 't' has \d+ tokens, but the model has "
                                         rf"only {positions} positions"):
        trainer._prepare_rows(too_long, "eval dataset of task 't'", scoring=True)


def test_training_rows_truncated_or_dropped_by_trl_are_counted_in_a_warning(tmp_path, chat_tokenizer, caplog):
    trainer = sft_trainer(tmp_path, chat_tokenizer, max_length=8)
    data = _long_rows(["a b ="] * 4 + ["a b c d a b c d a b ="] * 2 + ["a ="] * 2,
                      [" b a"] * 4 + [" d c"] * 2 + [" a b c d a b c d"] * 2)
    with caplog.at_level("WARNING", logger="clm_hf"):
        prepared = trainer._prepare_rows(data, "train dataset of task 't'")
    # The long prompts leave nothing supervised within 8 tokens (dropped); the long answers are cut (kept).
    assert len(prepared) == 6 and max(len(r) for r in prepared["input_ids"]) == 8
    assert ("TRL's preparation of the train dataset of task 't' (8 rows given) truncated 4 row(s) longer than "
            "max_length=8 (truncation_mode='keep_start') and dropped 2 row(s) left with no supervised token; 6 rows "
            "train") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clm_hf"):  # nothing cut: nothing said
        sft_trainer(tmp_path, chat_tokenizer, max_length=32)._prepare_rows(data, "train dataset of task 't'")
    assert "TRL's preparation" not in caplog.text


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packed_rows_with_no_supervised_token_are_dropped_and_counted(strategy, tmp_path, chat_tokenizer, caplog):
    """Prompts longer than max_length leave packed rows made of prompt tokens only (bfd: the cut long row; wrapped:
    a split row's prompt chunk). TRL drops such rows only when it does not pack: they carry no loss, so they are
    dropped too and counted in the warning, never an error naming a packed row the user cannot find."""
    data = _long_rows(["a b ="] * 4 + ["a b c d a b c d a b ="] * 2, [" b a"] * 4 + [" d c"] * 2)
    trainer = sft_trainer(tmp_path, chat_tokenizer, max_length=8, packing=True, packing_strategy=strategy)
    with caplog.at_level("WARNING", logger="clm_hf"):
        packed = trainer._prepare_rows(data, "train dataset of task 't'")
    assert all(any(label != -100 for label in row) for row in packed["labels"])
    found = re.search(rf"truncated (\d+) row\(s\) longer than max_length=8 \(packing_strategy='{strategy}'\) and "
                      rf"dropped (\d+) packed row\(s\) left with no supervised token; {len(packed)} packed rows train",
                      caplog.text)
    assert found, caplog.text
    assert int(found.group(1)) == (2 if strategy == "bfd" else 0) and int(found.group(2)) >= 1
    assert "no supervised label" not in caplog.text  # the row check saw no unsupervised packed row
    # Only prompt tokens were dropped: wrapped keeps every answer token, bfd those of the rows it did not cut.
    whole = sft_trainer(tmp_path, chat_tokenizer, max_length=None)._prepare_rows(data, "train rows")
    answers = [sum(label != -100 for label in row) for row in whole["labels"]]
    kept = sum(sum(label != -100 for label in row) for row in packed["labels"])
    assert kept == (sum(answers[:4]) if strategy == "bfd" else sum(answers))
