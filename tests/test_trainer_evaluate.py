"""``trainer.train()`` is continual, and evaluation is the Trainer's (issue 10, items 2 and 3).

- a direct ``train()`` trains ``train_dataset`` as the next task: strategies act, results recorded;
- ``trainer.evaluate()`` after ``fit()``, ``eval_strategy`` inside a task with eval sets given only
  to ``fit()``, ``compute_metrics`` in the per-task scores;
- per-task scoring: ``per_device_eval_batch_size``, the Trainer's autocast, no full-vocabulary
  float32 log-softmax, the same scores as the full log-softmax reference, rows split across
  2 processes and gathered (torchrun).
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from clm_hf import EWC, ContinualCausalLMTrainer, Replay
from clm_hf.evaluation import argmax_logits
from clm_hf.tasks import make_task, tokenize_task
from tests.conftest import make_trainer, small_args

ROOT = Path(__file__).resolve().parent.parent


def _rows(tokenizer, name: str, n: int, seed: int = 0):
    return tokenize_task(make_task(name, n, seed=seed), tokenizer, False, answer_only_loss=True)


# --- item 2: trainer.train() is continual ------------------------------------------------------
def test_direct_train_calls_are_tasks_with_strategies_and_results(tmp_path, make_model, tokenizer, caplog):
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer,
                           [Replay(buffer_size=8), EWC(ewc_lambda=10.0, fisher_samples=4)])
    ewc, replay = trainer.strategies[1], trainer.strategies[0]
    first = _rows(tokenizer, "copy", 16)
    assert ewc._fishers == [] and len(replay.buffer) == 0
    with caplog.at_level("WARNING", logger="clm_hf.trainer"):
        for name in ("copy", "reverse"):
            trainer.train_dataset = first if name == "copy" else _rows(tokenizer, name, 16)
            trainer.eval_dataset = _rows(tokenizer, name, 8, seed=1)
            trainer.train()
            if name == "copy":
                # The strategies acted after the first call: a Fisher was estimated, the buffer filled.
                assert ewc._fishers and float(sum(f.sum() for f in ewc._fishers)) > 0
                assert len(replay.buffer) == 8
                after_first = [f.clone() for f in ewc._fishers]
    assert [t.task_id for t in trainer.tasks] == ["task-0", "task-1"]
    assert any(not torch.equal(a, b) for a, b in zip(after_first, ewc._fishers))  # the second call's Fisher added
    # Every registered eval set scored after every call, as fit() does; results.json written.
    assert trainer.results.task_names == ["task-0", "task-1"]
    loss = trainer.results.matrix("loss")
    assert loss[0][0] is not None and loss[1][0] is not None and loss[1][1] is not None
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["task_names"] == ["task-0", "task-1"]
    # The user's rows are given back (not the replay-mixed ones), and the behaviour is logged once.
    assert trainer.train_dataset is not first and len(trainer.train_dataset) == 16
    assert sum("next task of the continual stream" in r.getMessage() for r in caplog.records) == 1


def test_direct_train_keeps_a_fixed_eval_set_as_the_first_tasks(tmp_path, make_model, tokenizer):
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], save_continual_state=False)
    trainer.eval_dataset = _rows(tokenizer, "copy", 8, seed=1)
    for name in ("copy", "reverse"):
        trainer.train_dataset = _rows(tokenizer, name, 8)
        trainer.train()
    # The same eval object again is not registered as task-1's own eval set.
    assert list(trainer._eval_sets) == ["task-0"]
    assert trainer.results.matrix("loss")[1][1] is None


def test_direct_train_refuses_what_it_cannot_do_by_name(tmp_path, make_model, tokenizer):
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [])
    with pytest.raises(ValueError, match="train_dataset"):
        trainer.train()
    trainer.train_dataset = _rows(tokenizer, "copy", 8)
    with pytest.raises(TypeError, match="trial"):
        trainer.train(trial={"lr": 1.0})
    trainer.train()
    fresh = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [])
    fresh.train_dataset = _rows(tokenizer, "reverse", 8)
    with pytest.raises(ValueError, match="from_pretrained"):
        fresh.train(resume_from_checkpoint=True)


def test_direct_train_resumes_inside_its_task(tmp_path, make_model, tokenizer):
    rows = _rows(tokenizer, "copy", 32)
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], save_strategy="steps", save_steps=2,
                           max_steps=4)
    trainer.train_dataset = rows
    trainer.train()
    checkpoint = tmp_path / "run" / "task-000" / "checkpoint-2"
    assert checkpoint.is_dir()
    again = make_trainer(tmp_path / "again", make_model("gpt2"), tokenizer, [], save_strategy="no", max_steps=4)
    again.train_dataset = rows
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    again.add_callback(Steps())
    output = again.train(resume_from_checkpoint=str(checkpoint))
    # Steps 3 and 4 only: the Trainer resumed at step 2 of the task, which is task-0 of the new run.
    assert steps == [3, 4] and output.global_step == 4
    assert [t.task_id for t in again.tasks] == ["task-0"]


# --- item 3: evaluation is the Trainer's ---------------------------------------------------------
def test_evaluate_after_fit_scores_every_task_under_its_name(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], save_continual_state=False,
                           per_device_eval_batch_size=16)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    metrics = trainer.evaluate()
    for name in ("copy", "reverse"):
        # Trainer.evaluate's mean loss over the answer tokens: the per-task loss after the last task.
        assert metrics[f"eval_{name}_loss"] == pytest.approx(trainer.results.matrix("loss")[-1][
            trainer.results.task_names.index(name)], rel=1e-4)
    # With an explicit eval set it is the plain Trainer's evaluate.
    assert set(trainer.evaluate(trainer._eval_sets["copy"])) >= {"eval_loss", "eval_runtime"}


def test_eval_strategy_steps_inside_a_task_uses_the_tasks_eval_set(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], save_continual_state=False,
                           eval_strategy="steps", eval_steps=2)
    assert trainer.eval_dataset is None
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]  # this task's own evaluations (global_step restarts per task)
    # The last in-task evaluation is the task's own eval set at the end of the task.
    assert evals[-1]["eval_loss"] == pytest.approx(trainer.results.matrix("loss")[1][1], rel=1e-4)


def test_eval_strategy_in_a_task_without_eval_set_names_the_task(tmp_path, make_model, tokenizer):
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], eval_strategy="epoch")
    with pytest.raises(ValueError, match="inside task 'copy'.*no eval set"):
        trainer.train_task(_rows(tokenizer, "copy", 8), task_id="copy")


def test_compute_metrics_lands_in_the_per_task_scores(tmp_path, make_model, tokenizer, tiny_stream):
    seen = []

    def compute_metrics(prediction):
        # Written for the plain Trainer with preprocess_logits_for_metrics=argmax: shift by one.
        predictions, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
        seen.append(predictions.shape)
        mask = labels != -100
        return {"answer_acc": float((predictions[mask] == labels[mask]).mean())}

    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path, save_continual_state=False),
                                       processing_class=tokenizer, compute_metrics=compute_metrics)
    trainer.fit({"copy": tiny_stream["copy"]})
    accuracy, reference = trainer.results.matrix("answer_acc"), trainer.results.matrix("token_accuracy")
    assert accuracy[0][0] == pytest.approx(reference[0][0])
    assert trainer.results.baseline["answer_acc"][0] == pytest.approx(trainer.results.baseline["token_accuracy"][0])
    assert seen and all(shape[0] == 16 for shape in seen)  # every eval row, padded to one length


def _reference_scores(model, rows, collator):
    """The scores as the full float32 log-softmax computed them before this change."""
    batch = collator([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    mask = labels != -100
    targets = labels.masked_fill(~mask, 0)
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0] * mask
    correct = (logits.argmax(-1) == targets) & mask
    loss = float(nll.sum()) / int(mask.sum())
    return {"exact_match": float(((correct | ~mask).all(-1) & mask.any(-1)).float().mean()),
            "token_accuracy": int(correct.sum()) / int(mask.sum()), "loss": loss, "perplexity": math.exp(loss)}


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_equal_the_full_log_softmax_reference(tmp_path, make_model, tokenizer, batch_size):
    from clm_hf.evaluation import evaluate_lm

    model = make_model("gpt2")
    rows = _rows(tokenizer, "reverse", 11, seed=3)
    trainer = make_trainer(tmp_path, model, tokenizer, [], per_device_eval_batch_size=batch_size)
    expected = _reference_scores(model, rows, trainer.data_collator)
    for scores in (trainer.evaluate_task(rows), evaluate_lm(model, rows, trainer.data_collator, batch_size=batch_size)):
        assert scores.keys() == expected.keys()
        for name, value in expected.items():
            assert scores[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_scoring_uses_per_device_eval_batch_size_and_no_full_log_softmax(tmp_path, make_model, tokenizer,
                                                                        monkeypatch):
    import clm_hf.evaluation as evaluation

    model = make_model("gpt2")
    trainer = make_trainer(tmp_path, model, tokenizer, [], per_device_eval_batch_size=3)
    rows = _rows(tokenizer, "copy", 8)
    batches, chunks = [], []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: batches.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    logsumexp = torch.logsumexp
    monkeypatch.setattr(torch, "log_softmax", lambda *a, **k: pytest.fail("full log_softmax in scoring"))
    monkeypatch.setattr(torch, "logsumexp", lambda x, *a, **k: chunks.append(x.numel()) or logsumexp(x, *a, **k))
    monkeypatch.setattr(evaluation, "LOGSUMEXP_CHUNK", 4 * model.config.vocab_size)
    trainer.evaluate_task(rows)
    hook.remove()
    assert batches == [3, 3, 2]
    # At most 4 positions' logits upcast at a time (the chunk), not the batch's.
    assert chunks and max(chunks) <= 4 * model.config.vocab_size


def test_scoring_runs_under_the_trainers_autocast(tmp_path, make_model, tokenizer):
    pytest.importorskip("accelerate")
    model = make_model("gpt2")
    trainer = make_trainer(tmp_path, model, tokenizer, [], bf16=True, use_cpu=True)
    dtypes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    scores = trainer.evaluate_task(_rows(tokenizer, "copy", 4))
    hook.remove()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert math.isfinite(scores["loss"])


@pytest.mark.slow
@pytest.mark.distributed
def test_scoring_splits_rows_across_two_processes_and_gathers_them(tmp_path, make_model, tokenizer):
    """torchrun, 2 CPU processes: each forwards about half of 7 rows; both return all 7 rows' scores."""
    from tests._launch import launch_env, run_logged, torchrun

    log = tmp_path / "two.log"
    code = run_logged(torchrun(2, "-m", "tests.scoring_driver", str(tmp_path)), log, timeout=300)
    assert code == 0, log.read_text()[-6000:]
    single = subprocess.run([sys.executable, "-m", "tests.scoring_driver", str(tmp_path / "one")], cwd=ROOT,
                            env=launch_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert [r["world_size"] for r in ranks] == [2, 2] and one["world_size"] == 1
    # The rows were split (batches of 2: 4 + 3 rows, the last batch padded by accelerate) ...
    assert [r["rows_forwarded"] for r in ranks] == [4, 4] and one["rows_forwarded"] == 7
    # ... and gathered, duplicates dropped: every rank holds the 1-process scores of all 7 rows.
    for rank in [*ranks, one]:
        # Rows batched by length, gathered across ranks: compute_metrics still sees the dataset's order.
        assert rank["labels_seen"] == rank["labels"] and len({len(r) for r in rank["labels"]}) > 1
    for rank in ranks:
        assert rank["compute_metrics_rows"] == 7
        for name, value in one["scores"].items():
            assert rank["scores"][name] == pytest.approx(value, rel=1e-5), name


def test_eval_memory_benchmark_runs_both_methods_on_the_same_rows():
    """Smoke run of benchmarks/eval_memory.py's two methods (in-process, tiny vocabulary): same loss."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_eval_memory", ROOT / "benchmarks" / "eval_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = argparse.Namespace(vocab=512, hidden=16, rows=4, seq_len=12, answer_len=4, batch=2)
    reference, scoring = module.run_one("trainer_evaluate", options), module.run_one("scoring", options)
    assert scoring["loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert scoring["peak_rss_mib"] > 0 and reference["peak_rss_mib"] > 0


def test_scoring_keeps_every_row_with_dataloader_drop_last(tmp_path, make_model, tokenizer):
    model = make_model("gpt2")
    trainer = make_trainer(tmp_path, model, tokenizer, [], per_device_eval_batch_size=3, dataloader_drop_last=True)
    rows = _rows(tokenizer, "copy", 8)
    expected = _reference_scores(model, rows, trainer.data_collator)
    assert trainer.evaluate_task(rows)["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert trainer.args.dataloader_drop_last is True


def test_scoring_leaves_the_global_rng_as_it_was(tmp_path, make_model, tokenizer):
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [])
    rows = _rows(tokenizer, "copy", 4)
    torch.manual_seed(7)
    trainer.evaluate_task(rows)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after)


# --- review je, finding 9: compute_metrics sees one format from both evaluations ------------------
def test_compute_metrics_gets_argmax_ids_from_the_trainers_evaluate_too(tmp_path, make_model, tokenizer, tiny_stream,
                                                                         caplog):
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.ndim)
        predictions, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
        mask = labels != -100
        return {"answer_acc": float((predictions[mask] == labels[mask]).mean())}

    with caplog.at_level(logging.INFO, logger="clm_hf"):
        trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer,
                                           compute_metrics=compute_metrics,
                                           args=small_args(tmp_path, save_continual_state=False, eval_strategy="steps",
                                                           eval_steps=2, eval_before_training=False))
    # Installing it changes what the Trainer's own evaluate() hands compute_metrics: said once, with the opt-out.
    said = [r for r in caplog.records if "installs clm_hf.evaluation.argmax_logits" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "receives arg-max token ids (rows, positions), not logits, in the Trainer's own evaluate()" in \
        said[0].getMessage() and "pass your own preprocess_logits_for_metrics" in said[0].getMessage()
    trainer.fit({"copy": tiny_stream["copy"]})
    in_task = [h for h in trainer.state.log_history if "eval_answer_acc" in h]
    # The Trainer's own evaluations (steps 2 and 4) and the per-task scores: ids (rows, positions) each time.
    assert len(in_task) == 2 and len(seen) == 3 and set(seen) == {2}
    # The Trainer's last evaluation and the per-task score are the same eval set on the same model.
    assert in_task[-1]["eval_answer_acc"] == pytest.approx(trainer.results.matrix("answer_acc")[0][0])
    # A preprocess_logits_for_metrics of the user's own is left alone (and nothing is said about it).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clm_hf"):
        own = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer, compute_metrics=compute_metrics,
                                       preprocess_logits_for_metrics=lambda logits, labels: logits,
                                       args=small_args(tmp_path / "own"))
    assert own.preprocess_logits_for_metrics is not argmax_logits
    assert "installs clm_hf.evaluation.argmax_logits" not in caplog.text


# --- review je, finding 1: a primary metric that never moves is named once per run ----------------
def test_a_primary_metric_that_never_moves_is_warned_about_once(tmp_path, make_model, tokenizer, tiny_stream, caplog):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], save_continual_state=False, max_steps=2)
    with caplog.at_level("WARNING", logger="clm_hf"):
        results = trainer.fit(stream)
    assert {v for row in results.matrix("exact_match") for v in row} == {0.0}  # a few steps: no answer right
    warned = [r.getMessage() for r in caplog.records if "does not move" in r.getMessage()]
    assert len(warned) == 1, warned  # after the first task, not again after the second
    assert "'exact_match'" in warned[0] and 'primary_metric="token_accuracy"' in warned[0]
    caplog.clear()
    other = make_trainer(tmp_path / "ta", make_model("gpt2"), tokenizer, [], save_continual_state=False, max_steps=2,
                         primary_metric="token_accuracy")
    with caplog.at_level("WARNING", logger="clm_hf"):
        other.fit(stream)
    assert not [r for r in caplog.records if "does not move" in r.getMessage()]


# --- review je, finding 11: eval_metrics given as one string ---------------------------------------
def test_eval_metrics_as_a_string_is_a_list_of_names(tmp_path):
    assert small_args(tmp_path, eval_metrics="exact_match").eval_metrics == ["exact_match"]
    assert small_args(tmp_path, eval_metrics="loss, token_accuracy").eval_metrics == ["loss", "token_accuracy"]
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['bleu'\]"):
        small_args(tmp_path, eval_metrics="bleu")
