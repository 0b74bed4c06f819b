"""Per-task scores for language models from one teacher-forced forward pass.

For each row, the supervised positions are those whose label is not -100 (the answer tokens).
One forward pass gives, at every such position, the model's most likely next token and the
log-likelihood of the right one. From that:

- ``exact_match``: share of rows whose every answer token is predicted right (greedy decoding
  would produce exactly this answer, since each step is conditioned on the right prefix);
- ``token_accuracy``: share of answer tokens predicted right;
- ``loss``: mean negative log-likelihood per answer token; ``perplexity`` = exp(loss);
- any user callable ``fn(predictions, references) -> float`` over the answer token ids.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from .modeling import decoder_inputs as _decoder_inputs  # noqa: F401  (the old private name)
from .modeling import eval_mode, is_seq2seq, unwrap_model  # noqa: F401  (is_seq2seq re-exported)

BUILTIN_METRICS = ("exact_match", "token_accuracy", "loss", "perplexity")
TokenMetric = Callable[[list[list[int]], list[list[int]]], float]


def supervised_predictions(logits: torch.Tensor, labels: torch.Tensor, seq2seq: bool) -> tuple[torch.Tensor, ...]:
    """Align logits with labels; return (predicted ids, target ids, mask, token NLL).

    Causal LMs predict token ``t+1`` at position ``t``, so logits are shifted by one; seq2seq
    decoders are already aligned with their labels.
    """
    if not seq2seq:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    targets = labels.masked_fill(~mask, 0)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    return logits.argmax(-1), targets, mask, nll


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    dataset: Dataset,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    batch_size: int = 32,
    metrics: Sequence[str] = BUILTIN_METRICS,
    extra_metrics: dict[str, TokenMetric] | None = None,
    device: torch.device | str | None = None,
    description: str | None = None,
    disable_progress: bool = True,
) -> dict[str, float]:
    """Score a language model on one task's tokenized rows.

    Args:
        model (`nn.Module`): A causal or seq2seq HF model (DDP/PEFT wrappers are fine).
        dataset (`datasets.Dataset`): Rows with ``input_ids`` and ``labels`` (-100 = not scored).
        collator: Pads a list of rows into a batch, e.g. :class:`~clm_hf.data.ContinualDataCollator`.
        batch_size (`int`): Rows per forward pass.
        metrics (`Sequence[str]`): Which of ``exact_match``, ``token_accuracy``, ``loss``,
            ``perplexity`` to return.
        extra_metrics (`dict[str, callable]`, *optional*): Name -> ``fn(predictions, references)``
            where both are lists (one per row) of answer token ids; returns a float.
        device: Where to run; defaults to the model's device.
        description (`str`, *optional*): Progress-bar label.
        disable_progress (`bool`): Hide the progress bar.

    Returns:
        `dict[str, float]`: one value per requested metric.

    Example:

    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model, make_task, tokenize_for_causal_lm
    >>> from clm_hf.data import ContinualDataCollator
    >>> tok = build_tokenizer(); model = build_tiny_model("gpt2", tok)
    >>> rows = tokenize_for_causal_lm(make_task("reverse", 8), tok)
    >>> scores = evaluate_lm(model, rows, ContinualDataCollator(tok.pad_token_id))
    >>> sorted(scores)
    ['exact_match', 'loss', 'perplexity', 'token_accuracy']
    """
    unknown = [m for m in metrics if m not in BUILTIN_METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; built-in metrics are {list(BUILTIN_METRICS)}.")
    if len(dataset) == 0:
        raise ValueError("Cannot evaluate on an empty dataset.")
    seq2seq = is_seq2seq(model)
    if device is None:
        device = next(model.parameters()).device
    rows_correct = tokens_correct = tokens = 0
    nll_sum = 0.0
    predictions: list[list[int]] = []
    references: list[list[int]] = []
    rows_view = dataset.select_columns([c for c in dataset.column_names if c != "task_id"])
    with eval_mode(model):
        for start in tqdm(range(0, len(dataset), batch_size), desc=description, disable=disable_progress, leave=False):
            rows = rows_view[start : start + batch_size]
            features = [dict(zip(rows, values)) for values in zip(*rows.values())]
            batch = {k: v.to(device) for k, v in collator(features).items()}
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, **_decoder_inputs(model, batch, seq2seq)).logits
            predicted, targets, mask, nll = supervised_predictions(logits, batch["labels"], seq2seq)
            correct = (predicted == targets) & mask
            rows_correct += int(((correct | ~mask).all(-1) & mask.any(-1)).sum())
            tokens_correct += int(correct.sum())
            tokens += int(mask.sum())
            nll_sum += float(nll.sum())
            if extra_metrics:
                for p_row, t_row, m_row in zip(predicted, targets, mask):
                    predictions.append(p_row[m_row].tolist())
                    references.append(t_row[m_row].tolist())
    if tokens == 0:
        raise ValueError("The dataset has no supervised token (every label is -100): nothing to score.")
    loss = nll_sum / tokens
    values = {
        "exact_match": rows_correct / len(dataset),
        "token_accuracy": tokens_correct / tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
    }
    scores = {m: values[m] for m in metrics}
    for name, fn in (extra_metrics or {}).items():
        scores[name] = float(fn(predictions, references))
    return scores
