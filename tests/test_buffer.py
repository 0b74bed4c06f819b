"""Tests for `clm_hf.buffer.ReservoirBuffer` (reservoir sampling, Vitter 1985, https://doi.org/10.1145/3147.3165)."""

from __future__ import annotations

import doctest
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Features, List, Value, concatenate_datasets

import clm_hf.buffer as buffer_module
from clm_hf.buffer import STATE_FILE_NAME, ReservoirBuffer, _plan_add

# ----------------------------------------------------------------------------- helpers


def make_rows(start: int, stop: int) -> Dataset:
    """Tokenized-looking rows whose labels carry a global row id, so every stored row can be traced to its source."""
    return Dataset.from_dict(
        {
            "input_ids": [[r, r + 1000, r + 2000][: 1 + r % 3] for r in range(start, stop)],
            "labels": [[r] for r in range(start, stop)],
        }
    )


def row_ids(buffer: ReservoirBuffer) -> list[int]:
    return [labels[0] for labels in buffer.as_dataset()["labels"]]


def reference_algorithm_r(seed: int, capacity: int, num_rows: int) -> list[int]:
    """Vitter's Algorithm R as a plain per-row loop, drawing from the same generator the buffer uses."""
    rng = np.random.Generator(np.random.PCG64(seed))
    reservoir: list[int] = []
    for n in range(1, num_rows + 1):  # n: 1-based position in the stream
        if n <= capacity:
            reservoir.append(n - 1)
        else:
            j = int(rng.integers(0, n))
            if j < capacity:
                reservoir[j] = n - 1
    return reservoir


def chi2_critical(df: int, alpha: float = 1e-3) -> float:
    """Upper `alpha` quantile of chi-square(df) by the Wilson-Hilferty cube-root normal approximation.

    scipy is not a dependency; the normal quantile comes from bisection on `math.erfc`.
    """
    lo, hi = 0.0, 10.0
    for _ in range(100):  # find z with P(Z > z) = alpha
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > alpha:
            lo = mid
        else:
            hi = mid
    z = (lo + hi) / 2
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def inclusion_chi2(counts: np.ndarray, trials: int, capacity: int) -> float:
    """Goodness-of-fit statistic for "every one of N rows is in the final reservoir with probability k/N".

    Per trial the inclusion indicators form a uniformly random k-subset, so they are negatively correlated:
    Cov(counts) = T p (1-p) N/(N-1) (I - 11^T/N), p = k/N. The plain Pearson sum would therefore be a *scaled*
    chi-square; rescaling by (N-1)/N / (1-p) gives an asymptotically exact chi-square with N-1 degrees of freedom.
    """
    n = len(counts)
    p = capacity / n
    return float(np.sum((counts - trials * p) ** 2) / (trials * p * (1 - p)) * (n - 1) / n)


def simulate_inclusion_counts(chunks: list[int], capacity: int, trials: int) -> np.ndarray:
    """Runs the buffer's planning code (`_plan_add`, exactly what `add()` uses for its random decisions) over
    `trials` seeds and counts, for each stream row, how often it ends in the reservoir."""
    num_rows = sum(chunks)
    counts = np.zeros(num_rows, dtype=np.int64)
    for seed in range(trials):
        rng = np.random.Generator(np.random.PCG64(seed))  # the buffer's own construction
        reservoir = np.empty(0, dtype=np.int64)  # global row id per slot
        num_seen = 0
        for size in chunks:
            source = _plan_add(rng, num_seen, capacity, size)
            new = np.empty(len(source), dtype=np.int64)
            new[: len(reservoir)] = reservoir
            written = source >= 0
            new[written] = num_seen + source[written]
            reservoir, num_seen = new, num_seen + size
        counts[reservoir] += 1
    return counts


