"""Property-based tests (hypothesis) of the config layer and the replay buffer: random input either
works or raises a ``ValueError`` / ``TypeError`` / ``KeyError`` with a message, never another
exception from deep inside."""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
from dataclasses import fields

import pytest
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clm_hf.strategies as strategies_package
from clm_hf.buffer import ReservoirBuffer
from clm_hf.config import OPTIMIZER_KEYS, TOP_LEVEL_KEYS, parse_config_dict
from clm_hf.strategies.base import STRATEGY_REGISTRY, build_strategy

for _module in pkgutil.iter_modules(strategies_package.__path__):  # register every strategy that exists
    try:
        importlib.import_module(f"clm_hf.strategies.{_module.name}")
    except ImportError:
        pass

CLEAR = (ValueError, TypeError, KeyError)
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-2, 2), max_size=2),
)
NAMES = sorted(STRATEGY_REGISTRY)


def _option_keys(name: str) -> list[str]:
    cls = STRATEGY_REGISTRY.get(name)
    if cls is None:
        return ["x"]
    return [f.name for f in fields(cls.config_class) if f.init] + list(cls.config_class.aliases)


@st.composite
def strategy_case(draw):
    name = draw(st.one_of(st.sampled_from(NAMES), st.sampled_from(["ewk", "", "Replay", "pack-net", "gem "]),
                          st.text(max_size=6)))
    keys = _option_keys(name)
    options = draw(st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=6)), values, max_size=4))
    return name, options


def _message(err: BaseException) -> str:
    return str(err.args[0]) if err.args else ""


@FAST
@given(strategy_case())
def test_build_strategy_works_or_raises_a_clear_error(case):
    name, options = case
    try:
        strategy = build_strategy(name, **options)
    except CLEAR as err:
        assert _message(err)
        return
    # A config that was accepted survives the JSON round trip of a checkpoint.
    saved = json.loads(json.dumps(strategy.config.to_dict(), default=str))
    rebuilt = type(strategy.config).from_dict(saved)
    assert json.dumps(rebuilt.to_dict(), default=str) == json.dumps(strategy.config.to_dict(), default=str)


@st.composite
def config_case(draw):
    keys = st.one_of(st.sampled_from(TOP_LEVEL_KEYS), st.text(max_size=6))
    config = draw(st.dictionaries(keys, values, max_size=3))
    if draw(st.booleans()):
        config["optimizer"] = draw(st.one_of(
            values, st.dictionaries(st.one_of(st.sampled_from(OPTIMIZER_KEYS), st.text(max_size=4)),
                                    st.one_of(values, st.sampled_from(["adam", "sgd", "adamw", "adan"])), max_size=3)))
    if draw(st.booleans()):
        config["continual_strategy"] = draw(st.one_of(values, st.dictionaries(
            st.one_of(st.sampled_from(NAMES), st.text(max_size=5)),
            st.one_of(st.none(), st.dictionaries(st.one_of(st.sampled_from(["enabled", "lambda", "buffer_size",
                                                                              "prune_percentage", "alpha"]),
                                                           st.text(max_size=4)), values, max_size=3)),
            max_size=2)))
    return config


@FAST
@given(config_case())
def test_parse_config_dict_works_or_raises_a_clear_error(config):
    try:
        kwargs, built = parse_config_dict(config)
    except CLEAR as err:
        assert _message(err)
        return
    assert isinstance(kwargs, dict) and all(s.name in STRATEGY_REGISTRY for s in built)


@pytest.mark.parametrize("value", [math.nan, "0.5", None], ids=["nan", "str", "none"])
@pytest.mark.parametrize("name, field", [("ewc", "ewc_lambda"), ("replay", "replay_ratio"),
                                         ("packnet", "prune_percentage"), ("lwf", "temperature")])
def test_bad_hyperparameter_values_name_the_field(name, field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        build_strategy(name, **{field: value})


# --- the reservoir buffer ----------------------------------------------------------------------------
def _rows(draw, n: int) -> dict:
    kind = draw(st.sampled_from(["ids", "ids", "ids+labels", "text", "reserved"]))
    ids = [draw(st.lists(st.integers(0, 50), min_size=1, max_size=4)) for _ in range(n)]
    if kind == "ids":
        return {"input_ids": ids}
    if kind == "ids+labels":
        return {"input_ids": ids, "labels": ids}
    if kind == "text":
        return {"input_ids": [" ".join(map(str, r)) for r in ids]}
    return {"input_ids": ids, "task_id": ["t"] * n}


@st.composite
def buffer_case(draw):
    capacity = draw(st.one_of(st.integers(-2, 12), st.integers(1, 12), st.booleans(), st.floats(-1, 5),
                              st.text(max_size=2)))
    seed = draw(st.one_of(st.integers(-2, 2**32), st.integers(0, 100), st.none()))
    tasks = []
    for _ in range(draw(st.integers(0, 4))):
        task_id = draw(st.one_of(st.integers(0, 3), st.sampled_from(["a", "b"]), st.none(), st.floats(0, 1),
                                 st.booleans()))
        tasks.append((task_id, _rows(draw, draw(st.integers(0, 12)))))
    draws = draw(st.one_of(st.integers(-1, 20), st.none()))
    return capacity, seed, tasks, draws


@FAST
@given(case=buffer_case())
def test_reservoir_buffer_works_or_raises_a_clear_error(case, tmp_path_factory):
    capacity, seed, tasks, draws = case
    try:
        buffer = ReservoirBuffer(capacity, seed=seed)
    except CLEAR as err:
        assert _message(err)
        return
    seen = 0
    for task_id, columns in tasks:
        before = (len(buffer), buffer.num_seen, buffer.task_counts())
        try:
            buffer.add(Dataset.from_dict(columns), task_id)
        except CLEAR as err:
            assert _message(err)
            assert (len(buffer), buffer.num_seen, buffer.task_counts()) == before  # a refused add changes nothing
            continue
        seen += len(next(iter(columns.values())))
    assert buffer.num_seen == seen and len(buffer) == min(buffer.capacity, seen)
    assert sum(buffer.task_counts().values()) == len(buffer)
    if draws is not None:
        try:
            sample = buffer.sample(draws, seed=0)
        except CLEAR as err:
            assert _message(err)
        else:
            assert len(sample) == draws and set(sample["task_id"]) <= set(buffer.task_counts())
    if len(buffer):
        folder = tmp_path_factory.mktemp("buffer") / "saved"
        buffer.save_to_disk(folder)
        loaded = ReservoirBuffer.load_from_disk(folder)
        assert loaded.as_dataset().to_dict() == buffer.as_dataset().to_dict()
        assert loaded.state_dict() == buffer.state_dict()
