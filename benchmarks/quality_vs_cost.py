"""Quality for the cost: ACC/BWT of every strategy next to its step-time ratio, in one table and one plot.

Quality comes from ``benchmarks/quality.py`` (the demo recipe: tiny GPT-2, copy -> shift -> rotate,
with plain fine-tuning and joint training in the same invocation); cost from
``benchmarks/step_overhead.py`` (time per optimizer step as a ratio to plain fine-tuning, measured
alternately in one process; the ``tiny`` model is the demo's size). The whole-run wall time ratio
of ``quality.py`` (which also counts between-task work: Fisher, pruning and retraining, caches,
replayed rows) is shown alongside.

    OMP_NUM_THREADS=1 python benchmarks/quality_vs_cost.py \
        --quality runs/quality/quality.json --steps benchmarks/results/step_overhead.json
    OMP_NUM_THREADS=1 python benchmarks/quality_vs_cost.py --run-quality   # runs quality.py first
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402



def combine(quality: list[dict[str, Any]], steps: dict[str, Any], model: str) -> list[dict[str, Any]]:
    by_name = {r["strategy"]: r for r in steps.get("rows", []) if r["model"] == model}
    rows = []
    for q in quality:
        name = q["name"]
        step = 1.0 if name == "plain" else (by_name[name]["figure"] if name in by_name else None)
        rows.append({"name": name, "acc": q.get("acc"), "bwt": q.get("bwt"), "forgetting": q.get("forgetting"),
                     "step_ratio": step, "run_time_ratio": q.get("time_ratio")})
    return rows


def to_markdown(rows: list[dict[str, Any]], model: str) -> str:
    def fmt(value, spec=".3f", suffix=""):
        return "n/a" if value is None else f"{value:{spec}}{suffix}"

    lines = [f"| run | ACC | BWT | forgetting | time per step vs plain ({model} model) | whole run wall time vs plain |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        step = "(all tasks at once)" if r["name"] == "joint" else fmt(r["step_ratio"], ".2f", "x")
        lines.append(f"| {r['name']} | {fmt(r['acc'])} | {fmt(r['bwt'])} | {fmt(r['forgetting'])} | {step} | "
                     f"{fmt(r['run_time_ratio'], '.2f', 'x')} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, model: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "acc", "ACC (exact match, higher is better)"),
                           (axes[1], "bwt", "BWT (higher is better, 0 = no forgetting)")):
        for r in rows:
            if r["name"] == "joint" and r[key] is not None:
                if key == "bwt":  # joint's BWT is 0 by construction: not a bound worth drawing
                    continue
                ax.axhline(r[key], ls="--", color="grey", lw=1)
                ax.annotate("joint (upper bound)", (1.0, r[key]), textcoords="offset points", xytext=(2, 3), fontsize=8, color="grey")
                continue
            if r["step_ratio"] is None or r[key] is None:
                continue
            ax.scatter(r["step_ratio"], r[key], s=36, color="black" if r["name"] == "plain" else None)
            ax.annotate(r["name"], (r["step_ratio"], r[key]), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set_xlabel(f"time per optimizer step / plain fine-tuning ({model} GPT-2)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Quality for the cost (demo recipe: copy -> shift -> rotate)")
    return C.save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", default="runs/quality/quality.json", help="quality.json written by benchmarks/quality.py")
    parser.add_argument("--steps", default="benchmarks/results/step_overhead.json", help="JSON written by step_overhead.py")
    parser.add_argument("--model", default="tiny", help="which step_overhead model stands for the demo's cost")
    parser.add_argument("--run-quality", action="store_true", help="run benchmarks/quality.py (every strategy) first")
    parser.add_argument("--quality-dir", default="runs/quality")
    parser.add_argument("--plot", default="docs/quality_vs_cost.png")
    parser.add_argument("--output", default="benchmarks/results/quality_vs_cost.json")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (with --run-quality)")
    args = parser.parse_args(argv)
    if args.run_quality:
        import quality

        names = ["plain", "joint", *C.registered_strategies()]
        C.quiet()
        table = quality.aggregate(quality.run(names, Path(args.quality_dir), quick=args.quick))
        Path(args.quality_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.quality_dir) / "quality.json").write_text(json.dumps({"table": table}, indent=1))
        args.quality = str(Path(args.quality_dir) / "quality.json")
    quality_rows = json.loads(Path(args.quality).read_text())
    if isinstance(quality_rows, dict):  # quality.py's output: seed means under "table"
        quality_rows = quality_rows["table"]
    steps = json.loads(Path(args.steps).read_text()) if Path(args.steps).is_file() else {"rows": []}
    rows = combine(quality_rows, steps, args.model)
    print(to_markdown(rows, args.model))
    print(f"plot: {plot(rows, Path(args.plot), args.model)}")
    C.save_json({"rows": rows, "machine": C.machine(), "quality": args.quality, "steps": args.steps}, args.output)
    return rows


if __name__ == "__main__":
    main()
