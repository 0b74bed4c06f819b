"""Continual-evaluation throughput: clm-hf's per-task scoring against ``Trainer.evaluate``.

The same model, rows (lengths mixed, ``--min-len``..``--max-len`` letters per answer) and batch size
(``per_device_eval_batch_size``, default 8 as in ``TrainingArguments``) go through:

- ``trainer_evaluate``: ``transformers.Trainer.evaluate`` at its defaults (loss; the logits are
  gathered too, as they are whenever ``prediction_loss_only`` is off);
- ``trainer_evaluate_loss_only``: the same with ``prediction_loss_only=True`` (loss only);
- ``scoring``: :meth:`ContinualTrainer.evaluate_task` at its defaults (exact match, token accuracy,
  loss, perplexity; rows batched by length);
- ``scoring_unsorted``: the same with ``continual_eval_sort_by_length=False``;
- ``scoring_all_logits``: the scoring with the LM head run on every position (as before
  ``logits_to_keep`` skipped the prompt; set here by patching ``first_scored_logit``).

``--vocab N`` resizes the model's (tied) embeddings to ``N`` tokens, so that the LM head weighs as
it does in a real model (the synthetic tokenizer has about 30 tokens).

Each repeat runs every method once, in a rotated order (so none always runs first after another);
the figures are the medians over repeats, of the throughput (non-pad tokens per second) and of the
per-repeat ratio to ``trainer_evaluate``. ``--stream-tasks T`` adds a run of a T-task stream (tiny
training sets, every task's eval set scored before training and after each task) that times the
continual evaluation against the training, and against ``T * (T + 1)`` ``Trainer.evaluate`` calls
on the same rows (the stream's evaluation time times the median ratio of ``Trainer.evaluate`` to
the scoring, both run alternately on every eval set with the final model).

    OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py --models tiny,medium --repeats 7 --stream-tasks 10 \\
        --output benchmarks/results/eval_throughput.json
    OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

METHODS = ("trainer_evaluate", "trainer_evaluate_loss_only", "scoring", "scoring_unsorted", "scoring_all_logits")


def eval_rows(count: int, min_len: int, max_len: int, seed: int = 0):
    """Tokenized rows of the synthetic tasks, answer lengths uniform in ``[min_len, max_len]``."""
    from datasets import concatenate_datasets

    from clm_hf.tasks import make_task, tokenize_for_causal_lm

    parts = [tokenize_for_causal_lm(make_task(name, count // 2, seed=seed + i, min_len=min_len, max_len=max_len),
                                    C.tokenizer()) for i, name in enumerate(("copy", "reverse"))]
    return concatenate_datasets(parts).shuffle(seed=seed)


def plain_trainer(model, batch: int, output_dir: str, **overrides):
    """A ``transformers.Trainer`` for evaluation only, with clm-hf's padding collator."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from clm_hf.data import ContinualDataCollator

    args = TrainingArguments(output_dir=output_dir, per_device_eval_batch_size=batch, report_to="none",
                             disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False, **overrides)
    trainer = Trainer(model=model, args=args, data_collator=ContinualDataCollator(C.tokenizer().pad_token_id))
    trainer.remove_callback(PrinterCallback)
    return trainer


def methods(model, rows, batch: int, workdir: str) -> dict[str, Callable[[], Any]]:
    """One callable per method, each scoring ``rows`` once with ``model``."""
    plain = plain_trainer(model, batch, f"{workdir}/plain")
    loss_only = plain_trainer(model, batch, f"{workdir}/loss_only", prediction_loss_only=True)
    sorted_ = C.make_trainer(model, [], f"{workdir}/scoring", per_device_eval_batch_size=batch, use_cpu=True)
    unsorted = C.make_trainer(model, [], f"{workdir}/unsorted", per_device_eval_batch_size=batch, use_cpu=True,
                              continual_eval_sort_by_length=False)
    all_logits = C.make_trainer(model, [], f"{workdir}/all_logits", per_device_eval_batch_size=batch, use_cpu=True)

    def scoring_all_logits():
        import clm_hf.trainer as module

        original, module.first_scored_logit = module.first_scored_logit, lambda labels, seq2seq: 0
        try:
            return all_logits.evaluate_task(rows)
        finally:
            module.first_scored_logit = original

    return {
        "scoring_all_logits": scoring_all_logits,
        "trainer_evaluate": lambda: plain.evaluate(rows),
        "trainer_evaluate_loss_only": lambda: loss_only.evaluate(rows),
        "scoring": lambda: sorted_.evaluate_task(rows),
        "scoring_unsorted": lambda: unsorted.evaluate_task(rows),
    }


