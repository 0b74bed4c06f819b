"""Experience replay with a reservoir buffer (Rolnick et al. 2019, https://arxiv.org/abs/1811.11682;
reservoir sampling: Vitter 1985, https://doi.org/10.1145/3147.3165).

Replay is a data source, not a loss: every epoch of a task trains on the task's rows plus
``replay_ratio × |task|`` rows drawn afresh from the buffer, and after the task its own rows are
offered to the reservoir. The buffer therefore holds a uniform sample of everything seen so far,
whatever the task sizes, and over the epochs of a task every buffered row gets its turn.

How: ``prepare_train_dataset`` appends the whole buffer to the task's rows, and
``select_train_rows`` picks, at the start of each epoch, all the task's rows and a fresh draw of
buffer rows, seeded by (``seed``, the Trainer's ``args.seed``, task, epoch) so that a run resumed
inside an epoch trains on the same rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset, concatenate_datasets

from ..buffer import ReservoirBuffer
from .base import (Strategy, StrategyConfig, TaskInfo, check_range, load_tensor_json_state, register_strategy,
                   save_tensor_json_state)

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import ContinualTrainer


@dataclass
class ReplayConfig(StrategyConfig):
    """Settings of :class:`Replay`.

    Args:
        buffer_size (`int`): Rows the reservoir holds (over all tasks).
        replay_ratio (`float`): Replayed rows per new row, in [0, 1]: 0.5 adds one old row for
            every two new ones; 1 doubles the epoch with as many old rows as new. The old rows are
            drawn afresh from the buffer every epoch (without repeats while the buffer has enough).
        seed (`int`): Seeds the reservoir and, with the Trainer's seed, the draws of replayed rows.

    Example:

    >>> from clm_hf import Replay
    >>> from clm_hf.strategies.replay import ReplayConfig
    >>> config = ReplayConfig(buffer_size=200, replay_ratio=0.25)
    >>> Replay(config).buffer.capacity, ReplayConfig.from_dict({"capacity": 64}).buffer_size  # an alias
    (200, 64)
    """

    aliases = {"capacity": "buffer_size", "memory_size": "buffer_size", "ratio": "replay_ratio"}

    buffer_size: int = field(default=500, metadata={"help": "Rows the reservoir holds."})
    replay_ratio: float = field(default=0.5, metadata={"help": "Replayed rows per new row, in [0, 1]."})
    seed: int = field(default=0, metadata={"help": "Seed of the reservoir and of the replay draws."})

    def validate(self) -> None:
        check_range("buffer_size", self.buffer_size, low=1)
        check_range("replay_ratio", self.replay_ratio, low=0.0, high=1.0)


@register_strategy
class Replay(Strategy):
    """Mix rows of a reservoir-sampled memory of past tasks into every new task.

    Args:
        config ([`ReplayConfig`], *optional*): Or pass its fields as keyword arguments.
        buffer ([`ReservoirBuffer`], *optional*): Share or pre-fill a buffer; by default one of
            ``buffer_size`` rows is created.

    Example:

    >>> from clm_hf import Replay
    >>> replay = Replay(buffer_size=200, replay_ratio=0.5)
    >>> len(replay.buffer), replay.buffer.capacity
    (0, 200)

    Reference: Rolnick et al., *Experience Replay for Continual Learning*, NeurIPS 2019,
    https://arxiv.org/abs/1811.11682; reservoir sampling: Vitter, 1985, https://doi.org/10.1145/3147.3165.
    """

    name = "replay"
    config_class = ReplayConfig
    # A data source only: it never reads a parameter, so DeepSpeed ZeRO-3's partitioning is fine.
    supports_partitioned_parameters = True
    supports_fsdp = True
    # A streamed task fills the reservoir as its rows are read, in one pass (Algorithm R needs no second one).
    supports_streaming = True

    def __init__(self, config: ReplayConfig | None = None, buffer: ReservoirBuffer | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.buffer = buffer if buffer is not None else ReservoirBuffer(self.config.buffer_size, seed=self.config.seed)
        # (task index, task rows, buffer rows, replayed rows per epoch) of the dataset last prepared.
        self._layout: tuple[int, int, int, int] | None = None
        # The stream of the task in training when it is streamed, and its rows not yet offered to the reservoir.
        self._stream: _ReplayStream | None = None
        self._pending: list[dict[str, Any]] = []

    def replay_rows(self, dataset: Dataset, task: TaskInfo) -> Dataset | None:
        """Every buffer row, cast to ``task``'s features: the pool each epoch's replayed rows come from."""
        count = round(self.config.replay_ratio * len(dataset))
        if count == 0 or len(self.buffer) == 0:
            return None
        rows = self.buffer.as_dataset()
        missing = [c for c in dataset.column_names if c not in rows.column_names]
        if missing:
            raise ValueError(
                f"Task '{task.name}' has column(s) {missing} that the replay buffer's rows lack "
                f"(buffer columns: {rows.column_names}). Tokenize every task the same way."
            )
        return rows.select_columns(dataset.column_names).cast(dataset.features)

    def prepare_train_dataset(self, dataset: Dataset, task: TaskInfo) -> Dataset:
        self._layout, self._stream, self._pending = None, None, []
        if isinstance(dataset, IterableDataset):
            return self._prepare_stream(dataset, task)
        pool = self.replay_rows(dataset, task)
        if pool is None:
            return dataset
        self._layout = (task.index, len(dataset), len(pool), round(self.config.replay_ratio * len(dataset)))
        # The task's rows, then the whole buffer; select_train_rows picks each epoch's share of it.
        return concatenate_datasets([dataset, pool])

    def select_train_rows(self, num_rows: int, task: TaskInfo, epoch: int) -> list[int] | None:
        """All of ``task``'s own rows plus this epoch's fresh draw of replayed rows (see :meth:`epoch_draw`)."""
        if self._layout is None or self._layout[0] != task.index or num_rows != self._layout[1] + self._layout[2]:
            return None  # not the dataset prepare_train_dataset built for this task
        _, own, _, _ = self._layout
        return list(range(own)) + (own + self.epoch_draw(task, epoch)).tolist()

    def epoch_draw(self, task: TaskInfo, epoch: int) -> np.ndarray:
        """Which buffer rows (positions in the buffer) are replayed in ``epoch`` of ``task``.

        With ``n = replay_ratio × |task|`` rows per epoch and a buffer of ``B`` rows, every epoch
        replays the whole buffer ``n // B`` times, plus the next ``n % B`` rows of a walk through
        shuffled passes over the buffer (a fresh permutation per pass). So every epoch draws anew,
        no row repeats inside an epoch beyond the whole copies, and every buffered row is replayed
        once before any is replayed twice: a buffer larger than ``n`` is covered in ``⌈B / n⌉``
        epochs. Seeded by the strategy's ``seed``, the Trainer's ``args.seed``, the task and the
        pass: the same in every run, on every rank and after a resume.
        """
        if self._layout is None or self._layout[0] != task.index:
            raise RuntimeError(f"Replay has not prepared the rows of task '{task.name}'; call prepare_train_dataset first.")
        _, _, pool, count = self._layout
        whole, part = divmod(count, pool)
        picks = [np.tile(np.arange(pool), whole)]
        if part:
            start, stop = epoch * part, (epoch + 1) * part
            first, last = start // pool, (stop - 1) // pool
            orders = self._pass_orders(task, pool, part, last)
            walk = orders[first][start - first * pool :]
            if last != first:  # the epoch's rows run over into the next pass
                walk = np.concatenate([walk, orders[last][: stop - last * pool]])
            picks.append(walk[:part])
        return np.concatenate(picks)

    def _pass_orders(self, task: TaskInfo, pool: int, part: int, last: int) -> list[np.ndarray]:
        """The order of the buffer's rows in passes ``0..last`` of ``task``'s walk.

        Each pass is a fresh permutation, except that the rows an epoch already took from the end of
        the previous pass are moved to the end of this one, so that epoch never replays a row twice.
        """
        trainer_seed = int(getattr(getattr(self.trainer, "args", None), "seed", 0))
        orders: list[np.ndarray] = []
        for index in range(last + 1):
            order = np.random.default_rng([self.config.seed, trainer_seed, task.index, index]).permutation(pool)
            boundary = index * pool
            start = (boundary // part) * part  # the first row of the epoch this pass starts in
            if index and start < boundary:
                late = np.isin(order, orders[-1][start - (index - 1) * pool :])
                order = np.concatenate([order[~late], order[late]])
            orders.append(order)
        return orders

    def _prepare_stream(self, dataset: IterableDataset, task: TaskInfo) -> _ReplayStream:
        """The task's stream with buffer rows mixed in, offering each task row to the reservoir as it is read."""
        workers = int(getattr(getattr(self.trainer, "args", None), "dataloader_num_workers", 0) or 0)
        if workers:
            raise ValueError(
                f"Replay fills its reservoir from the streamed task '{task.name}' as the rows are read, in the "
                f"training process; dataloader_num_workers={workers} would read them in worker processes and the "
                "reservoir would never see them. Set dataloader_num_workers=0 for a streamed task."
            )
        # A snapshot of the past tasks' rows: rows of this task offered during training never replay in it.
        pool = self.buffer.as_dataset() if len(self.buffer) else None
        trainer_seed = int(getattr(getattr(self.trainer, "args", None), "seed", 0))
        self._stream = _ReplayStream(dataset, pool, self.config.replay_ratio, [self.config.seed, trainer_seed, task.index],
                                     offer=self._offer, task_name=task.name)
        self._stream_task = task.task_id
        return self._stream

    def _offer(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        # Offered in chunks of at most the reservoir's size: Algorithm R gives the same buffer however the
        # stream is split into add() calls, and memory stays O(buffer_size).
        if len(self._pending) >= min(self.buffer.capacity, 1024):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        features = self.buffer.features
        if features is not None and set(features) != set(rows[0]):
            features = None  # the buffer's add() names the mismatch
        self.buffer.add(Dataset.from_list(rows, features=features), self._stream_task)

    def after_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        if self._stream is not None:
            self._flush()  # the streamed rows were offered while they were read
            self._stream = None
            return
        rows = task.train_dataset
        features = self.buffer.features
        if features is not None and set(features) == set(rows.column_names) and rows.features != features:
            rows = rows.cast(features)  # e.g. int64 ids of a streamed task, int32 of a tokenized one
        self.buffer.add(rows, task.task_id)

    # The buffer persists as its own Arrow folder (memory-mapped on load), not as tensors; state.json
    # records how many rows it holds, so that a buffer lost from a checkpoint is an error on load
    # instead of a silently empty buffer.
    def save_state(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        if len(self.buffer):
            self.buffer.save_to_disk(Path(directory) / "buffer")
        save_tensor_json_state({"buffer_rows": len(self.buffer)}, directory)

    def load_state(self, directory: str | os.PathLike) -> None:
        from ..state import CheckpointError

        path = Path(directory) / "buffer"
        rows = load_tensor_json_state(directory).get("buffer_rows", 0)
        if rows and not path.is_dir():
            raise CheckpointError(f"The replay state in {directory} records a buffer of {rows} rows, but {path} "
                                  "is missing: the checkpoint is incomplete.")
        if rows:
            self.buffer = ReservoirBuffer.load_from_disk(path)
            if len(self.buffer) != rows:
                raise CheckpointError(f"The replay buffer in {path} holds {len(self.buffer)} rows, but the "
                                      f"checkpoint recorded {rows}.")
        else:  # nothing was stored yet when the checkpoint was written
            self.buffer = ReservoirBuffer(self.config.buffer_size, seed=self.config.seed)


class _ReplayStream(torch.utils.data.IterableDataset):
    """A streamed task's rows with ``replay_ratio`` buffer rows after every task row, read once into the reservoir.

    Every task row of the first pass goes to ``offer`` as it is read (later passes, when ``max_steps`` outlasts
    the stream, offer nothing again). Replayed rows are drawn uniformly from ``pool`` (the buffer as it was when the
    task started), seeded by ``seed`` and the epoch.
    """

    def __init__(self, source: IterableDataset, pool: Dataset | None, ratio: float, seed: list[int], *,
                 offer: Any, task_name: str) -> None:
        super().__init__()
        self.source, self.pool, self.ratio, self.seed = source, pool, ratio, seed
        self.offer, self.task_name = offer, task_name
        self.epoch, self.offered_pass = 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self):
        rng = np.random.default_rng([*self.seed, self.epoch])
        offering, credit, keys = not self.offered_pass, 0.0, None
        for row in self.source:
            if keys is None:
                keys = list(row)
                missing = [k for k in keys if self.pool is not None and k not in self.pool.column_names]
                if missing:
                    raise ValueError(
                        f"Task '{self.task_name}' has column(s) {missing} that the replay buffer's rows lack (buffer "
                        f"columns: {self.pool.column_names}). Tokenize every task the same way."
                    )
            if offering:
                self.offer(dict(row))
            yield row
            credit += self.ratio
            while self.pool is not None and credit >= 1.0:
                credit -= 1.0
                old = self.pool[int(rng.integers(len(self.pool)))]
                yield {k: old[k] for k in keys}
        if offering:
            self.offered_pass = True

