"""Every ``>>>`` example in clm-hf's docstrings runs and prints what it shows.

One test per module, so a failure names the module; ``buffer.py``'s examples run in
``tests/test_buffer.py`` with the fenced parser they are written for.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import pkgutil

import pytest

import clm_hf

OWN_RUNNER = {"clm_hf.buffer"}


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(clm_hf.__path__, "clm_hf.") if m.name not in OWN_RUNNER)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    try:  # DeepSpeed prints a banner on stdout at its first import (trl imports it): not inside an example
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    monkeypatch.chdir(tmp_path)  # examples that write (runs/..., plots) write here
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test, out=report.write)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, report.getvalue()[-6000:]


def test_the_examples_are_found():
    # A module list that silently came back empty (or lost the strategies) would pass the test above.
    names = _modules()
    assert {"clm_hf.trainer", "clm_hf.strategies.ewc", "clm_hf.strategies.gem", "clm_hf.deepspeed_support"} <= set(names)
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for n in names for t in finder.find(importlib.import_module(n), n))
    assert examples > 300, examples


# --- the public API's docstrings and type hints ---------------------------------------------------
def _public_api() -> dict[str, object]:
    import clm_hf.strategies as strategies

    exported = {n: getattr(clm_hf, n) for n in clm_hf.__all__}
    exported.update({n: getattr(strategies, n) for n in strategies.__all__})
    return {n: o for n, o in exported.items() if inspect.isclass(o) or inspect.isfunction(o)}


def _own_methods(cls: type):
    """The public methods ``cls`` gets from clm-hf classes (not from Trainer, TrainingArguments, ...)."""
    seen = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("clm_hf"):
            continue
        for name, attr in vars(klass).items():
            func = attr.__func__ if isinstance(attr, (classmethod, staticmethod)) else attr
            if name.startswith("_") or name in seen or not inspect.isfunction(func):
                continue
            seen.add(name)
            yield name, func


def _missing_hints(func) -> list[str]:
    sig = inspect.signature(func)
    missing = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")
               and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.annotation is inspect.Parameter.empty]
    return missing + (["return"] if sig.return_annotation is inspect.Signature.empty else [])


def test_every_public_class_and_function_has_args_an_example_and_type_hints():
    from clm_hf.recipe import run_recipe
    from clm_hf.strategies.ewc import estimate_fisher

    problems = []
    for name, obj in sorted(_public_api().items()):
        doc = obj.__doc__ or ""
        if "Args:" not in doc and (inspect.isfunction(obj) or obj.__init__ is not object.__init__):
            problems.append(f"{name}: no Args: section")
        if ">>>" not in doc:
            problems.append(f"{name}: no >>> example")
        for method, func in _own_methods(obj) if inspect.isclass(obj) else [(None, obj)]:
            where = f"{name}.{method}" if method else name
            if method and not inspect.getdoc(getattr(obj, method)):
                problems.append(f"{where}: no docstring")
            problems += [f"{where}: no type hint for {p}" for p in _missing_hints(func)]
    for func in (run_recipe, estimate_fisher):  # public, though not exported at the top level
        problems += [f"{func.__name__}: no type hint for {p}" for p in _missing_hints(func)]
    assert problems == [], "\n".join(problems)


def test_every_strategy_class_docstring_cites_its_paper():
    from clm_hf.strategies import STRATEGY_REGISTRY

    # Only the package's own strategies: other test files register toy ones in the same process.
    missing = [cls.__name__ for cls in STRATEGY_REGISTRY.values() if cls.__module__.startswith("clm_hf.")
               and not any(site in (cls.__doc__ or "") for site in ("https://arxiv.org/abs/", "https://doi.org/"))]
    assert missing == []


def test_argument_classes_and_trainers_document_every_continual_parameter():
    import dataclasses

    from transformers import TrainingArguments

    from clm_hf import (ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments,
                        ContinualTrainer, ContinualTrainingArguments)
    from clm_hf.sft import ContinualSFTConfig
    from clm_hf.trainer import ContinualTrainerMixin

    base = {f.name for f in dataclasses.fields(TrainingArguments)} - {"overwrite_output_dir"}
    continual = [f.name for f in dataclasses.fields(ContinualTrainingArguments) if f.name not in base]
    assert len(continual) >= 13  # eval_metrics ... answer_only_loss: a list that came back empty would pass
    for cls in (ContinualTrainingArguments, ContinualSeq2SeqTrainingArguments, ContinualSFTConfig):
        args = cls.__doc__.split("Args:", 1)[-1]
        assert [n for n in continual if f"\n        {n} (" not in args] == [], cls.__name__
    params = [p for p in inspect.signature(ContinualTrainerMixin.__init__).parameters if p != "self"]
    for cls in (ContinualTrainer, ContinualCausalLMTrainer, ContinualSeq2SeqTrainer):
        args = cls.__doc__.split("Args:", 1)[-1]
        assert [p for p in params if f"\n        {p} (" not in args and f"\n        **{p}:" not in args] == [], cls
