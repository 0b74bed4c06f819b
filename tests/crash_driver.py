"""A ``clm-hf`` process that SIGKILLs itself at a chosen point, for ``tests/test_crash_resume.py``.

Run it exactly like the ``clm-hf`` command (it calls :func:`clm_hf.cli.main` with its arguments)::

    CLM_KILL=fisher:1 python -m tests.crash_driver train RECIPE.yaml
    python -m tests.crash_driver train RECIPE.yaml --resume RUN_DIR

``CLM_KILL`` names the moment the process kills itself with ``SIGKILL`` (no cleanup, no flush, no
``finally``: the same as ``kill -9`` or the OOM killer). ``T`` is a task index, ``S`` a step:

=====================  ========================================================================
``step:T:S``           right after optimizer step S of task T (before that step's checkpoint)
``saved:T:S``          right after the checkpoint of step S of task T is complete (main phase)
``mid_ckpt:T:S``       while checkpoint S of task T is written: the Trainer's files are there,
                       the continual state is written but has no manifest and is not renamed in
``after_task:T:NAME``  once strategy NAME's ``after_task`` of task T has returned
``fisher:T``           inside EWC's ``after_task`` of task T, once its Fisher is estimated
``prune:T``            inside PackNet's pruning of task T, after some layers were pruned in place
``retrain:T:S``        after step S of PackNet's retraining of task T
``buffer:T``           inside the replay buffer update of task T (new rows planned and stored
                       in memory, the reservoir's counters not yet advanced)
``eval:T``             during the evaluation of the tasks after task T
``ckpt_write:T``       while the end-of-task checkpoint of task T is written (no manifest yet)
``between:T``          once the end-of-task checkpoint of task T is complete
``wall:SECONDS``       at a wall-clock moment after start-up (a timer thread)
=====================  ========================================================================

The process prints ``CLM_KILL_ARMED`` when the hooks are installed; a kill leaves exit status -9.
Every module of ``clm_hf.strategies`` is imported first, so every strategy that exists can be named
in a recipe.

``python -m tests.crash_driver plan PLAN.json REPORT.json`` runs many such processes while paying
the (slow) imports once: it forks one child per run, and each child is killed for real with
``SIGKILL`` at its moment (see :func:`_plan`). The forking parent never trains anything itself.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(spec: str) -> None:
    import clm_hf.state as state_module
    import clm_hf.trainer as trainer_module
    from transformers import TrainerCallback

    kind, *rest = spec.split(":")
    task = int(rest[0]) if rest and kind != "wall" else None
    arg = rest[1] if len(rest) > 1 else None
    live: dict[str, object] = {}

    def trainer():
        return live.get("trainer")

    def task_index():
        current = getattr(trainer(), "current_task", None)
        return current.index if current is not None else None

    if kind == "wall":
        timer = threading.Timer(float(rest[0]), _die)
        timer.daemon = True
        timer.start()
        return

    class Killer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if kind not in ("step", "retrain"):
                return
            retraining = str(args.output_dir).endswith("-packnet-retrain")
            if task_index() == task and state.global_step == int(arg):
                if (kind == "step" and not retraining) or (kind == "retrain" and retraining):
                    _die()

        def on_save(self, args, state, control, **kwargs):
            main_phase = os.path.basename(str(args.output_dir)) == f"task-{task:03d}"
            if kind == "saved" and main_phase and task_index() == task and state.global_step == int(arg):
                _die()

    original_init = trainer_module.ContinualTrainerMixin.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        live["trainer"] = self
        self.add_callback(Killer())

    trainer_module.ContinualTrainerMixin.__init__ = init

    if kind in ("mid_ckpt", "ckpt_write"):
        original_manifest = state_module.write_manifest

        def write_manifest(root):
            parts = os.fspath(root).split(os.sep)
            name, parent, task_folder = parts[-1], parts[-2], parts[-3]
            if kind == "mid_ckpt" and name.startswith(".tmp-continual_state") and parent == f"checkpoint-{arg}" \
                    and task_folder == f"task-{task:03d}":
                _die()
            if kind == "ckpt_write" and name.startswith(f".tmp-task-{task:03d}-"):
                _die()
            return original_manifest(root)

        state_module.write_manifest = write_manifest

    if kind == "between":
        original_save = trainer_module.ContinualTrainerMixin.save_continual_checkpoint

        def save_continual_checkpoint(self, directory=None):
            path = original_save(self, directory)
            if len(self.tasks) - 1 == task:
                _die()
            return path

        trainer_module.ContinualTrainerMixin.save_continual_checkpoint = save_continual_checkpoint

    if kind == "eval":
        original_eval = trainer_module.ContinualTrainerMixin.evaluate_task
        calls = {"n": 0}

        def evaluate_task(self, dataset, **kwargs):
            if self.current_task is None and len(self.tasks) - 1 == task:
                calls["n"] += 1
                if calls["n"] == 2:
                    _die()
            return original_eval(self, dataset, **kwargs)

        trainer_module.ContinualTrainerMixin.evaluate_task = evaluate_task

    if kind == "after_task":
        from clm_hf.strategies.base import get_strategy_class

        cls = get_strategy_class(arg)
        original_after = cls.after_task

        def after_task(self, trainer_, task_info):
            original_after(self, trainer_, task_info)
            if task_info.index == task:
                _die()

        cls.after_task = after_task

    if kind == "fisher":
        import clm_hf.strategies.ewc as ewc_module

        original_fisher = ewc_module.estimate_fisher

        def estimate_fisher(*args, **kwargs):
            fisher = original_fisher(*args, **kwargs)
            if trainer() is not None and len(trainer().tasks) - 1 == task:
                _die()
            return fisher

        ewc_module.estimate_fisher = estimate_fisher

    if kind == "prune":
        from clm_hf.strategies.packnet import PackNet

        original_prune = PackNet._prune_mask
        calls = {"n": 0}

        def prune_mask(self, p, candidates, task_idx):
            if task_idx == task:
                calls["n"] += 1
                if calls["n"] == 3:  # two layers already zeroed in place
                    _die()
            return original_prune(self, p, candidates, task_idx)

        PackNet._prune_mask = prune_mask

    if kind == "buffer":
        from clm_hf.buffer import ReservoirBuffer

        original_materialise = ReservoirBuffer._materialise

        def materialise(self, dataset, task_id, source):
            original_materialise(self, dataset, task_id, source)
            if trainer() is not None and len(trainer().tasks) - 1 == task:
                _die()

        ReservoirBuffer._materialise = materialise


def _run_child(argv: list[str], kill: str | None) -> int:
    """Fork; the child runs ``clm-hf ARGV`` (dying at ``kill``); return its exit code or -signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            if kill:
                _install(kill)
            from clm_hf.cli import main as cli_main

            code = cli_main(argv)
        except BaseException:  # noqa: BLE001 - report and leave with a failure code
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _resumable(run_dir: str) -> bool:
    """What a job script that restarts a killed run checks: did the run save anything yet?

    Any checkpoint folder counts, complete or not: ``--resume`` skips an interrupted save (and
    starts the stream again when nothing complete was saved), so only a run killed before its
    first save has to be started without ``--resume``.
    """
    from pathlib import Path

    run = Path(run_dir)
    return (run / "continual").exists() or any(run.glob("task-*/checkpoint-*"))


