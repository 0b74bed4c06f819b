"""The data path's checks: rows that cannot be trained or scored, empty splits, layouts that lose to another,
and a user's data collator (clm_hf.data, clm_hf.layouts, clm_hf.evaluation, clm_hf.buffer)."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from datasets import Dataset

from clm_hf.buffer import ReservoirBuffer
from clm_hf.data import ContinualDataCollator, UserCollator, validate_lm_dataset
from clm_hf.evaluation import TaskScorer, evaluate_lm
from clm_hf.layouts import tokenize_for_causal_lm, tokenize_rows
from clm_hf.tasks import make_task

from conftest import make_trainer, small_args


class _Oracle(torch.nn.Module):
    """Predicts the next input token: every answer is right, so exact_match is 1.0 on any row that has one."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(is_encoder_decoder=False, vocab_size=vocab_size)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        logits = torch.nn.functional.one_hot(torch.roll(input_ids, -1, dims=1), self.config.vocab_size).float() * 10
        return types.SimpleNamespace(logits=logits + self.w)


def _fit(tmp_path, make_model, tokenizer, task: dict) -> None:
    make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], max_steps=1, save_continual_state=False).fit({"qa": task})


# --- rows with nothing to read or score (review M1) -------------------------------------------------------------
def test_a_row_with_no_supervised_token_is_refused_before_it_lowers_exact_match(tokenizer):
    rows = tokenize_for_causal_lm(make_task("copy", 4), tokenizer)
    masked = rows.map(lambda r, i: {"labels": [-100] * len(r["labels"])} if i in (1, 3) else {}, with_indices=True)
    collator = ContinualDataCollator(tokenizer.pad_token_id)
    # Why it must be refused: the row counts in exact_match's denominator and can never be right.
    oracle = _Oracle(len(tokenizer))
    assert evaluate_lm(oracle, rows, collator)["exact_match"] == 1.0
    assert evaluate_lm(oracle, masked, collator)["exact_match"] == 0.5
    validate_lm_dataset(rows, what="eval dataset of task 'qa'", vocab_size=len(tokenizer), causal=True)
    with pytest.raises(ValueError, match=r"Row 1 of the eval dataset of task 'qa' has no supervised label \(every "
                                         r"label is -100\); 2 of its 4 rows have none"):
        validate_lm_dataset(masked, what="eval dataset of task 'qa'", vocab_size=len(tokenizer), causal=True)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_empty_rows_of_either_split_name_the_row_count_and_task(split, tmp_path, make_model, tokenizer):
    good = make_task("copy", 8)
    empty_text = Dataset.from_dict({"text": ["copy : a b = a b", "", "copy : c = c", ""]})
    task = {"train": good, "eval": good, split: empty_text}
    with pytest.raises(ValueError, match=rf"Row 1 of the {split} dataset of task 'qa' has no tokens \(0 input_ids\); "
                                         r"2 of its 4 rows are empty"):
        _fit(tmp_path, make_model, tokenizer, task)

def _unsupervised_rows(tokenizer, rows: tuple[int, ...]) -> Dataset:
    """Tokenized copy rows whose labels at `rows` are all -100, as a prompt cut by truncation=True leaves them."""
    tokenized = tokenize_for_causal_lm(make_task("copy", 8), tokenizer)
    return tokenized.map(lambda r, i: {"labels": [-100] * len(r["labels"])} if i in rows else {}, with_indices=True)


def test_an_eval_row_with_no_supervised_label_is_refused_naming_the_row_count_and_task(tmp_path, make_model,
                                                                                        tokenizer):
    good = make_task("copy", 8)
    task = {"train": good, "eval": _unsupervised_rows(tokenizer, (5,))}
    with pytest.raises(ValueError, match=r"Row 5 of the eval dataset of task 'qa' has no supervised label .*"
                                         r"1 of its 8 rows have none"):
        _fit(tmp_path, make_model, tokenizer, task)


