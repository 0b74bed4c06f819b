"""Tracking a whole stream through the Trainer's report_to: MLflow and TensorBoard, read back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clm_hf import EWC, ContinualCausalLMTrainer
from clm_hf.tracking import ContinualTracking, results_markdown
from tests.conftest import small_args

STEPS_PER_TASK = 4  # 32 rows, batch 8, 1 epoch


@pytest.fixture(autouse=True)
def _transformers_privates_are_off_limits(monkeypatch):
    """clm_hf.tracking may use the trackers' public API only (private names change between releases).

    Every test here fails if clm_hf/tracking.py reads a private attribute (``_ml_flow``,
    ``_auto_end_run``, ``_initialized``, ``_init_summary_writer``, ...) of transformers' callbacks.
    """
    import sys

    from transformers.integrations import MLflowCallback, TensorBoardCallback

    reads = []  # recorded, not only raised: clm_hf catches a tracker's failure to keep the run going
    for cls in (MLflowCallback, TensorBoardCallback):
        def guarded(self, name, _get=cls.__getattribute__):
            if name.startswith("_") and not name.startswith("__"):
                if sys._getframe(1).f_globals.get("__name__") == "clm_hf.tracking":
                    reads.append(f"{type(self).__name__}.{name}")
                    raise AttributeError(f"clm_hf.tracking reads the private {type(self).__name__}.{name}")
            return _get(self, name)

        monkeypatch.setattr(cls, "__getattribute__", guarded)
    yield
    assert not reads, f"clm_hf.tracking read private attributes of transformers' callbacks: {sorted(set(reads))}"


def _fit(tmp_path, make_model, tokenizer, stream, report_to):
    trainer = ContinualCausalLMTrainer(
        model=make_model("gpt2"), args=small_args(tmp_path, report_to=report_to, run_name="stream"),
        processing_class=tokenizer, strategies=[EWC(ewc_lambda=10.0)],
    )
    return trainer, trainer.fit(stream)


def _stage_scores(results, task_index, metric="exact_match"):
    """The score of one task at every stage: baseline, then after each task."""
    return [results.baseline[metric][task_index], *(row[task_index] for row in results.matrix(metric))]


def test_mlflow_run_holds_the_whole_stream_with_increasing_steps_and_artifacts(
        tmp_path, monkeypatch, make_model, tokenizer, tiny_stream):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    # A local, server-less store; MLflow 3 wants the opt-in for a new file store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "clm-hf-test")
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # set_experiment's global
    trainer, results = _fit(tmp_path, make_model, tokenizer, tiny_stream, ["mlflow"])
    assert mlflow.active_run() is None  # nothing left open after the stream

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("clm-hf-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the stream must stay in one run, not one per task"
    run = runs[0]
    assert run.info.status == "FINISHED"

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    # Training logs: one step axis across tasks (global_step restarts per task in the Trainer).
    loss_steps = [s for s, _ in history("loss")]
    assert loss_steps == list(range(1, 3 * STEPS_PER_TASK + 1))
    # Summary metrics after each task, at the step where that task ended.
    acc = history("cl/acc")
    assert [s for s, _ in acc] == [STEPS_PER_TASK * (i + 1) for i in range(3)]
    assert acc[-1][1] == pytest.approx(results.summary()["acc"])
    assert [s for s, _ in history("cl/bwt")] == [2 * STEPS_PER_TASK, 3 * STEPS_PER_TASK]  # undefined after task 1
    # Each task's score across the stream is one series: baseline at step 0, then after each task.
    for j, name in enumerate(results.task_names):
        series = history(f"cl/task/{name}/exact_match")
        assert [s for s, _ in series] == [0, 4, 8, 12]
        assert [v for _, v in series] == pytest.approx(_stage_scores(results, j))
    assert history("cl/after_reverse/copy/exact_match")[0] == (8, pytest.approx(results.matrix()[1][0]))

    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "continual")}
    assert artifacts == {f"continual/{n}" for n in ("results.json", "accuracy_matrix.md", "heatmap.png",
                                                     "task_curves.png")}
    local = Path(client.download_artifacts(run.info.run_id, "continual", str(tmp_path / "download")))
    assert json.loads((local / "results.json").read_text())["scores"] == results.to_dict()["scores"]
    markdown = (local / "accuracy_matrix.md").read_text()
    assert results.to_markdown() in markdown and "| ACC | BWT | FWT | forgetting |" in markdown
    assert (local / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert run.data.params["clm_hf/strategy/0-ewc/ewc_lambda"] == "10.0"
    assert run.data.tags["clm_hf.tasks"] == "copy,reverse,sort"
    assert run.data.params["learning_rate"] == "0.003"  # the Trainer's own params are still there


def test_tensorboard_gets_scores_text_and_plots_on_one_step_axis(tmp_path, make_model, tokenizer, tiny_stream):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    trainer, results = _fit(tmp_path, make_model, tokenizer, stream, ["tensorboard"])
    run_dir = tmp_path / "run"
    log_dirs = {p.parent for p in run_dir.rglob("events.out.tfevents.*")}
    # One log folder for the whole stream, in output_dir/runs (not ./runs, not under task-000/).
    assert len(log_dirs) == 1 and next(iter(log_dirs)).parent == run_dir / "runs"
    events = EventAccumulator(str(next(iter(log_dirs))), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 2 * STEPS_PER_TASK + 1))
    assert [e.step for e in events.Scalars("cl/acc")] == [4, 8]
    assert events.Scalars("cl/acc")[-1].value == pytest.approx(results.summary()["acc"])
    copy_series = events.Scalars("cl/task/copy/exact_match")
    assert [e.step for e in copy_series] == [0, 4, 8]
    assert [e.value for e in copy_series] == pytest.approx(_stage_scores(results, 0))
    for plot in ("continual/heatmap", "continual/task_curves"):
        assert plot in tags["images"]
        assert [e.step for e in events.Images(plot)] == [4, 8]
        assert events.Images(plot)[-1].encoded_image_string[:4] == b"\x89PNG"
    text = events.Tensors("continual/results/text_summary")
    assert [e.step for e in text] == [4, 8]
    assert results.to_markdown() in text[-1].tensor_proto.string_val[0].decode()
    assert "ewc" in events.Tensors("continual/strategies/text_summary")[0].tensor_proto.string_val[0].decode()


def test_without_a_tracker_nothing_is_attached(tmp_path, make_model, tokenizer):
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path), processing_class=tokenizer)
    assert not any(isinstance(c, ContinualTracking) for c in trainer.callback_handler.callbacks)


def test_results_markdown_lists_summary_and_every_metric():
    from clm_hf.results import ContinualResults

    res = ContinualResults(task_names=["a", "b"], scores={"exact_match": [[0.9, 0.1], [0.7, 0.8]],
                                                          "loss": [[0.5, 2.0], [0.9, 0.4]]},
                           baseline={"exact_match": [0.0, 0.1], "loss": [3.0, 3.0]})
    text = results_markdown(res)
    assert text.index("## Summary (exact_match)") < text.index("## exact_match after") < text.index("## loss after")
    assert "| exact_match | 0.750 | -0.200 | 0.000 | 0.200 |" in text
    assert "(lower is better)" in text


@pytest.mark.parametrize("uri, shown", [
    ("https://user:password@mlflow.example.com:5000/", "https://***@mlflow.example.com:5000/"),
    ("http://onlyatoken@host/api", "http://***@host/api"),
    ("https://host/x?run=1&access_token=abc&Password=p", "https://host/x?run=1&access_token=***&Password=***"),
    ("postgresql://u:pw@db/mlflow", "postgresql://***@db/mlflow"),
    ("file:///tmp/run/mlruns", "file:///tmp/run/mlruns"),
    ("sqlite:///runs/mlflow.db", "sqlite:///runs/mlflow.db"),
    ("runs/mlruns", "runs/mlruns"),
])
def test_redact_uri_hides_credentials(uri, shown):
    from clm_hf.tracking import redact_uri

    assert redact_uri(uri) == shown


def test_demo_prints_the_tracking_uri_without_its_credentials(tmp_path, monkeypatch):
    from clm_hf.demo import _setup_mlflow

    uri = "https://alice:s3cr3t-pw@mlflow.example.com/"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp")
    info = _setup_mlflow(tmp_path)
    assert "s3cr3t-pw" not in info["where"] + info["view"] and "alice" not in info["where"] + info["view"]
    assert "https://***@mlflow.example.com/" in info["where"]
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # MLflow itself still gets the real URI


def test_the_users_own_mlflow_run_gets_the_stream_and_stays_open(tmp_path, monkeypatch, make_model, tokenizer,
                                                                 tiny_stream):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):  # set by earlier runs
        monkeypatch.delenv(key, raising=False)
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    with mlflow.start_run(run_name="mine") as mine:
        _fit(tmp_path, make_model, tokenizer, stream, ["mlflow"])
        assert mlflow.active_run().info.run_id == mine.info.run_id  # not ended by the stream: it is the user's
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([mine.info.experiment_id])
    assert [r.info.run_id for r in runs] == [mine.info.run_id]  # no second run
    steps = [m.step for m in client.get_metric_history(mine.info.run_id, "cl/task/copy/exact_match")]
    assert steps == [0, STEPS_PER_TASK, 2 * STEPS_PER_TASK]
    assert {f.path for f in client.list_artifacts(mine.info.run_id, "continual")} >= {"continual/results.json"}
