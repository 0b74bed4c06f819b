"""Package layout: one atomic writer, import layering without cycles, a lazy CLI, the library logger."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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