def simulate_variant(num_rows: int, capacity: int, trials: int, variant: str) -> np.ndarray:
    """Reference Algorithm R and deliberately wrong variants, vectorised over trials (one loop over positions)."""
    rng = np.random.default_rng(12345)
    reservoir = np.tile(np.arange(capacity), (trials, 1))
    pending = np.full((trials, capacity), -1)  # for "first write wins": the row that claimed a slot first in a chunk
    for n in range(capacity + 1, num_rows + 1):
        high = {"correct": n, "k/(n+1)": n + 1, "0-based n": n - 1, "first_write_wins": n}[variant]
        j = rng.integers(0, high, size=trials)
        hit = np.flatnonzero(j < capacity)
        if variant == "first_write_wins":
            # A vectorised implementation that resolves collisions inside one add() call the wrong way round.
            free = pending[hit, j[hit]] < 0
            pending[hit[free], j[hit[free]]] = n - 1
        else:
            reservoir[hit, j[hit]] = n - 1
    if variant == "first_write_wins":
        reservoir = np.where(pending >= 0, pending, reservoir)
    return np.bincount(reservoir.ravel(), minlength=num_rows)


# ----------------------------------------------------------------------------- Algorithm R: statistics


K, CHUNKS, TRIALS = 5, [3, 4, 6, 7], 2000  # N = 20 rows: the first chunk does not fill the reservoir, the second does
N = sum(CHUNKS)


def test_chi2_critical_matches_table():
    # Table values of the chi-square upper 0.1% point.
    assert chi2_critical(19) == pytest.approx(43.82, abs=0.3)
    assert chi2_critical(34) == pytest.approx(65.25, abs=0.3)


def test_inclusion_probability_is_k_over_n():
    counts = simulate_inclusion_counts(CHUNKS, K, TRIALS)
    assert counts.sum() == TRIALS * K
    statistic = inclusion_chi2(counts, TRIALS, K)
    assert statistic < chi2_critical(N - 1), (statistic, counts)


@pytest.mark.parametrize("variant", ["k/(n+1)", "0-based n", "first_write_wins"])
def test_statistical_test_rejects_wrong_variants(variant):
    # The same test must accept a correct reference and reject the classic off-by-one and collision bugs, otherwise
    # passing test_inclusion_probability_is_k_over_n would mean little.
    correct = simulate_variant(N, K, TRIALS, "correct")
    assert inclusion_chi2(correct, TRIALS, K) < chi2_critical(N - 1)
    wrong = simulate_variant(N, K, TRIALS, variant)
    assert inclusion_chi2(wrong, TRIALS, K) > chi2_critical(N - 1)


def test_final_reservoir_is_a_uniform_subset():
    # Stronger than marginals: all C(7, 3) = 35 subsets must be equally likely (multinomial chi-square, df = 34).
    capacity, chunks, trials = 3, [2, 2, 3], 4000
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(sum(chunks)), capacity))}
    observed = np.zeros(len(subsets))
    for seed in range(trials):
        rng = np.random.Generator(np.random.PCG64(seed))
        reservoir, num_seen = np.empty(0, dtype=np.int64), 0
        for size in chunks:
            source = _plan_add(rng, num_seen, capacity, size)
            new = np.empty(len(source), dtype=np.int64)
            new[: len(reservoir)] = reservoir
            new[source >= 0] = num_seen + source[source >= 0]
            reservoir, num_seen = new, num_seen + size
        observed[subsets[tuple(sorted(reservoir.tolist()))]] += 1
    expected = trials / len(subsets)
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    assert statistic < chi2_critical(len(subsets) - 1), statistic


def test_rows_up_to_capacity_are_always_stored_in_order():
    buffer = ReservoirBuffer(capacity=5, seed=7)
    buffer.add(make_rows(0, 2), task_id=0)
    buffer.add(make_rows(2, 5), task_id=1)
    assert row_ids(buffer) == [0, 1, 2, 3, 4]
    assert buffer.state_dict()["rng_state"] == ReservoirBuffer(5, seed=7).state_dict()["rng_state"]  # no draws yet


# ----------------------------------------------------------------------------- Algorithm R: exact stream semantics


