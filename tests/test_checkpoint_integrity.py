"""Damaged, edited or hostile continual checkpoints: confined paths, complete manifests, fallbacks."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from clm_hf import ContinualCausalLMTrainer, Replay
from clm_hf import state as ckpt
from clm_hf.state import CheckpointError
from tests.conftest import small_args


def _trainer(path: Path, make_model, tokenizer) -> ContinualCausalLMTrainer:
    return ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(path), processing_class=tokenizer,
                                    strategies=[Replay(buffer_size=16)])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tokenizer, tiny_stream):
    """A two-task Replay run with its end-of-task checkpoints (continual/task-000, task-001)."""
    from clm_hf.tasks import build_tiny_model
    from tests.conftest import NO_DROPOUT

    folder = tmp_path_factory.mktemp("saved")
    trainer = ContinualCausalLMTrainer(model=build_tiny_model("gpt2", tokenizer, **NO_DROPOUT["gpt2"]),
                                       args=small_args(folder), processing_class=tokenizer,
                                       strategies=[Replay(buffer_size=16)])
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    return folder / "run"


@pytest.fixture
def run(saved_run, tmp_path):
    """A private copy of the saved run folder, free to damage."""
    return Path(shutil.copytree(saved_run, tmp_path / "copy" / "run"))


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / ckpt.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _stream(tiny_stream):
    return {k: tiny_stream[k] for k in ("copy", "reverse", "sort")}


# --- paths must stay inside the checkpoint folder ----------------------------------------------------
@pytest.mark.parametrize("hostile", ["../../../../etc/passwd", "/etc/shadow", "strategies/../../../x", "C:\\x"])
def test_manifest_paths_outside_the_checkpoint_are_refused_before_any_read(run, hostile, monkeypatch):
    folder = run / "continual" / "task-001"
    _edit_manifest(folder, lambda m: m["files"].update({hostile: {"size": 1, "sha256": "0" * 64}}))
    opened = []
    monkeypatch.setattr(ckpt, "_sha256", lambda path: opened.append(path) or "0" * 64)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder|absolute path") as err:
        ckpt.verify_manifest(folder)
    assert repr(hostile) in str(err.value) and "bytes" not in str(err.value)  # no size of a foreign file
    assert opened == []


def test_trainer_files_paths_outside_the_checkpoint_are_refused(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    files = {"../../../../etc/passwd": {"size": 1, "sha256": "0" * 64}}
    with pytest.raises(CheckpointError, match="'../../../../etc/passwd' that leads outside"):
        ckpt.verify_files(tmp_path / "checkpoint-2", files, what="the trainer_files list")


@pytest.mark.parametrize("hostile", ["../../../../etc", "/etc"])
def test_gem_memory_folder_outside_its_checkpoint_is_refused(tmp_path, hostile):
    from clm_hf.strategies.base import save_tensor_json_state
    from clm_hf.strategies.gem import GEM

    save_tensor_json_state({"memories": [{"task_id": "a", "folder": hostile}], "steps": 0}, tmp_path / "gem")
    with pytest.raises(CheckpointError, match="gem memory folder"):
        GEM(memory_per_task=4).load_state(tmp_path / "gem")


def test_gem_memory_folder_that_is_missing_is_a_checkpoint_error(tmp_path):
    from clm_hf.strategies.base import save_tensor_json_state
    from clm_hf.strategies.gem import GEM

    save_tensor_json_state({"memories": [{"task_id": "a", "folder": "memory/task-000"}], "steps": 0}, tmp_path / "gem")
    with pytest.raises(CheckpointError, match="memory of task 'a'.*missing"):
        GEM(memory_per_task=4).load_state(tmp_path / "gem")


# --- the manifest lists what this kind of checkpoint needs -------------------------------------------
def test_manifest_without_the_model_weights_is_refused(run):
    folder = run / "continual" / "task-001"
    _edit_manifest(folder, lambda m: m["files"].pop(ckpt.MODEL_FILE))
    with pytest.raises(CheckpointError, match="does not list model.safetensors, which this kind of checkpoint"):
        ckpt.read_continual_state(folder)
    (folder / ckpt.MODEL_FILE).unlink()  # both gone: the manifest still has to list the weights
    with pytest.raises(CheckpointError, match="does not list model.safetensors, which this kind of checkpoint"):
        ckpt.read_continual_state(folder)


def test_manifest_without_the_replay_buffer_never_loads_an_empty_buffer(run, make_model, tokenizer, tiny_stream):
    folder = run / "continual" / "task-001"
    buffer = "strategies/00-replay/buffer"
    _edit_manifest(folder, lambda m: [m["files"].pop(k) for k in list(m["files"]) if k.startswith(buffer)])
    with pytest.raises(CheckpointError, match="00-replay/buffer/.* does not list"):
        ckpt.read_continual_state(folder)
    shutil.rmtree(folder / buffer)  # files and entries gone: the replay state still records the rows
    trainer = _trainer(run.parent, make_model, tokenizer)
    with pytest.raises(CheckpointError, match="records a buffer of 16 rows, but .*buffer is missing"):
        trainer.resume_stream(str(folder), trainer._plan_stream(_stream(tiny_stream)))


def test_files_the_manifest_does_not_list_are_refused(run):
    folder = run / "continual" / "task-001"
    (folder / "strategies/00-replay/extra.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="holds strategies/00-replay/extra.safetensors, which .* does not list"):
        ckpt.verify_manifest(folder)


def test_manifest_without_a_strategy_state_is_refused(run):
    folder = run / "continual" / "task-001"
    (folder / "strategies/00-replay/state.json").unlink()
    _edit_manifest(folder, lambda m: m["files"].pop("strategies/00-replay/state.json"))
    with pytest.raises(CheckpointError, match="does not list strategies/00-replay/state.json"):
        ckpt.read_continual_state(folder)


# --- malformed manifests fall back; all damaged is an error unless restart_on_damage -------------------
@pytest.mark.parametrize("damage", [
    lambda m: m.update(files=list(m["files"])),
    lambda m: next(iter(m["files"].values())).pop("size"),
    lambda m: m.pop("files"),
    lambda m: m["files"].update({"results.json": "not a dict"}),
])
def test_malformed_manifest_is_a_checkpoint_error_and_resume_falls_back(run, damage, make_model, tokenizer,
                                                                         tiny_stream, caplog):
    _edit_manifest(run / "continual" / "task-001", damage)
    with pytest.raises(CheckpointError, match="malformed"):
        ckpt.verify_manifest(run / "continual" / "task-001")
    trainer = _trainer(run.parent, make_model, tokenizer)
    with caplog.at_level(logging.WARNING):
        assert trainer.resume_stream(True, trainer._plan_stream(_stream(tiny_stream))) is None
    assert [t.task_id for t in trainer.tasks] == ["copy"]  # the previous checkpoint
    assert "Skipping unusable checkpoint" in caplog.text and "task-001" in caplog.text


def test_manifest_that_is_not_an_object_is_a_checkpoint_error(run):
    (run / "continual" / "task-001" / ckpt.MANIFEST).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="malformed: it holds a list"):
        ckpt.verify_manifest(run / "continual" / "task-001")


def test_resume_when_every_checkpoint_is_damaged_names_the_damage(run, make_model, tokenizer, tiny_stream):
    for name in ("task-000", "task-001"):
        _edit_manifest(run / "continual" / name, lambda m: m.update(files=[]))
    trainer = _trainer(run.parent, make_model, tokenizer)
    with pytest.raises(CheckpointError, match="every checkpoint there is damaged .*task-000.*malformed.*"
                                              "restart_on_damage=True"):
        trainer.fit(_stream(tiny_stream), resume_from_checkpoint=True)
    assert trainer.tasks == []


def test_restart_on_damage_trains_again_from_the_first_task(run, make_model, tokenizer, tiny_stream, caplog):
    for name in ("task-000", "task-001"):
        _edit_manifest(run / "continual" / name, lambda m: m.update(files=[]))
    trainer = _trainer(run.parent, make_model, tokenizer)
    with caplog.at_level(logging.WARNING):
        assert trainer.resume_stream(True, trainer._plan_stream(_stream(tiny_stream)), restart_on_damage=True) is None
    assert trainer.tasks == [] and "restart_on_damage" in caplog.text


# --- distributed: every rank's files are written before rank 0 hashes the folder ------------------------
def test_ranks_are_awaited_before_the_checkpoint_folder_is_hashed(tmp_path, make_model, tokenizer, tiny_stream,
                                                                 monkeypatch):
    from transformers import Trainer

    events: list[str] = []
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer,
                                       args=small_args(tmp_path, save_strategy="steps", save_steps=2))
    save_rng, describe = Trainer._save_rng_state, ckpt.describe_files
    monkeypatch.setattr(Trainer, "_save_rng_state", lambda self, d: (events.append("rng"), save_rng(self, d))[1])
    monkeypatch.setattr(trainer.accelerator, "wait_for_everyone", lambda: events.append("barrier"))
    monkeypatch.setattr(ckpt, "describe_files", lambda *a, **k: (events.append("hash"), describe(*a, **k))[1])
    trainer.fit({"copy": tiny_stream["copy"]})
    saves = "".join(e[0] for e in events)  # r(ng) b(arrier) h(ash)
    assert saves.count("h") == 2 and saves.count("rbh") == 2, events


# --- file modes follow the umask -------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_are_written_with_the_process_umask(tmp_path, make_model, tokenizer, tiny_stream, umask):
    import os
    import stat

    from clm_hf.buffer import ReservoirBuffer

    previous = os.umask(umask)
    try:
        trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer,
                                           args=small_args(tmp_path, save_strategy="steps", save_steps=2),
                                           strategies=[Replay(buffer_size=16)])
        trainer.fit({"copy": tiny_stream["copy"]})
        buffer = ReservoirBuffer(4, seed=0)
        buffer.add(tiny_stream["copy"]["train"].select(range(8)), "copy")
        buffer.save_to_disk(tmp_path / "run" / "standalone_buffer")
    finally:
        os.umask(previous)
    paths = [tmp_path / "run", *(tmp_path / "run").rglob("*")]
    assert any(p.name == "model.safetensors" for p in paths) and any(p.name == "rng.safetensors" for p in paths)
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert wrong == {}


def test_cli_restart_on_damage(tmp_path, capsys):
    from clm_hf.cli import main

    recipe = str(Path(__file__).parent.parent / "recipes" / "ewc" / "tiny_gpt2.yaml")
    fast = ["--tasks.num_train", "16", "--tasks.num_eval", "8", "--training.num_train_epochs", "1",
            "--training.disable_tqdm", "true", "--tasks.names", "[copy]"]
    out = tmp_path / "ewc"
    assert main(["train", recipe, *fast, "--training.output_dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", recipe, *fast, "--restart-on-damage"]) == 2  # --restart-on-damage needs --resume
    assert capsys.readouterr().err == "clm-hf: error: --restart-on-damage needs --resume RUN_DIR\n"
    _edit_manifest(out / "continual" / "task-000", lambda m: m.update(files=[]))
    assert main(["train", recipe, *fast, "--resume", str(out)]) == 2  # a user's problem: one line, no traceback
    assert re.search("^clm-hf: error: .*every checkpoint there is damaged.*--restart-on-damage",
                     capsys.readouterr().err.splitlines()[-1])
    with pytest.raises(CheckpointError, match="every checkpoint there is damaged"):  # --traceback: the exception
        main(["--traceback", "train", recipe, *fast, "--resume", str(out)])
    assert main(["train", recipe, *fast, "--resume", str(out), "--restart-on-damage"]) == 0
    ckpt.read_continual_state(out / "continual" / "task-000")  # trained again and saved anew


# --- weights that are views into one flat buffer (DeepSpeed ZeRO-2) ------------------------------------
def test_tied_weights_that_are_views_of_one_flat_buffer_are_saved_and_load_back(tmp_path, make_model):
    """ZeRO-2 keeps each parameter group's weights as views into one flat buffer: GPT-2's tied ``lm_head.weight``
    and ``transformer.wte.weight`` then cover none of their storage, which ``safetensors.torch.save_model`` refuses.
    The continual checkpoint writes the tie once and a fresh model loads it back with the tie intact."""
    import torch

    model = make_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    params = list(model.parameters())  # each tied parameter once, as DeepSpeed flattens them
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    start = 0
    for p in params:  # what ZeRO-2 does to the model's weights
        p.data = flat[start:start + p.numel()].view_as(p)
        start += p.numel()
    ckpt.save_continual_checkpoint(tmp_path / "ckpt", state={}, strategies=[], model=model, results=None)
    fresh = make_model("gpt2")
    ckpt.load_model_weights(fresh, tmp_path / "ckpt")
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    for (name, saved), (_, loaded) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(saved, loaded), name
    # ... and back into the flat-buffer model itself (a second resume in one process after a ZeRO-2 task),
    # which safetensors' load_model refuses as save_model does.
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        flat.zero_()
    ckpt.load_model_weights(model, tmp_path / "ckpt")
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