def _plan(path: str) -> dict:
    """Run the chains of a JSON plan, each a reference run and/or a run killed again and again.

    A chain: ``{"recipe", "run_dir", "kills": [spec, ...], "reference": dir or null, "finish": bool}``.
    The first kill starts the run; every later one resumes it (``--resume run_dir``) and dies
    again; ``finish`` resumes it once more to the end.
    """
    import json
    import random
    from pathlib import Path

    plan = json.load(open(path))
    report = []
    for chain in plan["chains"]:
        entry = {"run_dir": chain["run_dir"], "kills": [], "finished": None, "reference": None}
        recipe = chain["recipe"]
        reference_seconds = None
        if chain.get("reference"):
            started = time.monotonic()
            entry["reference"] = _run_child(["train", recipe, "--training.output_dir", chain["reference"]], None)
            reference_seconds = entry["reference_seconds"] = round(time.monotonic() - started, 2)
        kills = list(chain.get("kills", []))
        if chain.get("random_kills"):
            # Random moments spread over the length of a whole run (the reference's, when there is
            # one: machines differ a lot in speed), so kills land in every phase of it.
            rng = random.Random(chain.get("seed", 0))
            low, high = chain.get("wall_range", [0.5, 6.0])
            if reference_seconds and "wall_fraction" in chain:
                low, high = (f * reference_seconds for f in chain["wall_fraction"])
            kills += [f"wall:{rng.uniform(low, high):.2f}" for _ in range(chain["random_kills"])]
        retries = 3
        while kills:
            spec = kills.pop(0)
            # Until something was saved there is nothing to resume: the run starts over (a resume
            # would rightly refuse an empty folder).
            saved = _resumable(chain["run_dir"])
            argv = ["train", recipe, "--resume", chain["run_dir"]] if saved else \
                ["train", recipe, "--training.output_dir", chain["run_dir"]]
            code = _run_child(argv, spec)
            entry["kills"].append({"spec": spec, "status": code, "resumed": saved})
            if code == 0 and spec.startswith("wall:"):
                if retries and not any(k["status"] == -9 for k in entry["kills"]):
                    # The run finished before its first moment (the machine got faster than during the
                    # reference run): start it again, from nothing, with the moment halved, so that
                    # every wall-clock chain is killed at least once.
                    import shutil

                    retries -= 1
                    shutil.rmtree(chain["run_dir"], ignore_errors=True)
                    entry["kills"].clear()
                    kills.insert(0, f"wall:{float(spec.split(':')[1]) / 2:.2f}")
                    continue
                break  # a random moment after the end: the run is complete
        if chain.get("finish", True):
            saved = _resumable(chain["run_dir"])
            entry["finished"] = _run_child(["train", recipe, "--resume", chain["run_dir"]] if saved else
                                           ["train", recipe, "--training.output_dir", chain["run_dir"]], None)
        report.append(entry)
    return {"chains": report}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import pkgutil

    import clm_hf.strategies

    for module in pkgutil.iter_modules(clm_hf.strategies.__path__):  # register every strategy that exists
        try:
            importlib.import_module(f"clm_hf.strategies.{module.name}")
        except ImportError:
            pass
    import torch

    # The forked children inherit what is imported here. `import clm_hf` is lazy, so without this
    # every child would import the trainer (and transformers' Trainer) itself: a reference run's
    # time would include seconds that a wall-clock kill's timer, armed after those imports, never
    # sees, and kills drawn as fractions of it could land after the run's end.
    import clm_hf.cli  # noqa: F401
    import clm_hf.recipe  # noqa: F401
    import clm_hf.trainer  # noqa: F401

    torch.set_num_threads(1)
    if argv and argv[0] == "plan":
        import json

        report = _plan(argv[1])
        with open(argv[2], "w") as handle:
            json.dump(report, handle, indent=1)
        return 0
    spec = os.environ.get("CLM_KILL")
    if spec:
        _install(spec)
        print("CLM_KILL_ARMED", spec, flush=True)
    from clm_hf.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())


