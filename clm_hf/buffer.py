"""Reservoir-sampled replay memory backed by a 🤗 `datasets.Dataset`.

The buffer keeps a uniform random sample of everything it has been offered, whatever the number and sizes of the tasks,
using Algorithm R from J. S. Vitter, "Random sampling with a reservoir", ACM Transactions on Mathematical Software
11(1):37-57, 1985, https://doi.org/10.1145/3147.3165.

Rows are kept as Arrow data (never pickled) and the sampler state is plain JSON, so a buffer can be checkpointed next to
a model and memory-mapped back in.
"""

from __future__ import annotations

import copy
import json
import numbers
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value, concatenate_datasets, load_from_disk

from ._io import atomic_write_dir

__all__ = ["ReservoirBuffer"]

TASK_ID_COLUMN = "task_id"
STATE_FILE_NAME = "reservoir_state.json"
_STATE_FORMAT_VERSION = 1
# Random draws are planned in blocks of this many incoming rows, so that planning a huge dataset needs O(block) index
# memory instead of O(len(dataset)). The result does not depend on the block size (see `_plan_block`).
_PLAN_BLOCK_ROWS = 1 << 20


def _plan_block(
    rng: np.random.Generator, first_position: int, num_rows: int, capacity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Runs Algorithm R over one block of consecutive stream positions and returns the surviving writes.

    Args:
        rng (`np.random.Generator`):
            The reservoir's generator. Exactly one `integers(0, n)` draw is consumed per row whose 1-based stream
            position `n` exceeds `capacity`, in stream order, and none for rows that fill the reservoir. Because each
            element of an array-valued `high` is drawn in turn from the same bit stream, splitting the stream into
            blocks (or into several `add()` calls) consumes the generator exactly like one sequential loop would.
        first_position (`int`):
            1-based stream position of the block's first row.
        num_rows (`int`):
            Number of rows in the block.
        capacity (`int`):
            Reservoir size `k`.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: `(slots, rows)`, both sorted by slot with no repeated slot: block-relative row
        `rows[i]` is what slot `slots[i]` holds once the whole block has been streamed through.
    """
    positions = np.arange(first_position, first_position + num_rows, dtype=np.int64)
    slots = np.empty(num_rows, dtype=np.int64)
    filling = positions <= capacity
    # While the reservoir is not full, row n always goes to the next free slot, n - 1.
    slots[filling] = positions[filling] - 1
    replacing = ~filling
    if replacing.any():
        # j ~ U{0, ..., n-1}. P(j < k) = k/n is Algorithm R's acceptance probability, and conditioned on acceptance j is
        # uniform over the k slots, so a single draw decides both "keep?" and "which slot?" exactly like Vitter's
        # `M := TRUNC(t * RANDOM()); if M < n then C[M] := next record`.
        draws = rng.integers(0, positions[replacing])
        slots[replacing] = np.where(draws < capacity, draws, -1)
    written_rows = np.flatnonzero(slots >= 0)
    written_slots = slots[written_rows]
    # Several rows of a block may be written to the same slot; the sequential algorithm keeps the *last* one. Taking
    # the first occurrence in the reversed write list resolves that without a Python loop. (NumPy fancy assignment
    # with repeated indices does not guarantee which value wins, so it cannot be used for this.)
    unique_slots, first_in_reversed = np.unique(written_slots[::-1], return_index=True)
    return unique_slots, written_rows[::-1][first_in_reversed]


def _plan_add(rng: np.random.Generator, num_seen: int, capacity: int, num_new: int) -> np.ndarray:
    """Plans the streaming of `num_new` rows into a reservoir that has already seen `num_seen` rows.

    Args:
        rng (`np.random.Generator`): The reservoir's generator (advanced in place).
        num_seen (`int`): Rows offered before this call, over the whole stream.
        capacity (`int`): Reservoir size `k`.
        num_new (`int`): Rows offered by this call.

    Returns:
        `np.ndarray`: `source` of length `min(capacity, num_seen + num_new)`; `source[s] == -1` means slot `s` keeps
        its current row, otherwise slot `s` now holds incoming row `source[s]` (0-based index in this call's rows).
    """
    new_len = min(capacity, num_seen + num_new)
    source = np.full(new_len, -1, dtype=np.int64)
    for start in range(0, num_new, _PLAN_BLOCK_ROWS):
        stop = min(num_new, start + _PLAN_BLOCK_ROWS)
        slots, rows = _plan_block(rng, num_seen + start + 1, stop - start, capacity)
        # Blocks are applied in stream order, and slots are unique within a block, so later blocks win.
        source[slots] = rows + start
    return source


def _check_non_negative_int(name: str, value: Any, *, positive: bool = False) -> int:
    # bool is an int subclass; `capacity=True` is almost certainly a bug, so refuse it.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


class ReservoirBuffer:
    """A fixed-size replay memory holding a uniform random sample of every row ever offered to it.

    Rows are streamed through Algorithm R (Vitter 1985, "Random sampling with a reservoir",
    https://doi.org/10.1145/3147.3165): with `n` the 1-based count of rows offered so far over all `add()` calls,
    row `n` is stored if `n <= capacity`, and otherwise kept with probability `capacity / n`, overwriting a
    uniformly chosen slot. After `N` rows every row is in the buffer with probability `min(1, capacity / N)`, and the
    stored set is a uniform random subset, regardless of how the stream was split into tasks or calls: `add(a)` then
    `add(b)` gives exactly the same buffer as `add(concatenate_datasets([a, b]))` for the same seed (when `a` and `b`
    share a task id).

    Stored rows are the incoming columns unchanged plus a string column `"task_id"`. Randomness comes from a NumPy
    `Generator(PCG64(seed))` whose state is part of `state_dict()` and of `save_to_disk()`, so a reloaded buffer
    continues the stream exactly as if it had never been saved.

    Args:
        capacity (`int`):
            Maximum number of stored rows; must be `> 0`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the reservoir's random generator (non-negative).

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from clm_hf.buffer import ReservoirBuffer
    >>> buffer = ReservoirBuffer(capacity=4, seed=0)
    >>> task_a = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6]], "labels": [[1, 2], [3], [4, 5, 6]]})
    >>> buffer.add(task_a, task_id=0)
    >>> buffer.add(Dataset.from_dict({"input_ids": [[7], [8, 9]], "labels": [[7], [8, 9]]}), task_id="qa")
    >>> len(buffer), buffer.num_seen
    (4, 5)
    >>> sum(buffer.task_counts().values())
    4
    >>> replay = buffer.sample(2, seed=1)
    >>> replay.column_names
    ['input_ids', 'labels', 'task_id']
    ```
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self._capacity = _check_non_negative_int("capacity", capacity, positive=True)
        self._seed = _check_non_negative_int("seed", seed)
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        self._num_seen = 0
        # Slot s of the reservoir is row s of `_data`; keeping that invariant is what makes the stored rows (and their
        # order) identical however the stream is chunked.
        self._data: Dataset | None = None
        # Features of the user's columns (without "task_id"), fixed by the first add().
        self._features: Features | None = None
        # Task ids in the order they were first offered, so task_counts() has a stable, meaningful order.
        self._task_order: list[str] = []

    # ------------------------------------------------------------------ properties

    @property
    def capacity(self) -> int:
        """`int`: Maximum number of stored rows."""
        return self._capacity

    @property
    def num_seen(self) -> int:
        """`int`: Number of rows offered so far, over all `add()` calls and tasks."""
        return self._num_seen

    @property
    def features(self) -> Features | None:
        """`datasets.Features | None`: Features every added dataset must have (the stored columns without `"task_id"`),
        or `None` before the first `add()`. `as_dataset().features` additionally contains `"task_id"`."""
        return None if self._features is None else self._features.copy()

    def __len__(self) -> int:
        return 0 if self._data is None else len(self._data)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(capacity={self._capacity}, num_stored={len(self)}, num_seen={self._num_seen}, "
            f"task_counts={self.task_counts()})"
        )

    # ------------------------------------------------------------------ adding rows

    def _check_features(self, dataset: Dataset) -> None:
        incoming = dataset.features
        stored = self._features
        if stored is None:
            return
        problems = []
        missing = [name for name in stored if name not in incoming]
        extra = [name for name in incoming if name not in stored]
        if missing:
            problems.append(f"missing columns {missing}")
        if extra:
            problems.append(f"unexpected columns {extra}")
        for name in stored:
            if name in incoming and incoming[name] != stored[name]:
                problems.append(f"column {name!r} has type {incoming[name]!r}, buffer stores {stored[name]!r}")
        if problems:
            raise ValueError(
                "Dataset features do not match the rows already in the buffer: " + "; ".join(problems) + ". "
                "Cast the dataset (e.g. `dataset.cast(buffer.features)`) or use a separate buffer."
            )

    def add(self, dataset: Dataset, task_id: str | int) -> None:
        """Streams the rows of `dataset`, in order, through the reservoir.

        The random draws are vectorised (one `Generator.integers` call per block of rows) and the new storage is
        materialised with `select`/`concatenate_datasets`, so the cost is dominated by copying the at most `capacity`
        stored rows, not by the length of `dataset`. If nothing from `dataset` is kept, only `num_seen` changes.

        Args:
            dataset (`datasets.Dataset`):
                Rows to offer, e.g. a tokenized task. Must not be empty, must not have a `"task_id"` column, and after
                the first call must have the same column names and feature types as the stored rows.
            task_id (`str` or `int`):
                Task the rows belong to; stored as `str(task_id)` in the `"task_id"` column.

        Raises:
            `TypeError`: if `dataset` is not a `datasets.Dataset` or `task_id` is not a `str`/`int`.
            `ValueError`: if `dataset` is empty, has a `"task_id"` column, or its features do not match.

        Example:

        ```python
        >>> from datasets import Dataset
        >>> buffer = ReservoirBuffer(capacity=2)
        >>> buffer.add(Dataset.from_dict({"input_ids": [[1], [2], [3]]}), task_id=0)
        >>> len(buffer), buffer.num_seen
        (2, 3)
        ```
        """
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"ReservoirBuffer.add expects a datasets.Dataset, got {type(dataset).__name__} "
                "(pick a split of a DatasetDict first)"
            )
        if isinstance(task_id, bool) or not isinstance(task_id, (str, numbers.Integral)):
            raise TypeError(f"task_id must be a str or an int, got {task_id!r}")
        if len(dataset) == 0:
            raise ValueError(f"Cannot add the rows of task {str(task_id)!r} to the buffer: the dataset is empty (0 rows)")
        if TASK_ID_COLUMN in dataset.column_names:
            raise ValueError(
                f"The dataset already has a {TASK_ID_COLUMN!r} column, which the buffer reserves for the task id; "
                f"remove or rename it (e.g. `dataset.remove_columns({TASK_ID_COLUMN!r})`) first"
            )
        self._check_features(dataset)
        task = str(task_id)
        # Formatting (e.g. with_format("torch")) would otherwise leak into the stored rows and into concatenation.
        dataset = dataset.with_format(None)
        if self._features is not None:
            # Same columns, possibly in another order: store them in one canonical order.
            dataset = dataset.select_columns(list(self._features))

        # Snapshot the generator so a failure while materialising (disk full, ...) leaves the buffer untouched
        # instead of half-advanced.
        rng_state = self._rng.bit_generator.state
        try:
            source = _plan_add(self._rng, self._num_seen, self._capacity, len(dataset))
            self._materialise(dataset, task, source)
        except BaseException:
            self._rng.bit_generator.state = rng_state
            raise
        if self._features is None:
            self._features = dataset.features.copy()
        self._num_seen += len(dataset)
        if task not in self._task_order:
            self._task_order.append(task)

    def _materialise(self, dataset: Dataset, task: str, source: np.ndarray) -> None:
        num_stored = len(self)
        from_new = source >= 0
        if not from_new.any():
            return
        new_rows = np.unique(source[from_new])  # sorted, so the selection below reads `dataset` in order
        # Flatten here, in memory: add_column would otherwise flatten the index mapping of a non-contiguous selection
        # into a cache file written next to the *caller's* dataset files.
        incoming = dataset.select(new_rows).flatten_indices(keep_in_memory=True)
        incoming = incoming.add_column(TASK_ID_COLUMN, [task] * len(incoming), feature=Value("string"))
        combined = incoming if self._data is None else concatenate_datasets([self._data, incoming])
        # Row of `combined` that each slot should hold: the old row of the same slot, or the selected incoming row.
        index = np.arange(len(source), dtype=np.int64)
        index[from_new] = num_stored + np.searchsorted(new_rows, source[from_new])
        if len(index) != len(combined) or not np.array_equal(index, np.arange(len(combined))):
            # keep_in_memory: the storage is at most `capacity` rows, and writing a cache file would otherwise land
            # next to the buffer's own memory-mapped files (inside a saved buffer directory). flatten_indices stops
            # index mappings from piling up over many add() calls.
            combined = combined.select(index).flatten_indices(keep_in_memory=True)
        self._data = combined

    # ------------------------------------------------------------------ reading rows

    def _task_ids(self) -> list[str]:
        # The arrow view honours any index mapping, unlike `Dataset.data`, and avoids per-row Python formatting.
        if self._data is None:
            return []
        return self._data.select_columns([TASK_ID_COLUMN]).with_format("arrow")[:][TASK_ID_COLUMN].to_pylist()

    def task_counts(self) -> dict[str, int]:
        """Number of rows currently stored per task.

        Returns:
            `dict[str, int]`: task id (as a string) to stored row count, in the order tasks were first added. Tasks that
            were offered but currently have no stored row are included with a count of `0`. Values sum to `len(self)`.
        """
        counts = Counter(self._task_ids())
        return {task: counts.get(task, 0) for task in self._task_order}

    def as_dataset(self) -> Dataset:
        """The stored rows, in slot order, including the `"task_id"` column.

        Returns:
            `datasets.Dataset`: at most `capacity` rows (memory-mapped if the buffer was loaded from disk and not added
            to since).

        Raises:
            `ValueError`: if the buffer is empty.
        """
        if self._data is None:
            raise ValueError("The buffer is empty: add() a dataset first")
        return self._data

    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        with_replacement: bool | None = None,
        task_id: str | int | None = None,
    ) -> Dataset:
        """Draws `n` stored rows uniformly at random.

        Args:
            n (`int`):
                Number of rows to return (`>= 0`).
            seed (`int`, *optional*):
                Seed of a fresh generator for this draw: the same seed returns the same rows, and the reservoir's own
                generator is not advanced. If `None`, the reservoir's generator is used (and advanced), so the draw is
                still reproducible from the buffer's seed and state.
            with_replacement (`bool`, *optional*):
                Whether a row may be returned more than once. `None` means without replacement when `n` is at most the
                number of candidate rows, and with replacement otherwise.
            task_id (`str` or `int`, *optional*):
                Only sample rows of this task.

        Returns:
            `datasets.Dataset`: `n` rows, including the `"task_id"` column, in random order.

        Raises:
            `ValueError`: if the buffer (or the requested task) has no rows, `n < 0`, or `with_replacement=False` with
            `n` larger than the number of candidate rows.

        Example:

        ```python
        >>> from datasets import Dataset
        >>> buffer = ReservoirBuffer(capacity=3)
        >>> buffer.add(Dataset.from_dict({"input_ids": [[1], [2], [3]]}), task_id="a")
        >>> buffer.sample(2, seed=0)["input_ids"] == buffer.sample(2, seed=0)["input_ids"]
        True
        >>> len(buffer.sample(5, seed=0))  # more rows than stored: drawn with replacement
        5
        ```
        """
        n = _check_non_negative_int("n", n)
        data = self.as_dataset()
        if task_id is None:
            candidates = np.arange(len(data), dtype=np.int64)
        else:
            candidates = np.flatnonzero(np.asarray(self._task_ids(), dtype=object) == str(task_id))
            if len(candidates) == 0:
                raise ValueError(
                    f"The buffer holds no rows of task {str(task_id)!r}; stored tasks: "
                    f"{ {t: c for t, c in self.task_counts().items() if c} }"
                )
        if with_replacement is None:
            with_replacement = n > len(candidates)
        elif not with_replacement and n > len(candidates):
            raise ValueError(
                f"Cannot draw {n} rows without replacement from {len(candidates)} candidate rows; "
                "pass with_replacement=True or None"
            )
        rng = self._rng if seed is None else np.random.default_rng(_check_non_negative_int("seed", seed))
        if with_replacement:
            picks = rng.integers(0, len(candidates), size=n)
        else:
            picks = rng.choice(len(candidates), size=n, replace=False)
        return data.select(candidates[picks])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The sampler state, as a JSON-serialisable dict (the rows themselves are not included).

        Returns:
            `dict`: `format_version`, `capacity`, `seed`, `num_seen`, `task_order` and `rng_state` (NumPy's
            `bit_generator.state` for PCG64; its 128-bit integers are plain Python ints, which `json` round-trips).
        """
        return {
            "format_version": _STATE_FORMAT_VERSION,
            "capacity": self._capacity,
            "seed": self._seed,
            "num_seen": self._num_seen,
            "task_order": list(self._task_order),
            "rng_state": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the sampler state saved by `state_dict()`.

        The stored rows are not part of the state, so the state must be consistent with the rows the buffer currently
        holds (`len(self) == min(capacity, num_seen)` and every stored task id listed in `task_order`); to restore rows
        as well, use `save_to_disk()`/`load_from_disk()`. Nothing is changed if validation fails.

        Args:
            state (`dict`): A dict returned by `state_dict()` (possibly after a JSON round trip).

        Raises:
            `ValueError`: if the state is malformed or inconsistent with the stored rows.
        """
        capacity, seed, num_seen, task_order, rng = self._parse_state(state)
        expected_len = min(capacity, num_seen)
        if len(self) != expected_len:
            raise ValueError(
                f"Reservoir state (capacity={capacity}, num_seen={num_seen}) implies {expected_len} stored rows but "
                f"the buffer holds {len(self)}; state_dict() holds no rows, use load_from_disk() to restore them"
            )
        if self._data is not None:
            unknown = set(self._task_ids()) - set(task_order)
            if unknown:
                raise ValueError(f"Stored rows have task ids {sorted(unknown)} missing from the state's task_order")
        self._capacity, self._seed, self._num_seen, self._task_order, self._rng = (
            capacity,
            seed,
            num_seen,
            task_order,
            rng,
        )

    @staticmethod
    def _parse_state(state: Any) -> tuple[int, int, int, list[str], np.random.Generator]:
        if not isinstance(state, dict):
            raise ValueError(f"Reservoir state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("format_version", "capacity", "num_seen", "task_order", "rng_state") if k not in state]
        if missing:
            raise ValueError(f"Reservoir state is missing keys {missing}")
        if state["format_version"] != _STATE_FORMAT_VERSION:
            raise ValueError(
                f"Unsupported reservoir state format_version {state['format_version']!r} "
                f"(this version of clm_hf reads {_STATE_FORMAT_VERSION})"
            )
        capacity = _check_non_negative_int("capacity", state["capacity"], positive=True)
        seed = _check_non_negative_int("seed", state.get("seed", 0))
        num_seen = _check_non_negative_int("num_seen", state["num_seen"])
        task_order = state["task_order"]
        if not isinstance(task_order, list) or not all(isinstance(t, str) for t in task_order):
            raise ValueError(f"task_order must be a list of strings, got {task_order!r}")
        if len(set(task_order)) != len(task_order):
            raise ValueError(f"task_order has duplicates: {task_order!r}")
        rng_state = state["rng_state"]
        if not isinstance(rng_state, dict) or rng_state.get("bit_generator") != "PCG64":
            raise ValueError(f"rng_state must be a PCG64 bit_generator state, got {rng_state!r}")
        bit_generator = np.random.PCG64()
        try:
            bit_generator.state = copy.deepcopy(rng_state)
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"Invalid rng_state {rng_state!r}: {err}") from err
        return capacity, seed, num_seen, list(task_order), np.random.Generator(bit_generator)

    # ------------------------------------------------------------------ persistence

    def save_to_disk(self, path: str | os.PathLike) -> None:
        """Saves the rows (Arrow, via `Dataset.save_to_disk`) and the sampler state (`reservoir_state.json`) to `path`.

        The buffer is first written to a temporary sibling directory which then replaces `path` by renames, so an
        interrupted save never leaves a half-written buffer at `path`: it holds either the old buffer or the new one.
        An existing buffer directory at `path` is overwritten; any other non-empty directory is refused. `path` can
        also be read with `datasets.load_from_disk` to get the rows alone.

        Args:
            path (`str` or `os.PathLike`): Target directory.

        Raises:
            `ValueError`: if `path` exists and is not a directory, or is a non-empty directory that is not a buffer.
        """
        path = Path(path).absolute()
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"Cannot save the buffer to {path}: it exists and is not a directory")
            if not (path / STATE_FILE_NAME).is_file() and any(path.iterdir()):
                raise ValueError(
                    f"Refusing to overwrite {path}: it is a non-empty directory without {STATE_FILE_NAME}, "
                    "so it does not look like a saved ReservoirBuffer"
                )
        def fill(tmp: Path) -> None:
            if self._data is not None:
                self._data.save_to_disk(str(tmp))
            # Written last: a directory with this file is complete.
            (tmp / STATE_FILE_NAME).write_text(json.dumps(self.state_dict(), indent=2), encoding="utf-8")

        atomic_write_dir(path, fill)
        # If the rows were memory-mapped from the directory we just replaced, their files are now deleted: the maps
        # stay valid in this process, but datasets re-opens files by name (e.g. when pickled to DataLoader workers),
        # so point the buffer at the freshly written copy.
        if self._data is not None and any(
            Path(cache["filename"]).absolute().is_relative_to(path) or not Path(cache["filename"]).exists()
            for cache in self._data.cache_files
        ):
            self._data = load_from_disk(str(path))

    @classmethod
    def load_from_disk(cls, path: str | os.PathLike) -> "ReservoirBuffer":
        """Loads a buffer saved with `save_to_disk()`.

        The rows are memory-mapped (`datasets.load_from_disk`), and the random generator is restored, so continuing to
        `add()` gives exactly the same buffer as if it had never been saved.

        Args:
            path (`str` or `os.PathLike`): Directory written by `save_to_disk()`.

        Returns:
            `ReservoirBuffer`: the restored buffer.

        Raises:
            `ValueError`: naming `path` and the problem, if the directory or a file in it is missing or corrupt.

        Example:

        ```python
        >>> import tempfile
        >>> from datasets import Dataset
        >>> buffer = ReservoirBuffer(capacity=2, seed=3)
        >>> buffer.add(Dataset.from_dict({"input_ids": [[1], [2], [3]]}), task_id=0)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     buffer.save_to_disk(f"{tmp}/buffer")
        ...     restored = ReservoirBuffer.load_from_disk(f"{tmp}/buffer")
        ...     print(restored.as_dataset()["input_ids"] == buffer.as_dataset()["input_ids"], restored.num_seen)
        True 3
        ```
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"Cannot load a ReservoirBuffer from {path}: no such directory")
        state_file = path / STATE_FILE_NAME
        if not state_file.is_file():
            raise ValueError(
                f"Cannot load a ReservoirBuffer from {path}: {STATE_FILE_NAME} is missing "
                "(not a buffer directory, or the save did not complete)"
            )
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"Cannot load a ReservoirBuffer from {path}: {STATE_FILE_NAME} is corrupt: {err}") from err
        try:
            capacity, *_ = cls._parse_state(state)
        except ValueError as err:
            raise ValueError(f"Cannot load a ReservoirBuffer from {path}: invalid {STATE_FILE_NAME}: {err}") from err

        buffer = cls(capacity=capacity)
        if state["num_seen"] > 0:
            try:
                data = load_from_disk(str(path))
                # Cheap structural check (schema and buffer sizes, no scan of the data, which stays lazily mapped) so
                # a truncated or mismatched Arrow file fails here, with the path, rather than halfway through training.
                data.data.validate()
            except Exception as err:  # datasets/pyarrow raise many types (FileNotFoundError, ArrowInvalid, ...)
                raise ValueError(
                    f"Cannot load a ReservoirBuffer from {path}: the stored rows could not be read: {err}"
                ) from err
            if not isinstance(data, Dataset):
                raise ValueError(
                    f"Cannot load a ReservoirBuffer from {path}: expected one Dataset, got {type(data).__name__}"
                )
            if data.features.get(TASK_ID_COLUMN) != Value("string"):
                raise ValueError(
                    f"Cannot load a ReservoirBuffer from {path}: the rows have no string {TASK_ID_COLUMN!r} column"
                )
            buffer._data = data
            buffer._features = Features({k: v for k, v in data.features.items() if k != TASK_ID_COLUMN})
        try:
            buffer.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"Cannot load a ReservoirBuffer from {path}: {err}") from err
        return buffer
