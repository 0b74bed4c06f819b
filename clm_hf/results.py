"""Storage for the scores of a continual-learning run, with JSON save/load and tables.

`ContinualResults` keeps one score matrix ``R`` per metric (see `clm_hf.metrics` for the
notation) plus the pre-training baseline, and knows how to summarise, print and persist
them. The JSON file is the hand-over point between training and reporting
(`clm_hf.plots.write_report` reads it back), so it is versioned and validated on load.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_write_text
from .metrics import summarize

__all__ = ["FORMAT_VERSION", "HIGHER_IS_BETTER", "ContinualResults", "comparison_table"]

FORMAT_VERSION = 1
"""Version of the JSON layout written by `ContinualResults.to_dict`; bump on incompatible changes."""

HIGHER_IS_BETTER: dict[str, bool] = {
    "exact_match": True,
    "token_accuracy": True,
    "loss": False,
    "perplexity": False,
}
"""Direction of the built-in metrics; metrics not listed here default to higher-is-better."""

_SUMMARY_KEYS = ("acc", "bwt", "fwt", "forgetting")
_SUMMARY_HEADERS = ("ACC", "BWT", "FWT", "forgetting")
_MISSING = "n/a"


def _clean_score(value: Any, where: str) -> float | None:
    """Converts one score to ``float``; ``None``, NaN and +-inf become ``None``.

    Non-finite values are dropped because JSON has no spelling for them (Python would write
    the non-standard ``NaN``/``Infinity`` tokens that other readers reject) and because a
    diverged evaluation is better shown as missing than averaged into a metric.
    """
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ValueError(f"{where} must be a number or None, got {type(value).__name__} {value!r}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number or None, got {type(value).__name__} {value!r}") from None
    return score if math.isfinite(score) else None


def _clean_vector(values: Any, length: int, where: str) -> list[float | None]:
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{where} must be a list of {length} scores, got {type(values).__name__}")
    values = list(values)
    if len(values) != length:
        raise ValueError(
            f"{where} has {len(values)} entries but the stream has {length} tasks; use None for tasks not evaluated"
        )
    return [_clean_score(v, f"{where}[{j}]") for j, v in enumerate(values)]


def _jsonable(value: Any, where: str) -> Any:
    """Returns a JSON-safe copy of ``value``: NaN/inf -> ``None``, tuples -> lists, numpy -> Python.

    Raises `TypeError` naming the offending key rather than letting `json.dumps` fail later
    with a message that does not say where the bad value lives.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return _jsonable(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    # numpy / torch scalars and arrays, without importing either library.
    if hasattr(value, "tolist") and callable(value.tolist):
        return _jsonable(value.tolist(), where)
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item(), where)
    raise TypeError(f"{where} is not JSON-serializable: {type(value).__name__} {value!r}")


def _fmt(value: float | None, digits: int = 3) -> str:
    return _MISSING if value is None else f"{value:.{digits}f}"


def _md_cell(text: str) -> str:
    # A literal "|" would split the Markdown cell; newlines would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first_left: bool = True) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    seps = [":---" if (i == 0 and align_first_left) else "---:" for i in range(len(header))]
    lines.append("| " + " | ".join(seps) + " |")
    lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        # First column (row labels) left-aligned, numbers right-aligned so decimals line up.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


