"""Experiment tracking of a continual stream through the Trainer's own ``report_to`` callbacks.

With ``report_to=["mlflow"]`` or ``["tensorboard"]`` the Trainer already adds transformers'
``MLflowCallback`` / ``TensorBoardCallback``; this module makes them follow a *stream* of tasks
rather than one ``train()`` call. It does not log through any channel of its own: it uses the
MLflow run and the TensorBoard writer those callbacks opened.

What it changes and adds:

- **One step axis for the whole stream.** The Trainer's ``global_step`` restarts at 0 for every
  task, so the trackers get ``step = (steps of all earlier train() calls) + global_step``: the
  training curves of successive tasks follow each other instead of overlapping, and the
  between-task ``cl/...`` scores land at the step where their task ended.
- **One MLflow run for the whole stream.** ``MLflowCallback`` would end its run at the end of
  every ``train()``; inside a task the run stays open for the scores logged after it, is ended
  once the task's artifacts are logged (so no run is left open between tasks or after the
  stream), and is re-opened with the same run id when the next task logs.
- **Per-task score curves.** Besides the trainer's ``cl/after_<task>/<task>/<metric>`` keys, each
  score is also logged as ``cl/task/<task>/<metric>``, one point per stage (baseline, after each
  task), so a task's score across the stream is one chart.
- **Artifacts after every task:** ``results.json``, ``accuracy_matrix.md`` (the score matrices and
  ACC/BWT/FWT/forgetting as Markdown tables) and the plots ``heatmap.png`` and
  ``task_curves.png`` (:mod:`clm_hf.plots`). MLflow gets them under the run's ``continual/``
  artifact folder (overwritten after each task, so the last copy is the whole stream);
  TensorBoard gets the Markdown as text (``continual/results``) and the plots as images
  (``continual/heatmap``, ``continual/task_curves``), at the step where the task ended.
- The strategies and their settings as MLflow params (``clm_hf/strategy/<i>-<name>/<option>``)
  and the task sequence as the tag ``clm_hf.tasks``; in TensorBoard as the text
  ``continual/strategies``.

The trainer calls :func:`attach` when it is built and :func:`task_finished` after every task;
nothing here needs calling by hand.

Example:

>>> import os
>>> os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///runs/mlflow.db"  # doctest: +SKIP
>>> args = ContinualTrainingArguments(output_dir="runs/ewc", report_to=["mlflow", "tensorboard"])  # doctest: +SKIP
>>> ContinualCausalLMTrainer(model=model, args=args, strategies=[EWC()]).fit(stream)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

__all__ = [
    "ARTIFACT_DIR",
    "ContinualTracking",
    "attach",
    "available_trackers",
    "offline_mlflow_uri",
    "redact_uri",
    "results_markdown",
    "task_finished",
    "write_result_files",
]

ARTIFACT_DIR = "continual"
"""MLflow artifact folder (and TensorBoard tag prefix) of the continual results."""

STEP_KEY = "tracking_total_steps"
"""``results.metadata`` key holding the optimizer steps of the whole stream so far (for resumes)."""


# --- helpers also used by the demo and the model card -----------------------------------------
def available_trackers() -> list[str]:
    """The trackers this module supports that are installed: a subset of ``["mlflow", "tensorboard"]``.

    >>> set(available_trackers()) <= {"mlflow", "tensorboard"}
    True
    """
    # transformers' own checks, so this agrees with what report_to can use (they also honour
    # DISABLE_MLFLOW_INTEGRATION).
    from transformers.integrations import is_mlflow_available, is_tensorboard_available

    found = []
    if is_mlflow_available():
        found.append("mlflow")
    if is_tensorboard_available():
        found.append("tensorboard")
    return found


def offline_mlflow_uri(directory: str | os.PathLike, store: str = "file") -> str:
    """A server-less MLflow tracking URI inside ``directory``.

    Args:
        directory: Where the store goes.
        store (`str`, defaults to `"file"`): ``"file"``: a ``file:`` store in ``mlruns/``, instant
            to create and the only local store ``mlflow-skinny`` can write; MLflow 3 refuses new
            file stores unless ``MLFLOW_ALLOW_FILE_STORE=true``, which is set here too.
            ``"sqlite"``: ``mlflow.db``, MLflow 3's default, which needs the full ``mlflow``
            package (SQLAlchemy) and takes seconds to create.

    >>> offline_mlflow_uri("/tmp/run")
    'file:///tmp/run/mlruns'
    """
    directory = Path(directory).absolute()
    if store == "sqlite":
        return f"sqlite:///{directory / 'mlflow.db'}"
    if store != "file":
        raise ValueError(f"store must be 'file' or 'sqlite', got {store!r}.")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (directory / "mlruns").as_uri()


_SECRET_QUERY_KEYS = ("token", "password", "passwd", "secret", "key", "signature", "credential")


def redact_uri(uri: str) -> str:
    """``uri`` with its credentials replaced by ``***``, for printing or logging.

    The user-info part (``user:password@``, or a bare token as user name) is replaced as a whole,
    and so are the values of query parameters whose name suggests a secret (``token``,
    ``password``, ``key``, ...). Anything that is not a ``scheme://`` URI is returned unchanged.

    >>> redact_uri("https://user:password@mlflow.example.com:5000/path")
    'https://***@mlflow.example.com:5000/path'
    >>> redact_uri("https://host/api?run=3&access_token=abc")
    'https://host/api?run=3&access_token=***'
    >>> redact_uri("file:///tmp/run/mlruns")
    'file:///tmp/run/mlruns'
    """
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # not parseable: print nothing of it rather than risk a secret
        return "<unparseable URI>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        fields = []
        for field in query.split("&"):
            name, sep, _ = field.partition("=")
            secret = sep and any(word in name.lower() for word in _SECRET_QUERY_KEYS)
            fields.append(f"{name}=***" if secret else field)
        query = "&".join(fields)
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # nothing secret; urlunsplit would also drop the empty host of sqlite:///path
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def results_markdown(results: Any, *, heading_level: int = 2) -> str:
    """The results as Markdown: ACC/BWT/FWT/forgetting, then one score matrix per metric.

    The primary metric comes first. Used for the tracking artifact ``accuracy_matrix.md`` and
    for the Hub model card.

    >>> from clm_hf.results import ContinualResults
    >>> res = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.9, 0.1], [0.7, 0.8]]})
    >>> print(results_markdown(res).splitlines()[0])
    ## Summary (exact_match)
    """
    from .results import _SUMMARY_HEADERS, _SUMMARY_KEYS, _fmt, _markdown_table

    hashes = "#" * heading_level
    primary = results.resolve_metric()
    metrics = [primary, *(m for m in results.metrics if m != primary)]
    rows = []
    for metric in metrics:
        summary = results.summary(metric)
        rows.append([metric, *(_fmt(summary[k]) for k in _SUMMARY_KEYS)])
    parts = [f"{hashes} Summary ({primary})", "", _markdown_table(["metric", *_SUMMARY_HEADERS], rows), ""]
    for metric in metrics:
        direction = "higher is better" if results.higher_is_better.get(metric, True) else "lower is better"
        parts += [f"{hashes} {metric} after each task ({direction})", "", results.to_markdown(metric), ""]
    return "\n".join(parts)


def write_result_files(results: Any, directory: str | os.PathLike) -> list[Path]:
    """Write ``results.json``, ``accuracy_matrix.md``, ``heatmap.png`` and ``task_curves.png``.

    Returns:
        `list[pathlib.Path]`: the files written (no plots while no task is trained).
    """
    from .plots import plot_heatmap, plot_task_curves

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "results.json", directory / "accuracy_matrix.md"]
    results.save(written[0])
    written[1].write_text(results_markdown(results) + "\n", encoding="utf-8")
    if results.num_trained:
        for name, plot in (("heatmap.png", plot_heatmap), ("task_curves.png", plot_task_curves)):
            plot(results, directory / name)
            written.append(directory / name)
    return written


def _strategy_params(strategies: list[Any]) -> dict[str, str]:
    params = {}
    for i, strategy in enumerate(strategies):
        prefix = f"clm_hf/strategy/{i}-{strategy.name}"
        options = strategy.config.to_dict()
        if not options:
            params[prefix] = "{}"
        for key, value in options.items():
            params[f"{prefix}/{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return params


def _strategies_markdown(strategies: list[Any]) -> str:
    if not strategies:
        return "No strategy: plain sequential fine-tuning."
    lines = ["| # | strategy | settings |", "| ---: | :--- | :--- |"]
    for i, strategy in enumerate(strategies):
        settings = ", ".join(f"{k}={v!r}" for k, v in strategy.config.to_dict().items()) or "defaults"
        lines.append(f"| {i} | {strategy.name} | {settings.replace('|', '/')} |")
    return "\n".join(lines)


# --- the coordinator ------------------------------------------------------------------------------
class ContinualTracking(TrainerCallback):
    """Makes the Trainer's MLflow and TensorBoard callbacks follow a whole stream of tasks.

    Built by :func:`attach` (the trainer does it) and placed right before the first tracker in
    ``trainer.callback_handler.callbacks``, so that its events run before theirs. It wraps the
    trackers' ``on_log`` to give them the stream-wide step, and ``MLflowCallback``'s
    ``on_train_begin`` / ``on_train_end`` to keep one run per stream (see the module docstring).

    Args:
        trainer: The continual trainer.
        trackers (`list[TrainerCallback]`): Its ``MLflowCallback`` / ``TensorBoardCallback`` objects.
    """

    def __init__(self, trainer: Any, trackers: list[TrainerCallback]) -> None:
        self.trainer = trainer
        self.trackers = list(trackers)
        self.offset = 0  # optimizer steps of the train() calls that finished
        self._last_train_steps = 0
        self._in_train = False
        self._started = False
        self._mlflow_runs: dict[int, str] = {}  # id(callback) -> the run it logs to
        self._own_mlflow_runs: dict[int, bool] = {}  # id(callback) -> whether it opened that run itself
        self._params_logged: set[str] = set()
        for callback in self.trackers:
            self._adopt(callback)

    # steps ---------------------------------------------------------------------------------------
    def _start(self) -> None:
        # A resumed stream continues the step count it had reached (kept in the results).
        if self._started:
            return
        self._started = True
        results = getattr(self.trainer, "results", None)
        if getattr(self.trainer, "tasks", None) and results is not None:
            self.offset = int(results.metadata.get(STEP_KEY, 0) or 0)

    def step(self, state: Any) -> int:
        """The stream-wide step for the Trainer's current ``state``."""
        return self.offset + int(state.global_step)

    def _shifted(self, state: Any) -> Any:
        shifted = copy.copy(state)
        shifted.global_step = self.step(state)
        return shifted

    def on_train_begin(self, args, state, control, **kwargs):
        self._start()
        if not self._in_train:
            self.offset += self._last_train_steps
            self._last_train_steps = 0
            self._in_train = True
        self._resume_mlflow_runs()

    def on_train_end(self, args, state, control, **kwargs):
        if self._in_train:
            self._last_train_steps = int(state.global_step)
            self._in_train = False
        results = getattr(self.trainer, "results", None)
        if results is not None:
            results.metadata[STEP_KEY] = self.offset + self._last_train_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._start()
        self._resume_mlflow_runs()

    # wrapping the trackers -----------------------------------------------------------------------
    def _adopt(self, callback: TrainerCallback) -> None:
        original = callback.on_log
        if _is_tensorboard(callback):
            if getattr(callback, "logging_dir", None) is None:
                # Otherwise the first writer (the baseline scores, before any train()) would go to
                # ./runs, and the next ones under the first task's folder.
                from transformers.integrations.integration_utils import default_logdir

                callback.logging_dir = os.path.join(self.trainer._base_output_dir, default_logdir())

            def on_log(args, state, control, logs=None, **kwargs):
                logs = dict(logs or {})
                ours = {k: v for k, v in logs.items() if k.startswith("cl/")}
                plain = {k: v for k, v in logs.items() if k not in ours}
                shifted = self._shifted(state)
                result = original(args, shifted, control, logs=plain, **kwargs) if plain else None
                if ours and state.is_world_process_zero:
                    ours.update(self._task_series(ours))
                    writer = _tensorboard_writer(callback, args)
                    if writer is not None:
                        for key, value in ours.items():
                            if isinstance(value, (int, float)) and not isinstance(value, bool):
                                writer.add_scalar(key, value, shifted.global_step)
                        writer.flush()
                return result

        else:

            def on_log(args, state, control, logs=None, **kwargs):
                logs = dict(logs or {})
                logs.update(self._task_series(logs))
                before = _active_mlflow_run_id()
                result = original(args, self._shifted(state), control, logs=logs, **kwargs)
                self._remember_mlflow_run(callback, before)
                return result

            original_begin = callback.on_train_begin

            def on_train_begin(args, state, control, **kwargs):
                before = _active_mlflow_run_id()
                result = original_begin(args, state, control, **kwargs)
                self._remember_mlflow_run(callback, before)
                return result

            original_end = callback.on_train_end

            def on_train_end(args, state, control, **kwargs):
                # Inside a task the run stays open for the scores that follow; task_finished ends it.
                if getattr(self.trainer, "current_task", None) is None:
                    return original_end(args, state, control, **kwargs)
                return None

            callback.on_train_begin = on_train_begin
            callback.on_train_end = on_train_end
        callback.on_log = on_log

    def _task_series(self, logs: Mapping[str, Any]) -> dict[str, Any]:
        """``cl/<stage>/<task>/<metric>`` -> ``cl/task/<task>/<metric>``, one point per stage."""
        stages = ["baseline", *(f"after_{t.name}" for t in getattr(self.trainer, "tasks", []))]
        series = {}
        for key, value in logs.items():
            for stage in stages:
                prefix = f"cl/{stage}/"
                if key.startswith(prefix) and "/" in key[len(prefix):]:
                    series[f"cl/task/{key[len(prefix):]}"] = value
                    break
        return series

    # MLflow run lifecycle ------------------------------------------------------------------------
    def _remember_mlflow_run(self, callback: TrainerCallback, before: str | None) -> None:
        """Note the run the callback logs to, and whether it opened it, from MLflow's public state.

        The callback logs to the active run; it starts one (and ends it after each ``train()``)
        unless the user had one open, whose lifetime stays the user's. So the run is the callback's
        own when the active run changed across its first call (``before`` is the id then).
        """
        if id(callback) in self._mlflow_runs:
            return
        run_id = _active_mlflow_run_id()
        if run_id is not None:
            self._mlflow_runs[id(callback)] = run_id
            self._own_mlflow_runs[id(callback)] = run_id != before

    def _resume_mlflow_runs(self) -> None:
        # MLflowCallback ends its run after every train(); the stream goes on in the same run.
        for callback in self.trackers:
            run_id = self._mlflow_runs.get(id(callback))
            if run_id is None or not self._own_mlflow_runs.get(id(callback)):
                continue
            import mlflow

            if mlflow.active_run() is None:
                mlflow.start_run(run_id=run_id)

    # after each task -------------------------------------------------------------------------------
    def task_finished(self) -> None:
        """Log the results files and plots of the stream so far to every tracker."""
        trainer = self.trainer
        results = getattr(trainer, "results", None)
        if results is None or not trainer.is_world_process_zero():
            return
        step = self.step(trainer.state)
        with tempfile.TemporaryDirectory(prefix="clm_hf_tracking_") as tmp:
            files = write_result_files(results, tmp)
            for callback in self.trackers:
                try:
                    if _is_tensorboard(callback):
                        self._tensorboard_artifacts(callback, results, files, step)
                    else:
                        self._mlflow_artifacts(callback, tmp)
                except Exception as err:  # a tracker failure must not lose the run
                    logger.warning("clm-hf: could not log the continual results to %s: %s",
                                   type(callback).__name__, err)

    def _mlflow_artifacts(self, callback: TrainerCallback, folder: str) -> None:
        run_id = self._mlflow_runs.get(id(callback))
        if run_id is None:
            return  # the callback never opened a run (nothing was logged)
        import mlflow

        self._resume_mlflow_runs()
        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:
            return
        if "strategies" not in self._params_logged:
            params = _strategy_params(self.trainer.strategies)
            if params:
                mlflow.log_params(params)
            self._params_logged.add("strategies")
        mlflow.set_tag("clm_hf.tasks", ",".join(t.name for t in self.trainer.tasks))
        mlflow.set_tag("clm_hf.strategies", ",".join(s.name for s in self.trainer.strategies) or "none")
        mlflow.log_artifacts(folder, artifact_path=ARTIFACT_DIR)
        if self._own_mlflow_runs.get(id(callback)):
            mlflow.end_run()  # waits for the queued metrics; the next task re-opens the run
        elif hasattr(mlflow, "flush_async_logging"):
            mlflow.flush_async_logging()  # the user's own run stays open

    def _tensorboard_artifacts(self, callback: TrainerCallback, results: Any, files: list[Path], step: int) -> None:
        writer = _tensorboard_writer(callback, self.trainer.args)
        if writer is None:
            return
        if "tensorboard" not in self._params_logged:
            writer.add_text(f"{ARTIFACT_DIR}/strategies", _strategies_markdown(self.trainer.strategies), 0)
            self._params_logged.add("tensorboard")
        writer.add_text(f"{ARTIFACT_DIR}/results", results_markdown(results), step)
        from matplotlib.image import imread

        for path in files:
            if path.suffix == ".png":
                image = imread(path)[..., :3]  # RGBA float in [0, 1] -> RGB
                writer.add_image(f"{ARTIFACT_DIR}/{path.stem}", image, step, dataformats="HWC")
        # Close it so every event is on disk; the next log opens a new writer in the same folder.
        writer.close()
        callback.tb_writer = None


