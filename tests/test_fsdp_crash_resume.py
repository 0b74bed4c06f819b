"""Kill-and-resume inside a task under FSDP2 (2 processes, gloo, CPU) ends equal to the uninterrupted run.

``tests/fsdp_crash_driver.py`` trains the 2-task stream copy, reverse with a Trainer checkpoint every 2
of a task's 4 steps, each carrying clm-hf's continual state (the strategies' shards written by every
rank with ``torch.distributed.checkpoint``, the manifest by rank 0, last). One torchrun launch per
strategy is SIGKILLed inside task 1, every rank at once:

- EWC right after step 3: checkpoint-2 is the newest complete checkpoint;
- LwF while the continual state of checkpoint-4 is written (the Trainer's files of checkpoint-4 and
  every rank's shards are on disk, the folder is not renamed in): the interrupted save is skipped
  and the resume starts from checkpoint-2 too;
- with ``CLM_FSDP_CRASH_PACKNET=1``, also PackNet right after step 3 (its ownership masks are sharded
  like the weights; one launch more, so not by default).

A last launch resumes every killed run (``fit(stream, resume_from_checkpoint=True)``) and, first,
trains the same runs uninterrupted. The final weights and strategy state, and the strategy state one
step after the resume point (LwF's teacher exists only inside the task), must equal the
uninterrupted run's to 1e-5. The three launches are ``slow`` and ``distributed``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests._launch import ATOL, launch_env, run_logged, torchrun

KILLS = {"ewc": "step:1:3", "lwf": "ckpt:1:4"}
if os.environ.get("CLM_FSDP_CRASH_PACKNET") == "1":  # one launch more (~30 s): opt-in, see the module docstring
    KILLS["packnet"] = "step:1:3"


def _torchrun(out: Path, runs: list[str], *extra: str, kill: str | None = None) -> int:
    cmd = torchrun(2, "-m", "tests.fsdp_crash_driver", str(out), "--runs", ",".join(runs), *extra)
    env = launch_env(**({"CLM_FSDP_KILL": kill} if kill else {}))
    log = out.parent / f"{out.name}-{'-'.join(runs)}{'-killed' if kill else ''}.log"
    code = run_logged(cmd, log, timeout=600, env=env)
    if kill is None and code != 0:
        pytest.fail(f"launch {log.name} failed with exit code {code}:\n{log.read_text()[-6000:]}")
    if kill is not None and ("exitcode  : -9" not in log.read_text() or code == 0):
        pytest.fail(f"launch {log.name} was meant to be SIGKILLed at {kill} but ended with {code}:\n"
                    f"{log.read_text()[-6000:]}")
    return code


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-crash")
    killed = root / "killed"
    for run, kill in KILLS.items():
        _torchrun(killed, [run], kill=kill)
    _torchrun(killed, list(KILLS), "--resume", "--reference", str(root / "reference"))
    return {"killed": killed, "reference": root / "reference"}


def _final(folder: Path, run: str, rank: int = 0) -> dict:
    return torch.load(folder / run / f"rank{rank}.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run", list(KILLS))
def test_kill_inside_a_task_under_fsdp2_and_resume_equals_the_uninterrupted_run(launches, run):
    reference, resumed = _final(launches["reference"], run), _final(launches["killed"], run)
    assert reference["fsdp"] and resumed["fsdp"] and reference["world_size"] == resumed["world_size"] == 2
    assert reference["resumed_from"] is None
    # Resumed inside task 1 from its checkpoint-2: after the kill at step 3 (EWC, PackNet), and because
    # checkpoint-4's interrupted save is skipped (LwF).
    assert resumed["resumed_from"] == [1, "checkpoint-2"], resumed["resumed_from"]
    assert reference.keys() == resumed.keys(), set(reference) ^ set(resumed)
    inside = [k for k in reference if k.startswith(f"step3/{run}/") and isinstance(reference[k], torch.Tensor)]
    assert inside, f"{run}: no strategy tensor was recorded inside task 1"
    if run == "lwf":  # the teacher the resumed run restored from checkpoint-2's shards
        assert any("/teacher/" in k for k in inside), inside
    compared = 0
    for key, value in reference.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(resumed[key], value, atol=ATOL, rtol=1e-5, msg=lambda m, k=key: f"{run} {k}: {m}")
            compared += 1
        elif isinstance(value, torch.Tensor):
            assert torch.equal(resumed[key], value), f"{run}: {key} differs"
        elif key != "resumed_from":
            assert resumed[key] == value, f"{run}: {key} differs"
    assert compared > 10
    other = _final(launches["killed"], run, rank=1)  # both ranks end with the same gathered state
    assert all(torch.equal(other[k], resumed[k]) for k in resumed if isinstance(resumed[k], torch.Tensor))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run", list(KILLS))
def test_fsdp2_mid_task_checkpoint_holds_every_ranks_strategy_shards_under_its_manifest(launches, run):
    from clm_hf import state as ckpt
    from clm_hf.trainer import IN_TASK_STATE_DIR

    task = launches["killed"] / run / "run" / "task-001"
    state_dir = task / "checkpoint-2" / IN_TASK_STATE_DIR
    meta = ckpt.read_continual_state(state_dir, with_model=False)
    files = json.loads((state_dir / ckpt.MANIFEST).read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(files), sorted(files)
    marks = json.loads((state_dir / "strategies" / f"00-{run}" / "state.json").read_text())
    assert "__sharded__" in json.dumps(marks), f"{run}: the strategy's sharded tensors were not routed to dcp/"
    # The Trainer's own sharded model and optimizer (each rank's files) are listed, so a damaged one is caught.
    trainer_files = set(meta["trainer_files"])
    assert {"pytorch_model_fsdp_0/__1_0.distcp", "optimizer_0/__1_0.distcp", "rng_state_1.pth"} <= trainer_files
    if run == "lwf":
        # The kill came while checkpoint-4's continual state was written: its temporary folder is
        # complete but was never renamed in, and the resume skipped it; the relaunch went on to save
        # checkpoint-4 again, whole.
        assert (task / "checkpoint-4" / IN_TASK_STATE_DIR / ckpt.MANIFEST).is_file()
        assert not list((task / "checkpoint-4").glob(".tmp-*"))
        log = (launches["killed"].parent / f"killed-{'-'.join(KILLS)}.log").read_text()
        assert "Skipping mid-task checkpoint" in log and "checkpoint-4" in log


def test_a_sharded_mid_task_checkpoint_refuses_another_world_size_naming_both(tmp_path, make_model, tokenizer):
    """A mid-task checkpoint of an FSDP2 run records its world size; resuming it on another number of
    processes fails naming both and the way out, instead of mixing per-rank files (data order, RNG,
    optimizer shards) of another layout."""
    from clm_hf import state as ckpt
    from clm_hf.strategies import build_strategy
    from clm_hf.tasks import make_suite
    from clm_hf.trainer import IN_TASK_STATE_DIR
    from tests.conftest import make_trainer

    stream = make_suite(["copy"], num_train=4, num_eval=2, seed=0)
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [build_strategy("ewc", fisher_samples=4)])
    run = Path(trainer.args.output_dir)
    checkpoint = run / "task-000" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    state = {**trainer._continual_state(), "trainer_files": ckpt.describe_files(checkpoint), "world_size": 2}
    ckpt.save_continual_checkpoint(checkpoint / IN_TASK_STATE_DIR, state=state, strategies=trainer.strategies,
                                   model=None, results=None)
    assert trainer.args.world_size == 1
    with pytest.raises(ValueError, match=r"checkpoint-2 was written by an FSDP2 run of 2 processes, but this run "
                                         r"has 1.*Resume with 2 processes, or move the checkpoint-\* folders"):
        trainer.fit(stream, resume_from_checkpoint=str(run))
