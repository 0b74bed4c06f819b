"""Compatibility matrix: every strategy × {gradient checkpointing, bf16 autocast, torch.compile, LoRA} × {GPT-2, Llama, T5}.

Each cell trains a tiny model (dropout off, seed 0) on a 2-task synthetic stream twice, with the
feature and without it, and compares the two runs:

| feature | run compared | against | passes when |
| --- | --- | --- | --- |
| ``gradient_checkpointing`` | ``gradient_checkpointing=True`` | the plain run | final weights within ``1e-4`` |
| ``torch_compile`` | ``torch_compile=True`` | the plain run | final weights within ``1e-4`` |
| ``bf16`` | ``bf16=True`` (CPU autocast) | the plain run | eval loss matrix within ``0.05`` (bf16 keeps 8 mantissa bits) |
| ``lora`` | a LoRA ``PeftModel`` with gradient checkpointing (frozen base) | the same LoRA run without it | weights within ``1e-4``, base weights unchanged, and the strategy acts (weights differ from LoRA without the strategy by > ``1e-4``) |

A cell is ``pass``, ``refused`` (the run stopped before its first optimizer step with a one-line
error: that line is recorded) or ``FAIL`` (a crash after training started, a non-finite weight or
loss, or a difference over the tolerance).

Run (about 25 minutes on 2 shared CPU cores, most of it torch_compile; ``--features``/``--strategies``/``--archs`` pick a subset)::

    python benchmarks/compat_matrix.py --out benchmarks/results/compat_matrix.json --markdown

``tests/test_compat_matrix.py`` runs a subset of the cells through :func:`run_cell` and checks that
the table in ``docs/benchmarks.md`` is the one :func:`markdown_table` renders from the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import NO_DROPOUT_BY_ARCH  # noqa: E402

STRATEGIES = ("replay", "ewc", "lwf", "gem", "agem", "packnet", "pnn", "olora")
FEATURES = ("gradient_checkpointing", "bf16", "torch_compile", "lora")
ARCHS = ("gpt2", "llama", "t5")
# Stated tolerances (see the module docstring): weights for the exact features, eval loss for bf16.
TOLERANCE = {"gradient_checkpointing": 1e-4, "torch_compile": 1e-4, "bf16": 0.05, "lora": 1e-4}
# Options that keep every run to seconds.
OPTIONS: dict[str, dict[str, Any]] = {
    "replay": {"buffer_size": 16},
    "ewc": {"fisher_samples": 16},
    "lwf": {},
    "gem": {"memory_per_task": 8},
    "agem": {"memory_per_task": 8},
    "packnet": {"retrain_epochs": 1},
    "pnn": {"lateral_rank": 4},
    "olora": {"lora_rank": 4},
}
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}
TASKS = ("copy", "reverse")

_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from clm_hf.tasks import build_tokenizer

        _TOKENIZER = build_tokenizer()
    return _TOKENIZER


def _stream(num_train: int):
    from clm_hf.tasks import make_suite

    # One sequence length: every batch has the same shape, so torch.compile compiles once per mode.
    return make_suite(list(TASKS), num_train=num_train, num_eval=8, seed=0, min_len=3, max_len=3)


def _model(arch: str, lora: bool):
    from clm_hf.tasks import build_tiny_model

    model = build_tiny_model(arch, _tokenizer(), **NO_DROPOUT_BY_ARCH[arch])
    if lora:
        import peft

        torch.manual_seed(0)  # LoRA's A is drawn from the global RNG
        task_type = "SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM"
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch],
                                                           task_type=task_type))
    return model


class _StepCounter:
    """Counts optimizer steps, to tell a start-up refusal from a failure during training."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        counter = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                counter.steps += 1

        self.steps = 0
        self.callback = _CB()


