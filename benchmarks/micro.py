"""Micro-benchmarks behind the optimisations and the diagnoses of docs/benchmarks.md.

Each case times a piece of a strategy's step in isolation, alternating the variants it compares
(median of ``--repeats`` runs, after warm-up):

- ``ewc-penalty``: EWC's penalty + backward, the former per-tensor autograd form against the fused
  ``_QuadraticPenalty``.
- ``packnet-hooks``: PackNet's ``edit_gradients`` + ``after_optimizer_step`` with 25% of the weights
  fixed (the second task), the former ``masked_fill_`` + ``torch.where`` against the current hooks.
- ``fisher-squares``: squaring and summing a rows x parameters block of per-row gradients, with and
  without a new allocation.
- ``gem-breakdown``: where GEM's ``edit_gradients`` spends its time (reference gradients, Gram
  product, flattening), K separate passes against one pass over the same rows and ``vmap`` over groups.
- ``gem-k-steps``: a whole training step with GEM at K = 1 and K = 8 past tasks and 16 memory rows
  per step split over them, the former vmapped references against the current ``"auto"`` (hooked)
  ones, alternated, with the reference pass alone: issue 13's "K = 8 no more than 1.2x K = 1".
- ``lwf-teacher``: a training step, with LwF's live teacher as now and as before issue 13's cuts
  (teacher logits at every position, the KL composed of autograd ops), the live teacher call
  (through ``functional_call`` and through the precomputed parameter slots of ``FunctionalModel``)
  and a bare no-grad forward; ``--vocab 32000`` resizes the embeddings to a real vocabulary.
- ``fisher-row-grads``: EWC's true Fisher over 128 rows with the former per-row gradients
  (``vmap(grad(row_loss))``), the vmapped ones (one vmapped forward over stride-0 weight copies,
  one autograd backward: ``fisher_current``, the default before the hooks) and the default
  ``"auto"`` ones (one plain pass, per-layer per-row gradients squared into the Fisher:
  ``fisher_hooked``), each as a multiple of one training pass over the same rows.
- ``ewc-step``: a training step plain, with EWC's autograd penalty and with its gradient added in
  ``edit_gradients``.
- ``ewc-edit-traffic``: EWC's ``edit_gradients`` from cold caches against plain element-wise passes
  over the same tensors (2 or 3 read, 1 written): how close the edit is to its memory-traffic floor.
- ``fisher-batch-size``: EWC's true Fisher at 16, 32 and 64 rows per vmapped pass against one
  training pass.
- ``pnn-breakdown``: a PNN step with 3 columns, a plain step, and the two frozen columns' no-grad
  forwards alone (the floor of PNN's overhead: issue 13's 1.6x target); and two no-grad backbone
  passes against one over a doubled batch (the most a batched forward over the frozen columns saves).

    OMP_NUM_THREADS=1 python benchmarks/micro.py                  # every case, medium model
    OMP_NUM_THREADS=1 python benchmarks/micro.py --cases gem-breakdown --model tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * C.median(times)


def alternated(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each variant, the variants run in turn ``repeats`` times."""
    for fn in variants.values():
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: round(1e3 * C.median(values), 3) for name, values in times.items()}


def ewc_penalty(model_size: str, repeats: int) -> dict[str, Any]:
    from clm_hf import EWC
    from clm_hf.strategies.base import trainable_parameters

    model = C.build_model(model_size)
    params = trainable_parameters(model)
    gen = torch.Generator().manual_seed(0)
    ewc = EWC(ewc_lambda=3.0)
    ewc.terms = [({n: torch.rand(p.shape, generator=gen) for n, p in params.items()},
                  {n: p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for n, p in params.items()})]
    ewc._bind(model)

    def per_tensor() -> None:  # the former implementation: one autograd expression per tensor
        model.zero_grad(set_to_none=True)
        total = None
        for p, fisher, anchor in zip(ewc._params, ewc._fishers, ewc._anchors):
            term = (fisher * (p.float() - anchor).square()).sum()
            total = term if total is None else total + term
        (0.5 * ewc.config.ewc_lambda * total).backward()

    def fused() -> None:
        model.zero_grad(set_to_none=True)
        ewc.penalty().backward()

    return {"tensors": len(params), "parameters": sum(p.numel() for p in params.values()),
            "ms": alternated({"per_tensor_autograd": per_tensor, "fused": fused}, repeats)}


