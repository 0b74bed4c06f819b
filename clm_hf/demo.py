"""The one-command demo: several strategies on the same synthetic stream with a tiny GPT-2.

Each strategy trains the same freshly built model (same seed) on the same task sequence; the
demo prints each accuracy matrix, a comparison table (ACC, BWT, FWT, forgetting), and writes
``results.json`` per strategy plus plots into the run folder.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from .results import ContinualResults, comparison_table

logger = logging.getLogger(__name__)

# Settings measured on 2 CPU cores: the tiny model learns each task (exact match >= 0.7) in a few
# hundred steps, and plain fine-tuning then forgets most of it, which is what the demo must show.
DEMO_RECIPE: dict[str, Any] = {
    "model": {"arch": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "tasks": {"suite": "synthetic", "names": ["copy", "reverse", "sort"], "num_train": 512, "num_eval": 64,
              "min_len": 2, "max_len": 4, "seed": 0},
    "training": {
        "num_train_epochs": 4, "learning_rate": 3e-3, "per_device_train_batch_size": 16,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "logging_steps": 50, "save_strategy": "no", "report_to": "none", "seed": 0,
        "disable_tqdm": False, "dataloader_pin_memory": False,
    },
}

DEMO_STRATEGIES: dict[str, list[dict[str, Any]]] = {
    "plain": [],
    "replay": [{"name": "replay", "buffer_size": 256, "replay_ratio": 1.0}],
    "ewc": [{"name": "ewc", "ewc_lambda": 3000.0}],
}


def demo_recipe(strategy: str, output_dir: str | Path, *, quick: bool = False) -> dict[str, Any]:
    """The demo's recipe for one strategy name (``plain`` or any registered strategy)."""
    recipe = copy.deepcopy(DEMO_RECIPE)
    if strategy == "joint":
        recipe["strategies"] = []
    elif strategy in DEMO_STRATEGIES:
        recipe["strategies"] = copy.deepcopy(DEMO_STRATEGIES[strategy])
    else:
        recipe["strategies"] = [{"name": strategy}]
    recipe["training"]["output_dir"] = str(Path(output_dir) / strategy)
    if quick:  # a smoke-sized run for tests
        recipe["tasks"].update(num_train=32, num_eval=16)
        recipe["training"]["num_train_epochs"] = 1
    return recipe


def run_demo(
    strategies: Sequence[str] = ("plain", "replay", "ewc"),
    output_dir: str | Path = "runs/demo",
    *,
    quick: bool = False,
    print_fn=print,
) -> dict[str, ContinualResults]:
    """Run the demo and return ``{strategy: results}``.

    Args:
        strategies: Names to compare; ``plain`` is sequential fine-tuning with no strategy and
            ``joint`` trains all tasks at once (the multitask upper bound).
        output_dir: Run folder; each strategy gets a sub-folder.
        quick (`bool`): Tiny sizes, for a smoke test.
        print_fn: Where the tables go.

    Example:

    >>> results = run_demo(["plain", "ewc"], "runs/demo", quick=True, print_fn=lambda *a: None)  # doctest: +SKIP
    """
    import torch

    from .plots import write_report
    from .recipe import run_recipe

    # A model this small gains nothing from intra-op threads, and on a busy machine OpenMP's
    # spin-waiting threads slow it down many times over: one thread keeps the demo at ~1 minute.
    torch.set_num_threads(1)
    output_dir = Path(output_dir)
    all_results: dict[str, ContinualResults] = {}
    for name in strategies:
        start = time.perf_counter()
        results, _ = run_recipe(demo_recipe(name, output_dir, quick=quick), joint=name == "joint")
        results.metadata["wall_time_s"] = round(time.perf_counter() - start, 1)
        results.save(output_dir / name / "results.json")
        all_results[name] = results
        print_fn(f"\n== {name} ({results.metadata['wall_time_s']} s) ==")
        print_fn(results.format_table())
    print_fn("\n== comparison (exact match) ==")
    print_fn(comparison_table(all_results))
    written = write_report(output_dir)
    print_fn(f"\nResults and plots in {output_dir}/: " + ", ".join(sorted({p.name for p in written})))
    return all_results
