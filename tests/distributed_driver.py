"""Runs short continual streams in one process or under ``torchrun``, for ``tests/test_distributed.py``.

Every rank writes what each strategy holds, and the model's weights, right before and right after
each task, so the test can check that the ranks agree exactly and that a 2-process run with a
per-device batch ``b`` trains the same model as a 1-process run with batch ``2 b``::

    torchrun --nproc_per_node 2 -m tests.distributed_driver OUT --batch 4 --runs ewc,replay
    python -m tests.distributed_driver OUT --batch 8 --runs ewc,replay

With ``CLM_DRIVER_SAVE=1`` the runs also write their continual checkpoints (``OUT/<run>/run/continual``).
With ``CLM_DRIVER_RESUME=PREV`` each run resumes from ``PREV/<run>/run/continual/task-000`` (a launch
made with ``CLM_DRIVER_SAVE=1``) and trains the remaining tasks; with ``CLM_DRIVER_RESUME_RUN=PREV``, from
the latest checkpoint in ``PREV/<run>/run``, a mid-task one included. ``CLM_DRIVER_SAVE_STEPS=N`` writes a
Trainer checkpoint (with its continual state) every ``N`` steps.

Each run writes ``OUT/<run>/rank<r>/task<i>_<before|after>.pt`` (a flat ``{key: tensor or value}``
dict). The settings make the two kinds of launch comparable: SGD (no per-coordinate scaling that
would amplify rounding), no dropout, a constant learning rate, rows of one length (so every rank
holds the same number of supervised tokens and a per-rank mean equals the global one), and the
same seeded sampler permutation, which ``accelerate`` splits batch by batch between the ranks.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (strategy specs, model arch). Options keep every run to a few seconds.
RUNS: dict[str, tuple[list[dict[str, Any]], str]] = {
    "plain": ([], "gpt2"),
    "replay": ([{"name": "replay", "buffer_size": 6, "replay_ratio": 1.0}], "gpt2"),
    # Empirical Fisher: the same rows give the same estimate however they are split between ranks.
    "ewc": ([{"name": "ewc", "ewc_lambda": 50.0, "fisher_samples": 8, "fisher_batch_size": 3,
              "fisher_type": "empirical"}], "gpt2"),
    # True Fisher: answers are sampled per rank, so only the agreement between ranks is exact.
    "ewc-true": ([{"name": "ewc", "ewc_lambda": 50.0, "fisher_samples": 8, "fisher_batch_size": 4}], "gpt2"),
    # Separate terms, 3 tasks: the third trains against two (Fisher, anchor) pairs merged into one.
    "ewc-separate": ([{"name": "ewc", "ewc_lambda": 2.0, "mode": "separate", "fisher_samples": 8,
                       "fisher_batch_size": 3, "fisher_type": "empirical"}], "gpt2"),
    "lwf": ([{"name": "lwf", "alpha": 1.0}], "gpt2"),
    "lwf-cached": ([{"name": "lwf", "alpha": 1.0, "cache_teacher": True, "cache_batch_size": 3}], "gpt2"),
    # With gradient accumulation (ACCUMULATION): FSDP2 then skips the reduce-scatter on all but the
    # last micro-batch, while EWC's penalty and LwF's teacher pass run on every one.
    "ewc-accum": ([{"name": "ewc", "ewc_lambda": 50.0, "fisher_samples": 8, "fisher_batch_size": 3,
                    "fisher_type": "empirical"}], "gpt2"),
    "lwf-accum": ([{"name": "lwf", "alpha": 1.0}], "gpt2"),
    # The whole memory at every step: GEM's "auto" rows follow the per-device batch, which differs
    # between 2 x b and 1 x 2b.
    "gem": ([{"name": "gem", "memory_per_task": 4, "memory_batch_size": None}], "gpt2"),
    # No margin: the dual variable is -g·g_ref / |g_ref|², so the projection depends on both reduced
    # sums (with the margin 0.5 the bound is active here and only the decision depends on them).
    "gem-nomargin": ([{"name": "gem", "memory_per_task": 4, "memory_batch_size": None, "margin": 0.0}], "gpt2"),
    # Two past tasks at the third: GEM's "auto" references take the hooked pass (one batch over both groups).
    "gem-3tasks": ([{"name": "gem", "memory_per_task": 4, "memory_batch_size": None, "margin": 0.0}], "gpt2"),
    "agem": ([{"name": "agem", "memory_per_task": 4, "sample_size": 3}], "gpt2"),
    "packnet": ([{"name": "packnet", "prune_percentage": 0.5, "retrain_epochs": 1}], "gpt2"),
    # Weight decay moves the held weights despite their zero gradient: only the restore after each step keeps
    # them (under DeepSpeed ZeRO-2, into its fp32 master partition: tests/test_deepspeed.py).
    "packnet-decay": ([{"name": "packnet", "prune_percentage": 0.5, "retrain_epochs": 1}], "gpt2"),
    # Clipped: the clip norm must be that of the masked gradient (under ZeRO-2, masked before DeepSpeed clips).
    "packnet-clip": ([{"name": "packnet", "prune_percentage": 0.5, "retrain_epochs": 1}], "gpt2"),
    "packnet-random": ([{"name": "packnet", "prune_percentage": 0.5, "retrain_epochs": 1,
                         "use_magnitude_pruning": False}], "gpt2"),
    "pnn": ([{"name": "pnn", "lateral_rank": 4}], "gpt2"),
    # Under FSDP2 (tests/test_fsdp.py) a third task copies a column that was itself added, and sharded, after
    # Accelerate wrapped the model; "fresh" columns are drawn from the config on every rank with the same seed.
    "pnn-3tasks": ([{"name": "pnn", "lateral_rank": 4}], "gpt2"),
    "pnn-fresh": ([{"name": "pnn", "lateral_rank": 4, "column_init": "fresh"}], "gpt2"),
    "pnn-lora": ([{"name": "pnn", "mode": "lora", "lora_rank": 2}], "gpt2"),
    "olora": ([{"name": "olora", "lora_rank": 2, "lambda_orth": 0.5}], "llama"),
    "replay+ewc": ([{"name": "replay", "buffer_size": 6, "replay_ratio": 1.0},
                    {"name": "ewc", "ewc_lambda": 50.0, "fisher_samples": 8, "fisher_type": "empirical"}], "gpt2"),
}
NUM_TRAIN = 8  # rows per task: one optimizer step per epoch with a global batch of 8
NUM_EVAL = 4  # eval rows per task: 2 per rank when 2 ranks split them
# Epochs of the first task, where the default (--epochs) is not enough: GEM and A-GEM only project
# once the first task is learned well enough for the second one's gradient to conflict with it.
FIRST_EPOCHS = {"gem": 20, "gem-nomargin": 20, "gem-3tasks": 20, "agem": 20}
# Runs that need more than the --tasks stream.
TASKS = {"ewc-separate": "copy,reverse,sort", "pnn-3tasks": "copy,reverse,sort", "gem-3tasks": "copy,reverse,sort"}
# Runs with gradient accumulation: --batch is then split into this many micro-batches per step.
ACCUMULATION = {"ewc-accum": 2, "lwf-accum": 2}
# Runs with weight decay (SGD's, added to the gradient); the others train without.
WEIGHT_DECAY = {"packnet-decay": 0.5}
# Runs with gradient clipping (--max-grad-norm for the others, 0 by default). A few clipped steps match one
# process to rounding; over many (20 epochs here) this tiny model's clipped trajectory amplifies rounding
# about 2x per step (docs/distributed.md, "Clipping under ZeRO-2").
MAX_GRAD_NORM = {"packnet-clip": 0.5}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy; an FSDP2 shard (DTensor) is gathered into the whole tensor first."""
    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach().cpu().clone()


