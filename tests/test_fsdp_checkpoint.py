"""Sharded continual checkpoints under FSDP2, resumed across world sizes (2 -> 2, 2 -> 1, 1 -> 2), on CPU.

``tests/fsdp_resume_driver.py`` trains the 2-task stream copy, reverse with EWC (sharded Fisher and
anchor) and PackNet (sharded ownership masks), writing end-of-task continual checkpoints. A run
resumed from the checkpoint after task 0, in a launch with another world size, and trained on task 1,
must end with every weight and strategy tensor equal, to 1e-5, to the uninterrupted 2-process run.
The five launches (2 torchrun pairs of ranks and 1 process each, about 60 s together on 2 cores) make
the tests that use them ``slow`` and ``distributed``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests._launch import ATOL, run_logged, torchrun

RUNS = ("ewc", "packnet")


def _launch(out: Path, *, ranks: int, resume: Path | None = None, export: bool = False) -> Path:
    cmd = ["-m", "tests.fsdp_resume_driver", str(out), "--runs", ",".join(RUNS), "--batch", str(8 // ranks)]
    cmd = torchrun(ranks, *cmd, "--fsdp") if ranks > 1 else [sys.executable, *cmd]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if export:
        cmd.append("--export")
    log = out.with_suffix(".log")
    code = run_logged(cmd, log, timeout=600)
    if code != 0:
        pytest.fail(f"launch {out.name} failed with exit code {code}:\n{log.read_text()[-6000:]}")
    return out


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-ckpt")
    out = {"two": _launch(root / "two", ranks=2, export=True), "one": _launch(root / "one", ranks=1)}
    out["2to2"] = _launch(root / "2to2", ranks=2, resume=out["two"])
    out["2to1"] = _launch(root / "2to1", ranks=1, resume=out["two"])
    out["1to2"] = _launch(root / "1to2", ranks=2, resume=out["one"])
    return out


def _final(folder: Path, run: str, rank: int = 0) -> dict:
    return torch.load(folder / run / f"rank{rank}.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run", RUNS)
def test_sharded_checkpoint_layout_and_manifest(launches, run):
    from clm_hf import state as ckpt

    sharded = launches["two"] / run / "run" / "continual" / "task-000"
    files = json.loads((sharded / ckpt.MANIFEST).read_text())["files"]
    # Each rank wrote its own shards; the manifest, written last by rank 0, covers them all.
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(files), sorted(files)
    assert ckpt.MODEL_FILE not in files and ckpt.is_sharded_checkpoint(sharded)
    ckpt.read_continual_state(sharded)
    marks = json.loads((sharded / "strategies" / f"00-{run}" / "state.json").read_text())
    assert "__sharded__" in json.dumps(marks), "the strategy's sharded tensors were not routed to dcp/"
    assert not list(sharded.parent.glob(".tmp-*")), "a temporary folder was left behind"
    plain = launches["one"] / run / "run" / "continual" / "task-000"
    assert (plain / ckpt.MODEL_FILE).is_file() and not (plain / ckpt.DCP_DIR).exists()
    # A damaged shard of one rank is caught by the manifest check before anything is loaded.
    damaged = sharded.parent / "damaged"
    shutil.copytree(sharded, damaged)
    with open(damaged / "dcp" / "__1_0.distcp", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ckpt.CheckpointError, match=r"__1_0\.distcp is corrupt"):
        ckpt.read_continual_state(damaged)
    shutil.rmtree(damaged)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("resumed", ["2to2", "2to1", "1to2"])
@pytest.mark.parametrize("run", RUNS)
def test_resume_across_world_sizes_matches_the_uninterrupted_run(launches, run, resumed):
    reference = _final(launches["two"], run)
    final = _final(launches[resumed], run)
    assert reference["world_size"] == 2 and final["world_size"] == int(resumed[-1])
    assert reference.keys() == final.keys(), set(reference) ^ set(final)
    state_keys = [k for k in reference if k.startswith(f"{run}/")]
    assert any(isinstance(reference[k], torch.Tensor) for k in state_keys), state_keys
    for key, value in reference.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(final[key], value, atol=ATOL, rtol=1e-5, msg=lambda m, k=key: f"{resumed} {k}: {m}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(final[key], value), f"{resumed}: {key} differs"
    if final["world_size"] == 2:
        other = _final(launches[resumed], run, rank=1)
        assert all(torch.equal(other[k], final[k]) for k in final if isinstance(final[k], torch.Tensor))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run", RUNS)
def test_end_of_stream_export_of_the_sharded_model_loads_with_from_pretrained(launches, run):
    """``export_model`` gathers the FSDP2 shards on rank 0 into one safetensors file that
    ``from_pretrained`` loads as the trained model (tied embeddings tied again)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    export = launches["two"] / run / "export"
    with safe_open(str(export / "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    assert "lm_head.weight" not in stored, "the tied LM head was stored twice"
    model = AutoModelForCausalLM.from_pretrained(str(export))
    weights = model.state_dict()
    trained = {k.removeprefix("model/"): v for k, v in _final(launches["two"], run).items() if k.startswith("model/")}
    assert weights.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(weights[name], value), f"{run}: the exported {name} is not the trained one"


def test_a_sharded_marker_without_its_tensor_is_a_clear_error(tmp_path):
    """A strategy's ``state.json`` naming a ``dcp/`` tensor that was not read (an incomplete checkpoint)
    fails naming the key, instead of handing the strategy a marker dict as if it were its state."""
    from clm_hf.strategies.base import load_tensor_json_state, sharded_state_io

    (tmp_path / "state.json").write_text(json.dumps({"fisher": {"w": {"__sharded__": "strategies/00-ewc/fisher/w"}}}))
    with pytest.raises(ValueError, match="'strategies/00-ewc/fisher/w', which is not in the checkpoint's"):
        load_tensor_json_state(tmp_path)
    with sharded_state_io("strategies/00-ewc", loaded={"strategies/00-ewc/fisher/w": torch.ones(2)}):
        assert load_tensor_json_state(tmp_path)["fisher"]["w"].tolist() == [1.0, 1.0]


def test_export_model_without_fsdp_writes_a_from_pretrained_folder(tmp_path, make_model, tokenizer):
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_trainer

    model = make_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.5)  # not the initialisation from_pretrained would give
    trainer = make_trainer(tmp_path, model, tokenizer, [])
    folder = trainer.export_model(tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded[name], value), name