def packnet_hooks(model_size: str, repeats: int) -> dict[str, Any]:
    from clm_hf.strategies.packnet import PackNet

    model = C.build_model(model_size)
    packnet = PackNet()
    named = dict(model.named_parameters())
    names = packnet.select_prunable(model)
    gen = torch.Generator().manual_seed(0)
    for name in names:
        p = named[name]
        p.grad = torch.randn(p.shape, generator=gen)
        packnet._hold(name, p, torch.rand(p.shape, generator=gen) < 0.25)
    former = [(named[n], fixed, named[n].detach().clone()) for n, (_, fixed, _) in packnet._guard.items()]

    def masked() -> None:  # the former hooks
        for p, fixed, _ in former:
            p.grad.masked_fill_(fixed, 0.0)
        with torch.no_grad():
            for p, fixed, values in former:
                torch.where(fixed, values, p, out=p)

    def current() -> None:
        packnet.edit_gradients(model)
        packnet.after_optimizer_step(model)

    return {"prunable": sum(named[n].numel() for n in names), "fixed_share": 0.25,
            "ms": alternated({"masked_fill_and_where": masked, "foreach_and_index": current}, repeats)}


def fisher_squares(model_size: str, repeats: int, rows: int = 16) -> dict[str, Any]:
    parameters = C.count_parameters(C.build_model(model_size))
    block = torch.randn(rows, parameters)
    work = block.clone()

    def allocating() -> None:
        work.copy_(block)
        work.float().square().sum(0)

    def in_place() -> None:
        work.copy_(block)
        work.square_().sum(0)

    copy_only = timed(lambda: work.copy_(block), repeats)
    ms = alternated({"square_then_sum": allocating, "square_in_place_then_sum": in_place}, repeats)
    return {"rows": rows, "parameters": parameters, "ms": {k: round(v - copy_only, 3) for k, v in ms.items()}}