def _gathered(model):
    """Whole parameters to read: under DeepSpeed ZeRO-3 each rank holds empty placeholders outside forward."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def deepspeed_config(stage: int) -> dict[str, Any]:
    """A DeepSpeed config of ZeRO ``stage`` that keeps the Trainer's SGD, schedule and batch sizes."""
    return {"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto"}


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(item, f"{prefix}/{key}", out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flat(item, f"{prefix}/{i}", out)
    elif isinstance(value, torch.Tensor):
        out[prefix] = _whole(value)
    else:
        out[prefix] = value


def _count_scored_rows(trainer) -> list[int]:
    """A one-item list counting the rows this rank forwards while the trainer scores tasks (``evaluate_task``)."""
    count = [0]
    score = trainer.evaluate_task

    def hook(module, args, kwargs):
        count[0] += int(kwargs["input_ids"].shape[0])

    def counted(*args, **kwargs):
        # On the model of the moment, for this call only: PNN replaces the model (a hook on the first
        # one would count only column 0's forwards, and a deep copy of a column copies its hooks).
        handle = trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return score(*args, **kwargs)
        finally:
            handle.remove()

    trainer.evaluate_task = counted
    return count


def dump_zero2_master(trainer, path: Path) -> None:
    """This rank's fp32 master partitions of the trainer's DeepSpeed ZeRO-2 engine, and its partitions of the model's
    weights, into ``path`` (nothing without a ZeRO-2 engine).

    ZeRO-2 copies the masters over the model's weights at every step (and DeepSpeed's checkpoints save and reload
    them): a weight a strategy writes must be in both (PackNet's holds, tests/test_deepspeed.py).
    """
    import torch.distributed as dist

    zero = getattr(trainer.model_wrapped, "optimizer", None)
    masters = getattr(zero, "single_partition_of_fp32_groups", None)
    if masters is None:
        return
    model = [parts[dist.get_rank(group=zero.real_dp_process_group[i])]
             for i, parts in enumerate(zero.parallel_partitioned_bit16_groups)]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"master": [_whole(m) for m in masters], "model": [_whole(m).float() for m in model]}, path)


