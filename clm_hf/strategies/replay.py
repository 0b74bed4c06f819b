"""Experience replay with a reservoir buffer (Rolnick et al. 2019, https://arxiv.org/abs/1811.11682;
reservoir sampling: Vitter 1985, https://doi.org/10.1145/3147.3165).

Replay is a data source, not a loss: before each task it mixes rows drawn from the buffer into the
task's training rows, and after the task it offers the task's own rows to the reservoir. The
buffer therefore holds a uniform sample of everything seen so far, whatever the task sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, concatenate_datasets

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
            every two new ones; 1 doubles the epoch with as many old rows as new.
        seed (`int`): Seeds the reservoir and the draws of replayed rows.
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
    """

    name = "replay"
    config_class = ReplayConfig
    # A data source only: it never reads a parameter, so DeepSpeed ZeRO-3's partitioning is fine.
    supports_partitioned_parameters = True

    def __init__(self, config: ReplayConfig | None = None, buffer: ReservoirBuffer | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.buffer = buffer if buffer is not None else ReservoirBuffer(self.config.buffer_size, seed=self.config.seed)

    def replay_rows(self, dataset: Dataset, task: TaskInfo) -> Dataset | None:
        """The memory rows mixed into ``task``'s training, cast to the task's features."""
        count = round(self.config.replay_ratio * len(dataset))
        if count == 0 or len(self.buffer) == 0:
            return None
        rows = self.buffer.sample(count, seed=self.config.seed + 7919 * (task.index + 1))
        missing = [c for c in dataset.column_names if c not in rows.column_names]
        if missing:
            raise ValueError(
                f"Task '{task.name}' has column(s) {missing} that the replay buffer's rows lack "
                f"(buffer columns: {rows.column_names}). Tokenize every task the same way."
            )
        return rows.select_columns(dataset.column_names).cast(dataset.features)

    def prepare_train_dataset(self, dataset: Dataset, task: TaskInfo) -> Dataset:
        replayed = self.replay_rows(dataset, task)
        if replayed is None:
            return dataset
        # The Trainer's sampler shuffles, so old and new rows share every batch.
        return concatenate_datasets([dataset, replayed])

    def after_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        self.buffer.add(task.train_dataset, task.task_id)

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
