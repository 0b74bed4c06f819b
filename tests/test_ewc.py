"""EWC: the penalty, its gradient, the per-sample Fisher, online vs separate modes."""

from __future__ import annotations

import pytest
import torch

from clm_hf import EWC
from clm_hf.strategies.base import trainable_parameters
from clm_hf.strategies.ewc import estimate_fisher
from clm_hf.tasks import make_task, tokenize_for_causal_lm, tokenize_for_seq2seq


def _armed_ewc(model, *, seed=0, lam=3.0):
    """An EWC whose Fisher and anchor are random, bound to ``model``."""
    gen = torch.Generator().manual_seed(seed)
    params = trainable_parameters(model)
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
    anchor = {n: p.detach().clone() + 0.1 * torch.randn(p.shape, generator=gen) for n, p in params.items()}
    ewc = EWC(ewc_lambda=lam)
    ewc.terms = [(fisher, anchor)]
    ewc._bind(model)
    return ewc, fisher, anchor


def test_penalty_gradient_matches_analytic(make_model):
    model = make_model("gpt2")
    ewc, fisher, anchor = _armed_ewc(model, lam=3.0)
    penalty = ewc.penalty()
    penalty.backward()
    for name, p in trainable_parameters(model).items():
        expected = 3.0 * fisher[name] * (p.detach() - anchor[name])
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    # and the value is λ/2 Σ F (θ-θ*)²
    value = sum((fisher[n] * (p.detach() - anchor[n]) ** 2).sum() for n, p in trainable_parameters(model).items())
    torch.testing.assert_close(penalty.detach(), 1.5 * value)


def test_penalty_is_zero_at_anchor(make_model):
    model = make_model("gpt2")
    ewc, fisher, _ = _armed_ewc(model)
    ewc.terms = [(fisher, {n: p.detach().clone() for n, p in trainable_parameters(model).items()})]
    ewc._bind(model)
    penalty = ewc.penalty()
    assert penalty.item() == 0.0
    penalty.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in trainable_parameters(model).values())


def test_penalty_not_detached_from_live_parameters(make_model):
    # A penalty built from param.data would have no grad_fn (a bug seen in peer libraries).
    model = make_model("gpt2")
    ewc, _, _ = _armed_ewc(model)
    assert ewc.penalty().requires_grad


def _rows_for(arch, tokenizer, n=6, seed=3):
    rows = make_task("reverse", n, seed=seed, min_len=2, max_len=5)
    return tokenize_for_seq2seq(rows, tokenizer) if arch == "t5" else tokenize_for_causal_lm(rows, tokenizer)


