"""Each strategy forgets measurably less than plain fine-tuning on the synthetic suite.

The runs are the demo's (`clm_hf.demo.DEMO_RECIPE`: tiny GPT-2, copy -> shift -> rotate, 256
held-out rows per task) on seeds 0, 1 and 2 (seed 0 only where the bound holds on every seed by
far, see ``ONE_SEED``; a seed sets the initial weights, the rows and the data
order), so the figures are those of `benchmarks/quality.py` and `docs/strategies.md`. Training a
tiny model is not bit-reproducible across CPU kernels and thread counts, so every assertion is on
the mean over the seeds, with a margin set well inside the spread measured under
`ATEN_CPU_CAPABILITY=default|avx2|avx512` and 1 or 2 threads (docs/strategies.md lists the figures;
`CLM_HF_TEST_THREADS=2` runs this file with 2 threads per run; `CLM_HF_QUALITY_JSON=path` keeps
the runs and the table of `benchmarks/quality.py`).

The runs go to two worker processes of one thread each (the CI machine has 2 cores).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SEEDS = (0, 1, 2)
# One seed where the assertion holds on every single run by a wide margin, to keep the suite's time:
# PackNet and PNN isolate old tasks exactly (BWT 0.000 on all 9 runs measured), A-GEM's per-run gain
# was 0.000 or more on all 9 against a bound of -0.03, replay's lowest per-run gain 0.729 and LwF's
# 0.871 against a bound of 0.5 (docs/strategies.md, the (min..max) of the gain column; the runs are in
# benchmarks/results/quality_table_2026-12-05.json). Seed 0 alone there: replay 0.73-0.81, LwF 0.87-0.89.
ONE_SEED = ("agem", "packnet", "pnn", "replay", "lwf")


def seeds_of(name: str) -> tuple[int, ...]:
    return SEEDS[:1] if name in ONE_SEED else SEEDS

# Minimum mean BWT gain (exact match, absolute) over plain fine-tuning of the same seeds. Measured
# means and per-seed ranges are in docs/strategies.md; each margin sits well below the lowest mean
# measured under any kernel / thread setting (given after each entry).
MIN_BWT_GAIN = {
    "replay": 0.5,  # lowest 0.82
    "ewc": 0.1,  # lowest 0.24 (0.18 with the hooked Fisher): it blocks the new task on 2 seeds of 3 and does
    # nothing on the third; seed 0 gains 0.43-0.46 under every kernel / thread setting measured
    "lwf": 0.5,  # lowest 0.89 at its default alpha 5, by learning almost nothing after the first task (docs/strategies.md)
    "gem": 0.3,  # lowest 0.53 with the hooked references of "auto" (0.61 with the vmapped ones, 0.59 with the whole memory)
    "agem_margin": 0.2,  # AGEM(margin=0.5): lowest 0.46
    "packnet": 0.5,  # BWT 0 exactly
    "pnn": 0.5,  # BWT 0 exactly
}
# A-GEM at the paper's rule (margin 0, the default) barely acts on these fully conflicting tasks: mean
# BWT gain 0.018-0.092 per setting measured (0.000-0.240 per seed). The test checks what it
# reaches, that it never forgets more than plain fine-tuning, with room for the spread.
NOT_WORSE_THAN_PLAIN = {"agem": -0.03}
# PackNet and PNN isolate each task's parameters: old tasks' scores cannot move at all.
EXACT_ISOLATION = ("packnet", "pnn")


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality", BENCHMARKS / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("quality", module)  # so worker processes can unpickle its functions
    spec.loader.exec_module(module)
    return sys.modules["quality"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{(name, seed): summary}`` for plain fine-tuning and every strategy, on two processes."""
    quality = _quality_module()
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # spawned workers import `quality` from here
    threads = int(os.environ.get("CLM_HF_TEST_THREADS", "1"))
    out = tmp_path_factory.mktemp("forgetting")
    # The slowest runs first, so the two workers finish together.
    names = ["gem", "agem", "agem_margin", "packnet", "pnn", "replay", "lwf", "ewc", "plain"]
    # Two workers of one thread fill the 2 cores; with 2 threads a run, one worker (more would
    # oversubscribe the cores, and OpenMP's spin-waiting makes that several times slower).
    workers = max(1, 2 // threads)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {(n, s): pool.submit(quality.run_one, n, out / n, s, threads=threads) for n in names for s in seeds_of(n)}
        results = {key: future.result() for key, future in futures.items()}
    if os.environ.get("CLM_HF_QUALITY_JSON"):  # keep the figures of this kernel / thread setting
        import json

        import torch

        setting = {"ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "(auto)"),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads}
        rows = quality.aggregate(list(results.values()))
        Path(os.environ["CLM_HF_QUALITY_JSON"]).write_text(json.dumps(
            {"setting": setting, "runs": list(results.values()), "table": rows}, indent=1))
    return results


def _mean(runs, name, key, seeds=SEEDS):
    return statistics.mean(runs[(name, s)][key] for s in seeds)


def test_plain_fine_tuning_learns_every_task_then_forgets_it(runs):
    for seed in SEEDS:
        diagonal = runs[("plain", seed)]["diagonal"]
        assert min(diagonal) >= 0.5, f"seed {seed}: a task was not learned: {diagonal}"
    assert _mean(runs, "plain", "bwt") < -0.6, [runs[("plain", s)]["bwt"] for s in SEEDS]


def _bwt_gain(runs, name):
    """Mean BWT gain over plain fine-tuning, and (strategy, plain) BWT per seed for the message."""
    seeds = seeds_of(name)
    per_seed = [(round(runs[(name, s)]["bwt"], 3), round(runs[("plain", s)]["bwt"], 3)) for s in seeds]
    return _mean(runs, name, "bwt", seeds) - _mean(runs, "plain", "bwt", seeds), per_seed


@pytest.mark.parametrize("name", list(NOT_WORSE_THAN_PLAIN))
def test_strategy_forgets_no_more_than_plain_fine_tuning(name, runs):
    gain, per_seed = _bwt_gain(runs, name)
    assert gain >= NOT_WORSE_THAN_PLAIN[name], f"{name}: mean BWT gain {gain:.3f}; (strategy, plain) per seed {per_seed}"


@pytest.mark.parametrize("name", list(MIN_BWT_GAIN))
def test_strategy_forgets_less_than_plain_fine_tuning(name, runs):
    gain, per_seed = _bwt_gain(runs, name)
    assert gain >= MIN_BWT_GAIN[name], f"{name}: mean BWT gain {gain:.3f}; (strategy, plain) per seed {per_seed}"
    seeds = seeds_of(name)
    assert _mean(runs, name, "forgetting", seeds) < _mean(runs, "plain", "forgetting", seeds)
    if name in EXACT_ISOLATION:
        assert all(runs[(name, s)]["bwt"] == 0.0 for s in seeds), per_seed
