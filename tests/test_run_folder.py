"""One run per output folder, and one complete checkpoint at every instant.

* A new run refuses a folder that holds another run's continual checkpoints (unless it resumes
  from it or ``overwrite_output_dir=True``); a lock file keeps a second process out; a ``torchrun``
  launch whose ranks all think they are alone is refused.
* ``--resume`` given a checkpoint path resumes its run in the run folder, never inside the checkpoint.
* Kills at each window of a checkpoint write (simulated by raising from the function that runs
  next) leave a complete, loadable checkpoint, and the resumed run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import clm_hf.trainer as trainer_module
from clm_hf import ContinualCausalLMTrainer, Replay
from clm_hf import state as ckpt
from clm_hf.cli import main
from clm_hf.hub import save_continual_pretrained
from clm_hf.results import ContinualResults
from clm_hf.trainer import resolve_run_dir
from tests.conftest import assert_same_params, make_trainer, param_snapshot, small_args

ROOT = Path(__file__).resolve().parent.parent


def _trainer(tmp_path, model, tokenizer, strategies=(), **overrides):
    return make_trainer(tmp_path, model, tokenizer, strategies, **overrides)


_params, _assert_same = param_snapshot, assert_same_params


def _two_tasks(tiny_stream):
    return {k: tiny_stream[k] for k in ("copy", "reverse")}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- 3.1 one run per folder ------------------------------------------------------------------------
def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoints(tmp_path, make_model, tokenizer, tiny_stream):
    stream = _two_tasks(tiny_stream)
    first = _trainer(tmp_path, make_model("gpt2"), tokenizer, [Replay(buffer_size=8)])
    first.fit(stream)
    run = tmp_path / "run"
    before = _tree(run)
    other = _trainer(tmp_path, make_model("gpt2", seed=7), tokenizer, [Replay(buffer_size=8)], learning_rate=1e-3)
    with pytest.raises(FileExistsError, match=r"already holds another run's continual checkpoints \(continual.*"
                                              r"overwrite_output_dir=True"):
        other.fit(stream)
    assert _tree(run) == before  # nothing written, nothing deleted, and the lock was released
    assert not (run / ckpt.LOCK_FILE).exists()

    # overwrite_output_dir=True deletes the old run's state; the folder then holds only the new run.
    fresh = _trainer(tmp_path / "alone", make_model("gpt2", seed=7), tokenizer, [Replay(buffer_size=8)],
                     learning_rate=1e-3)
    expected = fresh.fit(stream)
    over = _trainer(tmp_path, make_model("gpt2", seed=7), tokenizer, [Replay(buffer_size=8)], learning_rate=1e-3,
                    overwrite_output_dir=True)
    got = over.fit(stream)
    assert got.matrix("loss") == expected.matrix("loss")
    resumed = _trainer(tmp_path, make_model("gpt2", seed=3), tokenizer, [Replay(buffer_size=8)], learning_rate=1e-3)
    assert resumed.fit(stream, resume_from_checkpoint=True).matrix("loss") == expected.matrix("loss")
    _assert_same(_params(resumed), _params(fresh))


def test_train_task_on_a_fresh_trainer_also_refuses_another_runs_folder(tmp_path, make_model, tokenizer, tiny_stream):
    _trainer(tmp_path, make_model("gpt2"), tokenizer).fit({"copy": tiny_stream["copy"]})
    other = _trainer(tmp_path, make_model("gpt2"), tokenizer)
    with pytest.raises(FileExistsError, match="already holds another run"):
        other.train_task(tiny_stream["reverse"]["train"], tiny_stream["reverse"]["eval"], task_id="reverse")
    # The same trainer keeps writing its own folder: a second train_task is no "other run".
    own = _trainer(tmp_path / "own", make_model("gpt2"), tokenizer)
    own.train_task(tiny_stream["copy"]["train"], tiny_stream["copy"]["eval"], task_id="copy")
    own.train_task(tiny_stream["reverse"]["train"], tiny_stream["reverse"]["eval"], task_id="reverse")
    assert sorted(p.name for p in (tmp_path / "own" / "run" / "continual").iterdir()) == ["task-000", "task-001"]


def _hold_lock_in_another_process(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from clm_hf.state import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
        tmp_path, make_model, tokenizer, tiny_stream, caplog):
    run = tmp_path / "run"
    holder = _hold_lock_in_another_process(run)
    try:
        trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer)
        with pytest.raises(ckpt.RunLockError, match=rf"in use by another clm-hf run: process {holder.pid} on host "
                                                    rf"'{socket.gethostname()}'.*delete .*\.clm_hf\.lock"):
            trainer.fit({"copy": tiny_stream["copy"]})
        assert not (run / "continual").exists() and not (run / "results.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: a stale lock file stays
        holder.wait()
    assert json.loads((run / ckpt.LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING"):
        trainer.fit({"copy": tiny_stream["copy"]})
    assert f"took over the stale lock {run / ckpt.LOCK_FILE} of process {holder.pid}" in caplog.text
    assert (run / "continual" / "task-000" / ckpt.MANIFEST).is_file()
    assert not (run / ckpt.LOCK_FILE).exists()  # released when fit() returns


def test_the_lock_is_released_when_fit_fails(tmp_path, make_model, tokenizer, tiny_stream, monkeypatch):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer)
    monkeypatch.setattr(trainer, "_run_task", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit({"copy": tiny_stream["copy"]})
    assert not (tmp_path / "run" / ckpt.LOCK_FILE).exists()


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "some-other-node", "started": "x"}))
    with pytest.raises(ckpt.RunLockError, match="process 1 on host 'some-other-node'"):
        ckpt.RunLock(run).acquire()


def test_torchrun_ranks_that_each_think_they_are_alone_are_refused(tmp_path, make_model, tokenizer, monkeypatch):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer)  # single process: accepted
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets, while the arguments stay single-process (no use_cpu)
    with pytest.raises(RuntimeError, match=r"one of 2 \(WORLD_SIZE=2.*every rank would train alone.*use_cpu=True"):
        trainer._check_single_writer()  # what __init__ runs (the slow test below launches torchrun for real)


@pytest.mark.slow
def test_torchrun_on_cpu_without_use_cpu_is_refused_on_every_rank(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(
        "import sys\n"
        "from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments\n"
        "from clm_hf.tasks import build_tiny_model, build_tokenizer\n"
        "tok = build_tokenizer()\n"
        "args = ContinualTrainingArguments(output_dir=sys.argv[1], report_to='none')\n"
        "ContinualCausalLMTrainer(model=build_tiny_model('gpt2', tok), args=args, processing_class=tok)\n"
        "print('NOT REFUSED', flush=True)\n"
    )
    from tests._launch import launch_env, run_logged, torchrun

    log = tmp_path / "two.log"
    code = run_logged(torchrun(2, str(script), str(tmp_path / "run")), log, timeout=300,
                      env=launch_env(CUDA_VISIBLE_DEVICES=""))
    out = log.read_text()
    assert code != 0 and "NOT REFUSED" not in out
    assert "WORLD_SIZE=2" in out and "use_cpu=True" in out
    assert not (tmp_path / "run" / "continual").exists()


# --- 3.2 --resume with a checkpoint path -------------------------------------------------------------
def _recipe(path: Path, output_dir: Path) -> Path:
    recipe = {
        "model": {"arch": "gpt2", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
        "tasks": {"suite": "synthetic", "names": ["copy", "reverse"], "num_train": 16, "num_eval": 8,
                  "min_len": 2, "max_len": 4},
        "strategies": [{"name": "replay", "buffer_size": 8}],
        "training": {"output_dir": str(output_dir), "num_train_epochs": 1, "per_device_train_batch_size": 8,
                     "learning_rate": 3e-3, "lr_scheduler_type": "constant", "save_strategy": "no",
                     "report_to": "none", "seed": 0, "disable_tqdm": True, "dataloader_pin_memory": False},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_resume_from_a_checkpoint_path_continues_in_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", run)
    assert main(["train", str(recipe)]) == 0
    first = _tree(run / "continual" / "task-001")
    results = ContinualResults.load(run / "results.json")
    assert main(["train", str(recipe), "--resume", str(run / "continual" / "task-000")]) == 0
    # Nothing nested in the checkpoint; task 1 retrained from task 0's state into the run folder, identically.
    assert sorted(p.name for p in (run / "continual" / "task-000").iterdir()) == sorted(
        ["manifest.json", "model.safetensors", "rng.safetensors", "continual_state.json", "results.json", "strategies"])
    again = _tree(run / "continual" / "task-001")
    for name in ("model.safetensors", "rng.safetensors", "continual_state.json", "results.json"):
        assert again[name] == first[name], name  # (the buffer's datasets state.json holds a fresh fingerprint)
    assert ContinualResults.load(run / "results.json").matrix("loss") == results.matrix("loss")

    inner = run / "task-000" / "checkpoint-2" / "continual_state"  # as a run with save_strategy="steps" has
    inner.mkdir(parents=True)
    for path in (inner, inner.parent, inner.parent.parent):
        assert main(["train", str(recipe), "--resume", str(path)]) == 2
        error = capsys.readouterr().err.splitlines()[-1]  # after the earlier runs' progress bars
        assert error.startswith("clm-hf: error: ")
        assert f"is inside the task folder {run / 'task-000'} of the run {run}" in error
    assert list(inner.iterdir()) == []


def test_resolve_run_dir_maps_checkpoints_to_their_run_and_refuses_what_is_inside_a_task(tmp_path):
    run = tmp_path / "run"
    task = run / "continual" / "task-002"
    task.mkdir(parents=True)
    (task / ckpt.MANIFEST).write_text("{}")
    inner = run / "task-003" / "checkpoint-8" / "continual_state"
    inner.mkdir(parents=True)
    assert resolve_run_dir(run) == (run, None)
    assert resolve_run_dir(run / "continual") == (run, None)
    assert resolve_run_dir(task) == (run, task)
    for path in (inner, inner.parent, inner.parent.parent):
        with pytest.raises(ValueError, match=rf"inside the task folder {run / 'task-003'} of the run {run}.*"
                                             rf"--resume {run}\b"):
            resolve_run_dir(path)
    export = tmp_path / "export" / "continual_state"
    export.mkdir(parents=True)
    (export / ckpt.MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match="outside a run's continual/ folder.*from_pretrained"):
        resolve_run_dir(export)


# --- 3.3 rotation and kill windows -----------------------------------------------------------------
MID_TASK = dict(save_strategy="steps", save_steps=1, save_total_limit=1)


def _full_run(tmp_path, make_model, tokenizer, stream, **settings):
    full = _trainer(tmp_path / "full", make_model("gpt2"), tokenizer, [Replay(buffer_size=8)], **settings)
    full.fit(stream)
    return full


@pytest.mark.parametrize("window", ["before_continual_state", "before_rotation"])
def test_save_total_limit_1_keeps_a_complete_mid_task_checkpoint_through_a_kill(
        tmp_path, make_model, tokenizer, tiny_stream, monkeypatch, caplog, window):
    """Kill task 1's save of checkpoint 3 after the Trainer's files, before the continual state
    (or before the rotation): checkpoint 2 must still be complete, and the resume must use it."""
    stream = _two_tasks(tiny_stream)
    full = _full_run(tmp_path, make_model, tokenizer, stream, **MID_TASK)
    task_dir = tmp_path / "cut" / "run" / "task-001"
    original_save, original_rotate = ckpt.save_continual_checkpoint, trainer_module.rotate_checkpoints

    def killed_save(final_dir, **kwargs):
        if window == "before_continual_state" and Path(final_dir) == task_dir / "checkpoint-3" / "continual_state":
            raise KeyboardInterrupt("killed before the continual state")
        return original_save(final_dir, **kwargs)

    def killed_rotate(output_dir, **kwargs):
        if window == "before_rotation" and Path(output_dir) == task_dir and (task_dir / "checkpoint-3").exists():
            raise KeyboardInterrupt("killed before the rotation")
        return original_rotate(output_dir, **kwargs)

    monkeypatch.setattr(ckpt, "save_continual_checkpoint", killed_save)
    monkeypatch.setattr(trainer_module, "rotate_checkpoints", killed_rotate)
    crashing = _trainer(tmp_path / "cut", make_model("gpt2"), tokenizer, [Replay(buffer_size=8)], **MID_TASK)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(stream)
    ckpt.verify_files(task_dir / "checkpoint-2", ckpt.read_continual_state(
        task_dir / "checkpoint-2" / "continual_state", with_model=False)["trainer_files"], exclude="continual_state")  # complete
    expected = "checkpoint-2" if window == "before_continual_state" else "checkpoint-3"
    monkeypatch.undo()
    resumed = _trainer(tmp_path / "cut", make_model("gpt2", seed=5), tokenizer, [Replay(buffer_size=8)], **MID_TASK)
    with caplog.at_level("INFO"):
        results = resumed.fit(stream, resume_from_checkpoint=True)
    assert f"resumed from {task_dir / expected / 'continual_state'}" in caplog.text
    _assert_same(_params(resumed), _params(full))
    assert results.matrix("loss") == full.results.matrix("loss")
    assert len(list(task_dir.glob("checkpoint-*"))) == 1  # save_total_limit=1 still applies


def _kill_the_second_rename(monkeypatch, target: Path):
    """Make write_atomically die between moving ``target`` aside and renaming the new copy in."""
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == target and Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt("killed between the two renames")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)


def test_a_kill_between_the_renames_of_a_checkpoint_swap_is_repaired_at_resume(
        tmp_path, make_model, tokenizer, tiny_stream, monkeypatch, caplog):
    stream = _two_tasks(tiny_stream)
    full = _full_run(tmp_path, make_model, tokenizer, stream)
    trainer = _trainer(tmp_path / "cut", make_model("gpt2"), tokenizer, [Replay(buffer_size=8)])
    trainer.fit(stream)
    continual = tmp_path / "cut" / "run" / "continual"
    _kill_the_second_rename(monkeypatch, continual / "task-001")
    with pytest.raises(KeyboardInterrupt):
        trainer.save_continual_checkpoint()  # rewrites continual/task-001
    monkeypatch.undo()
    assert not (continual / "task-001").exists()
    (old,) = continual.glob(".old-task-001-*")
    ckpt.verify_manifest(old)  # the complete copy is there, under another name
    resumed = _trainer(tmp_path / "cut", make_model("gpt2", seed=5), tokenizer, [Replay(buffer_size=8)])
    with caplog.at_level("INFO"):
        results = resumed.fit(stream, resume_from_checkpoint=True)
    assert f"put back {continual / 'task-001'}" in caplog.text
    assert f"resumed from {continual / 'task-001'} after 2 task(s)" in caplog.text  # nothing retrained
    assert sorted(p.name for p in continual.iterdir()) == ["task-000", "task-001"]
    _assert_same(_params(resumed), _params(full))
    assert results.matrix("loss") == full.results.matrix("loss")


def test_an_export_keeps_its_previous_continual_state_until_the_new_one_is_complete(
        tmp_path, make_model, tokenizer, tiny_stream, monkeypatch):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [Replay(buffer_size=8)])
    trainer.fit({"copy": tiny_stream["copy"]})
    export = save_continual_pretrained(trainer, tmp_path / "export")
    state = export / "continual_state"
    before = _tree(state)
    # Killed while the new state is written: the old one is untouched.
    original = Replay.save_state
    monkeypatch.setattr(Replay, "save_state", lambda self, d: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        save_continual_pretrained(trainer, export)
    assert _tree(state) == before
    # Killed between the two renames: the old one is put back by the next export (or a resume).
    monkeypatch.setattr(Replay, "save_state", original)
    _kill_the_second_rename(monkeypatch, state)
    with pytest.raises(KeyboardInterrupt):
        save_continual_pretrained(trainer, export)
    monkeypatch.undo()
    (old,) = export.glob(".old-continual_state-*")
    ckpt.verify_manifest(old)
    save_continual_pretrained(trainer, export)
    ckpt.verify_manifest(state)
    assert not list(export.glob(".old-*")) and not list(export.glob(".tmp-*"))
    rebuilt = ContinualCausalLMTrainer.from_pretrained(export, output_dir=str(tmp_path / "again"))
    _assert_same(_params(rebuilt), _params(trainer))


def test_checkpoints_sort_by_number_so_task_1000_follows_task_999(tmp_path, monkeypatch):
    continual = tmp_path / "continual"
    for name in ("task-999", "task-1000", "task-010"):
        ckpt.write_atomically(continual / name, lambda tmp: (tmp / "x.json").write_text("{}"))
    assert [p.name for p in ckpt.list_checkpoints(continual)] == ["task-010", "task-999", "task-1000"]
    monkeypatch.setattr(ckpt, "read_continual_state", lambda path, with_model=True: {})  # all valid here
    assert ckpt.latest_valid_checkpoint(ckpt.list_checkpoints(continual)).name == "task-1000"


def test_a_kill_after_the_swap_only_leaves_leftovers_that_are_removed(tmp_path):
    """Killed after the new copy was renamed in but before the old one was deleted (or mid-build):
    the new copy stays, the ``.old-*`` and ``.tmp-*`` leftovers go."""
    continual = tmp_path / "continual"
    ckpt.write_atomically(continual / "task-001", lambda tmp: (tmp / "x.json").write_text('{"new": 1}'))
    ckpt.write_atomically(continual / ".old-task-001-4242", lambda tmp: (tmp / "x.json").write_text('{"old": 1}'))
    (continual / ".tmp-task-002-abc").mkdir()
    assert ckpt.recover_interrupted_swaps(continual) == []
    assert sorted(p.name for p in continual.iterdir()) == ["task-001"]
    assert json.loads((continual / "task-001" / "x.json").read_text()) == {"new": 1}
