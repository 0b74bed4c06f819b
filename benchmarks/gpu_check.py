"""Helpers of the lent-GPU checks (``benchmarks/gpu_run.sh``); the CPU parts are smoke-tested.

Three sub-commands:

- ``model DIR``: a randomly initialised causal LM with the shape of Qwen2.5-0.5B (24 layers, width
  896, 14 query / 2 key-value heads, its 151,936-token vocabulary, tied embeddings) and the
  synthetic-suite tokenizer, saved with ``save_pretrained`` so that a recipe's ``name_or_path``
  can load it. The GPU machine reaches no Hub, so the real weights cannot be fetched there; the
  figures of a run on this model are throughput and memory, not quality.
- ``compare A B``: compares two ``tests/distributed_driver.py`` outputs run by run (weights and
  every strategy tensor after each task), e.g. one plain GPU process against the same under FSDP2.
- ``gpu-memory CSV``: the peak of an ``nvidia-smi --query-gpu=memory.used`` log, in MiB.

    python benchmarks/gpu_check.py model /tmp/qwen-shape
    python benchmarks/gpu_check.py model /tmp/small --layers 2 --hidden 64 --heads 2 --kv-heads 1 --intermediate 128 --vocab 0
    python benchmarks/gpu_check.py compare /tmp/plain /tmp/fsdp --runs ewc,replay --atol 1e-5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch


def build_model(directory: str | Path, *, layers: int = 24, hidden: int = 896, heads: int = 14, kv_heads: int = 2,
                intermediate: int = 4864, vocab: int = 151936, seed: int = 0) -> dict[str, Any]:
    """Save a random Qwen2-architecture model and the synthetic tokenizer to ``directory``.

    ``vocab=0`` uses the tokenizer's own size. Returns the parameter count and the folder.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from clm_hf.tasks import build_tokenizer

    tokenizer = build_tokenizer(model_max_length=256)
    config = Qwen2Config(
        vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, tie_word_embeddings=True, rope_theta=1_000_000.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {"folder": str(directory), "parameters": sum(p.numel() for p in model.parameters())}


def compare(a: str | Path, b: str | Path, runs: list[str], atol: float) -> dict[str, Any]:
    """Largest difference between two driver outputs, per run, over every tensor after every task."""
    report: dict[str, Any] = {}
    for run in runs:
        files = sorted((Path(a) / run / "rank0").glob("task*_after.pt"))
        if not files:
            report[run] = {"ok": False, "error": f"no output of run {run!r} in {a}"}
            continue
        worst, worst_key, fsdp = 0.0, None, None
        missing: list[str] = []
        for file in files:
            other = Path(b) / run / "rank0" / file.name
            if not other.exists():
                missing.append(str(other))
                continue
            left, right = torch.load(file, weights_only=True), torch.load(other, weights_only=True)
            fsdp = right.get("fsdp")
            for key, value in left.items():
                if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    continue
                if key not in right:
                    missing.append(key)
                    continue
                gap = float((value.double() - right[key].double()).abs().max()) if value.numel() else 0.0
                if gap > worst:
                    worst, worst_key = gap, key
        report[run] = {"ok": not missing and worst <= atol, "max_abs_diff": worst, "at": worst_key,
                       "missing": missing[:5], "second_run_fsdp": fsdp}
    return report


def peak_memory(csv_path: str | Path) -> float | None:
    values = [float(line) for line in Path(csv_path).read_text().split() if line.strip().replace(".", "", 1).isdigit()]
    return max(values) if values else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="save a random Qwen2.5-0.5B-shaped model and the synthetic tokenizer")
    model.add_argument("directory")
    for name, default in (("layers", 24), ("hidden", 896), ("heads", 14), ("kv-heads", 2), ("intermediate", 4864), ("vocab", 151936)):
        model.add_argument(f"--{name}", type=int, default=default)
    cmp = sub.add_parser("compare", help="compare two tests/distributed_driver.py outputs")
    cmp.add_argument("a")
    cmp.add_argument("b")
    cmp.add_argument("--runs", required=True)
    cmp.add_argument("--atol", type=float, default=1e-5)
    mem = sub.add_parser("gpu-memory", help="peak of an nvidia-smi memory.used log (MiB)")
    mem.add_argument("csv")
    args = parser.parse_args(argv)
    if args.command == "model":
        out = build_model(args.directory, layers=args.layers, hidden=args.hidden, heads=args.heads,
                          kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab)
    elif args.command == "compare":
        out = compare(args.a, args.b, [r for r in args.runs.split(",") if r], args.atol)
    else:
        out = {"peak_gpu_memory_mib": peak_memory(args.csv)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
