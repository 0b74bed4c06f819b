"""Package layout: one atomic writer, import layering without cycles, a lazy CLI, the library logger."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from clm_hf import _io
from clm_hf import state as ckpt
from clm_hf.buffer import ReservoirBuffer
from clm_hf.results import ContinualResults

ROOT = Path(__file__).resolve().parent.parent


def test_state_results_and_buffer_share_one_atomic_writer(tmp_path, monkeypatch):
    dirs, files = [], []
    real_tree, real_dir = _io._fsync_tree, _io.fsync_dir
    monkeypatch.setattr(_io, "_fsync_tree", lambda root: (dirs.append(Path(root).name), real_tree(root)))
    monkeypatch.setattr(_io, "fsync_dir", lambda path: (files.append(Path(path)), real_dir(path)))

    ckpt.write_atomically(tmp_path / "ckpt", lambda tmp: (tmp / "x.json").write_text("{}"))
    buffer = ReservoirBuffer(capacity=4, seed=0)
    buffer.add(Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [[1, 2], [3]]}), task_id=0)
    buffer.save_to_disk(tmp_path / "buffer")
    ContinualResults(task_names=["a"]).save(tmp_path / "out" / "results.json")

    assert [name.split("-")[1] for name in dirs] == ["ckpt", "buffer"]  # built in .tmp-<name>-* siblings
    assert tmp_path / "out" in files  # the rename of results.json was persisted
    assert json.loads((tmp_path / "buffer" / "reservoir_state.json").read_text())["capacity"] == 4
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary leftovers



# --- import layering ------------------------------------------------------------------------------
def _module_level_imports(path: Path, package: str) -> set[str]:
    """The clm_hf modules a file imports when it is loaded (not inside functions or TYPE_CHECKING)."""
    import ast

    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import state` names a module, `from .x import y` a name
                    sub = f"{target}.{alias.name}"
                    found.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).is_file() else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("clm_hf"))

    visit(tree.body)
    return found


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((ROOT / "clm_hf").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        graph[name] = _module_level_imports(path, package)
    return graph


def test_modules_import_each_other_without_cycles():
    import ast

    graph = _import_graph()
    # A package's __init__ only re-exports its modules; `clm_hf` itself imports them lazily.
    packages = {"clm_hf", "clm_hf.strategies"}
    edges = {m: {t for t in deps if t not in packages and t != m} for m, deps in graph.items() if m not in packages}
    cycles, state = [], {}

    def walk(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])
    assert not cycles, cycles
    assert not any(t.startswith("clm_hf.strategies") for t in graph["clm_hf.evaluation"])
    # not even inside a function: the trainer imports the hub, so the hub must not need the trainer
    hub_imports = [n for n in ast.walk(ast.parse((ROOT / "clm_hf" / "hub.py").read_text()))
                   if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "trainer"]
    assert not hub_imports
    assert not graph["clm_hf._io"] and not graph["clm_hf._logging"] and not graph["clm_hf.modeling"]


def test_no_function_level_imports_of_clm_hf_in_the_strategies_that_only_dodged_cycles():
    import ast

    for name in ("ewc", "gem"):
        tree = ast.parse((ROOT / "clm_hf" / "strategies" / f"{name}.py").read_text())
        inner = [ast.unparse(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for node in ast.walk(fn) if isinstance(node, ast.ImportFrom) and node.module in ("evaluation",)]
        assert not inner, (name, inner)


@pytest.mark.slow  # about 20 s: one interpreter loads torch and then every module anew
def test_each_module_imports_first_in_a_fresh_interpreter():
    # Each module is imported before any other clm_hf module (hub before trainer and trainer before hub
    # included): a cycle shows as an ImportError on a partly initialised module.
    modules = sorted(_import_graph())
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for loaded in [m for m in sys.modules if m.startswith('clm_hf')]:\n"
            "        del sys.modules[loaded]\n"
            "    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# --- the library logger -------------------------------------------------------------------------
@pytest.fixture
def clean_levels():
    import transformers

    from clm_hf import _logging

    verbosity = transformers.logging.get_verbosity()
    yield
    transformers.logging.set_verbosity(verbosity)
    _logging.set_verbosity(None)


def _trained_messages(tmp_path, make_model, tokenizer, tiny_stream, caplog, **args) -> list[str]:
    from conftest import make_trainer

    stream = {name: tiny_stream[name] for name in ("copy",)}
    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], **args)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # the root logger lets everything through: clm-hf's level decides
        trainer.fit(stream)
    return [r.getMessage() for r in caplog.records if r.name.startswith("clm_hf")]


@pytest.mark.parametrize("log_level, shown", [("info", True), ("warning", False)])
def test_log_level_controls_clm_hf_messages(tmp_path, make_model, tokenizer, tiny_stream, caplog, clean_levels,
                                            log_level, shown):
    messages = _trained_messages(tmp_path, make_model, tokenizer, tiny_stream, caplog, log_level=log_level)
    assert any("training task 0 'copy'" in m for m in messages) is shown, messages


def test_transformers_verbosity_controls_clm_hf_messages_when_passive(tmp_path, make_model, tokenizer, tiny_stream,
                                                                     caplog, clean_levels):
    import transformers

    transformers.logging.set_verbosity_error()
    assert not _trained_messages(tmp_path / "a", make_model, tokenizer, tiny_stream, caplog)
    transformers.logging.set_verbosity_info()
    messages = _trained_messages(tmp_path / "b", make_model, tokenizer, tiny_stream, caplog)
    assert any("training task 0 'copy'" in m for m in messages), messages


def test_clm_hf_messages_reach_stderr_when_the_application_configured_no_logging():
    code = ("import logging, sys\n"
            "from clm_hf._logging import get_logger, set_verbosity\n"
            "assert not logging.getLogger().handlers\n"
            "set_verbosity('info')\n"
            "get_logger('clm_hf.trainer').info('clm-hf: hello')\n"
            "get_logger('clm_hf.trainer').debug('clm-hf: hidden')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.returncode == 0 and done.stderr == "clm-hf: hello\n", done.stderr


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set(block.split())
    modules = {path.name for path in (ROOT / "clm_hf").glob("*.py") if path.name != "__init__.py"}
    assert modules - listed == set(), f"README's Layout misses {sorted(modules - listed)}"