@pytest.mark.parametrize("seed", range(8))
def test_add_matches_per_row_reference_loop(seed):
    chunks = [2, 5, 1, 9, 6]
    buffer = ReservoirBuffer(capacity=4, seed=seed)
    start = 0
    for i, size in enumerate(chunks):
        buffer.add(make_rows(start, start + size), task_id=i % 2)
        start += size
    assert row_ids(buffer) == reference_algorithm_r(seed, 4, sum(chunks))
    assert buffer.num_seen == sum(chunks)


def test_chunked_adds_equal_single_add_of_concatenation():
    chunks = [(0, 3), (3, 4), (4, 40), (40, 41), (41, 100)]
    chunked = ReservoirBuffer(capacity=8, seed=11)
    for start, stop in chunks:
        chunked.add(make_rows(start, stop), task_id="stream")
    single = ReservoirBuffer(capacity=8, seed=11)
    single.add(concatenate_datasets([make_rows(a, b) for a, b in chunks]), task_id="stream")
    assert chunked.as_dataset().to_dict() == single.as_dataset().to_dict()
    assert chunked.state_dict() == single.state_dict()


def test_planning_block_size_does_not_change_the_result(monkeypatch):
    expected = ReservoirBuffer(capacity=6, seed=3)
    expected.add(make_rows(0, 50), task_id=0)
    monkeypatch.setattr(buffer_module, "_PLAN_BLOCK_ROWS", 4)
    blocked = ReservoirBuffer(capacity=6, seed=3)
    blocked.add(make_rows(0, 50), task_id=0)
    assert row_ids(blocked) == row_ids(expected)


def test_different_seeds_give_different_reservoirs():
    results = set()
    for seed in range(5):
        buffer = ReservoirBuffer(capacity=5, seed=seed)
        buffer.add(make_rows(0, 60), task_id=0)
        results.add(tuple(row_ids(buffer)))
    assert len(results) > 1


# ----------------------------------------------------------------------------- contents, tasks, features


def test_stored_rows_are_unchanged_plus_task_id_and_task_counts_sum_to_len():
    sources = {"a": make_rows(0, 7), "b": make_rows(7, 19), "3": make_rows(19, 30)}
    buffer = ReservoirBuffer(capacity=9, seed=5)
    buffer.add(sources["a"], task_id="a")
    buffer.add(sources["b"], task_id="b")
    buffer.add(sources["3"], task_id=3)
    stored = buffer.as_dataset()
    assert stored.column_names == ["input_ids", "labels", "task_id"]
    assert stored.features["task_id"] == Value("string")
    assert stored.features["input_ids"] == sources["a"].features["input_ids"]
    assert len(buffer) == 9
    for row in stored:
        original = sources[row["task_id"]][row["labels"][0] - sources[row["task_id"]]["labels"][0][0]]
        assert {k: row[k] for k in ("input_ids", "labels")} == original
    counts = buffer.task_counts()
    assert list(counts) == ["a", "b", "3"]
    assert sum(counts.values()) == len(buffer)
    assert counts == {t: list(stored["task_id"]).count(t) for t in counts}
    assert buffer.features == sources["a"].features
    assert "task_id" not in buffer.features


def test_task_counts_keeps_evicted_tasks_with_zero():
    buffer = ReservoirBuffer(capacity=2, seed=0)
    buffer.add(make_rows(0, 2), task_id="old")
    buffer.add(make_rows(2, 5000), task_id="new")
    counts = buffer.task_counts()
    assert list(counts) == ["old", "new"] and sum(counts.values()) == 2


def test_column_order_of_later_datasets_is_normalised():
    buffer = ReservoirBuffer(capacity=3, seed=0)
    buffer.add(make_rows(0, 2), task_id=0)
    buffer.add(make_rows(2, 6).select_columns(["labels", "input_ids"]), task_id=1)
    assert buffer.as_dataset().column_names == ["input_ids", "labels", "task_id"]


