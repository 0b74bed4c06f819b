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
    capsys.readouterr()
    assert main(["train", recipe, *fast, "--force-resume"]) == 2  # --force-resume needs --resume
    assert capsys.readouterr().err == "clm-hf: error: --force-resume needs --resume RUN_DIR\n"
    changed = [*fast, "--tasks.names", "[copy, reverse]", "--strategies.0.ewc_lambda", "5"]
    assert main(["train", recipe, *changed, "--resume", str(out)]) == 2  # settings changed: refused, one line
    error = capsys.readouterr().err.splitlines()[-1]  # after the tokenization progress bars
    assert error.startswith("clm-hf: error: ") and "--force-resume" in error
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


# --- recipes, config dicts and arguments: refused before any model or data is loaded -----------------
def _recipe(tmp_path, **sections):
    recipe = {"model": {"arch": "gpt2"}, "tasks": {"suite": "synthetic", "names": ["copy"], "num_train": 8, "num_eval": 4},
              "training": {"output_dir": str(tmp_path / "run"), "report_to": "none"}}
    for key, value in sections.items():
        section, _, field = key.partition("__")
        if field:
            recipe[section][field] = value
        else:
            recipe[section] = value
    return recipe


_HUB = {"path": "user/dataset"}
RECIPE_CASES = {
    "lr-not-a-number": ({"training__learning_rate": "fast"},
                        r"training.learning_rate must be a number \(float\), got str 'fast'"),
    "batch-size-not-an-int": ({"training__per_device_train_batch_size": "8x"},
                              r"training.per_device_train_batch_size must be an integer \(int\), got str '8x'"),
    "epochs-not-a-number": ({"training__num_train_epochs": "two"}, r"training.num_train_epochs must be a number"),
    "epochs-zero": ({"training__num_train_epochs": 0}, r"training.num_train_epochs must be > 0, got 0.0.*max_steps"),
    "training-typo": ({"training__num_epochs": 2},
                      r"Unknown key 'num_epochs' in training. Did you mean 'num_train_epochs'\?"),
    "bool-as-other-string": ({"training__bf16": "False"}, r"training.bf16 must be a boolean \(true or false\), got str 'False'"),
    "primary-metric-not-computed": ({"training__primary_metric": "bleu"},
                                    r"training.primary_metric is 'bleu', which this run does not compute"),
    "model-typo": ({"model__hiden_size": 32}, r"Unknown key 'hiden_size' in model. Did you mean 'hidden_size'\?"),
    "trust-remote-code-string": ({"model": {"name_or_path": "some/model", "trust_remote_code": "False"}},
                                 r"model.trust_remote_code must be a boolean \(true or false\), got str 'False'"),
    "strategies-bad-mapping": ({"strategies": {"ewc": 3}}, r"strategies.ewc must be a mapping of options"),
    "eval-hub-no-split": ({"tasks": [{"name": "a", "train": {**_HUB, "split": "train"}, "eval": {"path": "user/other"}}]},
                          r"tasks\[0\] \('a'\): the eval entry names no split, so split 'train' of 'user/other'"),
    "eval-same-rows-as-train": ({"tasks": [{"name": "a", "train": {**_HUB, "split": "train"}, "eval": dict(_HUB)}]},
                                r"tasks\[0\] \('a'\): eval loads the same rows as train"),
    "eval-same-files-as-train": ({"tasks": [{"name": "a", "train": {"path": "json", "data_files": "a.jsonl"},
                                             "eval": {"path": "json", "data_files": "a.jsonl"}}]},
                                 r"eval loads the same rows as train"),
}


@pytest.mark.parametrize("sections, message", list(RECIPE_CASES.values()), ids=list(RECIPE_CASES))
def test_bad_recipe_is_refused_before_loading(sections, message, tmp_path, monkeypatch):
    import clm_hf.recipe as recipe_module
    from clm_hf.validation import RecipeError

    def no_loading(*args, **kwargs):
        raise AssertionError("the model or the data was loaded before the recipe was checked")

    monkeypatch.setattr(recipe_module, "build_model_and_tokenizer", no_loading)
    monkeypatch.setattr("datasets.load_dataset", no_loading)
    with pytest.raises(RecipeError, match=message):
        recipe_module.run_recipe(_recipe(tmp_path, **sections))


def test_values_written_as_strings_are_converted_when_they_parse():
    from clm_hf import ContinualTrainingArguments
    from clm_hf.validation import validate_model_section, validate_strategies_section, validate_training_section

    training = validate_training_section({"learning_rate": "1e-3", "per_device_train_batch_size": "8",
                                          "num_train_epochs": "2", "bf16": "false"}, ContinualTrainingArguments)
    assert training == {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "num_train_epochs": 2.0, "bf16": False}
    assert validate_model_section({"name_or_path": "m", "trust_remote_code": "false"})["trust_remote_code"] is False
    assert validate_model_section({"arch": "gpt2", "resid_pdrop": "0.0"})["resid_pdrop"] == 0.0
    # strategies written as a mapping rather than a list
    assert validate_strategies_section({"name": "ewc", "ewc_lambda": 5}) == [{"name": "ewc", "ewc_lambda": 5}]
    assert validate_strategies_section({"ewc": {"ewc_lambda": 5}, "replay": None}) == [
        {"name": "ewc", "ewc_lambda": 5}, {"name": "replay"}]


