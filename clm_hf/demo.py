"""The one-command demo: several strategies on the same synthetic stream with a tiny GPT-2.

Each strategy trains the same freshly built model (same seed) on the same task sequence; the
demo prints each accuracy matrix, a comparison table (ACC, BWT, FWT, forgetting), and writes
``results.json`` per strategy plus plots into the run folder.

Tracking: with ``report_to="auto"`` (the default) every installed tracker among MLflow and
TensorBoard logs each strategy as its own run, named after it, inside the run folder: MLflow in a
server-less ``file:`` store ``<output_dir>/mlruns`` (unless ``MLFLOW_TRACKING_URI`` is set, which
wins), TensorBoard in ``<output_dir>/tensorboard/<strategy>/``. The environment is changed only
while the demo runs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from .results import ContinualResults, comparison_table

logger = logging.getLogger(__name__)

# Settings measured on 2 CPU cores (docs/strategies.md): with 384 steps per task at lr 1e-3 the
# tiny model learns every task (exact match 0.8-1.0 right after training it, over seeds, CPU
# kernels and thread counts), and plain fine-tuning then forgets most of it (BWT about -0.85),
# which is what the demo must show. 256 held-out rows per task: one row is 0.4 points.
DEMO_RECIPE: dict[str, Any] = {
    "model": {"arch": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "tasks": {"suite": "synthetic", "names": ["copy", "shift", "rotate"], "num_train": 512, "num_eval": 256,
              "min_len": 2, "max_len": 4, "seed": 0},
    "training": {
        "num_train_epochs": 12, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "logging_steps": 100, "save_strategy": "no", "report_to": "none", "seed": 0,
        "disable_tqdm": False, "dataloader_pin_memory": False,
    },
}

DEMO_STRATEGIES: dict[str, list[dict[str, Any]]] = {
    "plain": [],
    "replay": [{"name": "replay", "buffer_size": 256, "replay_ratio": 1.0}],
    "ewc": [{"name": "ewc"}],  # the library default, lambda 1000 (docs/strategies.md has the sweep)
    # A-GEM's variant that also pushes along the memory's gradient (docs/strategies.md, GEM and A-GEM)
    "agem_margin": [{"name": "agem", "margin": 0.5}],
}


TRACKERS = ("mlflow", "tensorboard")
"""The trackers the demo can log to (``report_to`` names, as in ``TrainingArguments``)."""

_INSTALL = {"mlflow": "pip install 'clm-hf[mlflow]'", "tensorboard": "pip install 'clm-hf[tensorboard]'"}


def parse_report_to(report_to: str | Sequence[str] | None) -> list[str]:
    """Check and normalize a ``report_to`` value: ``["auto"]``, ``["none"]`` or tracker names.

    >>> parse_report_to("MLflow, tensorboard")
    ['mlflow', 'tensorboard']
    """
    if report_to is None:
        names: list[str] = ["none"]
    elif isinstance(report_to, str):
        names = [n.strip().lower() for n in report_to.split(",") if n.strip()] or ["none"]
    else:
        names = [str(n).strip().lower() for n in report_to] or ["none"]
    unknown = [n for n in names if n not in (*TRACKERS, "auto", "none")]
    if unknown:
        raise ValueError(f"Unknown tracker(s) {unknown} for the demo; choose 'auto', 'none' or from {list(TRACKERS)}.")
    if ("auto" in names or "none" in names) and len(names) > 1:
        raise ValueError(f"'auto' and 'none' cannot be combined with other trackers, got {names}.")
    return list(dict.fromkeys(names))


def resolve_report_to(report_to: str | Sequence[str] | None = "auto") -> list[str]:
    """The trackers the demo will log to: a subset of ``["mlflow", "tensorboard"]``.

    Args:
        report_to: ``"auto"`` (every installed tracker), ``"none"``, a tracker name, a
            comma-separated list of them, or a list.

    A tracker that is not installed, or whose import fails, is left out with a log message
    (a warning when it was asked for by name); the demo runs without it.

    >>> resolve_report_to("none")
    []
    """
    from . import tracking

    names = parse_report_to(report_to)
    if names == ["none"]:
        return []
    auto = names == ["auto"]
    wanted = list(TRACKERS) if auto else names
    installed = set(tracking.available_trackers())
    chosen = []
    for name in wanted:
        if name not in installed:
            log = logger.info if auto else logger.warning
            log("clm-hf demo: %s is not installed; logging without it (%s).", name, _INSTALL[name])
            continue
        error = _tracker_import_error(name)
        if error is not None:
            logger.warning("clm-hf demo: %s is installed but cannot be used (%s); logging without it.", name, error)
            continue
        chosen.append(name)
    return chosen


def _tracker_import_error(name: str) -> str | None:
    """Build the tracker's transformers callback as the Trainer would; the error, if that fails."""
    try:
        from transformers.integrations import MLflowCallback, TensorBoardCallback

        callback = MLflowCallback() if name == "mlflow" else TensorBoardCallback()
        if name == "tensorboard" and getattr(callback, "_SummaryWriter", None) is None:
            return "no SummaryWriter could be imported"
    except Exception as err:  # ImportError, RuntimeError, or anything a broken install raises
        return f"{type(err).__name__}: {err}"
    return None


_TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                 "TENSORBOARD_LOGGING_DIR")


@contextlib.contextmanager
def _restored_tracking_env() -> Iterator[None]:
    """Put the trackers' environment variables (and MLflow's active experiment) back afterwards."""
    saved = {key: os.environ.get(key) for key in _TRACKING_ENV}
    fluent = _mlflow_fluent()
    experiment = getattr(fluent, "_active_experiment_id", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fluent = fluent or _mlflow_fluent()
        if fluent is not None and hasattr(fluent, "_active_experiment_id"):
            fluent._active_experiment_id = experiment  # set_experiment() is process-global


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars (tokenizing, flattening) between the Trainer's own bars."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _mlflow_fluent() -> Any:
    import sys

    return sys.modules.get("mlflow.tracking.fluent")  # only if mlflow was imported already


def _setup_mlflow(output_dir: Path) -> dict[str, str]:
    """Point MLflow at a file store in the run folder unless the user set a tracking URI."""
    from .tracking import offline_mlflow_uri, redact_uri

    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if user_uri:
        uri, own = user_uri, False
    else:
        uri, own = offline_mlflow_uri(output_dir), True  # also opts in to the file store (MLflow 3)
        os.environ["MLFLOW_TRACKING_URI"] = uri
    if not os.environ.get("MLFLOW_EXPERIMENT_NAME") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        os.environ["MLFLOW_EXPERIMENT_NAME"] = "clm-hf-demo"
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"id {os.environ['MLFLOW_EXPERIMENT_ID']}"
    uri = redact_uri(uri)  # only printed from here on: a server URI may hold user:password@
    if own:
        view = f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {uri}"
    elif "://" in uri and not uri.startswith(("file:", "sqlite:")):
        view = f"open {uri} in a browser"
    else:
        view = f"mlflow ui --backend-store-uri {uri}"
    return {"where": f"{uri} (experiment {experiment})", "view": view}


def _tensorboard_root(output_dir: Path) -> Path:
    user_dir = os.environ.get("TENSORBOARD_LOGGING_DIR")
    return Path(os.path.expanduser(user_dir)) if user_dir else output_dir / "tensorboard"


def demo_recipe(strategy: str, output_dir: str | Path, *, quick: bool = False,
                report_to: Sequence[str] = (), seed: int = 0) -> dict[str, Any]:
    """The demo's recipe for one strategy name (``plain`` or any registered strategy).

    ``report_to`` lists the trackers (default: none); the run is named after the strategy.
    ``seed`` sets the model's initialisation, the task rows and the data order together.

    >>> demo_recipe("ewc", "runs/demo", seed=1)["tasks"]["seed"]
    1
    """
    recipe = copy.deepcopy(DEMO_RECIPE)
    recipe["model"]["seed"] = recipe["tasks"]["seed"] = recipe["training"]["seed"] = seed
    if strategy == "joint":
        recipe["strategies"] = []
    elif strategy in DEMO_STRATEGIES:
        recipe["strategies"] = copy.deepcopy(DEMO_STRATEGIES[strategy])
    else:
        recipe["strategies"] = [{"name": strategy}]
    recipe["training"]["output_dir"] = str(Path(output_dir) / strategy)
    recipe["training"]["overwrite_output_dir"] = True  # the demo's own folder: a second demo replaces the first
    recipe["training"]["run_name"] = strategy
    recipe["training"]["report_to"] = list(report_to) or "none"
    if quick:  # a smoke-sized run for tests
        recipe["tasks"].update(num_train=32, num_eval=16)
        recipe["training"]["num_train_epochs"] = 1
    return recipe


def run_demo(
    strategies: Sequence[str] = ("plain", "replay", "ewc"),
    output_dir: str | Path = "runs/demo",
    *,
    quick: bool = False,
    report_to: str | Sequence[str] | None = "auto",
    print_fn=print,
) -> dict[str, ContinualResults]:
    """Run the demo and return ``{strategy: results}``.

    Args:
        strategies: Names to compare; ``plain`` is sequential fine-tuning with no strategy and
            ``joint`` trains all tasks at once (the multitask upper bound).
        output_dir: Run folder; each strategy gets a sub-folder.
        quick (`bool`): Tiny sizes, for a smoke test.
        report_to: ``"auto"`` (every installed tracker among MLflow and TensorBoard), ``"none"``,
            or tracker names (see :func:`resolve_report_to`). Each strategy is one run named
            after it; MLflow logs to ``<output_dir>/mlruns`` unless ``MLFLOW_TRACKING_URI`` is
            set, TensorBoard to ``<output_dir>/tensorboard/<strategy>``.
        print_fn: Where the tables go.

    Example:

    >>> results = run_demo(["plain", "ewc"], "runs/demo", quick=True, print_fn=lambda *a: None)  # doctest: +SKIP
    """
    import torch

    from .plots import write_report
    from .recipe import run_recipe

    # A model this small gains nothing from intra-op threads, and on a busy machine OpenMP's
    # spin-waiting threads slow it down many times over: one thread keeps the demo at ~1 minute.
    torch.set_num_threads(1)
    output_dir = Path(output_dir)
    trackers = resolve_report_to(report_to)
    all_results: dict[str, ContinualResults] = {}
    with _restored_tracking_env(), _quiet_datasets():
        mlflow_info = _setup_mlflow(output_dir) if "mlflow" in trackers else None
        tb_root = _tensorboard_root(output_dir) if "tensorboard" in trackers else None
        for name in strategies:
            if tb_root is not None:  # one folder per run, so TensorBoard shows them side by side
                run_dir = tb_root / name
                if tb_root == output_dir / "tensorboard":  # the demo's own folder, not the user's
                    for stale in run_dir.glob("events.out.tfevents.*"):
                        stale.unlink()  # an earlier demo's run of this name (its results.json is replaced too)
                os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir)
            start = time.perf_counter()
            results, _ = run_recipe(demo_recipe(name, output_dir, quick=quick, report_to=trackers),
                                    joint=name == "joint")
            results.metadata["wall_time_s"] = round(time.perf_counter() - start, 1)
            results.save(output_dir / name / "results.json")
            all_results[name] = results
            print_fn(f"\n== {name} ({results.metadata['wall_time_s']} s) ==")
            print_fn(results.format_table())
    print_fn("\n== comparison (exact match) ==")
    print_fn(comparison_table(all_results))
    written = write_report(output_dir)
    print_fn(f"\nResults and plots in {output_dir}/: " + ", ".join(sorted({p.name for p in written})))
    runs = ", ".join(strategies)
    if mlflow_info is not None:
        print_fn(f"MLflow runs ({runs}) in {mlflow_info['where']}; to look at them: {mlflow_info['view']}")
    if tb_root is not None:
        print_fn(f"TensorBoard runs ({runs}) in {tb_root}/; to look at them: tensorboard --logdir {tb_root}")
    if not trackers and parse_report_to(report_to) == ["auto"]:
        print_fn("No tracker installed, so none logged the demo (pip install 'clm-hf[tracking]').")
    return all_results
