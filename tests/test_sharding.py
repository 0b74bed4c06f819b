"""clm_hf.sharding on real DTensors: one gloo process, a 1-rank CPU mesh (in a subprocess, so that the
process group does not leak into other tests). The 2-rank behaviour is covered by tests/test_fsdp.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clm_hf.sharding import all_reduce_sum_like, any_dtensor, is_dtensor, like_param, local_part, reshard

ROOT = Path(__file__).resolve().parent.parent


def test_plain_tensors_pass_through_unchanged():
    p = torch.nn.Parameter(torch.arange(4.0))
    value = torch.tensor(3.0)
    assert not is_dtensor(p) and not any_dtensor([p, value])
    assert local_part(p) is p and like_param(value, p) is value and all_reduce_sum_like(value, p) is value
    model = torch.nn.Linear(2, 2)
    assert reshard(model) is model


SCRIPT = textwrap.dedent('''
    import os, tempfile, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from clm_hf.sharding import all_reduce_sum_like, any_dtensor, is_dtensor, like_param, local_part
    from clm_hf.strategies.base import save_tensor_json_state

    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    param = torch.nn.Parameter(distribute_tensor(torch.arange(6.0).view(3, 2), mesh, [Shard(0)]))
    assert is_dtensor(param) and any_dtensor([torch.zeros(1), param])
    wrapped = like_param(local_part(param) * 2, param)
    assert is_dtensor(wrapped) and wrapped.placements == param.placements
    assert torch.equal(wrapped.full_tensor(), torch.arange(6.0).view(3, 2) * 2)
    assert float(all_reduce_sum_like(torch.tensor(1.5), param)) == 1.5
    try:
        like_param(torch.zeros(2, 2), param)
    except ValueError as err:
        assert "shape (2, 2)" in str(err), err
    else:
        raise AssertionError("a wrongly shaped shard was wrapped")
    try:
        save_tensor_json_state({"fisher": {"w": wrapped}}, tempfile.mkdtemp())
    except TypeError as err:
        assert "'fisher/w' is sharded across processes" in str(err), err
    else:
        raise AssertionError("a DTensor was written into the strategy state")
    dist.destroy_process_group()
    print("OK")
''')


def test_dtensor_helpers_and_the_state_guard_on_a_one_rank_mesh():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout[-3000:] + done.stderr[-3000:]