def test_features_mismatch_names_the_columns():
    buffer = ReservoirBuffer(capacity=3)
    buffer.add(make_rows(0, 3), task_id=0)
    retyped = make_rows(3, 6).cast(Features({"input_ids": List(Value("int64")), "labels": List(Value("int32"))}))
    with pytest.raises(ValueError, match=r"'labels'.*int32.*int64") as info:
        buffer.add(retyped, task_id=1)
    assert "'input_ids'" in str(info.value)  # input_ids was int32 from from_dict, cast to int64
    with pytest.raises(ValueError, match=r"missing columns \['labels'\].*unexpected columns \['target'\]"):
        buffer.add(make_rows(3, 6).rename_column("labels", "target"), task_id=1)
    # Failed adds change nothing.
    assert buffer.num_seen == 3 and list(buffer.task_counts()) == ["0"]


def test_invalid_inputs():
    for capacity in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="capacity"):
            ReservoirBuffer(capacity)
    buffer = ReservoirBuffer(capacity=3)
    with pytest.raises(ValueError, match="empty"):
        buffer.add(make_rows(0, 0), task_id=0)
    with pytest.raises(ValueError, match="task_id"):
        buffer.add(make_rows(0, 2).add_column("task_id", ["x", "y"]), task_id=0)
    with pytest.raises(TypeError):
        buffer.add({"input_ids": [[1]]}, task_id=0)
    with pytest.raises(TypeError):
        buffer.add(make_rows(0, 2), task_id=1.5)
    assert len(buffer) == 0 and buffer.num_seen == 0 and buffer.features is None
    with pytest.raises(ValueError, match="buffer is empty"):
        buffer.as_dataset()
    with pytest.raises(ValueError, match="buffer is empty"):
        buffer.sample(1, seed=0)


# ----------------------------------------------------------------------------- sampling


@pytest.fixture
def filled() -> ReservoirBuffer:
    buffer = ReservoirBuffer(capacity=10, seed=1)
    buffer.add(make_rows(0, 12), task_id="a")
    buffer.add(make_rows(12, 30), task_id="b")
    return buffer


def test_sample_is_deterministic_and_leaves_reservoir_rng_alone(filled):
    before = filled.state_dict()
    first = filled.sample(6, seed=42)
    assert first.to_dict() == filled.sample(6, seed=42).to_dict()
    assert first.to_dict() != filled.sample(6, seed=43).to_dict()
    assert filled.state_dict() == before
    filled.sample(3)  # no seed: drawn from (and advancing) the reservoir's generator
    assert filled.state_dict()["rng_state"] != before["rng_state"]


def test_sample_with_and_without_replacement(filled):
    ids = [labels[0] for labels in filled.sample(10, seed=0)["labels"]]
    assert sorted(ids) == sorted(row_ids(filled))  # n == len, without replacement: a permutation
    big = filled.sample(50, seed=0)  # n > len, default: with replacement
    assert len(big) == 50 and set(r[0] for r in big["labels"]) <= set(row_ids(filled))
    forced = [r[0] for r in filled.sample(10, seed=0, with_replacement=True)["labels"]]
    assert len(set(forced)) < 10  # with replacement, 10 draws from 10 rows repeat (seed fixed)
    with pytest.raises(ValueError, match="without replacement"):
        filled.sample(11, seed=0, with_replacement=False)
    assert len(filled.sample(0, seed=0)) == 0
    with pytest.raises(ValueError):
        filled.sample(-1, seed=0)


def test_sample_task_filter(filled):
    counts = filled.task_counts()
    for task, count in counts.items():
        rows = filled.sample(count, seed=0, task_id=task)
        assert set(rows["task_id"]) == {task} and len(rows) == count
    assert set(filled.sample(25, seed=0, task_id="b")["task_id"]) == {"b"}
    with pytest.raises(ValueError, match="no rows of task 'zzz'"):
        filled.sample(1, seed=0, task_id="zzz")


