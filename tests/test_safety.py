"""Safety: no unsafe deserialisation in clm_hf, remote code off by default, Hub tokens never written."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

from clm_hf import ContinualCausalLMTrainer, Replay
from tests.conftest import small_args

PACKAGE = Path(__file__).resolve().parent.parent / "clm_hf"
SECRET = "hf_SECRETdoNotLeakThisToken0123456789"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            yield node, owner, name


def _unsafe(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):  # `from pickle import load` and friends
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cPickle", "dill", "marshal", "shelve"):
            found.append(f"{path.name}:{node.lineno} imports from {node.module}")
    for node, owner, name in _calls(tree):
        where = f"{path.name}:{node.lineno}"
        keywords = {k.arg: k.value for k in node.keywords}
        if owner in ("pickle", "cPickle", "dill", "marshal", "joblib") and name in ("load", "loads"):
            found.append(f"{where} {owner}.{name}")
        if owner == "torch" and name == "load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where} torch.load without weights_only=True")
        if owner is None and name in ("eval", "exec"):
            found.append(f"{where} {name}()")
        if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
            found.append(f"{where} yaml.{name} (use yaml.safe_load)")
        flag = keywords.get("trust_remote_code")
        if isinstance(flag, ast.Constant) and flag.value is True:
            found.append(f"{where} trust_remote_code=True")
    return found


def test_sources_have_no_unsafe_deserialisation_or_eval():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    problems = [p for f in files for p in _unsafe(f)]
    assert problems == []


def test_the_scanner_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch, yaml\nfrom pickle import loads\npickle.load(f)\ntorch.load(p)\n"
                   "torch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\neval(s)\nmodel.eval()\n"
                   "yaml.load(s)\nf(trust_remote_code=True)\n")
    assert len(_unsafe(bad)) == 7  # everything but the safe torch.load and model.eval()


def test_recipes_load_pretrained_models_without_remote_code(tmp_path, make_model, tokenizer, monkeypatch):
    import transformers

    from clm_hf.recipe import build_model_and_tokenizer

    make_model("gpt2").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", False)))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    build_model_and_tokenizer({"name_or_path": str(tmp_path / "model")})
    assert {name for name, _ in seen} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(flag is False for _, flag in seen)
    seen.clear()
    build_model_and_tokenizer({"name_or_path": str(tmp_path / "model"), "trust_remote_code": True})
    assert all(flag is True for _, flag in seen)  # only when the recipe asks for it


def test_hub_token_is_never_written_or_logged(tmp_path, make_model, tokenizer, tiny_stream, caplog, capsys):
    args = small_args(tmp_path, hub_token=SECRET, save_strategy="steps", save_steps=2)
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), args=args, processing_class=tokenizer,
                                       strategies=[Replay(buffer_size=8)])
    with caplog.at_level(logging.DEBUG):
        trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
        trainer.save_model(str(tmp_path / "run" / "final"))
        trainer.create_model_card()
        from clm_hf.plots import write_report

        write_report(tmp_path / "run")
    assert trainer.args.hub_token == SECRET  # still usable for a push after the saves
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    kinds = {p.name for p in written}
    assert {"training_args.bin", "continual_state.json", "results.json", "trainer_state.json", "README.md"} <= kinds
    leaks = [str(p) for p in written if SECRET.encode() in p.read_bytes()]
    assert leaks == []
    out = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in out.out and SECRET not in out.err


def test_the_token_check_would_see_a_leak(tmp_path, make_model, tokenizer, monkeypatch):
    """Without the redaction, the Trainer's pickled training_args.bin carries the token."""
    import contextlib

    import clm_hf.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_tokens_hidden", lambda args: contextlib.nullcontext())
    args = small_args(tmp_path, hub_token=SECRET)
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), args=args, processing_class=tokenizer)
    trainer.save_model(str(tmp_path / "plain"))
    assert SECRET.encode() in (tmp_path / "plain" / "training_args.bin").read_bytes()
