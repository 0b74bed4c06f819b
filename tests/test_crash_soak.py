"""The crash soak: runs killed at random moments (seeded), in subprocesses, still finish identical.

Kept apart from ``test_crash_resume.py`` so that pytest-xdist, which gives each worker whole files,
runs the soak and that file's kill-point chains on different workers at the same time.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.crash_driver import differences, final_state
from tests.test_crash_resume import COMBO, OTHER_CHAINS, start_driver, wait_driver, write_recipe


SOAK = {  # strategies, optimizer steps of each task (24 rows, batch 4, replay adds 12), after_task points
    "combo": (COMBO, [6, 9, 9], lambda t: [f"buffer:{t}", f"fisher:{t}", f"after_task:{t}:lwf", f"prune:{t}",
                                          *[f"retrain:{t}:{s}" for s in range(1, 7)], f"after_task:{t}:packnet"]),
    "agem": (OTHER_CHAINS["agem"][0], [6, 6, 6], lambda t: [f"after_task:{t}:agem"]),
    "pnn": (OTHER_CHAINS["pnn"][0], [6, 6, 6], lambda t: [f"after_task:{t}:pnn"]),
}


def kill_points_in_run_order(steps: list[int], after_task, save_steps: int = 2) -> list[str]:
    """Every moment the driver can kill at, in the order a run reaches them."""
    points = []
    for task, count in enumerate(steps):
        for step in range(1, count + 1):
            points.append(f"step:{task}:{step}")
            if step % save_steps == 0 or step == count:
                points += [f"mid_ckpt:{task}:{step}", f"saved:{task}:{step}"]
        points += [*after_task(task), f"eval:{task}", f"ckpt_write:{task}", f"between:{task}"]
    return points


@pytest.mark.slow
def test_soak_ten_random_kills_per_run_still_finish_identical(tmp_path):
    """Per strategy set: one run killed at 10 moments drawn at random (seeded) among all the moments
    of a run, in run order, so each kill lands further on; and one run killed at up to 10 random
    wall-clock moments (10-90 % of an uninterrupted run's time after each start), which stops once
    the run is complete. Both must finish identical to the uninterrupted run."""
    import random

    plans = {"a": [], "b": []}
    for i, (name, (strategies, steps, after_task)) in enumerate(SOAK.items()):
        recipe = write_recipe(tmp_path / f"{name}.yaml", strategies, tmp_path / "unused")
        points = kill_points_in_run_order(steps, after_task)
        chosen = sorted(random.Random(100 + i).sample(range(len(points)), 10))
        plans["a" if i == 0 else "b"].append(
            {"recipe": str(recipe), "run_dir": str(tmp_path / f"{name}-points"), "reference": str(tmp_path / f"{name}-ref"),
             "kills": [points[j] for j in chosen], "finish": True})
        plans["b" if i == 0 else "a"].append(
            {"recipe": str(recipe), "run_dir": str(tmp_path / f"{name}-wall"), "reference": str(tmp_path / f"{name}-ref2"),
             "random_kills": 10, "seed": 200 + i, "wall_fraction": [0.1, 0.9], "finish": True})
    started = [start_driver(tmp_path, key, value) for key, value in plans.items()]
    finished = [wait_driver(s) for s in started]
    reports, logs = [f[0] for f in finished], "".join(f[1] for f in finished)
    runs = kills = identical = 0
    lines = []
    for chain in sorted((c for r in reports for c in r["chains"]), key=lambda c: c["run_dir"]):
        name = Path(chain["run_dir"]).name
        strategy_set = name.rsplit("-", 1)[0]
        killed = [k for k in chain["kills"] if k["status"] == -9]
        same = differences(final_state(tmp_path / f"{strategy_set}-ref"), final_state(chain["run_dir"])) == []
        runs += len(chain["kills"]) + 1
        kills += len(killed)
        identical += same
        where = [k["spec"] for k in killed]
        lines.append(f"  {name}: {len(killed)} kills {where}, identical={same}")
        assert same, f"{name} finished differently after kills {chain['kills']}"
        # How many of the chosen moments a run reaches before it completes depends on the machine's
        # speed (a loaded machine reaches fewer wall-clock moments); what must hold is that it was
        # really killed and still finished identical.
        assert killed and all(k["status"] in (-9, 0) for k in chain["kills"]), chain["kills"]
    sources = re.findall(r"clm-hf: resumed from (\S+) after", logs)
    mid_task = sum(s.endswith("/continual_state") for s in sources)
    restarts = sum(not k["resumed"] for r in reports for c in r["chains"] for k in c["kills"])
    print(f"\nsoak: {runs} processes, {kills} SIGKILLs, {identical}/{len(lines)} identical finishes; resumed from "
          f"{len(sources) - mid_task} end-of-task and {mid_task} mid-task checkpoints, "
          f"{logs.count('Skipping unusable')} half-written checkpoints skipped, {restarts} kills before anything "
          "was saved\n" + "\n".join(lines))