def strategy_snapshot(strategy) -> dict[str, Any]:
    """Everything a strategy holds, flattened; data held as datasets is listed row by row."""
    out: dict[str, Any] = {}
    _flat(strategy.state_dict(), strategy.name, out)
    buffer = getattr(strategy, "buffer", None)
    if buffer is not None:
        out[f"{strategy.name}/buffer_rows"] = buffer.as_dataset().to_dict() if len(buffer) else {}
        out[f"{strategy.name}/buffer_seen"] = buffer.num_seen
    memories = getattr(strategy, "memories", None)
    if memories is not None:
        for task_id, rows in memories.items():
            out[f"{strategy.name}/memory/{task_id}"] = rows.to_dict()
        out[f"{strategy.name}/steps"] = strategy.steps
        out[f"{strategy.name}/projected_steps"] = strategy.projected_steps
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True, help="per-device train batch size")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--tasks", default="copy,reverse")
    parser.add_argument("--gpu", action="store_true", help="run on the GPU (the lent-GPU checks: DDP/FSDP2 there)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (on CPU processes through tests.fsdp_cpu)")
    parser.add_argument("--deepspeed", type=int, choices=(2, 3), help="train with DeepSpeed ZeRO of this stage")
    parser.add_argument("--max-grad-norm", type=float, default=0.0,
                        help="clip gradients to this norm (0: no clipping, the tests' setting)")
    parser.add_argument("--keep-unsharded", action="store_true",
                        help="FSDP2 with reshard_after_forward=False: unsharded copies outlive an evaluation's forward")
    options = parser.parse_args(argv)
    if options.fsdp and not options.gpu:
        from tests.fsdp_cpu import enable_fsdp_on_cpu

        enable_fsdp_on_cpu()

    import clm_hf.strategies.ewc as ewc_module
    import clm_hf.strategies.gem  # noqa: F401 - registers gem / agem
    import clm_hf.strategies.olora  # noqa: F401 - registers olora
    from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments, Strategy
    from clm_hf.strategies.base import strategies_from_specs, unwrap_model
    from clm_hf.tasks import build_tiny_model, build_tokenizer, make_suite

    rank = int(os.environ.get("RANK", "0"))
    fisher_rows: list[int] = []
    estimate = ewc_module.estimate_fisher

    def counting_estimate(model, rows, **kwargs):
        fisher_rows.append(len(rows))
        return estimate(model, rows, **kwargs)

    ewc_module.estimate_fisher = counting_estimate  # record how many rows this rank estimated on
    row_losses = [0]  # calls of EWC's per-row loss: under FSDP2, one per row this rank backpropagates
    row_loss = ewc_module._row_loss

    def counting_row_loss(*args, **kwargs):
        row_losses[0] += 1
        return row_loss(*args, **kwargs)

    ewc_module._row_loss = counting_row_loss

    class Probe(Strategy):
        """Listed last: writes the other strategies' state and the weights around each task."""

        name = "probe"
        supports_fsdp = True  # reads gathered copies only
        supports_partitioned_parameters = True

        def __init__(self, folder: Path) -> None:
            super().__init__()
            self.folder = folder

        def _dump(self, trainer, task, when: str) -> None:
            data: dict[str, Any] = {"world_size": trainer.args.world_size, "rank": rank,
                                    "global_step": trainer.state.global_step, "fisher_rows": list(fisher_rows),
                                    "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
                                    "device": str(next(trainer.model.parameters()).device)}
            if options.fsdp:  # only tests/test_fsdp.py reads it (EWC's Fisher rows split under FSDP2)
                data["fisher_row_losses"] = row_losses[0]
            for strategy in trainer.strategies:
                if strategy is not self:
                    data.update(strategy_snapshot(strategy))
            model = unwrap_model(trainer.model)
            with _gathered(model):
                for key, value in model.state_dict().items():
                    data[f"model/{key}"] = _whole(value)
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(data, self.folder / f"task{task.index}_{when}.pt")

        def before_task(self, trainer, task) -> None:
            self._dump(trainer, task, "before")

        def after_task(self, trainer, task) -> None:
            self._dump(trainer, task, "after")
            if options.deepspeed == 2:
                self._dump_zero2_master(trainer, task)

        def _dump_zero2_master(self, trainer, task) -> None:
            dump_zero2_master(trainer, self.folder / f"task{task.index}_zero2_master.pt")

    tokenizer = build_tokenizer()
    no_dropout = {"gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
                  "llama": {"attention_dropout": 0.0}}
    for run in options.runs.split(","):
        specs, arch = RUNS[run]
        fisher_rows.clear()
        row_losses[0] = 0
        model = build_tiny_model(arch, tokenizer, hidden_size=32, num_layers=1, num_heads=2, **no_dropout[arch])
        sharding: dict[str, Any] = {}
        if options.fsdp:
            from tests.fsdp_cpu import fsdp2_arguments

            sharding = fsdp2_arguments(model, reshard_after_forward=not options.keep_unsharded)
        elif options.deepspeed:
            sharding = {"deepspeed": deepspeed_config(options.deepspeed)}
        args = ContinualTrainingArguments(
            output_dir=str(Path(options.out) / run / "run"), optim="sgd", learning_rate=0.1,
            num_train_epochs=options.epochs, per_device_train_batch_size=options.batch // ACCUMULATION.get(run, 1),
            gradient_accumulation_steps=ACCUMULATION.get(run, 1),
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=WEIGHT_DECAY.get(run, 0.0),
            max_grad_norm=MAX_GRAD_NORM.get(run, options.max_grad_norm),
            logging_steps=1, report_to="none", seed=0, disable_tqdm=True,
            **({"save_strategy": "steps", "save_steps": int(os.environ["CLM_DRIVER_SAVE_STEPS"])}
               if os.environ.get("CLM_DRIVER_SAVE_STEPS") else {"save_strategy": "no"}),
            dataloader_pin_memory=False, eval_before_training=False,
            save_continual_state=bool(os.environ.get("CLM_DRIVER_SAVE")),
            # Eval batches of 2 rows: each of 2 ranks scores its own 2 of the 4 eval rows (a batch larger than
            # rows / ranks makes Accelerate pad every rank's batch by cycling through the rows).
            continual_eval_batch_size=NUM_EVAL // 2,
            use_cpu=not options.gpu,  # without use_cpu, torchrun on a CPU-only host runs 2 independent processes
            **sharding,
        )
        strategies = [*strategies_from_specs(specs), Probe(Path(options.out) / run / f"rank{rank}")]
        trainer = ContinualCausalLMTrainer(model=model, args=args, processing_class=tokenizer, strategies=strategies)
        eval_rows = _count_scored_rows(trainer)
        resume = os.environ.get("CLM_DRIVER_RESUME") or os.environ.get("CLM_DRIVER_RESUME_RUN")
        if resume and options.deepspeed == 2:
            from transformers import TrainerCallback

            class MasterAtResume(TrainerCallback):
                """The resumed engine's ZeRO-2 master and model partitions at its first train begin: after
                DeepSpeed loaded a mid-task checkpoint's engine state (tests/test_deepspeed_zero2_resume.py)."""

                def __init__(self, path: Path) -> None:
                    self.path, self.done = path, False

                def on_train_begin(self, args, state, control, **kwargs):
                    if not self.done:
                        self.done = True
                        dump_zero2_master(trainer, self.path)

            trainer.add_callback(MasterAtResume(Path(options.out) / run / f"rank{rank}" / "resumed_zero2_master.pt"))
        stream = make_suite(TASKS.get(run, options.tasks).split(","), num_train=NUM_TRAIN, num_eval=NUM_EVAL,
                            min_len=3, max_len=3, seed=0)
        if os.environ.get("CLM_DRIVER_RESUME"):  # continue from another launch's checkpoint after task 0 (its --epochs for every task)
            trainer.fit(stream, resume_from_checkpoint=str(Path(resume) / run / "run" / "continual" / "task-000"))
        elif resume:  # continue from the latest checkpoint (end-of-task or mid-task) of another launch's run folder
            trainer.fit(stream, resume_from_checkpoint=str(Path(resume) / run / "run"))
        for index, (name, splits) in enumerate(stream.items() if not resume else ()):
            epochs = FIRST_EPOCHS.get(run, options.epochs) if index == 0 else options.epochs
            trainer.train_task(splits["train"], splits["eval"], task_id=name, num_epochs=epochs)
        # The per-task scores after every task (the results matrix), and how many eval rows this rank scored.
        scores = {f"scores/{metric}": torch.tensor([[float("nan") if v is None else v for v in row] for row in matrix],
                                                   dtype=torch.float64)
                  for metric, matrix in trainer.results.scores.items()}
        torch.save({**scores, "eval_rows": eval_rows[0]}, Path(options.out) / run / f"rank{rank}" / "results.pt")
    from tests._driver_exit import leave

    leave()


if __name__ == "__main__":
    main()