def positions_computed(rows, batch: int) -> dict[str, int]:
    """Input positions the forward passes compute, pads included, in the dataset's order and sorted."""
    from clm_hf.evaluation import length_sorted_order

    lengths = [len(r) for r in rows["input_ids"]]

    def padded(order: list[int]) -> int:
        return sum(max(lengths[i] for i in order[s : s + batch]) * len(order[s : s + batch])
                   for s in range(0, len(order), batch))

    return {"unsorted": padded(list(range(len(lengths)))), "sorted": padded(length_sorted_order(rows))}


def side_by_side(size: str, options: argparse.Namespace) -> dict[str, Any]:
    """Every method on the same rows, interleaved and rotated, ``options.repeats`` times."""
    model = C.build_model(size).eval()
    if options.vocab:
        model.resize_token_embeddings(options.vocab)
    rows = eval_rows(options.rows, options.min_len, options.max_len)
    tokens = sum(len(r) for r in rows["input_ids"])
    with tempfile.TemporaryDirectory() as workdir:
        runs = methods(model, rows, options.batch, workdir)
        for fn in runs.values():  # warm-up: first-call costs (allocator, dataloader setup) out of the figures
            fn()
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for repeat in range(options.repeats):
            order = METHODS[repeat % len(METHODS):] + METHODS[: repeat % len(METHODS)]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    report: dict[str, Any] = {"model": size, "vocab": model.get_output_embeddings().weight.shape[0], "rows": len(rows), "batch": options.batch, "tokens": tokens,
                              "positions_computed": positions_computed(rows, options.batch),
                              "row_lengths": [min(map(len, rows["input_ids"])), max(map(len, rows["input_ids"]))],
                              "load_avg": C.load_average(), "seconds": times}
    for name in METHODS:
        report[f"{name}_tokens_per_s"] = round(tokens / C.median(times[name]), 1)
        ratios = [base / t for base, t in zip(times["trainer_evaluate"], times[name])]
        report[f"{name}_speed_vs_trainer_evaluate"] = round(C.median(ratios), 3)
        report[f"{name}_speed_vs_trainer_evaluate_iqr"] = [round(C.quantile(ratios, 0.25), 3),
                                                           round(C.quantile(ratios, 0.75), 3)]
    return report


