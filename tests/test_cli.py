"""The CLI, YAML recipes, real loading paths (from_pretrained, load_dataset on local files), demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clm_hf.cli import main
from clm_hf.recipe import apply_overrides, build_task_stream, load_recipe, validate_recipe
from clm_hf.results import ContinualResults
from clm_hf.strategies.base import strategies_from_specs

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").rglob("*.yaml") if "accelerate" not in p.parent.name)
FAST = ["--tasks.num_train", "16", "--tasks.num_eval", "8", "--training.num_train_epochs", "1",
        "--training.disable_tqdm", "true"]


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(p.parents[1])) for p in RECIPES])
def test_every_recipe_parses_and_matches_the_code(path):
    recipe = load_recipe(path)
    validate_recipe(recipe)
    strategies_from_specs(recipe.get("strategies") or [])  # unknown names/options would raise
    from clm_hf import ContinualTrainingArguments

    if recipe.get("trainer") == "sft":  # `training` is then a ContinualSFTConfig (TRL's SFTConfig fields)
        pytest.importorskip("trl")
        from clm_hf.sft import ContinualSFTConfig

        ContinualSFTConfig(**{**recipe["training"], "use_cpu": True})  # bf16: true needs a GPU here
    else:
        ContinualTrainingArguments(**recipe["training"])  # every training key is a real field
    if "lora" in recipe["model"]:
        from clm_hf.recipe import lora_config

        lora_config(recipe["model"]["lora"])  # every key is a peft.LoraConfig field


def test_overrides_use_dotted_keys_and_yaml_values():
    recipe = {"strategies": [{"name": "ewc", "ewc_lambda": 1.0}], "training": {}}
    out = apply_overrides(recipe, ["--strategies.0.ewc_lambda", "5", "--training.report_to=none"])
    assert out["strategies"][0]["ewc_lambda"] == 5 and out["training"]["report_to"] == "none"
    assert recipe["strategies"][0]["ewc_lambda"] == 1.0  # the original is untouched
    with pytest.raises(ValueError, match="unknown section 'trainig'"):
        apply_overrides(recipe, ["--trainig.x", "1"])
    with pytest.raises(ValueError, match="not an index"):
        apply_overrides(recipe, ["--strategies.3.x", "1"])
    with pytest.raises(ValueError, match="Did you mean 'training'"):
        validate_recipe({"model": {}, "tasks": {}, "trainng": {}})


def test_train_command_runs_a_recipe_with_overrides(tmp_path, capsys):
    out = tmp_path / "ewc"
    code = main(["train", str(RECIPES[0].parent.parent / "ewc" / "tiny_gpt2.yaml"), *FAST,
                 "--strategies.0.ewc_lambda", "7", "--training.output_dir", str(out)])
    assert code == 0
    results = ContinualResults.load(out / "results.json")
    assert results.task_names == ["copy", "shift", "rotate"] and results.num_trained == 3
    assert results.metadata["strategies"][0]["ewc_lambda"] == 7
    assert "exact_match" in capsys.readouterr().out
    # resuming a finished run trains nothing more and keeps the results
    assert main(["train", str(RECIPES[0].parent.parent / "ewc" / "tiny_gpt2.yaml"), *FAST,
                 "--strategies.0.ewc_lambda", "7", "--resume", str(out)]) == 0
    assert ContinualResults.load(out / "results.json").matrix() == results.matrix()


def test_recipe_loads_a_local_pretrained_model_and_local_json_data(tmp_path, make_model, tokenizer):
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    from clm_hf.tasks import make_task

    files = {}
    for name in ("copy", "reverse"):
        for split, seed in (("train", 0), ("eval", 1)):
            path = tmp_path / f"{name}_{split}.jsonl"
            make_task(name, 12, seed=seed).to_json(path)
            files[(name, split)] = str(path)
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": n, "train": {"path": "json", "data_files": files[(n, "train")]},
                   "eval": {"path": "json", "data_files": files[(n, "eval")]}} for n in ("copy", "reverse")],
        "strategies": [{"name": "replay", "buffer_size": 8}],
        "training": {"output_dir": str(tmp_path / "run"), "num_train_epochs": 1, "report_to": "none",
                     "save_strategy": "no", "disable_tqdm": True, "per_device_train_batch_size": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    results = ContinualResults.load(tmp_path / "run" / "results.json")
    assert results.task_names == ["copy", "reverse"] and results.num_trained == 2


def test_recipe_task_errors():
    with pytest.raises(ValueError, match="appears twice"):
        build_task_stream([{"name": "a", "train": {"path": "json", "data_files": "x"}}] * 2)
    with pytest.raises(ValueError, match="Unknown task suite"):
        build_task_stream({"suite": "glue"})


def test_demo_and_report_commands(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--strategies", "plain,replay", "--output-dir", str(out), "--quick", "--report-to", "none"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # A newcomer sees the Trainer's progress bars, not those of datasets' internal steps.
    for bar in ("Flattening the indices", "Saving the dataset", "Casting the dataset", "Map", "Tokenizing", "Filter"):
        assert bar not in captured.err, bar
    assert "comparison" in printed and "plain" in printed and "replay" in printed
    for name in ("plain", "replay"):
        assert (out / name / "results.json").is_file()
        assert (out / name / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "comparison.png").is_file()
    (out / "plain" / "heatmap.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "plain" / "heatmap.png").is_file()
    comparison = (out / "comparison.md").read_text()
    assert "BWT" in comparison and "replay" in comparison


def test_demo_rejects_an_unknown_strategy_with_a_suggestion(capsys):
    assert main(["demo", "--strategy", "replai", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clm-hf: error: ") and "Did you mean 'replay'" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="Did you mean 'replay'"):  # --traceback: the exception itself
        main(["--traceback", "demo", "--strategy", "replai", "--quick"])


def test_results_json_is_plain_json_and_report_to_none_logs_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--strategies", "plain", "--output-dir", str(out), "--quick", "--report-to", "none"])
    data = json.loads((out / "plain" / "results.json").read_text())
    assert data["task_names"] == ["copy", "shift", "rotate"]
    assert not (out / "mlruns").exists() and not (out / "tensorboard").exists()
    assert not list(out.rglob("events.out.tfevents.*")) and not (out / "plain" / "runs").exists()
    assert "MLflow" not in capsys.readouterr().out


def test_demo_auto_logs_one_named_mlflow_run_and_tensorboard_folder_per_strategy(tmp_path, monkeypatch, capsys):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE",
                "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "demo"
    assert main(["demo", "--strategies", "plain,ewc", "--output-dir", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    uri = (out / "mlruns").absolute().as_uri()
    assert f"--backend-store-uri {uri}" in printed and f"tensorboard --logdir {out / 'tensorboard'}" in printed
    # The demo's settings were for its own run only.
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert mlflow.active_run() is None

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("clm-hf-demo").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["ewc", "plain"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "cl/task/copy/exact_match")] == [0, 2, 4, 6]
        assert client.get_metric_history(run.info.run_id, "cl/acc")
    ewc = next(r for r in runs if r.info.run_name == "ewc")
    assert ewc.data.tags["clm_hf.strategies"] == "ewc"
    assert {f.path for f in client.list_artifacts(ewc.info.run_id, "continual")} >= {"continual/results.json"}

    for name in ("plain", "ewc"):
        events_files = list((out / "tensorboard" / name).glob("events.out.tfevents.*"))
        assert events_files, name
        events = EventAccumulator(str(out / "tensorboard" / name), size_guidance={"scalars": 0})
        events.Reload()
        assert "cl/acc" in events.Tags()["scalars"]
    assert not (out / "plain" / "runs").exists()  # no second TensorBoard folder under the strategy's output


def test_demo_auto_skips_a_tracker_that_is_missing_or_broken(tmp_path, monkeypatch, caplog, capsys):
    from clm_hf import tracking

    for key in ("MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking, "available_trackers", lambda: ["tensorboard"])  # as if mlflow were not installed
    import transformers.integrations as integrations

    def broken(self, *args, **kwargs):
        raise ImportError("tensorboard is broken")

    monkeypatch.setattr(integrations.TensorBoardCallback, "__init__", broken)
    out = tmp_path / "demo"
    with caplog.at_level("INFO", logger="clm_hf.demo"):
        assert main(["demo", "--strategies", "plain", "--output-dir", str(out), "--quick"]) == 0
    messages = caplog.text
    assert "mlflow is not installed" in messages and "clm-hf[mlflow]" in messages
    assert "tensorboard is installed but cannot be used" in messages and "tensorboard is broken" in messages
    assert (out / "plain" / "results.json").is_file()
    assert not (out / "mlruns").exists() and not list(out.rglob("events.out.tfevents.*"))
    assert "No tracker installed" in capsys.readouterr().out


def test_demo_rejects_an_unknown_tracker(capsys):
    assert main(["demo", "--quick", "--report-to", "wandb"]) == 2
    assert capsys.readouterr().err.startswith("clm-hf: error: ")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``clm-hf`` in a fresh interpreter, on this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "clm_hf.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=120)


@pytest.mark.parametrize("problem", ["missing_file", "bad_yaml", "bad_value", "bad_override", "unknown_section"])
def test_user_errors_are_one_line_and_exit_code_2(tmp_path, problem):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {arch: gpt2}\ntasks: {suite: synthetic}\ntraining: {learning_rate: fast}\n")
    args = {
        "missing_file": [str(tmp_path / "nope.yaml")],
        "bad_yaml": [str(tmp_path / "broken.yaml")],
        "bad_value": [str(recipe)],
        "bad_override": [str(recipe), "--trainig.learning_rate", "1e-3"],
        "unknown_section": [str(recipe), "--training.learning_rate", "1e-3", "--modle.arch", "gpt2"],
    }[problem]
    (tmp_path / "broken.yaml").write_text("model: {arch: [gpt2\n")
    done = _cli("train", *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clm-hf: error: "), done.stderr
    assert "Traceback" not in done.stderr
    expected = {"missing_file": "does not exist", "bad_yaml": "while parsing", "bad_value": "training.learning_rate",
                "bad_override": "trainig", "unknown_section": "modle"}[problem]
    assert expected in lines[0]


def test_an_internal_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import clm_hf.recipe

    def broken(*args, **kwargs):
        raise KeyError("a bug, not the user's mistake")

    monkeypatch.setattr(clm_hf.recipe, "load_recipe", broken)
    with pytest.raises(KeyError):
        main(["train", str(tmp_path / "r.yaml")])


def test_help_shows_the_override_syntax_without_importing_torch():
    for args in (["--help"], ["train", "--help"]):
        done = _cli(*args)
        assert done.returncode == 0 and "--section.key value" in done.stdout
        assert "--training.learning_rate 1e-3" in done.stdout
    code = ("import sys\nfrom clm_hf.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'matplotlib') if m in sys.modules)\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


def test_train_shows_the_trainers_progress_bars_not_datasets_bars(tmp_path, capsys):
    import datasets

    fast = [a for a in FAST if a not in ("--training.disable_tqdm", "true")]
    assert main(["train", str(ROOT / "recipes" / "replay" / "tiny_gpt2.yaml"), *fast,
                 "--training.output_dir", str(tmp_path / "run"), "--training.report_to", "none"]) == 0
    err = capsys.readouterr().err
    assert "eval copy" in err and "eval rotate" in err  # per-task scoring, the Trainer's tqdm style
    # datasets' bars (map, cast, save_to_disk, flatten_indices) count "examples/s"; none is shown
    assert "examples/s" not in err and "Tokenizing" not in err
    assert datasets.is_progress_bar_enabled()  # switched back on after the command


def test_recipe_model_lora_trains_adapters_only(tmp_path, capsys):
    from peft import PeftModel

    import clm_hf.recipe
    from clm_hf.recipe import load_recipe, run_recipe

    path = ROOT / "recipes" / "ewc" / "tiny_gpt2.yaml"
    lora = ["--model.lora", "{r: 4, lora_alpha: 8, target_modules: [c_attn], lora_dropout: 0.0}"]
    recipe = load_recipe(path, [*FAST, *lora, "--training.output_dir", str(tmp_path / "run"), "--training.report_to",
                                "none", "--tasks.names", "[copy, shift]"])
    base = clm_hf.recipe.build_model_and_tokenizer({k: v for k, v in recipe["model"].items() if k != "lora"})[0]
    results, trainer = run_recipe(recipe)
    assert isinstance(trainer.model, PeftModel) and results.num_trained == 2
    assert trainer.model.peft_config["default"].r == 4 and trainer.model.peft_config["default"].task_type == "CAUSAL_LM"
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    # The frozen base is the model the recipe builds (seeded), untouched by two tasks of EWC training.
    after = trainer.model.get_base_model().state_dict()
    for name, value in base.state_dict().items():
        key = next(k for k in after if k.replace(".base_layer", "") == name)
        assert (after[key] == value).all(), name
    # A wrong LoRA key fails before any model is built, with a suggestion.
    assert main(["train", str(path), "--model.lora", "{rank: 4}"]) == 2
    assert "Unknown key 'rank' in model.lora." in capsys.readouterr().err


# --- review je, finding 5: a bad strategy option and a folder holding another run are user errors --------------
def test_bad_strategy_option_and_a_taken_output_dir_are_one_line_and_exit_2(tmp_path, capsys):
    recipe = RECIPES[0].parent.parent / "ewc" / "tiny_gpt2.yaml"
    out = tmp_path / "run"
    assert main(["train", str(recipe), *FAST, "--training.output_dir", str(out),
                 "--strategies.0.ewc_lambda", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clm-hf: error: strategies[0].ewc_lambda: ") and len(err.splitlines()) == 1, err
    assert "'abc'" in err
    # A folder that holds another run's complete checkpoint: refused, naming resume / overwrite_output_dir.
    from clm_hf.state import MANIFEST

    (out / "continual" / "task-000").mkdir(parents=True)
    (out / "continual" / "task-000" / MANIFEST).write_text("{}")
    assert main(["train", str(recipe), *FAST, "--training.output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clm-hf: error: output_dir ") and "already holds another run" in err, err
    assert len(err.splitlines()) == 1 and "--resume" in err


def test_a_strategy_type_error_that_names_no_option_keeps_its_traceback(tmp_path, monkeypatch):
    import clm_hf.strategies.base

    def broken(specs):
        raise TypeError("unsupported operand type(s): a bug, not the user's mistake")

    monkeypatch.setattr(clm_hf.strategies.base, "strategies_from_specs", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["train", str(RECIPES[0].parent.parent / "ewc" / "tiny_gpt2.yaml"), *FAST,
              "--training.output_dir", str(tmp_path / "run")])
