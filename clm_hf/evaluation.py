"""Per-task scores for language models from one teacher-forced forward pass.

For each row, the supervised positions are those whose label is not -100 (the answer tokens).
One forward pass gives, at every such position, the model's most likely next token and the
log-likelihood of the right one. From that:

- ``exact_match``: share of rows whose every answer token is predicted right (greedy decoding
  would produce exactly this answer, since each step is conditioned on the right prefix);
- ``token_accuracy``: share of answer tokens predicted right;
- ``loss``: mean negative log-likelihood per answer token; ``perplexity`` = exp(loss);
- any user callable ``fn(predictions, references) -> float`` over the answer token ids, and a
  ``Trainer``-style ``compute_metrics`` (:class:`TaskScorer`).

Memory stays bounded by one batch's logits: the log-likelihood is ``logsumexp - gather`` over a few
supervised positions at a time (:func:`answer_nll`), never a float32 log-softmax of the batch.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Sequence

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from .modeling import decoder_inputs as _decoder_inputs  # noqa: F401  (the old private name)
from .modeling import eval_mode, is_seq2seq, unwrap_model  # noqa: F401  (is_seq2seq re-exported)

BUILTIN_METRICS = ("exact_match", "token_accuracy", "loss", "perplexity")
TokenMetric = Callable[[list[list[int]], list[list[int]]], float]


# Logit elements per chunk of the answer-token log-likelihood: 2**24 float32 values are 64 MiB,
# whatever the vocabulary (about 110 positions of a 152k-token vocabulary at a time).
LOGSUMEXP_CHUNK = 2**24


def answer_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               chunk_elements: int | None = None) -> torch.Tensor:
    """Negative log-likelihood of ``targets`` at the ``mask`` positions, 0 elsewhere (float32).

    ``-log_softmax(x)[t] = logsumexp(x) - x[t]``, computed over a few supervised positions at a
    time: a full float32 ``log_softmax`` would allocate another ``batch x length x vocab`` tensor
    (about 20 GB for a 152k vocabulary at batch 64 x 512), while this holds at most
    ``chunk_elements`` float32 logits beside the model's own output.

    Args:
        logits (`torch.Tensor`): ``[batch, length, vocab]``, any float dtype (upcast per chunk).
        targets (`torch.Tensor`): ``[batch, length]`` token ids (any value where ``mask`` is False).
        mask (`torch.Tensor`): ``[batch, length]`` bool, the positions to score.
        chunk_elements (`int`, *optional*): Logit values upcast at once; defaults to ``LOGSUMEXP_CHUNK``.

    Returns:
        `torch.Tensor`: ``[batch, length]`` float32.

    Example:

    >>> logits = torch.randn(2, 3, 5); targets = torch.randint(0, 5, (2, 3)); mask = torch.ones(2, 3, dtype=torch.bool)
    >>> full = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    >>> torch.allclose(answer_nll(logits, targets, mask, chunk_elements=5), full, atol=1e-6)
    True
    """
    nll = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    positions = mask.nonzero(as_tuple=True)
    count = positions[0].numel()
    step = max(1, (chunk_elements or LOGSUMEXP_CHUNK) // max(1, logits.shape[-1]))
    for start in range(0, count, step):
        where = tuple(p[start : start + step] for p in positions)
        rows = logits[where].float()  # [chunk, vocab]: only supervised positions are ever upcast
        target_logit = rows.gather(-1, targets[where].unsqueeze(-1)).squeeze(-1)
        nll[where] = torch.logsumexp(rows, dim=-1) - target_logit
    return nll


def supervised_predictions(logits: torch.Tensor, labels: torch.Tensor, seq2seq: bool) -> tuple[torch.Tensor, ...]:
    """Align logits with labels; return (predicted ids, target ids, mask, token NLL).

    Causal LMs predict token ``t+1`` at position ``t``, so logits are shifted by one; seq2seq
    decoders are already aligned with their labels. The NLL comes from :func:`answer_nll`.
    """
    if not seq2seq:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    targets = labels.masked_fill(~mask, 0)
    return logits.argmax(-1), targets, mask, answer_nll(logits, targets, mask)


def argmax_logits(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor | None = None) -> torch.Tensor:
    """A `preprocess_logits_for_metrics` that keeps each position's arg-max token id.

    The continual trainers install it when `compute_metrics` is given without a `preprocess_logits_for_metrics`,
    so `compute_metrics` receives one format from every evaluation of the trainer: `EvalPrediction.predictions`
    are arg-max token ids `(rows, positions)`, unshifted (position `t` predicts token `t + 1` of a causal LM), in
    the per-task scores as in the Trainer's own `evaluate()` (`eval_strategy="steps"`); the full logits are never
    kept. Ids that are already ids (a seq2seq `predict_with_generate` output) pass through unchanged.

    Args:
        logits (`torch.Tensor` or `tuple[torch.Tensor, ...]`): The model's logits `(rows, positions, vocabulary)`,
            or a tuple whose first item they are (models that return more outputs than the logits).
        labels (`torch.Tensor`, *optional*): Unused; the Trainer passes them.

    Returns:
        `torch.Tensor`: The arg-max ids, `(rows, positions)`.

    Example:

    ```python
    >>> import torch
    >>> from clm_hf.evaluation import argmax_logits
    >>> argmax_logits(torch.tensor([[[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]]])).tolist()
    [[1, 0]]

    ```
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(-1) if logits.dim() >= 3 else logits


