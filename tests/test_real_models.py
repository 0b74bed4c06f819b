"""The real-model recipes (recipes/real/*.yaml) run offline: the same file, through the same CLI code,
on a twin (a Qwen2 model built from its config, local JSONL files in the Hub datasets' own layouts).
See docs/real_models.md and benchmarks/real_twin.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")  # the real recipe uses `trainer: sft`

ROOT = Path(__file__).resolve().parent.parent
REAL = sorted((ROOT / "recipes" / "real").glob("*.yaml"))
# Sizes only: 8/4 rows a file, one step a task, 4 generated tokens; everything else is the recipe's.
SMALL = ["--training.max_steps", "1", "--training.generation_max_new_tokens", "4", "--training.use_cpu", "true",
         "--training.disable_tqdm", "true", "--strategies.1.fisher_samples", "8"]


def _twin():
    spec = importlib.util.spec_from_file_location("real_twin", ROOT / "benchmarks" / "real_twin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def twin():
    return _twin()


def test_there_is_a_real_recipe():
    assert [p.name for p in REAL] == ["qwen2.5-0.5b-instruct-lora.yaml"]


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_real_recipe_runs_offline_on_its_twin(tmp_path, twin, path, capsys, monkeypatch):
    from peft import PeftModel

    import clm_hf.recipe
    from clm_hf.cli import main
    from clm_hf.recipe import load_recipe
    from clm_hf.results import ContinualResults
    from clm_hf.sft import ContinualSFTTrainer

    built = []  # the trainer the CLI's run_recipe builds, kept to look at
    run_recipe = clm_hf.recipe.run_recipe
    monkeypatch.setattr(clm_hf.recipe, "run_recipe", lambda *a, **k: built.append(run_recipe(*a, **k)) or built[-1])

    recipe = load_recipe(path)
    assert "/" in recipe["model"]["name_or_path"]  # a Hub id, replaced below by the twin's folder
    out = tmp_path / "run"
    overrides = twin.twin_overrides(path, tmp_path / "twin") + SMALL
    assert main(["train", str(path), *overrides, "--training.output_dir", str(out)]) == 0, capsys.readouterr().err
    results = ContinualResults.load(out / "results.json")
    tasks = [t["name"] for t in recipe["tasks"]]
    assert results.task_names == tasks and results.num_trained == len(tasks)
    assert results.reference_names == list(recipe["reference"])
    # The general-ability set is scored before training and after every task; generated text is scored too.
    assert len(results.reference_curve("humaneval", "loss")) == len(tasks) + 1
    assert all(v is not None for v in results.reference_curve("humaneval", "loss"))
    assert all(v is not None for v in results.matrix("gen_rouge_l")[-1])
    # The trainer and the adapters the recipe asks for.
    trainer = built[0][1]
    assert type(trainer) is ContinualSFTTrainer and isinstance(trainer.model, PeftModel)
    config = trainer.model.peft_config["default"]
    assert config.r == recipe["model"]["lora"]["r"]
    assert sorted(config.target_modules) == sorted(recipe["model"]["lora"]["target_modules"])
    assert [s.name for s in trainer.strategies] == [s["name"] for s in recipe["strategies"]]


@pytest.mark.parametrize("broken, message", [
    (["--tasks.0.prompt_column", "query"], "prompt_column: the train dataset of task 'gsm8k' has no column 'query'"),
    (["--tasks.0.completion_column", "answer_text"], "has no column 'answer_text'"),
    (["--reference.humaneval.completion_column", "solution"], "reference set 'humaneval' has no column 'solution'"),
])
def test_twin_fails_when_the_recipe_mapping_is_wrong(tmp_path, twin, broken, message, capsys):
    from clm_hf.cli import main

    path = REAL[0]
    overrides = twin.twin_overrides(path, tmp_path / "twin", num_train=2, num_eval=2) + SMALL
    assert main(["train", str(path), *overrides, *broken]) == 2
    assert message in capsys.readouterr().err


def test_twin_refuses_a_dataset_without_an_offline_layout(tmp_path, twin):
    import yaml

    recipe = yaml.safe_load(REAL[0].read_text())
    recipe["tasks"][1]["train"]["path"] = "someone/unknown"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(KeyError, match="No offline layout for the Hub dataset 'someone/unknown'"):
        twin.twin_overrides(path, tmp_path / "twin")
