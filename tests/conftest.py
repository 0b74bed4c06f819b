"""Shared fixtures: a tokenizer, tiny models and a small stream, all built offline and seeded."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback

# Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes them many times
# slower when the 2 cores are shared with another process. CLM_HF_TEST_THREADS=2 checks the
# suite under another thread count (training is not bit-reproducible across thread counts).
torch.set_num_threads(int(os.environ.get("CLM_HF_TEST_THREADS", "1")))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Default parallelism of the suite (pytest-xdist, in the "test" extra). Most tests are one-threaded
# (above), so one worker per core cuts the wall time (10 files on 2 cores: 53 s against 82 s in one
# process). The cap: each worker imports torch and transformers, the multi-process tests start 2-3
# more processes each, and with one file per unit (``--dist loadfile``) the longest files
# (~2-3 min) bound the wall time anyway.
MAX_DEFAULT_WORKERS = 4


def default_workers(cpus: int) -> int:
    """Workers the suite starts when the command line does not say (``-n``): one per usable core,
    at most :data:`MAX_DEFAULT_WORKERS`; 0 (no xdist, in-process) on one core.

    Args:
        cpus: the cores this process may run on.

    Example:

    >>> default_workers(2), default_workers(64), default_workers(1)
    (2, 4, 0)
    """
    workers = min(cpus, MAX_DEFAULT_WORKERS)
    return workers if workers > 1 else 0


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Run on :func:`default_workers` xdist workers, one test file per unit, unless told otherwise.

    Set here rather than as ``addopts = "-n 2"``, so that ``-p no:xdist`` and a checkout without
    pytest-xdist still run (serially). ``-n N`` (``-n 0``: in-process), ``--dist`` and ``--pdb`` win;
    a bare ``-n N`` distributes by file too.
    ``--dist loadfile`` keeps each file on one worker: module fixtures (the crash chains, the
    torchrun launches, the quality runs) run once, and docs examples that share a folder run in order.
    Runs before xdist's own hook (``tryfirst``), which turns the count into worker processes.
    """
    option = config.option
    if (not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput")
            or config.getoption("usepdb", False)):
        return None
    if option.numprocesses is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        option.numprocesses = default_workers(cpus)
    # Also for a bare `-n N`, which xdist would spread test by test (`--dist load`).
    if option.numprocesses and option.dist == "no":
        option.dist = "loadfile"
    return None


# Seconds each long file took (its tests' setup + call + teardown) in a full run on 2 cores with
# 2 workers while other jobs kept the load at 6-8 (slower than on an idle machine), so that xdist
# starts the longest files first and the short ones fill in at the end (longest-first scheduling):
# by default xdist orders files by their number of tests, which put the files of a few long tests
# (one fixture that trains for minutes) last, on one worker while the other had nothing left to run.
# Only the order matters; a file missing here runs after these (a test checks that each one exists).
FILE_SECONDS: dict[str, float] = {
    "tests/test_docs_examples.py": 1116,
    "tests/test_forgetting.py": 621,  # the quality runs, on two processes of their own
    "tests/test_layouts.py": 320,
    "tests/test_crash_resume.py": 238,
    "tests/test_nl_stream.py": 236,
    "tests/test_fsdp.py": 232,
    "tests/test_trl.py": 215,
    "tests/test_strategies_common.py": 204,
    "tests/test_crash_soak.py": 201,
    "tests/test_compat_matrix.py": 177,
    "tests/test_gem.py": 140,
    "tests/test_cli.py": 130,
    "tests/test_distributed.py": 94,
    "tests/test_trainer.py": 88,
    "tests/test_lwf.py": 87,
    "tests/test_run_folder.py": 83,
    "tests/test_deepspeed_zero3.py": 82,
    "tests/test_pnn.py": 80,
    "tests/test_trainer_evaluate.py": 79,
    "tests/test_packnet.py": 68,
    "tests/test_fsdp_checkpoint.py": 62,
    "tests/test_fsdp_crash_resume.py": 53,
    "tests/test_deepspeed_zero2_resume.py": 52,  # three 2-rank DeepSpeed launches
    "tests/test_generation_eval.py": 46,
    "tests/test_benchmarks.py": 41,
    "tests/test_peft.py": 41,
    "tests/test_reference_sets.py": 41,
}


