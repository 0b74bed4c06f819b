"""Crash safety with real kills: ``clm-hf train`` processes killed with SIGKILL at chosen moments,
then resumed, end exactly where an uninterrupted run with the same seed ends.

The killed processes come from ``tests/crash_driver.py`` (a ``clm-hf`` that kills itself with
``SIGKILL`` at a named hook point; see its docstring for the points). Two drivers run side by side,
each forking one child per run so the slow imports are paid once per driver. Dropout is on
(GPT-2's default 0.1), so a wrong RNG or data-order restore changes the weights.

"Identical" compares the last end-of-task checkpoint of both runs: every tensor of the model, of
every strategy's state and of the RNG states (to 1e-6, integers exactly), the replay/episodic
memories row by row, the task list and every score matrix plus the baseline of ``results.json``.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import clm_hf.strategies as strategies_package
from clm_hf import Replay, Strategy
from clm_hf import state as ckpt
from clm_hf.strategies.base import STRATEGY_REGISTRY
from tests.conftest import AtTaskStep, assert_same_params, make_trainer, param_snapshot, small_args
from tests.crash_driver import differences, final_state

ROOT = Path(__file__).resolve().parent.parent

COMBO = [{"name": "replay", "buffer_size": 16}, {"name": "ewc", "fisher_samples": 8}, {"name": "lwf"},
         {"name": "packnet", "retrain_epochs": 1}]
# Every kill point of the driver, in the order a run reaches them; each resume goes on to the next.
COMBO_KILLS = ["mid_ckpt:0:2", "step:0:3", "fisher:0", "retrain:0:3", "eval:0", "ckpt_write:0", "between:0",
               "mid_ckpt:1:4",
               "saved:1:6", "buffer:1", "prune:1", "after_task:1:packnet", "step:2:5"]
OTHER_CHAINS = {
    "gem": ([{"name": "gem", "memory_per_task": 8}], ["step:1:3", "after_task:1:gem"]),
    "agem": ([{"name": "agem", "memory_per_task": 8, "sample_size": 8}], ["after_task:0:agem", "saved:2:4"]),
    "pnn": ([{"name": "pnn", "column_init": "fresh"}], ["between:0", "step:1:3", "after_task:1:pnn"]),
}
API_KILLS = ["after_task:0:lwf", "between:1", "step:2:3"]

for _module in pkgutil.iter_modules(strategies_package.__path__):  # every strategy that exists
    try:
        importlib.import_module(f"clm_hf.strategies.{_module.name}")
    except ImportError:
        pass
# Strategies registered since these chains were written get a default chain of their own.
NEW_STRATEGIES = sorted(n for n in STRATEGY_REGISTRY
                        if not n.endswith("_test") and n not in {s["name"] for s in COMBO} | set(OTHER_CHAINS))
NEW_KILLS = ["step:1:3", "after_task:1:{name}"]
def write_recipe(path: Path, strategies: list[dict], output_dir: Path) -> Path:
    """Three tasks of 24 rows, batch 4, one epoch, a checkpoint every 2 steps: ~5 s per run."""
    recipe = {
        "model": {"arch": "gpt2"},  # dropout on
        "tasks": {"suite": "synthetic", "names": ["copy", "reverse", "sort"], "num_train": 24, "num_eval": 8,
                  "min_len": 2, "max_len": 4},
        "strategies": strategies,
        "training": {"output_dir": str(output_dir), "num_train_epochs": 1, "per_device_train_batch_size": 4,
                     "learning_rate": 3e-3, "lr_scheduler_type": "constant", "weight_decay": 0.0,
                     "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "report_to": "none",
                     "seed": 0, "disable_tqdm": True, "dataloader_pin_memory": False,
                     "continual_eval_batch_size": 8},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CLM_KILL", None)
    return env


def start_driver(folder: Path, name: str, chains: list[dict]):
    plan, report, log = folder / f"{name}-plan.json", folder / f"{name}-report.json", folder / f"{name}.log"
    plan.write_text(json.dumps({"chains": chains}))
    handle = open(log, "w")
    process = subprocess.Popen([sys.executable, "-m", "tests.crash_driver", "plan", str(plan), str(report)],
                               cwd=ROOT, env=child_env(), stdout=handle, stderr=subprocess.STDOUT)
    return process, handle, report, log


def wait_driver(started, timeout: float = 900) -> tuple[dict, str]:
    process, handle, report, log = started
    try:
        process.wait(timeout=timeout)
    finally:
        handle.close()
    text = log.read_text()
    assert process.returncode == 0 and report.is_file(), f"driver failed ({process.returncode}):\n{text[-4000:]}"
    return json.loads(report.read_text()), text


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("clm-hf")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clm_hf.cli"]


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Run every chain once (two drivers in parallel) and hand out where everything lies."""
    folder = tmp_path_factory.mktemp("crash")
    combo = write_recipe(folder / "combo.yaml", COMBO, folder / "unused")
    chains_a = [{"recipe": str(combo), "run_dir": str(folder / "combo-cli"), "reference": str(folder / "combo-ref"),
                 "kills": COMBO_KILLS, "finish": False}]
    chains_b = []
    for name, (strategies, kills) in OTHER_CHAINS.items():
        recipe = write_recipe(folder / f"{name}.yaml", strategies, folder / "unused")
        chains_b.append({"recipe": str(recipe), "run_dir": str(folder / name), "reference": str(folder / f"{name}-ref"),
                         "kills": kills, "finish": True})
    chains_b.append({"recipe": str(combo), "run_dir": str(folder / "combo-api"), "kills": API_KILLS, "finish": False})
    for name in NEW_STRATEGIES:
        recipe = write_recipe(folder / f"{name}.yaml", [{"name": name}], folder / "unused")
        chains_a.append({"recipe": str(recipe), "run_dir": str(folder / name), "reference": str(folder / f"{name}-ref"),
                         "kills": [k.format(name=name) for k in NEW_KILLS], "finish": True})
    a = start_driver(folder, "a", chains_a)
    b = start_driver(folder, "b", chains_b)
    report_a, log_a = wait_driver(a)
    report_b, log_b = wait_driver(b)
    chains = report_a["chains"] + report_b["chains"]
    print("\nclm-hf crash/resume runs:")
    for chain in chains:
        print(f"  {Path(chain['run_dir']).name:10s} kills {[(k['spec'], k['status']) for k in chain['kills']]} "
              f"finish {chain['finished']}")
    return {"folder": folder, "combo": combo, "chains": {Path(c["run_dir"]).name: c for c in chains},
            "log_a": log_a, "log_b": log_b}


