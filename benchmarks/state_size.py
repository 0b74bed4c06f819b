"""Bytes of strategy state per trainable parameter, full fine-tuning and LoRA, and what that means for a 7B model.

For every strategy configuration, two short tasks are trained on a tiny GPT-2 at two widths (so that
state which grows with the model can be told from state which does not), in full fine-tuning and
with a PEFT LoRA adapter. After the second task, and at the end of its training (mid-task, where LwF
holds its teacher and PackNet its held values), the script counts:

- ``live``: bytes of every tensor the strategy object holds (walked through its attributes, storages
  counted once, the model's own parameters and buffers excluded; ``benchmarks/memory.py``'s walker);
- ``persisted``: bytes the strategy writes into a continual checkpoint (``save_state`` into a
  folder: ``*.safetensors`` tensors, Arrow row folders, JSON);
- ``growth``: bytes of parameters the strategy adds to the model for the second task (PNN's column
  or adapter, O-LoRA's adapter): what every further task adds;
- ``rows``: dataset rows it holds (replay buffer, GEM memories, LwF's cached teacher rows).

Per-parameter state (Fisher, anchor, teacher, masks, reference-gradient buffers) and per-row state
(memories) are split by fitting ``bytes = a * P + b`` over the two widths, ``P`` the trainable
parameters the strategy sees: ``a`` is bytes per trainable parameter, ``b`` the bytes that do not
scale with the model. The 7B projection multiplies ``a`` by the trainable parameters of a
Llama-2-7B-shaped model (full, and LoRA r=16 counted with PEFT on a meta-device model), divided by 8
for FSDP2 on 8 GPUs (state sharded like the parameters). That projection is computed, not measured.

    OMP_NUM_THREADS=1 python benchmarks/state_size.py                     # every config, ~3 min on 1 core
    OMP_NUM_THREADS=1 python benchmarks/state_size.py --configs ewc,lwf --setups full
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from memory import held_memory  # noqa: E402

# name -> strategy specs. The EWC bf16 rows use EWC's state_dtype option.
CONFIGS: dict[str, list[dict[str, Any]]] = {
    "replay": [{"name": "replay"}],
    "ewc": [{"name": "ewc"}],
    "ewc_separate": [{"name": "ewc", "mode": "separate"}],
    "ewc_bf16_fisher": [{"name": "ewc", "state_dtype": "bfloat16_fisher"}],
    "ewc_bf16": [{"name": "ewc", "state_dtype": "bfloat16"}],
    "ewc_separate_bf16": [{"name": "ewc", "mode": "separate", "state_dtype": "bfloat16"}],
    "lwf": [{"name": "lwf"}],
    "lwf_cached": [{"name": "lwf", "cache_teacher": True}],
    "gem": [{"name": "gem"}],
    "agem": [{"name": "agem"}],
    "packnet": [{"name": "packnet"}],
    "pnn": [{"name": "pnn"}],
    "pnn_lora": [{"name": "pnn", "mode": "lora", "lora_rank": 4}],
    "olora": [{"name": "olora", "lora_rank": 4}],
}
# Strategies that wrap the model in their own adapters: they are the LoRA setup themselves.
OWN_ADAPTERS = {"pnn_lora", "olora"}
# PNN's columns copy the whole model per task: a full fine-tuning method (pnn_lora is its LoRA form).
FULL_ONLY = {"pnn"}
WIDTHS = (32, 64)  # hidden sizes of the two tiny GPT-2s (2 layers)
LORA_RANK = 4
# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json): the shape the 7B projection counts parameters of.
LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
             "tie_word_embeddings": False}
SHARDS = 8


def _setups(config: str, setups: list[str]) -> list[str]:
    if config in OWN_ADAPTERS:
        return ["lora"] if "lora" in setups else []
    if config in FULL_ONLY:
        return ["full"] if "full" in setups else []
    return setups


def _wrap_lora(model):
    import peft

    lora = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["c_attn"], task_type="CAUSAL_LM",
                           fan_in_fan_out=True)
    return peft.get_peft_model(model, lora)


def _disk_bytes(folder: Path) -> dict[str, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    tensors = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    return {"tensor_bytes": tensors, "other_bytes": sum(p.stat().st_size for p in files) - tensors}


def measure(config: str, setup: str, width: int, rows_per_task: int, seq_len: int) -> dict[str, Any]:
    """Train 2 tasks with ``config`` on a GPT-2 of ``width``; the state it holds and writes, in bytes."""
    from transformers import TrainerCallback

    from clm_hf.strategies import strategies_from_specs

    strategies = strategies_from_specs(CONFIGS[config])
    model = C.build_model({"hidden_size": width, "num_layers": 2, "num_heads": 4})
    if setup == "lora" and config not in OWN_ADAPTERS:
        model = _wrap_lora(model)
    base_total = C.count_parameters(model)
    stream = C.task_rows(2, rows_per_task, seq_len)
    record: dict[str, Any] = {"config": config, "setup": setup, "width": width, "base_total": base_total}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = C.make_trainer(model, strategies, tmp, batch_size=4)

        class InTask(TrainerCallback):
            """At the end of a task's train(): what a mid-task checkpoint holds and writes."""

            live, rows, row_bytes, work, persisted = 0, 0, 0, 0, {"tensor_bytes": 0, "other_bytes": 0}

            def on_train_end(self, args, state, control, **kwargs):
                held = [held_memory(s, trainer.model) for s in trainer.strategies]
                InTask.live = sum(h["tensor_bytes"] for h in held)
                InTask.work = sum(h["work_bytes"] for h in held)  # reused work buffers, not per-parameter state
                InTask.rows, InTask.row_bytes = sum(h["rows"] for h in held), sum(h["row_bytes"] for h in held)
                InTask.persisted = _save(trainer, Path(tmp) / "mid")

        trainer.add_callback(InTask())
        trainable = None
        for index, (task_id, rows) in enumerate(stream):
            trainer.train_task(rows, task_id=task_id)
            if index == 0:
                # What the strategy's state scales with: the trainable parameters of the first task
                # (PNN and O-LoRA add their own for later tasks; that is their growth).
                trainable = _trainable(trainer)
                after_first = _param_bytes(trainer.model)
        held = [held_memory(s, trainer.model) for s in trainer.strategies]
        record.update(
            trainable=trainable,
            live_between=sum(h["tensor_bytes"] for h in held),
            live_in_task=InTask.live,
            work_in_task=InTask.work,
            rows_in_task=InTask.rows,
            row_bytes_in_task=InTask.row_bytes,
            rows=sum(h["rows"] for h in held),
            row_bytes=sum(h["row_bytes"] for h in held),
            persisted_between=_save(trainer, Path(tmp) / "end"),
            persisted_in_task=InTask.persisted,
            growth_bytes=_param_bytes(trainer.model) - after_first,
        )
        packnet = next((s for s in trainer.strategies if s.name == "packnet"), None)
        if packnet is not None:
            record["prunable"] = sum(own.numel() for own in packnet.ownership.values())
    return record


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _trainable(trainer) -> int:
    return sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


