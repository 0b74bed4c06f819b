"""Data plumbing for continual training: padding, validation and DataLoader conversion.

The trainer accepts tokenized ``datasets.Dataset`` objects (``input_ids`` + ``labels``), raw
``prompt``/``answer`` datasets (tokenized on the fly with the trainer's ``processing_class``), or a
torch ``DataLoader`` as in the original quick start. Everything is checked up front so that a bad
task fails with a message that names the problem, before any weight has moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

from ._logging import get_logger

logger = get_logger(__name__)

# Columns that describe a row rather than feed the model; the collator drops them.
METADATA_COLUMNS = ("task_id",)
REQUIRED_COLUMNS = ("input_ids", "labels")
_PADDED_KEYS = {
    "input_ids": "pad",
    "attention_mask": 0,
    "token_type_ids": 0,
    "labels": "label",
    "decoder_input_ids": "pad",
    "decoder_attention_mask": 0,
}


@dataclass
class ContinualDataCollator:
    """Right-pads token sequences to the longest row of the batch and drops metadata columns.

    Works for causal and seq2seq models alike: ``labels`` are padded with ``label_pad_token_id``
    (ignored by the loss) independently of ``input_ids``.

    Args:
        pad_token_id (`int`): Id used to pad ``input_ids`` / ``decoder_input_ids``.
        label_pad_token_id (`int`, defaults to -100): Id used to pad ``labels``.
        pad_to_multiple_of (`int`, *optional*): Round padded lengths up to a multiple of this.

    Example:

    >>> collator = ContinualDataCollator(pad_token_id=0)
    >>> batch = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    >>> batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7], [5, 0, 0]], [[-100, 6, 7], [5, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """

    pad_token_id: int
    label_pad_token_id: int = -100
    pad_to_multiple_of: int | None = None

    def _pad_value(self, key: str) -> int:
        kind = _PADDED_KEYS[key]
        if kind == "pad":
            return self.pad_token_id
        if kind == "label":
            return self.label_pad_token_id
        return kind

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("ContinualDataCollator got an empty batch.")
        keys = [k for k in features[0] if k not in METADATA_COLUMNS]
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            values = [f[key] for f in features]
            if key in _PADDED_KEYS:
                batch[key] = self._pad([_as_list(v) for v in values], self._pad_value(key))
            elif isinstance(values[0], (list, tuple, torch.Tensor)):
                # Side columns of strategies (e.g. cached teacher logits) pad with zeros.
                batch[key] = _pad_any([_as_list(v) for v in values])
            else:
                batch[key] = torch.as_tensor(values)
        if "attention_mask" not in batch and "input_ids" in batch:
            lengths = torch.tensor([len(_as_list(f["input_ids"])) for f in features])
            positions = torch.arange(batch["input_ids"].shape[1])
            batch["attention_mask"] = (positions[None, :] < lengths[:, None]).long()
        return batch

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        return out


class UserCollator:
    """A user's ``data_collator``, given the rows the way it expects them.

    Rows whose loss covers every token (``text`` rows, ``input_ids`` without labels: ``labels`` equal to
    ``input_ids``) reach a collator that builds labels itself, such as
    ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``, without ``labels``, as in ``run_clm``;
    rows with a loss mask (prompt/completion, chat) keep theirs. The rows themselves keep their labels,
    so strategies that read them (EWC's Fisher, GEM's memory) see the loss the task trains.

    Args:
        collator (`Callable`): The user's collator.

    Example:

    >>> from transformers import DataCollatorForLanguageModeling
    >>> from clm_hf.tasks import build_tokenizer
    >>> collator = UserCollator(DataCollatorForLanguageModeling(build_tokenizer(), mlm=False))
    >>> rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    >>> collator.probe(rows)
    >>> collator(rows)["labels"].tolist()
    [[5, 6, 7], [5, -100, -100]]
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.builds_labels: bool | None = None  # found out by probe() on the first rows

    def probe(self, features: Sequence[dict[str, Any]]) -> None:
        """Find out, once, whether the collator makes labels from rows that have none.

        A ``KeyError``, ``TypeError``, ``ValueError`` or ``IndexError`` on rows without labels means the
        collator needs labels given (``builds_labels=False``), as long as it then works on the rows with
        their labels; any other error, or an error with the labels given too (chained to the first), is
        raised, so a bug in the collator is never taken for a need for labels.

        Args:
            features (`Sequence[dict]`): A few tokenized rows with ``labels``.
        """
        if self.builds_labels is not None:
            return
        try:
            # DataCollatorForSeq2Seq answers {"labels": None} for rows without labels.
            self.builds_labels = self.collator([_without_labels(f) for f in features]).get("labels") is not None
        except (KeyError, TypeError, ValueError, IndexError) as unlabelled:
            # What a collator that reads ``labels`` raises on rows without them: it needs the rows' own labels.
            # Any other error is a bug of the collator and propagates. So does one it also raises with the
            # labels given: that is no need for labels either, and its first error stays chained to it.
            try:
                self.collator(list(features))
            except Exception as labelled:
                raise labelled from unlabelled
            self.builds_labels = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> Any:
        if self.builds_labels and all(_full_sequence(f) for f in features):
            features = [_without_labels(f) for f in features]
        return self.collator(list(features))


def _without_labels(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "labels"}


def _full_sequence(row: dict[str, Any]) -> bool:
    labels = row.get("labels")
    return labels is not None and _as_list(labels) == _as_list(row["input_ids"])


def _pad_any(rows: list[list[Any]]) -> torch.Tensor:
    length = max(len(r) for r in rows)
    floating = any(isinstance(x, float) for r in rows for x in r[:1])
    out = torch.zeros((len(rows), length), dtype=torch.float32 if floating else torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.as_tensor(row, dtype=out.dtype)
    return out


def _as_list(value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return list(value)


def validate_lm_dataset(dataset: Any, *, what: str, vocab_size: int | None = None, causal: bool = False,
                        training: bool = False) -> None:
    """Check that a tokenized dataset can train a language model; raise ``ValueError`` if not.

    Checks: it is a ``datasets.Dataset``, it is not empty, it has ``input_ids`` and ``labels``
    holding lists of integers, (``causal``) every row has as many labels as ``input_ids``, no row
    is empty (0 ``input_ids``), every row has at least one supervised label (not -100: a scored row
    without one would silently lower exact_match), and no token id is outside the vocabulary. Each
    error names the first row at fault and how many rows are. Training rows with no supervised label
    (e.g. a prompt cut by ``truncation=True``) only give no loss: they are kept, with one warning.

    Args:
        dataset: The dataset to check.
        what (`str`): How to name it in messages, e.g. ``"train dataset of task 'reverse'"``.
        vocab_size (`int`, *optional*): The model's vocabulary size, to check token ids against.
        causal (`bool`): The rows train a decoder-only model, whose labels align with ``input_ids``.
        training (`bool`, *optional*, defaults to `False`): The rows are a training split: rows with no
            supervised label are counted in a warning instead of an error (scored rows must have one).

    Example:

    >>> from datasets import Dataset
    >>> rows = Dataset.from_dict({"input_ids": [[5, 6], [7, 8]], "labels": [[5, 6], [-100, -100]]})
    >>> validate_lm_dataset(rows, what="eval dataset of task 'qa'", causal=True)
    Traceback (most recent call last):
    ...
    ValueError: Row 1 of the eval dataset of task 'qa' has no supervised label (every label is -100); 1 of its 2 rows have none. ...
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"The {what} must be a datasets.Dataset, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError(f"The {what} is empty: a task needs at least one example.")
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        hint = ""
        if {"prompt", "answer"} <= set(dataset.column_names):
            hint = " It has 'prompt'/'answer' text: pass processing_class=tokenizer to the trainer to tokenize it."
        raise ValueError(
            f"The {what} is missing column(s) {missing}; it has {dataset.column_names}.{hint}"
        )
    schema = dataset.features.arrow_schema
    for column in REQUIRED_COLUMNS:
        kind = schema.field(column).type
        if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)):
            raise ValueError(
                f"The {what} has column '{column}' of type {dataset.features[column]}, but '{column}' must hold lists "
                "of integer token ids (e.g. [5, 6, 7]). Tokenize the rows first, or give 'prompt'/'answer' text "
                "columns and pass processing_class=tokenizer to the trainer."
            )
    table = dataset.with_format("arrow")[:]  # respects any select()/shuffle() index mapping
    if causal:
        mismatch = pc.not_equal(pc.list_value_length(table.column("input_ids")), pc.list_value_length(table.column("labels")))
        if pc.any(mismatch).as_py():
            row = pc.index(mismatch, True).as_py()
            raise ValueError(
                f"Row {row} of the {what} has {len(dataset[row]['input_ids'])} input_ids but {len(dataset[row]['labels'])} "
                "labels. A causal LM's labels line up with its input_ids (the model shifts them itself): give one "
                "label per token, -100 where there is nothing to predict."
            )
    _check_empty_rows(table, what)
    labels = pc.list_flatten(table.column("labels"))
    if len(labels) == 0 or pc.all(pc.equal(labels, -100)).as_py():
        raise ValueError(
            f"Every label in the {what} is -100, so there is nothing to learn. "
            "Check the prompt/answer masking (answer tokens must keep their ids)."
        )
    _check_unsupervised_rows(table, what, training=training)
    if vocab_size is not None:
        ids = pc.list_flatten(table.column("input_ids"))
        supervised = pc.filter(labels, pc.not_equal(labels, -100))
        for column, values in (("input_ids", ids), ("labels", supervised)):
            if len(values) == 0:
                continue
            low, high = pc.min_max(values).values()
            if high.as_py() >= vocab_size or low.as_py() < 0:
                raise ValueError(
                    f"The {what} has {column} outside the model's vocabulary [0, {vocab_size}): "
                    f"min {low.as_py()}, max {high.as_py()}. Was it tokenized with another tokenizer?"
                )


def _check_empty_rows(table: pa.Table, what: str) -> None:
    """A row with no token (an empty ``text`` or prompt) gives the model nothing to read or score."""
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise ValueError(
            f"Row {int(empty[0])} of the {what} has no tokens (0 input_ids); {len(empty)} of its {len(lengths)} rows "
            "are empty. Drop them (e.g. dataset.filter(lambda r: len(r['input_ids']) > 0), or filter out empty "
            "text before tokenizing)."
        )


def _rows_without_supervision(labels: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The indices of the rows of a ``labels`` list column whose labels are all -100 (or that have none).

    One bool per label and one ``any`` per row: no per-token integer array, whatever the dataset's size.

    Args:
        labels (`pyarrow.ChunkedArray` or `pyarrow.Array`): A column of lists of label ids.

    Example:

    >>> import pyarrow as pa
    >>> _rows_without_supervision(pa.array([[-100, 5], [-100, -100], [], [7]])).tolist()
    [1, 2]
    """
    lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False)
    supervised = pc.not_equal(pc.list_flatten(labels), -100).to_numpy(zero_copy_only=False)
    has = np.zeros(len(lengths), dtype=bool)
    nonempty = lengths > 0
    if supervised.size:
        # reduceat over the non-empty rows' starts: each segment is exactly one such row's labels.
        has[nonempty] = np.logical_or.reduceat(supervised, (np.cumsum(lengths) - lengths)[nonempty])
    return np.flatnonzero(~has)


def _check_unsupervised_rows(table: pa.Table, what: str, *, training: bool = False) -> None:
    """Every scored row needs a supervised label: one without it counts in exact_match's denominator but can never
    be right (it silently lowers the score). A training row without one only gives no loss (a pre-tokenized set
    made with ``truncation=True`` has such rows): it is kept, as the Trainer would, and counted in a warning."""
    missing = _rows_without_supervision(table.column("labels"))
    rows = table.num_rows
    if not len(missing):
        return
    if training:
        logger.warning(
            "clm-hf: row %d of the %s has no supervised label (every label is -100); %d of its %d rows have none. "
            "They are kept but give no loss (e.g. a prompt cut by truncation=True left no answer token). Drop them, "
            "or raise the tokenizer's max_length, to train on every row.",
            int(missing[0]), what, len(missing), rows,
        )
        return
    raise ValueError(
        f"Row {int(missing[0])} of the {what} has no supervised label (every label is -100); "
        f"{len(missing)} of its {rows} rows have none. Scored, such a row would count as a wrong answer in "
        "exact_match. Drop those rows, or check the prompt/answer masking (answer tokens must keep their ids)."
    )


def dataset_from_loader(loader: torch.utils.data.DataLoader) -> Dataset:
    """Turn a ``DataLoader`` over dict rows (the original quick start's form) into a ``Dataset``.

    Every row of ``loader.dataset`` is kept; tensors become lists.
    """
    source = loader.dataset
    if isinstance(source, Dataset):
        return source
    rows = []
    for i in range(len(source)):  # type: ignore[arg-type]
        row = source[i]
        if not isinstance(row, dict):
            raise TypeError(
                "A DataLoader given to train_task must yield dict rows (e.g. input_ids, labels); "
                f"row {i} is a {type(row).__name__}."
            )
        rows.append({k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
    if not rows:
        raise ValueError("The DataLoader's dataset is empty.")
    return Dataset.from_list(rows)
