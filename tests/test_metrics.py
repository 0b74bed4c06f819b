"""Tests for clm_hf.metrics (ACC/BWT/FWT/forgetting) and clm_hf.results (ContinualResults)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from clm_hf.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer, summarize
from clm_hf.results import HIGHER_IS_BETTER, ContinualResults, comparison_table

approx = pytest.approx

# ---------------------------------------------------------------------------------------
# Worked 3x3 example (higher is better), rows = after training task i, cols = task j:
#
#             task0  task1  task2
#   b       [ 0.00,  0.05,  0.10 ]
#   after 0 [ 0.80,  0.10,  0.20 ]
#   after 1 [ 0.85,  0.90,  0.30 ]
#   after 2 [ 0.50,  0.70,  0.95 ]
#
# ACC        = (0.50 + 0.70 + 0.95) / 3                          = 0.716666...
# BWT        = ((0.50 - 0.80) + (0.70 - 0.90)) / 2               = -0.25
#              (uses R[j][j], i.e. 0.80 for task 0, not its later best 0.85)
# FWT        = ((R[0][1] - b1) + (R[1][2] - b2)) / 2
#            = ((0.10 - 0.05) + (0.30 - 0.10)) / 2               = 0.125
# forgetting = f0 = max(0.80, 0.85) - 0.50 = 0.35
#              f1 = max(0.90)       - 0.70 = 0.20
#              mean                                               = 0.275
# ---------------------------------------------------------------------------------------
R3 = [
    [0.80, 0.10, 0.20],
    [0.85, 0.90, 0.30],
    [0.50, 0.70, 0.95],
]
B3 = [0.00, 0.05, 0.10]

# Lower-is-better (loss) 3x3 example:
#   b       [ 4.0, 3.5, 4.5 ]
#   after 0 [ 1.0, 3.0, 4.0 ]
#   after 1 [ 1.5, 0.8, 3.5 ]
#   after 2 [ 2.0, 1.0, 0.5 ]
# ACC        = (2.0 + 1.0 + 0.5) / 3                 = 1.1666... (plain mean, no sign)
# BWT        = -((2.0 - 1.0) + (1.0 - 0.8)) / 2      = -0.6   (loss went up -> negative)
# FWT        = -((3.0 - 3.5) + (3.5 - 4.5)) / 2      = 0.75   (loss went down before training -> positive)
# forgetting = ((2.0 - min(1.0, 1.5)) + (1.0 - 0.8)) / 2 = 0.6 (positive = worse)
L3 = [
    [1.0, 3.0, 4.0],
    [1.5, 0.8, 3.5],
    [2.0, 1.0, 0.5],
]
LB3 = [4.0, 3.5, 4.5]


class TestMetrics:
    def test_worked_example(self):
        assert average_accuracy(R3) == approx(2.15 / 3)
        assert backward_transfer(R3) == approx(-0.25)
        assert forward_transfer(R3, B3) == approx(0.125)
        assert forgetting(R3) == approx(0.275)
        assert summarize(R3, B3) == approx({"acc": 2.15 / 3, "bwt": -0.25, "fwt": 0.125, "forgetting": 0.275})

    def test_lower_is_better(self):
        s = summarize(L3, LB3, higher_is_better=False)
        assert s == approx({"acc": 3.5 / 3, "bwt": -0.6, "fwt": 0.75, "forgetting": 0.6})

    def test_sign_flip_is_symmetric(self):
        # Negating every score and flipping the direction must give the same transfer metrics.
        neg_r = [[-v for v in row] for row in R3]
        neg_b = [-v for v in B3]
        flipped = summarize(neg_r, neg_b, higher_is_better=False)
        plain = summarize(R3, B3)
        for key in ("bwt", "fwt", "forgetting"):
            assert flipped[key] == approx(plain[key])
        assert flipped["acc"] == approx(-plain["acc"])

    def test_partial_stream(self):
        # t=2 trained tasks out of T=4: ACC only averages the 2 seen tasks.
        r = [[0.9, 0.2, 0.1, 0.0], [0.6, 0.8, 0.3, 0.1]]
        b = [0.1, 0.1, 0.1, 0.1]
        assert summarize(r, b) == approx({"acc": 0.7, "bwt": -0.3, "fwt": 0.1, "forgetting": 0.3})

    def test_single_task_undefined(self):
        s = summarize([[0.9, 0.2]], b=[0.0, 0.0])
        assert s == {"acc": 0.9, "bwt": None, "fwt": None, "forgetting": None}

    def test_empty_matrix(self):
        assert summarize([]) == {"acc": None, "bwt": None, "fwt": None, "forgetting": None}

    def test_fwt_without_baseline(self):
        assert forward_transfer(R3, None) is None
        assert summarize(R3)["fwt"] is None

    def test_none_entries_are_skipped(self):
        r = [row[:] for row in R3]
        r[2][1] = None  # task 1 not evaluated at the end: BWT/forgetting only use task 0
        assert backward_transfer(r) == approx(0.50 - 0.80)
        assert forgetting(r) == approx(0.35)
        assert average_accuracy(r) == approx((0.50 + 0.95) / 2)
        b = [None, None, 0.10]  # only task 2 has a baseline
        assert forward_transfer(R3, b) == approx(0.30 - 0.10)

    def test_all_needed_entries_missing(self):
        r = [[0.8, None], [None, 0.6]]
        assert backward_transfer(r) is None
        assert forgetting(r) is None
        assert forward_transfer(r, [0.0, 0.0]) is None
        assert average_accuracy([[None, 0.3]]) is None

    def test_nan_is_missing(self):
        r = [[0.8, 0.1], [float("nan"), 0.6]]
        assert backward_transfer(r) is None
        assert average_accuracy(r) == approx(0.6)

    def test_forgetting_ignores_rows_before_task_was_learned(self):
        # Task 1 scored 0.9 zero-shot (row 0) but only 0.5 once learned (row 1); it cannot have
        # "forgotten" a score it had before being trained on.
        r = [[0.9, 0.9, 0.0], [0.9, 0.5, 0.0], [0.9, 0.5, 0.9]]
        assert forgetting(r) == approx(0.0)

    def test_numpy_input(self):
        assert summarize(np.array(R3), np.array(B3)) == approx(summarize(R3, B3))

    def test_ragged_rows(self):
        with pytest.raises(ValueError, match="ragged"):
            summarize([[0.1, 0.2], [0.3]])

    def test_more_rows_than_columns(self):
        with pytest.raises(ValueError, match="3 rows.*2 columns"):
            backward_transfer([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])

    def test_baseline_wrong_length(self):
        with pytest.raises(ValueError, match="baseline has 2 entries"):
            forward_transfer(R3, [0.0, 0.0])

    @pytest.mark.parametrize("bad", ["abc", [["x", 0.1]], [[True, 0.2]], [0.1, 0.2]])
    def test_non_numeric(self, bad):
        with pytest.raises(ValueError):
            summarize(bad)


def _results(**kwargs) -> ContinualResults:
    res = ContinualResults(task_names=["a", "b", "c"], **kwargs)
    res.set_baseline({"exact_match": B3, "loss": LB3})
    for em, loss in zip(R3, L3):
        res.add_row({"exact_match": em, "loss": loss})
    return res


class TestContinualResults:
    def test_summary_uses_metric_direction(self):
        res = _results()
        assert res.num_trained == 3
        assert res.higher_is_better == {"exact_match": True, "loss": False}
        assert res.summary() == approx(summarize(R3, B3))
        assert res.summary("loss") == approx(summarize(L3, LB3, higher_is_better=False))
        assert set(res.summaries()) == {"exact_match", "loss"}

    def test_default_direction_for_unknown_metric(self):
        res = ContinualResults(task_names=["a"])
        res.add_row({"bleu": [0.3]})
        assert res.higher_is_better["bleu"] is True
        assert HIGHER_IS_BETTER["perplexity"] is False

    def test_explicit_direction_wins(self):
        res = ContinualResults(task_names=["a", "b"], higher_is_better={"score": False})
        res.add_row({"score": [1.0, 5.0]})
        res.add_row({"score": [2.0, 1.0]})
        assert res.summary("score")["bwt"] == approx(-1.0)

    def test_matrix_is_a_copy_and_primary_fallback(self):
        res = ContinualResults(task_names=["a", "b"], scores={"loss": [[1.0, 2.0]]})
        m = res.matrix()  # exact_match not recorded -> first recorded metric
        m[0][0] = 99.0
        assert res.matrix("loss") == [[1.0, 2.0]]
        with pytest.raises(KeyError, match="exact_match"):
            res.matrix("exact_match")

    def test_add_row_checks_lengths(self):
        res = ContinualResults(task_names=["a", "b"])
        with pytest.raises(ValueError, match="1 entries but the stream has 2 tasks"):
            res.add_row({"exact_match": [0.5]})
        assert res.num_trained == 0  # a failed call changes nothing
        with pytest.raises(ValueError):
            res.add_row({})
        res.add_row({"exact_match": [0.5, 0.1]})
        res.add_row({"exact_match": [0.4, 0.9]})
        with pytest.raises(ValueError, match="already have a row"):
            res.add_row({"exact_match": [0.4, 0.9]})

    def test_add_row_pads_missing_metrics(self):
        res = ContinualResults(task_names=["a", "b"])
        res.add_row({"exact_match": [0.5, 0.1]})
        res.add_row({"loss": [1.0, 2.0]})
        assert res.scores["loss"] == [[None, None], [1.0, 2.0]]
        assert res.scores["exact_match"] == [[0.5, 0.1], [None, None]]

    def test_constructor_validation(self):
        with pytest.raises(ValueError, match="unique"):
            ContinualResults(task_names=["a", "a"])
        with pytest.raises(ValueError, match="row counts"):
            ContinualResults(task_names=["a", "b"], scores={"x": [[1, 2]], "y": [[1, 2], [3, 4]]})
        with pytest.raises(ValueError, match="3 rows"):
            ContinualResults(task_names=["a", "b"], scores={"x": [[1, 2]] * 3})

    def test_json_round_trip(self, tmp_path):
        res = _results(metadata={"strategy": "ewc", "config": {"lambda": 0.4, "tasks": ("a", "b")},
                                 "timings": [1.5, float("nan")], "ratio": np.float32(0.5)})
        # Edited in place, bypassing add_row's cleaning: NaN must still be written as null.
        res.scores["exact_match"][2][1] = float("nan")
        path = tmp_path / "out" / "results.json"
        res.save(path)
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text
        data = json.loads(text)
        assert data["format_version"] == 1
        assert data["scores"]["exact_match"][2][1] is None
        assert data["metadata"]["timings"] == [1.5, None]
        loaded = ContinualResults.load(path)
        assert loaded.task_names == res.task_names
        assert loaded.scores["exact_match"][2] == [0.50, None, 0.95]
        assert loaded.scores["loss"] == L3
        assert loaded.baseline == res.baseline
        assert loaded.higher_is_better == res.higher_is_better
        assert loaded.metadata == {"strategy": "ewc", "config": {"lambda": 0.4, "tasks": ["a", "b"]},
                                   "timings": [1.5, None], "ratio": 0.5}
        assert loaded.summary()["bwt"] == approx(0.50 - 0.80)  # task 1's missing score is skipped
        assert ContinualResults.from_dict(loaded.to_dict()) == loaded

    def test_infinite_score_becomes_none(self):
        res = ContinualResults(task_names=["a"])
        res.add_row({"perplexity": [math.inf]})
        assert res.scores["perplexity"] == [[None]]

    def test_atomic_save_leaves_no_temp_files(self, tmp_path):
        res = _results()
        path = tmp_path / "results.json"
        res.save(path)
        res.save(path)  # overwrite
        assert sorted(os.listdir(tmp_path)) == ["results.json"]

    def test_failed_save_keeps_old_file(self, tmp_path, monkeypatch):
        path = tmp_path / "results.json"
        _results().save(path)
        before = path.read_text()

        def boom(src, dst):
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="disk full"):
            ContinualResults(task_names=["z"]).save(path)
        monkeypatch.undo()
        assert path.read_text() == before
        assert sorted(os.listdir(tmp_path)) == ["results.json"]

    def test_unserialisable_metadata(self, tmp_path):
        res = ContinualResults(task_names=["a"], metadata={"model": object()})
        with pytest.raises(TypeError, match="metadata.model"):
            res.save(tmp_path / "results.json")
        assert os.listdir(tmp_path) == []

    def test_load_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="results file not found"):
            ContinualResults.load(tmp_path / "missing.json")
        bad = tmp_path / "bad.json"
        bad.write_text('{"format_version": 1, "task_names": [')
        with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
            ContinualResults.load(bad)

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            ([1, 2], "JSON object"),
            ({"task_names": ["a"]}, "format_version"),
            ({"format_version": 2, "task_names": ["a"]}, "unsupported results format_version 2"),
            ({"format_version": 1}, "task_names"),
            ({"format_version": 1, "task_names": ["a"], "scores": {"em": [[0.1, 0.2]]}}, "2 entries"),
            ({"format_version": 1, "task_names": ["a"], "scores": {"em": [["x"]]}}, "must be a number"),
            ({"format_version": 1, "task_names": ["a"], "higher_is_better": {"em": "yes"}}, "must be a bool"),
            ({"format_version": 1, "task_names": ["a"], "extra": 1}, "unknown keys"),
        ],
    )
    def test_from_dict_malformed(self, tmp_path, data, message):
        with pytest.raises(ValueError, match=message):
            ContinualResults.from_dict(data)
        path = tmp_path / "results.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="not a valid clm-hf results file"):
            ContinualResults.load(path)

    def test_to_markdown(self):
        res = ContinualResults(task_names=["a", "b|c"])
        res.set_baseline({"exact_match": [0.0, None]})
        res.add_row({"exact_match": [0.91234, 0.1]})
        md = res.to_markdown()
        lines = md.splitlines()
        assert lines[0] == "| exact_match | a | b\\|c |"
        assert lines[1] == "| :--- | ---: | ---: |"
        assert lines[2] == "| baseline | 0.000 | n/a |"
        assert lines[3] == "| after a | 0.912 | 0.100 |"
        assert len(lines) == 4
        assert res.to_markdown(digits=1).splitlines()[3] == "| after a | 0.9 | 0.1 |"

    def test_format_table(self):
        text = _results().format_table("loss")
        lines = text.splitlines()
        assert lines[0].split() == ["loss", "a", "b", "c"]
        assert lines[2].split() == ["baseline", "4.000", "3.500", "4.500"]
        assert lines[-1].split() == ["after", "c", "2.000", "1.000", "0.500"]
        # Fixed width: every number column ends at the same offset on every row.
        assert len({len(line) for line in lines}) == 1

    def test_comparison_table(self):
        single = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.9, 0.0]]})
        runs = {"ewc": _results(), "single": single}
        text = comparison_table(runs)
        lines = text.splitlines()
        assert lines[0].split() == ["run", "ACC", "BWT", "FWT", "forgetting"]
        assert lines[2].split() == ["ewc", "0.717", "-0.250", "0.125", "0.275"]
        assert lines[3].split() == ["single", "0.900", "n/a", "n/a", "n/a"]
        md = comparison_table(runs, markdown=True).splitlines()
        assert md[0] == "| run | ACC | BWT | FWT | forgetting |"
        assert md[2] == "| ewc | 0.717 | -0.250 | 0.125 | 0.275 |"
        loss = comparison_table({"ewc": _results()}, metric="loss").splitlines()
        assert loss[2].split() == ["ewc", "1.167", "-0.600", "0.750", "0.600"]


def test_docs_metrics_worked_example():
    """The worked example printed in docs/metrics.md."""
    r = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.3, 0.6, 0.7]]
    b = [0.0, 0.0, 0.1]
    assert summarize(r, b) == approx({"acc": 1.6 / 3, "bwt": -0.4, "fwt": 0.1, "forgetting": 0.4})


# --- review je, finding 1: a primary metric that never moves -----------------------------------------------
def test_stalled_primary_metric_needs_a_task_whose_other_score_moved():
    res = ContinualResults(task_names=["a", "b"])
    res.set_baseline({"exact_match": [0.0, 0.0], "token_accuracy": [0.1, 0.3], "loss": [4.0, 3.0]})
    # Tasks differ from each other, but no task's score has moved yet: nothing to say.
    assert res.stalled_primary_metric() is None
    res.add_row({"exact_match": [0.0, 0.0], "token_accuracy": [0.1, 0.3], "loss": [2.5, 3.0]})
    message = res.stalled_primary_metric()
    assert "'exact_match' is 0.0 in every evaluation" in message and "loss of task 'a' moved (from 4 to 2.5)" in message
    res.add_row({"exact_match": [0.0, 0.0], "token_accuracy": [0.85, 0.2], "loss": [1.0, 1.0]})
    assert "token_accuracy of task 'a'" in res.stalled_primary_metric()  # token_accuracy named first
    assert 'primary_metric="token_accuracy"' in res.stalled_primary_metric()
    # A primary metric that moved anywhere, or a primary metric that is token_accuracy itself and moved: None.
    moved = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.0, 0.0], [0.0, 0.5]],
                                                            "token_accuracy": [[0.1, 0.2], [0.5, 0.9]]})
    assert moved.stalled_primary_metric() is None
    on_accuracy = ContinualResults(task_names=["a"], primary_metric="token_accuracy",
                                   scores={"token_accuracy": [[0.5]], "loss": [[2.0]]},
                                   baseline={"token_accuracy": [0.5], "loss": [3.0]})
    assert 'primary_metric="loss"' in on_accuracy.stalled_primary_metric()