def length_sorted_order(dataset: Dataset, seq2seq: bool = False) -> list[int]:
    """Row indices from the longest row to the shortest (stable), for padding-aware batching.

    Batches of rows of similar length hold few pad tokens, so a forward pass computes little that is
    thrown away. Seq2seq rows sort by encoder length, then by decoder (``labels``) length. The
    longest rows come first, so a batch that does not fit in memory fails at once, not at the end.
    Lengths are read from the Arrow columns, without decoding the rows.

    Args:
        dataset (`datasets.Dataset`): Tokenized rows with ``input_ids`` (and ``labels`` for seq2seq).
        seq2seq (`bool`): Sort ties of the encoder length by the decoder length.

    Returns:
        `list[int]`: a permutation of ``range(len(dataset))``.

    Example:

    >>> rows = Dataset.from_dict({"input_ids": [[1], [1, 2, 3], [1, 2]]})
    >>> length_sorted_order(rows)
    [1, 2, 0]
    """
    import numpy as np
    import pyarrow.compute as pc

    # The Arrow table itself when no select()/shuffle() index mapping sits on top of it (the usual
    # tokenized eval set): with_format() copies the dataset object, 10 ms a call on a small set.
    arrow = dataset.data if getattr(dataset, "_indices", True) is None else dataset.with_format("arrow")

    def lengths(column: str) -> "np.ndarray":
        if column not in dataset.column_names:
            raise KeyError(f"Cannot sort rows by length: the dataset has no '{column}' column "
                           f"(columns: {dataset.column_names}).")
        values = arrow.column(column) if arrow is dataset.data else arrow[column]
        return pc.list_value_length(values).to_numpy(zero_copy_only=False).astype(np.int64)

    keys = [-lengths("input_ids")]
    if seq2seq and "labels" in dataset.column_names:
        keys.insert(0, -lengths("labels"))  # np.lexsort sorts by its last key first
    return np.lexsort(keys).tolist() if len(keys) > 1 else np.argsort(keys[0], kind="stable").tolist()