def gem_breakdown(model_size: str, repeats: int, past: int = 5, rows_per_task: int = 4) -> dict[str, Any]:
    from torch.func import functional_call, grad, vmap

    from clm_hf.data import ContinualDataCollator
    from clm_hf.strategies.base import trainable_parameters
    from clm_hf.strategies._functional import no_padding_warning
    from clm_hf.strategies.gem import GEM, project_gem_

    model = C.build_model(model_size)
    tasks = C.task_rows(past, max(16, rows_per_task), 8)
    gem = GEM(memory_per_task=64, memory_batch_size=rows_per_task)
    gem.memories = {tid: rows.select_columns(["input_ids", "attention_mask", "labels"]) for tid, rows in tasks}

    class _Trainer:  # what GEM reads from its trainer
        data_collator = ContinualDataCollator(pad_token_id=C.tokenizer().pad_token_id)
        state = None

    gem.trainer = _Trainer()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    params = gem._bind(model, past)
    bank = gem.memory_bank(params[0].device)
    batches = [bank.batch(rows) for rows in gem.draw(bank, 0)]
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    train_ids = torch.tensor(tasks[0][1]["input_ids"][:16])
    train_labels = torch.tensor(tasks[0][1]["labels"][:16])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    named = trainable_parameters(model)
    plist = list(named.values())
    detached = {n: p.detach() for n, p in named.items()}

    def plain_step() -> None:
        model(input_ids=train_ids, labels=train_labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def one_pass() -> None:
        torch.autograd.grad(model(input_ids=ids, labels=labels).loss, plist)

    def separate_passes() -> None:
        for b in batches:
            torch.autograd.grad(model(input_ids=b["input_ids"], labels=b["labels"]).loss, plist)

    def vmap_groups() -> None:
        def loss(trainable, i, lab):
            return functional_call(model, trainable, args=(), kwargs={"input_ids": i, "labels": lab}).loss

        with no_padding_warning(model):
            vmap(grad(loss), in_dims=(None, 0, 0))(detached, ids.view(past, rows_per_task, -1),
                                                   labels.view(past, rows_per_task, -1))

    model.eval()
    passes = alternated({"K_separate_passes": separate_passes, "one_pass_same_rows": one_pass,
                         "vmap_over_groups": vmap_groups}, repeats)
    model.train()
    parts = {
        "plain_step": timed(plain_step, repeats),
        "edit_gradients": timed(lambda: gem.edit_gradients(model), repeats),
        "reference_gradients": timed(lambda: gem._fill_references(model, params, batches), repeats),
        "gram_and_projection": timed(lambda: project_gem_(gem._flat.clone(), gem._refs, 0.5), repeats),
        "flatten_gradient": timed(lambda: [v.copy_(p.grad) for v, p in zip(gem._flat_views, params)], repeats),
    }
    return {"past_tasks": past, "rows_per_task": rows_per_task, "ms": {**{k: round(v, 3) for k, v in parts.items()}, **passes}}


def gem_k_steps(model_size: str, repeats: int, many: int = 8, rows: int = 16, batch: int = 16) -> dict[str, Any]:
    """A whole training step with GEM at K = 1 and K = ``many`` past tasks, ``rows`` memory rows per step
    split over them, each K with the former ``"vmap"`` references and the current ``"auto"`` ones
    (``"hooks"`` on GPT-2), all alternated in one process; and the reference pass alone."""
    from clm_hf.data import ContinualDataCollator
    from clm_hf.strategies.gem import GEM

    tasks = C.task_rows(many + 1, 64, 8)
    train = tasks[-1][1]
    train_batch = {k: torch.tensor(train[k][:batch]) for k in ("input_ids", "attention_mask", "labels")}

    class _Trainer:  # what GEM reads from its trainer
        data_collator = ContinualDataCollator(pad_token_id=C.tokenizer().pad_token_id)
        state = None

    steps, passes = {}, {}
    for k in (1, many):
        for method in ("vmap", "auto"):
            if k == 1 and method == "vmap":
                continue  # at K = 1 "auto" was and is one plain backward
            model = C.build_model(model_size)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            gem = GEM(memory_per_task=64, memory_batch_size=max(1, rows // k), reference_method=method)
            gem.memories = {tid: r.select_columns(["input_ids", "attention_mask", "labels"]) for tid, r in tasks[:k]}
            gem.trainer = _Trainer()

            def step(model=model, gem=gem, optimizer=optimizer) -> None:
                model(**train_batch).loss.backward()
                gem.edit_gradients(model)
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)

            def references(model=model, gem=gem) -> None:
                params = gem._bind(model, k)
                bank = gem.memory_bank(params[0].device)
                gem._fill_references(model, params, None, bank=bank, selections=gem.draw(bank, 0))

            name = f"K{k}_{gem._reference_method(model, None, k)}"
            steps[name], passes[name] = step, references
    model = C.build_model(model_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def plain() -> None:
        model(**train_batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    # The projection when every constraint is violated (g = -Σ g_k), the Gram matrix formed as
    # before (one G @ G.T) and now (gram_matrix), on the K x P references of the last pass.
    from clm_hf.strategies.gem import gram_matrix, project_gem_

    projections = {}
    for k in (1, many):
        refs = torch.randn(k, C.count_parameters(model, trainable_only=True), generator=torch.Generator().manual_seed(k))
        g = -refs.sum(0)
        projections[f"projection_violated_K{k}"] = lambda refs=refs, g=g: project_gem_(g.clone(), refs, 0.5)
        if k == many:
            projections[f"gram_one_product_K{k}"] = lambda refs=refs: refs @ refs.T
            projections[f"gram_blocks_K{k}"] = lambda refs=refs: gram_matrix(refs)
    ms = alternated({"plain_step": plain, **{f"step_{n}": f for n, f in steps.items()},
                     **{f"references_{n}": f for n, f in passes.items()}, **projections}, repeats)
    base = ms["step_K1_per_task"]
    return {"rows_per_step": rows, "many": many, "ms": ms,
            "step_vs_K1": {n: round(ms[f"step_{n}"] / base, 3) for n in steps},
            "references_vs_K1": {n: round(ms[f"references_{n}"] / ms["references_K1_per_task"], 3) for n in steps}}


def lwf_teacher(model_size: str, repeats: int, vocab: int = 0) -> dict[str, Any]:
    from clm_hf.strategies.lwf import LwF, _teacher_logits

    model = C.build_model(model_size)
    if vocab:  # a real vocabulary: the LM head and the KL weigh as in a real model
        model.resize_token_embeddings(vocab)
    lwf = LwF()
    lwf.teacher = lwf.snapshot(model)
    rows = C.task_rows(1, 16, 8)[0][1]  # prompt (11 tokens) + completion (9): labels -100 on the prompt
    batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask", "labels")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def step_with_lwf() -> None:
        out = model(**batch)
        (out.loss + lwf.loss(model, batch, out)["lwf_distillation"]).backward()
        optimizer.step()
        optimizer.zero_grad()

    from clm_hf.strategies._functional import FunctionalModel

    slots = FunctionalModel(model, {n: p for n, p in model.named_parameters() if p.requires_grad})

    def step_with_lwf_former() -> None:  # before the cuts: teacher logits at every position, composed KL
        out = model(**batch)
        teacher = _teacher_logits(model, lwf.teacher, dict(batch), False, switch_to_eval=False, forward=slots)[:, :-1]
        student, mask = out.logits[:, :-1], batch["labels"][:, 1:] != -100
        t = lwf.config.temperature
        log_p_s = torch.log_softmax(student[mask].float() / t, dim=-1)
        log_p_t = torch.log_softmax(teacher[mask].float() / t, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
        (out.loss + lwf.config.alpha * t**2 * kl.sum() / mask.sum().clamp_min(1)).backward()
        optimizer.step()
        optimizer.zero_grad()

    def bare_forward() -> None:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    ms = alternated({"train_step": step, "train_step_with_lwf": step_with_lwf,
                     "train_step_with_lwf_former": step_with_lwf_former,
                     "teacher_call_functional_call": lambda: _teacher_logits(model, lwf.teacher, dict(batch), False),
                     "teacher_call_slots": lambda: _teacher_logits(model, lwf.teacher, dict(batch), False, forward=slots),
                     "bare_no_grad_forward": bare_forward}, repeats)
    return {"vocab": model.get_output_embeddings().weight.shape[0], "ms": ms,
            "ratio_to_train_step": {k: round(ms[k] / ms["train_step"], 3)
                                    for k in ("train_step_with_lwf", "train_step_with_lwf_former", "bare_no_grad_forward")}}


def fisher_row_grads(model_size: str, repeats: int, rows: int = 128) -> dict[str, Any]:
    import clm_hf.strategies.ewc as ewc
    from clm_hf.strategies._functional import batchable_attention

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from between_tasks import training_pass

    def former(forward, seq2seq):  # the per-row gradients before issue 13: a grad transform under vmap
        from torch.func import grad, vmap

        def loss(weights, inputs, labels, uniforms):
            logits = forward(weights, **{k: t.unsqueeze(0) for k, t in inputs.items()}).logits
            return ewc._row_loss(logits, labels.unsqueeze(0), None if uniforms is None else uniforms.unsqueeze(0), seq2seq)

        row_grad = grad(loss)

        def per_row(weights, inputs, labels, uniforms):
            with batchable_attention():
                return vmap(row_grad, in_dims=(None, 0, 0, None if uniforms is None else 0))(weights, inputs, labels, uniforms)

        return per_row

    current = ewc._vmapped_row_grads
    model = C.build_model(model_size)
    data = C.task_rows(1, rows, 8)[0][1]

    def fisher_with(impl, method="vmap"):
        def run():
            ewc._vmapped_row_grads = impl
            try:
                return ewc.estimate_fisher(model, data, batch_size=16, sampled=True, method=method)
            finally:
                ewc._vmapped_row_grads = current
        return run

    ms = alternated({"fisher_former": fisher_with(former), "fisher_current": fisher_with(current),
                     "fisher_hooked": fisher_with(current, "auto"), "training_pass": training_pass(model, data, 16)}, repeats)
    return {"rows": rows, "ms": ms, "ratio_to_training_pass": {k: round(ms[k] / ms["training_pass"], 3)
                                                               for k in ("fisher_former", "fisher_current", "fisher_hooked")},
            "load_avg": C.load_average()}


def _ewc_with_random_state(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], gen: torch.Generator):
    """An EWC bound to ``model`` with a random Fisher and an anchor 0.01 off the weights, as after a task."""
    from clm_hf import EWC

    ewc = EWC()
    ewc.terms = [({n: torch.rand(p.shape, generator=gen) for n, p in params.items()},
                  {n: p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for n, p in params.items()})]
    ewc._bind(model)
    return ewc


def ewc_step(model_size: str, repeats: int, rows: int = 16) -> dict[str, Any]:
    """A training step (AdamW, clipping at 1.0) plain, with EWC's autograd penalty in the loss (the
    former path, still DeepSpeed's) and with its gradient added to ``.grad`` (``edit_gradients``)."""
    from clm_hf.strategies.base import trainable_parameters

    data = C.task_rows(1, rows, 8)[0][1]
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    model = C.build_model(model_size).train()
    params = trainable_parameters(model)
    gen = torch.Generator().manual_seed(0)
    ewc = _ewc_with_random_state(model, params, gen)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-5)

    def step(loss_of, edit=None):
        def run() -> None:
            loss_of().backward()
            if edit is not None:
                edit(model)
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    def direct(model) -> None:
        ewc._direct = True
        ewc.edit_gradients(model)

    # A second plain variant, run in another slot of the rotation, shows the noise floor of the ratios.
    ms = alternated({"plain_step": step(lambda: model(**batch).loss),
                     "ewc_autograd_penalty": step(lambda: model(**batch).loss + ewc.penalty()),
                     "plain_step_again": step(lambda: model(**batch).loss),
                     "ewc_edit_gradients": step(lambda: model(**batch).loss, direct)}, repeats)
    return {"rows": rows, "parameters": sum(p.numel() for p in params.values()), "ms": ms,
            "ratio_to_plain_step": {k: round(2 * ms[k] / (ms["plain_step"] + ms["plain_step_again"]), 3)
                                    for k in ("ewc_autograd_penalty", "ewc_edit_gradients", "plain_step_again")}}


def ewc_edit_traffic(model_size: str, repeats: int) -> dict[str, Any]:
    """EWC's ``edit_gradients`` (``grad += λ F (θ − θ*)``: θ, θ*, F and the gradient read, the
    gradient written, through one reused scratch buffer) against plain element-wise passes over the
    same tensors, every run from cold caches (64 MiB written before it, untimed), as in a training
    step where the forward and backward have evicted them: its floor in eager PyTorch. The passes:
    ``θ − θ*`` into the scratch (the edit's first op: 2 tensors read, 1 written), ``grad += θ·F``
    (3 read, 1 written: what one fused kernel of the edit's 4 inputs would need at least) and
    ``grad += F`` (2 read, 1 written)."""
    from clm_hf.strategies.base import trainable_parameters

    model = C.build_model(model_size)
    params = trainable_parameters(model)
    gen = torch.Generator().manual_seed(0)
    ewc = _ewc_with_random_state(model, params, gen)
    ewc._direct = True
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)
    thetas, grads = [p.detach() for p in params.values()], [p.grad for p in params.values()]
    buffer = torch.empty(max(t.numel() for t in thetas))
    scratch = [buffer[: t.numel()].view(t.shape) for t in thetas]  # views made once, as the edit's
    evict = torch.empty(64 * 2**20 // 4)

    def sub_into_scratch() -> None:
        for theta, anchor, out in zip(thetas, ewc._anchors, scratch):
            torch.sub(theta, anchor, out=out)

    variants = {"ewc_edit_gradients": lambda: ewc.edit_gradients(model), "sub_into_scratch_2r1w": sub_into_scratch,
                "grad_addcmul_theta_fisher_3r1w": lambda: [g.addcmul_(t, f) for g, t, f in zip(grads, thetas, ewc._fishers)],
                "grad_add_fisher_2r1w": lambda: [g.add_(f) for g, f in zip(grads, ewc._fishers)]}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats + 2):
        for name, fn in variants.items():
            evict.fill_(1.0)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ms = {name: round(1e3 * C.median(values[2:]), 3) for name, values in times.items()}
    return {"parameters": sum(t.numel() for t in thetas), "tensors": len(thetas), "ms": ms}


def fisher_batch_size(model_size: str, repeats: int, rows: int = 128) -> dict[str, Any]:
    """EWC's true Fisher over 128 rows at 16 (the default), 32 and 64 rows per vmapped pass, each as a
    multiple of one training pass over the same rows (batch 16). The Fisher is the same at any of them."""
    import clm_hf.strategies.ewc as ewc

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from between_tasks import training_pass

    model = C.build_model(model_size)
    data = C.task_rows(1, rows, 8)[0][1]
    variants = {f"fisher_{b}_rows": (lambda b=b: ewc.estimate_fisher(model, data, batch_size=b, sampled=True, method="vmap"))
                for b in (16, 32, 64)}
    ms = alternated({**variants, "training_pass": training_pass(model, data, 16)}, repeats)
    return {"rows": rows, "ms": ms, "ratio_to_training_pass": {k: round(ms[k] / ms["training_pass"], 3) for k in variants}}


def pnn_breakdown(model_size: str, repeats: int, rows: int = 16) -> dict[str, Any]:
    """Where a PNN step with 3 columns goes: the two frozen columns' no-grad forwards (what
    ``ProgressiveModel`` runs before the trained column) against a plain training step."""
    from clm_hf.strategies.pnn_model import ProgressiveModel

    data = C.task_rows(1, rows, 8)[0][1]
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    plain = C.build_model(model_size).train()
    pnn = ProgressiveModel(C.build_model(model_size), lateral_rank=32)
    pnn.add_column(), pnn.add_column()
    pnn.train()

    def step(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run() -> None:
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    def frozen_columns() -> None:
        pnn._run_old_columns(2, {"input_ids": ids})

    # What one batched forward over the two frozen columns could save at best: two no-grad
    # backbone passes over the rows against one over the rows twice (a stacked-weight batched
    # forward does the same arithmetic as the doubled batch, with per-op costs paid once).
    backbone = plain.base_model
    doubled = torch.cat([ids, ids])

    def two_backbones() -> None:
        with torch.no_grad():
            backbone(input_ids=ids), backbone(input_ids=ids)

    def one_backbone_doubled_batch() -> None:
        with torch.no_grad():
            backbone(input_ids=doubled)

    ms = alternated({"plain_step": step(plain), "pnn_step": step(pnn), "frozen_columns": frozen_columns,
                     "two_backbones": two_backbones, "one_backbone_doubled_batch": one_backbone_doubled_batch}, repeats)
    return {"rows": rows, "ms": ms, "ratio_to_plain_step": {k: round(ms[k] / ms["plain_step"], 3)
                                                            for k in ("pnn_step", "frozen_columns", "two_backbones",
                                                                      "one_backbone_doubled_batch")},
            "trained_column_and_laterals": round((ms["pnn_step"] - ms["frozen_columns"]) / ms["plain_step"], 3),
            "batched_frozen_forward_saves_at_most": round(1 - ms["one_backbone_doubled_batch"] / ms["two_backbones"], 3)}


CASES = {"ewc-penalty": ewc_penalty, "packnet-hooks": packnet_hooks, "fisher-squares": fisher_squares,
         "gem-breakdown": gem_breakdown, "gem-k-steps": gem_k_steps, "lwf-teacher": lwf_teacher, "fisher-row-grads": fisher_row_grads,
         "pnn-breakdown": pnn_breakdown, "ewc-step": ewc_step, "ewc-edit-traffic": ewc_edit_traffic,
         "fisher-batch-size": fisher_batch_size}
# Cases that take ``--vocab``.
VOCAB_CASES = ("lwf-teacher",)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--model", default="medium")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--output", default="benchmarks/results/micro.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab", type=int, default=0,
                        help=f"resize the embeddings to this many tokens (0: as built; cases {', '.join(VOCAB_CASES)})")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.repeats = "tiny", 2
    C.quiet()
    report: dict[str, Any] = {"machine": C.machine(), "model": args.model, "cases": {}}
    for name in args.cases.split(","):
        result = CASES[name](args.model, args.repeats, **({"vocab": args.vocab} if name in VOCAB_CASES else {}))
        result["load_avg"] = C.load_average()
        report["cases"][name] = result
        print(name, json.dumps(result), flush=True)
    C.save_json(report, args.output)
    return report


if __name__ == "__main__":
    main()
