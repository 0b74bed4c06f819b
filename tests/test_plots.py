"""Tests for clm_hf.plots: every figure renders to a valid PNG, and write_report finds runs."""

from __future__ import annotations

import sys

import matplotlib
import pytest
from matplotlib.figure import Figure

from clm_hf.plots import plot_comparison, plot_heatmap, plot_parameter_usage, plot_task_curves, write_report
from clm_hf.results import ContinualResults

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["sst2", "boolq", "squad"]


def assert_png(path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 1000, f"{path} is suspiciously small ({len(data)} bytes)"


def make_results(forget: float = 0.3, usage: bool = False, trained: int = 3) -> ContinualResults:
    res = ContinualResults(task_names=list(TASKS), metadata={"strategy": "test"})
    res.set_baseline({"exact_match": [0.1, 0.05, 0.0], "loss": [3.0, 3.1, 3.4]})
    for i in range(trained):
        em = [0.9 - forget * (i - j) if j <= i else 0.2 for j in range(len(TASKS))]
        em[-1] = None if i == 0 else em[-1]  # one cell not evaluated
        res.add_row({"exact_match": em, "loss": [None if v is None else 2.0 - v for v in em]})
    if usage:
        res.metadata["parameter_usage"] = {"sst2": [0.3], "boolq": [0.3, 0.25], "squad": [0.3, 0.25, 0.2]}
    return res


@pytest.mark.parametrize("metric", [None, "loss"])
def test_heatmap_and_task_curves(tmp_path, metric):
    res = make_results()
    for func, name in ((plot_heatmap, "heat.png"), (plot_task_curves, "curves.png")):
        fig = func(res, tmp_path / "sub" / name, metric=metric)  # parent folder created
        assert isinstance(fig, Figure)
        assert_png(tmp_path / "sub" / name)


def test_plots_without_path_return_figure_only(tmp_path):
    fig = plot_heatmap(make_results())
    assert isinstance(fig, Figure)
    assert list(tmp_path.iterdir()) == []


def test_task_curves_stage_labels():
    fig = plot_task_curves(make_results(trained=2))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["baseline", "after sst2", "after boolq"]
    assert len(fig.axes[0].get_lines()) == 3  # one line per task


def test_plots_with_no_rows(tmp_path):
    res = ContinualResults(task_names=["a", "b"])
    plot_heatmap(res, tmp_path / "h.png")
    plot_task_curves(res, tmp_path / "c.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE


def test_comparison(tmp_path):
    single = ContinualResults(task_names=["x", "y"], scores={"exact_match": [[0.5, 0.0]]})  # BWT n/a
    fig = plot_comparison({"naive": make_results(0.3), "replay": make_results(0.05), "one": single},
                          tmp_path / "cmp.png")
    assert_png(tmp_path / "cmp.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["naive", "replay", "one"]
    with pytest.raises(ValueError):
        plot_comparison({})


@pytest.mark.parametrize(
    "usage",
    [
        {"sst2": [0.3], "boolq": [0.3, 0.25]},  # dict, rows shorter than the task list
        [[0.3, 0.0, 0.0], [0.3, 0.25, 0.0], [0.3, 0.25, 0.2]],  # list, free implied
        [[0.3, 0.0, 0.0, 0.7]],  # explicit free column
    ],
)
def test_parameter_usage(tmp_path, usage):
    plot_parameter_usage(usage, TASKS, tmp_path / "usage.png")
    assert_png(tmp_path / "usage.png")


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        ({"sst2": [0.8, 0.5]}, "sums to"),
        ([[-0.2]], "non-negative"),
        ([[0.1, 0.1, 0.1, 0.1, 0.1]], "at most 3"),
        ([], "empty"),
    ],
)
def test_parameter_usage_invalid(usage, message):
    with pytest.raises(ValueError, match=message):
        plot_parameter_usage(usage, TASKS)


def test_write_report_two_runs(tmp_path):
    make_results(0.3).save(tmp_path / "naive" / "results.json")
    make_results(0.0, usage=True).save(tmp_path / "packnet" / "results.json")
    (tmp_path / "notes").mkdir()  # a subfolder without results is ignored

    written = write_report(tmp_path)

    expected = {
        tmp_path / "naive" / "heatmap.png",
        tmp_path / "naive" / "task_curves.png",
        tmp_path / "packnet" / "heatmap.png",
        tmp_path / "packnet" / "task_curves.png",
        tmp_path / "packnet" / "packnet_parameter_usage.png",
        tmp_path / "packnet" / "packnet_task_accuracies.png",
        tmp_path / "comparison.png",
        tmp_path / "comparison.md",
    }
    assert set(written) == expected and len(written) == len(expected)
    for path in expected - {tmp_path / "comparison.md"}:
        assert_png(path)
    md = (tmp_path / "comparison.md").read_text()
    assert "| run | ACC | BWT | FWT | forgetting |" in md
    assert "| naive |" in md and "| packnet |" in md
    assert not (tmp_path / "naive" / "packnet_parameter_usage.png").exists()


def test_write_report_single_top_level_run(tmp_path):
    make_results().save(tmp_path / "results.json")
    written = write_report(str(tmp_path))
    assert [p.name for p in written] == ["heatmap.png", "task_curves.png"]
    assert not (tmp_path / "comparison.md").exists()


def test_write_report_no_results(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        write_report(tmp_path / "missing")


def test_write_report_corrupt_results(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        write_report(tmp_path)


def test_plots_do_not_touch_pyplot(tmp_path):
    # Plotting must neither import pyplot nor change the backend a user picked. Read the raw
    # rcParams entry: matplotlib.get_backend() would itself resolve (and import) a backend.
    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend_before = dict.__getitem__(matplotlib.rcParams, "backend")
    write_report_dir = tmp_path / "run"
    make_results(usage=True).save(write_report_dir / "results.json")
    write_report(write_report_dir)
    plot_comparison({"a": make_results(), "b": make_results()})
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend_before
    if not had_pyplot:  # something else in the test session may have imported it already
        assert "matplotlib.pyplot" not in sys.modules, "clm_hf.plots imported matplotlib.pyplot"