def _is_tensorboard(callback: Any) -> bool:
    from transformers.integrations import TensorBoardCallback

    return isinstance(callback, TensorBoardCallback)


def _is_mlflow(callback: Any) -> bool:
    from transformers.integrations import MLflowCallback

    return isinstance(callback, MLflowCallback)


def _active_mlflow_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return None if run is None else run.info.run_id


def _tensorboard_writer(callback: Any, args: Any) -> Any:
    """The callback's writer (its public ``tb_writer``), opened on its ``logging_dir`` when it has none."""
    if callback.tb_writer is None:
        try:  # the same writer classes TensorBoardCallback uses
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboardX instead of torch's
            from tensorboardX import SummaryWriter
        callback.tb_writer = SummaryWriter(log_dir=callback.logging_dir)
    return callback.tb_writer


# --- the two calls the trainer makes ----------------------------------------------------------------
def attach(trainer: Any) -> ContinualTracking | None:
    """Hook the trainer's MLflow / TensorBoard callbacks (if any) into the stream; called by the trainer.

    Returns:
        The :class:`ContinualTracking` added to the trainer's callbacks, or ``None`` when
        ``report_to`` names neither tracker.
    """
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(c, ContinualTracking) for c in callbacks):
        return next(c for c in callbacks if isinstance(c, ContinualTracking))
    trackers = [c for c in callbacks if _is_mlflow(c) or _is_tensorboard(c)]
    if not trackers:
        return None
    tracking = ContinualTracking(trainer, trackers)
    callbacks.insert(callbacks.index(trackers[0]), tracking)
    return tracking


def task_finished(trainer: Any) -> None:
    """Log the results and plots after a task; called by the trainer once the task is scored."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ContinualTracking):
            callback.task_finished()
