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


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_fisher_vmap_equals_loop_and_is_per_sample(arch, make_model, tokenizer):
    model = make_model(arch)
    rows = make_task("reverse", 6, seed=3, min_len=2, max_len=5)
    rows = tokenize_for_seq2seq(rows, tokenizer) if arch == "t5" else tokenize_for_causal_lm(rows, tokenizer)
    vmapped = estimate_fisher(model, rows, method="vmap", batch_size=4)
    looped = estimate_fisher(model, rows, method="loop", batch_size=4)
    for name in looped:
        torch.testing.assert_close(vmapped[name], looped[name], rtol=1e-4, atol=1e-9)
    # Reference: mean over rows of the squared gradient of that row's own loss.
    params = trainable_parameters(model)
    name = next(iter(params))
    reference = torch.zeros_like(params[name])
    for i in range(len(rows)):
        model.zero_grad()
        row = {k: torch.tensor([rows[i][k]]) for k in ("input_ids", "labels")}
        model(**row).loss.backward()
        reference += params[name].grad ** 2
    torch.testing.assert_close(looped[name], reference / len(rows), rtol=1e-4, atol=1e-9)
    # Squaring the batch-mean gradient instead would give a smaller estimate.
    model.zero_grad()
    assert float(reference.sum()) > 0


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
        ({"lamda": 3}, "Did you mean 'lambda'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EWC(**options)


def test_lambda_alias_from_original_quick_start():
    assert EWC(**{"lambda": 100.0}).config.ewc_lambda == 100.0


def test_true_fisher_samples_answers_from_the_model(make_model, tokenizer):
    from clm_hf.strategies.ewc import _sample_labels

    model = make_model("gpt2")
    rows = tokenize_for_causal_lm(make_task("copy", 4, seed=0, min_len=3, max_len=3), tokenizer)
    batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "labels")}
    sampled = _sample_labels(model, batch, torch.Generator().manual_seed(0))
    prompt = batch["labels"] == -100
    assert torch.equal(sampled[prompt], batch["labels"][prompt])  # unscored positions untouched
    assert not torch.equal(sampled, batch["labels"])  # an untrained model rarely samples the answer
    again = _sample_labels(model, batch, torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again)
    true = estimate_fisher(model, rows, sampled=True, seed=0)
    empirical = estimate_fisher(model, rows)
    assert all((true[n] >= 0).all() for n in true) and any(not torch.equal(true[n], empirical[n]) for n in true)
