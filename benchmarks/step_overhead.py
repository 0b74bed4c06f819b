"""Step overhead: each strategy's time per optimizer step as a ratio to plain fine-tuning.

For every registered strategy (plus LwF with ``cache_teacher=True``), two trainers are built in one
process: plain fine-tuning (``ContinualCausalLMTrainer(strategies=[])``) and the strategy, on the
same model architecture and initial weights, the same rows and batch size. The strategy trainer
first learns ``k`` short past tasks (so EWC has a Fisher, LwF a teacher, PackNet owners, GEM
memories, PNN columns). Then both train the same new task through the real ``train_task`` path, in
two threads that hand a baton back and forth every ``--block-steps`` optimizer steps, so the two
sides alternate (plain block, strategy block, plain block, ...) and a change of machine load hits
both. Only one side runs at a time.

A step is timed from ``on_step_begin`` to ``on_step_end`` (forward, strategy losses, backward,
clipping, ``edit_gradients``, ``optimizer.step()``, ``after_optimizer_step``, scheduler, zero_grad);
data loading and logging fall outside. The figure is the median over blocks of
``median(strategy block) / median(plain block just before it)``; the first block of each side is a
warm-up and is dropped. Replay mixes extra rows in, so its ratio is per token (the time per padded
input token); every row reports both per step and per token.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py                       # both models, all strategies
    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --models tiny --strategies ewc,gem
    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --gem-scaling 1,2,3,4,5,6,7,8 --strategies none
    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --quick                # smoke test
    python benchmarks/step_overhead.py --models wide --bf16 --seq-len 60         # on a GPU (see gpu_run.sh)

On a GPU the clock synchronises the device at both ends of a step, so a step's time includes its
kernels, not only their launches.

``--phases`` also splits every timed step into its parts, per side (median ms over the timed steps):
``forward_backward`` (every ``training_step``), ``edit_gradients`` (the strategies' gradient edits),
``clip`` (the Trainer's clipping and norm, without the edits), ``optimizer`` (``optimizer.step()`` and
the strategies' ``after_optimizer_step``) and ``rest`` (callbacks, scheduler, ``zero_grad``): where a
strategy's extra time goes (docs/benchmarks.md section 6, EWC).

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --models medium --strategies ewc --blocks 12 --phases
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

# Targets (ratio to plain fine-tuning; per token for replay), at the strategies' defaults: issue 13
# item 2 for EWC, LwF (live teacher), A-GEM, GEM and PNN; the earlier brief for the others.
TARGETS = {"replay": 1.05, "ewc": 1.03, "packnet": 1.05, "lwf": 1.30, "lwf_cached": 1.1, "agem": 1.70, "gem": 2.00,
           "pnn": 1.6}


def strategy_cases(batch_size: int) -> dict[str, dict[str, Any]]:
    """name -> how to build the strategy list, how many past tasks come first, what the row shows.

    GEM and A-GEM run with ``"auto"`` memory rows (an option, not their defaults: half a micro-batch per step;
    GEM splits them over the past tasks, ``max(1, (batch // 2) // K)`` rows of each, 5 rows for a
    batch of 16 and K = 5; A-GEM: ``batch // 2`` pooled rows). ``--option`` sets other counts
    (e.g. ``--option agem.sample_size=16 --option gem.memory_batch_size=3``, the rows measured
    before the defaults changed; ``gem.memory_batch_size=null`` is the paper's whole memory).
    """
    from clm_hf.strategies import EWC, PNN, LwF, PackNet, Replay
    from clm_hf.strategies.gem import AGEM, GEM

    from clm_hf.strategies import build_strategy

    cases: dict[str, dict[str, Any]] = {
        # Any registered strategy without a case below: its defaults after 2 past tasks.
        name: {"build": (lambda o, n=name: [build_strategy(n, **o)]), "past": 2} for name in C.registered_strategies()
    }
    return {
        **cases,
        "replay": {"build": lambda o: [Replay(**o)], "past": 2, "per_token": True},
        "ewc": {"build": lambda o: [EWC(**o)], "past": 2},
        "lwf": {"build": lambda o: [LwF(**o)], "past": 2},
        "lwf_cached": {"build": lambda o: [LwF(**{"cache_teacher": True, **o})], "past": 2},
        "packnet": {"build": lambda o: [PackNet(**o)], "past": 2},
        "pnn": {"build": lambda o: [PNN(**o)], "past": 2},
        "agem": {"build": lambda o: [AGEM(**{"sample_size": "auto", **o})], "past": 5},
        "gem": {"build": lambda o, k=5: [GEM(**{"memory_batch_size": "auto", **o})], "past": 5},
        "gem_batched": {"build": lambda o, k=5: [GEM(**{"memory_batch_size": _share(batch_size, k), "reference_method": "batched", **o})],
                        "past": 5, "target_of": "gem"},
    }


def _share(rows: int, tasks: int) -> int:
    """Memory rows of each past task when ``rows`` are split over ``tasks``: never more in total."""
    return max(1, rows // tasks)


class _Done(Exception):
    """Raised from the clock callback once enough steps were timed (skips the task's after_task)."""


class Baton:
    """Strict alternation of two threads: only the holder runs; it hands over at block ends."""

    def __init__(self, first: str) -> None:
        self.cv = threading.Condition()
        self.turn = first
        self.done: set[str] = set()

    def wait(self, me: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == me)

    def hand(self, me: str, other: str) -> None:
        with self.cv:
            if other in self.done:
                return
            self.turn = other
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn == me)

    def finish(self, me: str, other: str) -> None:
        with self.cv:
            self.done.add(me)
            self.turn = other
            self.cv.notify_all()


class StepClock(TrainerCallback):
    """Times every optimizer step and counts its input tokens; hands the baton every ``block`` steps."""

    def __init__(self, baton: Baton, me: str, other: str, block: int, total: int) -> None:
        self.baton, self.me, self.other, self.block, self.total = baton, me, other, block, total
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.phases: list[dict[str, float]] = []  # seconds of each part of every step (see _time_phases)
        self._phase = dict.fromkeys(PHASES, 0.0)
        self._optimizer_start = 0.0
        self._pending = 0
        self._start = 0.0

    def count(self, inputs: dict[str, Any]) -> None:
        ids = inputs.get("input_ids")
        self._pending += int(ids.numel()) if ids is not None else 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._pending = 0
        self._phase = dict.fromkeys(PHASES, 0.0)
        _synchronize()
        self._start = time.perf_counter()

    def add_phase(self, name: str, seconds: float) -> None:
        self._phase[name] += seconds

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        _synchronize()
        self._optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Callbacks run in the order they were added: the strategies' after_optimizer_step came first.
        _synchronize()
        self._phase["optimizer"] += time.perf_counter() - self._optimizer_start

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()  # GPU work is asynchronous: a step ends when its kernels have run
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(self._pending)
        self._phase["rest"] = self.times[-1] - sum(self._phase[k] for k in PHASES if k != "rest")
        self.phases.append(self._phase)
        if len(self.times) % self.block == 0:
            if len(self.times) >= self.total:
                raise _Done
            self.baton.hand(self.me, self.other)


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _count_tokens(trainer, clock: StepClock) -> None:
    original = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        clock.count(inputs)
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


# The parts of a step --phases reports; "rest" is the step's time less the others.
PHASES = ("forward_backward", "edit_gradients", "clip", "optimizer", "rest")


def _time_phases(trainer, clock: StepClock) -> None:
    """Wrap the trainer's ``training_step``, clipping and its strategies' ``edit_gradients`` (instance
    attributes: the trainer finds its editors by class, so which hooks run does not change) to add
    their times to the clock's phases. The edits run inside the clipping call; they are counted
    once, as ``edit_gradients``."""
    def timed(owner, name: str, phase: str, inner: str | None = None) -> None:
        original = getattr(owner, name)

        def run(*args, **kwargs):
            _synchronize()
            start = time.perf_counter()
            nested = clock._phase[inner] if inner else 0.0
            try:
                return original(*args, **kwargs)
            finally:
                _synchronize()
                inside = (clock._phase[inner] - nested) if inner else 0.0
                clock.add_phase(phase, time.perf_counter() - start - inside)

        setattr(owner, name, run)

    timed(trainer, "training_step", "forward_backward")
    timed(trainer, "_clip_grad_norm", "clip", inner="edit_gradients")
    timed(trainer, "_get_grad_norm", "clip", inner="edit_gradients")
    for strategy in trainer.strategies:
        timed(strategy, "edit_gradients", "edit_gradients")


def _run_side(trainer, rows, clock: StepClock, errors: list) -> None:
    try:
        clock.baton.wait(clock.me)
        trainer.train_task(rows, task_id="measured")
    except _Done:
        pass
    except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
        errors.append(err)
    finally:
        clock.baton.finish(clock.me, clock.other)


def measure_pair(
    size: str | dict,
    build: Callable[[], list],
    past: int,
    *,
    blocks: int,
    block_steps: int,
    batch_size: int,
    seq_len: int,
    rows_per_task: int,
    workdir: Path,
    bf16: bool = False,
    baseline: tuple[Callable[[], list], int] | None = None,
    phases: bool = False,
) -> dict[str, Any]:
    """Alternate plain and strategy steps on a new task after ``past`` tasks; return both step series.

    ``baseline`` ``(build, past)`` replaces the plain side by that strategy after that many of the
    same past tasks (the "plain" series are then its steps): GEM at K past tasks against GEM at 1,
    side by side."""
    tasks = C.task_rows(past + 1, rows_per_task, seq_len)
    precision = {"bf16": True} if bf16 else {}
    strategy_trainer = C.make_trainer(C.build_model(size), build(), workdir / "strategy", batch_size=batch_size, **precision)
    plain_trainer = C.make_trainer(C.build_model(size), baseline[0]() if baseline else [], workdir / "plain",
                                   batch_size=batch_size, **precision)
    setup_start = time.perf_counter()
    for task_id, rows in tasks[:past]:
        strategy_trainer.train_task(rows, task_id=task_id)
    for task_id, rows in tasks[: baseline[1] if baseline else 0]:
        plain_trainer.train_task(rows, task_id=task_id)
    setup_seconds = time.perf_counter() - setup_start
    total = blocks * block_steps
    baton = Baton("strategy")  # the strategy side prepares its task (LwF cache, replay mix) first
    clocks = {"strategy": StepClock(baton, "strategy", "plain", block_steps, total),
              "plain": StepClock(baton, "plain", "strategy", block_steps, total)}
    errors: list = []
    threads = []
    for side, trainer in (("strategy", strategy_trainer), ("plain", plain_trainer)):
        trainer.add_callback(clocks[side])
        _count_tokens(trainer, clocks[side])
        if phases:
            _time_phases(trainer, clocks[side])
        trainer.args.max_steps = total + block_steps  # never reached: the clock stops the task
        threads.append(threading.Thread(target=_run_side, args=(trainer, tasks[-1][1], clocks[side], errors), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    trainable = C.count_parameters(strategy_trainer.model, trainable_only=True)
    return {
        "strategy": {"times": clocks["strategy"].times, "tokens": clocks["strategy"].tokens,
                     **({"phases": clocks["strategy"].phases} if phases else {})},
        "plain": {"times": clocks["plain"].times, "tokens": clocks["plain"].tokens,
                  **({"phases": clocks["plain"].phases} if phases else {})},
        "setup_seconds": setup_seconds,
        "trainable_parameters": trainable,
        "plain_trainable_parameters": C.count_parameters(plain_trainer.model, trainable_only=True),
    }


def summarize(pair: dict[str, Any], block_steps: int) -> dict[str, Any]:
    """Median over blocks (warm-up block dropped) of the strategy/plain block-median ratios."""
    def blocks_of(series):
        times, tokens = series["times"], series["tokens"]
        out = []
        for start in range(0, len(times) - block_steps + 1, block_steps):
            t, n = times[start : start + block_steps], tokens[start : start + block_steps]
            out.append((C.median(t), C.median([a / b for a, b in zip(t, n) if b])))
        return out[1:] if len(out) > 1 else out

    s_blocks, p_blocks = blocks_of(pair["strategy"]), blocks_of(pair["plain"])
    count = min(len(s_blocks), len(p_blocks))
    step_ratios = [s_blocks[i][0] / p_blocks[i][0] for i in range(count)]
    token_ratios = [s_blocks[i][1] / p_blocks[i][1] for i in range(count)]
    phases = {}
    if "phases" in pair["strategy"]:
        # Median ms of each part over the timed steps (the warm-up block dropped, as above): the
        # medians of the parts need not add up to the median step.
        for side in ("plain", "strategy"):
            steps = pair[side]["phases"][block_steps:] or pair[side]["phases"]
            phases[side] = {k: round(1e3 * C.median([s[k] for s in steps]), 3) for k in PHASES}
    return {
        **({"phases_ms": phases} if phases else {}),
        "ratio_step": C.median(step_ratios),
        "ratio_token": C.median(token_ratios),
        # Interquartile range of the per-block ratios: how much the machine's load moved them.
        "ratio_step_range": [C.quantile(step_ratios, 0.25), C.quantile(step_ratios, 0.75)],
        "ratio_token_range": [C.quantile(token_ratios, 0.25), C.quantile(token_ratios, 0.75)],
        "plain_ms": 1e3 * C.median([b[0] for b in p_blocks]),
        "strategy_ms": 1e3 * C.median([b[0] for b in s_blocks]),
        "tokens_per_step": {"plain": C.median(pair["plain"]["tokens"]), "strategy": C.median(pair["strategy"]["tokens"])},
        "blocks": count,
        "setup_seconds": round(pair["setup_seconds"], 2),
        "trainable_parameters": pair["trainable_parameters"],
        "plain_trainable_parameters": pair["plain_trainable_parameters"],
    }


def _parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        options.setdefault(name, {})[field] = yaml.safe_load(value)
    return options


def run(args: argparse.Namespace) -> dict[str, Any]:
    C.quiet()
    cases = strategy_cases(args.batch_size)
    names = list(cases) if args.strategies == "all" else [s for s in args.strategies.split(",") if s and s != "none"]
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"Unknown strategy case(s) {unknown}; choose from {list(cases)}.")
    options = _parse_options(args.option)
    report: dict[str, Any] = {"machine": C.machine(), "settings": vars(args).copy(), "rows": [], "gem_scaling": [],
                              "gem_direct": []}
    measure = dict(blocks=args.blocks, block_steps=args.block_steps, batch_size=args.batch_size,
                   seq_len=args.seq_len, rows_per_task=args.rows_per_task, bf16=args.bf16)
    rows_measure = {**measure, "phases": args.phases}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.models.split(","):
            for name in names:
                case = cases[name]
                opts = options.get(name, {})
                past = case["past"] if args.max_past is None else min(case["past"], args.max_past)
                build = (lambda o=opts, c=case, k=past: c["build"](o, k)) if name.startswith("gem") else (lambda o=opts, c=case: c["build"](o))
                load_before = C.load_average()
                pair = measure_pair(size, build, past, workdir=Path(tmp) / f"{size}-{name}", **rows_measure)
                row = {"model": size, "strategy": name, "past_tasks": past, "options": opts, **summarize(pair, args.block_steps),
                       "load_avg": [load_before, C.load_average()], "target": TARGETS.get(case.get("target_of", name))}
                row["figure"] = row["ratio_token"] if case.get("per_token") else row["ratio_step"]
                report["rows"].append(row)
                print(_line(row), flush=True)
                for phase in row.get("phases_ms", {}).get("plain", {}):
                    plain_ms, strategy_ms = row["phases_ms"]["plain"][phase], row["phases_ms"]["strategy"][phase]
                    print(f"    {phase:<17} plain {plain_ms:8.3f} ms  strategy {strategy_ms:8.3f} ms  "
                          f"difference {strategy_ms - plain_ms:+8.3f} ms", flush=True)
            for curve in args.gem_curves:
                kind, _, rows = curve.partition(":")
                for k in args.gem_scaling.get(size, args.gem_scaling.get("*", [])):
                    # "per_task:4": 4 memory rows of every past task per step (work grows with K);
                    # "total:16": 16 rows per step split over the K past tasks (work constant in K).
                    per_task = int(rows) if kind == "per_task" else _share(int(rows), k)
                    opts = {"memory_batch_size": per_task, **options.get("gem", {})}
                    build = (lambda o=opts: cases["gem"]["build"](o))
                    pair = measure_pair(size, build, k, workdir=Path(tmp) / f"{size}-gem-{curve}-{k}", **measure)
                    row = {"model": size, "strategy": "gem", "curve": curve, "past_tasks": k, "options": opts,
                           **summarize(pair, args.block_steps), "load_avg": C.load_average()}
                    report["gem_scaling"].append(row)
                    print(_line(row), flush=True)
                counts = args.gem_scaling.get(size, args.gem_scaling.get("*", []))
                for k in counts[1:] if args.gem_direct else []:
                    # GEM at K past tasks against GEM at the first count, side by side in blocks.
                    base_k = counts[0]
                    sides = []
                    for count in (k, base_k):
                        per_task = int(rows) if kind == "per_task" else _share(int(rows), count)
                        sides.append({"memory_batch_size": per_task, **options.get("gem", {})})
                    pair = measure_pair(size, lambda o=sides[0]: cases["gem"]["build"](o), k,
                                        workdir=Path(tmp) / f"{size}-gem-direct-{curve}-{k}",
                                        baseline=(lambda o=sides[1]: cases["gem"]["build"](o), base_k), **measure)
                    row = {"model": size, "strategy": "gem", "curve": curve, "past_tasks": k, "baseline_past_tasks": base_k,
                           "options": sides[0], "baseline_options": sides[1], **summarize(pair, args.block_steps),
                           "load_avg": C.load_average()}
                    report["gem_direct"].append(row)
                    print(f"  {size} gem K={k} vs K={base_k} ({curve}) side by side: step x{row['ratio_step']:.3f} "
                          f"[{row['ratio_step_range'][0]:.2f}-{row['ratio_step_range'][1]:.2f}]", flush=True)
    report["machine"]["load_avg_end"] = C.load_average()
    return report


def _line(row: dict[str, Any]) -> str:
    target = row.get("target")
    mark = "" if target is None else (" ok" if row.get("figure", row["ratio_step"]) <= target else " MISSED")
    return (f"{row['model']:>6} {row['strategy']:<10} past={row['past_tasks']} step x{row['ratio_step']:.3f} "
            f"[{row['ratio_step_range'][0]:.2f}-{row['ratio_step_range'][1]:.2f}] token x{row['ratio_token']:.3f} "
            f"plain {row['plain_ms']:.1f} ms  strategy {row['strategy_ms']:.1f} ms  target {target}{mark}  load {row['load_avg']}")


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| model | strategy | past tasks | ratio / step | ratio / token | IQR of block ratios | plain ms/step | target | met | load avg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        target = r.get("target")
        met = "n/a" if target is None else ("yes" if r["figure"] <= target else "**no**")
        unit = " (per token)" if r["strategy"] == "replay" else ""
        lines.append(f"| {r['model']} | {r['strategy']} | {r['past_tasks']} | {r['ratio_step']:.3f} | {r['ratio_token']:.3f} | "
                     f"{r['ratio_step_range'][0]:.2f}-{r['ratio_step_range'][1]:.2f} | {r['plain_ms']:.1f} | "
                     f"{'' if target is None else f'<= {target}{unit}'} | {met} | {r['load_avg'][0][0] if r['load_avg'][0] else ''} |")
    if report["gem_scaling"]:
        lines += ["", "| model | memory rows per step | GEM past tasks K | step ratio to plain | step time vs K=1 | "
                      "extra time (GEM - plain) vs K=1 | load avg |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for (size, curve), rows in _curves(report).items():
            base = rows[0]
            for r in rows:
                lines.append(f"| {size} | {curve} | {r['past_tasks']} | {r['ratio_step']:.3f} | {r['ratio_step'] / base['ratio_step']:.3f} | "
                             f"{(r['ratio_step'] - 1) / max(base['ratio_step'] - 1, 1e-9):.3f} | {r['load_avg'][0]} |")
    if report.get("gem_direct"):
        lines += ["", "| model | memory rows per step | GEM past tasks K | against K | step time vs that K, side by side | "
                      "IQR of block ratios | load avg |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["gem_direct"]:
            lines.append(f"| {r['model']} | {r['curve']} | {r['past_tasks']} | {r['baseline_past_tasks']} | {r['ratio_step']:.3f} | "
                         f"{r['ratio_step_range'][0]:.2f}-{r['ratio_step_range'][1]:.2f} | {r['load_avg'][0]} |")
    return "\n".join(lines)


def _curves(report: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["gem_scaling"]:
        curves.setdefault((r["model"], r.get("curve", "")), []).append(r)
    return {key: sorted(rows, key=lambda r: r["past_tasks"]) for key, rows in curves.items()}


def plot_gem_scaling(report: dict[str, Any], path: Path) -> Path | None:
    """Step time and GEM's extra time (strategy - plain) relative to K = 1, against K."""
    if not report["gem_scaling"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    top = 1
    for (size, curve), rows in _curves(report).items():
        ks = [r["past_tasks"] for r in rows]
        base = rows[0]["ratio_step"]
        label = f"{size} model, rows/step {curve}"
        axes[0].plot(ks, [r["ratio_step"] / base for r in rows], marker="o", label=label)
        axes[1].plot(ks, [(r["ratio_step"] - 1) / max(base - 1, 1e-9) for r in rows], marker="o", label=label)
        top = max(top, max(ks))
    for ax, ylabel in ((axes[0], "step time / step time at K=1"), (axes[1], "GEM's extra time / extra time at K=1")):
        ax.plot([1, top], [1, top], ls="--", color="grey", label="linear in K")
        ax.set_xlabel("past tasks K (reference gradients per step)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("GEM cost per optimizer step vs number of past tasks")
    return C.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,medium", help="comma list of tiny, medium, wide (GPT-2 small's shape; for a GPU)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the GPU runs)")
    parser.add_argument("--strategies", default="all", help="comma list of cases, 'all' or 'none'")
    parser.add_argument("--blocks", type=int, default=20, help="blocks per side (the first is a warm-up)")
    parser.add_argument("--block-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=8, help="letters per input; rows have 2*seq_len+4 tokens")
    parser.add_argument("--rows-per-task", type=int, default=64)
    parser.add_argument("--gem-scaling", default="",
                        help="past-task counts of the GEM scaling curves, e.g. 1,2,4,8 or per model 'tiny=1,2,3;medium=1,4'")
    parser.add_argument("--gem-curves", default="per_task:4,total:16",
                        help="memory rows per step of each scaling curve: per_task:M (M rows of every past task) "
                             "or total:N (N rows split over the past tasks)")
    parser.add_argument("--gem-direct", action="store_true",
                        help="also time GEM at every later count of --gem-scaling against GEM at the first one, "
                             "side by side in alternating blocks (not each against plain fine-tuning)")
    parser.add_argument("--option", action="append", default=[], help="strategy option, e.g. gem.memory_batch_size=8")
    parser.add_argument("--output", default="benchmarks/results/step_overhead.json")
    parser.add_argument("--plot", default="docs/gem_scaling.png")
    parser.add_argument("--phases", action="store_true",
                        help="also time the parts of every step (forward_backward, edit_gradients, clip, optimizer, rest); "
                             "on a GPU this synchronises at each part, so compare its ratios only with other --phases runs")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    args = parser.parse_args(argv)
    # "1,2,4" for every model, or per model: "tiny=1,2,3,4;medium=1,4"
    args.gem_scaling = {(part.partition("=")[0] if "=" in part else "*"): [int(k) for k in part.partition("=")[2 if "=" in part else 0].split(",") if k]
                        for part in args.gem_scaling.split(";") if part}
    args.gem_curves = [c for c in args.gem_curves.split(",") if c]
    args.max_past = None
    if args.quick:
        args.blocks, args.block_steps, args.rows_per_task, args.seq_len, args.batch_size = 2, 1, 8, 2, 4
        args.max_past = 2
        if args.models == "tiny,medium":
            args.models = "tiny"
    report = run(args)
    print()
    print(to_markdown(report))
    C.save_json(report, args.output)
    if report["gem_scaling"]:
        written = plot_gem_scaling(report, Path(args.plot))
        print(f"plot: {written}")
    return report


if __name__ == "__main__":
    main()
