"""Bad input gets a clear error that names the problem and the fix, and loses nothing saved.

Cases already covered elsewhere (see docs/reliability.md): missing column / empty dataset / all
labels -100 / token ids outside the vocabulary (tests/test_trainer.py::test_bad_datasets_get_clear_errors),
a task id used twice and ``use_task`` with an unknown task (test_task_id_used_twice_is_an_error),
config-dict typos (test_config_dict_errors_name_the_key), refusing changed strategies on resume
(test_resume_refuses_changed_strategies), PackNet's capacity message (tests/test_packnet.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

from clm_hf import EWC, ContinualCausalLMTrainer, Replay, Strategy
from clm_hf import state as ckpt
from clm_hf.strategies.base import build_strategy, strategies_from_specs
from clm_hf.strategies.packnet import PackNet, PackNetCapacityError
from clm_hf.tasks import make_task, tokenize_for_causal_lm
from tests.conftest import AtTaskStep, small_args


def _trainer(tmp_path, model, tokenizer, strategies=(), **overrides):
    return ContinualCausalLMTrainer(model=model, args=small_args(tmp_path, **overrides), processing_class=tokenizer,
                                    strategies=list(strategies))


def _rows(tokenizer, kind="copy", n=16, seed=0):
    return tokenize_for_causal_lm(make_task(kind, n, seed=seed), tokenizer)


# --- datasets ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rows, message",
    [
        (Dataset.from_dict({"input_ids": ["a b c"], "labels": ["a b c"]}), "column 'input_ids' of type .*must hold lists of integer"),
        (Dataset.from_dict({"input_ids": [[5, 6]], "labels": [[0.5, 1.5]]}), "column 'labels' .*integer token ids"),
        (Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6]], "labels": [[5, 6, 7], [6]]}),
         "Row 1 .* has 2 input_ids but 1 labels.*one label per token, -100"),
    ],
    ids=["text-not-token-ids", "float-labels", "causal-length-mismatch"],
)
def test_unexpected_schema_is_named_with_the_fix(rows, message, tmp_path, make_model, tokenizer):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer)
    with pytest.raises(ValueError, match=message):
        trainer.train_task(rows, task_id="bad")
    assert trainer.tasks == []


def test_buffer_rows_that_do_not_fit_the_new_task(tmp_path, make_model, tokenizer):
    first = _rows(tokenizer, "copy")
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [Replay(buffer_size=8)])
    trainer.train_task(first, task_id="a")
    saved = tmp_path / "run" / "continual" / "task-000"
    # A new column the buffer's rows lack: refused before any training of the new task.
    extra = _rows(tokenizer, "reverse").add_column("source", ["web"] * 16)
    with pytest.raises(ValueError, match=r"Task 'b' has column\(s\) \['source'\] that the replay buffer's rows lack.*"
                                         "Tokenize every task the same way"):
        trainer.train_task(extra, task_id="b")
    # A column the buffer's rows have and the task lacks: the buffer names it.
    fewer = _rows(tokenizer, "reverse").remove_columns("attention_mask")
    fresh = _trainer(tmp_path / "2", make_model("gpt2"), tokenizer, [Replay(buffer_size=8)])
    fresh.train_task(first, task_id="a")
    with pytest.raises(ValueError, match=r"do not match the rows already in the buffer: missing columns \['attention_mask'\]"):
        fresh.train_task(fewer, task_id="b")
    ckpt.verify_manifest(saved)  # what was saved is intact
    assert json.loads((saved / "continual_state.json").read_text())["tasks"][0]["task_id"] == "a"


# --- strategies and their settings ------------------------------------------------------------------
def test_unknown_strategy_or_option_suggests_the_closest():
    with pytest.raises(ValueError, match="Unknown strategy.*Did you mean 'replay'"):
        build_strategy("replai")
    with pytest.raises(ValueError, match="Unknown option 'ewc_lamda'.*Did you mean 'ewc_lambda'"):
        build_strategy("ewc", ewc_lamda=1.0)
    with pytest.raises(ValueError, match="Did you mean 'prune_percentage'"):
        strategies_from_specs([{"name": "packnet", "prune_percent": 0.5}])
    with pytest.raises(ValueError, match="needs a 'name' key"):
        strategies_from_specs([{"ewc_lambda": 1.0}])


@pytest.mark.parametrize(
    "name, options, field",
    [
        ("ewc", {"ewc_lambda": -1.0}, "ewc_lambda"),
        ("ewc", {"gamma": 1.5}, "gamma"),
        ("packnet", {"prune_percentage": 0.0}, "prune_percentage"),
        ("packnet", {"prune_percentage": 1.0}, "prune_percentage"),
        ("packnet", {"prune_percentage": 1.5}, "prune_percentage"),
        ("replay", {"replay_ratio": -0.1}, "replay_ratio"),
        ("replay", {"replay_ratio": 1.5}, "replay_ratio"),
        ("replay", {"buffer_size": 0}, "buffer_size"),
        ("lwf", {"temperature": 0.0}, "temperature"),
    ],
)
def test_out_of_range_hyperparameters_name_the_field_and_range(name, options, field):
    with pytest.raises(ValueError, match=rf"{field} must be in [\[(].*got"):
        build_strategy(name, **options)


def test_packnet_out_of_capacity_keeps_every_saved_task(tmp_path, make_model, tokenizer, tiny_stream):
    packnet = PackNet(prune_percentage=0.001, retrain_epochs=0.0)
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [packnet])
    with pytest.raises(PackNetCapacityError, match="no free weight left for task 'sort'.*lower prune_percentage"):
        trainer.fit(tiny_stream)
    for index in (0, 1):  # the two tasks that fitted are saved and valid
        ckpt.verify_manifest(tmp_path / "run" / "continual" / f"task-{index:03d}")


# --- model and tokenizer -------------------------------------------------------------------------------
def test_tokenizer_larger_than_the_model_vocabulary(make_model):
    from clm_hf.tasks import build_tokenizer

    tokenizer = build_tokenizer()
    model = make_model("gpt2")
    tokenizer.add_tokens(["<new_1>", "<new_2>"])
    with pytest.raises(ValueError, match=r"tokenizer has 32 tokens but the model's input embeddings have only 30 rows"
                                         r".*resize_token_embeddings\(len\(tokenizer\)\)"):
        ContinualCausalLMTrainer(model=model, processing_class=tokenizer)
    model.resize_token_embeddings(len(tokenizer))
    ContinualCausalLMTrainer(model=model, processing_class=tokenizer)  # the fix works


# --- NaN and inf ---------------------------------------------------------------------------------------
class _PoisonAt(AtTaskStep):
    """Puts NaN into the embeddings once the given optimizer step of the given task has run."""

    def act(self) -> None:
        with torch.no_grad():
            self.trainer.model.get_input_embeddings().weight.fill_(math.nan)


@pytest.mark.parametrize(
    "settings",
    [dict(logging_steps=1, save_strategy="steps", save_steps=1),    # caught when the loss is logged
     dict(logging_steps=100, save_strategy="steps", save_steps=1),  # caught before the checkpoint is written
     dict(logging_steps=100, save_strategy="no")],                  # caught when train() returns
    ids=["at-log", "before-save", "after-train"],
)
def test_nan_model_loss_stops_with_the_step_and_term(settings, tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, **settings)
    trainer.add_callback(_PoisonAt(trainer, task_index=1, step=2))
    with pytest.raises(FloatingPointError, match=r"The model loss became nan at optimizer step 3 of task 'reverse'"
                                                  ".*Lower the learning rate"):
        trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    run = tmp_path / "run"
    ckpt.verify_manifest(run / "continual" / "task-000")  # the first task is saved and valid
    if settings["save_strategy"] == "steps":
        assert (run / "task-001" / "checkpoint-2" / "continual_state" / "manifest.json").is_file()
        assert not (run / "task-001" / "checkpoint-3").exists()  # no poisoned checkpoint


class _InfTerm(Strategy):
    name = "inf_term_test"

    def loss(self, model, inputs, outputs):
        step = self.trainer.state.global_step
        return {"bad_term": torch.tensor(math.inf if step >= 1 else 0.0)}


def test_inf_strategy_term_is_named(tmp_path, make_model, tokenizer):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [_InfTerm()], save_strategy="no")
    with pytest.raises(FloatingPointError, match="strategy loss term 'bad_term' became inf at optimizer step 2 "
                                                  "of task 'copy'.*Lower the strategy's weight"):
        trainer.train_task(_rows(tokenizer, n=32), task_id="copy")


def test_nan_fisher_is_named(tmp_path, make_model, tokenizer, monkeypatch):
    import clm_hf.strategies.ewc as ewc_module

    def nan_fisher(model, rows, **kwargs):
        return {n: torch.full_like(p, math.nan) for n, p in model.named_parameters() if p.requires_grad}

    monkeypatch.setattr(ewc_module, "estimate_fisher", nan_fisher)
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC()])
    with pytest.raises(FloatingPointError, match="EWC's Fisher for '.*' is not finite after task 'copy'"):
        trainer.train_task(_rows(tokenizer), task_id="copy")
    assert not (tmp_path / "run" / "continual").exists()  # nothing half-finished was saved as done


# --- backends ----------------------------------------------------------------------------------------
def _gradient_editing():
    names = ["packnet"]
    try:
        import clm_hf.strategies.gem  # noqa: F401

        names += ["gem", "agem"]
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("name", _gradient_editing())
def test_gradient_editing_strategy_refused_on_deepspeed(name, make_model, tokenizer, monkeypatch):
    import accelerate
    from accelerate.utils import DistributedType

    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(NotImplementedError, match=f"Strategy '{name}' .*not supported on the DeepSpeed backend.*"
                                                  "Train without DeepSpeed"):
        ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer, strategies=[build_strategy(name)])
    # loss- and data-only strategies are fine there
    ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer, strategies=[Replay(), EWC()])


# --- resuming ------------------------------------------------------------------------------------------
def test_changed_strategy_settings_resume_only_when_forced(tmp_path, make_model, tokenizer, tiny_stream, caplog):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC(ewc_lambda=10.0)]).fit({"copy": tiny_stream["copy"]})
    with pytest.raises(ValueError, match="written with strategies.*pass force_resume=True"):
        _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC(ewc_lambda=20.0)]).fit(stream, resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="force_resume cannot change the list of strategies"):
        _trainer(tmp_path, make_model("gpt2"), tokenizer, [Replay()]).fit(stream, resume_from_checkpoint=True,
                                                                          force_resume=True)
    forced = _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC(ewc_lambda=20.0)])
    with caplog.at_level("WARNING"):
        results = forced.fit(stream, resume_from_checkpoint=True, force_resume=True)
    assert "force_resume" in caplog.text and results.num_trained == 2
    assert forced.strategies[0].config.ewc_lambda == 20.0 and len(forced.strategies[0].terms) == 1


def test_cli_force_resume(tmp_path, capsys):
    from pathlib import Path

    from clm_hf.cli import main

    recipe = str(Path(__file__).parent.parent / "recipes" / "ewc" / "tiny_gpt2.yaml")
    fast = ["--tasks.num_train", "16", "--tasks.num_eval", "8", "--training.num_train_epochs", "1",
            "--training.disable_tqdm", "true"]
    out = tmp_path / "ewc"
    assert main(["train", recipe, *fast, "--tasks.names", "[copy]", "--training.output_dir", str(out)]) == 0
    with pytest.raises(SystemExit):
        main(["train", recipe, *fast, "--force-resume"])  # --force-resume needs --resume
    changed = [*fast, "--tasks.names", "[copy, reverse]", "--strategies.0.ewc_lambda", "5"]
    with pytest.raises(ValueError, match="--force-resume"):
        main(["train", recipe, *changed, "--resume", str(out)])
    assert main(["train", recipe, *changed, "--resume", str(out), "--force-resume"]) == 0
    assert json.loads((out / "results.json").read_text())["task_names"] == ["copy", "reverse"]


def test_checkpoint_of_another_format_version_is_an_error_not_skipped(tmp_path, make_model, tokenizer, tiny_stream):
    _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC()]).fit({"copy": tiny_stream["copy"]})
    saved = tmp_path / "run" / "continual" / "task-000"
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["format_version"] = 999
    (saved / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.name for p in saved.rglob("*"))
    with pytest.raises(ckpt.CheckpointVersionError, match="checkpoint format 999.*reads format 1.*Resume it with the "
                                                          "clm-hf version that wrote it"):
        _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC()]).fit(tiny_stream, resume_from_checkpoint=True)
    assert sorted(p.name for p in saved.rglob("*")) == before  # nothing overwritten or deleted


def test_resume_with_nothing_saved_says_so(tmp_path, make_model, tokenizer, tiny_stream):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing was saved there yet.*Start the run again without resuming"):
        _trainer(tmp_path, make_model("gpt2"), tokenizer).fit(tiny_stream, resume_from_checkpoint=str(tmp_path / "empty"))