# ----------------------------------------------------------------------------- state and persistence


def test_state_dict_is_json_and_round_trips(filled):
    state = filled.state_dict()
    assert set(state) >= {"capacity", "num_seen", "rng_state", "task_order"}
    restored_state = json.loads(json.dumps(state))
    assert restored_state == state
    other = ReservoirBuffer(capacity=10, seed=999)
    other.add(make_rows(0, 12), task_id="a")
    other.add(make_rows(12, 30), task_id="b")
    other.load_state_dict(restored_state)
    assert other.state_dict() == state
    with pytest.raises(ValueError, match="implies 10 stored rows"):
        ReservoirBuffer(capacity=10).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        other.load_state_dict({"capacity": 10})


def test_save_load_round_trip_is_memory_mapped_and_continues_identically(filled, tmp_path):
    path = tmp_path / "buffer"
    filled.save_to_disk(path)
    assert sorted(os.listdir(tmp_path)) == ["buffer"]  # no temp directories left behind
    loaded = ReservoirBuffer.load_from_disk(path)
    assert loaded.as_dataset().cache_files, "rows should be memory-mapped from the saved Arrow files"
    assert loaded.as_dataset().to_dict() == filled.as_dataset().to_dict()
    assert loaded.state_dict() == filled.state_dict()
    assert loaded.features == filled.features
    for start, stop, task in [(30, 45, "c"), (45, 46, "a"), (46, 90, 4)]:
        filled.add(make_rows(start, stop), task_id=task)
        loaded.add(make_rows(start, stop), task_id=task)
    assert loaded.as_dataset().to_dict() == filled.as_dataset().to_dict()
    assert loaded.task_counts() == filled.task_counts()
    assert loaded.sample(5, seed=0).to_dict() == filled.sample(5, seed=0).to_dict()


def test_overwrite_existing_buffer_including_itself(filled, tmp_path):
    path = tmp_path / "buffer"
    filled.save_to_disk(path)
    filled.add(make_rows(30, 60), task_id="c")
    filled.save_to_disk(path)  # overwrite with a newer buffer
    loaded = ReservoirBuffer.load_from_disk(path)
    assert loaded.as_dataset().to_dict() == filled.as_dataset().to_dict()
    # A memory-mapped buffer saved over the directory it maps: still readable, and still maps existing files.
    loaded.save_to_disk(path)
    assert loaded.as_dataset().to_dict() == filled.as_dataset().to_dict()
    assert all(Path(f["filename"]).exists() for f in loaded.as_dataset().cache_files)
    assert ReservoirBuffer.load_from_disk(path).as_dataset().to_dict() == filled.as_dataset().to_dict()
    assert sorted(os.listdir(tmp_path)) == ["buffer"]


def test_save_refuses_to_clobber_other_directories(filled, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="Refusing to overwrite"):
        filled.save_to_disk(tmp_path / "model")
    assert (tmp_path / "model" / "weights.bin").exists()