# --- what a finished run left behind, for comparisons --------------------------------------------
def final_state(run_dir) -> dict:
    """The tensors of the last end-of-task checkpoint (model, strategies, RNG), the replay/episodic
    memories it holds (as row lists) and every score matrix of ``results.json``."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    last = sorted(p for p in (run_dir / "continual").glob("task-*") if not p.name.startswith("."))[-1]
    tensors = {}
    for path in sorted(last.rglob("*.safetensors")):
        for name, value in load_file(str(path)).items():
            tensors[f"{path.relative_to(last)}::{name}"] = value
    memories = {}
    for arrow_dir in sorted({p.parent for p in last.rglob("*.arrow")}):
        from datasets import load_from_disk

        memories[str(arrow_dir.relative_to(last))] = load_from_disk(str(arrow_dir)).to_dict()
    results = json.loads((run_dir / "results.json").read_text())
    state = json.loads((last / "continual_state.json").read_text())
    return {"checkpoint": last.name, "tensors": tensors, "memories": memories, "results": results,
            "rng_meta": state["rng"], "tasks": state["tasks"]}


def differences(reference: dict, other: dict, atol: float = 1e-6) -> list[str]:
    """What differs between two :func:`final_state` results (empty when they are identical)."""
    import math

    problems = []
    for key in ("checkpoint", "tasks", "memories", "rng_meta"):
        if reference[key] != other[key]:
            problems.append(f"{key} differs")
    if reference["tensors"].keys() != other["tensors"].keys():
        problems.append(f"tensor sets differ: {sorted(reference['tensors'].keys() ^ other['tensors'].keys())[:5]}")
    for name in sorted(reference["tensors"].keys() & other["tensors"].keys()):
        a, b = reference["tensors"][name], other["tensors"][name]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: shape/dtype differ")
        elif a.is_floating_point() and a.numel() and float((a - b).abs().max()) > atol:
            problems.append(f"{name}: max abs diff {float((a - b).abs().max()):.3g}")
        elif not a.is_floating_point() and not bool((a == b).all()):
            problems.append(f"{name}: values differ")
    ref_scores, other_scores = reference["results"]["scores"], other["results"]["scores"]
    ref_scores = {**ref_scores, **{f"baseline/{m}": [v] for m, v in reference["results"]["baseline"].items()}}
    other_scores = {**other_scores, **{f"baseline/{m}": [v] for m, v in other["results"]["baseline"].items()}}
    for metric in ref_scores:
        rows_a, rows_b = ref_scores[metric], other_scores.get(metric)
        flat_a = [v for row in rows_a for v in row]
        flat_b = [v for row in (rows_b or []) for v in row]
        if len(flat_a) != len(flat_b) or any(
            (x is None) != (y is None) or (x is not None and not math.isclose(x, y, rel_tol=0, abs_tol=atol))
            for x, y in zip(flat_a, flat_b)
        ):
            problems.append(f"results matrix '{metric}' differs")
    return problems
