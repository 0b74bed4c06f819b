"""GEM and A-GEM: the dual QP, the projections, the reference gradients, the trainer and checkpoints."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from clm_hf import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments, Replay, Strategy
from clm_hf.data import ContinualDataCollator
from clm_hf.strategies import build_strategy
from clm_hf.strategies.base import TaskInfo, trainable_parameters
from clm_hf.strategies.gem import (
    AGEM,
    GEM,
    memory_losses,
    project_agem_,
    project_gem_,
    reference_gradients_,
    solve_nonnegative_qp,
)
from clm_hf.tasks import make_task, tokenize_for_causal_lm, tokenize_for_seq2seq
from tests.conftest import small_args


# --- the dual QP and the projections on random problems -------------------------------------------
def _brute_force_qp(P, q, lower):
    """Try every set of free variables; keep the best feasible stationary point."""
    K = len(q)
    shifted = q + lower * P.sum(1)
    best, best_value = None, None
    for size in range(K + 1):
        for free in itertools.combinations(range(K), size):
            u = torch.zeros(K, dtype=torch.float64)
            if free:
                idx = torch.tensor(free)
                u[idx] = torch.linalg.solve(P[idx][:, idx], -shifted[idx])
            if (u < -1e-12).any():
                continue
            value = 0.5 * u @ P @ u + shifted @ u
            if best_value is None or value < best_value:
                best, best_value = u, value
    return best + lower


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_dual_solver_matches_brute_force(margin):
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        K = int(torch.randint(1, 7, (), generator=gen))
        G = torch.randn(K, K + 10, generator=gen, dtype=torch.float64)
        g = torch.randn(K + 10, generator=gen, dtype=torch.float64) - 0.5 * G.sum(0)
        P, q = G @ G.T, G @ g
        v = solve_nonnegative_qp(P, q, margin)
        torch.testing.assert_close(v, _brute_force_qp(P, q, margin), rtol=1e-8, atol=1e-9)
        assert (v >= margin - 1e-12).all()


def test_dual_solver_handles_linearly_dependent_gradients():
    # Two tasks with the same gradient and one that is the sum of two others: G Gᵀ is singular.
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    G = torch.cat([G, G[:1], G[1:2] + G[2:3]])
    g = -G.sum(0) + 0.1 * torch.randn(12, generator=gen, dtype=torch.float64)
    v = solve_nonnegative_qp(G @ G.T, G @ g)
    assert torch.isfinite(v).all() and (v >= 0).all()
    assert float((G @ (g + G.T @ v)).min()) > -1e-9


def test_gem_projection_satisfies_every_constraint_and_is_closest():
    gen = torch.Generator().manual_seed(2)
    for trial in range(20):
        G = torch.randn(5, 40, generator=gen)
        g = torch.randn(40, generator=gen) - 0.3 * G.sum(0)  # conflicts with some tasks
        if not (G @ g < 0).any():
            continue
        original = g.clone()
        assert project_gem_(g, G, margin=0.0)
        assert float((G @ g).min()) >= -1e-4 * float(G.norm() * original.norm())
        # Closest: g̃ - g = Gᵀv with v >= 0 and complementary slackness (v_k > 0 only on active k).
        v = torch.linalg.lstsq(G.T.double(), (g - original).double().unsqueeze(1)).solution.squeeze(1)
        assert (v > -1e-4).all()
        active = (G @ g).abs() < 1e-3 * float(G.norm() * original.norm())
        assert (v[~active].abs() < 1e-4).all()
    # No violation: g is left exactly as it was, and the function says so.
    G, g = torch.eye(3), torch.tensor([1.0, 2.0, 0.0])
    assert not project_gem_(g, G, margin=0.5) and g.tolist() == [1.0, 2.0, 0.0]


def test_gram_matrix_in_column_blocks_equals_the_exact_product():
    from clm_hf.strategies.gem import gram_matrix

    G = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    exact = G.double() @ G.double().T
    for block in (64, 999, 1000, 4096):  # several blocks with a short last one, one block, wider than G
        torch.testing.assert_close(gram_matrix(G, block=block).double(), exact, rtol=1e-5, atol=1e-4)


def test_gem_margin_pushes_towards_the_memory():
    G = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([-1.0, 1.0])
    project_gem_(g, G, margin=0.0)
    torch.testing.assert_close(g, torch.tensor([0.0, 1.0]))  # just level
    g = torch.tensor([-1.0, 1.0])
    project_gem_(g, G, margin=2.0)  # v >= 2: g + 2 g_1
    torch.testing.assert_close(g, torch.tensor([1.0, 1.0]))


def test_agem_projection_removes_only_the_conflicting_component():
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(30, generator=gen)
    g = torch.randn(30, generator=gen) - r
    assert float(g @ r) < 0
    before = g.clone()
    assert bool(project_agem_(g, r))
    assert abs(float(g @ r)) < 1e-4 * float(r.norm() * before.norm())
    assert float(g.norm()) <= float(before.norm())  # never longer (unlike GEM with a margin)
    torch.testing.assert_close(g, before - (before @ r) / (r @ r) * r)
    agreeing = torch.randn(30, generator=gen) + 2 * r
    kept = agreeing.clone()
    assert not bool(project_agem_(agreeing, r)) and torch.equal(agreeing, kept)


def test_agem_default_is_the_papers_rule():
    # margin 0 by default: g~ = g - (g.r / r.r) r only when g.r < 0, so g~.r >= 0, and g itself otherwise.
    agem = AGEM()
    assert agem.config.margin == 0.0
    gen = torch.Generator().manual_seed(5)
    violated = 0
    for _ in range(200):
        r = torch.randn(1, 50, generator=gen) * float(torch.rand(1, generator=gen) * 10)
        g = torch.randn(50, generator=gen)
        before = g.clone()
        projected = bool(agem.project(g, r))
        assert projected == bool(before @ r[0] < 0)
        if projected:
            violated += 1
            assert float(g @ r[0]) >= -1e-6 * float(before.norm() * r[0].norm())
            torch.testing.assert_close(g, before - (before @ r[0]) / (r[0] @ r[0]) * r[0])
        else:
            assert torch.equal(g, before)
    assert 50 < violated < 150
    variant = AGEM(margin=0.5)  # the explicit variant adds at least 0.5 r, however small the violation
    g, r = torch.tensor([1.0, -1e-3]), torch.tensor([[0.0, 1.0]])
    assert bool(variant.project(g, r)) and g.tolist() == pytest.approx([1.0, 0.5 - 1e-3])


class _RecordGradient(Strategy):
    """Records the flat gradient it sees in ``edit_gradients`` (and, after A-GEM, its reference)."""

    def __init__(self, name, agem, after):
        super().__init__()
        self.name, self.agem, self.after, self.seen, self.refs = name, agem, after, [], []

    def edit_gradients(self, model):
        if not self.agem.memories:  # the first task: nothing to project against
            return
        self.seen.append(torch.cat([p.grad.flatten() for p in trainable_parameters(model).values()]).clone())
        if self.after:
            self.refs.append(self.agem._refs[0].clone())


def test_agem_projects_the_unclipped_gradient_and_clipping_comes_after(make_model, tokenizer, tiny_stream, tmp_path):
    # g and g_ref are both unclipped: the gradient A-GEM edits is the raw one, and the norm the
    # Trainer clips with (logged as grad_norm) is that of the projected gradient.
    agem = AGEM(memory_per_task=8, sample_size=8)
    before, after = _RecordGradient("before_agem", agem, False), _RecordGradient("after_agem", agem, True)
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer,
                                       args=small_args(tmp_path, max_grad_norm=1e-3, save_continual_state=False,
                                                       learning_rate=1e-2, num_train_epochs=4),
                                       strategies=[before, agem, after])
    trainer.fit({k: tiny_stream[k] for k in ("reverse", "sort")})  # 3 of the 16 steps of sort conflict
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]  # the second task
    assert len(before.seen) == len(after.seen) == len(logged) == 16 and agem.projected_steps >= 1
    for g, projected, ref, clip_norm in zip(before.seen, after.seen, after.refs, logged):
        assert float(g.norm()) > 1e-2  # unclipped (max_grad_norm is 1e-3)
        expected = g.clone()
        project_agem_(expected, ref)
        torch.testing.assert_close(projected, expected)
        assert float(projected @ ref) >= -1e-6 * float(g.norm() * ref.norm())
        assert clip_norm == pytest.approx(float(projected.norm()), rel=1e-4)


# --- real tiny models ------------------------------------------------------------------------------
def _rows(tokenizer, name, count, seed, seq2seq=False, max_len=6):
    rows = make_task(name, count, seed=seed, min_len=2, max_len=max_len)
    return tokenize_for_seq2seq(rows, tokenizer) if seq2seq else tokenize_for_causal_lm(rows, tokenizer)


def _batch(rows):
    return ContinualDataCollator(pad_token_id=0)([rows[i] for i in range(len(rows))])


def _armed(strategy, memories):
    strategy.memories = {str(k): rows for k, rows in enumerate(memories)}
    return strategy


def _set_grad(model, batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


def _memory_loss(model, rows):
    with torch.no_grad():
        return float(model(**_batch(rows)).loss)


@pytest.fixture
def conflicted(make_model, tokenizer):
    """A GPT-2 trained a little on copy, then on sort, whose gradient on reverse conflicts with sort's."""
    torch.manual_seed(0)
    model = make_model("gpt2")
    memories = [_rows(tokenizer, "copy", 16, 0), _rows(tokenizer, "sort", 16, 1)]
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for rows in memories:
        batch = _batch(rows)
        for _ in range(20):
            model.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
    current = _batch(_rows(tokenizer, "reverse", 16, 2))
    return model, memories, current


