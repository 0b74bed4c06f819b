"""Figures for continual-learning results: score heatmaps, per-task curves, run comparisons.

Every function builds a `matplotlib.figure.Figure` attached to an Agg canvas directly
instead of going through `matplotlib.pyplot`. That renders off-screen on any machine
(no display needed), does not change the backend a user (or a notebook) already picked,
and does not register figures in pyplot's global list, so nothing leaks when many figures
are made in a loop. Each function returns the figure and, when given ``path``, also saves
it there as PNG (parent folders are created).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .results import HIGHER_IS_BETTER, ContinualResults, comparison_table

__all__ = [
    "plot_heatmap",
    "plot_task_curves",
    "plot_comparison",
    "plot_parameter_usage",
    "plot_reference",
    "write_report",
]

_DPI = 110
_RESULTS_FILE = "results.json"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    # Attaching the canvas is what makes savefig/draw use Agg without touching pyplot.
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=_DPI)
    return fig


def _to_array(rows: Sequence[Sequence[float | None]], num_cols: int) -> np.ndarray:
    # NaN marks missing entries: imshow masks them and line plots leave a gap.
    arr = np.full((len(rows), num_cols), np.nan, dtype=float)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if value is not None:
                arr[i, j] = float(value)
    return arr


def _higher_is_better(results: ContinualResults, metric: str) -> bool:
    return results.higher_is_better.get(metric, HIGHER_IS_BETTER.get(metric, True))


def _set_xticks(ax, positions, labels: Sequence[str]) -> None:
    # Slant the labels once there are more than a few, so long task names do not overlap.
    slanted = len(labels) > 4
    ax.set_xticks(list(positions), list(labels), rotation=30 if slanted else 0, ha="right" if slanted else "center")


def _task_colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_heatmap(
    results: ContinualResults, path: str | os.PathLike | None = None, metric: str | None = None
) -> Figure:
    """Draws the score matrix ``R`` as an annotated heatmap.

    Rows are ``"after <task>"`` (training stages), columns the tasks of the stream; each cell
    shows its value, ``n/a`` where the task was not evaluated. For a lower-is-better metric the
    colour map is reversed, so the "good" colour means the same thing for every metric.

    Args:
        results (`ContinualResults`): the run to draw.
        path (`str` or `os.PathLike`, *optional*): where to save the PNG.
        metric (`str`, *optional*): metric to draw; defaults to the run's primary metric.

    Returns:
        `matplotlib.figure.Figure`: the figure.

    Example:

    ```python
    >>> from clm_hf.results import ContinualResults
    >>> res = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.9, 0.1], [0.7, 0.8]]})
    >>> fig = plot_heatmap(res)
    >>> fig.axes[0].get_title()
    'exact_match after each training stage'

    ```
    """
    name = results.resolve_metric(metric)
    matrix = results.matrix(name)
    num_tasks, num_rows = len(results.task_names), len(matrix)
    fig = _new_figure(max(4.0, 1.0 + 0.9 * num_tasks), max(3.0, 1.4 + 0.6 * max(num_rows, 1)))
    ax = fig.add_subplot()
    ax.set_title(f"{name} after each training stage")
    if num_rows == 0:
        ax.text(0.5, 0.5, "no task trained yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)

    data = _to_array(matrix, num_tasks)
    finite = data[np.isfinite(data)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:  # a constant matrix would give a zero-width colour scale
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cmap = colormaps["viridis" if _higher_is_better(results, name) else "viridis_r"].with_extremes(bad="#dddddd")
    norm = Normalize(vmin=vmin, vmax=vmax)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    fig.colorbar(image, ax=ax, label=name)

    fontsize = 9 if num_tasks <= 8 else 7 if num_tasks <= 15 else 5
    for i in range(num_rows):
        for j in range(num_tasks):
            value = data[i, j]
            if np.isnan(value):
                ax.text(j, i, "n/a", ha="center", va="center", color="#555555", fontsize=fontsize)
                continue
            # Dark text on light cells, light text on dark cells, judged by the cell's luminance.
            r, g, b, _ = cmap(norm(value))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=fontsize)

    _set_xticks(ax, range(num_tasks), results.task_names)
    ax.set_yticks(range(num_rows), [f"after {t}" for t in results.task_names[:num_rows]])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("training stage")
    return _save(fig, path)


def plot_task_curves(
    results: ContinualResults, path: str | os.PathLike | None = None, metric: str | None = None
) -> Figure:
    """Plots each task's score across training stages, one line per task.

    The x axis is the training stage: ``baseline`` (stage 0, if recorded), then ``after
    <task>`` for each trained task. A star marks the stage at which each task was trained,
    so the drop after it is the forgetting and the rise before it the forward transfer.
    Missing scores leave gaps.

    Args:
        results (`ContinualResults`): the run to draw.
        path (`str` or `os.PathLike`, *optional*): where to save the PNG.
        metric (`str`, *optional*): metric to draw; defaults to the run's primary metric.

    Returns:
        `matplotlib.figure.Figure`: the figure.

    Example:

    ```python
    >>> from clm_hf.results import ContinualResults
    >>> res = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.9, 0.1], [0.7, 0.8]]})
    >>> len(plot_task_curves(res).axes[0].get_lines())  # one line per task
    2

    ```
    """
    name = results.resolve_metric(metric)
    rows = results.matrix(name)
    labels = [f"after {t}" for t in results.task_names[: len(rows)]]
    offset = 0
    if name in results.baseline:
        rows = [results.baseline[name], *rows]
        labels = ["baseline", *labels]
        offset = 1  # task i is trained at stage i + 1 when stage 0 is the baseline
    num_tasks = len(results.task_names)
    data = _to_array(rows, num_tasks)
    xs = np.arange(len(rows))

    fig = _new_figure(max(5.0, 2.5 + 0.8 * len(rows)), 4.0)
    ax = fig.add_subplot()
    ax.set_title(f"{name} per task across training")
    if len(rows) == 0:
        ax.text(0.5, 0.5, "no scores recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)

    for j, (task, color) in enumerate(zip(results.task_names, _task_colors(num_tasks))):
        ys = data[:, j]
        if np.isnan(ys).all():
            continue  # never evaluated: a legend entry without a line would only confuse
        ax.plot(xs, ys, marker="o", markersize=4, color=color, label=task)
        trained_at = j + offset
        if trained_at < len(rows) and not np.isnan(ys[trained_at]):
            # A scatter (not a second line) so the axes keep exactly one line per task.
            ax.scatter([trained_at], [ys[trained_at]], marker="*", s=160, color=[color],
                       edgecolors="black", linewidths=0.6, zorder=3)

    _set_xticks(ax, xs, labels)
    ax.set_xlabel("training stage (\u2605 = stage at which the task was trained)")
    direction = "higher is better" if _higher_is_better(results, name) else "lower is better"
    ax.set_ylabel(f"{name} ({direction})")
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(title="task", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _save(fig, path)


def plot_reference(
    results: ContinualResults, path: str | os.PathLike | None = None, metric: str | None = None
) -> Figure:
    """Plots the reference sets (scored, never trained) across training stages: general-ability retention.

    One panel per reference set, each with its reference metric (``results.reference_metric`` unless
    ``metric`` is given); the x axis is the training stage (``baseline``, then ``after <task>``).
    A dashed line marks the baseline, so the gap to it is the general ability lost or gained.

    Args:
        results (`ContinualResults`): the run to draw.
        path (`str` or `os.PathLike`, *optional*): where to save the PNG.
        metric (`str`, *optional*): metric to draw for every set.

    Returns:
        `matplotlib.figure.Figure`: the figure.

    Example:

    ```python
    >>> from clm_hf.results import ContinualResults
    >>> res = ContinualResults(task_names=["a"], scores={"exact_match": [[0.9]]},
    ...                        reference={"general": {"perplexity": [14.0]}},
    ...                        reference_baseline={"general": {"perplexity": 11.0}})
    >>> [ax.get_title() for ax in plot_reference(res).axes]
    ['reference set general']

    ```
    """
    names = results.reference_names
    fig = _new_figure(max(5.0, 4.0 * max(len(names), 1)), 4.0)
    if not names:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no reference set recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    labels = ["baseline", *(f"after {t}" for t in results.task_names[: results.num_trained])]
    for k, set_name in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        shown = results.resolve_reference_metric(set_name, metric)
        ys = _to_array([results.reference_curve(set_name, shown)], len(labels))[0]
        xs = np.arange(len(labels))
        ax.plot(xs, ys, marker="o", markersize=4, color="tab:purple", label=set_name)
        if not np.isnan(ys[0]):
            ax.axhline(ys[0], color="grey", linestyle="--", linewidth=0.8, label="before training")
        _set_xticks(ax, xs, labels)
        direction = "higher is better" if _higher_is_better(results, shown) else "lower is better"
        ax.set_ylabel(f"{shown} ({direction})")
        ax.set_title(f"reference set {set_name}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_comparison(
    results_by_name: Mapping[str, ContinualResults],
    path: str | os.PathLike | None = None,
    metric: str | None = None,
) -> Figure:
    """Draws grouped bars of ACC and BWT for several runs.

    Args:
        results_by_name (`Mapping[str, ContinualResults]`):
            Run name (e.g. strategy) -> results; bars keep the mapping's order.
        path (`str` or `os.PathLike`, *optional*): where to save the PNG.
        metric (`str`, *optional*): metric to compare; defaults to each run's primary metric.

    Returns:
        `matplotlib.figure.Figure`: the figure. Undefined values are drawn as an ``n/a`` label.

    Raises:
        ValueError: if ``results_by_name`` is empty.

    Example:

    ```python
    >>> from clm_hf.results import ContinualResults
    >>> res = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.9, 0.1], [0.7, 0.8]]})
    >>> fig = plot_comparison({"naive": res, "replay": res})
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['naive', 'replay']

    ```
    """
    if not results_by_name:
        raise ValueError("plot_comparison needs at least one run")
    runs = list(results_by_name)
    names = {run: results_by_name[run].resolve_metric(metric) for run in runs}
    summaries = {run: results_by_name[run].summary(names[run]) for run in runs}
    metric_label = next(iter(names.values())) if len(set(names.values())) == 1 else "score"

    fig = _new_figure(max(5.0, 1.5 + 1.3 * len(runs)), 4.0)
    ax = fig.add_subplot()
    xs = np.arange(len(runs))
    width = 0.38
    for k, (key, label, color) in enumerate((("acc", "ACC", "#4C72B0"), ("bwt", "BWT", "#DD8452"))):
        values = [summaries[run][key] for run in runs]
        positions = xs + (k - 0.5) * width
        bars = ax.bar(positions, [0.0 if v is None else v for v in values], width, label=label, color=color)
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3f}" for v in values], fontsize=8, padding=2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    _set_xticks(ax, xs, runs)
    ax.set_ylabel(metric_label)
    ax.set_title(f"ACC and BWT per run ({metric_label})")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    # Leave room for the value labels above/below the tallest bars.
    ax.margins(y=0.15)
    return _save(fig, path)


def _usage_rows(
    usage: Mapping[str, Sequence[float]] | Sequence[Sequence[float]], task_names: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """Normalises ``usage`` to (stage labels, ``stages x (tasks + 1)`` array whose last column is "free")."""
    num_tasks = len(task_names)
    if isinstance(usage, Mapping):
        labels = [f"after {k}" if k in task_names else str(k) for k in usage]
        rows = list(usage.values())
    elif isinstance(usage, (str, bytes)) or not hasattr(usage, "__iter__"):
        raise ValueError(f"usage must be a dict or a list of rows, got {type(usage).__name__}")
    else:
        rows = list(usage)
        labels = [f"after {task_names[i]}" if i < num_tasks else f"stage {i + 1}" for i in range(len(rows))]
    if not rows:
        raise ValueError("usage is empty: need at least one stage")
    table = np.zeros((len(rows), num_tasks + 1))
    for i, (label, row) in enumerate(zip(labels, rows)):
        values = np.asarray([np.nan if v is None else v for v in row], dtype=float)
        if values.ndim != 1 or len(values) > num_tasks + 1:
            raise ValueError(
                f"usage row {label!r} has {values.size} entries; expected at most {num_tasks} task shares "
                f"plus an optional final 'free' share"
            )
        if not np.isfinite(values).all() or (values < -1e-6).any():
            raise ValueError(f"usage row {label!r} must hold finite non-negative fractions, got {values.tolist()}")
        values = np.clip(values, 0.0, None)
        if len(values) == num_tasks + 1:
            table[i] = values
        else:
            # Shares of tasks not listed yet are zero; whatever is not owned is free.
            table[i, : len(values)] = values
            table[i, num_tasks] = max(0.0, 1.0 - values.sum())
        if table[i].sum() > 1.0 + 1e-3:
            raise ValueError(
                f"usage row {label!r} sums to {table[i].sum():.4f} > 1; shares must be fractions of the network"
            )
    return labels, table


def plot_parameter_usage(
    usage: Mapping[str, Sequence[float]] | Sequence[Sequence[float]],
    task_names: Sequence[str],
    path: str | os.PathLike | None = None,
) -> Figure:
    """Draws, per training stage, the share of the prunable parameters owned by each task.

    Meant for PackNet-style strategies, which reserve a slice of the network for each task and
    leave the rest free for later tasks. One stacked bar per stage: one segment per task plus
    a hatched ``free`` segment.

    Args:
        usage (`dict[str, list[float]]` or `list[list[float]]`):
            One row per stage. As a dict the keys label the stages (a key equal to a task name
            is shown as ``"after <task>"``); as a list, row ``i`` is the stage after task ``i``.
            Each row holds the fraction owned by each task, in ``task_names`` order: either
            ``len(task_names)`` values (``free`` = 1 - their sum), ``len(task_names) + 1``
            values (the last one is ``free``), or fewer (tasks not listed own nothing yet).
        task_names (`list[str]`): all tasks of the stream, in order.
        path (`str` or `os.PathLike`, *optional*): where to save the PNG.

    Returns:
        `matplotlib.figure.Figure`: the figure.

    Raises:
        ValueError: if a row is too long, holds negative or non-finite values, or sums above 1.

    Example:

    ```python
    >>> usage = {"a": [0.5], "b": [0.5, 0.25]}  # after "a": a owns 50%; after "b": b owns 25% more
    >>> fig = plot_parameter_usage(usage, ["a", "b"])
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['after a', 'after b']

    ```
    """
    task_names = list(task_names)
    labels, table = _usage_rows(usage, task_names)
    fig = _new_figure(max(5.0, 2.5 + 0.8 * len(labels)), 4.0)
    ax = fig.add_subplot()
    xs = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for k, (task, color) in enumerate(zip(task_names, _task_colors(len(task_names)))):
        ax.bar(xs, table[:, k], 0.6, bottom=bottom, color=color, label=task, edgecolor="white", linewidth=0.5)
        bottom += table[:, k]
    ax.bar(xs, table[:, -1], 0.6, bottom=bottom, color="#eeeeee", hatch="//", edgecolor="#999999",
           linewidth=0.5, label="free")
    _set_xticks(ax, xs, labels)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("share of prunable parameters")
    ax.set_title("Parameter usage per task")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _save(fig, path)


def _find_results(run_dir: Path) -> list[Path]:
    found = [run_dir / _RESULTS_FILE] if (run_dir / _RESULTS_FILE).is_file() else []
    found += sorted(p / _RESULTS_FILE for p in run_dir.iterdir() if p.is_dir() and (p / _RESULTS_FILE).is_file())
    return found


def write_report(run_dir: str | os.PathLike) -> list[Path]:
    """Writes the figures (and, for several runs, a comparison) for every results file of a run folder.

    Looks for ``results.json`` in ``run_dir`` and in its direct subfolders (one per strategy,
    say). Next to each file it writes ``heatmap.png`` and ``task_curves.png``; if the results'
    results have reference sets it also writes ``reference.png`` (see `plot_reference`); if the
    metadata has ``"parameter_usage"`` (see `plot_parameter_usage`) it also writes
    ``packnet_parameter_usage.png`` and ``packnet_task_accuracies.png``. With more than one
    results file it also writes ``comparison.png`` and ``comparison.md`` in ``run_dir``; runs are
    named after their folder.

    Args:
        run_dir (`str` or `os.PathLike`): the folder to scan.

    Returns:
        `list[pathlib.Path]`: the files written, in the order written.

    Raises:
        FileNotFoundError: if ``run_dir`` does not exist or holds no ``results.json``.
        ValueError: if a results file is corrupt (the message names it).

    Example:

    ```python
    >>> import tempfile
    >>> from clm_hf.results import ContinualResults
    >>> run_dir = Path(tempfile.mkdtemp())
    >>> ContinualResults(task_names=["a"], scores={"exact_match": [[1.0]]}).save(run_dir / "naive" / "results.json")
    >>> [p.name for p in write_report(run_dir)]
    ['heatmap.png', 'task_curves.png']

    ```
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    files = _find_results(run_dir)
    if not files:
        raise FileNotFoundError(f"no {_RESULTS_FILE} found in {run_dir} or its direct subfolders")

    written: list[Path] = []
    runs: dict[str, ContinualResults] = {}
    for file in files:
        results = ContinualResults.load(file)
        folder = file.parent
        name = run_dir.resolve().name if folder == run_dir else folder.name
        base, n = name, 2
        while name in runs:  # the top-level run and a subfolder could share a name
            name, n = f"{base} ({n})", n + 1
        runs[name] = results

        for filename, plot in (("heatmap.png", plot_heatmap), ("task_curves.png", plot_task_curves)):
            plot(results, folder / filename)
            written.append(folder / filename)
        if results.reference_names:
            plot_reference(results, folder / "reference.png")
            written.append(folder / "reference.png")
        usage = results.metadata.get("parameter_usage")
        if usage:
            plot_parameter_usage(usage, results.task_names, folder / "packnet_parameter_usage.png")
            written.append(folder / "packnet_parameter_usage.png")
            plot_task_curves(results, folder / "packnet_task_accuracies.png")
            written.append(folder / "packnet_task_accuracies.png")

    if len(runs) > 1:
        plot_comparison(runs, run_dir / "comparison.png")
        written.append(run_dir / "comparison.png")
        sections = ["# Comparison", "", comparison_table(runs, markdown=True), ""]
        for name, results in runs.items():
            sections += [f"## {name}", "", results.to_markdown(), ""]
        (run_dir / "comparison.md").write_text("\n".join(sections), encoding="utf-8")
        written.append(run_dir / "comparison.md")
    return written
