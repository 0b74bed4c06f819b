"""The compatibility matrix (benchmarks/compat_matrix.py): a representative subset of its cells run
here, and the table in docs/benchmarks.md is the one rendered from benchmarks/results/compat_matrix.json.

torch_compile cells are not run here: one compiled 2-task run took 104-106 s on 2 CPU cores (inductor
compiles the train, eval and strategy graphs), far over the suite's budget; they are in the benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("peft")


def _load():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("bench_compat_matrix", ROOT / "benchmarks" / "compat_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cm = _load()
# The plain run of a strategy serves both its gradient-checkpointing and its bf16 cell. 16 rows a
# task = 2 steps: EWC's and LwF's terms have zero gradient on the first step of task 2 (the weights
# are the anchors / the teacher), so one step would not exercise them.
_CACHE: dict = {}


@pytest.mark.parametrize("strategy", cm.STRATEGIES)
def test_gradient_checkpointing_and_bf16_match_plain_gpt2(strategy, tmp_path):
    """Every strategy on GPT-2: checkpointing gives the plain run's weights (1e-4), bf16 autocast
    its eval losses (0.05), with the feature verifiably on (a checkpointing module, bf16 mixed precision)."""
    for feature in ("gradient_checkpointing", "bf16"):
        cell = cm.run_cell(strategy, feature, "gpt2", num_train=16, work_dir=tmp_path, cache=_CACHE)
        assert cell["status"] == "pass", cell
        assert cell["diff"] <= cm.TOLERANCE[feature]
    for key in [k for k in _CACHE if k[1] == strategy]:
        del _CACHE[key]


@pytest.mark.parametrize("strategy", cm.STRATEGIES)
def test_lora_with_checkpointing_on_frozen_base_llama(strategy, tmp_path):
    """Every strategy on a LoRA Llama with gradient checkpointing on the frozen base: the adapters get
    the weights of the run without checkpointing, the base never moves, and the strategy acts."""
    cell = cm.run_cell(strategy, "lora", "llama", num_train=16, work_dir=tmp_path, cache=_CACHE)
    assert cell["status"] == "pass", cell
    for key in [k for k in _CACHE if k[1] == strategy]:
        del _CACHE[key]


def _fake_run(weight: float, loss: float, **probe) -> dict:
    return {"status": "ok", "weights": {"w": torch.tensor([weight])}, "loss": [[loss]], "base": True,
            "probe": {"checkpointing": True, "mixed_precision": "bf16", **probe}}


def test_classification_of_a_cell():
    """What makes a cell pass, refused or FAIL (the rules the table reports)."""
    ref = _fake_run(1.0, 3.0)
    assert cm._classify("gradient_checkpointing", ref, _fake_run(1.0 + 5e-5, 3.0), 1e-4)["status"] == "pass"
    assert cm._classify("gradient_checkpointing", ref, _fake_run(1.0 + 5e-4, 3.0), 1e-4)["status"] == "FAIL"
    assert cm._classify("bf16", ref, _fake_run(2.0, 3.01), 0.05)["status"] == "pass"  # bf16 compares losses
    assert cm._classify("bf16", ref, _fake_run(1.0, 3.2), 0.05)["status"] == "FAIL"
    assert cm._classify("bf16", ref, _fake_run(1.0, math.nan), 0.05)["detail"] == "non-finite weights or loss"
    # A flag that was silently ignored cannot pass as "the same result".
    off = cm._classify("gradient_checkpointing", ref, _fake_run(1.0, 3.0, checkpointing=False), 1e-4)
    assert off["status"] == "FAIL" and "no module checkpointing" in off["detail"]
    no_bf16 = cm._classify("bf16", ref, _fake_run(1.0, 3.0, mixed_precision="no"), 0.05)
    assert no_bf16["status"] == "FAIL"
    refused = cm._classify("bf16", ref, {"status": "refused", "error": "NotImplementedError: x"}, 0.05)
    assert refused == {"status": "refused", "detail": "NotImplementedError: x"}


def test_only_a_deliberate_startup_error_is_a_refusal(tmp_path, monkeypatch):
    """An unknown strategy option raises ValueError in one line before any step: refused. A crash of
    another type is a failure even before the first step."""
    monkeypatch.setitem(cm.OPTIONS, "ewc", {"no_such_option": 1})
    run = cm.train_once("gpt2", "ewc", num_train=8, out_dir=tmp_path / "a")
    assert run["status"] == "refused" and run["error"].startswith("ValueError") and "\n" not in run["error"]

    def broken(arch, lora):
        raise AttributeError("'dict' object has no attribute 'lower'")

    monkeypatch.setattr(cm, "_model", broken)
    run = cm.train_once("gpt2", "ewc", num_train=8, out_dir=tmp_path / "b")
    assert run == {"status": "error", "error": "AttributeError: 'dict' object has no attribute 'lower'"}


def test_docs_table_is_the_json_rendered():
    """docs/benchmarks.md holds exactly markdown_table() of benchmarks/results/compat_matrix.json."""
    data = json.loads((ROOT / "benchmarks" / "results" / "compat_matrix.json").read_text())
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    start, end = cm.DOCS_START, cm.DOCS_END
    assert start in docs and end in docs, "docs/benchmarks.md lacks the compat-matrix markers"
    table = docs.split(start, 1)[1].split(end, 1)[0]
    assert table.strip() == cm.markdown_table(data["cells"]).strip()
    # Every cell of the matrix is present: strategies x features x archs.
    keys = {(c["strategy"], c["feature"], c["arch"]) for c in data["cells"]}
    missing = [(s, f, a) for s in cm.STRATEGIES for f in cm.FEATURES for a in cm.ARCHS if (s, f, a) not in keys]
    not_run = [k for k in missing if k[1] != "torch_compile"]
    assert not not_run, f"cells missing from the JSON: {not_run}"


def _construct(tmp_path, strategy, **flags):
    from clm_hf import ContinualCausalLMTrainer
    from clm_hf.tasks import build_tiny_model
    from tests.conftest import small_args

    tokenizer = cm._tokenizer()
    return ContinualCausalLMTrainer(model=build_tiny_model("gpt2", tokenizer), args=small_args(tmp_path, **flags),
                                    processing_class=tokenizer, strategies=[strategy])


def test_pnn_columns_refuses_torch_compile_at_startup(tmp_path):
    """PNN's column laterals are forward hooks, which torch.compile does not guard on: refused in one
    line naming the strategy and the flag; the LoRA mode and torch_compile=False are accepted."""
    from clm_hf import PNN

    with pytest.raises(NotImplementedError, match=r"^Strategy 'pnn' does not support torch_compile=True: ") as err:
        _construct(tmp_path, PNN(), torch_compile=True)
    assert "\n" not in str(err.value)
    _construct(tmp_path, PNN(mode="lora"), torch_compile=True)
    _construct(tmp_path, PNN())


def test_refused_cells_are_what_the_code_refuses(tmp_path):
    """Every refused cell of the JSON (and so of the docs table) is the error the start-up checks raise now."""
    from clm_hf.strategies import build_strategy

    data = json.loads((ROOT / "benchmarks" / "results" / "compat_matrix.json").read_text())
    flags = {"torch_compile": {"torch_compile": True}, "gradient_checkpointing": {"gradient_checkpointing": True},
             "bf16": {"bf16": True, "use_cpu": True}}
    for cell in data["cells"]:
        if cell["status"] != "refused" or cell["feature"] not in flags or cell["arch"] != "gpt2":
            continue
        strategy = build_strategy(cell["strategy"], **cm.OPTIONS[cell["strategy"]])
        with pytest.raises(Exception) as err:
            _construct(tmp_path / cell["strategy"], strategy, **flags[cell["feature"]])
        assert f"{type(err.value).__name__}: {err.value}" == cell["detail"]