def _concat(memories):
    from datasets import concatenate_datasets

    return concatenate_datasets(memories)


def _sgd_step(model, grads, lr):
    with torch.no_grad():
        for name, p in trainable_parameters(model).items():
            p.sub_(lr * grads[name])


def test_projected_step_does_not_raise_the_memory_losses(conflicted):
    model, memories, current = conflicted
    params = trainable_parameters(model)
    raw = _set_grad(model, current)
    start = {n: p.detach().clone() for n, p in params.items()}
    losses_before = [_memory_loss(model, m) for m in memories]
    lr = 1e-4  # small enough that second-order terms (~lr²) stay far below the first-order rise

    def losses_after(grads):
        _sgd_step(model, grads, lr)
        after = [_memory_loss(model, m) for m in memories]
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        return [a - b for a, b in zip(after, losses_before)]

    plain_rise = losses_after(raw)
    assert plain_rise[1] > 5e-5  # the unprojected step raises sort's memory loss (~lr · 1.1)
    for strategy in (GEM(margin=0.0), GEM(margin=0.5)):
        _armed(strategy, memories)
        _set_grad(model, current)
        strategy.edit_gradients(model)
        assert strategy.projected_steps == 1
        rise = losses_after({n: p.grad for n, p in params.items()})
        assert max(rise) < 0.05 * plain_rise[1], (strategy, rise, plain_rise)  # every task's memory
        if strategy.config.margin > 0:  # at least γ of every memory gradient is added: the total falls
            assert sum(rise) < 0
    agem = _armed(AGEM(margin=0.0), memories[1:])
    _set_grad(model, current)
    agem.edit_gradients(model)
    assert agem.projected_steps == 1
    rise = losses_after({n: p.grad for n, p in params.items()})
    assert rise[1] < 0.05 * plain_rise[1], (rise, plain_rise)  # sort, its one memory


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_gem_with_one_past_task_equals_agem(margin, conflicted):
    model, memories, current = conflicted
    results = []
    for strategy in (GEM(margin=margin), AGEM(margin=margin, sample_size=1000)):
        _armed(strategy, memories[1:])
        _set_grad(model, current)
        strategy.edit_gradients(model)
        assert strategy.projected_steps == 1
        results.append(torch.cat([p.grad.flatten() for p in trainable_parameters(model).values()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_batched_reference_gradients_equal_per_task_ones(arch, make_model, tokenizer):
    model = make_model(arch)
    seq2seq = arch == "t5"
    # Different lengths per task, so the batched pass pads rows the per-task pass does not.
    batches = [_batch(_rows(tokenizer, name, 5, seed, seq2seq, max_len)) for name, seed, max_len
               in (("copy", 0, 3), ("reverse", 1, 6), ("sort", 2, 4))]
    params = list(trainable_parameters(model).values())
    outs = {}
    for method in ("batched", "per_task"):
        outs[method] = [torch.full((3, *p.shape), float("nan")) for p in params]
        reference_gradients_(model, params, batches, outs[method], method=method)
    for batched, looped in zip(outs["batched"], outs["per_task"]):
        torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-6)
    # And each is the gradient of the model's own loss on that task's rows.
    model.zero_grad()
    model(**batches[1]).loss.backward()
    torch.testing.assert_close(outs["per_task"][0][1], params[0].grad, rtol=1e-4, atol=1e-6)


def _unequal_batches(tokenizer, count):
    """``count`` batches of different row counts and widths (padding rows and padded widths)."""
    specs = (("reverse", 5, 1, 6), ("copy", 2, 0, 3), ("sort", 3, 2, 4))[:count]
    return [_batch(_rows(tokenizer, name, rows, seed, max_len=max_len)) for name, rows, seed, max_len in specs]


def _references(model, batches, method):
    params = list(trainable_parameters(model).values())
    out = [torch.full((len(batches), *p.shape), float("nan")) for p in params]
    reference_gradients_(model, params, batches, out, method=method)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("count", [1, 3])
def test_vmap_reference_gradients_equal_per_task_ones(arch, count, make_model, tokenizer):
    model = make_model(arch).train()
    batches = _unequal_batches(tokenizer, count)
    if count > 1:  # the stacked groups need both dummy rows and right-padded widths
        assert len({b["labels"].shape for b in batches}) == count
    vmapped, looped = _references(model, batches, "vmap"), _references(model, batches, "per_task")
    for a, b in zip(vmapped, looped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert model.training  # eval mode only while computing


@pytest.mark.parametrize("method", ["vmap", "hooks"])
def test_reference_gradients_with_bf16_weights(make_model, tokenizer, method):
    # vmap: gradients in the weights' dtype cannot accumulate into the fp32 buffer, so they are copied after;
    # hooks: bf16 activations and output gradients, the per-group products in bf16 written into the fp32 buffer.
    model = make_model("gpt2").to(torch.bfloat16)
    batches = _unequal_batches(tokenizer, 2)
    computed, looped = _references(model, batches, method), _references(model, batches, "per_task")
    for a, b in zip(computed, looped):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()) + 1e-6)


def test_vmap_references_through_the_memory_bank_equal_per_task_ones(make_model, tokenizer):
    # The strategy's own path: one gather from the memory bank, groups of 5, 2 and 3 rows.
    model = make_model("llama")
    memories = [_rows(tokenizer, name, n, seed, max_len=m) for name, n, seed, m in
                (("reverse", 5, 1, 6), ("copy", 2, 0, 3), ("sort", 3, 2, 4))]
    refs = {}
    for method in ("vmap", "per_task"):
        gem = _armed(GEM(reference_method=method), memories)
        _set_grad(model, _batch(memories[0]))
        gem.edit_gradients(model)
        refs[method] = gem._refs.clone()
    assert torch.isfinite(refs["vmap"]).all()
    torch.testing.assert_close(refs["vmap"], refs["per_task"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [1, 3])
def test_hook_reference_gradients_equal_per_task_ones(count, make_model, tokenizer):
    # One plain pass over all the groups: dummy rows, padded widths, GPT-2's broadcast position ids
    # and its tied embedding / LM head all go through the hooks.
    model = make_model("gpt2").train()
    batches = _unequal_batches(tokenizer, count)
    hooked, looped = _references(model, batches, "hooks"), _references(model, batches, "per_task")
    for a, b in zip(hooked, looped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert model.training and not any(m._forward_hooks for m in model.modules())  # nothing left behind
    with pytest.raises(ValueError, match="LlamaRMSNorm"):  # a layer whose gradient the hooks do not know
        _references(make_model("llama"), batches, "hooks")


def test_auto_hooked_references_and_projection_equal_the_vmapped_ones(conflicted):
    # GEM's default path on GPT-2 from 2 past tasks on: the references and the projected gradient
    # are those of the vmapped pass (the default before), on the same draws of memory rows.
    model, memories, current = conflicted
    results = {}
    for method in ("vmap", "auto"):
        gem = _armed(GEM(memory_batch_size=5), memories)
        gem.config.reference_method = method
        for _ in range(2):  # the second step runs without the once-per-task check
            _set_grad(model, current)
            gem.edit_gradients(model)
        g = torch.cat([p.grad.flatten() for p in trainable_parameters(model).values()])
        results[method] = (gem._refs.clone(), g, gem.projected_steps)
    assert gem._reference_method(model, gem._bank) == "hooks" and gem._hooks_checked
    torch.testing.assert_close(results["auto"][0], results["vmap"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["auto"][1], results["vmap"][1], rtol=1e-5, atol=1e-7)
    assert results["auto"][2] == results["vmap"][2] >= 1  # a projected step among them


def test_a_weight_used_outside_its_module_is_caught_and_auto_falls_back(conflicted, caplog):
    model, memories, current = conflicted
    wte = model.transformer.wte
    # The embedding matrix read directly, outside nn.Embedding's forward: the hooks cannot see that use.
    handle = model.transformer.ln_f.register_forward_hook(lambda module, args, out: out + wte.weight[0])
    try:
        refs = {}
        for method in ("per_task", "auto"):
            gem = _armed(GEM(reference_method=method), memories)
            _set_grad(model, current)
            gem.edit_gradients(model)
            refs[method] = gem._refs.clone()
        assert "outside its module" in caplog.text and gem._reference_method(model, gem._bank) == "vmap"
        torch.testing.assert_close(refs["auto"], refs["per_task"], rtol=1e-5, atol=1e-5)
        explicit = _armed(GEM(reference_method="hooks"), memories)
        _set_grad(model, current)
        with pytest.raises(ValueError, match="'transformer.wte.weight' differ from autograd's"):
            explicit.edit_gradients(model)
    finally:
        handle.remove()


def test_vmap_refuses_left_padding_and_auto_does_not_use_it(make_model, tokenizer):
    from clm_hf.strategies.gem import _MemoryBank

    def left_padded(batch):
        lengths = batch["attention_mask"].sum(1)
        return {k: torch.stack([torch.roll(row, int(row.shape[0] - n)) for row, n in zip(v, lengths)]) for k, v in batch.items()}

    model = make_model("gpt2")
    rows = _rows(tokenizer, "reverse", 4, 1)
    with pytest.raises(ValueError, match="right-padded"):
        _references(model, [left_padded(_batch(rows))], "vmap")
    right = _MemoryBank([rows], ContinualDataCollator(pad_token_id=0), "cpu")
    bank = _MemoryBank([rows], lambda features: left_padded(_batch(features)), "cpu")
    llama = make_model("llama")  # its RMSNorm weights are not hookable: "auto" is vmap or per_task
    assert GEM()._reference_method(llama, right) == "vmap"
    assert not bank.right_padded and GEM()._reference_method(llama, bank) == "per_task"
    gem = GEM()  # GPT-2: every trainable weight in a hookable module; the mask is kept, either side
    assert gem._reference_method(model, right) == "hooks" and gem._reference_method(model, bank) == "hooks"
    assert gem._reference_method(model, None, 1) == "per_task"  # one past task: one plain pass


def test_auto_on_a_seq2seq_model_gives_the_per_task_references(make_model, tokenizer, caplog):
    model = make_model("t5")
    memories = [_rows(tokenizer, name, 4, seed, seq2seq=True, max_len=m) for name, seed, m in (("copy", 0, 3), ("sort", 1, 5))]
    refs = {}
    for method in ("auto", "per_task"):
        gem = _armed(GEM(reference_method=method), memories)
        assert gem._reference_method(model, None) == "per_task"
        _set_grad(model, _batch(memories[0]))
        gem.edit_gradients(model)
        refs[method] = gem._refs.clone()
    assert torch.equal(refs["auto"], refs["per_task"])
    assert "failed" not in caplog.text  # chosen up front, not after an error
    with pytest.raises(ValueError, match="causal"):
        _references(model, [_batch(memories[0])], "vmap")


def test_auto_falls_back_to_per_task_when_vmap_fails(conflicted, monkeypatch, caplog):
    import clm_hf.strategies.gem as gem_module

    model, memories, current = conflicted

    def broken(*args, **kwargs):
        raise RuntimeError("vmap: data-dependent control flow")

    refs = {}
    for method in ("per_task", "auto"):
        gem = _armed(GEM(reference_method=method), memories)
        if method == "auto":  # the hooked pass, then the vmapped one, fail: one backward per task
            monkeypatch.setattr(gem_module, "_hook_reference_gradients_", broken)
            monkeypatch.setattr(gem_module, "_vmap_reference_gradients_", broken)
        _set_grad(model, current)
        gem.edit_gradients(model)
        refs[method] = gem._refs.clone()
    assert gem._reference_method(model, gem._bank) == "per_task" and "failed" in caplog.text
    torch.testing.assert_close(refs["auto"], refs["per_task"], rtol=0, atol=0)
    explicit = _armed(GEM(reference_method="vmap"), memories)
    with pytest.raises(RuntimeError, match="data-dependent"):
        explicit.edit_gradients(model)


def test_reference_pass_out_of_memory_is_raised_not_turned_into_a_switch_of_method(conflicted, monkeypatch):
    # Mirrors EWC's test_hooked_fisher_out_of_memory_is_raised_not_retried_with_the_larger_vmapped_pass:
    # out of memory says the memory batch is too big, not that the model does not fit the method.
    import clm_hf.strategies.gem as gem_module

    model, memories, current = conflicted
    calls = []

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def misfit(*args, **kwargs):
        raise RuntimeError("a layer the hooks do not know")

    def counted(name):
        original = getattr(gem_module, name)

        def run(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(gem_module, name, run)

    counted("_vmap_reference_gradients_")
    counted("reference_gradients_")
    # The hooked pass runs out of memory: raised, the (larger) vmapped pass is not tried, nothing recorded.
    monkeypatch.setattr(gem_module, "_hook_reference_gradients_", out_of_memory)
    gem = _armed(GEM(), memories)
    _set_grad(model, current)
    with pytest.raises(torch.OutOfMemoryError):
        gem.edit_gradients(model)
    assert calls == [] and gem._reference_method(model, gem._bank) == "hooks"
    # The hooks do not fit (a real misfit: auto goes on to vmap), then the vmapped pass runs out of memory:
    # raised, and vmap is not switched off for the rest of the run.
    monkeypatch.setattr(gem_module, "_hook_reference_gradients_", misfit)
    monkeypatch.setattr(gem_module, "_vmap_reference_gradients_", out_of_memory)
    gem = _armed(GEM(), memories)
    _set_grad(model, current)
    with pytest.raises(torch.OutOfMemoryError):
        gem.edit_gradients(model)
    assert calls == [] and gem._vmap and gem._reference_method(model, gem._bank) == "vmap"


def test_memory_losses_are_per_task_means(make_model, tokenizer):
    model = make_model("gpt2").eval()
    rows = [_rows(tokenizer, "copy", 4, 0, max_len=3), _rows(tokenizer, "sort", 3, 1, max_len=6)]
    batch = _batch(_concat(rows))
    groups = torch.tensor([0] * 4 + [1] * 3)
    with torch.no_grad():
        losses = memory_losses(model, batch, groups, 2)
        expected = torch.stack([model(**_batch(r)).loss for r in rows])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


def test_edit_gradients_reuses_its_buffers_and_leaves_no_memory_alone(conflicted):
    model, memories, current = conflicted
    gem = GEM()
    _set_grad(model, current)
    before = {n: p.grad.clone() for n, p in trainable_parameters(model).items()}
    gem.edit_gradients(model)  # no past task yet: a no-op
    assert gem.steps == 0 and all(torch.equal(p.grad, before[n]) for n, p in trainable_parameters(model).items())
    _armed(gem, memories)
    pointers = set()
    for _ in range(3):
        _set_grad(model, current)
        gem.edit_gradients(model)
        pointers.add((gem._flat.data_ptr(), gem._refs.data_ptr()))
    assert len(pointers) == 1 and gem.steps == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [GEM, AGEM])
def test_strategy_per_task_references_are_written_in_place_and_equal_autograd_ones(cls, dtype, conflicted):
    # The strategy's "per_task" path runs the model on aliases of the weights whose .grad are the
    # reference buffer's rows; the module-level function returns torch.autograd.grad's tensors.
    model, memories, current = conflicted
    model = model.to(dtype)
    options = {"reference_method": "per_task"} if cls is GEM else {}
    strategy = _armed(cls(**options), memories)
    for _ in range(2):  # the second step reuses the buffers the first one filled
        training_grad = _set_grad(model, current)
        strategy.edit_gradients(model)
    bank = strategy._bank
    batches = ([bank.batch(bank.task_rows(k)) for k in range(len(memories))] if cls is GEM
               else [bank.batch(slice(0, bank.num_rows))])
    expected = _references(model, batches, "per_task")
    for view, want in zip(strategy._ref_views, expected):
        torch.testing.assert_close(view, want.float(), rtol=1e-5, atol=1e-6)
    assert all(a.grad is None for a in strategy._aliases)  # nothing kept alive between steps
    if dtype == torch.float32:  # the training gradient was left to the projection alone
        g = torch.cat([training_grad[n].flatten() for n in trainable_parameters(model)])
        assert torch.equal(strategy._flat, g) or strategy.projected_steps > 0


@pytest.mark.parametrize("method", ["per_task", "vmap"])
def test_reference_pass_switches_to_eval_only_when_something_drops_out(method, conflicted, tokenizer):
    # Without dropout the two modes compute the same thing: the module walk of model.eval() is skipped.
    # With dropout (or activation checkpointing) the pass must run in eval mode: deterministic references.
    from clm_hf.tasks import build_tiny_model

    model, memories, current = conflicted
    dropping = build_tiny_model("gpt2", tokenizer, resid_pdrop=0.3, embd_pdrop=0.0, attn_pdrop=0.0)
    dropping.load_state_dict(model.state_dict())
    seen = {}
    for name, m in (("plain", model), ("dropping", dropping)):
        m.train()
        modes = []
        gem = _armed(GEM(reference_method=method), memories)
        _set_grad(m, current)
        handle = m.transformer.h[0].register_forward_pre_hook(lambda module, args: modes.append(module.training))
        gem.edit_gradients(m)
        handle.remove()
        assert m.training  # left as it was
        seen[name] = (set(modes), gem._refs.clone())
    assert seen["plain"][0] == {True} and seen["dropping"][0] == {False}
    torch.testing.assert_close(seen["plain"][1], seen["dropping"][1], rtol=1e-5, atol=1e-6)  # same weights, no dropout


def _sizes(selections):
    return [len(range(s.start, s.stop)) if isinstance(s, slice) else len(s) for s in selections]


def test_auto_reference_rows_follow_the_training_batch(conflicted):
    from types import SimpleNamespace

    model, memories, current = conflicted
    trainer = SimpleNamespace(args=SimpleNamespace(per_device_train_batch_size=12))
    gem, agem = _armed(GEM(memory_batch_size="auto"), memories), _armed(AGEM(sample_size="auto"), memories)
    assert GEM().config.memory_batch_size == "auto" and AGEM().config.sample_size == 128  # the defaults
    bank = gem.memory_bank(torch.device("cpu"))  # 2 past tasks of 16 rows each
    assert _sizes(gem.draw(bank, 0)) == [16, 16] and _sizes(agem.draw(bank, 0)) == [32]  # no trainer: all
    gem.trainer = agem.trainer = trainer  # a budget of 12 // 2 = 6 rows per step
    assert gem.rows_per_task() == 3 and _sizes(gem.draw(bank, 0)) == [3, 3]
    assert _sizes(agem.draw(bank, 0)) == [6]
    gem.memories = {str(k): memories[k % 2] for k in range(8)}  # more past tasks than rows: one row each
    assert gem.rows_per_task() == 1
    assert GEM(memory_batch_size=None).rows_per_task() is None  # the paper's whole memory, still available


# --- through the trainer ---------------------------------------------------------------------------
class _CheckConstraints(Strategy):
    """Listed after GEM/A-GEM: checks the gradient the optimizer gets against that step's references."""

    name = "check_constraints"

    def __init__(self, episodic):
        super().__init__()
        self.episodic, self.checked = episodic, 0

    def edit_gradients(self, model):
        if not self.episodic.memories:
            return
        g = torch.cat([p.grad.flatten() for p in trainable_parameters(model).values()])
        dots = self.episodic._refs @ g
        assert float(dots.min()) >= -1e-4 * float(self.episodic._refs.norm() * g.norm())
        self.checked += 1


@pytest.mark.parametrize("arch, name", [("gpt2", "gem"), ("gpt2", "agem"), ("t5", "gem"), ("t5", "agem")])
def test_fit_learns_a_stream(arch, name, make_model, tokenizer, tiny_stream, tmp_path):
    strategy = build_strategy(name, memory_per_task=8)
    check = _CheckConstraints(strategy)
    if arch == "t5":
        args = small_args(tmp_path, args_class=ContinualSeq2SeqTrainingArguments, save_continual_state=False)
        trainer = ContinualSeq2SeqTrainer(model=make_model("t5"), args=args, processing_class=tokenizer,
                                          strategies=[strategy, check])
    else:
        trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path, save_continual_state=False),
                                           processing_class=tokenizer, strategies=[strategy, check])
    results = trainer.fit(tiny_stream)
    assert len(results.matrix("exact_match")) == 3
    assert [len(rows) for rows in strategy.memories.values()] == [8, 8, 8]
    assert strategy.steps == check.checked == 8  # 4 steps of tasks 2 and 3 each
    assert set(strategy.memories["copy"].column_names) <= {"input_ids", "attention_mask", "labels"}


def test_composes_with_replay_and_restores_from_a_checkpoint(make_model, tokenizer, tiny_stream, tmp_path):
    replay, gem = Replay(buffer_size=16), GEM(memory_per_task=8, memory_batch_size=4)
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path), processing_class=tokenizer,
                                       strategies=[replay, gem])
    trainer.fit(tiny_stream)
    assert len(replay.buffer) == 16 and len(gem.memories) == 3
    assert gem.steps == 12  # tasks 2 and 3 train on 32 rows + 16 replayed: 6 steps each
    # The trainer's continual checkpoint holds the memories as Arrow folders, no pickle.
    checkpoint = max((tmp_path / "run" / "continual").glob("task-*"))
    files = [p.name for p in Path(checkpoint).rglob("*") if p.is_file()]
    assert any(f.endswith(".arrow") for f in files) and not any(f.endswith((".pkl", ".pickle", ".pt")) for f in files)
    fresh = ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path / "again"),
                                     processing_class=tokenizer,
                                     strategies=[Replay(buffer_size=16), GEM(memory_per_task=8, memory_batch_size=4)])
    fresh.fit(tiny_stream, resume_from_checkpoint=str(checkpoint))
    restored = fresh.strategies[1]
    assert list(restored.memories) == list(gem.memories)
    for task_id, rows in gem.memories.items():
        assert restored.memories[task_id].to_dict() == rows.to_dict()


