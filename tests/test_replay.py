"""Replay: every epoch replays a fresh draw of the buffer, the buffer is covered over the epochs,
training follows the draw, and a run resumed inside an epoch trains on the same rows."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from datasets import Dataset

from clm_hf import ContinualCausalLMTrainer, Replay, Strategy
from clm_hf.strategies.base import TaskInfo
from tests.conftest import AtTaskStep, small_args


def _rows(count: int, offset: int) -> Dataset:
    return Dataset.from_dict({"input_ids": [[offset + i, 1] for i in range(count)],
                              "labels": [[offset + i, 1] for i in range(count)]})


def _replay_with(buffer_rows: int, replay_ratio: float, **options) -> Replay:
    replay = Replay(buffer_size=buffer_rows, replay_ratio=replay_ratio, **options)
    replay.buffer.add(_rows(buffer_rows, 1000), task_id="old")
    return replay


def _draws(replay: Replay, task_rows: int, epochs: int, index: int = 1) -> list[list[int]]:
    """The buffer positions replayed in each epoch, through the trainer-facing hooks."""
    task = TaskInfo(task_id="new", name="new", index=index)
    dataset = replay.prepare_train_dataset(_rows(task_rows, 0), task)
    draws = []
    for epoch in range(epochs):
        rows = replay.select_train_rows(len(dataset), task, epoch)
        assert rows[:task_rows] == list(range(task_rows))  # every own row, every epoch
        draws.append([r - task_rows for r in rows[task_rows:]])
        assert all(0 <= d < len(replay.buffer) for d in draws[-1])
    return draws


def test_every_epoch_draws_afresh_and_a_larger_buffer_is_covered():
    replay = _replay_with(40, replay_ratio=0.25)
    draws = _draws(replay, task_rows=32, epochs=10)  # 8 replayed rows per epoch
    assert all(len(d) == 8 and len(set(d)) == 8 for d in draws)  # no repeats inside an epoch
    assert len({tuple(sorted(d)) for d in draws}) == 10  # a different subset every epoch
    # Every buffered row is replayed once before any twice: 40 rows in 5 epochs, then again.
    assert sorted(sum(draws[:5], [])) == list(range(40))
    assert sorted(sum(draws[5:], [])) == list(range(40))
    # Deterministic: the same draws again, and from a fresh strategy with the same seeds.
    assert _draws(replay, 32, 10) == draws == _draws(_replay_with(40, replay_ratio=0.25), 32, 10)
    assert _draws(_replay_with(40, replay_ratio=0.25, seed=1), 32, 10) != draws
    assert _draws(replay, 32, 10, index=2) != draws  # and another task draws differently


def test_epochs_that_run_over_a_pass_still_repeat_no_row():
    replay = _replay_with(40, replay_ratio=0.375)
    draws = _draws(replay, task_rows=32, epochs=20)  # 12 of 40 rows per epoch: epochs straddle passes
    assert all(len(d) == 12 and len(set(d)) == 12 for d in draws)
    walk = sum(draws, [])
    for start in range(0, len(walk) - 39, 40):  # every pass replays each row exactly once
        assert sorted(walk[start:start + 40]) == list(range(40))


def test_a_smaller_buffer_is_replayed_whole_every_epoch():
    replay = _replay_with(5, replay_ratio=0.5)
    for draw in _draws(replay, task_rows=16, epochs=4):  # 8 replayed rows from 5
        counts = Counter(draw)
        assert len(draw) == 8 and set(counts) == set(range(5))
        assert max(counts.values()) - min(counts.values()) <= 1


def test_other_datasets_are_left_to_the_trainer():
    # PackNet's retraining phase, for one, trains on the task's own rows: no selection there.
    replay = _replay_with(40, replay_ratio=0.25)
    task = TaskInfo(task_id="new", name="new", index=1)
    assert len(replay.prepare_train_dataset(_rows(32, 0), task)) == 72  # own rows, then the whole buffer
    assert replay.select_train_rows(32, task, 0) is None
    assert replay.select_train_rows(72, TaskInfo(task_id="x", name="x", index=2), 0) is None
    empty = Replay(buffer_size=8)
    assert len(empty.prepare_train_dataset(_rows(32, 0), task)) == 32 and empty.select_train_rows(32, task, 0) is None


class _SeenRows(Strategy):
    """Records every training row it sees (padding stripped), in order."""

    name = "seen_rows"

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, ...]] = []

    def loss(self, model, inputs, outputs):
        for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
            self.rows.append(tuple(i for i, m in zip(ids, mask) if m))
        return {}


def _key(row: dict) -> tuple[int, ...]:
    return tuple(row["input_ids"][: sum(row["attention_mask"])] if "attention_mask" in row else row["input_ids"])


def test_training_replays_each_epochs_draw(tmp_path, make_model, tokenizer, tiny_stream):
    replay, seen = Replay(buffer_size=32, replay_ratio=0.25), _SeenRows()
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer,
                                       args=small_args(tmp_path, num_train_epochs=4, save_continual_state=False),
                                       strategies=[replay, seen])
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    dataset, task = trainer.train_dataset, trainer.tasks[1]  # the second task's rows, then the whole buffer
    assert len(dataset) == 32 + 32
    second = seen.rows[4 * 32:]  # the first task trained 4 epochs of its 32 rows
    assert len(second) == 4 * 40  # 32 own rows + 8 replayed, every epoch
    own = Counter(_key(dataset[i]) for i in range(32))
    buffer_rows = Counter(_key(dataset[32 + i]) for i in range(32))
    replayed = []
    for epoch in range(4):
        trained = Counter(second[40 * epoch: 40 * (epoch + 1)])
        expected = Counter(_key(dataset[i]) for i in replay.select_train_rows(len(dataset), task, epoch))
        assert trained == expected, epoch  # the loader follows the draw of its epoch
        replayed.append(trained - own)
    assert len({tuple(sorted(r.elements())) for r in replayed}) == 4  # different rows every epoch
    assert sum(replayed, Counter()) == buffer_rows  # the 32-row buffer is covered by 4 epochs of 8


def test_resume_inside_an_epoch_trains_on_the_same_rows(tmp_path, make_model, tokenizer, tiny_stream):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    settings = dict(num_train_epochs=3, save_strategy="steps", save_steps=1)

    def run(folder, strategies, model_seed=0):
        return ContinualCausalLMTrainer(model=make_model("gpt2", seed=model_seed), processing_class=tokenizer,
                                        args=small_args(tmp_path / folder, **settings), strategies=strategies)

    full_seen = _SeenRows()
    full = run("full", [Replay(buffer_size=32, replay_ratio=0.25), full_seen])
    full.fit(stream)
    crashing = run("cut", [Replay(buffer_size=32, replay_ratio=0.25), _SeenRows()])
    crashing.add_callback(AtTaskStep(crashing, 1, 7, on="save"))  # inside the second epoch (5 steps each)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(stream)
    resumed_seen = _SeenRows()
    resumed = run("cut", [Replay(buffer_size=32, replay_ratio=0.25), resumed_seen], model_seed=3)
    resumed.fit(stream, resume_from_checkpoint=True)
    assert resumed_seen.rows == full_seen.rows[-len(resumed_seen.rows):]  # steps 8.. of the second task
    assert len(resumed_seen.rows) == (15 - 7) * 8
    for name, p in full.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], p, rtol=0, atol=1e-6)


class _PicksRows(Strategy):
    name = "picks_rows"

    def select_train_rows(self, num_rows, task, epoch):
        return list(range(num_rows))


@pytest.mark.parametrize("extra, sampling, error, message", [
    ([], "group_by_length", NotImplementedError, r"'replay' chooses the training rows .* got 'group_by_length'"),
    ([_PicksRows()], "random", ValueError, r"\['replay', 'picks_rows'\] each choose the training rows"),
])
def test_unsupported_samplers_are_refused_by_name(tmp_path, make_model, tokenizer, tiny_stream, extra, sampling, error,
                                                  message):
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer,
                                       args=small_args(tmp_path, train_sampling_strategy=sampling,
                                                       save_continual_state=False),
                                       strategies=[Replay(buffer_size=16), *extra])
    with pytest.raises(error, match=message):
        trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})


def test_sequential_sampling_keeps_the_selection_in_order(tmp_path, make_model, tokenizer, tiny_stream):
    replay, seen = Replay(buffer_size=32, replay_ratio=0.25), _SeenRows()
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer,
                                       args=small_args(tmp_path, train_sampling_strategy="sequential",
                                                       save_continual_state=False),
                                       strategies=[replay, seen])
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    dataset, task = trainer.train_dataset, trainer.tasks[1]
    expected = [_key(dataset[i]) for i in replay.select_train_rows(len(dataset), task, 0)]
    assert seen.rows[32:] == expected
