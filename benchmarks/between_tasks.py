"""Between-task cost: the work strategies do after (or before) a task, next to what training costs.

- EWC: the Fisher over ``N`` rows, as a multiple of one training pass (forward, backward, AdamW
  step at the same batch size) over the same ``N`` rows, by ``--fisher-methods``: ``auto`` (the
  default: the hooked per-layer pass where it applies, with its once-per-call check), ``vmap``
  (vectorised per-sample gradients) and ``loop`` (one backward per row); true Fisher, and empirical
  for ``auto``/``vmap``/``hooks``. Both alternate in one process (Fisher, pass, Fisher, pass, ...);
  the figure is the median of the per-repeat ratios. ``--fisher-only`` measures nothing else.
- LwF (``cache_teacher=True``): filling the top-k teacher cache over the same rows, same multiple.
- PackNet: pruning after a task (magnitude top-k per layer and ownership update, retraining
  excluded), in milliseconds per million prunable parameters, and the masking of ``use_task``;
  and on the ``--models``, as a multiple of one training pass over the ``N`` rows (issue 13).
- GEM / A-GEM: filling the episodic memory after a task (``after_task``: the seeded choice of
  ``memory_per_task`` rows) and building the padded memory tensors the next task's steps read
  (``memory_bank``), as a multiple of one training pass over the ``N`` rows.
- Replay: ``ReservoirBuffer.add`` of a task's rows into a full buffer, and the mixing of replayed
  rows into the next task (``prepare_train_dataset``), in milliseconds per 10k rows.

    OMP_NUM_THREADS=1 python benchmarks/between_tasks.py
    OMP_NUM_THREADS=1 python benchmarks/between_tasks.py --quick
    OMP_NUM_THREADS=1 python benchmarks/between_tasks.py --fisher-only --models tiny,medium --rows 128 --repeats 3
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


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def training_pass(model, rows, batch_size: int) -> Callable[[], None]:
    """One epoch of plain training over ``rows`` (no padding: all rows have the same length)."""
    ids = torch.tensor(rows["input_ids"])
    labels = torch.tensor(rows["labels"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> None:
        model.train()
        for start in range(0, len(ids), batch_size):
            loss = model(input_ids=ids[start : start + batch_size], labels=labels[start : start + batch_size]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def alternate(first: Callable[[], None], second: Callable[[], None], repeats: int) -> dict[str, Any]:
    """Run ``first`` and ``second`` alternately ``repeats`` times (after one warm-up of each)."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        a.append(_timed(first))
        b.append(_timed(second))
    ratios = [x / y for x, y in zip(a, b)]
    return {"seconds": C.median(a), "pass_seconds": C.median(b), "ratio": C.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "load_avg": C.load_average()}


