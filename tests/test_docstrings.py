"""Every ``>>>`` example in clm-hf's docstrings runs and prints what it shows.

One test per module, so a failure names the module; ``buffer.py``'s examples run in
``tests/test_buffer.py`` with the fenced parser they are written for.
"""

from __future__ import annotations

import doctest
import importlib
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