def _reference_fisher(model, rows, *, sampled, seed, batch_size):
    """Mean over rows of the squared gradient of the row's answer NLL (HF's per-token mean loss
    ``model(...).loss`` times the row's answer tokens), one backward per row; for the true Fisher, against answers drawn as ``estimate_fisher``
    documents it: one ``torch.rand(labels.shape)`` per length group's batch from the seeded
    generator, then :func:`_draw_tokens` on that row's teacher-forced logits."""
    from clm_hf.evaluation import is_seq2seq
    from clm_hf.strategies.ewc import _draw_tokens, _unpadded_batches

    seq2seq = is_seq2seq(model)
    params = trainable_parameters(model)
    reference = {n: torch.zeros_like(p) for n, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    for batch in _unpadded_batches(rows, batch_size, "cpu"):
        labels = batch.pop("labels")
        if seq2seq:  # the decoder is teacher-forced on the dataset's answer
            batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        uniforms = torch.rand(labels.shape, generator=generator)
        for i in range(labels.shape[0]):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            target = labels[i : i + 1].clone()
            if sampled:
                with torch.no_grad():
                    logits = model(**row).logits.float()
                if seq2seq:
                    draws = _draw_tokens(logits, uniforms[i : i + 1])
                    target = torch.where(target != -100, draws, target)
                else:  # position t predicts token t + 1
                    draws = _draw_tokens(logits[:, :-1], uniforms[i : i + 1, 1:])
                    target[:, 1:] = torch.where(target[:, 1:] != -100, draws, target[:, 1:])
            model.zero_grad()
            answer_tokens = int((target if seq2seq else target[:, 1:]).ne(-100).sum())
            (model(**row, labels=target).loss * answer_tokens).backward()
            for n, p in params.items():
                reference[n] += p.grad**2
    model.zero_grad()
    return {n: r / len(rows) for n, r in reference.items()}


@pytest.mark.parametrize("sampled", [False, True], ids=["empirical", "true"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_fisher_vmap_equals_loop_and_is_per_sample(arch, sampled, make_model, tokenizer):
    model = make_model(arch)
    rows = _rows_for(arch, tokenizer)
    vmapped = estimate_fisher(model, rows, method="vmap", batch_size=4, sampled=sampled, seed=7)
    looped = estimate_fisher(model, rows, method="loop", batch_size=4, sampled=sampled, seed=7)
    for name in looped:
        torch.testing.assert_close(vmapped[name], looped[name], rtol=1e-4, atol=1e-9)
    # Reference: mean over rows of the squared gradient of that row's answer NLL, with the
    # same draws for the true Fisher: only answer positions sampled, and averaged over.
    reference = _reference_fisher(model, rows, sampled=sampled, seed=7, batch_size=4)
    for name in looped:
        torch.testing.assert_close(looped[name], reference[name], rtol=1e-4, atol=1e-9)
    assert sum(float(r.sum()) for r in reference.values()) > 0


def _calls_of(monkeypatch, name):
    """Count the calls of ``clm_hf.strategies.ewc.<name>`` (still running it)."""
    import clm_hf.strategies.ewc as ewc_module

    calls, original = [], getattr(ewc_module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ewc_module, name, counted)
    return calls


def _assert_fisher_close(got, want, rtol=1e-5):
    """Every tensor within ``rtol`` of ``want``, relative to that tensor's largest entry."""
    assert list(got) == list(want)
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("sampled", [False, True], ids=["empirical", "true"])
def test_hooked_fisher_equals_the_per_row_fisher(sampled, tied, make_model, tokenizer, monkeypatch):
    # Rows of 4 lengths in batches of 3 (some batches short), GPT-2's broadcast position ids, its
    # embedding tied to the LM head (both uses of one weight add up per row before the square) or
    # not (token ids repeated in a row add up before the square).
    model = make_model("gpt2", tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    rows = _rows_for("gpt2", tokenizer, n=14)
    assert len(set(map(len, rows["input_ids"]))) >= 3
    vmapped = estimate_fisher(model, rows, method="vmap", batch_size=3, sampled=sampled, seed=7)
    hooked = estimate_fisher(model, rows, method="hooks", batch_size=3, sampled=sampled, seed=7)
    _assert_fisher_close(hooked, vmapped)
    hooked_calls, vmap_calls = _calls_of(monkeypatch, "_hooked_squared_grads"), _calls_of(monkeypatch, "_vmapped_row_grads")
    auto = estimate_fisher(model, rows, method="auto", batch_size=3, sampled=sampled, seed=7)
    assert hooked_calls and not vmap_calls  # "auto" took the hooks (checked on the first rows)
    _assert_fisher_close(auto, vmapped)
    assert sum(float(f.sum()) for f in vmapped.values()) > 0


def test_hooked_fisher_squares_each_rows_gradient_not_the_batch_gradient(make_model, tokenizer):
    # Equal-length rows in one batch: the hooked Fisher is the sum of the rows' own squared gradients,
    # far from the square of their summed (batch) gradient, which the hooks' products would give if
    # they summed over the rows before squaring.
    from clm_hf.strategies._row_gradients import row_gradient_modules
    from clm_hf.strategies.ewc import _hooked_squared_grads, _row_loss, _unpadded_batches

    model = make_model("gpt2").eval()
    params = trainable_parameters(model)
    rows = tokenize_for_causal_lm(make_task("reverse", 6, seed=1, min_len=4, max_len=4), tokenizer)
    (batch,) = _unpadded_batches(rows, 6, "cpu")
    labels = batch.pop("labels")
    modules = row_gradient_modules(model, params)
    hooked = _hooked_squared_grads(model, modules, params, batch, labels, None, False)
    one_by_one = [torch.zeros_like(t) for t in hooked]
    for i in range(labels.shape[0]):
        row = _hooked_squared_grads(model, modules, params, {k: v[i : i + 1] for k, v in batch.items()}, labels[i : i + 1],
                                    None, False)
        torch._foreach_add_(one_by_one, row)
    batch_grads = torch.autograd.grad(_row_loss(model(**batch).logits, labels, None, False), list(params.values()))
    for name, got, want, g in zip(params, hooked, one_by_one, batch_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)
    total = sum(float(t.sum()) for t in hooked)
    squared_batch = sum(float(g.square().sum()) for g in batch_grads)
    assert abs(squared_batch - total) > 0.1 * total


def test_hooked_fisher_falls_back_where_the_hooks_do_not_apply(make_model, tokenizer, caplog, monkeypatch):
    # Llama's RMSNorm and T5's layer norm weights are no layer type the hooks know: "auto" is the
    # vmapped Fisher, unchecked.
    hooked_calls = _calls_of(monkeypatch, "_hooked_squared_grads")
    for arch, norm in (("llama", "LlamaRMSNorm"), ("t5", "T5LayerNorm")):
        other = make_model(arch)
        rows = _rows_for(arch, tokenizer, n=8)
        vmapped = estimate_fisher(other, rows, method="vmap", batch_size=3, sampled=True, seed=2)
        auto = estimate_fisher(other, rows, method="auto", batch_size=3, sampled=True, seed=2)
        assert not hooked_calls and all(torch.equal(auto[n], vmapped[n]) for n in vmapped)
        with pytest.raises(ValueError, match=norm):
            estimate_fisher(other, rows, method="hooks", batch_size=3)
    # GPT-2 with its embedding matrix also read outside nn.Embedding's forward: the hooks cannot see
    # that use; the check on the first rows catches it and "auto" gives the vmapped Fisher.
    model = make_model("gpt2")
    rows = _rows_for("gpt2", tokenizer, n=8)
    wte = model.transformer.wte
    handle = model.transformer.ln_f.register_forward_hook(lambda module, args, out: out + wte.weight[0])
    try:
        vmapped = estimate_fisher(model, rows, method="vmap", batch_size=3, sampled=True, seed=2)
        auto = estimate_fisher(model, rows, method="auto", batch_size=3, sampled=True, seed=2)
        assert "outside its module" in caplog.text
        _assert_fisher_close(auto, vmapped)
        with pytest.raises(ValueError, match="'transformer.wte.weight' differs from the per-row loop's"):
            estimate_fisher(model, rows, method="hooks", batch_size=3, sampled=True, seed=2)
    finally:
        handle.remove()


def test_fisher_is_of_the_answer_log_likelihood_whatever_its_length(make_model, tokenizer):
    """Rows whose answers have 3 and 7 tokens: each row's Fisher is the square of the gradient of
    its own ``log p(answer | prompt)`` (computed here from log-softmax, one row at a time), not
    of a per-token mean (which would be 1/9 and 1/49 of it)."""
    model = make_model("gpt2")
    rows = tokenize_for_causal_lm(make_task("copy", 8, seed=0, min_len=2, max_len=6), tokenizer)
    lengths = [sum(label != -100 for label in row[1:]) for row in rows["labels"]]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    assert lengths[long] >= lengths[short] + 3, lengths
    params = trainable_parameters(model)
    for index in (short, long):
        row = rows.select([index])
        fisher = estimate_fisher(model, row, method="loop")
        vmapped = estimate_fisher(model, row, method="vmap")
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        answer = (labels[0, 1:] != -100).nonzero().flatten()
        log_likelihood = logp[answer, labels[0, 1:][answer]].sum()
        grads = torch.autograd.grad(log_likelihood, list(params.values()))
        for (name, _), grad in zip(params.items(), grads):
            torch.testing.assert_close(fisher[name], grad.square(), rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(vmapped[name], grad.square(), rtol=1e-4, atol=1e-9)


def test_true_fisher_is_seeded_and_differs_from_empirical(make_model, tokenizer):
    model = make_model("gpt2")
    rows = _rows_for("gpt2", tokenizer, n=8)
    first = estimate_fisher(model, rows, sampled=True, seed=0)
    again = estimate_fisher(model, rows, sampled=True, seed=0)
    other = estimate_fisher(model, rows, sampled=True, seed=1)
    empirical = estimate_fisher(model, rows)
    assert all(torch.equal(first[n], again[n]) for n in first)  # same seed, identical Fisher
    assert any(not torch.equal(first[n], other[n]) for n in first)
    assert any(not torch.equal(first[n], empirical[n]) for n in first)
    assert all((first[n] >= 0).all() for n in first)


def test_row_loss_samples_and_counts_only_answer_positions():
    from clm_hf.strategies.ewc import _draw_tokens, _row_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, 11, generator=gen)
    labels = torch.tensor([[-100, -100, 4, 7, -100, 2]])
    uniforms = torch.rand(1, 6, generator=gen)
    loss = _row_loss(logits, labels, uniforms, seq2seq=False)
    # Causal: position t scores labels[t + 1]; answers at label positions 2, 3, 5.
    draws = _draw_tokens(logits[:, :-1], uniforms[:, 1:])
    logp = torch.log_softmax(logits[0, :-1], -1)
    expected = -torch.stack([logp[t - 1, draws[0, t - 1]] for t in (2, 3, 5)]).sum()
    torch.testing.assert_close(loss, expected)
    # The draws at unscored positions do not matter; the dataset's answers are not used.
    moved = uniforms.clone()
    moved[:, [0, 1, 4]] = torch.rand(1, 3, generator=gen)
    other_labels = torch.where(labels != -100, (labels + 1) % 11, labels)
    torch.testing.assert_close(_row_loss(logits, other_labels, moved, seq2seq=False), loss)
    # Without uniforms: the empirical loss, the NLL of the dataset's answer (a sum, not a mean).
    expected = -torch.stack([logp[t - 1, labels[0, t]] for t in (2, 3, 5)]).sum()
    torch.testing.assert_close(_row_loss(logits, labels, None, seq2seq=False), expected)


def test_sampled_answers_follow_the_models_distribution(make_model, tokenizer):
    """Over many seeds, the token drawn at one answer position has the frequencies of
    softmax(logits) there (chi-square goodness of fit), so the true Fisher's answers are samples
    of the model's own predictive distribution."""
    from clm_hf.strategies.ewc import _draw_tokens

    model = make_model("gpt2")
    with torch.no_grad():  # sharpen the prediction so that the test tells it from uniform
        model.transformer.ln_f.weight.mul_(5.0)
    rows = tokenize_for_causal_lm(make_task("copy", 1, seed=0, min_len=4, max_len=4), tokenizer)
    ids, labels = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()[0, :-1]
    position = int((labels[0, 1:] != -100).nonzero()[0])  # first answer position (shifted)
    probs = torch.softmax(logits[position], -1).double()
    draws = 20_000
    counts = torch.zeros_like(probs)
    for seed in range(draws):  # as estimate_fisher draws: a uniform per label position per seed
        uniforms = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed))[0, 1:]
        counts[_draw_tokens(logits, uniforms)[position]] += 1
    expected = draws * probs
    assert float(probs.max()) > 0.3, "the sharpened model should not be near-uniform"
    big = expected >= 5  # tokens rarer than that are pooled into one cell
    observed, expected = counts[big], expected[big]
    if not big.all():
        observed = torch.cat([observed, counts[~big].sum().view(1)])
        expected = torch.cat([expected, (draws * probs[~big]).sum().view(1)])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    z = 3.719  # one-sided p = 1e-4; Wilson-Hilferty approximation of the chi-square quantile
    critical = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert statistic < critical, (statistic, critical, dof)
    # The same counts are far from a uniform sampler's.
    uniform = torch.full_like(probs, draws / len(probs))
    assert float(((counts - uniform) ** 2 / uniform).sum()) > 10 * critical


class _FakeTrainer:
    def __init__(self, model):
        self.model = model

        class _Args:
            device = torch.device("cpu")
            disable_tqdm = True

        self.args = _Args()


def _task(index, rows):
    from clm_hf.strategies.base import TaskInfo

    return TaskInfo(task_id=str(index), name=f"t{index}", index=index, train_dataset=rows)


def test_online_mode_keeps_one_decayed_term_and_separate_keeps_all(make_model, tokenizer):
    model = make_model("gpt2")
    rows_a = tokenize_for_causal_lm(make_task("copy", 4, seed=0), tokenizer)
    rows_b = tokenize_for_causal_lm(make_task("sort", 4, seed=1), tokenizer)
    online, separate = EWC(mode="online", gamma=0.5), EWC(mode="separate")
    trainer = _FakeTrainer(model)
    fisher_a = estimate_fisher(model, rows_a.shuffle(seed=0), sampled=True, seed=0)  # as after_task draws it
    for strategy in (online, separate):
        strategy.after_task(trainer, _task(0, rows_a))
    with torch.no_grad():  # the model moves between tasks
        for p in model.parameters():
            p.add_(0.01)
    fisher_b = estimate_fisher(model, rows_b.shuffle(seed=1), sampled=True, seed=1)
    for strategy in (online, separate):
        strategy.after_task(trainer, _task(1, rows_b))
    assert len(online.terms) == 1 and len(separate.terms) == 2
    name = next(iter(fisher_a))
    torch.testing.assert_close(online.terms[0][0][name], 0.5 * fisher_a[name] + fisher_b[name])
    torch.testing.assert_close(separate.terms[0][0][name], fisher_a[name])
    # The online anchor is the latest weights; 8 bytes per trainable parameter in all.
    params = trainable_parameters(model)
    torch.testing.assert_close(online.terms[0][1][name], params[name].detach())
    state_bytes = sum(t.numel() * t.element_size() for f, a in online.terms for t in (*f.values(), *a.values()))
    assert state_bytes == 8 * sum(p.numel() for p in params.values())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ewc_lambda": -1.0}, "ewc_lambda"),
        ({"mode": "both"}, "mode"),
        ({"gamma": 1.5}, "gamma"),
        ({"fisher_samples": 0}, "fisher_samples"),
        ({"fisher_method": "hook"}, "'auto', 'hooks', 'vmap' or 'loop'"),
        ({"lamda": 3}, "Did you mean 'lambda'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EWC(**options)


def test_lambda_alias_from_original_quick_start():
    assert EWC(**{"lambda": 100.0}).config.ewc_lambda == 100.0


def test_fused_and_per_tensor_penalty_sums_agree():
    # The GPU path (one fused L1 norm of F·d²) and the CPU path (one dot per tensor) are the same sum.
    from clm_hf.strategies.ewc import _weighted_square_sum

    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    diffs = [torch.randn(s, generator=generator) for s in shapes]
    pulls = [torch.rand(s, generator=generator) * d for s, d in zip(shapes, diffs)]  # q = F d with F >= 0
    exact = sum(float((d.double() * q.double()).sum()) for d, q in zip(diffs, pulls))
    for fused in (True, False):
        assert float(_weighted_square_sum(diffs, pulls, fused=fused)) == pytest.approx(exact, rel=1e-6)


def test_online_penalty_uses_gamma_times_running_fisher(make_model, tokenizer):
    """Schwarz et al. 2018, eq. 4: F*_i = γ F*_{i-1} + F_i, and task i+1 is penalised with
    λ/2 · γ F*_i (θ − θ*_i)². At γ = 0.5, checked by hand after one and after two tasks."""
    model = make_model("gpt2")
    rows_a = tokenize_for_causal_lm(make_task("copy", 4, seed=0), tokenizer)
    rows_b = tokenize_for_causal_lm(make_task("sort", 4, seed=1), tokenizer)
    ewc, trainer = EWC(mode="online", gamma=0.5, ewc_lambda=7.0), _FakeTrainer(model)
    params = trainable_parameters(model)

    def moved_penalty(fisher, anchor):
        with torch.no_grad():  # move away from the anchor, then compare with the hand-computed value
            for p in params.values():
                p.add_(0.01)
        expected = sum((fisher[n] * (p.detach() - anchor[n]) ** 2).sum() for n, p in params.items())
        return ewc.penalty().detach(), 0.5 * 7.0 * 0.5 * expected

    fisher_a = estimate_fisher(model, rows_a.shuffle(seed=0), sampled=True, seed=0)  # as after_task draws it
    ewc.after_task(trainer, _task(0, rows_a))
    anchor_a = {n: p.detach().clone() for n, p in params.items()}
    value, expected = moved_penalty(fisher_a, anchor_a)
    torch.testing.assert_close(value, expected)
    fisher_b = estimate_fisher(model, rows_b.shuffle(seed=1), sampled=True, seed=1)
    ewc.after_task(trainer, _task(1, rows_b))
    anchor_b = {n: p.detach().clone() for n, p in params.items()}
    running = {n: 0.5 * fisher_a[n] + fisher_b[n] for n in fisher_a}
    value, expected = moved_penalty(running, anchor_b)
    torch.testing.assert_close(value, expected)
    # separate mode ignores γ: each task's own Fisher, undecayed.
    separate = EWC(mode="separate", gamma=0.5, ewc_lambda=7.0)
    separate.terms = [(fisher_b, anchor_b)]
    separate._bind(model)
    expected = sum((fisher_b[n] * (p.detach() - anchor_b[n]) ** 2).sum() for n, p in params.items())
    torch.testing.assert_close(separate.penalty().detach(), 0.5 * 7.0 * expected)


# --- the penalty's gradient added to .grad (edit_gradients) against the autograd penalty ----------
def _train_with_armed_ewc(tmp_path, make_model, tokenizer, *, direct, accumulation=1, first=(), **options):
    """Three optimizer steps of a trainer whose EWC holds a random Fisher and anchor (two terms in
    ``mode="separate"``); ``direct=False`` forces the autograd penalty (what DeepSpeed gets)."""
    from tests.conftest import make_trainer

    model = make_model("gpt2")
    gen = torch.Generator().manual_seed(0)
    params = trainable_parameters(model)
    ewc = EWC(ewc_lambda=50.0, **options)
    ewc.terms = [({n: torch.rand(p.shape, generator=gen) for n, p in params.items()},
                  {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for n, p in params.items()})
                 for _ in range(2 if options.get("mode") == "separate" else 1)]
    # AdamW with clipping (max_grad_norm=1.0, far below the penalty's gradient norm here): the clip
    # must see the penalty's gradient for the two paths to agree.
    trainer = make_trainer(tmp_path / f"direct{direct}", model, tokenizer, [*first, ewc], max_steps=3,
                           per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation,
                           save_continual_state=False, max_grad_norm=1.0)
    assert ewc._direct  # a plain CPU trainer can edit gradients
    ewc._direct = direct
    trainer.train_task(tokenize_for_causal_lm(make_task("reverse", 24, seed=5), tokenizer), task_id="t")
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


@pytest.mark.parametrize("accumulation, options", [(1, {}), (2, {}), (1, {"mode": "online", "gamma": 0.5}),
                                                   (1, {"mode": "separate"})],
                         ids=["plain", "accumulation2", "online", "separate"])
def test_gradient_added_in_edit_gradients_equals_autograd_penalty(tmp_path, make_model, tokenizer, accumulation, options):
    direct, trainer = _train_with_armed_ewc(tmp_path, make_model, tokenizer, direct=True, accumulation=accumulation, **options)
    autograd, _ = _train_with_armed_ewc(tmp_path, make_model, tokenizer, direct=False, accumulation=accumulation, **options)
    for name in direct:
        torch.testing.assert_close(direct[name], autograd[name], rtol=0, atol=1e-6)
    # The penalty's value is still logged (computed at the logging steps), and is not in `loss`.
    logged = [entry for entry in trainer.state.log_history if "ewc_penalty" in entry]
    assert len(logged) == 3 and all(entry["ewc_penalty"] > 0 for entry in logged)


def test_penalty_gradient_goes_in_before_other_strategies_edits(tmp_path, make_model, tokenizer):
    """Listed after a gradient editor, EWC's gradient is still added first: the other edit sees the
    gradient of the whole loss, as it did when the penalty was a loss term."""
    from clm_hf.strategies.base import Strategy

    class HalveGradients(Strategy):  # an edit that does not commute with adding a term afterwards
        name = "halve_gradients_test"

        def edit_gradients(self, model):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)

    direct, _ = _train_with_armed_ewc(tmp_path, make_model, tokenizer, direct=True, first=[HalveGradients()])
    autograd, _ = _train_with_armed_ewc(tmp_path, make_model, tokenizer, direct=False, first=[HalveGradients()])
    for name in direct:
        torch.testing.assert_close(direct[name], autograd[name], rtol=0, atol=1e-6)


def test_edit_gradients_on_bf16_parameters_accumulates_in_fp32(make_model):
    model = make_model("gpt2").to(torch.bfloat16)
    ewc, fisher, anchor = _armed_ewc(model, lam=3.0)
    ewc._direct = True
    params = trainable_parameters(model)
    for p in params.values():
        p.grad = torch.full_like(p, 0.25)
    ewc.edit_gradients(model)
    for name, p in params.items():
        expected = (3.0 * fisher[name] * (p.detach().float() - anchor[name].float()) + 0.25).to(torch.bfloat16)
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=0)


def test_edit_gradients_fused_small_tensors_give_the_same_bits(make_model, monkeypatch):
    # On the CPU the small tensors go through two _foreach calls, the large ones one at a time
    # through the scratch buffer: every split gives the bits of the all-one-at-a-time path.
    import clm_hf.strategies.ewc as ewc_module

    model = make_model("gpt2")
    params = trainable_parameters(model)
    sizes = sorted(p.numel() for p in params.values())
    results = {}
    for limit in (0, sizes[len(sizes) // 2] + 1, sizes[-1] + 1):  # none fused, about half, all
        monkeypatch.setattr(ewc_module, "FOREACH_MAX_NUMEL", limit)
        ewc, _, _ = _armed_ewc(model, lam=3.0)
        ewc._direct = True
        for i, p in enumerate(params.values()):
            p.grad = torch.full_like(p, 0.25 + i)
        ewc.edit_gradients(model)
        assert len(ewc._small) == sum(n < limit for n in sizes) and len(ewc._small) + len(ewc._large) == len(sizes)
        results[limit] = {n: p.grad.clone() for n, p in params.items()}
    reference, *others = results.values()
    assert 0 < len([n for n in sizes if n < sizes[len(sizes) // 2] + 1]) < len(sizes)  # the middle limit splits
    for other in others:
        for name in reference:
            assert torch.equal(other[name], reference[name]), name


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16_fisher", "bfloat16"])
def test_edit_gradients_adds_the_autograd_penalty_gradient(make_model, state_dtype):
    model = make_model("gpt2")
    ewc, fisher, anchor = _armed_ewc(model, lam=3.0)
    ewc.config.state_dtype = state_dtype
    ewc.load_state_dict(ewc.state_dict())  # the Fisher and anchor in the state dtype
    ewc._bind(model)
    params = trainable_parameters(model)
    ewc.penalty().backward()
    expected = {n: p.grad.clone() + 0.25 for n, p in params.items()}
    for p in params.values():
        p.grad = torch.full_like(p, 0.25)
    ewc._direct = True
    ewc.edit_gradients(model)
    for name, p in params.items():
        assert p.grad.grad_fn is None and not p.grad.requires_grad
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-7)


def test_hooked_fisher_out_of_memory_is_raised_not_retried_with_the_larger_vmapped_pass(make_model, tokenizer, monkeypatch):
    import clm_hf.strategies.ewc as ewc_module

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ewc_module, "_hooked_squared_grads", out_of_memory)
    vmapped = _calls_of(monkeypatch, "_vmapped_row_grads")
    with pytest.raises(torch.OutOfMemoryError):
        estimate_fisher(make_model("gpt2"), _rows_for("gpt2", tokenizer, n=4), method="auto", batch_size=2)
    assert not vmapped