def _save(trainer, folder: Path) -> dict[str, int]:
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    for i, strategy in enumerate(trainer.strategies):
        strategy.save_state(folder / f"{i}-{strategy.name}")
    return _disk_bytes(folder)


def ewc_bf16_error(width: int, rows_per_task: int, seq_len: int, epochs: int = 3) -> dict[str, Any]:
    """EWC's penalty and gradient with bf16 state against fp32 state, on the Fisher and anchor of a real task.

    Task 1 is trained and EWC (online, default λ) estimates its Fisher in fp32; task 2 trains under
    that penalty. At two points, θ = θ* (the start of task 2) and θ at the end of task 2, the penalty
    and its gradient are computed from the same fp32 state, and from it rounded to the dtypes of
    ``state_dtype="bfloat16"`` (both bf16) and ``"bfloat16_fisher"`` (bf16 Fisher, fp32 anchor).
    """
    import copy

    import torch

    from clm_hf import EWC
    from clm_hf.strategies.base import trainable_parameters

    model = C.build_model({"hidden_size": width, "num_layers": 2, "num_heads": 4})
    stream = C.task_rows(2, rows_per_task, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        ewc = EWC()
        trainer = C.make_trainer(model, [ewc], tmp, batch_size=4, num_train_epochs=epochs)
        trainer.train_task(stream[0][1], task_id=stream[0][0])
        state = copy.deepcopy(ewc.state_dict())
        at_anchor = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
        trainer.train_task(stream[1][1], task_id=stream[1][0])
    params = trainable_parameters(model)
    after = {n: p.detach().clone() for n, p in params.items()}
    variants = {"fp32": EWC(), "bfloat16": EWC(state_dtype="bfloat16"),
                "bfloat16_fisher": EWC(state_dtype="bfloat16_fisher")}
    out: dict[str, Any] = {"width": width, "trainable": sum(p.numel() for p in params.values()),
                           "ewc_lambda": EWC().config.ewc_lambda}
    for point, values in (("at_anchor", at_anchor), ("end_of_task_2", after)):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(values[name])
        results = {}
        for label, strategy in variants.items():
            strategy.load_state_dict(state)  # rounded to the variant's state dtypes
            strategy._bind(model)
            penalty = strategy.penalty()
            grads = torch.autograd.grad(penalty, list(params.values()))
            results[label] = (penalty.detach(), torch.cat([g.reshape(-1) for g in grads]))
        reference_penalty, reference_grad = results["fp32"]
        out[point] = {"penalty_fp32": float(reference_penalty), "grad_norm_fp32": float(reference_grad.norm())}
        for label in ("bfloat16", "bfloat16_fisher"):
            penalty, grad = results[label]
            out[point][label] = {
                "penalty_dtype": str(penalty.dtype), "penalty": float(penalty),
                "penalty_abs_error": float((penalty - reference_penalty).abs()),
                "grad_norm": float(grad.norm()),
                "grad_error_norm": float((grad - reference_grad).norm()),
            }
    # Errors relative to the end-of-task-2 values (at θ* the fp32 penalty and gradient are 0).
    scale_p, scale_g = out["end_of_task_2"]["penalty_fp32"], out["end_of_task_2"]["grad_norm_fp32"]
    for point in ("at_anchor", "end_of_task_2"):
        for label in ("bfloat16", "bfloat16_fisher"):
            cell = out[point][label]
            cell["penalty_rel_error"] = cell["penalty_abs_error"] / scale_p
            cell["grad_rel_error"] = cell["grad_error_norm"] / scale_g
    return out


def ewc_penalty_time(size: str = "medium", repeats: int = 25) -> dict[str, float]:
    """Median ms of EWC's penalty forward + backward with each ``state_dtype`` (the same random Fisher and anchor)."""
    import time

    import torch

    from clm_hf import EWC
    from clm_hf.strategies.base import trainable_parameters

    torch.manual_seed(0)
    model = C.build_model(size)
    params = trainable_parameters(model)
    state = {"terms": [{"fisher": {n: torch.rand(p.shape) for n, p in params.items()},
                        "anchor": {n: p.detach() + 1e-3 for n, p in params.items()}}]}
    out = {}
    for dtype in ("float32", "bfloat16_fisher", "bfloat16"):
        ewc = EWC(state_dtype=dtype)
        ewc.load_state_dict(state)
        ewc._bind(model)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.autograd.grad(ewc.penalty(), list(params.values()))
            times.append(time.perf_counter() - start)
        out[dtype] = C.median(times[5:]) * 1e3  # the first 5 warm up
    return out


def fit(small: dict[str, Any], large: dict[str, Any], key: str, sub: str | None = None) -> tuple[float, float]:
    """``bytes = a * P + b`` through the two widths: (bytes per trainable parameter, fixed bytes)."""
    def value(r):
        return r[key] if sub is None else r[key][sub]

    a = (value(large) - value(small)) / (large["trainable"] - small["trainable"])
    return a, value(small) - a * small["trainable"]


def llama7b_parameters() -> dict[str, int]:
    """Trainable parameters of a Llama-2-7B-shaped model: full, and PEFT LoRA r=16 (q_proj/v_proj, PEFT's default
    for Llama, and every linear layer of the blocks), counted on the meta device (no memory, no download)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_7B))
    out = {"full": sum(p.numel() for p in model.parameters())}
    for name, targets in (("lora_r16_qv", ["q_proj", "v_proj"]),
                          ("lora_r16_all_linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])):
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                             task_type="CAUSAL_LM"))
        out[name] = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        model = wrapped.unload()  # the plain model again, for the next count
    return out


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        by_key.setdefault((r["config"], r["setup"]), []).append(r)
    for (config, setup), pair in by_key.items():
        small, large = sorted(pair, key=lambda r: r["width"])
        row: dict[str, Any] = {"config": config, "setup": setup, "trainable": [small["trainable"], large["trainable"]]}
        for key in ("live_between", "live_in_task", "growth_bytes", "row_bytes", "row_bytes_in_task"):
            row[f"{key}_per_param"], row[f"{key}_fixed"] = fit(small, large, key)
        for key in ("persisted_between", "persisted_in_task"):
            row[f"{key}_per_param"], row[f"{key}_fixed"] = fit(small, large, key, "tensor_bytes")
            row[f"{key}_other_bytes"] = large[key]["other_bytes"]
        row["rows"], row["rows_in_task"] = large["rows"], large["rows_in_task"]
        if "prunable" in large:
            row["live_between_per_prunable"] = large["live_between"] / large["prunable"]
        rows.append(row)
    return rows


def project(rows: list[dict[str, Any]], counts: dict[str, int]) -> list[dict[str, Any]]:
    """GiB each strategy adds per GPU for a 7B model under FSDP2 on 8 GPUs: per-parameter bytes x P / 8."""
    out = []
    for row in rows:
        per_param = max(row["live_in_task_per_param"], row["live_between_per_param"]) + row["growth_bytes_per_param"]
        targets = {"full": ["full"], "lora": ["lora_r16_qv", "lora_r16_all_linear"]}[row["setup"]]
        entry = {"config": row["config"], "setup": row["setup"], "B_per_param": per_param}
        for target in targets:
            entry[f"GiB_per_gpu_{target}"] = per_param * counts[target] / SHARDS / 2**30
        out.append(entry)
    return out


def _at_large(row: dict[str, Any], key: str) -> float:
    return row[f"{key}_fixed"] + row[f"{key}_per_param"] * row["trainable"][1]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | setup | live B/param between tasks | live B/param in task | persisted B/param (in task) | "
             "growth B/param | rows held between (in) task | Arrow bytes between (in) task |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['setup']} | {r['live_between_per_param']:.2f} | {r['live_in_task_per_param']:.2f} | "
                     f"{r['persisted_between_per_param']:.2f} ({r['persisted_in_task_per_param']:.2f}) | "
                     f"{r['growth_bytes_per_param']:.2f} | {r['rows']} ({r['rows_in_task']}) | "
                     f"{_at_large(r, 'row_bytes'):.0f} ({_at_large(r, 'row_bytes_in_task'):.0f}) |")
    return "\n".join(lines)


def projection_markdown(rows: list[dict[str, Any]], counts: dict[str, int]) -> str:
    """The table of docs/benchmarks.md: measured B/param, and GiB per GPU for a 7B model on 8 GPUs (computed)."""
    by_key = {(r["config"], r["setup"]): r for r in rows}
    lines = [f"| config | B/param, full FT (measured) | GiB per GPU, 7B full FT, FSDP2 x{SHARDS} (computed) | "
             f"B/LoRA param (measured) | MiB per GPU, LoRA r=16 q,v / all linear (computed) | rows (not sharded) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for config in dict.fromkeys(r["config"] for r in rows):
        cells = [config]
        full, lora = by_key.get((config, "full")), by_key.get((config, "lora"))
        for row, targets in ((full, ["full"]), (lora, ["lora_r16_qv", "lora_r16_all_linear"])):
            if row is None:
                cells += ["-", "-"]
                continue
            per_param = max(row["live_in_task_per_param"], row["live_between_per_param"]) + row["growth_bytes_per_param"]
            cells.append(f"{per_param:.2f}")
            if targets == ["full"]:
                cells.append(f"{per_param * counts['full'] / SHARDS / 2**30:.2f}")
            else:
                cells.append(" / ".join(f"{per_param * counts[t] / SHARDS / 2**20:.1f}" for t in targets))
        any_row = full or lora
        cells.append(f"{max(any_row['rows'], any_row['rows_in_task'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="all", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--setups", default="full,lora", help="full, lora or both")
    parser.add_argument("--rows-per-task", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=4)
    parser.add_argument("--bf16-error-width", type=int, default=64,
                        help="width of the model EWC's bf16 state is compared on (0: skip)")
    parser.add_argument("--penalty-timing", action="store_true",
                        help="only time EWC's penalty with each state_dtype on the medium model")
    parser.add_argument("--output", default="benchmarks/results/state_size.json")
    args = parser.parse_args(argv)
    C.quiet()
    if args.penalty_timing:
        timing = {"machine": C.machine(), "load_avg": C.load_average(), "ms": ewc_penalty_time()}
        print(f"EWC penalty forward + backward, medium GPT-2, median ms: {timing['ms']}")
        C.save_json(timing, args.output)
        return timing
    C.registered_strategies()  # import every strategy module
    configs = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"Unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}.")
    setups = args.setups.split(",")
    records = []
    for config in configs:
        for setup in _setups(config, setups):
            for width in WIDTHS:
                records.append(measure(config, setup, width, args.rows_per_task, args.seq_len))
    rows = summarize(records)
    counts = llama7b_parameters()
    projection = project(rows, counts)
    report = {"machine": C.machine(), "settings": vars(args), "widths": WIDTHS, "lora_rank": LORA_RANK,
              "llama2_7b_shape": LLAMA2_7B, "llama2_7b_trainable": counts, "shards": SHARDS,
              "records": records, "rows": rows, "projection": projection}
    print(to_markdown(rows))
    print(f"\nLlama-2-7B shape: {counts}")
    print(projection_markdown(rows, counts))
    for p in projection:
        cells = ", ".join(f"{k[len('GiB_per_gpu_'):]}: {v:.3f} GiB" for k, v in p.items() if k.startswith("GiB"))
        print(f"{p['config']} ({p['setup']}): {p['B_per_param']:.2f} B/param -> {cells} per GPU (computed)")
    if args.bf16_error_width:
        report["ewc_bf16_error"] = error = ewc_bf16_error(args.bf16_error_width, args.rows_per_task, args.seq_len)
        print("\nEWC bf16 state vs fp32 (errors relative to the fp32 penalty / gradient norm at the end of task 2):")
        for point in ("at_anchor", "end_of_task_2"):
            for label in ("bfloat16", "bfloat16_fisher"):
                cell = error[point][label]
                print(f"  {point:14s} {label:16s} penalty rel. error {cell['penalty_rel_error']:.2e}, "
                      f"gradient rel. error {cell['grad_rel_error']:.2e} ({cell['penalty_dtype']})")
    C.save_json(report, args.output)
    return report


if __name__ == "__main__":
    main()
