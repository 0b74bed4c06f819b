"""Generation-based scores (clm_hf.generation_eval) through the trainer's generation_metrics option."""

from __future__ import annotations

import pytest
from conftest import small_args
from datasets import Dataset

from clm_hf import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments
from clm_hf.generation_eval import evaluate_generation, split_rows
from clm_hf.tasks import make_suite, tokenize_for_causal_lm

GEN = ["exact_match", "rouge_l", "bleu"]


@pytest.fixture(scope="module")
def copy_stream():
    # Prompts of 2-4 symbols: different prompt lengths in one batch, so causal prompts must be left-padded.
    return make_suite(["copy"], num_train=256, num_eval=64, min_len=2, max_len=4, seed=0)


def test_generated_exact_match_equals_teacher_forced_causal(tmp_path, make_model, tokenizer, copy_stream):
    # Greedy decoding of a right answer reproduces it token by token, so on a word-level tokenizer the
    # generated exact match must equal the teacher-forced one, row for row.
    trainer = ContinualCausalLMTrainer(
        model=make_model("gpt2"), processing_class=tokenizer,
        args=small_args(tmp_path, num_train_epochs=12, per_device_train_batch_size=16, logging_steps=50,
                        save_continual_state=False, generation_metrics=GEN, continual_eval_batch_size=16))
    results = trainer.fit(copy_stream)
    teacher_forced, generated = results.matrix("exact_match")[0][0], results.matrix("gen_exact_match")[0][0]
    assert teacher_forced >= 0.6  # trained well, yet not every row right: the equality is not trivial
    assert generated == teacher_forced
    assert results.baseline["gen_exact_match"] == [0.0]  # scored before training too
    assert 0 < results.matrix("gen_bleu")[0][0] <= 1 and results.matrix("gen_rouge_l")[0][0] >= generated
    assert results.higher_is_better["gen_bleu"] is True


def test_generated_exact_match_equals_teacher_forced_seq2seq(tmp_path, make_model, tokenizer, copy_stream):
    trainer = ContinualSeq2SeqTrainer(
        model=make_model("t5"), processing_class=tokenizer,
        args=small_args(tmp_path, args_class=ContinualSeq2SeqTrainingArguments, num_train_epochs=12,
                        per_device_train_batch_size=16, logging_steps=50, save_continual_state=False,
                        generation_metrics=["exact_match"], primary_metric="gen_exact_match"))
    results = trainer.fit(copy_stream)
    teacher_forced, generated = results.matrix("exact_match")[0][0], results.matrix("gen_exact_match")[0][0]
    assert teacher_forced > 0
    assert generated == teacher_forced
    assert results.summary()["acc"] == generated  # gen_exact_match can be the primary metric


def test_user_scorer_and_beam_search(tmp_path, make_model, tokenizer, copy_stream):
    seen = {}

    def lengths(predictions, references):
        seen["pairs"] = list(zip(predictions, references))
        return {"same_length": sum(len(p.split()) == len(r.split()) for p, r in seen["pairs"]) / len(predictions)}

    trainer = ContinualCausalLMTrainer(
        model=make_model("gpt2"), processing_class=tokenizer, generation_scorer=lengths,
        args=small_args(tmp_path, max_steps=4, save_continual_state=False, eval_before_training=False,
                        generation_num_beams=2, generation_max_new_tokens=3, primary_metric="gen_same_length"))
    results = trainer.fit({"copy": {"train": copy_stream["copy"]["train"].select(range(32)),
                                    "eval": copy_stream["copy"]["eval"].select(range(8))}})
    assert "gen_same_length" in results.scores and "gen_exact_match" not in results.scores
    assert len(seen["pairs"]) == 8
    assert all(len(p.split()) <= 3 for p, _ in seen["pairs"])  # generation_max_new_tokens caps the answer
    assert [r for _, r in seen["pairs"]] == copy_stream["copy"]["eval"].select(range(8))["answer"]


def test_split_rows_and_errors(tokenizer, make_model):
    rows = tokenize_for_causal_lm(Dataset.from_dict({"prompt": ["copy : a b ="], "answer": ["a b"]}), tokenizer)
    prompts, references = split_rows(rows, seq2seq=False)
    assert tokenizer.convert_ids_to_tokens(prompts[0]) == ["copy", ":", "a", "b", "="]
    assert tokenizer.convert_ids_to_tokens(references[0]) == ["a", "b", "<eos>"]
    full = tokenize_for_causal_lm(Dataset.from_dict({"prompt": ["copy : a ="], "answer": ["a"]}), tokenizer,
                                  answer_only_loss=False)
    with pytest.raises(ValueError, match="Row 0 of the eval dataset of task 'x' has no prompt"):
        evaluate_generation(make_model("gpt2"), full, tokenizer, what="eval dataset of task 'x'")
    with pytest.raises(ValueError, match="need a tokenizer"):
        evaluate_generation(make_model("gpt2"), rows, None)


def test_generation_option_is_checked_up_front(tmp_path, make_model, tokenizer):
    with pytest.raises(ValueError, match="unknown metric.*'rouge'"):
        small_args(tmp_path, generation_metrics=["rouge"])
    assert small_args(tmp_path, generation_metrics="exact_match, bleu").generation_metrics == ["exact_match", "bleu"]
    with pytest.raises(ValueError, match="generation_num_beams must be an int >= 1"):
        small_args(tmp_path, generation_num_beams=0)
    with pytest.raises(ValueError, match="need processing_class"):
        ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path, generation_metrics=["bleu"]))
    with pytest.raises(Exception, match="primary_metric is 'gen_bleu'"):
        ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer,
                                 args=small_args(tmp_path, primary_metric="gen_bleu"))