def stream(options: argparse.Namespace) -> dict[str, Any]:
    """A ``--stream-tasks`` stream on the tiny model: time in continual evaluation against training."""
    from clm_hf.tasks import make_task

    num_tasks = options.stream_tasks
    model = C.build_model("tiny")
    with tempfile.TemporaryDirectory() as workdir:
        trainer = C.make_trainer(model, [], f"{workdir}/stream", per_device_eval_batch_size=options.batch,
                                 use_cpu=True, eval_before_training=True)
        spent = {"evaluation": 0.0, "calls": 0}
        evaluate_tasks = trainer.evaluate_tasks

        def timed_evaluate_tasks():
            start = time.perf_counter()
            try:
                return evaluate_tasks()
            finally:
                spent["evaluation"] += time.perf_counter() - start
                spent["calls"] += 1

        trainer.evaluate_tasks = timed_evaluate_tasks
        names = [C.TASK_CYCLE[i % len(C.TASK_CYCLE)] for i in range(num_tasks)]
        stream_rows = {f"{name}-{i}": {"train": make_task(name, options.stream_train_rows, seed=i, min_len=options.min_len,
                                                          max_len=options.max_len),
                                       "eval": make_task(name, options.stream_eval_rows, seed=100 + i,
                                                         min_len=options.min_len, max_len=options.max_len)}
                       for i, name in enumerate(names)}
        start = time.perf_counter()
        trainer.fit(stream_rows)
        total = time.perf_counter() - start
        scored = trainer.results.matrix("loss")
        # The same rows through Trainer.evaluate, once per (row of the matrix, task): T * (T + 1) calls.
        # The same eval sets through Trainer.evaluate and the trainer's scoring, side by side on the
        # final model (3 alternations per set): the ratio scales the stream's measured evaluation time.
        plain = plain_trainer(model, options.batch, f"{workdir}/plain")
        per_set = {"trainer_evaluate": [], "scoring": []}
        for rows in trainer._eval_sets.values():
            plain.evaluate(rows), trainer.evaluate_task(rows)  # warm-up
            for _ in range(3):
                for name, fn in (("trainer_evaluate", plain.evaluate), ("scoring", trainer.evaluate_task)):
                    start = time.perf_counter()
                    fn(rows)
                    per_set[name].append(time.perf_counter() - start)
    del scored
    calls = spent["calls"] * num_tasks  # every registered task at each evaluation (before training, after each task)
    ratio = C.median([a / b for a, b in zip(per_set["trainer_evaluate"], per_set["scoring"])])
    return {
        "tasks": num_tasks, "train_rows_per_task": options.stream_train_rows, "eval_rows_per_task": options.stream_eval_rows,
        "evaluations": spent["calls"], "task_scorings": calls, "total_s": round(total, 2),
        "evaluation_s": round(spent["evaluation"], 2), "training_and_rest_s": round(total - spent["evaluation"], 2),
        "evaluation_share": round(spent["evaluation"] / total, 3),
        "trainer_evaluate_over_scoring": round(ratio, 3),
        "trainer_evaluate_same_calls_s": round(spent["evaluation"] * ratio, 2),
        "load_avg": C.load_average(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,medium")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="per_device_eval_batch_size (TrainingArguments' default)")
    parser.add_argument("--min-len", type=int, default=4, help="fewest answer letters of a row")
    parser.add_argument("--max-len", type=int, default=60, help="most answer letters (rows of 2 * len + 4 tokens)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=0, help="resize the embeddings to this many tokens (0: as built)")
    parser.add_argument("--stream-tasks", type=int, default=0, help="also time a stream of this many tasks (0: no)")
    parser.add_argument("--stream-train-rows", type=int, default=32, help="at least 16 (one training batch)")
    parser.add_argument("--stream-eval-rows", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny model, 32 rows, 2 repeats, a 3-task stream")
    parser.add_argument("--output", default=None)
    options = parser.parse_args(argv)
    if options.quick:
        options.models, options.rows, options.repeats, options.stream_tasks = "tiny", 32, 2, 3
        options.stream_train_rows, options.stream_eval_rows = 16, 16
    C.quiet()
    report: dict[str, Any] = {"machine": C.machine(), "options": vars(options), "side_by_side": []}
    for size in options.models.split(","):
        result = side_by_side(size, options)
        report["side_by_side"].append(result)
        print(f"{size}: tokens/s " + ", ".join(f"{m} {result[f'{m}_tokens_per_s']}" for m in METHODS)
              + "; speed vs Trainer.evaluate " + ", ".join(f"{m} {result[f'{m}_speed_vs_trainer_evaluate']}"
                                                          for m in METHODS[1:]), flush=True)
    if options.stream_tasks:
        report["stream"] = stream(options)
        print(f"stream: {report['stream']}", flush=True)
    if options.output:
        C.save_json(report, options.output)
    return report


if __name__ == "__main__":
    main()