def fisher_cost(size: str, num_rows: int, batch_size: int, seq_len: int, repeats: int,
                methods: tuple[str, ...] = ("auto", "vmap", "loop")) -> list[dict[str, Any]]:
    from clm_hf.strategies.ewc import estimate_fisher

    model = C.build_model(size)
    rows = C.task_rows(1, num_rows, seq_len)[0][1]
    train = training_pass(model, rows, batch_size)
    out = []
    for method, sampled in [(m, s) for m in methods for s in ((True, False) if m != "loop" else (True,))]:
        fisher = lambda m=method, s=sampled: estimate_fisher(model, rows, batch_size=batch_size, method=m, sampled=s)  # noqa: E731
        result = alternate(fisher, train, repeats if method != "loop" else max(1, repeats // 2))
        out.append({"model": size, "what": f"EWC Fisher ({'true' if sampled else 'empirical'}, {method})", "rows": num_rows,
                    "batch_size": batch_size, **result, "target": 1.3 if (method, sampled) == ("auto", True) else None})
    return out


def lwf_cache_cost(size: str, num_rows: int, batch_size: int, seq_len: int, repeats: int) -> dict[str, Any]:
    from clm_hf.data import ContinualDataCollator
    from clm_hf.strategies.lwf import teacher_topk

    model = C.build_model(size)
    rows = C.task_rows(1, num_rows, seq_len)[0][1]
    collator = ContinualDataCollator(pad_token_id=C.tokenizer().pad_token_id)
    fill = lambda: teacher_topk(model, rows, k=8, collator=collator, batch_size=32)  # noqa: E731
    result = alternate(fill, training_pass(model, rows, batch_size), repeats)
    return {"model": size, "what": "LwF teacher cache (top-8)", "rows": num_rows, "batch_size": batch_size, **result}


def _alternate_fresh(prepare: Callable[[int], Callable[[], Any]], train: Callable[[], None], repeats: int) -> dict[str, Any]:
    """Like :func:`alternate`, for work that runs once per object: ``prepare(r)`` builds a fresh one
    (untimed) and returns the call to time."""
    _timed(prepare(0)), train()
    a, b = [], []
    for r in range(1, repeats + 1):
        work = prepare(r)
        a.append(_timed(work))
        b.append(_timed(train))
    ratios = [x / y for x, y in zip(a, b)]
    return {"seconds": C.median(a), "pass_seconds": C.median(b), "ratio": C.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "load_avg": C.load_average()}


def _packnet_in_task(size: str | dict, rows: Any, seed: int, folder: Path) -> tuple[Any, Any, Any]:
    """A PackNet trainer on a fresh model of ``size``, inside its first task (ready for ``after_task``)."""
    from clm_hf.strategies.base import TaskInfo
    from clm_hf.strategies.packnet import PackNet

    packnet = PackNet(retrain_epochs=0)
    trainer = C.make_trainer(C.build_model(size, seed=seed), [packnet], folder)
    task = TaskInfo(task_id="t0", name="t0", index=0, train_dataset=rows)
    trainer.tasks.append(task)
    packnet.prepare_model(trainer.model, task)
    packnet.before_task(trainer, task)
    return packnet, trainer, task


def packnet_ratio(size: str, num_rows: int, batch_size: int, seq_len: int, repeats: int, workdir: Path) -> dict[str, Any]:
    """PackNet's pruning after a task (no retraining) as a multiple of one training pass over ``N`` rows."""
    rows = C.task_rows(1, num_rows, seq_len)[0][1]
    train = training_pass(C.build_model(size), rows, batch_size)

    def prepare(r: int) -> Callable[[], Any]:
        packnet, trainer, task = _packnet_in_task(size, rows, r, workdir / f"packnet-ratio-{size}-{r}")
        return lambda: packnet.after_task(trainer, task)

    result = _alternate_fresh(prepare, train, repeats)
    return {"model": size, "what": "PackNet prune (no retraining)", "rows": num_rows, "batch_size": batch_size, **result}


def gem_memory_ratio(size: str, num_rows: int, batch_size: int, seq_len: int, repeats: int, workdir: Path) -> dict[str, Any]:
    """GEM's memory fill after a task (``after_task``) plus the memory tensors it builds for the next
    task (``memory_bank``), as a multiple of one training pass over ``N`` rows. A-GEM shares the code."""
    from clm_hf.strategies.base import TaskInfo
    from clm_hf.strategies.gem import GEM

    rows = C.task_rows(1, num_rows, seq_len)[0][1]
    train = training_pass(C.build_model(size), rows, batch_size)

    def prepare(r: int) -> Callable[[], Any]:
        gem = GEM(seed=r)  # the default memory_per_task
        trainer = C.make_trainer(C.build_model(size), [gem], workdir / f"gem-{size}-{r}")
        task = TaskInfo(task_id="t0", name="t0", index=0, train_dataset=rows)

        def fill() -> None:
            gem.after_task(trainer, task)
            gem.memory_bank(trainer.args.device)

        return fill

    result = _alternate_fresh(prepare, train, repeats)
    return {"model": size, "what": "GEM memory fill (64 rows/task) + memory tensors", "rows": num_rows,
            "batch_size": batch_size, **result}


def packnet_cost(size: str | dict, repeats: int, workdir: Path) -> dict[str, Any]:
    """Pruning + ownership update after a task (no retraining), per million prunable parameters."""
    rows = C.task_rows(1, 16, 3)[0][1]
    prune_times, mask_times = [], []
    prunable = 0
    for r in range(repeats + 1):
        packnet, trainer, task = _packnet_in_task(size, rows, r, workdir / f"packnet-{r}")
        prune = _timed(lambda: packnet.after_task(trainer, task))

        def mask() -> None:
            with packnet.use_task(trainer.model, task):
                pass

        masked = _timed(mask)
        prunable = sum(own.numel() for own in packnet.ownership.values())
        if r:  # the first is a warm-up
            prune_times.append(prune)
            mask_times.append(masked)
    millions = prunable / 1e6
    return {"model": size if isinstance(size, str) else "x".join(map(str, size.values())), "what": "PackNet prune (no retraining)",
            "prunable_parameters": prunable, "ms_per_million": 1e3 * C.median(prune_times) / millions,
            "use_task_ms_per_million": 1e3 * C.median(mask_times) / millions, "load_avg": C.load_average()}


def replay_cost(num_rows: int, capacity: int, seq_len: int, repeats: int) -> dict[str, Any]:
    from clm_hf.buffer import ReservoirBuffer
    from clm_hf.strategies.base import TaskInfo
    from clm_hf.strategies.replay import Replay

    first, second = (rows for _, rows in C.task_rows(2, num_rows, seq_len))
    add_times, mix_times = [], []
    for r in range(repeats + 1):
        replay = Replay(buffer_size=capacity, seed=r)
        replay.buffer = ReservoirBuffer(capacity, seed=r)
        replay.buffer.add(first, "a")  # full (or holding all of the first task)
        add = _timed(lambda: replay.buffer.add(second, "b"))
        task = TaskInfo(task_id="c", name="c", index=2, train_dataset=first)
        mix = _timed(lambda: replay.prepare_train_dataset(first, task))
        if r:
            add_times.append(add)
            mix_times.append(mix)
    per = 1e4 / num_rows
    return {"what": "Replay buffer add / mix", "rows": num_rows, "capacity": capacity,
            "add_ms_per_10k_rows": 1e3 * C.median(add_times) * per, "mix_ms_per_10k_rows": 1e3 * C.median(mix_times) * per,
            "load_avg": C.load_average()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    C.quiet()
    report: dict[str, Any] = {"machine": C.machine(), "settings": vars(args).copy(), "fisher": [], "lwf": [], "ratios": [],
                              "packnet": [], "replay": []}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.models.split(","):
            for row in fisher_cost(size, args.rows, args.batch_size, args.seq_len, args.repeats,
                                   tuple(args.fisher_methods.split(","))):
                report["fisher"].append(row)
                print(row, flush=True)
            if args.fisher_only:
                continue
            row = lwf_cache_cost(size, args.rows, args.batch_size, args.seq_len, args.repeats)
            report["lwf"].append(row)
            print(row, flush=True)
            for measure in (packnet_ratio, gem_memory_ratio):
                row = measure(size, args.rows, args.batch_size, args.seq_len, args.repeats, Path(tmp))
                report["ratios"].append(row)
                print(row, flush=True)
        for size in [] if args.fisher_only else args.packnet_models.split(","):
            spec: str | dict = size
            if size not in C.MODELS:  # e.g. 512x8: width x layers
                width, layers = (int(x) for x in size.split("x"))
                spec = {"hidden_size": width, "num_layers": layers, "num_heads": 8}
            row = packnet_cost(spec, args.repeats, Path(tmp))
            row["model"] = size
            report["packnet"].append(row)
            print(row, flush=True)
        for capacity in [] if args.fisher_only else (int(c) for c in args.capacities.split(",")):
            row = replay_cost(args.replay_rows, capacity, args.seq_len, args.repeats)
            report["replay"].append(row)
            print(row, flush=True)
    report["machine"]["load_avg_end"] = C.load_average()
    return report


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| model | work | rows | seconds | one training pass (s) | ratio | range | target | load avg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["fisher"] + report["lwf"] + report.get("ratios", []):
        target = r.get("target")
        met = "" if target is None else (f"<= {target} ({'met' if r['ratio'] <= target else '**missed**'})")
        lines.append(f"| {r['model']} | {r['what']} | {r['rows']} | {r['seconds']:.3f} | {r['pass_seconds']:.3f} | "
                     f"{r['ratio']:.2f}x | {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f} | {met} | {r['load_avg'][0]} |")
    if not report["packnet"] and not report["replay"]:  # --fisher-only
        return "\n".join(lines)
    lines += ["", "| model | prunable params | prune ms / M params | use_task masking ms / M params | load avg |",
              "| --- | --- | --- | --- | --- |"]
    for r in report["packnet"]:
        lines.append(f"| {r['model']} | {r['prunable_parameters']:,} | {r['ms_per_million']:.1f} | "
                     f"{r['use_task_ms_per_million']:.1f} | {r['load_avg'][0]} |")
    lines += ["", "| rows offered | buffer capacity | add ms / 10k rows | mix into next task ms / 10k rows | load avg |",
              "| --- | --- | --- | --- | --- |"]
    for r in report["replay"]:
        lines.append(f"| {r['rows']} | {r['capacity']} | {r['add_ms_per_10k_rows']:.1f} | {r['mix_ms_per_10k_rows']:.1f} | "
                     f"{r['load_avg'][0]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,medium")
    parser.add_argument("--rows", type=int, default=256, help="N: rows of the Fisher / cache / training pass")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--packnet-models", default="tiny,medium,512x8")
    parser.add_argument("--replay-rows", type=int, default=10_000)
    parser.add_argument("--capacities", default="500,10000")
    parser.add_argument("--output", default="benchmarks/results/between_tasks.json")
    parser.add_argument("--fisher-methods", default="auto,vmap,loop", help="estimate_fisher methods to time")
    parser.add_argument("--fisher-only", action="store_true", help="time the EWC Fisher rows only")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.rows, args.repeats, args.seq_len, args.batch_size = "tiny", 8, 1, 2, 4
        args.packnet_models, args.replay_rows, args.capacities = "tiny", 100, "20"
    report = run(args)
    print()
    print(to_markdown(report))
    C.save_json(report, args.output)
    return report


if __name__ == "__main__":
    main()
