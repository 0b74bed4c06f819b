"""Per-task scoring batches rows by length (few pad tokens computed) and gives the same per-row
scores, in the dataset's order, as scoring the rows in their own order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clm_hf import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments
from clm_hf.data import ContinualDataCollator
from clm_hf.evaluation import TaskScorer, evaluate_lm, length_sorted_order
from clm_hf.tasks import make_task, tokenize_for_causal_lm, tokenize_for_seq2seq
from tests.conftest import small_args


def _mixed_rows(tokenizer, n=24):
    """Rows of 10-16 tokens from two tasks, shuffled so that lengths are mixed along the dataset."""
    from datasets import concatenate_datasets

    rows = concatenate_datasets([tokenize_for_causal_lm(make_task(name, n // 2, seed=3), tokenizer)
                                 for name in ("copy", "reverse")])
    rows = rows.shuffle(seed=0)
    assert len(set(map(len, rows["input_ids"]))) > 2  # the test needs rows of several lengths
    return rows


def _count_positions(model):
    """Forward pre-hook counting the input positions (pads included) every forward pass computes."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].numel()),
                                             with_kwargs=True)
    return seen, handle


def test_length_sorted_order_is_longest_first_and_stable():
    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [[1], [1, 2, 3], [1, 2], [4, 5, 6], [7]]})
    assert length_sorted_order(rows) == [1, 3, 2, 0, 4]
    # select() index mappings are honoured (lengths of the selected rows, in their new order).
    assert length_sorted_order(rows.select([4, 2, 1])) == [2, 1, 0]
    seq2seq = Dataset.from_dict({"input_ids": [[1, 2], [1, 2], [1]], "labels": [[1], [1, 2, 3], [1, 2, 3, 4]]})
    assert length_sorted_order(seq2seq, seq2seq=True) == [1, 0, 2]
    with pytest.raises(KeyError, match="'input_ids'"):
        length_sorted_order(Dataset.from_dict({"text": ["a"]}))


def test_sorted_batches_give_the_same_per_row_scores_in_the_dataset_order(make_model, tokenizer):
    model, rows = make_model("gpt2"), _mixed_rows(tokenizer)
    collator = ContinualDataCollator(tokenizer.pad_token_id)
    per_row = {}
    for sort in (True, False):
        scorer = TaskScorer()
        evaluate_lm(model, rows, collator, batch_size=5, sort_by_length=sort, scorer=scorer)
        per_row[sort] = scorer.per_row()
    # One row at a time: no padding, and the dataset's order by construction.
    alone = TaskScorer()
    evaluate_lm(model, rows, collator, batch_size=1, sort_by_length=False, scorer=alone)
    for key, value in alone.per_row().items():
        for sort in (True, False):  # summed float32 NLLs of ~20: equal to float rounding (relative 1e-6)
            assert torch.allclose(per_row[sort][key].double(), value.double(), rtol=1e-6, atol=0), (key, sort)
    assert per_row[True]["tokens"].tolist() == [sum(x != -100 for x in r[1:]) for r in rows["labels"]]


def test_trainer_scoring_batches_by_length_and_keeps_the_dataset_order(tmp_path, make_model, tokenizer):
    rows = _mixed_rows(tokenizer)
    answers = [[t for t in r[1:] if t != -100] for r in rows["labels"]]
    batch = 5
    # The fewest positions any batching of these rows can compute: batches of the sorted lengths.
    lengths = sorted(map(len, rows["input_ids"]), reverse=True)
    fewest = sum(batch_lengths[0] * len(batch_lengths)
                 for batch_lengths in (lengths[i : i + batch] for i in range(0, len(lengths), batch)))
    runs = {}
    for sort in (True, False):
        seen_references, seen_labels = [], []

        def references(predictions, refs):
            seen_references.extend(refs)
            return 0.0

        def compute_metrics(prediction):
            seen_labels.extend(prediction.label_ids.tolist())
            return {"rows": float(len(prediction.label_ids))}

        model = make_model("gpt2")
        trainer = ContinualCausalLMTrainer(
            model=model, processing_class=tokenizer, task_metrics={"refs": references}, compute_metrics=compute_metrics,
            args=small_args(tmp_path / str(sort), per_device_eval_batch_size=batch, continual_eval_sort_by_length=sort))
        positions, handle = _count_positions(model)
        try:
            scores = trainer.evaluate_task(rows)
        finally:
            handle.remove()
        runs[sort] = scores
        assert seen_references == answers  # the dataset's order, whatever the batching
        # compute_metrics' label_ids: each dataset row in its place, right-padded with -100.
        assert [r[: len(lab)] for r, lab in zip(seen_labels, rows["labels"])] == list(rows["labels"])
        assert all(t == -100 for r, lab in zip(seen_labels, rows["labels"]) for t in r[len(lab):])
        if sort:
            assert sum(positions) == fewest
        else:
            assert sum(positions) > fewest  # lengths are mixed: unsorted batches carry pads
    for key in ("exact_match", "token_accuracy", "rows"):
        assert runs[True][key] == runs[False][key]
    assert runs[True]["loss"] == pytest.approx(runs[False]["loss"], abs=1e-6)


