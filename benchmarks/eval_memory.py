"""Peak memory of clm-hf's per-task scoring against ``Trainer.evaluate``, on a 151,936-token vocabulary.

A Qwen2 model built from its config at a tiny width (``--hidden``) keeps the weights small, so the
logits (``batch x length x vocab``) dominate memory, as they do when a real Qwen2 model is scored.
Each method runs in its own subprocess on the same rows, batch and model, and reports its peak
resident set size (``resource.getrusage``), and the same after setup only (model and rows built,
nothing evaluated):

- ``trainer_evaluate``: ``transformers.Trainer.evaluate`` (eval loss, no ``compute_metrics``);
- ``scoring``: :meth:`ContinualTrainer.evaluate_task` (exact match, token accuracy, loss, perplexity),
  whose answer-token log-likelihood is computed in chunks (``clm_hf.evaluation.answer_nll``).

Both use ``per_device_eval_batch_size`` rows per forward pass.

    OMP_NUM_THREADS=1 python benchmarks/eval_memory.py                      # 32 rows x 256 tokens, batch 8
    OMP_NUM_THREADS=1 python benchmarks/eval_memory.py --quick
    OMP_NUM_THREADS=1 python benchmarks/eval_memory.py --output benchmarks/results/eval_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("setup", "trainer_evaluate", "scoring")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(method: str, options: argparse.Namespace) -> dict[str, Any]:
    """Build the model and rows, run ``method``, return its peak RSS (MiB) and wall time."""
    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

    torch.set_num_threads(1)
    from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments
    from clm_hf.data import ContinualDataCollator

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=options.vocab, hidden_size=options.hidden, intermediate_size=2 * options.hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=max(512, options.seq_len), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, options.vocab, (options.rows, options.seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : options.seq_len - options.answer_len] = -100  # the prompt is not scored
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    common = dict(per_device_eval_batch_size=options.batch, report_to="none", disable_tqdm=True, use_cpu=True,
                  dataloader_pin_memory=False)
    collator = ContinualDataCollator(pad_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        setup_peak = _peak_rss_mib()
        start = time.perf_counter()
        result: dict[str, Any] = {}
        if method == "trainer_evaluate":
            trainer = Trainer(model=model, args=TrainingArguments(output_dir=tmp, **common), data_collator=collator)
            setup_peak = _peak_rss_mib()
            start = time.perf_counter()
            result = {k: v for k, v in trainer.evaluate(rows).items() if k == "eval_loss"}
        elif method == "scoring":
            trainer = ContinualCausalLMTrainer(model=model, args=ContinualTrainingArguments(output_dir=tmp, **common),
                                               data_collator=collator)
            setup_peak = _peak_rss_mib()
            start = time.perf_counter()
            result = {k: v for k, v in trainer.evaluate_task(rows).items() if k == "loss"}
        seconds = time.perf_counter() - start
    return {"method": method, "peak_rss_mib": round(_peak_rss_mib(), 1), "setup_peak_rss_mib": round(setup_peak, 1),
            "seconds": round(seconds, 2), **result}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--answer-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 rows of 16 tokens, vocab 4096")
    parser.add_argument("--output", default=None, help="write the report as JSON here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.quick:
        options.vocab, options.rows, options.seq_len, options.answer_len, options.batch = 4096, 4, 16, 4, 2
    if options.child:
        print(json.dumps(run_one(options.child, options)))
        return {}
    passthrough = [f"--vocab={options.vocab}", f"--hidden={options.hidden}", f"--rows={options.rows}",
                   f"--seq-len={options.seq_len}", f"--answer-len={options.answer_len}", f"--batch={options.batch}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    runs = {}
    for method in METHODS:
        # Its own process each: ru_maxrss is a process's peak, so the methods must not share one.
        done = subprocess.run([sys.executable, __file__, "--child", method, *passthrough], env=env,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
        runs[method] = json.loads(done.stdout.strip().splitlines()[-1])
    base = runs["setup"]["peak_rss_mib"]
    logits_mib = options.batch * options.seq_len * options.vocab * 4 / 2**20
    report = {
        "settings": {k: getattr(options, k) for k in ("vocab", "hidden", "rows", "seq_len", "answer_len", "batch")},
        "logits_per_batch_mib": round(logits_mib, 1),
        "runs": runs,
        "ratio_peak": round(runs["scoring"]["peak_rss_mib"] / runs["trainer_evaluate"]["peak_rss_mib"], 3),
        "ratio_above_setup": round((runs["scoring"]["peak_rss_mib"] - base)
                                   / max(1e-9, runs["trainer_evaluate"]["peak_rss_mib"] - base), 3),
    }
    print(json.dumps(report, indent=2))
    if options.output:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        Path(options.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
