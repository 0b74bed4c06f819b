"""Reference eval sets (general-ability retention): scored before training and after every task, never trained."""

from __future__ import annotations

import json

import pytest
from conftest import AtTaskStep, assert_same_params, make_trainer, param_snapshot
from datasets import Dataset

from clm_hf.evaluation import evaluate_lm
from clm_hf.plots import write_report
from clm_hf.results import ContinualResults, comparison_table
from clm_hf.tasks import make_task


def _general_text() -> Dataset:
    task = make_task("sort", 12, seed=5)
    return Dataset.from_dict({"text": [f"{p} {a}" for p, a in zip(task["prompt"], task["answer"])]})


def _reference_sets() -> dict:
    return {"general": _general_text(), "held_out": make_task("rotate", 12, seed=6)}


def _stream(tiny_stream):
    return {name: tiny_stream[name] for name in ("copy", "reverse")}


def test_reference_sets_are_scored_every_stage_but_never_trained(tmp_path, make_model, tokenizer, tiny_stream):
    options = dict(max_steps=3, save_continual_state=False, generation_metrics=["exact_match"])
    with_ref = make_trainer(tmp_path / "with", make_model("gpt2"), tokenizer, [], **options)
    results = with_ref.fit(_stream(tiny_stream), reference_sets=_reference_sets())
    plain = make_trainer(tmp_path / "plain", make_model("gpt2"), tokenizer, [], **options)
    plain_results = plain.fit(_stream(tiny_stream))

    # Never trained on, and scoring it changes nothing: same weights, same task scores, same ACC/BWT.
    assert_same_params(param_snapshot(with_ref), param_snapshot(plain), atol=0)
    assert results.scores == plain_results.scores and results.summaries() == plain_results.summaries()
    assert results.task_names == ["copy", "reverse"]  # no reference column among the tasks

    # Scored before the first task and after each one.
    assert sorted(results.reference) == ["general", "held_out"]
    assert len(results.reference["general"]["perplexity"]) == 2
    assert results.reference_baseline["general"]["perplexity"] is not None
    # Whole-text rows get the loss-based scores only; prompt/answer rows also exact match and gen_*.
    assert "exact_match" not in results.reference["general"] and "gen_exact_match" not in results.reference["general"]
    assert {"exact_match", "gen_exact_match", "perplexity"} <= set(results.reference["held_out"])
    # The last row is the final model's score on those rows.
    rows = with_ref._reference_sets["general"]
    final = evaluate_lm(with_ref.model, rows, with_ref.data_collator, metrics=["perplexity"])
    assert results.reference["general"]["perplexity"][-1] == pytest.approx(final["perplexity"], rel=1e-6)
    summary = results.reference_summary()["general"]
    assert summary["metric"] == "perplexity" and summary["change"] == pytest.approx(summary["final"] - summary["before"])

    # results.json, the printed tables and the plots carry the reference columns.
    saved = json.loads((tmp_path / "with" / "run" / "results.json").read_text())
    assert saved["reference"]["general"]["perplexity"] == results.reference["general"]["perplexity"]
    assert ContinualResults.load(tmp_path / "with" / "run" / "results.json") == results
    table = results.format_table()
    assert "ref general (perplexity)" in table.splitlines()[0] and "ref held_out" in table.splitlines()[0]
    assert f"{results.reference_baseline['general']['perplexity']:.3f}" in table.splitlines()[2]
    compared = comparison_table({"with": results, "plain": plain_results})
    assert "ref general (perplexity)" in compared and "->" in compared.splitlines()[2]
    assert (tmp_path / "with" / "run" / "reference.png") in write_report(tmp_path / "with" / "run")


def test_reference_column_survives_a_resume(tmp_path, make_model, tokenizer, tiny_stream):
    stream = _stream(tiny_stream)
    references = {"general": _general_text()}
    first = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], max_steps=3)
    first.add_callback(AtTaskStep(first, task_index=1, step=2))
    with pytest.raises(KeyboardInterrupt):
        first.fit(stream, reference_sets=references)
    before = list(first.results.reference_curve("general"))
    assert len(before) == 2  # baseline and after the first task

    resumed = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], max_steps=3)
    results = resumed.fit(stream, resume_from_checkpoint=True, reference_sets=references)
    curve = results.reference_curve("general")
    assert curve[:2] == before and len(curve) == 3 and curve[2] is not None


def test_reference_set_errors(tmp_path, make_model, tokenizer):
    from clm_hf import ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments
    from conftest import small_args

    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [])
    with pytest.raises(ValueError, match="Row 1 of the reference set 'general' has no text"):
        trainer.add_reference_set("general", Dataset.from_dict({"text": ["a b", "  "]}))
    with pytest.raises(TypeError, match="reference_sets must be a dict"):
        trainer.fit({"copy": {"train": make_task("copy", 8)}}, reference_sets=[_general_text()])
    t5 = ContinualSeq2SeqTrainer(model=make_model("t5"), processing_class=tokenizer,
                                 args=small_args(tmp_path / "t5", args_class=ContinualSeq2SeqTrainingArguments))
    with pytest.raises(ValueError, match="encoder-decoder cannot score as a whole text"):
        t5.add_reference_set("general", _general_text())


def test_results_reference_fields_are_validated():
    with pytest.raises(ValueError, match="one score per trained task"):
        ContinualResults(task_names=["a", "b"], scores={"exact_match": [[1.0, 0.0]]},
                         reference={"general": {"perplexity": [3.0, 4.0]}})
    res = ContinualResults(task_names=["a", "b"])
    res.add_row({"exact_match": [1.0, 0.0]}, reference={"general": {"perplexity": 3.0}})
    res.add_row({"exact_match": [0.5, 1.0]})  # a stage without the set: None, rows stay aligned
    assert res.reference["general"]["perplexity"] == [3.0, None]
    assert res.summary() == ContinualResults(task_names=["a", "b"], scores=res.scores).summary()


def test_recipe_reference_section(tmp_path):
    from clm_hf.recipe import run_recipe
    from clm_hf.validation import RecipeError

    general = tmp_path / "general.jsonl"
    general.write_text("\n".join(json.dumps({"text": t}) for t in _general_text()["text"]) + "\n")
    recipe = {
        "model": {"arch": "gpt2"},
        "tasks": {"suite": "synthetic", "names": ["copy"], "num_train": 16, "num_eval": 8},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "report_to": "none",
                     "save_strategy": "no", "disable_tqdm": True, "use_cpu": True},
        "reference": {"general": {"path": "json", "data_files": str(general)},
                      "held_out": {"synthetic": "rotate", "num_rows": 8}},
    }
    results, _ = run_recipe(recipe)
    assert results.reference_names == ["general", "held_out"]
    assert len(results.reference_curve("general")) == 2 and None not in results.reference_curve("general")
    with pytest.raises(RecipeError, match="reference.general needs 'path'"):
        run_recipe({**recipe, "reference": {"general": {"data_files": str(general)}}})
