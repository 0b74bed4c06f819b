"""The accelerate configs and the real-model recipes stay in step with accelerate, with the code and
with the support matrix of docs/distributed.md, without downloading anything."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import clm_hf.strategies.gem  # noqa: F401 - registers gem / agem
import clm_hf.strategies.olora  # noqa: F401 - registers olora
from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments
from clm_hf.recipe import load_recipe, validate_recipe
from clm_hf.strategies.base import STRATEGY_REGISTRY, build_strategy, strategies_from_specs

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
# recipes/<strategy>/*.yaml: one strategy's recipes for real models (recipes/real/ holds whole
# end-to-end setups, checked by tests/test_real_models.py).
REAL = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml")
              if p.parent.name not in ("accelerate", "real") and "name_or_path" in yaml.safe_load(p.read_text())["model"])
STRATEGIES = ["replay", "ewc", "lwf", "gem", "agem", "packnet", "pnn", "olora"]
BACKENDS = ["DDP", "FSDP2", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3"]
# An FSDP2 cell backed by tests/test_fsdp.py: 2 sharded CPU processes against one unsharded one.
FSDP2_TESTED = r"tested \(CPU torchrun 2 processes, gloo\): max diff [0-9.e+-]+ to one unsharded process"
# What from_pretrained receives from a recipe's model section (besides name_or_path and tokenizer).
MODEL_KEYS = {"name_or_path", "tokenizer", "trust_remote_code", "dtype", "attn_implementation", "revision"}


def _ids(paths):
    return [str(p.relative_to(ROOT / "recipes")) for p in paths]


# --- accelerate configs ---------------------------------------------------------------------------
def test_there_is_a_config_for_every_backend():
    assert {p.stem for p in ACCELERATE} == {"single_gpu", "multi_gpu", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"}


@pytest.mark.parametrize("path", ACCELERATE, ids=_ids(ACCELERATE))
def test_accelerate_config_is_valid_for_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys / bad enum values raise
    raw = yaml.safe_load(path.read_text())
    # Nested keys become `accelerate launch` arguments (fsdp_config.x -> --fsdp_x): they must exist.
    arguments = {action.dest for action in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in raw.get(section) or {}:
            name = key if section != "fsdp_config" or key.startswith("fsdp") else f"fsdp_{key}"
            assert name in arguments, f"{path.name}: {section}.{key} is not an accelerate launch option"
    kind = config.distributed_type.value
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                "deepspeed_zero3": "DEEPSPEED"}[path.stem]
    assert kind == expected
    if path.stem == "fsdp2":
        assert raw["fsdp_config"]["fsdp_version"] == 2
    if path.stem.startswith("deepspeed_zero"):
        assert raw["deepspeed_config"]["zero_stage"] == int(path.stem[-1])
    assert config.num_processes >= 1 and config.use_cpu is False
    # The example command in the header names this file and a recipe that exists.
    for command in re.findall(r"accelerate launch --config_file (\S+) .*train (\S+\.yaml)", path.read_text()):
        assert (ROOT / command[0]).resolve() == path.resolve() and (ROOT / command[1]).is_file(), command


# --- recipes for real models ------------------------------------------------------------------------
def test_every_strategy_has_a_causal_and_a_seq2seq_recipe():
    for name in STRATEGIES:
        assert (ROOT / "recipes" / name / "qwen2.5-0.5b.yaml") in REAL, name
        assert (ROOT / "recipes" / name / "t5-small.yaml") in REAL, name
    assert set(STRATEGIES) <= set(STRATEGY_REGISTRY)


@pytest.mark.parametrize("path", REAL, ids=_ids(REAL))
def test_real_model_recipe_matches_the_code(path):
    recipe = load_recipe(path)
    validate_recipe(recipe)
    built = strategies_from_specs(recipe.get("strategies") or [])
    assert [s.name for s in built] == [path.parent.name], "a recipe folder holds recipes of its strategy"
    args = ContinualTrainingArguments(**recipe["training"])  # every training key is a real field
    assert args.output_dir.startswith(f"runs/{path.parent.name}/")
    model = recipe["model"]
    assert set(model) <= MODEL_KEYS, set(model) - MODEL_KEYS
    assert model.get("dtype", "auto") == "auto" or isinstance(getattr(torch, model["dtype"], None), torch.dtype)
    for task in recipe["tasks"]:
        for split in ("train", "eval"):
            files = task[split]["data_files"]
            assert (ROOT / files).is_file(), f"{path.name}: {files} is missing"
    text = path.read_text()
    relative = str(path.relative_to(ROOT))
    assert f"accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m clm_hf.cli train {relative}" in text


def test_recipe_data_has_prompt_and_answer_rows():
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(ROOT / "recipes" / "data" / "reverse_train.jsonl"), split="train")
    assert rows.column_names == ["prompt", "answer"] and len(rows) >= 100
    assert rows[0]["answer"] == " ".join(reversed(rows[0]["prompt"].split(":")[1].strip(" =").split()))


def test_the_cli_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "clm_hf.cli", "train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "recipe" in done.stdout


# --- the support matrix of docs/distributed.md is what the code does ----------------------------------
DEEPSPEED_TESTED = "tested (CPU torchrun, 2 processes, DeepSpeed's CPU accelerator)"
# A cell whose default is rejected but whose cached-teacher variant runs (LwF on ZeRO-3).
CACHED_TEACHER = "; with cache_teacher=True: "


def _matrix() -> dict[str, dict[str, str]]:
    rows = {}
    for line in (ROOT / "docs" / "distributed.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STRATEGIES:
            rows[cells[0]] = dict(zip(BACKENDS, cells[1:]))
    return rows


def _start(name, backend, make_model, tokenizer, monkeypatch, **options) -> str | None:
    """Build a trainer for ``name`` (with ``options``) as if on ``backend``; the error message, or None if it starts."""
    import accelerate
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    strategy = build_strategy(name, **options)
    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer, strategies=[])
    trainer.strategies = [strategy]
    with monkeypatch.context() as patch:
        if backend == "FSDP2":
            patch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
            trainer.is_fsdp_enabled = True
            patch.setattr(trainer.args, "save_continual_state", False)  # mid-task state needs SHARDED_STATE_DICT (tested below)
        elif backend.startswith("DeepSpeed"):
            stage = int(backend[-1])
            patch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
            patch.setattr(AcceleratorState, "deepspeed_plugin",
                          property(lambda self: SimpleNamespace(zero_stage=stage, hf_ds_config=None)))
            trainer.is_deepspeed_enabled = True  # default save settings: EWC's mid-task checkpoints run on ZeRO-3 too
        try:
            trainer._check_backend_support()
            strategy.setup(trainer)
        except (NotImplementedError, ValueError) as err:
            return str(err)
    return None


def test_the_doc_matrix_covers_every_strategy_and_backend():
    matrix = _matrix()
    assert sorted(matrix) == sorted(STRATEGIES)
    from tests.test_distributed import RUNS
    from tests.test_fsdp import RUNS as FSDP_RUNS

    from tests.test_deepspeed import ZERO2
    from tests.test_deepspeed_zero3 import ZERO3

    checked = {"DeepSpeed ZeRO-2": ZERO2, "DeepSpeed ZeRO-3": ZERO3}
    for name, cells in matrix.items():
        for backend, cell in cells.items():
            assert cell == "tested (CPU torchrun, gloo)" or cell == "untested: needs GPU" or \
                cell == "tested (1 GPU, world size 1: equals unsharded training)" or \
                cell == DEEPSPEED_TESTED or cell.startswith("rejected at start-up: `") or \
                (backend == "FSDP2" and re.fullmatch(FSDP2_TESTED, cell)), (name, backend, cell)
            if cell == DEEPSPEED_TESTED:  # the claim is backed by a run of tests/test_deepspeed{,_zero3}.py
                assert name in {run.split("-")[0] for run in checked[backend]}, (name, backend)
            if CACHED_TEACHER in cell:  # "rejected ...; with cache_teacher=True: tested ...": the cached run exists
                assert cell.endswith(CACHED_TEACHER + DEEPSPEED_TESTED) and f"{name}-cached" in checked[backend], cell
        assert cells["DDP"] == "tested (CPU torchrun, gloo)" and name in RUNS, name
        if re.fullmatch(FSDP2_TESTED, cells["FSDP2"]):
            assert name in FSDP_RUNS.values(), f"{name}: docs say FSDP2 is tested, but tests/test_fsdp.py has no run of it"


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_doc_matrix_is_what_the_code_does(name, make_model, tokenizer, monkeypatch):
    cells = _matrix()[name]
    for backend in BACKENDS[1:]:
        error = _start(name, backend, make_model, tokenizer, monkeypatch)
        cell = cells[backend]
        if cell.startswith("rejected"):
            excerpt = re.search(r"`([^`]+)`", cell).group(1)
            assert error is not None, f"docs say {name} is rejected on {backend}, but it starts"
            assert excerpt in error and name in error.lower(), (error, excerpt)
            if CACHED_TEACHER in cell:
                cached = _start(name, backend, make_model, tokenizer, monkeypatch, cache_teacher=True)
                assert cached is None, f"docs say {name} with cache_teacher=True runs on {backend}, but: {cached}"
        else:
            assert error is None, f"docs say {name} is not rejected on {backend}, but: {error}"


def test_exponent_floats_are_numbers_in_recipes_and_overrides(tmp_path):
    # PyYAML (YAML 1.1) reads "3e-4" as a string; AdamW then failed deep inside torch.
    from clm_hf.recipe import apply_overrides, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: {arch: gpt2}\ntraining: {learning_rate: 3e-4, weight_decay: 1E-2, warmup_steps: 10}\n"
                    "strategies: [{name: ewc, ewc_lambda: 1e3}]\n")
    recipe = load_recipe(path, ["--training.adam_epsilon", "1e-8", "--training.run_name", "1e-4x"])
    assert recipe["training"]["learning_rate"] == pytest.approx(3e-4)
    assert recipe["training"]["weight_decay"] == pytest.approx(1e-2)
    assert recipe["strategies"][0]["ewc_lambda"] == pytest.approx(1000.0)
    assert recipe["training"]["adam_epsilon"] == pytest.approx(1e-8)
    assert recipe["training"]["warmup_steps"] == 10 and isinstance(recipe["training"]["warmup_steps"], int)
    assert recipe["training"]["run_name"] == "1e-4x"  # not a number: stays a string
    assert apply_overrides({}, ["--training.learning_rate", "-2.5e-3"])["training"]["learning_rate"] == pytest.approx(-2.5e-3)


def test_lwf_with_a_cached_teacher_starts_on_zero3_and_a_live_teacher_is_refused(make_model, tokenizer, monkeypatch):
    assert _start("lwf", "DeepSpeed ZeRO-3", make_model, tokenizer, monkeypatch, cache_teacher=True) is None
    error = _start("lwf", "DeepSpeed ZeRO-3", make_model, tokenizer, monkeypatch)
    assert error is not None and "not supported on DeepSpeed ZeRO-3" in error and "cache_teacher=True" in error


def test_fsdp2_mid_task_continual_state_needs_the_sharded_trainer_checkpoint(make_model, tokenizer, monkeypatch):
    """Mid-task continual checkpoints work under FSDP2 with the Trainer's SHARDED_STATE_DICT checkpoints
    (tests/test_fsdp_crash_resume.py); with FULL_STATE_DICT that path is refused at start-up, naming both
    settings and the fix, rather than failing at the first save."""
    import accelerate
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import StateDictType

    trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer, strategies=[])
    trainer.strategies = [build_strategy("ewc")]
    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    kind = {"type": StateDictType.FULL_STATE_DICT}
    monkeypatch.setattr(AcceleratorState, "fsdp_plugin",
                        property(lambda self: SimpleNamespace(fsdp_version=2, state_dict_type=kind["type"])), raising=False)
    trainer.is_fsdp_enabled = True
    assert trainer.args.save_continual_state
    monkeypatch.setattr(trainer.args, "save_strategy", "steps")
    with pytest.raises(NotImplementedError, match="save_strategy='steps' with save_continual_state=True under FSDP needs "
                       r"fsdp_config=\{'state_dict_type': 'SHARDED_STATE_DICT'\}.*got FULL_STATE_DICT"):
        trainer._check_backend_support()
    kind["type"] = StateDictType.SHARDED_STATE_DICT
    trainer._check_backend_support()  # sharded Trainer checkpoints: mid-task continual state supported
    kind["type"] = StateDictType.FULL_STATE_DICT
    monkeypatch.setattr(trainer.args, "save_strategy", "no")
    trainer._check_backend_support()  # end-of-task checkpoints only: sharded, supported
    monkeypatch.setattr(trainer.args, "save_strategy", "steps")
    monkeypatch.setattr(trainer.args, "save_continual_state", False)
    trainer._check_backend_support()  # EWC itself runs on FSDP2


def test_pnn_starts_on_fsdp2_in_both_modes_and_refuses_columns_on_fsdp1_with_the_reason(make_model, tokenizer, monkeypatch):
    import accelerate
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from clm_hf.strategies.pnn import PNN

    errors = {}
    for version in (2, 1):
        for mode in ("lora", "columns"):
            strategy = PNN(mode=mode)
            trainer = ContinualCausalLMTrainer(model=make_model("gpt2"), processing_class=tokenizer, strategies=[])
            trainer.strategies = [strategy]
            with monkeypatch.context() as patch:
                patch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
                patch.setattr(AcceleratorState, "fsdp_plugin", property(lambda self, v=version: SimpleNamespace(fsdp_version=v)),
                              raising=False)
                patch.setattr(trainer.args, "save_continual_state", False)  # without SHARDED_STATE_DICT: refused on its own
                trainer.is_fsdp_enabled = True
                try:
                    trainer._check_backend_support()
                    strategy.setup(trainer)
                    errors[version, mode] = None
                except NotImplementedError as err:
                    errors[version, mode] = str(err)
    assert errors[2, "lora"] is None and errors[2, "columns"] is None and errors[1, "lora"] is None
    message = errors[1, "columns"]
    assert message is not None and "mode='columns' is not supported on FSDP1" in message
    assert "fsdp_version: 2" in message and "mode='lora'" in message  # names the ways out


# --- clm-hf train builds TrainingArguments before the model (issue 12, item 6) ------------------------
def _launch_env(config: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file config`` gives each process, from accelerate's own code."""
    import os
    import socket

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mixed_precision_from_config = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config), "train.py"]))
    if args.use_deepspeed:
        # What launch_command sets before its DeepSpeed launcher.
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    with socket.socket() as sock:  # a free port: other test processes may run at the same time
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # One process of what torchrun starts (a world of 1, so the test runs in this process, on CPU).
    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return {**{k: v for k, v in env.items() if os.environ.get(k) != v}, **torchrun}