class _OrderedSampler(torch.utils.data.Sampler):
    """Yields a fixed list of row indices (a length-sorted order) to a DataLoader."""

    def __init__(self, order: Sequence[int]) -> None:
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class TaskScorer:
    """Accumulates the scores of one task's rows, batch by batch, possibly across processes.

    Per batch it keeps per-row counts only (and, when ``extra_metrics`` or ``compute_metrics``
    need them, ``[rows, length]`` token ids), never logits. ``gather`` merges the per-batch
    tensors of every process (e.g. ``Accelerator.gather_for_metrics`` after padding); without it
    the rows are this process's only.

    Args:
        metrics: Built-in metric names to report.
        extra_metrics: ``name -> fn(predictions, references)`` over answer token ids.
        compute_metrics: A ``Trainer`` ``compute_metrics`` (called with an ``EvalPrediction`` of
            ``predictions`` = the argmax token id at every position, or what
            ``preprocess_logits_for_metrics`` returns, and ``label_ids`` = the labels, both padded
            with -100); its keys join the scores.
        preprocess_logits_for_metrics: ``fn(logits, labels) -> tensor``, as in ``Trainer``.
        gather: ``fn(dict of tensors) -> dict of tensors`` merging the processes' rows.
        order: The dataset index of each row, in the order the rows are added (e.g.
            :func:`length_sorted_order`); per-row results, ``extra_metrics`` and ``compute_metrics``
            then see the rows in the dataset's order. ``None``: rows are added in the dataset's order.
        what: How errors name the rows, e.g. ``"eval dataset of task 'qa'"`` (the trainer gives ``"eval qa"``).

    Example:

    >>> scorer = TaskScorer(["loss"])
    >>> logits = torch.zeros(1, 3, 4); labels = torch.tensor([[-100, 1, 2]])
    >>> scorer.add(logits, labels, seq2seq=False)
    >>> round(scorer.result()["loss"], 4)  # uniform over 4 tokens: log(4)
    1.3863
    """

    def __init__(self, metrics: Sequence[str] = BUILTIN_METRICS, extra_metrics: dict[str, TokenMetric] | None = None,
                 compute_metrics: Callable[[Any], dict[str, float]] | None = None,
                 preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 gather: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                 order: Sequence[int] | None = None, what: str | None = None) -> None:
        unknown = [m for m in metrics if m not in BUILTIN_METRICS]
        if unknown:
            raise ValueError(f"Unknown metric(s) {unknown}; built-in metrics are {list(BUILTIN_METRICS)}.")
        self.metrics, self.extra_metrics = list(metrics), dict(extra_metrics or {})
        self.compute_metrics, self.preprocess = compute_metrics, preprocess_logits_for_metrics
        self.gather = gather
        self.order = None if order is None else list(order)
        self.what = what
        # Per-row counts stay where the model ran (no host sync per batch) until result() reads them.
        self._per_row: dict[str, list[torch.Tensor]] = {k: [] for k in _PER_ROW}
        self._tokens: dict[str, list[torch.Tensor]] = {"predicted": [], "references": []}
        self._eval_predictions: list[Any] = []
        self._eval_labels: list[Any] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, seq2seq: bool) -> None:
        """Score one batch's logits against its labels (-100 = not scored)."""
        predicted, targets, mask, nll = supervised_predictions(logits, labels, seq2seq)
        correct = (predicted == targets) & mask
        out = {
            "exact": ((correct | ~mask).all(-1) & mask.any(-1)).long(),
            "tokens_correct": correct.sum(-1),
            "tokens": mask.sum(-1),
            "nll": nll.sum(-1),
        }
        if self.extra_metrics:
            out["predicted"] = predicted.masked_fill(~mask, -100)
            out["references"] = targets.masked_fill(~mask, -100)
        if self.compute_metrics is not None:
            out["eval_predictions"] = self.preprocess(logits, labels) if self.preprocess else logits.argmax(-1)
            out["eval_labels"] = labels
        if self.gather is not None:
            out = self.gather(out)
        for key in _PER_ROW:
            self._per_row[key].append(out[key])
        if self.extra_metrics:
            self._tokens["predicted"].append(out["predicted"].cpu())
            self._tokens["references"].append(out["references"].cpu())
        if self.compute_metrics is not None:
            self._eval_predictions.append(out["eval_predictions"].detach().cpu())
            self._eval_labels.append(out["eval_labels"].detach().cpu())

    def _restore(self, rows: int) -> torch.Tensor | None:
        """Position of each original row among the rows as added (None: added in the original order)."""
        if self.order is None:
            return None
        if len(self.order) != rows:
            raise ValueError(f"TaskScorer was given an order of {len(self.order)} rows but {rows} rows were added.")
        return torch.as_tensor(self.order).argsort()

    def per_row(self) -> dict[str, torch.Tensor]:
        """Each row's counts, in the dataset's order whatever order the batches came in.

        Returns:
            `dict[str, torch.Tensor]`: ``exact`` (1 when every answer token is right), ``tokens_correct``,
            ``tokens`` (answer tokens) and ``nll`` (summed over the answer tokens), one value per row.
        """
        if not self._per_row["tokens"]:
            raise ValueError(f"Cannot evaluate{_named(self.what)}: the dataset is empty (0 rows).")
        values = {k: torch.cat([v.reshape(-1) for v in parts]).cpu() for k, parts in self._per_row.items()}
        position = self._restore(values["tokens"].numel())
        return values if position is None else {k: v[position] for k, v in values.items()}

    def result(self) -> dict[str, float]:
        """The scores of every row added so far."""
        rows = self.per_row()
        if int(rows["tokens"].sum()) == 0:
            raise ValueError(f"Cannot evaluate{_named(self.what)}: the dataset has no supervised token (every label is "
                             "-100), so there is nothing to score.")
        count, tokens = rows["tokens"].numel(), int(rows["tokens"].sum())
        loss = float(rows["nll"].double().sum()) / tokens
        values = {
            "exact_match": int(rows["exact"].sum()) / count,
            "token_accuracy": int(rows["tokens_correct"].sum()) / tokens,
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
        }
        scores = {m: values[m] for m in self.metrics}
        position = self._restore(count)
        if self.extra_metrics:
            predictions, references = self._answer_tokens(position)
            for name, fn in self.extra_metrics.items():
                scores[name] = float(fn(predictions, references))
        if self.compute_metrics is not None:
            from transformers import EvalPrediction

            predicted, labels = _concat_padded(self._eval_predictions), _concat_padded(self._eval_labels)
            if position is not None:  # the Trainer's compute_metrics sees rows in the dataset's order
                predicted, labels = predicted[position.numpy()], labels[position.numpy()]
            for name, value in self.compute_metrics(EvalPrediction(predictions=predicted, label_ids=labels)).items():
                if name in scores:
                    raise ValueError(f"compute_metrics returned '{name}', which is already a per-task score "
                                     f"({sorted(scores)}); rename it in compute_metrics.")
                scores[name] = float(value)
        return scores

    def _answer_tokens(self, position: torch.Tensor | None) -> tuple[list[list[int]], list[list[int]]]:
        """Each row's predicted and reference answer token ids (the scored positions only)."""
        predictions: list[list[int]] = []
        references: list[list[int]] = []
        for p_batch, r_batch in zip(self._tokens["predicted"], self._tokens["references"]):
            for p_row, r_row in zip(p_batch.tolist(), r_batch.tolist()):
                keep = [i for i, r in enumerate(r_row) if r != -100]
                predictions.append([p_row[i] for i in keep])
                references.append([r_row[i] for i in keep])
        if position is not None:
            predictions = [predictions[i] for i in position.tolist()]
            references = [references[i] for i in position.tolist()]
        return predictions, references


