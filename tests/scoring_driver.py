"""Scores one eval set with the trainer's per-task scoring, in one process or under ``torchrun``.

For ``tests/test_trainer_evaluate.py``: every rank writes ``OUT/rank<r>.json`` with the scores it
returned, the rows its model forwarded and the rows ``compute_metrics`` saw::

    torchrun --nproc_per_node 2 -m tests.scoring_driver OUT
    python -m tests.scoring_driver OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(out: str) -> None:
    from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments
    from clm_hf.tasks import build_tiny_model, build_tokenizer, make_task, tokenize_task

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model("gpt2", tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    rows = tokenize_task(make_task("reverse", 7, seed=5, min_len=2, max_len=6), tokenizer, False)
    seen: list[int] = []
    labels_seen: list[list[int]] = []

    def compute_metrics(prediction):
        seen.append(len(prediction.label_ids))
        labels_seen.extend([int(t) for t in row if t != -100] for row in prediction.label_ids)
        return {"rows_seen": float(len(prediction.label_ids))}

    args = ContinualTrainingArguments(output_dir=str(Path(out) / "run"), per_device_eval_batch_size=2,
                                      report_to="none", disable_tqdm=True, use_cpu=True,
                                      dataloader_pin_memory=False)
    trainer = ContinualCausalLMTrainer(model=model, args=args, processing_class=tokenizer,
                                       compute_metrics=compute_metrics)
    forwarded: list[int] = []
    model.register_forward_hook(lambda m, a, k, o: forwarded.append(k["input_ids"].shape[0]), with_kwargs=True)
    scores = trainer.evaluate_task(rows)
    Path(out).mkdir(parents=True, exist_ok=True)
    record = {"world_size": trainer.args.world_size, "rows_forwarded": sum(forwarded),
              "compute_metrics_rows": seen[0], "labels_seen": labels_seen,
              "labels": [[t for t in row if t != -100] for row in rows["labels"]], "scores": {k: v for k, v in scores.items() if k != "rows_seen"}}
    (Path(out) / f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))
    from tests._driver_exit import leave

    leave()


if __name__ == "__main__":
    main(sys.argv[1])
