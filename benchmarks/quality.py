"""Quality table on the synthetic suite: every strategy, plain fine-tuning and joint training.

Runs the demo recipe (`clm_hf.demo.DEMO_RECIPE`: tiny GPT-2, copy -> shift -> rotate) once per
strategy and seed, and prints a Markdown table of ACC, BWT, FWT and forgetting (exact match) as the
mean over the seeds with the spread (min..max) next to it, and each strategy's BWT gain over plain
fine-tuning of the same seed. A seed changes the model's initialisation, the task rows and the
data order together. Wall times are ratios to plain fine-tuning measured in the same invocation.

    python benchmarks/quality.py                                   # all strategies, seeds 0,1,2
    python benchmarks/quality.py --strategies plain,ewc --seeds 0 --output-dir runs/quality

Training a tiny model is not bit-reproducible across CPU kernels and thread counts, so the figures
move a little from machine to machine; `tests/test_forgetting.py` asserts margins set well inside
the spread this script measured under `ATEN_CPU_CAPABILITY=default|avx2|avx512` and 1 or 2 threads
(docs/strategies.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from clm_hf.demo import demo_recipe
from clm_hf.recipe import run_recipe
from clm_hf.strategies import STRATEGY_REGISTRY

DEFAULT = ["plain", "joint", *sorted(n for n in STRATEGY_REGISTRY if not n.endswith("_test"))]
QUALITY_SEEDS = (0, 1, 2)
QUALITY_NUM_EVAL = 256  # one row is 0.4 percentage points of exact match


def seeded_recipe(name: str, output_dir: str | Path, seed: int, *, num_eval: int = QUALITY_NUM_EVAL,
                  quick: bool = False) -> dict[str, Any]:
    """The demo recipe for ``name`` with every seed (model, rows, data order) set to ``seed``."""
    recipe = demo_recipe(name, Path(output_dir) / f"seed{seed}", quick=quick, seed=seed)
    if not quick:
        recipe["tasks"]["num_eval"] = num_eval
    recipe["training"].update(disable_tqdm=True, save_continual_state=False)
    return recipe


def run_one(name: str, output_dir: str | Path, seed: int, threads: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train one strategy on one seed; its summary plus the matrix diagonal and wall time.

    ``threads`` sets torch's intra-op threads first (for worker processes).
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    logging.disable(logging.WARNING)
    try:
        start = time.perf_counter()
        results, _ = run_recipe(seeded_recipe(name, output_dir, seed, **kwargs), joint=name == "joint")
        seconds = time.perf_counter() - start
    finally:
        logging.disable(logging.NOTSET)
    matrix = results.matrix(results.primary_metric)
    return {"name": name, "seed": seed, "seconds": seconds, **results.summary(),
            "diagonal": [matrix[i][i] for i in range(len(matrix))], "final": list(matrix[-1])}


def run(names: list[str], output_dir: Path, seeds: tuple[int, ...] = QUALITY_SEEDS, **kwargs: Any) -> list[dict]:
    """Every (strategy, seed) run, in the order strategies x seeds."""
    return [run_one(name, output_dir, seed, **kwargs) for name in names for seed in seeds]


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and spread per strategy, and the BWT gain over plain fine-tuning of the same seed."""
    plain = {r["seed"]: r for r in runs if r["name"] == "plain"}
    rows = []
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        row: dict[str, Any] = {"name": name, "seeds": [r["seed"] for r in mine]}
        for key in ("acc", "bwt", "fwt", "forgetting"):
            values = [r[key] for r in mine if r[key] is not None]
            row[key] = statistics.mean(values) if values else None
            row[f"{key}_range"] = (min(values), max(values)) if values else None
        gains = [r["bwt"] - plain[r["seed"]]["bwt"] for r in mine if r["seed"] in plain]
        row["bwt_gain"] = statistics.mean(gains) if gains else None
        row["bwt_gain_range"] = (min(gains), max(gains)) if gains else None
        base = sum(plain[r["seed"]]["seconds"] for r in mine if r["seed"] in plain)
        row["time_ratio"] = sum(r["seconds"] for r in mine) / base if base else None
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    def fmt(row: dict, key: str) -> str:
        value, spread = row.get(key), row.get(f"{key}_range")
        if value is None:
            return "n/a"
        if spread is None or spread[0] == spread[1]:
            return f"{value:.3f}"
        return f"{value:.3f} ({spread[0]:.3f}..{spread[1]:.3f})"

    lines = ["| run | ACC | BWT | BWT gain vs plain | forgetting | FWT | wall time vs plain |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = "n/a" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}x"
        lines.append(f"| {r['name']} | {fmt(r, 'acc')} | {fmt(r, 'bwt')} | {fmt(r, 'bwt_gain')} | "
                     f"{fmt(r, 'forgetting')} | {fmt(r, 'fwt')} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(DEFAULT))
    parser.add_argument("--seeds", default=",".join(map(str, QUALITY_SEEDS)))
    parser.add_argument("--num-eval", type=int, default=QUALITY_NUM_EVAL)
    parser.add_argument("--output-dir", default="runs/quality")
    parser.add_argument("--json", default=None, help="also write the raw runs and the table here")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    args = parser.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    output_dir = Path(args.output_dir)
    runs = run([s for s in args.strategies.split(",") if s], output_dir, seeds, num_eval=args.num_eval,
               quick=args.quick)
    rows = aggregate(runs)
    print(to_markdown(rows))
    import torch

    setting = {"ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "(auto)"),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    print(setting)
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"setting": setting, "runs": runs, "table": rows}
    (output_dir / "quality.json").write_text(json.dumps(payload, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return rows


if __name__ == "__main__":
    main()
