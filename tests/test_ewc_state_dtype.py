"""EWC's ``state_dtype``: the Fisher and anchor kept in bf16 (both, or the Fisher only), the penalty in fp32."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from clm_hf import EWC
from clm_hf.strategies.base import strategies_from_specs, trainable_parameters
from clm_hf.strategies.ewc import EWCConfig
from tests.conftest import make_trainer

# Unit roundoff of bf16 (8 significant bits, round to nearest): |x - bf16(x)| <= U * |x|.
U = 2.0**-8
DTYPES = {"float32": (torch.float32, torch.float32), "bfloat16": (torch.bfloat16, torch.bfloat16),
          "bfloat16_fisher": (torch.bfloat16, torch.float32)}


def _trained(tmp_path, make_model, tokenizer, tiny_stream, state_dtype, tasks=1):
    from clm_hf.tasks import tokenize_for_causal_lm

    ewc = EWC(state_dtype=state_dtype, fisher_samples=8)
    trainer = make_trainer(tmp_path / state_dtype, make_model("gpt2"), tokenizer, [ewc], max_steps=2)
    for name in list(tiny_stream)[:tasks]:
        trainer.train_task(tokenize_for_causal_lm(tiny_stream[name]["train"], tokenizer), task_id=name)
    return ewc, trainer


def _state_bytes(ewc) -> int:
    return sum(t.numel() * t.element_size() for fisher, anchor in ewc.terms for t in (*fisher.values(), *anchor.values()))


def test_bf16_state_halves_the_bytes_and_is_checkpointed_in_bf16(tmp_path, make_model, tokenizer, tiny_stream):
    runs = {dtype: _trained(tmp_path, make_model, tokenizer, tiny_stream, dtype)[0] for dtype in DTYPES}
    full = _state_bytes(runs["float32"])
    trainable = sum(f.numel() for f in runs["float32"].terms[0][0].values())
    assert full == 8 * trainable
    assert _state_bytes(runs["bfloat16"]) * 2 == full  # 4 B/param
    assert _state_bytes(runs["bfloat16_fisher"]) * 4 == full * 3  # 6 B/param
    for dtype, ewc in runs.items():
        fisher_dtype, anchor_dtype = DTYPES[dtype]
        fisher, anchor = ewc.terms[0]
        assert {f.dtype for f in fisher.values()} == {fisher_dtype} and {a.dtype for a in anchor.values()} == {anchor_dtype}
        # The live tensors the penalty uses are the stored ones, not fp32 copies.
        assert {f.dtype for f in ewc._fishers} == {fisher_dtype} and {a.dtype for a in ewc._anchors} == {anchor_dtype}
        folder = tmp_path / f"state-{dtype}"
        ewc.save_state(folder)
        with safe_open(str(folder / "state.safetensors"), framework="pt") as handle:
            saved = {key: handle.get_tensor(key).dtype for key in handle.keys()}
        assert {d for k, d in saved.items() if "/fisher/" in k} == {fisher_dtype}
        assert {d for k, d in saved.items() if "/anchor/" in k} == {anchor_dtype}
    # The bf16 Fisher is the fp32 one rounded once (same rows, same seed, same training).
    for name, f32 in runs["float32"].terms[0][0].items():
        torch.testing.assert_close(runs["bfloat16"].terms[0][0][name], f32.to(torch.bfloat16), rtol=0, atol=0)


def _bound_check(state_dtype, fisher, anchor, theta, scale, penalty, grads, penalty_fp32, grads_fp32):
    """The bf16 rounding bound: g = 2·scale·F(θ − θ*), so rounding F by e_F and θ* by e_A moves g by at most
    2·scale·(|e_F|·|θ − θ*| + |F̃|·|e_A|), |e_F| <= U|F| and |e_A| <= U|θ*|; the penalty likewise."""
    round_anchor = DTYPES[state_dtype][1] == torch.bfloat16
    total_bound = torch.zeros((), dtype=torch.float64)
    for name in fisher:
        f, a, t = fisher[name].double(), anchor[name].double(), theta[name].double()
        d = (t - a).abs()
        e_a = U * a.abs() if round_anchor else torch.zeros_like(a)
        bound = 2 * scale * (U * f * d + (1 + U) * f * e_a)
        slack = 1e-5 * (2 * scale * f * d).max() + 1e-12  # fp32 arithmetic of both sides
        assert ((grads[name].double() - grads_fp32[name].double()).abs() <= bound + slack).all(), name
        total_bound += (scale * (U * f * d.square() + (1 + U) * f * (2 * d * e_a + e_a.square()))).sum()
    assert abs(float(penalty) - float(penalty_fp32)) <= float(total_bound) * (1 + 1e-3) + 1e-6 * float(penalty_fp32)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "bfloat16_fisher"])
def test_penalty_and_gradient_match_fp32_within_the_bf16_rounding_bound(state_dtype, make_model):
    model = make_model("gpt2")
    params = trainable_parameters(model)
    gen = torch.Generator().manual_seed(0)
    # A Fisher spread over decades (as a real one is) and an anchor the weights drifted from.
    fisher = {n: torch.rand(p.shape, generator=gen) ** 4 for n, p in params.items()}
    anchor = {n: p.detach() + 1e-3 * torch.randn(p.shape, generator=gen) for n, p in params.items()}
    state = {"terms": [{"fisher": fisher, "anchor": anchor}]}
    results = {}
    for dtype in ("float32", state_dtype):
        ewc = EWC(state_dtype=dtype, ewc_lambda=50.0)
        ewc.load_state_dict(state)
        ewc._bind(model)
        penalty = ewc.penalty()
        assert penalty.dtype == torch.float32  # accumulated in fp32 whatever the state dtype
        grads = torch.autograd.grad(penalty, list(params.values()))
        results[dtype] = (penalty.detach(), dict(zip(params, grads)))
    (p32, g32), (p16, g16) = results["float32"], results[state_dtype]
    theta = {n: p.detach() for n, p in params.items()}
    _bound_check(state_dtype, fisher, anchor, theta, 25.0, p16, g16, p32, g32)
    norm = torch.cat([g.reshape(-1) for g in g32.values()]).norm()
    error = torch.cat([(g16[n] - g32[n]).reshape(-1) for n in g32]).norm()
    assert float(error) > 0  # the state really was rounded
    if state_dtype == "bfloat16_fisher":
        # Only F is rounded: penalty and gradient within 2^-8 (0.39%) of fp32, relative, whatever the drift.
        assert abs(float(p16 - p32)) <= U * float(p32) * 1.001 and float(error) <= U * float(norm) * 1.001
    else:
        # The anchor's rounding (up to 2^-8·|θ*|, e.g. 0.004 on a LayerNorm weight of 1) is not small against
        # a drift of 1e-3: the gradient is off by several percent (docs/strategies.md measures it).
        assert float(error) > U * float(norm)


def test_bf16_penalty_is_fp32_and_gradients_keep_the_parameter_dtype(make_model):
    model = make_model("gpt2").to(torch.bfloat16)
    params = trainable_parameters(model)
    ewc = EWC(state_dtype="bfloat16", ewc_lambda=3.0)
    ewc.load_state_dict({"terms": [{"fisher": {n: torch.rand(p.shape) for n, p in params.items()},
                                    "anchor": {n: p.detach().float() + 0.01 for n, p in params.items()}}]})
    ewc._bind(model)
    penalty = ewc.penalty()
    assert penalty.dtype == torch.float32 and penalty.item() > 0
    penalty.backward()
    assert {p.grad.dtype for p in params.values()} == {torch.bfloat16}


def test_online_fisher_is_summed_in_fp32_and_rounded_once(tmp_path, make_model, tokenizer, tiny_stream, monkeypatch):
    import clm_hf.strategies.ewc as ewc_module

    estimates = []

    def known_fisher(model, rows, **kwargs):  # a Fisher of known values per task (sums over 8 rows)
        gen = torch.Generator().manual_seed(len(estimates))
        fisher = {n: torch.rand(p.shape, generator=gen) * 8 for n, p in trainable_parameters(model).items()}
        estimates.append({n: f / 8.0 for n, f in fisher.items()})
        return fisher

    monkeypatch.setattr(ewc_module, "estimate_fisher", known_fisher)
    from clm_hf.tasks import tokenize_for_causal_lm

    ewc = EWC(state_dtype="bfloat16", fisher_samples=8, gamma=0.9)
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [ewc], max_steps=1)
    for name in list(tiny_stream)[:2]:
        trainer.train_task(tokenize_for_causal_lm(tiny_stream[name]["train"], tokenizer), task_id=name)
    assert len(ewc.terms) == 1 and len(estimates) == 2
    first, second = estimates
    stored = ewc.terms[0][0]
    twice = 0
    for name, f in stored.items():
        expected = (0.9 * first[name].to(torch.bfloat16).float() + second[name]).to(torch.bfloat16)
        assert f.dtype == torch.bfloat16 and torch.equal(f, expected), name
        # Summed in bf16 (the new Fisher rounded before the sum) would differ somewhere.
        twice += int((expected != (0.9 * first[name].to(torch.bfloat16) + second[name].to(torch.bfloat16))).sum())
    assert twice > 0


@pytest.mark.parametrize("state_dtype", ["bfloat16", "bfloat16_fisher"])
def test_state_dtype_round_trips_through_checkpoints(state_dtype, tmp_path, make_model, tokenizer, tiny_stream):
    ewc, trainer = _trained(tmp_path, make_model, tokenizer, tiny_stream, state_dtype)
    ewc.save_state(tmp_path / "saved")
    # The option itself is part of the saved strategy settings.
    assert EWCConfig.from_dict(ewc.config.to_dict()).state_dtype == state_dtype
    restored = strategies_from_specs([{"name": "ewc", **ewc.config.to_dict()}])[0]
    restored.load_state(tmp_path / "saved")
    for (f, a), (rf, ra) in zip(ewc.terms, restored.terms):
        for name in f:
            assert rf[name].dtype == f[name].dtype and ra[name].dtype == a[name].dtype
            assert torch.equal(rf[name], f[name]) and torch.equal(ra[name], a[name])
    restored._bind(trainer.model)
    torch.testing.assert_close(restored.penalty(), ewc.penalty(), rtol=0, atol=0)
    # A run resumed with another state_dtype gets its own dtypes.
    as_fp32 = EWC()
    as_fp32.load_state(tmp_path / "saved")
    assert {t.dtype for f, a in as_fp32.terms for t in (*f.values(), *a.values())} == {torch.float32}


def test_bad_state_dtype_is_named():
    with pytest.raises(ValueError, match=r"EWC state_dtype must be one of \['bfloat16', 'bfloat16_fisher', 'float32'\], "
                                         r"got 'float16'"):
        strategies_from_specs([{"name": "ewc", "state_dtype": "float16"}])
