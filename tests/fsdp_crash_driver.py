"""Trains a 2-task stream under FSDP2 on CPU processes with mid-task Trainer checkpoints, optionally
SIGKILLing every rank at a chosen moment, or resuming; for ``tests/test_fsdp_crash_resume.py``::

    torchrun --nproc_per_node 2 -m tests.fsdp_crash_driver OUT --runs ewc,lwf          # uninterrupted
    CLM_FSDP_KILL=step:1:3 torchrun --nproc_per_node 2 -m tests.fsdp_crash_driver OUT --runs ewc
    torchrun --nproc_per_node 2 -m tests.fsdp_crash_driver OUT --runs ewc --resume --reference REF

``--resume`` continues each run's folder (``fit(stream, resume_from_checkpoint=True)``); ``--reference
REF`` first trains the same runs uninterrupted into ``REF`` in the same launch (one start-up less).
The Trainer's checkpoints are sharded (``fsdp_config["state_dict_type"] = "SHARDED_STATE_DICT"``,
``--state-dict-type`` to try another).

Each task has 4 optimizer steps (8 rows, a per-device batch of 2 on 2 ranks, 2 epochs) and a Trainer
checkpoint every 2 steps (``save_strategy="steps"``), each with clm-hf's continual state. ``CLM_FSDP_KILL``
names the moment every process dies with ``SIGKILL`` (no clean-up, no ``finally``, like ``kill -9``; the
workers of torchrun each run in their own session, so each rank kills itself):

=====================  ========================================================================
``step:T:S``           right after optimizer step S of task T's main phase (checkpoints of the
                       earlier steps complete, none of step S yet)
``ckpt:T:S``           while the continual state of checkpoint S of task T is written: every
                       rank's shards and rank 0's manifest are in the temporary folder, which is
                       not renamed in (the Trainer's own files of that checkpoint are complete)
=====================  ========================================================================

With ``ckpt`` only rank 0 (the one that renames the folder in) is SIGKILLed; rank 1, waiting for
rank 0's word, loses its peer and torchrun stops it.

Every rank writes ``OUT/<run>/rank<r>.pt`` at the end: the gathered weights and strategy state, the
world size, the mid-task checkpoint the run resumed from (``resumed_from``) and every strategy's state
at the end of task 1's step 3 (``step3/...``: LwF's teacher lives only inside a task). The settings
are those of ``tests/distributed_driver.py`` (SGD, no dropout, one row length).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAVE_STEPS = 2
SNAPSHOT_STEP = 3  # task 1's step after its checkpoint-2, the one every resume here starts from


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(spec: str, live: dict) -> list:
    """Arm ``CLM_FSDP_KILL``; returns the Trainer callbacks that carry it."""
    from transformers import TrainerCallback

    import clm_hf.state as state_module

    kind, task, step = spec.split(":")
    task, step = int(task), int(step)

    def in_task() -> bool:
        current = getattr(live.get("trainer"), "current_task", None)
        return current is not None and current.index == task

    if kind == "ckpt":
        original = state_module.atomic_write_dir

        def atomic_write_dir(final_dir, fill):  # only rank 0 (the writer) calls it
            if in_task() and Path(final_dir).parent.name == f"checkpoint-{step}":
                def fill_then_die(tmp):
                    fill(tmp)  # every rank's shards, rank 0's files and the manifest, not renamed in
                    _die()

                return original(final_dir, fill_then_die)
            return original(final_dir, fill)

        state_module.atomic_write_dir = atomic_write_dir
        return []
    if kind != "step":
        raise ValueError(f"CLM_FSDP_KILL={spec!r}: the kind must be 'step' or 'ckpt'.")

    class Killer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            main_phase = not str(args.output_dir).endswith("-retrain")
            if main_phase and in_task() and state.global_step == step:
                _die()

    return [Killer()]


def _MidTaskSnapshot(live: dict, into: dict):
    """A callback that stores every strategy's state (gathered: a collective) at the end of step
    ``SNAPSHOT_STEP`` of task 1, the first step after the resume: LwF drops its teacher at the end of
    the task, so only a snapshot taken inside the task shows the teacher the resumed run restored."""
    from transformers import TrainerCallback

    from tests.distributed_driver import strategy_snapshot

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trainer = live["trainer"]
            current = trainer.current_task
            main_phase = not str(args.output_dir).endswith("-retrain")
            if main_phase and current is not None and current.index == 1 and state.global_step == SNAPSHOT_STEP:
                for strategy in trainer.strategies:
                    into.update({f"step{SNAPSHOT_STEP}/{k}": v for k, v in strategy_snapshot(strategy).items()})

    return Snapshot()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--runs", default="ewc,lwf")
    parser.add_argument("--resume", action="store_true", help="resume each run's folder (fit(resume_from_checkpoint=True))")
    parser.add_argument("--reference", help="first train each run uninterrupted into this folder (one launch, not two)")
    parser.add_argument("--state-dict-type", default="SHARDED_STATE_DICT", help="the FSDP plugin's state_dict_type")
    parser.add_argument("--no-continual-state", action="store_true", help="save_continual_state=False")
    options = parser.parse_args(argv)
    from tests.fsdp_cpu import enable_fsdp_on_cpu, fsdp2_arguments

    enable_fsdp_on_cpu()
    from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments
    from clm_hf.sharding import reshard
    from clm_hf.strategies.base import strategies_from_specs, unwrap_model
    from clm_hf.tasks import build_tiny_model, build_tokenizer, make_suite
    from tests.distributed_driver import NUM_EVAL, NUM_TRAIN, RUNS, _whole, strategy_snapshot

    rank = int(os.environ.get("RANK", "0"))
    live: dict = {}
    callbacks = _install_kill(os.environ["CLM_FSDP_KILL"], live) if os.environ.get("CLM_FSDP_KILL") else []
    tokenizer = build_tokenizer()
    jobs = [(options.reference, run, False) for run in options.runs.split(",")] if options.reference else []
    jobs += [(options.out, run, options.resume) for run in options.runs.split(",")]
    for out, run, resume in jobs:
        specs, arch = RUNS[run]
        model = build_tiny_model(arch, tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        sharding = fsdp2_arguments(model)
        # Each rank writes its shards of the model and optimizer into the Trainer's checkpoints (DCP).
        sharding["fsdp_config"]["state_dict_type"] = options.state_dict_type
        args = ContinualTrainingArguments(
            output_dir=str(Path(out) / run / "run"), optim="sgd", learning_rate=0.1, num_train_epochs=2,
            per_device_train_batch_size=2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=0.0, logging_steps=1, save_strategy="steps", save_steps=SAVE_STEPS, report_to="none",
            seed=0, disable_tqdm=True, dataloader_pin_memory=False, eval_before_training=False,
            save_continual_state=not options.no_continual_state, continual_eval_batch_size=NUM_EVAL // 2, use_cpu=True,
            **sharding,
        )
        mid_task: dict = {}
        trainer = ContinualCausalLMTrainer(model=model, args=args, processing_class=tokenizer,
                                           strategies=strategies_from_specs(specs),
                                           callbacks=[*callbacks, _MidTaskSnapshot(live, mid_task)])
        live["trainer"] = trainer
        resumed_from = []
        resume_stream = trainer.resume_stream

        def recording(*a, _inner=resume_stream, _out=resumed_from, **k):
            found = _inner(*a, **k)
            _out.append(None if found is None else [found[0], Path(found[1]).name])
            return found

        trainer.resume_stream = recording
        stream = make_suite(["copy", "reverse"], num_train=NUM_TRAIN, num_eval=NUM_EVAL, min_len=3, max_len=3, seed=0)
        trainer.fit(stream, resume_from_checkpoint=True if resume else None)
        data = {"world_size": trainer.args.world_size, "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
                "resumed_from": resumed_from[0] if resumed_from else None, **mid_task}
        for strategy in trainer.strategies:
            data.update(strategy_snapshot(strategy))
        for key, value in reshard(unwrap_model(trainer.model)).state_dict().items():
            data[f"model/{key}"] = _whole(value)
        (Path(out) / run).mkdir(parents=True, exist_ok=True)
        torch.save(data, Path(out) / run / f"rank{rank}.pt")
    from tests._driver_exit import leave

    leave()


if __name__ == "__main__":
    main()
