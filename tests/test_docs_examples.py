"""Every code example in README.md and docs/*.md runs, offline, and shows what its text claims.

Python blocks run in a fresh temporary folder. A block may be preceded by one HTML comment that
tells this test how to run it (it is invisible on GitHub)::

    <!-- example: fragment: loops over the user's own task_data -->   skipped, with the reason
    <!-- example: needs model, tokenizer, stream -->                  names provided by NEEDS below
    <!-- example: needs trainer; trained -->                          ``trainer`` has fit ``stream``
    <!-- example: continues -->                                       runs in the previous block's namespace
    <!-- example: slow; id readme-quickstart -->                      marked slow; CLAIMS[id] checks it

Shell blocks: every ``clm-hf`` command runs at smoke size (``--quick`` for the demo; a tiny
stream for ``train``) in one temporary folder, in order, so ``report`` finds the run ``train`` wrote.
Any other command needs the block to be marked as a fragment with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!--\s*example:(?P<directive>.*?)-->\s*\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```", re.S)


@dataclass
class Example:
    path: Path
    line: int
    lang: str
    code: str
    fragment: str | None = None
    needs: list[str] = field(default_factory=list)
    trained: bool = False
    continues: bool = False
    slow: bool = False
    id: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_directive(text: str, where: str) -> dict[str, Any]:
    """``fragment: reason`` (alone) | ``needs a, b`` | ``trained`` | ``continues`` | ``slow`` | ``id NAME``, ``;``-separated."""
    options: dict[str, Any] = {}
    text = text.strip()
    if text.startswith("fragment"):  # the reason is free text, up to the end of the comment
        reason = text[len("fragment"):].lstrip(": ").strip()
        if not reason:
            raise ValueError(f"{where}: a fragment needs a reason: <!-- example: fragment: why -->")
        return {"fragment": reason}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if part.startswith("needs "):
            options["needs"] = [n.strip() for n in part[len("needs "):].split(",") if n.strip()]
        elif part.startswith("id "):
            options["id"] = part[3:].strip()
        elif part in ("trained", "continues", "slow"):
            options[part] = True
        else:
            raise ValueError(f"{where}: unknown example directive {part!r}")
    return options


def collect() -> list[Example]:
    examples = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start("lang")].count("\n") + 1
            options = parse_directive(match.group("directive") or "", f"{path.name}:{line}")
            examples.append(Example(path, line, match.group("lang"), match.group("code"), **options))
    return examples


EXAMPLES = collect()


# --- what a block may assume ---------------------------------------------------------------------
def _tokenizer():
    from clm_hf.tasks import build_tokenizer

    return build_tokenizer()


def _stream():
    from clm_hf.tasks import make_suite

    return make_suite(["copy", "reverse"], num_train=32, num_eval=16, min_len=2, max_len=4, seed=0)


def _args(output_dir: str = "runs/example"):
    from clm_hf import ContinualTrainingArguments

    return ContinualTrainingArguments(output_dir=output_dir, num_train_epochs=1, per_device_train_batch_size=8,
                                      learning_rate=1e-3, save_strategy="no", report_to="none", disable_tqdm=True)


def _needs(names: list[str], trained: bool) -> dict[str, Any]:
    from clm_hf import ContinualCausalLMTrainer
    from clm_hf.tasks import build_tiny_model

    ns: dict[str, Any] = {"tokenizer": _tokenizer()}
    ns["stream"] = ns["tasks"] = _stream()
    ns["model"] = build_tiny_model("gpt2", ns["tokenizer"])
    ns["base_model"] = build_tiny_model("llama", ns["tokenizer"])  # has q_proj / v_proj for LoRA
    ns["args"] = _args()
    ns["train_rows"], ns["eval_rows"] = ns["stream"]["reverse"]["train"], ns["stream"]["reverse"]["eval"]
    if "R" in names or "b" in names:
        ns["R"] = [[0.9, 0.1], [0.2, 0.8]]
        ns["b"] = [0.0, 0.05]
    if "trainer" in names:
        ns["trainer"] = ContinualCausalLMTrainer(model=ns["model"], args=ns["args"], processing_class=ns["tokenizer"])
        if trained:
            ns["trainer"].fit({"copy": ns["stream"]["copy"]})
            ns["stream"] = ns["tasks"] = {"copy": ns["stream"]["copy"]}
    unknown = [n for n in names if n not in ns]
    if unknown:
        raise KeyError(f"example needs {unknown}, which tests/test_docs_examples.py does not provide")
    return {n: ns[n] for n in names}


# --- what the text around a block claims ----------------------------------------------------------
def _check_quickstart(ns: dict[str, Any]) -> None:
    """README: every task is learned (exact match >= 0.5 right after training it), and the
    strategy forgets clearly less than plain fine-tuning run in the same example."""
    results = ns["results"]
    for name, run in results.items():
        matrix = run.matrix("exact_match")
        diagonal = [matrix[i][i] for i in range(len(matrix))]
        assert min(diagonal) >= 0.5, f"{name}: a task was not learned, exact match right after training: {diagonal}"
    plain, replay = results["plain"].summary(), results["replay"].summary()
    # README: plain BWT -0.93 to -0.94, replay -0.05 to -0.13 (gains 0.81-0.87) under three CPU kernels
    # and 1 or 2 threads; the margins leave room for other machines.
    assert plain["bwt"] < -0.8, f"plain fine-tuning should forget on this stream: {plain}"
    assert replay["bwt"] > plain["bwt"] + 0.4, f"replay {replay} vs plain {plain}"


CLAIMS: dict[str, Callable[[dict[str, Any]], None]] = {"readme-quickstart": _check_quickstart}


def _params() -> list[Any]:
    params = []
    for example in EXAMPLES:
        if example.lang != "python":
            continue
        marks = [pytest.mark.slow] if example.slow else []
        if example.fragment:
            marks.append(pytest.mark.skip(reason=f"fragment: {example.fragment}"))
        params.append(pytest.param(example, id=example.name, marks=marks))
    return params


def _enter(folder: Path, monkeypatch) -> Path:
    """Work in ``folder``, with no Hub, and trackers that write into the folder."""
    monkeypatch.chdir(folder)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{folder / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-stream")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(folder / "tensorboard"))
    return folder


_namespaces: dict[Path, tuple[dict[str, Any], Path]] = {}


@pytest.mark.parametrize("example", _params())
def test_python_example_runs(example: Example, tmp_path, monkeypatch):
    if example.continues:  # the previous block's names and folder
        assert example.path in _namespaces, f"{example.name} continues a block that did not run"
        namespace, folder = _namespaces[example.path]
    else:
        namespace, folder = {"__name__": "__example__"}, tmp_path
    _enter(folder, monkeypatch)
    namespace.update(_needs(example.needs, example.trained))
    exec(compile(example.code, example.name, "exec"), namespace)  # noqa: S102 - our own docs
    _namespaces[example.path] = namespace, folder
    if example.id:
        CLAIMS[example.id](namespace)


def test_every_claimed_example_exists_and_fragments_say_why():
    ids = {e.id for e in EXAMPLES if e.id}
    assert set(CLAIMS) <= ids, f"claims without an example: {set(CLAIMS) - ids}"
    assert all(e.fragment.strip() for e in EXAMPLES if e.fragment)
    runnable = [e for e in EXAMPLES if e.lang == "python" and not e.fragment]
    assert len(runnable) >= 10, [e.name for e in runnable]  # the docs' examples did not silently vanish


def test_a_directive_without_a_reason_or_unknown_is_refused():
    with pytest.raises(ValueError, match="needs a reason"):
        parse_directive("fragment", "x.md:1")
    with pytest.raises(ValueError, match="unknown example directive"):
        parse_directive("sloww", "x.md:1")


# --- shell blocks -------------------------------------------------------------------------------------
SMOKE = {
    "demo": ["--quick", "--report-to", "none"],
    "train": ["--tasks.num_train", "16", "--tasks.num_eval", "8", "--training.num_train_epochs", "1"],
}


def shell_commands(example: Example) -> list[list[str] | dict[str, str]]:
    """The ``clm-hf`` commands of a shell block, each as argv, and ``export`` lines as dicts;
    anything else must be a fragment."""
    commands: list[list[str] | dict[str, str]] = []
    for raw in example.code.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("bash .ci/setup && ").removeprefix(".venv/bin/")
        if line == "bash .ci/setup" or line == "source .venv/bin/activate":
            continue  # the set-up this test already runs in
        if line == "python -m pytest -q":
            continue  # the suite this test is part of
        argv = shlex.split(line)
        if argv[0] == "export":
            commands.append(dict(item.split("=", 1) for item in argv[1:]))
            continue
        if argv[0] != "clm-hf":
            raise AssertionError(f"{example.name}: '{line}' is not a clm-hf command; mark the block "
                                 "<!-- example: fragment: why --> if it cannot run here")
        commands.append(argv[1:] + SMOKE.get(argv[1], []))
    return commands


def distinct_commands(commands: list[list[str] | dict[str, str]]) -> list[list[str] | dict[str, str]]:
    """``commands`` without a command that parses (``clm-hf``'s own parser) to one already listed before it
    under the same ``export`` lines: run in the same folder, it would repeat that run (quickstart.md lists
    ``clm-hf demo`` and the same demo with its default options spelt out).

    Args:
        commands: what :func:`shell_commands` returns for one block.

    Example:

    >>> distinct_commands([["demo", "--quick"], ["demo", "--strategies", "plain,replay,ewc", "--quick"]])
    [['demo', '--quick']]
    """
    from clm_hf.cli import _parser

    seen, kept, exported = set(), [], {}
    for command in commands:
        if isinstance(command, dict):
            exported = {**exported, **command}
        else:
            args, extra = _parser().parse_known_args(command)
            key = (repr(sorted(vars(args).items())), tuple(extra), repr(sorted(exported.items())))
            if key in seen:
                continue
            seen.add(key)
        kept.append(command)
    return kept


def _shell_params() -> list[Any]:
    return [pytest.param(e, id=e.name, marks=[pytest.mark.skip(reason=f"fragment: {e.fragment}")] if e.fragment else [])
            for e in EXAMPLES if e.lang == "bash"]


_folders: dict[Path, Path] = {}


@pytest.mark.slow
@pytest.mark.parametrize("example", _shell_params())
def test_shell_example_runs(example: Example, tmp_path_factory, monkeypatch):
    commands = shell_commands(example)
    # The blocks of one page share a folder, so `--resume runs/ewc` finds what `train` wrote.
    if example.path not in _folders:
        _folders[example.path] = tmp_path_factory.mktemp(example.path.stem)
        (_folders[example.path] / "recipes").symlink_to(ROOT / "recipes")
    offline = _enter(_folders[example.path], monkeypatch)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for argv in distinct_commands(commands):
        if isinstance(argv, dict):  # an `export` line: $PWD is the page's folder
            env.update({k: v.replace("$PWD", str(offline)) for k, v in argv.items()})
            continue
        done = subprocess.run([sys.executable, "-m", "clm_hf.cli", *argv], cwd=offline, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"clm-hf {' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    if any(isinstance(argv, list) and argv[0] == "train" for argv in commands):
        assert list(offline.glob("runs/*/results.json")), "clm-hf train wrote no results.json"


def test_a_shell_block_runs_a_command_once_however_it_is_spelt():
    """quickstart.md's demo block: ``clm-hf demo`` and the same demo with its defaults spelt out run once;
    another option (``--strategy ewc``) and a different export still run."""
    block = next(e for e in EXAMPLES if e.path.name == "quickstart.md" and e.lang == "bash" and "clm-hf demo" in e.code)
    commands = shell_commands(block)
    assert [c[:1] + [a for a in c[1:] if a.startswith("--strateg")] for c in distinct_commands(commands)] == [
        ["demo"], ["demo", "--strategy"]], commands
    again = [["demo", "--quick"], {"MLFLOW_EXPERIMENT_NAME": "x"}, ["demo", "--quick"], ["demo", "--quick", "--strategy", "ewc"]]
    assert distinct_commands(again) == again