_PER_ROW = ("exact", "tokens_correct", "tokens", "nll")


def _named(what: str | None) -> str:
    """`` (eval qa)``: which rows an error is about, when the caller said."""
    return f" ({what})" if what else ""


def _concat_padded(parts: list[torch.Tensor]) -> Any:
    """Batches of different lengths as one numpy array, padded with -100 like the Trainer's loop."""
    length = max(p.shape[1] for p in parts) if parts[0].dim() > 1 else None
    if length is not None:
        parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, length - p.shape[1]), value=-100)
                 for p in parts]
    return torch.cat(parts).float().numpy() if parts[0].is_floating_point() else torch.cat(parts).numpy()


@torch.inference_mode()
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
    sort_by_length: bool = True,
    scorer: TaskScorer | None = None,
    skip_prompt_logits: bool = True,
) -> dict[str, float]:
    """Score a language model on one task's tokenized rows, in one process.

    The trainer's own scoring (:meth:`~clm_hf.ContinualTrainer.evaluate_task`) adds the Trainer's
    evaluation settings: ``per_device_eval_batch_size``, mixed-precision autocast, rows split
    across processes, ``compute_metrics``.

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
        description (`str`, *optional*): Progress-bar label, and how errors name the rows (e.g.
            ``"eval dataset of task 'qa'"``).
        disable_progress (`bool`): Hide the progress bar.
        sort_by_length (`bool`): Batch rows of similar length together (:func:`length_sorted_order`),
            so that few pad tokens are computed; the scores do not depend on it (beyond float rounding).
        scorer (`TaskScorer`, *optional*): The scorer to fill, e.g. to read :meth:`TaskScorer.per_row`
            afterwards; ``metrics`` and ``extra_metrics`` are then ignored.
        skip_prompt_logits (`bool`): Causal LMs: compute no logits before the batch's first answer
            token (``logits_to_keep``); the scores do not depend on it (beyond float rounding).

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
    if len(dataset) == 0:
        raise ValueError(f"Cannot evaluate{_named(description)}: the dataset is empty (0 rows).")
    seq2seq = is_seq2seq(model)
    order = length_sorted_order(dataset, seq2seq) if sort_by_length else list(range(len(dataset)))
    if scorer is None:
        scorer = TaskScorer(metrics, extra_metrics, what=description)
    scorer.order = order
    if device is None:
        device = next(model.parameters()).device
    rows_view = dataset.select_columns([c for c in dataset.column_names if c != "task_id"])
    with eval_mode(model):
        for start in tqdm(range(0, len(dataset), batch_size), desc=description, disable=disable_progress, leave=False):
            rows = rows_view[order[start : start + batch_size]]
            features = [dict(zip(rows, values)) for values in zip(*rows.values())]
            batch = {k: v.to(device) for k, v in collator(features).items()}
            start = first_scored_logit(batch["labels"], seq2seq) if skip_prompt_logits else 0
            scorer.add(forward_logits(model, batch, seq2seq, logits_from=start), batch["labels"][:, start:], seq2seq)
    return scorer.result()


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor], seq2seq: bool,
                   hidden: Sequence[str] = (), logits_from: int = 0) -> torch.Tensor:
    """The model's logits for a batch, without labels (no loss is computed: it would need the
    whole-vocabulary log-softmax this module avoids); ``hidden`` columns are left out.

    ``logits_from > 0`` (causal LMs): only the logits of positions ``logits_from`` onwards, asked
    of the model as ``logits_to_keep`` so that its LM head skips the prompt (on a large vocabulary
    the head is a good part of a forward pass); a model that does not take it is run whole and
    its logits sliced.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels" and k not in hidden}
    inputs.update(_decoder_inputs(model, batch, seq2seq))
    if logits_from <= 0:
        return model(**inputs).logits
    keep = batch["input_ids"].shape[1] - logits_from
    if model not in _NO_LOGITS_TO_KEEP:
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
        except TypeError as err:  # a forward without the argument (custom or older models)
            if "logits_to_keep" not in str(err):
                raise
            _NO_LOGITS_TO_KEEP.add(model)
        else:
            return logits[:, -keep:]  # a model that takes **kwargs may ignore it
    return model(**inputs).logits[:, -keep:]


# Models whose forward refused ``logits_to_keep``: not asked again.
_NO_LOGITS_TO_KEEP: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def first_scored_logit(labels: torch.Tensor, seq2seq: bool) -> int:
    """The first position whose logit a causal LM's scoring reads: one before the batch's first
    supervised label (0 for seq2seq models and batches without one). One host sync per batch.

    Example:

    >>> first_scored_logit(torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 7]]), seq2seq=False)
    1
    """
    if seq2seq:
        return 0
    supervised = (labels != -100).any(0).nonzero()
    return max(int(supervised[0, 0]) - 1, 0) if supervised.numel() else 0

