"""PackNet on three synthetic language tasks, in the original project's quick-start form.

A tiny GPT-2 (built on the spot, no download) learns ``copy``, then ``reverse``, then ``sort``.
After each task PackNet prunes 75% of the weights the task trained, retrains the rest briefly and
freezes them for that task; the next task trains the freed weights. Every old task is scored with
the weights it owned, so nothing is forgotten (BWT = 0). Offline, CPU, well under a minute:

    python recipes/packnet/packnet_example.py [output_dir]

It prints the accuracy matrix, each task's share of the network, and writes ``results.json``,
``packnet_parameter_usage.png`` and ``packnet_task_accuracies.png`` into the output folder.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader

import clm_hf.strategies.packnet  # noqa: F401  registers "packnet" for the config dict below
from clm_hf import ContinualTrainer
from clm_hf.plots import write_report
from clm_hf.tasks import build_tiny_model, build_tokenizer, make_suite


def main(output_dir: str = "runs/packnet_example", *, num_train: int = 512, num_eval: int = 64, num_epochs: float = 3,
         print_fn=print) -> ContinualTrainer:
    torch.set_num_threads(1)  # a tiny model gains nothing from more threads
    tokenizer = build_tokenizer()
    model = build_tiny_model("gpt2", tokenizer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    trainer = ContinualTrainer(
        model=model,
        processing_class=tokenizer,  # the loaders below hold raw prompt/answer text
        config={
            "optimizer": {"type": "adam", "lr": 0.001},
            "continual_strategy": {
                "packnet": {
                    "enabled": True,
                    "prune_percentage": 0.75,  # 75% of the weights a task trained are freed after it
                    "use_magnitude_pruning": True,
                }
            },
            "output_dir": output_dir,
            "seed": 0,
            # Anything TrainingArguments takes; these keep the run short and quiet.
            "training": {"lr_scheduler_type": "constant", "save_strategy": "no", "report_to": "none",
                         "disable_tqdm": True, "logging_steps": 100, "dataloader_pin_memory": False},
        },
    )

    # Three tasks over the same inputs, so their answers conflict: plain fine-tuning forgets.
    suite = make_suite(["copy", "reverse", "sort"], num_train=num_train, num_eval=num_eval, min_len=2, max_len=4)
    task_data = [(DataLoader(s["train"], batch_size=16, shuffle=True), DataLoader(s["eval"], batch_size=64))
                 for s in suite.values()]
    for task_id, (train_loader, val_loader) in enumerate(task_data):
        trainer.train_task(
            train_loader=train_loader,
            val_loader=val_loader,
            task_id=task_id,
            task_name=list(suite)[task_id],
            num_epochs=num_epochs,
        )

    packnet = trainer.strategies[0]
    print_fn(trainer.results.format_table())
    print_fn("summary:", {k: None if v is None else round(v, 3) for k, v in trainer.results.summary().items()})
    print_fn("share of the prunable weights:", {k: round(v, 3) for k, v in packnet.parameter_usage().items()})
    written = write_report(output_dir)
    print_fn("wrote:", ", ".join(str(p) for p in written))
    return trainer


if __name__ == "__main__":
    main(*sys.argv[1:2])