def train_once(arch: str, strategy: str | None, *, lora: bool = False, num_train: int = 16,
               out_dir: str | Path, **flags: Any) -> dict[str, Any]:
    """Train a tiny ``arch`` model on the 2-task stream with ``strategy`` (``None``: plain fine-tuning).

    Args:
        arch (`str`): ``"gpt2"``, ``"llama"`` or ``"t5"``.
        strategy (`str`, *optional*): a registered strategy name, run with :data:`OPTIONS`.
        lora (`bool`): wrap the model in a PEFT LoRA ``PeftModel`` first.
        num_train (`int`): training rows per task (batch 8, one epoch).
        out_dir (`str` or `Path`): the run's ``output_dir``.
        **flags: extra ``TrainingArguments`` (``gradient_checkpointing=True``, ``bf16=True``, ...).

    Returns:
        `dict`: ``status`` (``"ok"``, ``"refused"`` or ``"error"``), and when ``ok`` the final
        ``weights`` (float32 copies of the bare model's state dict), the eval ``loss`` matrix and
        ``base`` (whether every frozen base weight is unchanged, LoRA runs only); otherwise ``error``.

    >>> run = train_once("gpt2", "ewc", out_dir="/tmp/compat-doc", gradient_checkpointing=True)  # doctest: +SKIP
    """
    from clm_hf import (ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments,
                        ContinualTrainingArguments)
    from clm_hf.strategies import build_strategy
    from clm_hf.strategies.base import unwrap_model
    from transformers.trainer_callback import PrinterCallback

    seq2seq = arch == "t5"
    counter = _StepCounter()
    try:
        model = _model(arch, lora)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad} if lora else {}
        args_class = ContinualSeq2SeqTrainingArguments if seq2seq else ContinualTrainingArguments
        args = args_class(output_dir=str(out_dir), num_train_epochs=1, learning_rate=3e-3, per_device_train_batch_size=8,
                          per_device_eval_batch_size=8, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                          logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                          dataloader_pin_memory=False, save_continual_state=False, eval_metrics=["loss"],
                          primary_metric="loss", **flags)
        strategies = [build_strategy(strategy, **OPTIONS[strategy])] if strategy else []
        trainer_class = ContinualSeq2SeqTrainer if seq2seq else ContinualCausalLMTrainer
        trainer = trainer_class(model=model, args=args, processing_class=_tokenizer(), strategies=strategies,
                                callbacks=[counter.callback])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log dict
        results = trainer.fit(_stream(num_train))
    except Exception as err:  # noqa: BLE001 - every failure is a cell's outcome
        line = f"{type(err).__name__}: {err}"
        one_line = "\n" not in str(err).strip()
        # A refusal is a deliberate start-up check (NotImplementedError/ValueError, one line, before
        # any step); any other exception, or one raised once training started, is a failure.
        deliberate = isinstance(err, (NotImplementedError, ValueError))
        status = "refused" if counter.steps == 0 and one_line and deliberate else "error"
        return {"status": status, "error": line if one_line else line.splitlines()[0] + " [...]"}
    bare = unwrap_model(trainer.model)
    weights = {k: v.detach().float().clone() for k, v in bare.state_dict().items() if v.is_floating_point()}
    base_same = all(torch.equal(p, dict(bare.named_parameters())[n]) for n, p in frozen.items()
                    if n in dict(bare.named_parameters())) if lora else None
    probe: dict[str, Any] = {
        # What the feature actually switched on, so a silently ignored flag cannot pass as "same result".
        "checkpointing": any(getattr(m, "gradient_checkpointing", False) is True for m in bare.modules()),
        "mixed_precision": str(getattr(trainer.accelerator, "mixed_precision", "no")),
        "compiled": any(hasattr(m, "_orig_mod") for m in (trainer.model, getattr(trainer, "model_wrapped", None))
                        if m is not None),
    }
    for strat in strategies:  # GEM/A-GEM change weights only on a violated constraint: record what they computed
        refs = getattr(strat, "_refs", None)
        if isinstance(refs, torch.Tensor):
            probe["reference_grad_norm"] = float(refs.norm())
            probe["projected_steps"] = strat.projected_steps
    return {"status": "ok", "weights": weights, "loss": results.matrix("loss"), "base": base_same, "probe": probe}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return math.inf
    return max((float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0) for k in a)


def _finite(run: dict[str, Any]) -> bool:
    return all(bool(torch.isfinite(w).all()) for w in run["weights"].values()) and all(
        v is not None and math.isfinite(v) for row in run["loss"] for v in row if v is not None)


def _loss_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(abs(x - y) for ra, rb in zip(a["loss"], b["loss"]) for x, y in zip(ra, rb)
               if x is not None and y is not None)


