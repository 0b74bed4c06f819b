"""Text metrics for generated answers: exact match, ROUGE-L and corpus BLEU, in pure Python.

They run offline with no extra dependency (``evaluate.load`` would fetch its scripts from the
Hub). Each follows the reference implementation it is named after, so scores are comparable with
published ones:

- ``exact_match``: share of pairs whose texts are equal once surrounding whitespace is stripped
  and inner runs of whitespace are collapsed to one space. Nothing else is normalised (no
  lower-casing, no article or punctuation removal as in SQuAD), so it agrees with the
  teacher-forced exact match of :mod:`clm_hf.evaluation` whenever the tokenizer round-trips text.
- ``rouge_l``: ROUGE-L F1 per pair, averaged over the pairs, as ``rouge_score`` computes it
  (Lin, 2004): texts are lower-cased and split into runs of letters and digits (punctuation is
  dropped); with ``LCS`` the length of their longest common subsequence,
  ``P = LCS / len(prediction)``, ``R = LCS / len(reference)``, ``F1 = 2PR / (P + R)``; a pair
  with an empty side scores 0.
- ``bleu``: corpus BLEU-4 (Papineni et al., 2002) as ``sacrebleu.corpus_bleu`` computes it with
  its default ``exp`` smoothing, on a 0-1 scale instead of 0-100. Texts are split into words and
  single punctuation marks, case kept. Clipped n-gram matches and totals are summed over the
  corpus for n = 1..4; ``p_n = matches_n / total_n``, except that the k-th order with no match
  gets ``p_n = 1 / (2^k * total_n)``; an order with no n-gram at all makes BLEU 0. With ``c`` the
  predictions' and ``r`` the references' total length, the brevity penalty is
  ``BP = 1`` if ``c >= r`` else ``exp(1 - r / c)`` (0 when ``c = 0``), and
  ``BLEU = BP * exp(mean_n log p_n)``.

Example:

>>> from clm_hf.text_metrics import compute_text_metrics
>>> compute_text_metrics(["b a", "c d e"], ["b a", "c d f"], ["exact_match", "rouge_l"])
{'exact_match': 0.5, 'rouge_l': 0.8333333333333333}
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Sequence

__all__ = ["TEXT_METRICS", "TextScorer", "bleu", "compute_text_metrics", "exact_match", "rouge_l"]

TextScorer = Callable[[list[str], list[str]], dict[str, float]]
"""A user scorer: ``fn(predictions, references) -> {name: value}``, one text per row on each side."""

_ROUGE_TOKEN = re.compile(r"[^\W_]+")  # rouge_score keeps [a-z0-9]+ after lower-casing
_BLEU_TOKEN = re.compile(r"\w+|[^\w\s]")  # words, and each punctuation mark on its own


def _check_pairs(predictions: Sequence[str], references: Sequence[str], name: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{name}: got {len(predictions)} predictions but {len(references)} references; "
                         "give one reference per prediction.")
    if not predictions:
        raise ValueError(f"{name}: no prediction to score.")
    for side, texts in (("predictions", predictions), ("references", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}: {side}[{i}] must be a str, got {type(text).__name__} {text!r}.")


def _normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference, up to surrounding and repeated whitespace.

    Args:
        predictions (`Sequence[str]`): One generated text per row.
        references (`Sequence[str]`): The expected text of each row.

    Returns:
        `float`: in [0, 1].

    Example:

    >>> exact_match(["b a ", "a b"], ["b  a", "b a"])
    0.5
    """
    _check_pairs(predictions, references, "exact_match")
    hits = sum(_normalize_whitespace(p) == _normalize_whitespace(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One row of the dynamic-programming table at a time: O(len(a) * len(b)) time, O(len(b)) memory.
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over the pairs (see the module docstring for the tokenization).

    Args:
        predictions (`Sequence[str]`): One generated text per row.
        references (`Sequence[str]`): The expected text of each row.

    Returns:
        `float`: in [0, 1].

    Example:

    >>> rouge_l(["the cat sat"], ["the cat sat down"])  # LCS 3, P = 1, R = 3/4
    0.8571428571428571
    """
    _check_pairs(predictions, references, "rouge_l")
    total = 0.0
    for prediction, reference in zip(predictions, references):
        pred_tokens = _ROUGE_TOKEN.findall(prediction.lower())
        ref_tokens = _ROUGE_TOKEN.findall(reference.lower())
        if not pred_tokens or not ref_tokens:
            continue  # rouge_score gives 0 when either side has no token
        lcs = _lcs_length(pred_tokens, ref_tokens)
        if lcs:
            precision, recall = lcs / len(pred_tokens), lcs / len(ref_tokens)
            total += 2 * precision * recall / (precision + recall)
    return total / len(predictions)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU with ``exp`` smoothing and the brevity penalty, on a 0-1 scale.

    Args:
        predictions (`Sequence[str]`): One generated text per row.
        references (`Sequence[str]`): The expected text of each row (one reference each).
        max_order (`int`, defaults to 4): Longest n-gram counted.

    Returns:
        `float`: in [0, 1].

    Example:

    >>> round(bleu(["a b c d e"], ["a b c d e"]), 6)
    1.0
    >>> round(bleu(["a b c d"], ["a b c d e f"]), 4)  # all n-grams match; BP = exp(1 - 6/4)
    0.6065
    """
    _check_pairs(predictions, references, "bleu")
    if max_order < 1:
        raise ValueError(f"bleu: max_order must be >= 1, got {max_order}.")
    matches, totals = [0] * max_order, [0] * max_order
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references):
        pred_tokens, ref_tokens = _BLEU_TOKEN.findall(prediction), _BLEU_TOKEN.findall(reference)
        pred_len += len(pred_tokens)
        ref_len += len(ref_tokens)
        for n in range(1, max_order + 1):
            pred_ngrams, ref_ngrams = _ngrams(pred_tokens, n), _ngrams(ref_tokens, n)
            matches[n - 1] += sum(min(count, ref_ngrams[gram]) for gram, count in pred_ngrams.items())
            totals[n - 1] += max(len(pred_tokens) - n + 1, 0)
    if pred_len == 0 or matches[0] == 0:
        return 0.0
    log_precision, smoothing = 0.0, 1.0
    for match, total in zip(matches, totals):
        if total == 0:
            return 0.0  # no n-gram of this order anywhere: sacrebleu's score is 0 too
        if match == 0:
            smoothing *= 2  # exp smoothing: the k-th empty order counts as 1 / (2^k * total)
            log_precision += math.log(1.0 / (smoothing * total))
        else:
            log_precision += math.log(match / total)
    brevity = 1.0 if pred_len >= ref_len else math.exp(1.0 - ref_len / pred_len)
    return brevity * math.exp(log_precision / max_order)


TEXT_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "bleu": bleu,
}
"""The built-in text metrics by name."""