class _ModelBuilt(Exception):
    """Stops run_recipe once the model is being built: what the test checks is known by then."""


@pytest.mark.parametrize("config, flag", [("fsdp2.yaml", "fsdp_cpu_ram_efficient_loading"),
                                          ("deepspeed_zero3.yaml", "zero3_init_flag")])
def test_sharded_loading_flags_reach_model_construction(config, flag, tmp_path, monkeypatch):
    """The shipped configs' zero3_init_flag / fsdp_cpu_ram_efficient_loading are active when the recipe builds the
    model: transformers reads them in from_pretrained (and from_config), set up by TrainingArguments."""
    import importlib.util

    import torch.distributed as dist
    import transformers.integrations as integrations
    from accelerate.state import AcceleratorState
    from transformers.integrations import is_deepspeed_zero3_enabled, is_fsdp_enabled

    import clm_hf.recipe as recipe_module

    raw = yaml.safe_load((ROOT / "recipes" / "accelerate" / config).read_text())
    assert (raw.get("fsdp_config") or raw.get("deepspeed_config"))[flag] is True  # the config ships with the flag on
    for key, value in _launch_env(ROOT / "recipes" / "accelerate" / config).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else accelerate sets torch's threads for the rest of the session
    if importlib.util.find_spec("deepspeed") is None:
        # DeepSpeed is not installed here: accelerate's DeepSpeedPlugin registers transformers' HfDeepSpeedConfig,
        # whose constructor requires the package. A stand-in does what it does for from_pretrained: register the
        # config as the global that is_deepspeed_zero3_enabled() reads.
        class StandIn:
            def __init__(self, config: dict):
                self.config = config
                integrations.deepspeed.set_hf_deepspeed_config(self)

            def is_zero3(self) -> bool:
                return self.config["zero_optimization"]["stage"] == 3

        monkeypatch.setattr(integrations, "HfDeepSpeedConfig", StandIn)
    seen = {}

    def record(section):
        seen.update(zero3=is_deepspeed_zero3_enabled(), fsdp=is_fsdp_enabled())
        raise _ModelBuilt

    monkeypatch.setattr(recipe_module, "build_model_and_tokenizer", record)
    recipe = {"model": {"arch": "gpt2"}, "tasks": {"suite": "synthetic", "names": ["copy"], "num_train": 4, "num_eval": 2},
              "training": {"output_dir": str(tmp_path / "run"), "use_cpu": True, "report_to": "none"}}
    assert not is_deepspeed_zero3_enabled() and not is_fsdp_enabled()  # nothing set up before the recipe runs
    try:
        with pytest.raises(_ModelBuilt):
            recipe_module.run_recipe(recipe)
    finally:  # leave no process group, accelerator state or DeepSpeed config to the next tests
        integrations.deepspeed.unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    expected = {"zero3": flag == "zero3_init_flag", "fsdp": flag == "fsdp_cpu_ram_efficient_loading"}
    assert seen == expected


def test_the_arguments_class_is_chosen_from_the_config_alone(tmp_path, make_model):
    from clm_hf.recipe import model_is_seq2seq

    make_model("t5").config.save_pretrained(tmp_path / "t5")  # a config, no weights: nothing else is read
    make_model("gpt2").config.save_pretrained(tmp_path / "gpt2")
    assert model_is_seq2seq({"name_or_path": str(tmp_path / "t5")}) is True
    assert model_is_seq2seq({"name_or_path": str(tmp_path / "gpt2")}) is False
    assert model_is_seq2seq({"arch": "t5"}) is True and model_is_seq2seq({"arch": "llama"}) is False