def test_training_rows_with_no_supervised_label_are_kept_with_one_warning(tmp_path, make_model, tokenizer, caplog):
    """A pre-tokenized training set made with truncation=True has rows whose answer was cut off: they give no loss,
    as in the Trainer, so they are kept (no data lost) and counted in one warning naming the first one."""
    unsupervised = _unsupervised_rows(tokenizer, (2, 5))
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], max_steps=1, save_continual_state=False)
    with caplog.at_level(logging.WARNING, logger="clm_hf"):
        prepared = trainer._prepare_rows(unsupervised, "train dataset of task 'qa'")
    assert prepared["labels"] == unsupervised["labels"]  # kept as given
    warnings = [r.getMessage() for r in caplog.records if "no supervised label" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(
        "clm-hf: row 2 of the train dataset of task 'qa' has no supervised label (every label is -100); 2 of its 8 "
        "rows have none. They are kept but give no loss")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clm_hf"):
        trainer.fit({"qa": {"train": unsupervised, "eval": make_task("copy", 4)}})
    assert "row 2 of the train dataset of task 'qa' has no supervised label" in caplog.text
    assert [t.task_id for t in trainer.tasks] == ["qa"]  # it trained


# --- empty splits name the task and split (review M2) -----------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "eval"])
def test_an_empty_split_names_the_task_and_split(split, tmp_path, make_model, tokenizer):
    good = make_task("copy", 8)
    task = {"train": good, "eval": good, split: good.select([])}
    with pytest.raises(ValueError, match=rf"Cannot tokenize the {split} dataset of task 'qa': it is empty \(0 rows\)"):
        _fit(tmp_path, make_model, tokenizer, task)


def test_empty_scoring_and_buffer_errors_name_the_rows(tokenizer, make_model):
    empty = tokenize_for_causal_lm(make_task("copy", 2), tokenizer).select([])
    collator = ContinualDataCollator(tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"Cannot evaluate \(eval qa\): the dataset is empty \(0 rows\)"):
        evaluate_lm(make_model("gpt2"), empty, collator, description="eval qa")
    with pytest.raises(ValueError, match=r"Cannot evaluate \(eval dataset of task 'qa'\): the dataset is empty"):
        TaskScorer(what="eval dataset of task 'qa'").result()
    with pytest.raises(ValueError, match=r"Cannot add the rows of task 'qa' to the buffer: the dataset is empty"):
        ReservoirBuffer(capacity=4).add(empty, task_id="qa")


# --- columns of a layout that loses to another (review L9) ------------------------------------------------------
def test_columns_of_a_losing_layout_are_named_in_one_warning(tokenizer, caplog):
    both = Dataset.from_dict({"prompt": ["copy : a b ="], "completion": ["a b"], "answer": ["b a"], "text": ["x"]})
    with caplog.at_level(logging.WARNING, logger="clm_hf"):
        rows = tokenize_rows(both, tokenizer, seq2seq=False, what="train dataset of task 'qa'")
    warned = [r.getMessage() for r in caplog.records if "more than one layout" in r.getMessage()]
    assert len(warned) == 1, warned
    assert ("the train dataset of task 'qa' has the columns of more than one layout; it is read as the "
            "'prompt_completion' layout (columns ['prompt', 'completion']), so column(s) ['answer', 'text'] are "
            "dropped") in warned[0]
    assert tokenizer.convert_ids_to_tokens([t for t in rows[0]["labels"] if t != -100]) == ["a", "b", "<eos>"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clm_hf"):
        tokenize_rows(both.remove_columns(["answer", "text"]), tokenizer, seq2seq=False)
        # Tokenized rows keep the text they were made from: that is no second layout worth a word.
        tokenize_rows(rows.add_column("text", ["x"]), tokenizer, seq2seq=False)
    assert "more than one layout" not in caplog.text


# --- a user's data collator (review L10) ------------------------------------------------------------------------
ROWS = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 6], "labels": [-100, 6]}]


def test_a_collator_that_needs_labels_keeps_them():
    def needs_labels(features):
        return {"labels": torch.tensor([f["labels"][0] for f in features])}  # KeyError without them

    collator = UserCollator(needs_labels)
    collator.probe(ROWS)
    assert collator.builds_labels is False


def test_a_collator_bug_on_rows_without_labels_is_raised_not_taken_for_a_need_for_labels():
    def buggy(features):
        if "labels" not in features[0]:
            return {"x": 1 / 0}  # a bug in the path for label-less rows
        return {"labels": torch.tensor([f["labels"] for f in features])}

    with pytest.raises(ZeroDivisionError):
        UserCollator(buggy).probe(ROWS)


def test_a_collator_failing_with_and_without_labels_raises_with_both_errors():
    def broken(features):
        return {"labels": torch.tensor([f["missing"] for f in features])}

    with pytest.raises(KeyError, match="missing") as info:
        UserCollator(broken).probe(ROWS)
    assert isinstance(info.value.__cause__, KeyError)  # the error on the label-less rows, chained


def test_the_trainer_names_a_user_collator_bug(tmp_path, make_model, tokenizer):
    from clm_hf import ContinualCausalLMTrainer


    def buggy(features):
        if "labels" not in features[0]:
            raise RuntimeError("bug in my collator")
        return ContinualDataCollator(tokenizer.pad_token_id)(features)

    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path, max_steps=1),
                                       processing_class=tokenizer, data_collator=buggy)
    text = Dataset.from_dict({"text": ["copy : a b = a b"] * 4})
    with pytest.raises(ValueError, match=r"The data_collator \(function\) fails on two rows of the train dataset of "
                                         r"task 'qa': RuntimeError: bug in my collator"):
        trainer.fit({"qa": {"train": text}})