def compute_text_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str] = tuple(TEXT_METRICS),
    scorer: TextScorer | None = None,
) -> dict[str, float]:
    """Score generated texts with built-in metrics and, optionally, a user scorer.

    Args:
        predictions (`Sequence[str]`): One generated text per row.
        references (`Sequence[str]`): The expected text of each row.
        metrics (`Sequence[str]`): Built-in metric names, from ``exact_match``, ``rouge_l``, ``bleu``.
        scorer (`callable`, *optional*): ``fn(predictions, references) -> dict[str, float]``;
            its keys are added to the result as they are.

    Returns:
        `dict[str, float]`: one value per metric.

    Example:

    >>> compute_text_metrics(["b a"], ["b a"], ["exact_match"], scorer=lambda p, r: {"length": len(p[0])})
    {'exact_match': 1.0, 'length': 3.0}
    """
    unknown = [m for m in metrics if m not in TEXT_METRICS]
    if unknown:
        raise ValueError(f"Unknown text metric(s) {unknown}; built-in text metrics are {list(TEXT_METRICS)}.")
    scores = {name: float(TEXT_METRICS[name](predictions, references)) for name in metrics}
    if scorer is not None:
        extra = scorer(list(predictions), list(references))
        if not isinstance(extra, dict):
            raise TypeError(f"The generation scorer must return a dict of name -> float, got {type(extra).__name__}.")
        for name, value in extra.items():
            if not isinstance(name, str):
                raise TypeError(f"The generation scorer returned a non-string key {name!r}; name every score.")
            try:
                scores[name] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"The generation scorer returned {type(value).__name__} {value!r} for '{name}'; "
                                "every score must be a number.") from None
    return scores
