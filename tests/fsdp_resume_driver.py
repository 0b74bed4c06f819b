"""Trains a 2-task stream with end-of-task continual checkpoints, optionally resuming after task 0, for
``tests/test_fsdp_checkpoint.py``; sharded with FSDP2 on CPU processes (``--fsdp`` under torchrun) or not::

    torchrun --nproc_per_node 2 -m tests.fsdp_resume_driver OUT --batch 4 --fsdp --runs ewc,packnet
    python -m tests.fsdp_resume_driver OUT2 --batch 8 --runs ewc,packnet --resume OUT   # 2 -> 1

``--resume OUT`` continues each run from ``OUT/<run>/run/continual/task-000`` (written by another
launch, of any world size) and trains task 1. Every rank writes ``OUT2/<run>/rank<r>.pt``: the gathered
weights and strategy state at the end, and the world size. The settings are those of
``tests/distributed_driver.py`` (SGD, no dropout, one row length), so that the runs are comparable.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True, help="per-device train batch size")
    parser.add_argument("--runs", default="ewc,packnet")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--resume", help="a launch's OUT folder: resume each run after its task 0")
    parser.add_argument("--export", action="store_true", help="also write OUT/<run>/export (export_model)")
    options = parser.parse_args(argv)
    if options.fsdp:
        from tests.fsdp_cpu import enable_fsdp_on_cpu

        enable_fsdp_on_cpu()
    from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments
    from clm_hf.sharding import reshard
    from clm_hf.strategies.base import strategies_from_specs, unwrap_model
    from clm_hf.tasks import build_tiny_model, build_tokenizer, make_suite
    from tests.distributed_driver import NUM_EVAL, NUM_TRAIN, RUNS, _whole, strategy_snapshot

    rank = int(os.environ.get("RANK", "0"))
    tokenizer = build_tokenizer()
    for run in options.runs.split(","):
        specs, arch = RUNS[run]
        model = build_tiny_model(arch, tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        sharding = {}
        if options.fsdp:
            from tests.fsdp_cpu import fsdp2_arguments

            sharding = fsdp2_arguments(model)
        args = ContinualTrainingArguments(
            output_dir=str(Path(options.out) / run / "run"), optim="sgd", learning_rate=0.1, num_train_epochs=2,
            per_device_train_batch_size=options.batch, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", seed=0,
            disable_tqdm=True, dataloader_pin_memory=False, eval_before_training=False, save_continual_state=True,
            continual_eval_batch_size=NUM_EVAL // 2, use_cpu=True, **sharding,
        )
        trainer = ContinualCausalLMTrainer(model=model, args=args, processing_class=tokenizer,
                                           strategies=strategies_from_specs(specs))
        stream = make_suite(["copy", "reverse"], num_train=NUM_TRAIN, num_eval=NUM_EVAL, min_len=3, max_len=3, seed=0)
        resume = str(Path(options.resume) / run / "run" / "continual" / "task-000") if options.resume else None
        trainer.fit(stream, resume_from_checkpoint=resume)
        data = {"world_size": trainer.args.world_size, "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
                "tasks_trained_here": trainer.state.global_step}
        for strategy in trainer.strategies:
            data.update(strategy_snapshot(strategy))
        for key, value in reshard(unwrap_model(trainer.model)).state_dict().items():
            data[f"model/{key}"] = _whole(value)
        if options.export:
            trainer.export_model(Path(options.out) / run / "export")
        (Path(options.out) / run).mkdir(parents=True, exist_ok=True)
        torch.save(data, Path(options.out) / run / f"rank{rank}.pt")
    from tests._driver_exit import leave

    leave()


if __name__ == "__main__":
    main()