def test_state_round_trip_gives_the_same_memories_and_gradients(conflicted, tmp_path):
    model, memories, current = conflicted
    agem = _armed(AGEM(sample_size=8), memories)
    agem.steps = 5
    agem.save_state(tmp_path / "state")
    loaded = AGEM(sample_size=8)
    loaded.load_state(tmp_path / "state")
    assert list(loaded.memories) == ["0", "1"] and loaded.steps == 5
    for task_id, rows in agem.memories.items():
        assert loaded.memories[task_id].to_dict() == rows.to_dict()
    grads = []
    for strategy in (agem, loaded):  # same memory, same step: same sample, same gradient
        _set_grad(model, current)
        strategy.edit_gradients(model)
        grads.append(torch.cat([p.grad.flatten() for p in trainable_parameters(model).values()]))
    assert torch.equal(grads[0], grads[1])


def test_memory_is_a_seeded_sample_of_the_task(tokenizer):
    rows = _rows(tokenizer, "copy", 40, 0)
    task = TaskInfo(task_id="copy", name="copy", index=0, train_dataset=rows)
    picks = []
    for seed in (0, 0, 1):
        gem = GEM(memory_per_task=10, seed=seed)
        gem.after_task(None, task)
        picks.append(gem.memories["copy"]["input_ids"])
    assert picks[0] == picks[1] and picks[0] != picks[2]
    assert len(picks[0]) == 10 and all(r in rows["input_ids"] for r in picks[0])


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (GEM, {"memory_per_task": 0}, "memory_per_task"),
        (GEM, {"margin": -0.1}, "margin"),
        (GEM, {"memory_batch_size": 0}, "memory_batch_size"),
        (GEM, {"reference_method": "vmapped"}, "reference_method"),
        (GEM, {"memory_batch_size": "all"}, "memory_batch_size"),
        (AGEM, {"sample_size": 0}, "sample_size"),
        (AGEM, {"sample_size": None}, "sample_size"),
        (AGEM, {"margn": 0.5}, "Did you mean 'margin'"),
    ],
)
def test_bad_options_are_named(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def _shard_reduce(other_g: torch.Tensor, other_refs: torch.Tensor):
    """A stand-in for the all-reduce over 2 shards, seen from shard A: adds shard B's partial sums
    (recognised by their shape: GEM's G g is (K,), G Gᵀ (K, K); A-GEM's pair is (2,))."""

    def reduce(partial: torch.Tensor) -> torch.Tensor:
        if partial.dim() == 2:
            return partial.add_(other_refs @ other_refs.T)
        if partial.shape[0] == 2 and other_refs.shape[0] == 1:
            return partial.add_(torch.stack([other_g @ other_refs[0], other_refs[0] @ other_refs[0]]))
        return partial.add_(other_refs @ other_g)

    return reduce


@pytest.mark.parametrize("kind", ["gem", "gem-margin", "agem"])
def test_projection_of_a_shard_with_reduced_sums_equals_the_whole_projection(kind):
    # Under FSDP2 each rank holds a shard of g and of the references: the projection sums the
    # local dot products (and Gram matrix) over the ranks, then edits its own shard.
    torch.manual_seed(3)
    K = 1 if kind == "agem" else 3
    g, G = torch.randn(40), torch.randn(K, 40)
    G[0] = -g + 0.1 * torch.randn(40)  # a violated constraint: a projection happens
    whole = g.clone()
    project = {"gem": lambda x, R, **kw: project_gem_(x, R, 0.0, **kw),
               "gem-margin": lambda x, R, **kw: project_gem_(x, R, 0.5, **kw),
               "agem": lambda x, R, **kw: project_agem_(x, R[0], **kw)}[kind]
    assert bool(project(whole, G))
    a, b = g[:17].clone(), g[17:].clone()
    assert bool(project(a, G[:, :17], reduce=_shard_reduce(g[17:], G[:, 17:])))
    assert bool(project(b, G[:, 17:], reduce=_shard_reduce(g[:17], G[:, :17])))
    torch.testing.assert_close(torch.cat([a, b]), whole, atol=1e-5, rtol=1e-5)
    # Without the reduction, the shards project with their own partial sums: a different step.
    c = g[:17].clone()
    project(c, G[:, :17])
    assert (c - whole[:17]).abs().max() > 1e-3