@dataclass
class ContinualResults:
    """Scores of one continual-learning run: a score matrix per metric, plus baseline and metadata.

    For each metric, ``scores[metric]`` is the matrix ``R`` of `clm_hf.metrics`: row ``i`` holds
    the score on every task of the stream after training task ``i``, with ``None`` where a task
    was not evaluated. Scores that are NaN or infinite are stored as ``None`` (JSON cannot hold
    them).

    Args:
        task_names (`list[str]`):
            Names of all tasks of the stream, in training order. Must be unique.
        scores (`dict[str, list[list[float | None]]]`, *optional*):
            Metric name -> score matrix (one row per trained task, ``len(task_names)`` columns).
            Usually filled with `add_row`.
        baseline (`dict[str, list[float | None]]`, *optional*):
            Metric name -> scores of the model before any training. Set with `set_baseline`.
        higher_is_better (`dict[str, bool]`, *optional*):
            Direction per metric. Missing metrics default to `HIGHER_IS_BETTER`, else ``True``.
        primary_metric (`str`, *optional*, defaults to `"exact_match"`):
            Metric used when a method is called with ``metric=None``. If the run did not record
            it, the first recorded metric is used instead.
        metadata (`dict[str, Any]`, *optional*):
            JSON-able extras (strategy, config, timings, ``"parameter_usage"`` for PackNet, ...).
        reference (`dict[str, dict[str, list[float | None]]]`, *optional*):
            Scores of the reference sets: eval sets that are scored but never trained on (general
            ability). Set name -> metric -> one score per trained task (same rows as ``scores``).
            They are kept apart from the task columns, so ACC/BWT/FWT/forgetting never include them.
        reference_baseline (`dict[str, dict[str, float | None]]`, *optional*):
            Set name -> metric -> score before any training.
        reference_metric (`str`, *optional*, defaults to `"perplexity"`):
            The reference score shown in tables, summaries and plots (the first recorded metric
            when the sets do not have it).

    Example:

    ```python
    >>> res = ContinualResults(task_names=["a", "b"])
    >>> res.set_baseline({"exact_match": [0.0, 0.0]})
    >>> res.add_row({"exact_match": [0.75, 0.25]})
    >>> res.add_row({"exact_match": [0.5, 1.0]})
    >>> res.summary()
    {'acc': 0.75, 'bwt': -0.25, 'fwt': 0.25, 'forgetting': 0.25}

    ```
    """

    task_names: list[str]
    scores: dict[str, list[list[float | None]]] = field(default_factory=dict)
    baseline: dict[str, list[float | None]] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    primary_metric: str = "exact_match"
    metadata: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    reference_baseline: dict[str, dict[str, float | None]] = field(default_factory=dict)
    reference_metric: str = "perplexity"

    def __post_init__(self) -> None:
        # Validate and normalise here so that objects built directly, via from_dict or via
        # add_row all obey the same invariants (rectangular matrices, no NaN, same row count).
        if isinstance(self.task_names, (str, bytes)) or not hasattr(self.task_names, "__iter__"):
            raise ValueError(f"task_names must be a list of strings, got {type(self.task_names).__name__}")
        self.task_names = list(self.task_names)
        if not all(isinstance(n, str) for n in self.task_names):
            raise ValueError(f"task_names must all be strings, got {self.task_names!r}")
        if len(set(self.task_names)) != len(self.task_names):
            dupes = sorted({n for n in self.task_names if self.task_names.count(n) > 1})
            raise ValueError(f"task_names must be unique, duplicated: {dupes}")
        if not isinstance(self.primary_metric, str):
            raise ValueError(f"primary_metric must be a string, got {type(self.primary_metric).__name__}")
        for name, value in (("scores", self.scores), ("baseline", self.baseline),
                            ("higher_is_better", self.higher_is_better), ("metadata", self.metadata)):
            if not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a dict, got {type(value).__name__}")

        num_tasks = len(self.task_names)
        scores: dict[str, list[list[float | None]]] = {}
        for metric, rows in self.scores.items():
            where = f"scores[{metric!r}]"
            if isinstance(rows, (str, bytes, Mapping)) or not hasattr(rows, "__iter__"):
                raise ValueError(f"{where} must be a list of rows, got {type(rows).__name__}")
            rows = [_clean_vector(row, num_tasks, f"{where}[{i}]") for i, row in enumerate(rows)]
            if len(rows) > num_tasks:
                raise ValueError(f"{where} has {len(rows)} rows but the stream has only {num_tasks} tasks")
            scores[str(metric)] = rows
        row_counts = {m: len(r) for m, r in scores.items()}
        if len(set(row_counts.values())) > 1:
            raise ValueError(f"every metric must have one row per trained task, got row counts {row_counts}")
        self.scores = scores
        self.baseline = {
            str(m): _clean_vector(v, num_tasks, f"baseline[{m!r}]") for m, v in self.baseline.items()
        }
        for metric, flag in self.higher_is_better.items():
            if not isinstance(flag, bool):
                raise ValueError(f"higher_is_better[{metric!r}] must be a bool, got {type(flag).__name__} {flag!r}")
        self.higher_is_better = dict(self.higher_is_better)
        for metric in [*self.scores, *self.baseline]:
            self._register_metric(metric)
        self.metadata = dict(self.metadata)
        self._check_reference(max(row_counts.values(), default=0) if scores else None)

    def _check_reference(self, task_rows: int | None) -> None:
        """Validate the reference-set fields: one score per trained task, as many rows as ``scores``."""
        if not isinstance(self.reference_metric, str):
            raise ValueError(f"reference_metric must be a string, got {type(self.reference_metric).__name__}")
        for name, value in (("reference", self.reference), ("reference_baseline", self.reference_baseline)):
            if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                raise ValueError(f"{name} must be a dict set name -> {{metric: scores}}, got {value!r}")
        reference: dict[str, dict[str, list[float | None]]] = {}
        for set_name, metrics in self.reference.items():
            reference[str(set_name)] = {}
            for metric, values in metrics.items():
                where = f"reference[{set_name!r}][{metric!r}]"
                if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
                    raise ValueError(f"{where} must be a list with one score per trained task, got {type(values).__name__}")
                reference[str(set_name)][str(metric)] = [_clean_score(v, f"{where}[{i}]") for i, v in enumerate(values)]
        counts = {f"reference[{n!r}][{m!r}]": len(v) for n, ms in reference.items() for m, v in ms.items()}
        if task_rows is not None:
            counts["scores"] = task_rows
        if len(set(counts.values())) > 1:
            raise ValueError(f"the reference sets must have one score per trained task, like scores; got row counts {counts}")
        if max(counts.values(), default=0) > len(self.task_names):
            raise ValueError(f"the reference sets have {max(counts.values())} rows but the stream has only "
                             f"{len(self.task_names)} tasks")
        self.reference = reference
        self.reference_baseline = {
            str(n): {str(m): _clean_score(v, f"reference_baseline[{n!r}][{m!r}]") for m, v in ms.items()}
            for n, ms in self.reference_baseline.items()
        }
        for metrics in [*self.reference.values(), *self.reference_baseline.values()]:
            for metric in metrics:
                self._register_metric(metric)

    # ------------------------------------------------------------------ recording

    def _register_metric(self, metric: str) -> None:
        # Store the direction explicitly so the saved JSON is self-describing even if
        # HIGHER_IS_BETTER changes in a later version.
        self.higher_is_better.setdefault(metric, HIGHER_IS_BETTER.get(metric, True))

    def set_baseline(self, scores: dict[str, list[float | None]],
                     reference: Mapping[str, Mapping[str, float | None]] | None = None) -> None:
        """Records the scores of the model before any training (the ``b`` vector of FWT).

        Args:
            scores (`dict[str, list[float | None]]`):
                Metric name -> one score per stream task (``None`` where not evaluated).
                Replaces the baseline of those metrics; other metrics are kept.
            reference (`dict[str, dict[str, float]]`, *optional*):
                Reference set name -> metric -> score before training.

        Raises:
            ValueError: if a vector does not have one entry per task or holds a non-number.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a", "b"])
        >>> res.set_baseline({"loss": [2.5, 3.0]})
        >>> res.baseline
        {'loss': [2.5, 3.0]}

        ```
        """
        if not isinstance(scores, Mapping):
            raise ValueError(f"set_baseline expects a dict metric -> scores, got {type(scores).__name__}")
        # Validate everything before mutating, so a bad call leaves the object unchanged.
        cleaned = {str(m): _clean_vector(v, len(self.task_names), f"baseline[{m!r}]") for m, v in scores.items()}
        ref = self._clean_reference(reference, "reference_baseline")
        self.baseline.update(cleaned)
        for set_name, metrics in ref.items():
            self.reference_baseline.setdefault(set_name, {}).update(metrics)
        for metric in [*cleaned, *(m for ms in ref.values() for m in ms)]:
            self._register_metric(metric)

    @staticmethod
    def _clean_reference(reference: Mapping[str, Mapping[str, Any]] | None, where: str) -> dict[str, dict[str, float | None]]:
        if reference is None:
            return {}
        if not isinstance(reference, Mapping) or not all(isinstance(v, Mapping) for v in reference.values()):
            raise ValueError(f"{where} expects a dict set name -> {{metric: score}}, got {reference!r}")
        return {str(n): {str(m): _clean_score(v, f"{where}[{n!r}][{m!r}]") for m, v in ms.items()}
                for n, ms in reference.items()}

    def add_task(self, name: str) -> None:
        """Appends a task to the stream (a new column, ``None`` in every earlier row).

        Used when tasks arrive one at a time (``train_task``) rather than as a known stream.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a"])
        >>> res.add_row({"exact_match": [0.9]})
        >>> res.add_task("b")
        >>> res.matrix()
        [[0.9, None]]

        ```
        """
        name = str(name)
        if name in self.task_names:
            raise ValueError(f"task {name!r} is already in the stream")
        self.task_names.append(name)
        for rows in self.scores.values():
            for row in rows:
                row.append(None)
        for vector in self.baseline.values():
            vector.append(None)

    def move_task(self, name: str, position: int) -> None:
        """Moves the column of task ``name`` to ``position`` in every score matrix and the baseline.

        The metrics read column ``j`` as the ``j``-th trained task, so a task registered for
        evaluation before others (``add_eval_task``) is moved to its training position when it is
        trained. Only untrained columns (``position`` and after) may move.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["reverse", "copy"])
        >>> res.set_baseline({"exact_match": [0.1, 0.2]})
        >>> res.move_task("copy", 0)
        >>> res.task_names, res.baseline["exact_match"]
        (['copy', 'reverse'], [0.2, 0.1])

        ```
        """
        name = str(name)
        if name not in self.task_names:
            raise ValueError(f"task {name!r} is not in the stream {self.task_names}")
        old = self.task_names.index(name)
        if old == position:
            return
        if position < self.num_trained or old < self.num_trained or not 0 <= position < len(self.task_names):
            raise ValueError(
                f"cannot move task {name!r} from column {old} to {position}: the first {self.num_trained} "
                "columns are the tasks already trained, in order"
            )

        def moved(values: list) -> list:
            values = list(values)
            values.insert(position, values.pop(old))
            return values

        self.task_names = moved(self.task_names)
        for metric, rows in self.scores.items():
            self.scores[metric] = [moved(row) for row in rows]
        for metric, vector in self.baseline.items():
            self.baseline[metric] = moved(vector)

    def add_row(self, scores: dict[str, list[float | None]],
                reference: Mapping[str, Mapping[str, float | None]] | None = None) -> None:
        """Appends the scores measured after training the next task of the stream.

        Metrics recorded before but absent from ``scores`` get a row of ``None``; a metric seen
        for the first time gets ``None`` rows for the earlier tasks. That keeps every matrix
        with one row per trained task.

        Args:
            scores (`dict[str, list[float | None]]`):
                Metric name -> one score per stream task (``None`` where not evaluated).
            reference (`dict[str, dict[str, float]]`, *optional*):
                Reference set name -> metric -> score after this task. Sets and metrics recorded
                before but missing here get ``None``. ``scores`` may be empty when this is given.

        Raises:
            ValueError: if ``scores`` and ``reference`` are both empty, a vector has the wrong length or holds a
                non-number, or every task of the stream already has a row.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a", "b"])
        >>> res.add_row({"exact_match": [0.9, None]})
        >>> res.num_trained
        1

        ```
        """
        if not isinstance(scores, Mapping) or not (scores or reference):
            raise ValueError("add_row expects a non-empty dict metric -> scores")
        num_tasks = len(self.task_names)
        row_index = self.num_trained
        if row_index >= num_tasks:
            raise ValueError(f"all {num_tasks} tasks of the stream already have a row; cannot add another")
        cleaned = {str(m): _clean_vector(v, num_tasks, f"scores[{m!r}][{row_index}]") for m, v in scores.items()}
        ref = self._clean_reference(reference, f"reference row {row_index}")
        for metric in cleaned:
            if metric not in self.scores:
                self.scores[metric] = [[None] * num_tasks for _ in range(row_index)]
                self._register_metric(metric)
        for metric, rows in self.scores.items():
            rows.append(cleaned.get(metric, [None] * num_tasks))
        for set_name, metrics in ref.items():
            for metric in metrics:
                if metric not in self.reference.setdefault(set_name, {}):
                    self.reference[set_name][metric] = [None] * row_index
                    self._register_metric(metric)
        for set_name, metrics in self.reference.items():
            for metric, values in metrics.items():
                values.append(ref.get(set_name, {}).get(metric))

    # ------------------------------------------------------------------ access

    @property
    def num_trained(self) -> int:
        """`int`: number of tasks trained so far (rows of every score matrix)."""
        reference_rows = (len(v) for ms in self.reference.values() for v in ms.values())
        return max((*(len(rows) for rows in self.scores.values()), *reference_rows), default=0)

    @property
    def metrics(self) -> list[str]:
        """`list[str]`: names of the metrics recorded, in the score matrices or the baseline."""
        return list(dict.fromkeys([*self.scores, *self.baseline]))

    def resolve_metric(self, metric: str | None = None) -> str:
        """Returns the metric a method uses for ``metric``.

        ``None`` means `primary_metric`, or the first recorded metric when the primary one was
        never recorded (e.g. a run that only measured ``"loss"``).

        Args:
            metric (`str`, *optional*): explicit metric name.

        Returns:
            `str`: the metric name.

        Raises:
            KeyError: if an explicit ``metric`` was not recorded.

        Example:

        ```python
        >>> ContinualResults(task_names=["a"], scores={"loss": [[1.0]]}).resolve_metric()
        'loss'

        ```
        """
        recorded = self.metrics
        if metric is None:
            if self.primary_metric in recorded or not recorded:
                return self.primary_metric
            return recorded[0]
        # Nothing recorded yet: the primary metric is still a valid (empty) name to ask for.
        if metric not in recorded and not (not recorded and metric == self.primary_metric):
            raise KeyError(f"metric {metric!r} was not recorded; available: {recorded}")
        return metric

    def matrix(self, metric: str | None = None) -> list[list[float | None]]:
        """Returns a copy of the score matrix ``R`` of one metric.

        Args:
            metric (`str`, *optional*): metric name; defaults to `primary_metric`.

        Returns:
            `list[list[float | None]]`: one row per trained task, one column per stream task.
            Empty if nothing was recorded yet.

        Raises:
            KeyError: if ``metric`` was not recorded.

        Example:

        ```python
        >>> ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.5, None]]}).matrix()
        [[0.5, None]]

        ```
        """
        name = self.resolve_metric(metric)
        if name in self.scores:
            return [list(row) for row in self.scores[name]]
        # Metric only in the baseline (or nothing recorded yet): no score after any stage.
        return [[None] * len(self.task_names) for _ in range(self.num_trained)]

    def summary(self, metric: str | None = None) -> dict[str, float | None]:
        """Computes ACC, BWT, FWT and forgetting for one metric (see `clm_hf.metrics.summarize`).

        Args:
            metric (`str`, *optional*): metric name; defaults to `primary_metric`.

        Returns:
            `dict[str, float | None]`: keys ``"acc"``, ``"bwt"``, ``"fwt"``, ``"forgetting"``;
            ``None`` where undefined. Signs follow `higher_is_better`, so positive BWT/FWT is
            always an improvement and positive forgetting always a loss.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a", "b"], scores={"loss": [[1.0, 3.0], [1.5, 0.5]]})
        >>> res.summary("loss")["bwt"]  # the loss of task "a" went up by 0.5
        -0.5

        ```
        """
        name = self.resolve_metric(metric)
        return summarize(
            self.matrix(name),
            self.baseline.get(name),
            self.higher_is_better.get(name, HIGHER_IS_BETTER.get(name, True)),
        )

    def stalled_primary_metric(self, tolerance: float = 1e-9) -> str | None:
        """Says whether the summary's metric has not moved while the model did.

        The summary (ACC/BWT/FWT/forgetting), [`comparison_table`] and the plots use `primary_metric`. When every
        score of that metric so far (baseline and every row, all tasks) is the same value while `token_accuracy`
        or `loss` changed, they report "no forgetting" whatever happened: typically exact match of multi-token
        free-text answers, which stays 0.0 while the model learns and forgets. The trainer logs the returned text
        once per run, after a task's evaluation.

        Args:
            tolerance (`float`, *optional*, defaults to 1e-9): Largest spread of values still counted as "not moved".

        Returns:
            `str | None`: A warning naming the metric, its constant value and the metric that moved, with a
            suggestion; `None` when the primary metric moved, or nothing else was seen to move.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a", "b"])
        >>> res.set_baseline({"exact_match": [0.0, 0.0], "token_accuracy": [0.1, 0.1]})
        >>> res.add_row({"exact_match": [0.0, 0.0], "token_accuracy": [0.85, 0.2]})
        >>> print(res.stalled_primary_metric())  # doctest: +ELLIPSIS
        The primary metric 'exact_match' is 0.0 in every evaluation so far, while the token_accuracy of task 'a' moved ...

        ```
        """
        def evaluations(metric: str) -> list[list[float | None]]:
            baseline = self.baseline.get(metric)
            return ([list(baseline)] if baseline else []) + [list(row) for row in self.scores.get(metric, [])]

        primary = self.resolve_metric()
        seen = [v for row in evaluations(primary) for v in row if v is not None]
        if len(seen) < 2 or max(seen) - min(seen) > tolerance:
            return None
        for other in ("token_accuracy", "loss"):
            if other == primary:
                continue
            rows = evaluations(other)
            # A task's own score across evaluations: different tasks differ anyway, that is not movement.
            for column, task in enumerate(self.task_names):
                moved = [row[column] for row in rows if row[column] is not None]
                if len(moved) < 2 or max(moved) - min(moved) <= tolerance:
                    continue
                suggestion = ("primary_metric=\"token_accuracy\"" if primary != "token_accuracy"
                              else "primary_metric=\"loss\"")
                return (
                    f"The primary metric {primary!r} is {round(seen[0], 4)!r} in every evaluation so far, while the "
                    f"{other} of task {task!r} moved (from {moved[0]:.4g} to {moved[-1]:.4g}): the summary (ACC, BWT, "
                    "FWT, forgetting), the comparison tables and the plots are computed on a metric that does not "
                    "move, so they show no forgetting whatever the model learned or lost. Exact match of a whole "
                    f"multi-token answer is often 0.0 throughout. Set {suggestion} (or a generation metric, e.g. "
                    "generation_metrics=[\"rouge_l\"] with primary_metric=\"gen_rouge_l\"); every metric's matrix is "
                    "kept, so results.summary(\"token_accuracy\") reads it now."
                )
        return None

    def summaries(self) -> dict[str, dict[str, float | None]]:
        """Computes `summary` for every metric that has a score matrix.

        Returns:
            `dict[str, dict[str, float | None]]`: metric name -> summary.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a"], scores={"exact_match": [[1.0]], "loss": [[0.5]]})
        >>> sorted(res.summaries())
        ['exact_match', 'loss']

        ```
        """
        return {metric: self.summary(metric) for metric in self.scores}

    # ------------------------------------------------------------------ reference sets

    @property
    def reference_names(self) -> list[str]:
        """`list[str]`: names of the reference sets (scored, never trained), in the order recorded."""
        return list(dict.fromkeys([*self.reference_baseline, *self.reference]))

    def _reference_metrics(self, set_name: str) -> list[str]:
        return list(dict.fromkeys([*self.reference_baseline.get(set_name, {}), *self.reference.get(set_name, {})]))

    def resolve_reference_metric(self, set_name: str, metric: str | None = None) -> str:
        """The metric shown for a reference set: ``metric``, else `reference_metric`, else the first recorded.

        Raises:
            KeyError: if the set or an explicit ``metric`` was not recorded.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a"], reference_baseline={"general": {"loss": 3.0}})
        >>> res.resolve_reference_metric("general")
        'loss'

        ```
        """
        if set_name not in self.reference_names:
            raise KeyError(f"reference set {set_name!r} was not recorded; reference sets: {self.reference_names}")
        recorded = self._reference_metrics(set_name)
        if metric is None:
            return self.reference_metric if self.reference_metric in recorded or not recorded else recorded[0]
        if metric not in recorded:
            raise KeyError(f"metric {metric!r} was not recorded for reference set {set_name!r}; available: {recorded}")
        return metric

    def reference_curve(self, set_name: str, metric: str | None = None) -> list[float | None]:
        """Scores of a reference set before training, then after each trained task.

        Args:
            set_name (`str`): the reference set.
            metric (`str`, *optional*): defaults to `reference_metric`.

        Returns:
            `list[float | None]`: ``num_trained + 1`` values, the first one the baseline (``None`` if
            it was not measured).

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[1.0, 0.0]]},
        ...                        reference={"general": {"perplexity": [12.0]}},
        ...                        reference_baseline={"general": {"perplexity": 10.0}})
        >>> res.reference_curve("general")
        [10.0, 12.0]

        ```
        """
        name = self.resolve_reference_metric(set_name, metric)
        rows = self.reference.get(set_name, {}).get(name, [None] * self.num_trained)
        return [self.reference_baseline.get(set_name, {}).get(name), *rows]

    def reference_summary(self, metric: str | None = None) -> dict[str, dict[str, Any]]:
        """General-ability retention: each reference set's score before training, at the end, and the change.

        Args:
            metric (`str`, *optional*): defaults to `reference_metric` (per set, see
                `resolve_reference_metric`).

        Returns:
            `dict[str, dict]`: set name -> ``{"metric", "before", "final", "change"}`` where
            ``change = final - before`` (``None`` where either is missing). For a lower-is-better
            metric such as perplexity a positive change is a loss of general ability.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a"], scores={"exact_match": [[1.0]]},
        ...                        reference={"general": {"perplexity": [12.5]}},
        ...                        reference_baseline={"general": {"perplexity": 10.0}})
        >>> res.reference_summary()
        {'general': {'metric': 'perplexity', 'before': 10.0, 'final': 12.5, 'change': 2.5}}

        ```
        """
        out: dict[str, dict[str, Any]] = {}
        for set_name in self.reference_names:
            name = self.resolve_reference_metric(set_name, metric)
            curve = self.reference_curve(set_name, name)
            before, final = curve[0], (curve[-1] if len(curve) > 1 else None)
            change = final - before if before is not None and final is not None else None
            out[set_name] = {"metric": name, "before": before, "final": final, "change": change}
        return out

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict of this object, tagged with ``"format_version"``.

        Returns:
            `dict[str, Any]`: keys ``format_version``, ``task_names``, ``primary_metric``,
            ``higher_is_better``, ``scores``, ``baseline``, ``metadata``.

        Raises:
            TypeError: if ``metadata`` holds a value JSON cannot represent.

        Example:

        ```python
        >>> ContinualResults(task_names=["a"]).to_dict()["format_version"]
        1

        ```
        """
        return {
            "format_version": FORMAT_VERSION,
            "task_names": list(self.task_names),
            "primary_metric": self.primary_metric,
            "higher_is_better": dict(self.higher_is_better),
            # Re-clean on the way out: the fields are public and may have been edited in
            # place (e.g. a NaN appended by hand), and NaN must never reach the JSON file.
            "scores": {
                m: [_clean_vector(row, len(self.task_names), f"scores[{m!r}][{i}]") for i, row in enumerate(rows)]
                for m, rows in self.scores.items()
            },
            "baseline": {
                m: _clean_vector(vec, len(self.task_names), f"baseline[{m!r}]") for m, vec in self.baseline.items()
            },
            "metadata": _jsonable(self.metadata, "metadata"),
            # Written only when there are reference sets, so other runs' files stay as before.
            **({"reference": {n: {m: [_clean_score(v, f"reference[{n!r}][{m!r}]") for v in vs] for m, vs in ms.items()}
                              for n, ms in self.reference.items()},
                "reference_baseline": {n: {m: _clean_score(v, f"reference_baseline[{n!r}][{m!r}]") for m, v in ms.items()}
                                       for n, ms in self.reference_baseline.items()},
                "reference_metric": self.reference_metric}
               if self.reference or self.reference_baseline else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContinualResults:
        """Builds a `ContinualResults` from the output of `to_dict`.

        Args:
            d (`Mapping[str, Any]`): a dict as produced by `to_dict` (e.g. parsed JSON).

        Returns:
            `ContinualResults`: the restored object.

        Raises:
            ValueError: if ``format_version`` is missing or unknown, or the content is malformed
                (wrong types, wrong row lengths, unknown keys...); the message names the problem.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a"], scores={"exact_match": [[1.0]]})
        >>> ContinualResults.from_dict(res.to_dict()) == res
        True

        ```
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"results must be a JSON object, got {type(d).__name__}")
        if "format_version" not in d:
            raise ValueError("results have no 'format_version' key; not a clm-hf results file?")
        version = d["format_version"]
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(
                f"unsupported results format_version {version!r}; this clm-hf reads version {FORMAT_VERSION}"
            )
        known = {
            "format_version", "task_names", "scores", "baseline", "higher_is_better", "primary_metric", "metadata",
            "reference", "reference_baseline", "reference_metric",
        }
        unknown = sorted(set(d) - known)
        if unknown:
            # Same version number but extra keys means a writer we do not understand; refuse
            # rather than silently dropping data on the next save.
            raise ValueError(f"results have unknown keys {unknown}; expected a subset of {sorted(known)}")
        if "task_names" not in d:
            raise ValueError("results have no 'task_names' key")
        kwargs = {k: d[k] for k in ("scores", "baseline", "higher_is_better", "primary_metric", "metadata",
                                    "reference", "reference_baseline", "reference_metric") if k in d}
        return cls(task_names=d["task_names"], **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the results to ``path`` as JSON, atomically.

        The file is written to a temporary file in the same directory, flushed and fsynced, then
        moved over ``path`` with `os.replace`, so a crash mid-write never leaves a truncated
        file (readers see either the old or the new version). NaN is never written: scores and
        metadata floats that are not finite are saved as ``null``. Parent folders are created.

        Args:
            path (`str` or `os.PathLike`): destination file, conventionally ``results.json``.

        Raises:
            TypeError: if ``metadata`` holds a value JSON cannot represent (nothing is written).

        Example:

        ```python
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "results.json")
        >>> ContinualResults(task_names=["a"]).save(path)
        >>> ContinualResults.load(path).task_names
        ['a']

        ```
        """
        path = Path(path)
        # Serialise first: an error here must not leave a temp file (or a half file) behind.
        # allow_nan=False is a guard: _jsonable already mapped non-finite floats to None.
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ContinualResults:
        """Reads results written by `save`.

        Args:
            path (`str` or `os.PathLike`): the JSON file.

        Returns:
            `ContinualResults`: the loaded results.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the file is not valid JSON or not a valid results file; the message
                names the file and the problem.

        Example:

        ```python
        >>> ContinualResults.load("/nonexistent/results.json")
        Traceback (most recent call last):
        ...
        FileNotFoundError: results file not found: /nonexistent/results.json

        ```
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"results file not found: {path}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not a UTF-8 text file: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path} is not a valid clm-hf results file: {e}") from None

    # ------------------------------------------------------------------ tables

    def _table_rows(self, metric: str | None, digits: int) -> tuple[list[str], list[list[str]]]:
        name = self.resolve_metric(metric)
        header = [name, *self.task_names]
        # Reference sets (never trained) get their own columns, after the tasks': the table's metric
        # when the set has it, else its reference metric, named in the header.
        curves = []
        for set_name in self.reference_names:
            shown = name if name in self._reference_metrics(set_name) else self.resolve_reference_metric(set_name)
            header.append(f"ref {set_name}" + ("" if shown == name else f" ({shown})"))
            curves.append(self.reference_curve(set_name, shown))
        rows = []
        if name in self.baseline or any(c[0] is not None for c in curves):
            baseline = self.baseline.get(name, [None] * len(self.task_names))
            rows.append(["baseline", *(_fmt(v, digits) for v in baseline), *(_fmt(c[0], digits) for c in curves)])
        for i, (task, row) in enumerate(zip(self.task_names, self.matrix(name))):
            rows.append([f"after {task}", *(_fmt(v, digits) for v in row), *(_fmt(c[i + 1], digits) for c in curves)])
        return header, rows

    def to_markdown(self, metric: str | None = None, digits: int = 3) -> str:
        """Formats the score matrix as a Markdown table.

        Rows are ``"baseline"`` (if recorded) then ``"after <task>"`` for each trained task;
        columns are the stream's tasks. The top-left cell names the metric; missing scores are
        shown as ``n/a``.

        Args:
            metric (`str`, *optional*): metric name; defaults to `primary_metric`.
            digits (`int`, *optional*, defaults to 3): decimals per score.

        Returns:
            `str`: the table, without a trailing newline.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.5, None]]})
        >>> print(res.to_markdown(digits=2))
        | exact_match | a | b |
        | :--- | ---: | ---: |
        | after a | 0.50 | n/a |

        ```
        """
        return _markdown_table(*self._table_rows(metric, digits))

    def format_table(self, metric: str | None = None, digits: int = 3) -> str:
        """Formats the score matrix as a fixed-width plain-text table for a console.

        Same content as `to_markdown`.

        Args:
            metric (`str`, *optional*): metric name; defaults to `primary_metric`.
            digits (`int`, *optional*, defaults to 3): decimals per score.

        Returns:
            `str`: the table, without a trailing newline.

        Example:

        ```python
        >>> res = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.5, None]]})
        >>> print(res.format_table())
        exact_match      a    b
        -----------  -----  ---
        after a      0.500  n/a

        ```
        """
        return _text_table(*self._table_rows(metric, digits))


def comparison_table(
    results: Mapping[str, ContinualResults], metric: str | None = None, markdown: bool = False
) -> str:
    """Formats ACC, BWT, FWT and forgetting of several runs side by side.

    Args:
        results (`Mapping[str, ContinualResults]`):
            Run name (e.g. strategy) -> results. Rows keep the mapping's order.
        metric (`str`, *optional*):
            Metric to compare. Defaults to each run's primary metric; when those differ, a
            ``metric`` column is added so the rows are not mistaken for comparable numbers.
        markdown (`bool`, *optional*, defaults to `False`):
            Return a Markdown table instead of fixed-width text.

    Returns:
        `str`: the table with numbers to 3 decimals and ``n/a`` for undefined values.

    Raises:
        KeyError: if an explicit ``metric`` is missing from one of the runs.

    Example:

    ```python
    >>> a = ContinualResults(task_names=["x", "y"], scores={"exact_match": [[1.0, 0.0], [0.5, 1.0]]})
    >>> print(comparison_table({"naive": a}))
    run      ACC     BWT  FWT  forgetting
    -----  -----  ------  ---  ----------
    naive  0.750  -0.500  n/a       0.500

    ```
    """
    names = {run: res.resolve_metric(metric) for run, res in results.items()}
    show_metric = len(set(names.values())) > 1
    # General-ability retention: one column per reference set, "before -> final" of its reference metric.
    reference_sets = list(dict.fromkeys(n for res in results.values() for n in res.reference_names))
    reference_metrics = {n: list(dict.fromkeys(res.resolve_reference_metric(n) for res in results.values()
                                                if n in res.reference_names)) for n in reference_sets}
    header = ["run", *(["metric"] if show_metric else []), *_SUMMARY_HEADERS,
              *(f"ref {n} ({'/'.join(reference_metrics[n])})" for n in reference_sets)]
    rows = []
    for run, res in results.items():
        summary = res.summary(names[run])
        retention = res.reference_summary()
        cells = [f"{_fmt(retention[n]['before'])} -> {_fmt(retention[n]['final'])}" if n in retention else _MISSING
                 for n in reference_sets]
        rows.append([str(run), *([names[run]] if show_metric else []), *(_fmt(summary[k]) for k in _SUMMARY_KEYS),
                     *cells])
    return _markdown_table(header, rows) if markdown else _text_table(header, rows)
