"""Continual-learning metrics computed from a task-by-task score matrix.

All functions here are pure: they take the score matrix ``R`` (and optionally the
pre-training baseline ``b``) as nested Python sequences and return plain floats, so
they can be used on results loaded from JSON without torch.

Notation (Lopez-Paz & Ranzato 2017, https://arxiv.org/abs/1706.08840; Chaudhry et al.
2018, https://arxiv.org/abs/1801.10112):

- ``R[i][j]`` is the score on task ``j`` after training on task ``i``. ``R`` has one row
  per task trained so far (``t`` rows) and one column per task of the stream (``T``
  columns, ``t <= T``). Entries may be ``None`` (or NaN) where a task was not evaluated;
  missing entries are skipped when averaging.
- ``b[j]`` is the score on task ``j`` before any training.

Every metric takes ``higher_is_better``. For a lower-is-better score (loss, perplexity)
the scores are negated internally, so a positive BWT/FWT always means improvement and a
positive forgetting always means the score got worse. A metric that is undefined for the
given matrix (BWT after a single task, FWT without a baseline, ...) is returned as
``None`` rather than ``0.0`` or NaN, so that "no forgetting" and "nothing to measure" are
not confused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ScoreMatrix",
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "summarize",
]

ScoreMatrix = Sequence[Sequence[Any]]
"""A ``t x T`` score matrix: ``t`` trained tasks (rows) by ``T`` stream tasks (columns)."""

_Matrix = list[list[float | None]]


def _as_score(value: Any, where: str) -> float | None:
    """Converts one entry to ``float``, mapping ``None`` and NaN to ``None`` (missing)."""
    if value is None:
        return None
    # bool is an int subclass; a True/False in a score matrix is almost certainly a bug.
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a number or None, got bool {value!r}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number or None, got {type(value).__name__} {value!r}") from None
    # NaN is how numpy/pandas spell "missing"; treating it as None keeps it out of means.
    return None if math.isnan(score) else score


def _validate_matrix(R: ScoreMatrix) -> _Matrix:
    """Checks that ``R`` is rectangular with at most as many rows as columns.

    Returns:
        `list[list[float | None]]`: a copy of ``R`` with entries normalised by `_as_score`.
    """
    # Accept any iterable of iterables (lists, tuples, numpy arrays), but not strings,
    # which are iterable and would otherwise turn into a matrix of characters.
    if isinstance(R, (str, bytes)) or not hasattr(R, "__iter__"):
        raise ValueError(f"score matrix must be a sequence of rows, got {type(R).__name__}")
    rows = []
    for i, row in enumerate(R):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            raise ValueError(f"score matrix row {i} must be a sequence of scores, got {type(row).__name__}")
        rows.append(list(row))
    if not rows:
        return []
    num_cols = None
    for i, row in enumerate(rows):
        if num_cols is None:
            num_cols = len(row)
        elif len(row) != num_cols:
            raise ValueError(
                f"score matrix is ragged: row 0 has {num_cols} columns but row {i} has {len(row)}; "
                "every row must hold one entry (or None) per task of the stream"
            )
    if len(rows) > num_cols:
        raise ValueError(
            f"score matrix has {len(rows)} rows (trained tasks) but only {num_cols} columns (stream tasks); "
            "rows are tasks trained so far and cannot outnumber the tasks in the stream"
        )
    return [[_as_score(v, f"R[{i}][{j}]") for j, v in enumerate(row)] for i, row in enumerate(rows)]


def _validate_baseline(b: Sequence[Any] | None, num_cols: int) -> list[float | None] | None:
    if b is None:
        return None
    if isinstance(b, (str, bytes)) or not hasattr(b, "__iter__"):
        raise ValueError(f"baseline must be a sequence of scores, got {type(b).__name__}")
    b = list(b)
    if len(b) != num_cols:
        raise ValueError(
            f"baseline has {len(b)} entries but the score matrix has {num_cols} columns; "
            "the baseline needs one entry (or None) per task of the stream"
        )
    return [_as_score(v, f"b[{j}]") for j, v in enumerate(b)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _sign(higher_is_better: bool) -> float:
    # One code path for both directions: multiply every score by the sign, so that
    # "larger is better" holds for the signed scores and all formulas stay the same.
    return 1.0 if higher_is_better else -1.0


def _average_accuracy(R: _Matrix) -> float | None:
    t = len(R)
    if t == 0:
        return None
    return _mean([v for v in R[t - 1][:t] if v is not None])


def _backward_transfer(R: _Matrix, sign: float) -> float | None:
    t = len(R)
    diffs = [
        sign * (R[t - 1][j] - R[j][j])
        for j in range(t - 1)
        if R[t - 1][j] is not None and R[j][j] is not None
    ]
    return _mean(diffs)


def _forward_transfer(R: _Matrix, b: list[float | None] | None, sign: float) -> float | None:
    if b is None:
        return None
    t = len(R)
    # Task j's zero-shot score is read from row j-1 (after the previous task), so j runs
    # over 1..t-1; the first task has no "previous task" and is excluded by definition.
    diffs = [
        sign * (R[j - 1][j] - b[j])
        for j in range(1, t)
        if R[j - 1][j] is not None and b[j] is not None
    ]
    return _mean(diffs)


def _forgetting(R: _Matrix, sign: float) -> float | None:
    t = len(R)
    per_task = []
    for j in range(t - 1):
        final = R[t - 1][j]
        # Best score the task ever had *after* it was learned (rows j..t-2). Rows before j
        # are zero-shot scores; counting them would call an untrained task "forgotten".
        earlier = [sign * R[l][j] for l in range(j, t - 1) if R[l][j] is not None]
        if final is None or not earlier:
            continue
        per_task.append(max(earlier) - sign * final)
    return _mean(per_task)


def average_accuracy(R: ScoreMatrix) -> float | None:
    """Average score over the tasks seen so far, after the last trained task.

    ``ACC = mean_{j < t} R[t-1][j]``. The name follows the literature, but it is just the
    mean of whatever score ``R`` holds (exact match, loss, ...), so it needs no
    ``higher_is_better``.

    Args:
        R (`Sequence[Sequence[float | None]]`):
            Score matrix with ``t`` rows (trained tasks) and ``T >= t`` columns (stream tasks).

    Returns:
        `float | None`: the average, or ``None`` when ``R`` is empty or every entry is missing.

    Raises:
        ValueError: if ``R`` is ragged or has more rows than columns.

    Example:

    ```python
    >>> average_accuracy([[0.9, 0.1], [0.7, 0.8]])
    0.75

    ```
    """
    return _average_accuracy(_validate_matrix(R))


def backward_transfer(R: ScoreMatrix, higher_is_better: bool = True) -> float | None:
    """Backward transfer: how much training later tasks changed the earlier ones.

    ``BWT = mean_{j < t-1} (R[t-1][j] - R[j][j])``; negative values mean forgetting. For a
    lower-is-better score the sign is flipped so that positive still means improvement.

    Args:
        R (`Sequence[Sequence[float | None]]`):
            Score matrix with ``t`` rows (trained tasks) and ``T >= t`` columns (stream tasks).
        higher_is_better (`bool`, *optional*, defaults to `True`):
            Whether a larger score is better (accuracy) or worse (loss, perplexity).

    Returns:
        `float | None`: the backward transfer, or ``None`` with fewer than two trained tasks
        or when every needed entry is missing.

    Raises:
        ValueError: if ``R`` is ragged or has more rows than columns.

    Example:

    ```python
    >>> backward_transfer([[1.0, 0.25], [0.75, 0.5]])  # task 0 fell from 1.0 to 0.75
    -0.25
    >>> backward_transfer([[1.0, 3.0], [1.5, 0.8]], higher_is_better=False)  # loss rose by 0.5
    -0.5

    ```
    """
    return _backward_transfer(_validate_matrix(R), _sign(higher_is_better))


def forward_transfer(
    R: ScoreMatrix, b: Sequence[float | None] | None, higher_is_better: bool = True
) -> float | None:
    """Forward transfer: how much earlier tasks help a task before it is trained on.

    ``FWT = mean_{0 < j < t} (R[j-1][j] - b[j])``, comparing task ``j``'s score just before
    its own training with its score before any training. For a lower-is-better score the
    sign is flipped so that positive still means improvement.

    Args:
        R (`Sequence[Sequence[float | None]]`):
            Score matrix with ``t`` rows (trained tasks) and ``T >= t`` columns (stream tasks).
        b (`Sequence[float | None]`, *optional*):
            Scores of the untrained model, one per stream task (``T`` entries).
        higher_is_better (`bool`, *optional*, defaults to `True`):
            Whether a larger score is better (accuracy) or worse (loss, perplexity).

    Returns:
        `float | None`: the forward transfer, or ``None`` when ``b`` is ``None``, fewer than two
        tasks were trained, or every needed entry is missing.

    Raises:
        ValueError: if ``R`` is ragged or has more rows than columns, or ``b`` has the wrong length.

    Example:

    ```python
    >>> forward_transfer([[0.75, 0.375], [0.5, 0.75]], b=[0.0, 0.125])  # task 1 rose 0.125 -> 0.375 untrained
    0.25

    ```
    """
    matrix = _validate_matrix(R)
    if not matrix:
        return None
    return _forward_transfer(matrix, _validate_baseline(b, len(matrix[0])), _sign(higher_is_better))


def forgetting(R: ScoreMatrix, higher_is_better: bool = True) -> float | None:
    """Average forgetting: how far each earlier task fell from its best score.

    ``f_j = max_{j <= l < t-1} R[l][j] - R[t-1][j]``, averaged over ``j < t-1``. The maximum
    only runs over rows after task ``j`` was learned. For a lower-is-better score this becomes
    ``R[t-1][j] - min_l R[l][j]``, so positive always means the task got worse.

    Args:
        R (`Sequence[Sequence[float | None]]`):
            Score matrix with ``t`` rows (trained tasks) and ``T >= t`` columns (stream tasks).
        higher_is_better (`bool`, *optional*, defaults to `True`):
            Whether a larger score is better (accuracy) or worse (loss, perplexity).

    Returns:
        `float | None`: the average forgetting, or ``None`` with fewer than two trained tasks or
        when every needed entry is missing.

    Raises:
        ValueError: if ``R`` is ragged or has more rows than columns.

    Example:

    ```python
    >>> forgetting([[0.5, 0.0, 0.0], [0.75, 0.5, 0.0], [0.25, 0.25, 0.75]])  # ((0.75-0.25) + (0.5-0.25)) / 2
    0.375

    ```
    """
    return _forgetting(_validate_matrix(R), _sign(higher_is_better))


def summarize(
    R: ScoreMatrix, b: Sequence[float | None] | None = None, higher_is_better: bool = True
) -> dict[str, float | None]:
    """Computes every metric of this module at once.

    Args:
        R (`Sequence[Sequence[float | None]]`):
            Score matrix with ``t`` rows (trained tasks) and ``T >= t`` columns (stream tasks).
        b (`Sequence[float | None]`, *optional*):
            Scores of the untrained model, one per stream task; without it ``"fwt"`` is ``None``.
        higher_is_better (`bool`, *optional*, defaults to `True`):
            Whether a larger score is better (accuracy) or worse (loss, perplexity).

    Returns:
        `dict[str, float | None]`: keys ``"acc"``, ``"bwt"``, ``"fwt"`` and ``"forgetting"``;
        undefined values are ``None``.

    Raises:
        ValueError: if ``R`` is ragged or has more rows than columns, or ``b`` has the wrong length.

    Example:

    ```python
    >>> summarize([[0.5, 0.25], [0.25, 1.0]], b=[0.0, 0.0])
    {'acc': 0.625, 'bwt': -0.25, 'fwt': 0.25, 'forgetting': 0.25}

    ```
    """
    matrix = _validate_matrix(R)
    sign = _sign(higher_is_better)
    baseline = _validate_baseline(b, len(matrix[0])) if matrix else None
    return {
        "acc": _average_accuracy(matrix),
        "bwt": _backward_transfer(matrix, sign),
        "fwt": _forward_transfer(matrix, baseline, sign) if matrix else None,
        "forgetting": _forgetting(matrix, sign),
    }
