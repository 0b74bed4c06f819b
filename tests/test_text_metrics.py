"""The text metrics of clm_hf.text_metrics: hand-computed values and, where installed, the reference scorers."""

from __future__ import annotations

import math
import random

import pytest

from clm_hf.text_metrics import bleu, compute_text_metrics, exact_match, rouge_l


def test_exact_match_collapses_whitespace_only():
    assert exact_match(["b a", " b  a ", "B a", "a"], ["b a", "b a", "b a", "a ."]) == 0.5


def test_rouge_l_hand_computed():
    # "a b c d" vs "a c b d": LCS = 3 (a b d), P = R = 3/4 -> F1 = 0.75.
    assert rouge_l(["a b c d"], ["a c b d"]) == pytest.approx(0.75)
    # Case and punctuation are ignored as in rouge_score: "The cat, sat." == "the cat sat".
    assert rouge_l(["The cat, sat."], ["the cat sat"]) == pytest.approx(1.0)
    # Pred 2 tokens, ref 4, LCS 2: P = 1, R = 0.5 -> F1 = 2/3; averaged with an empty prediction (0).
    assert rouge_l(["x y", ""], ["x z y w", "q"]) == pytest.approx((2 / 3) / 2)


def test_bleu_hand_computed():
    # Prediction "a b c d e f", reference "a b c d e g": matches 5/6, 4/5, 3/4, 2/3, no brevity penalty.
    expected = math.exp((math.log(5 / 6) + math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3)) / 4)
    assert bleu(["a b c d e f"], ["a b c d e g"]) == pytest.approx(expected)
    # "a b x d" vs "a b c d": 1-grams 3/4, 2-grams 1/3, 3-grams 0/2 (first empty order: 1/(2*2)),
    # 4-grams 0/1 (second: 1/(4*1)).
    expected = math.exp((math.log(3 / 4) + math.log(1 / 3) + math.log(1 / 4) + math.log(1 / 4)) / 4)
    assert bleu(["a b x d"], ["a b c d"]) == pytest.approx(expected)
    # Brevity penalty over the corpus: c = 4 + 4, r = 4 + 6.
    expected = math.exp(1 - 10 / 8)
    assert bleu(["a b c d", "e f g h"], ["a b c d", "e f g h i j"]) == pytest.approx(expected)
    assert bleu(["x y z w"], ["a b c d"]) == 0.0  # no unigram match
    assert bleu(["a b"], ["a b"]) == 0.0  # no 3-gram anywhere: 0, as sacrebleu


def test_text_metric_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"references\[0\] must be a str"):
        bleu(["a"], [None])
    with pytest.raises(ValueError, match="Unknown text metric.*'rouge'"):
        compute_text_metrics(["a"], ["a"], ["rouge"])
    with pytest.raises(TypeError, match="non-string key"):
        compute_text_metrics(["a"], ["a"], [], scorer=lambda p, r: {1: 0.5})


def test_user_scorer_keys_are_added():
    scores = compute_text_metrics(["b a", "c"], ["b a", "d"], ["exact_match"],
                                  scorer=lambda p, r: {"same_length": sum(len(x) == len(y) for x, y in zip(p, r)) / len(p)})
    assert scores == {"exact_match": 0.5, "same_length": 1.0}


def _random_corpus(seed: int, rows: int = 40) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", ",", ".", "Big", "big"]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))

    references = [sentence() for _ in range(rows)]
    predictions = [ref if rng.random() < 0.2 else sentence() for ref in references]
    return predictions, references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_matches_sacrebleu(seed):
    sacrebleu = pytest.importorskip("sacrebleu")
    predictions, references = _random_corpus(seed)
    expected = sacrebleu.corpus_bleu(predictions, [references]).score / 100
    assert bleu(predictions, references) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rouge_l_matches_rouge_score(seed):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    predictions, references = _random_corpus(seed)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)
    assert rouge_l(predictions, references) == pytest.approx(expected, abs=1e-12)
