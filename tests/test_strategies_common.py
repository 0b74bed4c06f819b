"""Every registered strategy through the same checks: defaults, checkpoint round trip, causal and
seq2seq models, and composition with Replay. A new strategy gets these for free by registering."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

import clm_hf.strategies as strategies_pkg
from clm_hf import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments, Replay
from clm_hf.strategies import STRATEGY_REGISTRY, build_strategy, get_strategy_class
from tests.conftest import FAST_OPTIONS, small_args

NAMES = sorted(n for n in STRATEGY_REGISTRY if n in FAST_OPTIONS)


def _fast(name: str, **extra):
    cls = get_strategy_class(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    options = {k: v for k, v in {**FAST_OPTIONS[name], **extra}.items() if k in fields}
    return build_strategy(name, **options)


def test_every_registered_strategy_is_covered():
    missing = sorted(set(STRATEGY_REGISTRY) - set(FAST_OPTIONS) - {n for n in STRATEGY_REGISTRY if n.endswith("_test")})
    assert not missing, f"add {missing} to FAST_OPTIONS so the common checks run on them"
    for name in NAMES:
        cls = get_strategy_class(name)
        assert cls.__name__ in strategies_pkg.__all__, f"{cls.__name__} is not exported from clm_hf.strategies"


@pytest.mark.parametrize("name", NAMES)
def test_construction_defaults_and_config_round_trip(name):
    strategy = build_strategy(name)
    assert strategy.name == name
    config = strategy.config
    assert type(config).from_dict(config.to_dict()) == config
    for field in dataclasses.fields(config):
        assert field.metadata.get("help"), f"{name}.{field.name} has no help text"
    module = sys.modules[get_strategy_class(name).__module__]
    assert "https://" in (module.__doc__ or ""), f"{name}'s module docstring must link its paper"
    assert ">>>" in (get_strategy_class(name).__doc__ or ""), f"{name} needs a docstring example"
    with pytest.raises(ValueError, match="Unknown option"):
        build_strategy(name, no_such_option=1)


def _state_tensors(state, prefix=""):
    """Flatten a nested state dict to {path: value} for comparison."""
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_state_tensors(v, f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_state_tensors(v, f"{prefix}/{i}"))
    else:
        out[prefix] = state
    return out


def _assert_same_state(a, b):
    flat_a, flat_b = _state_tensors(a.state_dict()), _state_tensors(b.state_dict())
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.cpu(), flat_b[key].cpu()), key
        else:
            assert value == flat_b[key], key


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_the_continual_checkpoint(name, tmp_path, make_model, tokenizer, tiny_stream):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path), processing_class=tokenizer,
                                       strategies=[_fast(name)])
    trainer.fit(stream)
    resumed = ContinualCausalLMTrainer(model=make_model("gpt2", seed=7), args=small_args(tmp_path),
                                       processing_class=tokenizer, strategies=[_fast(name)])
    resumed.fit(stream, resume_from_checkpoint=True)  # nothing left to train: only restores
    _assert_same_state(trainer.strategies[0], resumed.strategies[0])
    if name == "replay":
        assert resumed.strategies[0].buffer.as_dataset().to_dict() == trainer.strategies[0].buffer.as_dataset().to_dict()
    for (n1, p1), (n2, p2) in zip(trainer.model.state_dict().items(), resumed.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    rows = tiny_stream["copy"]["eval"]
    with trainer.use_task("copy"), resumed.use_task("copy"):
        assert trainer.evaluate_task(trainer._eval_sets["copy"]) == resumed.evaluate_task(resumed._eval_sets["copy"])
    assert len(rows) > 0


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_a_seq2seq_model(name, tmp_path, make_model, tokenizer, tiny_stream):
    args = small_args(tmp_path, args_class=ContinualSeq2SeqTrainingArguments)
    trainer = ContinualSeq2SeqTrainer(model=make_model("t5"), args=args, processing_class=tokenizer,
                                      strategies=[_fast(name)])
    results = trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    assert len(results.matrix("loss")) == 2 and None not in results.matrix("loss")[1]
    assert results.matrix("loss")[0][0] < results.baseline["loss"][0]


def _replay_run(tmp_path, make_model, tokenizer, stream, *extra):
    replay = Replay(buffer_size=16)
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(tmp_path), processing_class=tokenizer,
                                       strategies=[replay, *extra])
    results = trainer.fit(stream)
    return trainer, replay, results


@pytest.fixture(scope="module")
def replay_only(tmp_path_factory, tokenizer, tiny_stream):
    from clm_hf.tasks import build_tiny_model
    from tests.conftest import NO_DROPOUT

    def make_model(arch, **kw):
        return build_tiny_model(arch, tokenizer, **{**NO_DROPOUT[arch], **kw})

    _, _, results = _replay_run(tmp_path_factory.mktemp("replay_only"), make_model, tokenizer, tiny_stream)
    return results


@pytest.mark.parametrize("name", [n for n in NAMES if n != "replay"])
def test_composes_with_replay(name, tmp_path, make_model, tokenizer, tiny_stream, replay_only):
    trainer, replay, results = _replay_run(tmp_path, make_model, tokenizer, tiny_stream, _fast(name))
    assert results.num_trained == 3
    assert set(replay.buffer.task_counts()) == {"copy", "reverse", "sort"}
    # the second strategy still acted (the scores differ from a replay-only run with the same seed)
    # or kept its memory (GEM's constraints may never bind in so short a run)
    acted = results.matrix("loss") != replay_only.matrix("loss")
    trainer.strategies[1].save_state(tmp_path / "state")
    kept = [p for p in (tmp_path / "state").rglob("*") if p.is_file() and p.read_bytes() not in (b"{}", b"")]
    assert acted or kept, name