def test_eval_files_without_split_are_scored_and_the_split_is_logged(tmp_path, caplog):
    from clm_hf.recipe import build_task_stream

    for name in ("train", "eval"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"prompt": "copy : a =", "answer": "a"}) + "\n")
    entry = {"name": "a", "train": {"path": "json", "data_files": str(tmp_path / "train.jsonl")},
             "eval": {"path": "json", "data_files": str(tmp_path / "eval.jsonl")}}
    with caplog.at_level("INFO", logger="clm_hf.recipe"):
        stream = build_task_stream([entry])
    assert len(stream["a"]["eval"]) == 1 and "scored on split 'train' of its eval data_files" in caplog.text


CONFIG_CASES = {
    "lr-fast": ({"optimizer": {"lr": "fast"}}, r"config\['optimizer'\]\['lr'\] must be a number \(float\), got str 'fast'"),
    "batch-size-text": ({"batch_size": "eight"}, r"config\['batch_size'\] must be an integer \(int\), got str 'eight'"),
    "epochs-text": ({"num_epochs": "two"}, r"config\['num_epochs'\] must be a number \(float\), got str 'two'"),
    "epochs-zero": ({"num_epochs": 0}, r"config\['num_epochs'\] must be > 0, got 0"),
    "enabled-not-a-bool": ({"continual_strategy": {"ewc": {"enabled": "no"}}},
                           r"config\['continual_strategy'\]\['ewc'\]\['enabled'\] must be a boolean"),
    "training-typo": ({"training": {"num_epochs": 2}},
                      r"Unknown key 'num_epochs' in config\['training'\]. Did you mean 'num_train_epochs'\?"),
    # Options the chosen optimizer would ignore (HF's AdamW drops optim_args, its SGD the adam_* fields).
    "momentum-with-adam": ({"optimizer": {"type": "adam", "momentum": 0.9}},
                           r"config\['optimizer'\]\['momentum'\] applies to type 'sgd' only, got type 'adam'"),
    "momentum-with-adamw": ({"optimizer": {"type": "adamw", "momentum": 0.9}},
                            r"config\['optimizer'\]\['momentum'\] applies to type 'sgd' only, got type 'adamw'"),
    "momentum-default-optim": ({"optimizer": {"momentum": 0.9}},
                               r"\['momentum'\] applies to type 'sgd' only, got optim 'adamw_torch_fused' \(no config"),
    "betas-with-sgd": ({"optimizer": {"type": "sgd", "betas": [0.9, 0.99]}},
                       r"config\['optimizer'\]\['betas'\] applies to type 'adam' or 'adamw' only, got type 'sgd'"),
    "eps-with-sgd": ({"optimizer": {"type": "SGD", "eps": 1e-6}},
                     r"config\['optimizer'\]\['eps'\] applies to type 'adam' or 'adamw' only, got type 'sgd'"),
    "eps-with-training-optim-sgd": ({"optimizer": {"eps": 1e-6}, "training": {"optim": "sgd"}},
                                    r"\['eps'\] applies to type 'adam' or 'adamw' only, got optim 'sgd'"),
    "eps-with-adafactor": ({"optimizer": {"type": "adafactor", "eps": 1e-6}},
                           r"\['eps'\] applies to type 'adam' or 'adamw' only, got type 'adafactor'"),
    "unknown-optimizer-key": ({"optimizer": {"type": "sgd", "momentom": 0.9}},
                              r"Unknown config key 'momentom' for config\['optimizer'\] \(type 'sgd'\). "
                              r"Did you mean 'momentum'\?"),
}