def test_interrupted_save_leaves_previous_buffer_intact(filled, tmp_path, monkeypatch):
    path = tmp_path / "buffer"
    filled.save_to_disk(path)
    before = ReservoirBuffer.load_from_disk(path).as_dataset().to_dict()
    filled.add(make_rows(30, 60), task_id="c")

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("simulated crash while writing rows")

    monkeypatch.setattr(Dataset, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        filled.save_to_disk(path)
    monkeypatch.undo()
    assert ReservoirBuffer.load_from_disk(path).as_dataset().to_dict() == before
    assert sorted(os.listdir(tmp_path)) == ["buffer"]


def test_empty_buffer_round_trip(tmp_path):
    buffer = ReservoirBuffer(capacity=4, seed=2)
    buffer.save_to_disk(tmp_path / "empty")
    loaded = ReservoirBuffer.load_from_disk(tmp_path / "empty")
    assert len(loaded) == 0 and loaded.capacity == 4
    buffer.add(make_rows(0, 9), task_id=0)
    loaded.add(make_rows(0, 9), task_id=0)
    assert row_ids(loaded) == row_ids(buffer)


def _corrupt_missing_state(path: Path) -> None:
    (path / STATE_FILE_NAME).unlink()


def _corrupt_state_json(path: Path) -> None:
    (path / STATE_FILE_NAME).write_text('{"capacity": 10, "num_se')


def _corrupt_state_values(path: Path) -> None:
    state = json.loads((path / STATE_FILE_NAME).read_text())
    state["num_seen"] = 3  # 3 rows expected, 10 stored
    (path / STATE_FILE_NAME).write_text(json.dumps(state))


def _delete_arrow(path: Path) -> None:
    for arrow in path.glob("*.arrow"):
        arrow.unlink()


def _truncate_arrow(path: Path) -> None:
    for arrow in path.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_corrupt_missing_state, "reservoir_state.json is missing"),
        (_corrupt_state_json, "reservoir_state.json is corrupt"),
        (_corrupt_state_values, "implies 3 stored rows"),
        (_delete_arrow, "stored rows could not be read"),
        (_truncate_arrow, "stored rows could not be read"),
    ],
)
def test_load_errors_name_path_and_problem(filled, tmp_path, corrupt, message):
    path = tmp_path / "buffer"
    filled.save_to_disk(path)
    corrupt(path)
    with pytest.raises(ValueError, match=message) as info:
        ReservoirBuffer.load_from_disk(path)
    assert str(path) in str(info.value)


def test_load_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="no such directory") as info:
        ReservoirBuffer.load_from_disk(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_no_pickle_in_saved_buffer(filled, tmp_path):
    filled.save_to_disk(tmp_path / "buffer")
    names = sorted(p.name for p in (tmp_path / "buffer").iterdir())
    assert STATE_FILE_NAME in names
    assert all(name.endswith((".json", ".arrow")) for name in names), names


# ----------------------------------------------------------------------------- docs


class _FencedDocTestParser(doctest.DocTestParser):
    """Docstrings follow the Hugging Face style (examples inside ```python fences); drop the fence lines so the
    closing fence is not read as expected output."""

    def parse(self, string, name="<string>"):
        string = "\n".join(line for line in string.splitlines() if not line.strip().startswith("```"))
        return super().parse(string, name)


def test_docstring_examples_run():
    finder = doctest.DocTestFinder(parser=_FencedDocTestParser())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(buffer_module, globs={"ReservoirBuffer": ReservoirBuffer})
    assert sum(len(t.examples) for t in tests) > 10
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_incoming_index_mapping_is_respected():
    # A shuffled dataset has an index mapping; the stream order is its logical (shuffled) order.
    shuffled = make_rows(0, 40).shuffle(seed=0)
    buffer = ReservoirBuffer(capacity=6, seed=4)
    buffer.add(shuffled, task_id="s")
    order = [labels[0] for labels in shuffled["labels"]]
    assert row_ids(buffer) == [order[i] for i in reference_algorithm_r(4, 6, 40)]
    assert buffer.task_counts() == {"s": 6}
    assert buffer.as_dataset().cache_files == []  # kept in memory: no cache files written next to the input


def test_adding_a_memory_mapped_dataset_writes_nothing_next_to_it(tmp_path):
    from datasets import load_from_disk

    make_rows(0, 50).save_to_disk(str(tmp_path / "task"))
    before = sorted(os.listdir(tmp_path / "task"))
    buffer = ReservoirBuffer(capacity=7, seed=0)
    buffer.add(load_from_disk(str(tmp_path / "task")).with_format("numpy"), task_id=0)
    buffer.add(make_rows(50, 80), task_id=1)
    assert sorted(os.listdir(tmp_path / "task")) == before
    assert row_ids(buffer) == reference_algorithm_r(0, 7, 80)
    assert isinstance(buffer.as_dataset()[0]["labels"], list)  # the input's format does not leak into storage