def run_cell(strategy: str, feature: str, arch: str, *, num_train: int = 16, work_dir: str | Path | None = None,
             cache: dict | None = None) -> dict[str, Any]:
    """Run one cell of the matrix and classify it.

    Args:
        strategy (`str`): a name in :data:`STRATEGIES`.
        feature (`str`): a name in :data:`FEATURES`.
        arch (`str`): a name in :data:`ARCHS`.
        num_train (`int`): training rows per task (8 per step).
        work_dir (`str` or `Path`, *optional*): where the runs write; a temporary folder by default.
        cache (`dict`, *optional*): reference runs shared between cells (the plain run of a
            strategy and arch serves three features).

    Returns:
        `dict`: ``strategy``, ``feature``, ``arch``, ``status`` (``"pass"``, ``"refused"``,
        ``"FAIL"``), ``detail`` (the measured difference, or the one-line error), ``diff``,
        ``tolerance`` and ``seconds``.

    >>> run_cell("ewc", "gradient_checkpointing", "gpt2")["status"]  # doctest: +SKIP
    'pass'
    """
    cache = {} if cache is None else cache
    start = time.perf_counter()
    tol = TOLERANCE[feature]
    cell: dict[str, Any] = {"strategy": strategy, "feature": feature, "arch": arch, "tolerance": tol, "diff": None}
    with contextlib.ExitStack() as stack:
        root = Path(work_dir) if work_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))

        def run(key: tuple, strat: str | None, lora: bool, **flags: Any) -> dict[str, Any]:
            if key not in cache:
                cache[key] = train_once(arch, strat, lora=lora, num_train=num_train,
                                        out_dir=root / "_".join(str(k) for k in key), **flags)
            return cache[key]

        if feature == "lora":
            reference = run((arch, strategy, "lora"), strategy, True)
            candidate = run((arch, strategy, "lora_gc"), strategy, True, gradient_checkpointing=True)
        else:
            reference = run((arch, strategy, "plain"), strategy, False)
            flag = {"bf16": {"bf16": True, "use_cpu": True}, "torch_compile": {"torch_compile": True},
                    "gradient_checkpointing": {"gradient_checkpointing": True}}[feature]
            candidate = run((arch, strategy, feature), strategy, False, **flag)
        cell.update(_classify(feature, reference, candidate, tol))
        if cell["status"] == "pass" and feature == "lora":
            without = run((arch, None, "lora_gc"), None, True, gradient_checkpointing=True)
            grad_norm = candidate["probe"].get("reference_grad_norm")
            if without["status"] == "ok" and _max_diff(candidate["weights"], without["weights"]) <= tol:
                if grad_norm:  # no constraint was violated in these steps, but the memory gradients are real
                    cell["detail"] += (f"; no step projected, memory gradients norm {grad_norm:.1e} "
                                       f"reach the adapters")
                else:
                    cell.update(status="FAIL", detail="the strategy did not change the LoRA run's weights")
            elif not candidate["base"]:
                cell.update(status="FAIL", detail="a frozen base weight changed")
    cell["seconds"] = round(time.perf_counter() - start, 1)
    return cell


def _classify(feature: str, reference: dict[str, Any], candidate: dict[str, Any], tol: float) -> dict[str, Any]:
    if reference["status"] != "ok":
        # Without the feature the run itself does not work: not a compatibility result.
        return {"status": "refused" if reference["status"] == "refused" else "FAIL",
                "detail": f"without {feature}: {reference['error']}"}
    if candidate["status"] == "refused":
        return {"status": "refused", "detail": candidate["error"]}
    if candidate["status"] != "ok":
        return {"status": "FAIL", "detail": candidate["error"]}
    probe = candidate.get("probe", {})
    if feature in ("gradient_checkpointing", "lora") and not probe.get("checkpointing"):
        return {"status": "FAIL", "detail": "gradient_checkpointing=True left no module checkpointing"}
    if feature == "bf16" and probe.get("mixed_precision") != "bf16":
        return {"status": "FAIL", "detail": f"bf16=True trained with mixed_precision={probe.get('mixed_precision')}"}
    if not _finite(candidate):
        return {"status": "FAIL", "detail": "non-finite weights or loss"}
    if feature == "bf16":
        diff = _loss_diff(reference, candidate)
        what = "eval loss"
    else:
        diff = _max_diff(reference["weights"], candidate["weights"])
        what = "weights"
    if math.isinf(diff):
        return {"status": "FAIL", "diff": None, "detail": "the runs' weights have different names"}
    status = "pass" if diff <= tol else "FAIL"
    return {"status": status, "diff": diff, "detail": f"{what} max abs diff {diff:.1e}"}


