"""Scores land in the right place: columns follow training order, and only answer tokens are scored."""

from __future__ import annotations

import pytest

from clm_hf import ContinualCausalLMTrainer
from clm_hf.tasks import make_task, tokenize_for_causal_lm
from tests.conftest import small_args


def _trainer(tmp_path, model, tokenizer, **overrides):
    return ContinualCausalLMTrainer(model=model, args=small_args(tmp_path, **overrides), processing_class=tokenizer)


def _run(tmp_path, model, tokenizer, register_order):
    """The issue's reproduction: eval sets registered in ``register_order``, then train copy -> reverse."""
    trainer = _trainer(tmp_path, model, tokenizer, save_continual_state=False, learning_rate=1e-2)
    for name in register_order:
        trainer.add_eval_task(name, make_task(name, 16, seed=1))
    for name in ("copy", "reverse"):
        trainer.train_task(make_task(name, 32), task_id=name)
    return trainer.results


def test_columns_follow_training_order_whatever_the_registration_order(tmp_path, make_model, tokenizer):
    reverse_first = _run(tmp_path / "a", make_model("gpt2"), tokenizer, ["reverse", "copy"])
    in_order = _run(tmp_path / "b", make_model("gpt2"), tokenizer, ["copy", "reverse"])
    # Column j is the j-th trained task, so the labels and every metric match the in-order run.
    assert reverse_first.task_names == ["copy", "reverse"]
    for metric in ("exact_match", "loss"):
        assert reverse_first.matrix(metric) == in_order.matrix(metric)
        assert reverse_first.summary(metric) == in_order.summary(metric)
    # BWT is what the first trained task (copy) lost: its column, row 1 minus row 0.
    loss = reverse_first.matrix("loss")
    assert reverse_first.summary("loss")["bwt"] == pytest.approx(-(loss[1][0] - loss[0][0]))
    assert reverse_first.format_table("loss").splitlines()[2].startswith("after copy")


def test_answer_only_loss_false_still_scores_the_answer_only(tmp_path, make_model, tokenizer):
    from clm_hf.evaluation import evaluate_lm

    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, answer_only_loss=False, save_continual_state=False)
    raw_eval = make_task("copy", 16, seed=1)
    trainer.train_task(make_task("copy", 32), raw_eval, task_id="copy")
    # Training follows the flag: every position is supervised, the prompt included ...
    assert -100 not in trainer.tasks[0].train_dataset[0]["labels"]
    # ... but the eval rows are scored on the answer tokens only.
    answer_only = tokenize_for_causal_lm(raw_eval, tokenizer, answer_only_loss=True)
    assert trainer._eval_sets["copy"]["labels"] == answer_only["labels"]
    expected = evaluate_lm(trainer.model, answer_only, trainer.data_collator, metrics=["exact_match", "loss"])
    assert trainer.results.matrix("exact_match")[0][0] == pytest.approx(expected["exact_match"])
    assert trainer.results.matrix("loss")[0][0] == pytest.approx(expected["loss"])
