"""Helpers shared by the benchmark scripts: models, task streams, trainers, machine description.

Every benchmark runs on the CPU with one intra-op thread (``OMP_NUM_THREADS=1``): the figures are
ratios measured side by side in one process, so what matters is that both sides see the same
machine, not its absolute speed.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The two model sizes: a tiny GPT-2 (the demo's, per-op overhead dominates) and a larger one whose
# step is dominated by matrix products (6 layers, width 256), still CPU-feasible.
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4},
    "medium": {"hidden_size": 256, "num_layers": 6, "num_heads": 8},
    # GPU only: the shape of GPT-2 small (12 layers, width 768), for the bf16 runs on a lent GPU.
    "wide": {"hidden_size": 768, "num_layers": 12, "num_heads": 12},
}
# Dropout off, per architecture of clm_hf.tasks.build_tiny_model (runs compared side by side must be deterministic).
NO_DROPOUT_BY_ARCH = {"gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
                      "llama": {"attention_dropout": 0.0}, "t5": {"dropout_rate": 0.0}}
NO_DROPOUT = NO_DROPOUT_BY_ARCH["gpt2"]
# Synthetic tasks whose rows all have the same length for a given sequence length (``count``
# answers with a number, so its rows are shorter: left out).
TASK_CYCLE = ("copy", "reverse", "sort", "shift", "rotate")


def quiet() -> None:
    """Silence the per-task INFO logs, progress bars and tokenizer chatter of the library."""
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from clm_hf.tasks import build_tokenizer

        _TOKENIZER = build_tokenizer(model_max_length=128)  # the models hold 128 positions
    return _TOKENIZER


def build_model(size: str | dict[str, Any], seed: int = 0):
    """A fresh GPT-2 of the named size (``tiny``/``medium``) or of explicit sizes, dropout off."""
    from clm_hf.tasks import build_tiny_model

    sizes = MODELS[size] if isinstance(size, str) else dict(size)
    return build_tiny_model("gpt2", tokenizer(), seed=seed, **sizes, **NO_DROPOUT)


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def task_rows(num_tasks: int, num_rows: int, seq_len: int, seed: int = 0) -> list[tuple[str, Any]]:
    """``num_tasks`` tokenized training sets ``(task_id, rows)`` cycling through :data:`TASK_CYCLE`.

    Every row of every task has the same token length (``2 * seq_len + 4``), so every batch has the
    same shape and step times compare exactly.
    """
    from clm_hf.tasks import make_task, tokenize_for_causal_lm

    out = []
    for i in range(num_tasks):
        name = TASK_CYCLE[i % len(TASK_CYCLE)]
        raw = make_task(name, num_rows, seed=seed + i, min_len=seq_len, max_len=seq_len)
        out.append((f"{name}-{i}", tokenize_for_causal_lm(raw, tokenizer())))
    return out


def training_args(output_dir: str | Path, *, batch_size: int = 16, **overrides):
    """Arguments of a benchmark run: constant LR, no saving, no logging inside the timed window."""
    from clm_hf import ContinualTrainingArguments

    settings = dict(
        output_dir=str(output_dir), num_train_epochs=1, learning_rate=1e-3, per_device_train_batch_size=batch_size,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=10**6, save_strategy="no",
        report_to="none", seed=0, disable_tqdm=True, dataloader_pin_memory=False, dataloader_drop_last=True,
        save_continual_state=False, eval_before_training=False,
    )
    settings.update(overrides)
    return ContinualTrainingArguments(**settings)


def make_trainer(model, strategies, output_dir: str | Path, **arg_overrides):
    from transformers.trainer_callback import PrinterCallback

    from clm_hf import ContinualCausalLMTrainer

    trainer = ContinualCausalLMTrainer(model=model, args=training_args(output_dir, **arg_overrides),
                                       processing_class=tokenizer(), strategies=list(strategies))
    trainer.remove_callback(PrinterCallback)  # the end-of-train() summary line
    return trainer


def registered_strategies() -> list[str]:
    """Every registered strategy, after importing every strategy module (GEM/A-GEM and others live
    in modules the package does not import)."""
    import importlib
    import pkgutil

    import clm_hf.strategies as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in ("base",):
            importlib.import_module(f"{package.__name__}.{module.name}")
    return sorted(n for n in package.STRATEGY_REGISTRY if not n.endswith("_test"))


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy the machine was."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "gpu": torch.cuda.is_available(),
        "load_avg": load_average(),
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def save_json(report: Any, path: str | Path) -> None:
    """Write a benchmark report as JSON, creating the folder."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, save (PNG, creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