def markdown_table(cells: list[dict[str, Any]]) -> str:
    """The matrix as markdown: one row per strategy, one column per (feature, arch).

    A cell reads ``pass``, ``refused¹`` (numbered, the lines follow the table) or ``FAIL``.

    >>> print(markdown_table([{"strategy": "ewc", "feature": "bf16", "arch": "gpt2", "status": "pass"}]))
    | strategy | bf16 gpt2 |
    | --- | --- |
    | ewc | pass |
    """
    features = [f for f in FEATURES if any(c["feature"] == f for c in cells)]
    archs = [a for a in ARCHS if any(c["arch"] == a for c in cells)]
    strategies = [s for s in STRATEGIES if any(c["strategy"] == s for c in cells)]
    columns = [(f, a) for f in features for a in archs]
    by_key = {(c["strategy"], c["feature"], c["arch"]): c for c in cells}
    notes: list[str] = []
    lines = ["| strategy | " + " | ".join(f"{f} {a}" for f, a in columns) + " |",
             "| --- | " + " | ".join("---" for _ in columns) + " |"]
    for s in strategies:
        row = []
        for f, a in columns:
            c = by_key.get((s, f, a))
            if c is None:
                row.append("")
                continue
            label = c["status"]
            if c["status"] != "pass":
                note = c.get("detail", "").replace("|", "\\|")
                if note not in notes:
                    notes.append(note)
                label += f" ({notes.index(note) + 1})"
            row.append(label)
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    if notes:
        lines.append("")
        lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


DOCS_START, DOCS_END = "<!-- compat-matrix:start -->\n", "\n<!-- compat-matrix:end -->"


def write_docs_table(results: str | Path, docs: str | Path) -> None:
    """Put :func:`markdown_table` of the JSON ``results`` between the compat-matrix markers of ``docs``.

    >>> write_docs_table("benchmarks/results/compat_matrix.json", "docs/benchmarks.md")  # doctest: +SKIP
    """
    cells = json.loads(Path(results).read_text())["cells"]
    text = Path(docs).read_text()
    if DOCS_START not in text or DOCS_END not in text:
        raise ValueError(f"{docs} has no '{DOCS_START.strip()}' ... '{DOCS_END.strip()}' markers for the table.")
    head, rest = text.split(DOCS_START, 1)
    tail = rest.split(DOCS_END.strip(), 1)[1]
    Path(docs).write_text(head + DOCS_START + markdown_table(cells) + "\n" + DOCS_END.strip() + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--features", default=",".join(FEATURES))
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--num-train", type=int, default=16, help="training rows per task (8 per step)")
    parser.add_argument("--out", default="benchmarks/results/compat_matrix.json")
    parser.add_argument("--markdown", action="store_true", help="print the markdown table at the end")
    parser.add_argument("--update", action="store_true",
                        help="keep the cells already in --out that this call does not rerun (the commands are listed)")
    parser.add_argument("--docs", default=None, help="also write the table of --out into this markdown file's markers")
    ns = parser.parse_args(argv)
    from benchmarks._common import quiet

    quiet()
    torch.set_num_threads(1)
    cells = []
    cache: dict = {}
    for arch in ns.archs.split(","):
        for strategy in ns.strategies.split(","):
            for feature in ns.features.split(","):
                cell = run_cell(strategy, feature, arch, num_train=ns.num_train, cache=cache)
                cells.append(cell)
                print(f"{arch:6} {strategy:8} {feature:23} {cell['status']:8} {cell['seconds']:6.1f}s  {cell.get('detail', '')}",
                      flush=True)
            for key in [k for k in cache if k[0] == arch and k[1] == strategy]:
                del cache[key]  # keep memory flat: only the per-arch LoRA baseline is shared
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    commands = ["python benchmarks/compat_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:])]
    if ns.update and out.exists():
        old = json.loads(out.read_text())
        rerun = {(c["strategy"], c["feature"], c["arch"]) for c in cells}
        cells = [c for c in old["cells"] if (c["strategy"], c["feature"], c["arch"]) not in rerun] + cells
        commands = old.get("commands", [old.get("command")]) + commands
    order = {name: i for i, name in enumerate(ARCHS + STRATEGIES + FEATURES)}
    cells.sort(key=lambda c: (order[c["arch"]], order[c["strategy"]], order[c["feature"]]))
    payload = {"commands": commands, "tolerance": TOLERANCE, "num_train": ns.num_train, "torch": torch.__version__,
               "cells": cells}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    if ns.markdown:
        print(markdown_table(cells))
    if ns.docs:
        write_docs_table(out, ns.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