@pytest.mark.parametrize("config, message", list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_bad_config_dict_names_the_key(config, message, make_model):
    from clm_hf import ContinualTrainer
    from clm_hf.validation import RecipeError

    with pytest.raises(RecipeError, match=message):
        ContinualTrainer(model=make_model("gpt2"), config=config)


def test_config_dict_strings_that_parse_are_converted(make_model):
    from clm_hf.config import parse_config_dict

    kwargs, strategies = parse_config_dict({"batch_size": "8", "num_epochs": "2", "optimizer": {"lr": "1e-3"},
                                            "continual_strategy": {"ewc": {"enabled": "false"}}})
    assert kwargs == {"per_device_train_batch_size": 8, "num_train_epochs": 2.0, "learning_rate": 1e-3}
    assert strategies == []  # enabled: "false" turns EWC off


@pytest.mark.parametrize("optimizer, cls, expected", [
    ({"type": "sgd", "momentum": 0.9}, "SGD", {"momentum": 0.9}),
    ({"type": "adam", "betas": [0.8, 0.9], "eps": 1e-6}, "AdamW", {"betas": (0.8, 0.9), "eps": 1e-6}),
    ({"type": "adamw", "eps": 1e-7}, "AdamW", {"eps": 1e-7}),
    ({"betas": [0.8, 0.9]}, "AdamW", {"betas": (0.8, 0.9)}),  # no type: the default AdamW uses them
], ids=["sgd-momentum", "adam-betas-eps", "adamw-eps", "default-betas"])
def test_config_dict_optimizer_options_that_are_accepted_reach_the_optimizer(optimizer, cls, expected, tmp_path):
    from transformers import Trainer

    from clm_hf import ContinualTrainingArguments
    from clm_hf.config import parse_config_dict

    kwargs, _ = parse_config_dict({"optimizer": optimizer})
    args = ContinualTrainingArguments(output_dir=str(tmp_path), **kwargs)
    got_cls, got = Trainer.get_optimizer_cls_and_kwargs(args)
    assert got_cls.__name__ == cls and {k: got.get(k) for k in expected} == expected


def test_cli_missing_recipe_is_one_line_and_exit_code_2(tmp_path, capsys):
    from clm_hf.cli import main

    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clm-hf: error: Recipe file") and "does not exist" in err and "\n" not in err


# --- trainer arguments and rows: refused before any training --------------------------------------------
def _long_rows(n_tokens):
    return Dataset.from_dict({"input_ids": [[5] * n_tokens], "labels": [[5] * n_tokens]})


TRAINER_CASES = {
    "epochs-zero": ({"num_train_epochs": 0}, None, r"args.num_train_epochs must be > 0, got 0"),
    "primary-metric-not-computed": ({"primary_metric": "bleu"}, None,
                                    r"args.primary_metric is 'bleu', which this run does not compute"),
    "row-longer-than-positions": ({}, _long_rows(200),
                                  r"Row 0 of the train dataset of task 'bad' has 200 tokens, but the model has only 128 "
                                  r"positions"),
    "text-column-kept": ({"remove_unused_columns": False},
                         Dataset.from_dict({"input_ids": [[5, 6]], "labels": [[5, 6]], "source": ["web"]}),
                         r"train dataset of task 'bad' has a text column 'source'.*remove_unused_columns=False"),
}


@pytest.mark.parametrize("settings, rows, message", list(TRAINER_CASES.values()), ids=list(TRAINER_CASES))
def test_bad_arguments_and_rows_are_refused_before_training(settings, rows, message, tmp_path, make_model, tokenizer):
    with pytest.raises(ValueError, match=message):
        trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, **settings)
        trainer.train_task(rows, task_id="bad")
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]  # nothing trained, nothing saved


def test_primary_metric_from_task_metrics_is_accepted(tmp_path, make_model, tokenizer):
    ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path, primary_metric="bleu"),
                             processing_class=tokenizer, task_metrics={"bleu": lambda p, r: 0.0})


def test_one_display_name_for_two_task_ids_is_refused_at_registration(tmp_path, make_model, tokenizer):
    rows = _rows(tokenizer)
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer)
    with pytest.raises(ValueError, match=r"Display name\(s\) \['x'\] are used by more than one task"):
        trainer.fit([{"task_id": "a", "name": "x", "train": rows}, {"task_id": "b", "name": "x", "train": rows}])
    assert trainer.tasks == []
    trainer.add_eval_task("a", rows, task_name="x")
    with pytest.raises(ValueError, match="Task 'b' has display name 'x', which task 'a' already uses"):
        trainer.train_task(rows, task_id="b", task_name="x")
    assert trainer.tasks == []


def test_mid_task_resume_with_a_model_of_another_shape_names_the_parameter(tmp_path, make_model, tokenizer, tiny_stream):
    stream = {"copy": tiny_stream["copy"]}
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, save_strategy="steps", save_steps=2)
    trainer.add_callback(AtTaskStep(trainer, task_index=0, step=3))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(stream)
    other = _trainer(tmp_path, make_model("gpt2", hidden_size=32), tokenizer, save_strategy="steps", save_steps=2)
    with pytest.raises(ValueError, match=r"checkpoint-2 has parameter 'transformer.h.0.attn.c_attn.bias' of shape \(192,\), "
                                         r"but this model's is \(96,\): it was written by a model of another shape"):
        other.fit(stream, resume_from_checkpoint=True)


def test_zero_epochs_for_one_task_is_refused(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer)
    with pytest.raises(ValueError, match=r"train_task: num_epochs must be > 0, got 0"):
        trainer.train_task(_rows(tokenizer), task_id="a", num_epochs=0)
    with pytest.raises(ValueError, match=r"fit: num_epochs must be > 0, got 0"):
        trainer.fit(tiny_stream, num_epochs=0)
    assert trainer.tasks == []