def test_every_kill_point_was_reached_and_killed_the_process(killed_runs):
    chains = {k: v for k, v in killed_runs["chains"].items() if k not in NEW_STRATEGIES}
    specs = [k["spec"] for c in chains.values() for k in c["kills"]]
    assert all(k["status"] == -9 for c in chains.values() for k in c["kills"]), chains  # -SIGKILL each time
    assert all(c["reference"] in (None, 0) and c["finished"] in (None, 0) for c in chains.values())
    kinds = {s.split(":")[0] for s in specs}
    assert kinds == {"step", "saved", "mid_ckpt", "after_task", "fisher", "prune", "retrain", "buffer", "eval",
                     "ckpt_write", "between"}
    covered = {s["name"] for s in COMBO} | set(OTHER_CHAINS) | set(NEW_STRATEGIES)
    assert {n for n in STRATEGY_REGISTRY if not n.endswith("_test")} <= covered  # every strategy was killed


def test_every_combo_kill_then_clm_hf_resume_matches_the_uninterrupted_run(killed_runs):
    folder = killed_runs["folder"]
    run = folder / "combo-cli"
    done = subprocess.run([*console_script(), "train", str(killed_runs["combo"]), "--resume", str(run)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert differences(final_state(folder / "combo-ref"), final_state(run)) == []
    log = killed_runs["log_a"]
    # A kill during after_task (Fisher, PackNet's retraining, the evaluation, the checkpoint write)
    # resumes from the task's last Trainer checkpoint: no retraining from scratch, after_task once.
    assert log.count(f"resumed from {run}/task-000/checkpoint-6/continual_state") == 4
    # The checkpoint whose continual state was being written at the kill is skipped, by name.
    assert f"Skipping mid-task checkpoint {run}/task-001/checkpoint-4: its save was interrupted" in log
    # A kill inside the run's first save left nothing complete: the resume trains from the first task.
    assert f"no checkpoint in {run} was complete: the first save (checkpoint-2) was interrupted" in log
    # The end-of-task checkpoint being written at the kill left only a temporary folder, deleted at resume.
    assert [p.name for p in (run / "continual").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name", list(OTHER_CHAINS))
def test_killed_runs_of_every_other_strategy_finish_identical(killed_runs, name):
    folder = killed_runs["folder"]
    assert killed_runs["chains"][name]["finished"] == 0
    assert differences(final_state(folder / f"{name}-ref"), final_state(folder / name)) == []


@pytest.mark.parametrize("name", NEW_STRATEGIES)
def test_killed_runs_of_newly_registered_strategies_finish_identical(killed_runs, name):
    chain = killed_runs["chains"][name]
    assert [k["status"] for k in chain["kills"]] == [-9] * len(NEW_KILLS) and chain["finished"] == 0, chain
    folder = killed_runs["folder"]
    assert differences(final_state(folder / f"{name}-ref"), final_state(folder / name)) == []


def test_python_api_resume_after_kills_matches(killed_runs):
    from clm_hf.recipe import load_recipe, run_recipe

    folder = killed_runs["folder"]
    run = folder / "combo-api"
    results, trainer = run_recipe(load_recipe(killed_runs["combo"]), resume=str(run), output_dir=str(run))
    assert [t.task_id for t in trainer.tasks] == ["copy", "reverse", "sort"]
    assert differences(final_state(folder / "combo-ref"), final_state(run)) == []


# --- in-process checks of the same machinery -------------------------------------------------------
def _trainer(tmp_path, model, tokenizer, strategies=(), **overrides):
    return make_trainer(tmp_path, model, tokenizer, strategies, **overrides)


_params, _assert_same = param_snapshot, assert_same_params


class _DrawsRandomNumbers(Strategy):
    """Consumes the global torch RNG in prepare_model and before_task; can crash after a task."""

    name = "draws_random_test"

    def __init__(self, crash_after: int | None = None):
        super().__init__()
        self.crash_after = crash_after

    def prepare_model(self, model, task):
        torch.rand(7)
        return model

    def before_task(self, trainer, task):
        torch.rand(5)

    def after_task(self, trainer, task):
        if task.index == self.crash_after:
            self.crash_after = None
            raise KeyboardInterrupt("killed in after_task")


def test_resume_at_a_tasks_last_step_restores_the_rng_after_the_hooks_rerun(tmp_path, make_model, tokenizer,
                                                                             tiny_stream):
    """The RNG of a mid-task checkpoint is put back right before train(), not before the task's
    hooks run again: else hooks that draw random numbers shift the next task's data order."""
    settings = dict(save_strategy="steps", save_steps=2)
    full = _trainer(tmp_path / "full", make_model("gpt2", resid_pdrop=0.1), tokenizer,
                    [Replay(buffer_size=8), _DrawsRandomNumbers()], **settings)
    reference = full.fit(tiny_stream)
    crashing = _trainer(tmp_path / "cut", make_model("gpt2", resid_pdrop=0.1), tokenizer,
                        [Replay(buffer_size=8), _DrawsRandomNumbers(crash_after=1)], **settings)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(tiny_stream)
    resumed = _trainer(tmp_path / "cut", make_model("gpt2", seed=5, resid_pdrop=0.1), tokenizer,
                       [Replay(buffer_size=8), _DrawsRandomNumbers()], **settings)
    results = resumed.fit(tiny_stream, resume_from_checkpoint=True)
    _assert_same(_params(resumed), _params(full))
    torch.testing.assert_close(torch.tensor(results.matrix("loss")), torch.tensor(reference.matrix("loss")),
                               rtol=0, atol=1e-6)


def _CrashOnSave(trainer, task_index, step):
    return AtTaskStep(trainer, task_index, step, on="save")


def test_damaged_mid_task_checkpoints_are_skipped_naming_the_file(tmp_path, make_model, tokenizer, tiny_stream,
                                                                  caplog):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    settings = dict(save_strategy="steps", save_steps=1)
    full = _trainer(tmp_path / "full", make_model("gpt2"), tokenizer, [Replay(buffer_size=8)], **settings)
    full.fit(stream)
    crashing = _trainer(tmp_path / "cut", make_model("gpt2"), tokenizer, [Replay(buffer_size=8)], **settings)
    crashing.add_callback(_CrashOnSave(crashing, 1, 3))
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(stream)
    task_dir = tmp_path / "cut" / "run" / "task-001"
    optimizer = task_dir / "checkpoint-3" / "optimizer.pt"  # a Trainer file, truncated
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    rng = task_dir / "checkpoint-2" / "continual_state" / "rng.safetensors"  # a continual file, flipped
    data = bytearray(rng.read_bytes())
    data[-1] ^= 0xFF
    rng.write_bytes(bytes(data))
    resumed = _trainer(tmp_path / "cut", make_model("gpt2", seed=9), tokenizer, [Replay(buffer_size=8)], **settings)
    with caplog.at_level("INFO"):
        resumed.fit(stream, resume_from_checkpoint=True)
    assert f"{optimizer} is truncated" in caplog.text
    assert f"{rng} is corrupt" in caplog.text
    assert f"resumed from {task_dir}/checkpoint-1/continual_state" in caplog.text
    _assert_same(_params(resumed), _params(full))


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint_valid(tmp_path, make_model, tokenizer,
                                                                             tiny_stream, monkeypatch):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    full = _trainer(tmp_path / "full", make_model("gpt2"), tokenizer, [Replay(buffer_size=8)])
    full.fit(stream)
    original = Replay.save_state

    def failing_save(self, directory):
        original(self, directory)
        if self.trainer.tasks[-1].index == 1:
            raise OSError(28, "No space left on device")  # half of the folder written

    monkeypatch.setattr(Replay, "save_state", failing_save)
    trainer = _trainer(tmp_path / "cut", make_model("gpt2"), tokenizer, [Replay(buffer_size=8)])
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(stream)
    continual = tmp_path / "cut" / "run" / "continual"
    assert sorted(p.name for p in continual.iterdir()) == ["task-000"]  # no task-001, no temporary left
    ckpt.verify_manifest(continual / "task-000")
    monkeypatch.setattr(Replay, "save_state", original)
    resumed = _trainer(tmp_path / "cut", make_model("gpt2", seed=3), tokenizer, [Replay(buffer_size=8)])
    resumed.fit(stream, resume_from_checkpoint=True)
    _assert_same(_params(resumed), _params(full))


def test_continual_save_total_limit_keeps_the_newest_checkpoints(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [Replay(buffer_size=8)], continual_save_total_limit=2)
    results = trainer.fit(tiny_stream)
    continual = tmp_path / "run" / "continual"
    assert sorted(p.name for p in continual.iterdir()) == ["task-001", "task-002"]
    for folder in continual.iterdir():
        ckpt.verify_manifest(folder)
    again = _trainer(tmp_path, make_model("gpt2", seed=4), tokenizer, [Replay(buffer_size=8)],
                     continual_save_total_limit=2)
    resumed = again.fit(tiny_stream, resume_from_checkpoint=True)  # the stream is complete: nothing retrains
    assert resumed.matrix("loss") == results.matrix("loss")
    _assert_same(_params(again), _params(trainer))
