"""Quality table on the synthetic suite: every strategy, plain fine-tuning and joint training.

Runs the demo recipe (`clm_hf.demo.DEMO_RECIPE`: tiny GPT-2, copy -> reverse -> sort, fixed seeds)
once per strategy and prints a Markdown table of ACC, BWT, FWT and forgetting (exact match), with
each run's wall time as a ratio to plain fine-tuning measured in the same invocation.

    python benchmarks/quality.py                       # all strategies
    python benchmarks/quality.py --strategies plain,ewc --output-dir runs/quality
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from clm_hf.demo import demo_recipe
from clm_hf.recipe import run_recipe
from clm_hf.strategies import STRATEGY_REGISTRY

DEFAULT = ["plain", "joint", *sorted(n for n in STRATEGY_REGISTRY if not n.endswith("_test"))]


def run(names: list[str], output_dir: Path, quick: bool = False) -> list[dict]:
    rows = []
    for name in names:
        start = time.perf_counter()
        recipe = demo_recipe(name, output_dir, quick=quick)
        recipe["training"]["disable_tqdm"] = True
        results, _ = run_recipe(recipe, joint=name == "joint")
        seconds = time.perf_counter() - start
        results.save(output_dir / name / "results.json")
        rows.append({"name": name, "seconds": seconds, **results.summary()})
    plain = next((r["seconds"] for r in rows if r["name"] == "plain"), None)
    for row in rows:
        row["time_ratio"] = row["seconds"] / plain if plain else None
    return rows


def to_markdown(rows: list[dict]) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    lines = ["| run | ACC | BWT | FWT | forgetting | wall time vs plain |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = "n/a" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}x"
        lines.append(f"| {r['name']} | {fmt(r['acc'])} | {fmt(r['bwt'])} | {fmt(r['fwt'])} | {fmt(r['forgetting'])} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(DEFAULT))
    parser.add_argument("--output-dir", default="runs/quality")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    rows = run([s for s in args.strategies.split(",") if s], Path(args.output_dir), quick=args.quick)
    print(to_markdown(rows))
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "quality.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