def heaviest_first(files: dict[str, dict[str, bool]]) -> list[str]:
    """The order in which xdist hands out whole files: the longest of :data:`FILE_SECONDS` first, then
    the rest by number of tests (xdist's own order), each group in collection order.

    Args:
        files: ``{file: {test node id: done}}``, xdist's work queue of one file per unit.

    Example:

    >>> heaviest_first({"tests/a.py": {"a1": False}, "tests/test_forgetting.py": {"f1": False},
    ...                 "tests/b.py": {"b1": False, "b2": False}})[:1]
    ['tests/test_forgetting.py']
    """
    return sorted(files, key=lambda name: (-FILE_SECONDS.get(name, 0.0), -len(files[name])))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which may not be installed
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (this suite's default, see :func:`pytest_cmdline_main`) with the files in
    :func:`heaviest_first` order; any other ``--dist`` is xdist's own."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class HeaviestFirst(LoadFileScheduling):
        _ordered = False

        def _assign_work_unit(self, node):
            # schedule() fills the queue, then assigns the first files: reorder it once, right there.
            if not self._ordered:
                self._ordered = True
                order = heaviest_first(self.workqueue)
                queue = [(name, self.workqueue[name]) for name in order]
                self.workqueue.clear()
                self.workqueue.update(queue)
            super()._assign_work_unit(node)

    return HeaviestFirst(config, log)


@pytest.fixture(autouse=True)
def _logging_enabled_again():
    """Benchmarks run in-process call ``logging.disable`` and quiet transformers (and turn off the
    progress bars of transformers and datasets), and a trainer's
    ``log_level`` (or transformers' verbosity) sets clm-hf's level; later tests read logs through
    caplog, so every test starts from the defaults."""
    yield
    import logging

    import transformers

    from clm_hf import _logging

    logging.disable(logging.NOTSET)
    transformers.logging.set_verbosity_warning()
    _logging.set_verbosity(None)
    # ... and their progress bars: a later test checks what the Trainer's bars show.
    import datasets

    transformers.logging.enable_progress_bar()
    datasets.enable_progress_bars()


@pytest.fixture(scope="session")
def tokenizer():
    from clm_hf.tasks import build_tokenizer

    return build_tokenizer()


NO_DROPOUT = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {"attention_dropout": 0.0},
    "t5": {"dropout_rate": 0.0},
}


@pytest.fixture
def make_model(tokenizer):
    """Build a fresh tiny model without dropout (so runs are exactly repeatable)."""
    from clm_hf.tasks import build_tiny_model

    def build(arch: str = "gpt2", **overrides):
        return build_tiny_model(arch, tokenizer, **{**NO_DROPOUT[arch], **overrides})

    return build


def small_args(tmp_path, **overrides):
    """ContinualTrainingArguments for seconds-long runs."""
    from clm_hf import ContinualTrainingArguments

    settings = dict(
        output_dir=str(tmp_path / "run"), num_train_epochs=1, learning_rate=3e-3, per_device_train_batch_size=8,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, disable_tqdm=True, dataloader_pin_memory=False,
    )
    settings.update(overrides)
    cls = overrides.pop("args_class", None) or ContinualTrainingArguments
    settings.pop("args_class", None)
    return cls(**settings)


def make_trainer(tmp_path, model, tokenizer, strategies, **overrides):
    """A ContinualCausalLMTrainer with :func:`small_args`."""
    from clm_hf import ContinualCausalLMTrainer

    return ContinualCausalLMTrainer(model=model, args=small_args(tmp_path, **overrides), processing_class=tokenizer,
                                    strategies=list(strategies))


def param_snapshot(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_same_params(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol)


@pytest.fixture(scope="session")
def tiny_stream():
    """Three short tasks of 32 rows (train) and 16 (eval), as {name: DatasetDict}."""
    from clm_hf.tasks import make_suite

    return make_suite(["copy", "reverse", "sort"], num_train=32, num_eval=16, seed=0)


# Options that keep each strategy's test runs to seconds; defaults are checked separately.
FAST_OPTIONS: dict[str, dict] = {
    "replay": {"buffer_size": 16},
    "ewc": {"fisher_samples": 16},
    "lwf": {},
    "gem": {"memory_per_task": 8},
    "agem": {"memory_per_task": 8},
    "packnet": {"retrain_epochs": 1},
    "pnn": {},
    "olora": {"lora_rank": 4},
}


class AtTaskStep(TrainerCallback):
    """A Trainer callback that calls :meth:`act` when optimizer step ``step`` of task ``task_index``
    has run (``on="step"``) or has been checkpointed (``on="save"``). By default it simulates a
    kill (``KeyboardInterrupt``)."""

    def __init__(self, trainer, task_index: int, step: int, on: str = "step") -> None:
        self.trainer, self.task_index, self.step, self.on = trainer, task_index, step, on

    def _due(self, state) -> bool:
        task = self.trainer.current_task
        return task is not None and task.index == self.task_index and state.global_step == self.step

    def on_step_end(self, args, state, control, **kwargs):
        if self.on == "step" and self._due(state):
            self.act()

    def on_save(self, args, state, control, **kwargs):
        if self.on == "save" and self._due(state):
            self.act()

    def act(self) -> None:
        raise KeyboardInterrupt(f"simulated crash at {self.on} {self.step} of task {self.task_index}")