def test_seq2seq_scoring_sorted_matches_unsorted(tmp_path, make_model, tokenizer):
    rows = tokenize_for_seq2seq(make_task("reverse", 20, seed=2), tokenizer).shuffle(seed=1)
    model = make_model("t5")
    scores = {}
    for sort in (True, False):
        trainer = ContinualSeq2SeqTrainer(model=model, processing_class=tokenizer, args=small_args(
            tmp_path / str(sort), per_device_eval_batch_size=6, continual_eval_sort_by_length=sort,
            args_class=ContinualSeq2SeqTrainingArguments))
        scores[sort] = trainer.evaluate_task(rows)
    assert scores[True]["exact_match"] == scores[False]["exact_match"]
    assert np.isclose(scores[True]["loss"], scores[False]["loss"], atol=1e-6, rtol=0)


def test_eval_throughput_benchmark_smoke(tmp_path):
    """benchmarks/eval_throughput.py runs (tiny sizes; no timing assertion) and reports every method."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("bench_eval_throughput", folder / "eval_throughput.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        report = module.main(["--models", "tiny", "--rows", "8", "--repeats", "1", "--stream-tasks", "2",
                              "--stream-train-rows", "16", "--stream-eval-rows", "8", "--output", str(tmp_path / "r.json")])
    finally:
        sys.path.remove(str(folder))
    row = report["side_by_side"][0]
    for method in module.METHODS:
        assert row[f"{method}_tokens_per_s"] > 0 and len(row["seconds"][method]) == 1
    # Scored before training and after each of the 2 tasks, every task each time.
    assert report["stream"]["evaluations"] == 3 and report["stream"]["task_scorings"] == 6
    assert 0 < report["stream"]["evaluation_s"] < report["stream"]["total_s"]
    assert json.loads((tmp_path / "r.json").read_text())["side_by_side"][0]["tokens"] == row["tokens"]


def test_prompt_logits_are_skipped_with_the_same_scores(make_model, tokenizer):
    """Causal LMs: the LM head runs only from the batch's first answer token on; per-row scores equal."""
    from torch import nn

    model, rows = make_model("gpt2"), _mixed_rows(tokenizer)
    collator = ContinualDataCollator(tokenizer.pad_token_id)
    head_positions = []
    handle = model.lm_head.register_forward_hook(lambda m, i, out: head_positions.append(out.shape[0] * out.shape[1]))
    per_row = {}
    try:
        for skip in (True, False):
            head_positions.clear()
            scorer = TaskScorer()
            evaluate_lm(model, rows, collator, batch_size=5, skip_prompt_logits=skip, scorer=scorer)
            per_row[skip] = (scorer.per_row(), sum(head_positions))
    finally:
        handle.remove()
    for key, value in per_row[False][0].items():
        assert torch.allclose(per_row[True][0][key].double(), value.double(), rtol=1e-6, atol=0), key
    # Prompts are about half of these rows: the head computes far fewer positions.
    assert per_row[True][1] < 0.8 * per_row[False][1]

    class NoLogitsToKeep(nn.Module):
        """A model whose forward does not take logits_to_keep: run whole, logits sliced."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    wrapped, scorer = NoLogitsToKeep(model), TaskScorer()
    evaluate_lm(wrapped, rows, collator, batch_size=5, scorer=scorer)
    assert torch.allclose(scorer.per_row()["nll"].double(), per_row[False][0]["nll"].double(), rtol=1e-6, atol=0)


def test_trainer_skips_prompt_logits_unless_compute_metrics_needs_them(tmp_path, make_model, tokenizer):
    rows = _mixed_rows(tokenizer)
    model = make_model("gpt2")
    head, inputs = [], []
    model.lm_head.register_forward_hook(lambda m, i, out: head.append(out.shape[0] * out.shape[1]))
    model.register_forward_pre_hook(lambda m, a, k: inputs.append(k["input_ids"].numel()), with_kwargs=True)
    scores = {}
    for name, compute_metrics in (("trimmed", None), ("whole", lambda prediction: {"n": 1.0})):
        head.clear(), inputs.clear()
        trainer = ContinualCausalLMTrainer(model=model, processing_class=tokenizer, compute_metrics=compute_metrics,
                                           args=small_args(tmp_path / name, per_device_eval_batch_size=5))
        scores[name] = trainer.evaluate_task(rows)
        if compute_metrics is None:
            assert sum(head) < 0.8 * sum(inputs)
        else:  # compute_metrics receives predictions for every position, as from Trainer.evaluate
            assert sum(head) == sum(inputs)
    for key in ("exact_match", "token_accuracy"):
        assert scores["trimmed"][key] == scores["whole"][key]
    assert scores["trimmed"]["loss"] == pytest.approx(scores["whole"]["loss"], rel=1e-6)
