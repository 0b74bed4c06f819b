"""Memory: the state each strategy keeps, per trainable parameter, as tasks accumulate; and peak RSS.

Each configuration runs in its own subprocess (so peak RSS values do not mix), trains a stream of
``--tasks`` short tasks on the same model, and after every task records:

- ``state_bytes``: bytes of every tensor the strategy object holds (walked through its attributes,
  storages counted once, the model's own parameters and buffers excluded), between tasks, and the
  largest value seen at the end of any ``train()`` of the task (``in_task_bytes``: a live LwF
  teacher, PackNet's held values, GEM's flat gradient buffers, ...);
- ``rows``/``row_bytes``: rows of ``datasets.Dataset`` it holds (replay buffer, GEM memories), with
  their Arrow size;
- the model's total and trainable parameter counts (PNN grows the model itself);
- ``peak_rss``: the process's peak resident set size so far (``resource.getrusage``).

Bytes per parameter divide by the trainable parameters of the model before any strategy touched it
(PackNet's figure also by its prunable parameters).

    OMP_NUM_THREADS=1 python benchmarks/memory.py                 # medium model, 4 tasks, all configs
    OMP_NUM_THREADS=1 python benchmarks/memory.py --configs plain,ewc,packnet --tasks 6
    OMP_NUM_THREADS=1 python benchmarks/memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# name -> strategy specs (as in recipes). Registered strategies without an entry run with defaults.
CONFIGS: dict[str, list[dict[str, Any]]] = {
    "plain": [],
    "replay": [{"name": "replay"}],
    "ewc": [{"name": "ewc"}],
    "ewc_separate": [{"name": "ewc", "mode": "separate"}],
    "lwf": [{"name": "lwf"}],
    "lwf_cached": [{"name": "lwf", "cache_teacher": True}],
    "packnet": [{"name": "packnet"}],
    "pnn": [{"name": "pnn"}],
    "pnn_lora": [{"name": "pnn", "mode": "lora"}],
    "gem": [{"name": "gem"}],
    "agem": [{"name": "agem"}],
}
TARGETS = {"ewc": ("state B/param", 8.0), "packnet": ("state B/prunable param", 1.0)}


# --- accounting ------------------------------------------------------------------------------------
WORK_BUFFERS = ("_scratch",)


def held_memory(strategy, model) -> dict[str, int]:
    """Tensor bytes and dataset rows/bytes reachable from ``strategy`` (not the model's own tensors)."""
    import torch
    from datasets import Dataset
    from torch import nn

    model_storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen_storages: set[int] = set()
    seen_objects: set[int] = set()
    totals = {"tensor_bytes": 0, "rows": 0, "row_bytes": 0, "work_bytes": 0}

    def walk(obj: Any, depth: int, key_name: str = "tensor_bytes") -> None:
        if depth > 12 or id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key and key not in model_storages and key not in seen_storages:
                seen_storages.add(key)
                totals[key_name] += storage.nbytes()
            return
        if isinstance(obj, Dataset):
            totals["rows"] += len(obj)
            totals["row_bytes"] += obj.data.nbytes
            return
        if isinstance(obj, nn.Module):
            return  # the model (or a part of it): not strategy state
        if isinstance(obj, dict):
            for value in obj.values():
                walk(value, depth + 1, key_name)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                walk(value, depth + 1, key_name)
        elif type(obj).__module__.startswith("clm_hf") and hasattr(obj, "__dict__"):
            for name, value in vars(obj).items():
                if name not in ("trainer", "config"):
                    # A reused work buffer (EWC's CPU scratch for edit_gradients: one fp32 tensor the size of
                    # the largest parameter, not per parameter) is counted apart from the state.
                    walk(value, depth + 1, "work_bytes" if name in WORK_BUFFERS else key_name)

    walk(strategy, 0)
    return totals


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- one configuration, in its own process ------------------------------------------------------------
def worker(config: str, size: str, tasks: int, rows_per_task: int, seq_len: int, batch_size: int) -> dict[str, Any]:
    C.quiet()
    from transformers import TrainerCallback

    from clm_hf.strategies import strategies_from_specs

    C.registered_strategies()  # import every strategy module
    specs = CONFIGS.get(config, [{"name": config}])
    strategies = strategies_from_specs(specs)
    model = C.build_model(size)
    base_trainable = C.count_parameters(model, trainable_only=True)
    base_total = C.count_parameters(model)
    record: dict[str, Any] = {"config": config, "specs": specs, "model": size, "base_trainable": base_trainable,
                              "base_total": base_total, "rss_start": _rss_bytes(), "tasks": []}
    stream = C.task_rows(tasks, rows_per_task, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = C.make_trainer(model, strategies, tmp, batch_size=batch_size)

        class InTask(TrainerCallback):
            largest = 0

            def on_train_end(self, args, state, control, **kwargs):
                held = sum(held_memory(s, trainer.model)["tensor_bytes"] for s in trainer.strategies)
                InTask.largest = max(InTask.largest, held)

        trainer.add_callback(InTask())
        for index, (task_id, rows) in enumerate(stream):
            InTask.largest = 0
            trainer.train_task(rows, task_id=task_id)
            held = [held_memory(s, trainer.model) for s in trainer.strategies]
            entry = {
                "task": index + 1,
                "state_bytes": sum(h["tensor_bytes"] for h in held),
                "in_task_bytes": InTask.largest,
                "rows": sum(h["rows"] for h in held),
                "row_bytes": sum(h["row_bytes"] for h in held),
                "total_parameters": C.count_parameters(trainer.model),
                "trainable_parameters": C.count_parameters(trainer.model, trainable_only=True),
                "rss": _rss_bytes(),
                "peak_rss": _peak_rss_bytes(),
            }
            packnet = next((s for s in trainer.strategies if s.name == "packnet"), None)
            if packnet is not None:
                entry["prunable_parameters"] = sum(own.numel() for own in packnet.ownership.values())
            record["tasks"].append(entry)
    return record


def run_config(config: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", config, "--models", args.models.split(",")[0], "--tasks", str(args.tasks),
               "--rows-per-task", str(args.rows_per_task), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(C.ROOT))
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {config} failed:\n{done.stderr[-4000:]}")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def summarize(record: dict[str, Any], plain: dict[str, Any] | None) -> dict[str, Any]:
    base = record["base_trainable"]
    tasks = record["tasks"]
    per_param = [t["state_bytes"] / base for t in tasks]
    out = {
        "config": record["config"], "model": record["model"], "base_trainable": base,
        "state_B_per_param": per_param, "in_task_B_per_param": [t["in_task_bytes"] / base for t in tasks],
        "rows": [t["rows"] for t in tasks], "row_bytes": [t["row_bytes"] for t in tasks],
        "total_parameters": [t["total_parameters"] for t in tasks],
        "parameters_vs_base": [t["total_parameters"] / record["base_total"] for t in tasks],
        "peak_rss_MiB": tasks[-1]["peak_rss"] / 2**20,
        "peak_rss_vs_plain_MiB": None if plain is None else (tasks[-1]["peak_rss"] - plain["tasks"][-1]["peak_rss"]) / 2**20,
    }
    if "prunable_parameters" in tasks[-1]:
        out["state_B_per_prunable"] = [t["state_bytes"] / t["prunable_parameters"] for t in tasks]
        out["in_task_B_per_prunable"] = [t["in_task_bytes"] / t["prunable_parameters"] for t in tasks]
    return out


def to_markdown(rows: list[dict[str, Any]]) -> str:
    def series(values, fmt="{:.2f}"):
        return " / ".join(fmt.format(v) for v in values)

    lines = ["| config | state B/param after task 1 / 2 / ... | largest in-task B/param | rows held | params vs base model | "
             "peak RSS MiB | vs plain MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        extra = ""
        if "state_B_per_prunable" in r:
            extra = f" (per prunable: {series(r['state_B_per_prunable'])}; in task {max(r['in_task_B_per_prunable']):.2f})"
        vs = "" if r["peak_rss_vs_plain_MiB"] is None else f"{r['peak_rss_vs_plain_MiB']:+.0f}"
        lines.append(f"| {r['config']} | {series(r['state_B_per_param'])}{extra} | {max(r['in_task_B_per_param']):.2f} | "
                     f"{series(r['rows'], '{:d}')} | {series(r['parameters_vs_base'])} | {r['peak_rss_MiB']:.0f} | {vs} |")
    return "\n".join(lines)


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in rows:
        if r["config"] == "ewc":
            worst = max(r["state_B_per_param"])
            notes.append(f"EWC online: {worst:.2f} B/param at most over {len(r['state_B_per_param'])} tasks "
                         f"(target <= 8: {'met' if worst <= 8 + 1e-9 else 'MISSED'})")
        if "state_B_per_prunable" in r:
            worst = max(r["state_B_per_prunable"])
            notes.append(f"PackNet: {worst:.2f} B per prunable param between tasks (target <= 1: "
                         f"{'met' if worst <= 1 + 1e-9 else 'MISSED'}); {max(r['in_task_B_per_prunable']):.2f} while a task trains")
    return notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="all", help="comma list of configs (plain is always run first)")
    parser.add_argument("--models", default="medium")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rows-per-task", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default="benchmarks/results/memory.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true",
                        help="run every config in this process (a smoke test: peak RSS values then mix)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        record = worker(args.worker, args.models, args.tasks, args.rows_per_task, args.seq_len, args.batch_size)
        print(json.dumps(record))
        return record
    if args.quick:
        args.models, args.tasks, args.rows_per_task, args.seq_len, args.batch_size = "tiny", 2, 8, 2, 4
        if args.configs == "all":
            args.configs = "plain,ewc,packnet"
    names = [*CONFIGS, *(n for n in C.registered_strategies() if n not in CONFIGS)] if args.configs == "all" else args.configs.split(",")
    names = ["plain", *[n for n in names if n != "plain"]]
    report: dict[str, Any] = {"machine": C.machine(), "settings": vars(args).copy(), "records": [], "rows": []}
    plain = None
    for name in names:
        if args.in_process:
            record = worker(name, args.models.split(",")[0], args.tasks, args.rows_per_task, args.seq_len, args.batch_size)
        else:
            record = run_config(name, args)
        plain = plain or record
        report["records"].append(record)
        row = summarize(record, plain)
        row["load_avg"] = C.load_average()
        report["rows"].append(row)
        print(f"{name}: state B/param {[round(x, 2) for x in row['state_B_per_param']]}, peak RSS {row['peak_rss_MiB']:.0f} MiB",
              flush=True)
    report["targets"] = check_targets(report["rows"])
    print()
    print(to_markdown(report["rows"]))
    print("\n".join(report["targets"]))
    C.save_json(report, args.output)
    return report


if __name__ == "__main__":
    main()
