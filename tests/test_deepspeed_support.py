"""ZeRO-3 partition arithmetic of ``clm_hf/deepspeed_support.py``, in one process, on stand-in parameters.

A stand-in carries the attributes DeepSpeed ZeRO-3 gives a partitioned parameter (``ds_id``,
``ds_tensor`` with ``ds_numel``, ``ds_numel``, ``ds_shape``) and keeps its whole data, as inside a
module's forward where ZeRO-3 has gathered it; the rank and world size are patched. The real
partitioned runs are tests/test_deepspeed.py and tests/test_deepspeed_zero3.py.
"""

from __future__ import annotations

import pytest
import torch

import clm_hf.deepspeed_support as ds
from clm_hf import EWC


def _stand_in(param: torch.nn.Parameter, world: int) -> torch.nn.Parameter:
    numel = param.numel()
    size = -(-numel // world)  # ZeRO-3 pads the flattened parameter to a multiple of the world size
    param.ds_id = id(param)
    param.ds_tensor = torch.empty(size)
    param.ds_tensor.ds_numel = size
    param.ds_numel, param.ds_shape = numel, param.shape
    return param


def test_each_ranks_slice_is_its_partition_and_the_slices_cover_the_parameter(monkeypatch):
    whole = torch.arange(10.0).view(2, 5)
    param = _stand_in(torch.nn.Parameter(whole.clone()), world=3)  # partitions of 4: [0, 4), [4, 8), [8, 10) + padding
    slices = []
    for rank in range(3):
        monkeypatch.setattr(ds, "_rank_world", lambda rank=rank: (rank, 3))
        slices.append(ds.slice_partition(whole, param))
    assert [ds.partition_range(param)] == [(8, 10)]
    assert [s.numel() for s in slices] == [4, 4, 2]
    assert torch.equal(torch.cat(slices).view(2, 5), whole)
    with pytest.raises(ValueError, match=r"shape \(10,\).*\(2, 5\)"):
        ds.slice_partition(whole.view(-1), param)


def test_the_partition_terms_gradient_is_world_times_the_pull_on_the_slice_only(monkeypatch):
    """ZeRO-3 averages the ranks' gradients: W x this rank's pull on its slice averages to the exact gradient."""
    monkeypatch.setattr(ds, "_rank_world", lambda: (1, 2))
    param = _stand_in(torch.nn.Parameter(torch.linspace(-1, 1, 6)), world=2)
    fisher, anchor = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.0, -0.5])
    term = ds._PartitionTerm.apply(param, fisher, anchor, 3, 0.5, 2)
    theta = param.detach()[3:]
    torch.testing.assert_close(term, 0.5 * (fisher * (theta - anchor) ** 2).sum())
    term.backward()
    expected = torch.zeros(6)
    expected[3:] = 2 * (2 * 0.5) * fisher * (theta - anchor)
    torch.testing.assert_close(param.grad, expected)


def test_the_hooks_add_the_penalty_in_a_training_forward_only():
    layer = torch.nn.Linear(3, 2)
    weight = _stand_in(layer.weight, world=1)
    fisher, anchor = torch.rand(6), torch.randn(6)
    penalty = ds.Zero3QuadraticPenalty(layer, [weight], [fisher], [anchor])
    assert penalty.hooked == 1
    with torch.no_grad():
        layer(torch.ones(1, 3))
    assert float(penalty.penalty(1.0)) == 0.0  # no term from a forward without gradients
    layer(torch.ones(1, 3))
    value = penalty.penalty(0.5 * 4.0)
    diff = weight.detach().view(-1) - anchor
    torch.testing.assert_close(value, 0.5 * 4.0 * (fisher * diff**2).sum())
    value.backward()
    torch.testing.assert_close(weight.grad.view(-1), 4.0 * fisher * diff)
    penalty.remove()
    layer(torch.ones(1, 3))
    assert float(penalty.penalty(1.0)) == 0.0


def test_ewc_cuts_a_loaded_whole_state_into_its_partition_and_still_saves_it_whole(monkeypatch, make_model):
    """A resumed ZeRO-3 run: the checkpoint's whole F and θ* become this rank's slices; state_dict gives the whole ones."""
    monkeypatch.setattr(ds, "_rank_world", lambda: (1, 2))
    model = make_model("gpt2")
    params = {n: _stand_in(p, world=2) for n, p in model.named_parameters() if p.requires_grad}
    whole = {"terms": [{"fisher": {n: torch.rand(p.shape) for n, p in params.items()},
                        "anchor": {n: torch.randn(p.shape) for n, p in params.items()}}]}
    ewc = EWC(ewc_lambda=3.0, mode="separate")
    ewc.load_state_dict(whole)
    ewc._bind(model)
    assert ewc._zero3 is not None and ewc._zero3.hooked == len(params)
    for name, param in params.items():
        start, end = ds.partition_range(param)
        torch.testing.assert_close(ewc.terms[0][0][name], whole["terms"][0]["fisher"][name].reshape(-1)[start:end])
        torch.testing.assert_close(ewc.terms[0][1][name], whole["terms"][0]["anchor"][name].reshape(-1)[start:end])
    saved = ewc.state_dict()["terms"][0]
    assert all(torch.equal(saved["fisher"][n], whole["terms"][0]["fisher"][n]) for n in params)
    model.train()
    ewc._zero3.world = 1  # no process group here to sum the ranks' parts over: this rank's part alone
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    pen = ewc.penalty()  # this rank's half of the whole penalty (no other rank to sum with here)
    expected = 0.0
    for n, p in params.items():
        start, end = ds.partition_range(p)
        f, a = (whole["terms"][0][k][n].reshape(-1)[start:end] for k in ("fisher", "anchor"))
        expected = expected + (f * (p.detach().reshape(-1)[start:end] - a) ** 2).sum()
    torch.testing.assert_close(pen, 0.5 * 3.0 * expected)
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        ewc.state_dict()  # training started: the whole copy is gone, rank 0 alone cannot gather
    del out


@pytest.mark.parametrize("stage", [2, 3])
def test_ewc_starts_with_mid_task_continual_checkpoints_on_zero2_and_zero3(stage, tmp_path, make_model, tokenizer,
                                                                            monkeypatch):
    """Transformers' default save_strategy is "steps": a default EWC run on ZeRO-3 must start (before_save gathers)."""
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState

    from tests.conftest import make_trainer

    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [], save_strategy="steps", save_steps=1,
                           save_continual_state=True)
    monkeypatch.setattr(AcceleratorState, "deepspeed_plugin",
                        property(lambda self: SimpleNamespace(zero_stage=stage, hf_ds_config=None)))
    EWC().setup(trainer)


def test_ewc_gathers_its_whole_zero3_state_for_a_save_and_drops_it_after(monkeypatch, make_model):
    """Mid-task, each rank holds only its slices: before_save gathers the whole terms (on every rank), state_dict
    then gives them to the writer, and after_save drops the copy so that training holds slices only."""
    from types import SimpleNamespace

    monkeypatch.setattr(ds, "_rank_world", lambda: (0, 1))  # one rank: the gather is the identity collective
    model = make_model("gpt2")
    params = {n: _stand_in(p, world=1) for n, p in model.named_parameters() if p.requires_grad}
    whole = {"terms": [{"fisher": {n: torch.rand(p.shape) for n, p in params.items()},
                        "anchor": {n: torch.randn(p.shape) for n, p in params.items()}}]}
    ewc = EWC(ewc_lambda=3.0)
    ewc.load_state_dict(whole)
    ewc._bind(model)
    model.train()
    model(input_ids=torch.tensor([[5, 6, 7]]))
    ewc.penalty()  # a training step: the whole copy loaded with the state is dropped
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        ewc.state_dict()
    trainer = SimpleNamespace(model=model)
    ewc.before_save(trainer)
    saved = ewc.state_dict()["terms"][0]
    assert saved["fisher"].keys() == saved["anchor"].keys() == params.keys()
    for name, param in params.items():
        assert saved["fisher"][name].shape == param.ds_shape  # whole, shaped like the parameter, not a flat slice
        assert torch.equal(saved["fisher"][name], whole["terms"][0]["fisher"][name])
        assert torch.equal(saved["anchor"][name], whole["terms"][0]["anchor"][name])
    ewc.after_save(trainer)
    assert ewc._zero3_whole is None  # memory: only the slices stay
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        ewc.state_dict()


def test_the_trainer_calls_before_save_and_after_save_around_each_mid_task_continual_state(tmp_path, make_model,
                                                                                          tokenizer, tiny_stream):
    """Every rank runs the hooks (a rank that writes nothing too), rank 0 reads the state in between."""
    from clm_hf import Strategy
    from tests.conftest import make_trainer

    events: list[str] = []

    class Recorder(Strategy):
        name = "recorder"

        def before_save(self, trainer):
            events.append("before_save")

        def state_dict(self):
            events.append("state_dict")
            return {}

        def after_save(self, trainer):
            events.append("after_save")

    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [Recorder()], save_strategy="steps", save_steps=2,
                           max_steps=4, save_continual_state=False)
    trainer.train_task(tiny_stream["copy"]["train"], task_id="copy")
    assert sorted(p.name for p in (tmp_path / "run" / "task-000").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert events == ["before_save", "state_dict", "after_save"] * 2


def test_ewc_resumed_before_zero3_partitions_the_model_binds_at_the_first_forward(monkeypatch, make_model):
    """A resumed run loads the whole state while the model is still whole; the engine partitions it later."""
    from types import SimpleNamespace

    model = make_model("gpt2")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    whole = {"terms": [{"fisher": {n: torch.rand(p.shape) for n, p in params.items()},
                        "anchor": {n: torch.randn(p.shape) for n, p in params.items()}}]}
    ewc = EWC(ewc_lambda=2.0, mode="separate")
    plugin = SimpleNamespace(zero_stage=3, hf_ds_config=None)
    ewc.trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))
    ewc.load_state_dict(whole)  # binds the whole tensors: the parameters are not partitioned yet
    assert ewc._zero3 is None
    monkeypatch.setattr(ds, "_rank_world", lambda: (0, 2))
    for p in params.values():  # what the DeepSpeed engine does when train() starts
        _stand_in(p, world=2)
    model.train()
    model(input_ids=torch.tensor([[5, 6, 7]]))
    assert ewc._zero3 is not None and ewc._zero3.hooked == len(params)
    ewc._zero3.world = 1  # no process group here to sum the ranks' parts over: this rank's part alone
    expected = 0.0
    for n, p in params.items():
        start, end = ds.partition_range(p)
        f, a = (whole["terms"][0][k][n].reshape(-1)[start:end] for k in ("fisher", "anchor"))
        expected = expected + (f * (p.detach().reshape(-1)[start:end] - a) ** 2).sum()
        torch.testing.assert_close(ewc.terms[0][0][n], f)
    torch.testing.assert_close(ewc.penalty(), 0.5 * 2.0 * expected)


# --- ZeRO-2: this rank's partition of the reduced gradient (Zero2GradientPartition) ----------------
def _zero2_optimizer(params: list[torch.nn.Parameter], world: int, rank: int, scale: float = 1.0):
    """The attributes of DeepSpeed ZeRO-2's optimizer for one parameter group of ``params`` on ``rank``.

    Laid out as DeepSpeed does: the group's parameters flattened one after the other, padded to a
    multiple of ``world``, rank ``r`` owning ``[r·S, (r+1)·S)``. ``averaged_gradients`` holds, as
    after a backward, the pieces of each parameter's gradient in the partition (views of ``p.grad``)
    and the zero padding; the gradients are multiplied by ``scale`` (fp16's loss scale).
    """
    from types import SimpleNamespace

    total = sum(p.numel() for p in params)
    size = -(-total // world)
    start, end = rank * size, (rank + 1) * size
    inside, starts, inserts, pieces, at = [], {}, {}, [], 0
    for key, p in enumerate(params):
        lo, hi = max(at, start), min(at + p.numel(), end)
        if lo < hi:
            inside.append(p)
            starts[key], inserts[key] = lo - at, lo - start
            pieces.append(p.grad.view(-1)[lo - at : hi - at])
        at += p.numel()
    used = sum(t.numel() for t in pieces)
    if used < size:
        pieces.append(torch.zeros(size - used))
    ids = {id(p): key for key, p in enumerate(params)}
    # The fp32 master partition, as after the inner optimizer's update: the weights plus 1 (0 in the padding).
    whole = torch.cat([p.detach().reshape(-1) + 1.0 for p in params])
    master = torch.zeros(size)
    master[: max(0, min(end, total) - start)] = whole[start:end]

    class Optimizer(SimpleNamespace):  # weak-referenceable, as DeepSpeed's optimizer is
        pass

    return Optimizer(params_in_partition=[inside], partition_size=[size], real_dp_process_group=[None],
                     grad_start_offset=[{0: starts}], grad_partition_insertion_offset=[{0: inserts}],
                     get_param_id=lambda p: ids[id(p)], loss_scale=scale, averaged_gradients={0: pieces},
                     single_partition_of_fp32_groups=[master])


def _params_with_grads(scale: float = 1.0) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3))]  # 9 numbers
    for p in params:
        p.grad = torch.randn(p.shape) * scale
    return params


def test_zero2_partitions_of_the_ranks_read_the_whole_gradient_unscaled_and_cut_references_alike():
    params = _params_with_grads(scale=8.0)
    whole = torch.cat([p.grad.reshape(-1) for p in params]) / 8.0
    refs = [torch.randn(2, *p.shape) for p in params]  # K = 2 reference gradients, whole
    whole_refs = torch.cat([r.reshape(2, -1) for r in refs], 1)
    read, cut = [], []
    for rank in range(2):  # partitions of 5: the weight's last element and the bias on rank 1, one padding zero
        part = ds.Zero2GradientPartition(_zero2_optimizer(params, world=2, rank=rank, scale=8.0))
        assert part.numel == 5
        read.append(part.read())
        cut.append(part.slice_rows(refs, params, torch.full((2, part.numel), float("nan"))))
    torch.testing.assert_close(torch.cat(read)[:9], whole, rtol=0, atol=0)
    assert float(read[1][-1]) == 0.0  # the padding
    torch.testing.assert_close(torch.cat(cut, 1)[:, :9], whole_refs, rtol=0, atol=0)
    assert torch.equal(cut[1][:, -1], torch.zeros(2))


def test_zero2_write_puts_the_edited_partition_back_into_deepspeeds_pieces_scaled():
    params = _params_with_grads(scale=4.0)
    before = [p.grad.clone() for p in params]
    part = ds.Zero2GradientPartition(_zero2_optimizer(params, world=2, rank=1, scale=4.0))
    edited = part.read()
    edited[:4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    part.write(edited)
    # Rank 1 owns flat elements 5..8: the weight's last element and the bias (views of p.grad here).
    assert params[0].grad.view(-1)[-1] == 4.0 and params[1].grad.tolist() == [8.0, 12.0, 16.0]
    assert torch.equal(params[0].grad.view(-1)[:5], before[0].view(-1)[:5])  # rank 0's part is not this rank's


def test_zero2_projection_on_partitions_with_summed_products_equals_the_whole_projection():
    # What GEM's edit_zero_gradients does on each rank, the all-reduce played by summing over two partitions.
    from clm_hf.strategies.gem import project_gem_
    from tests.test_gem import _shard_reduce

    params = _params_with_grads()
    refs = [torch.randn(2, *p.shape) for p in params]
    g = torch.cat([p.grad.reshape(-1) for p in params])
    G = torch.cat([r.reshape(2, -1) for r in refs], 1)
    G[0] = -g + 0.1 * G[0]  # the first constraint is violated
    refs = [view.view(2, *p.shape) for view, p in zip(G.split([p.numel() for p in params], 1), params)]
    expected = g.clone()
    assert project_gem_(expected, G, 0.0)
    parts = [ds.Zero2GradientPartition(_zero2_optimizer(params, world=2, rank=r)) for r in range(2)]
    flats = [p.read() for p in parts]
    cuts = [p.slice_rows(refs, params, torch.empty(2, p.numel)) for p in parts]
    unprojected = [f.clone() for f in flats]

    for rank in range(2):  # each rank's partial sums plus the other's: what all_reduce_sum returns
        reduce = _shard_reduce(unprojected[1 - rank], cuts[1 - rank])
        assert project_gem_(flats[rank], cuts[rank], 0.0, reduce=reduce)
        parts[rank].write(flats[rank])
    projected = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(projected, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("share", [0.25, 0.75])  # held by index, and by a full copy (PackNet._hold)
def test_packnet_masks_and_holds_zero2_partitions_as_it_does_the_whole_weights(share):
    # What PackNet's ZeRO-2 hooks do on each of 2 ranks, put together, equals its one-process edit and restore.
    from clm_hf.strategies.packnet import PackNet

    params = _params_with_grads(scale=2.0)
    packnet = PackNet()
    generator = torch.Generator().manual_seed(1)
    fixed = [torch.rand(p.shape, generator=generator) < share for p in params]
    for i, (p, f) in enumerate(zip(params, fixed)):
        packnet._hold(f"p{i}", p, f)  # held at the weights' current values
    optimizers = [_zero2_optimizer(params, world=2, rank=rank, scale=2.0) for rank in range(2)]
    for opt in optimizers:
        packnet.edit_zero_gradients(None, ds.Zero2GradientPartition(opt))
        packnet.edit_zero_master_weights(None, ds.Zero2MasterPartition(opt, 0))
    # The gradient partitions are views of p.grad here: the two ranks' edits make the whole edited gradient.
    edited = torch.cat([p.grad.reshape(-1) for p in params])
    expected = torch.cat([torch.where(f, 0.0, p.grad).reshape(-1) for p, f in zip(params, fixed)])
    assert torch.equal(edited, expected) and bool(torch.cat([f.reshape(-1) for f in fixed]).any())
    # The master partitions moved every weight by 1 (a stand-in for the update); the held ones are back, exactly.
    master = torch.cat([opt.single_partition_of_fp32_groups[0] for opt in optimizers])[:9]
    flat_fixed = torch.cat([f.reshape(-1) for f in fixed])
    weights = torch.cat([p.detach().reshape(-1) for p in params])
    assert torch.equal(master[flat_fixed], weights[flat_fixed])
    assert torch.equal(master[~flat_fixed], weights[~flat_fixed] + 1.0)
    # The cuts are kept for the phase (one per optimizer and kind) and dropped with its hold.
    assert len(packnet._zero_cuts) == 4
    packnet.load_state_dict(packnet.state_dict())
    assert packnet._zero_cuts == {}


@pytest.mark.parametrize("name", ["gem", "agem", "packnet"])
def test_gem_agem_and_packnet_start_on_zero2_only_and_zero1_zero3_say_why(name, make_model, tokenizer, monkeypatch):
    from tests.test_recipes_accelerate import _start

    assert _start(name, "DeepSpeed ZeRO-2", make_model, tokenizer, monkeypatch) is None
    for stage in (1, 3):  # ZeRO-1 does not partition gradients the way the step hook reads them
        error = _start(name, f"DeepSpeed ZeRO-{stage}", make_model, tokenizer, monkeypatch)
        assert error is not None and repr(name) in error and f"DeepSpeed backend with ZeRO-{stage}" in error, error
        assert "ZeRO-1 does not partition the gradients" in error and "use ZeRO-2" in error
        assert ("reference gradients" if name != "packnet" else "PackNet masks and prunes whole") in error


def _fake_zero2(per_group: bool, overflow: bool = False):
    """A ``DeepSpeedZeroOptimizer`` with only what :func:`hook_zero2_step` reads: two parameter groups, and a
    ``step`` that updates each through ``_optimizer_step`` (as DeepSpeed 0.19 does) or, like a release
    that would not, elsewhere."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    class FakeZero2(DeepSpeedZeroOptimizer):
        def __init__(self) -> None:  # noqa: D107 - none of DeepSpeed's set-up
            self.partition_gradients, self.cpu_offload, self.overflow = True, False, overflow
            self.bit16_groups, self.updated = [[0], [1]], []

        def step(self, closure=None):
            for group_no in range(len(self.bit16_groups)):
                if per_group:
                    self._optimizer_step(group_no)
                else:
                    self.updated.append(group_no)

        def _optimizer_step(self, group_no):
            self.updated.append(group_no)

    return FakeZero2()


def test_hook_zero2_step_holds_after_every_groups_update_and_refuses_a_step_that_bypasses_it(monkeypatch):
    monkeypatch.setattr(ds, "Zero2GradientPartition", lambda optimizer: optimizer)
    monkeypatch.setattr(ds, "Zero2MasterPartition", lambda optimizer, group_no: group_no)
    held, edited = [], []
    optimizer = _fake_zero2(per_group=True)
    ds.hook_zero2_step(optimizer, lambda partition: edited.append(len(optimizer.updated)), held.append)
    optimizer.step()
    assert edited == [0] and held == [0, 1] and optimizer.updated == [0, 1]  # the edit first, a hold after each update
    # A DeepSpeed whose step no longer runs the per-group update would lose the hold: the step says so.
    bypass = _fake_zero2(per_group=False)
    ds.hook_zero2_step(bypass, None, held.append)
    with pytest.raises(RuntimeError, match=r"updated 2 parameter group\(s\) but _optimizer_step ran for 0"):
        bypass.step()
    skipped = _fake_zero2(per_group=False, overflow=True)  # a step DeepSpeed skips (fp16 overflow) holds nothing
    ds.hook_zero2_step(skipped, None, held.append)
    skipped.step()
    assert held == [0, 1]


def test_zero2_hooks_without_a_deepspeed_engine_are_an_error_not_a_silent_skip(tmp_path, make_model, tokenizer):
    from clm_hf.strategies.packnet import PackNet
    from tests.conftest import make_trainer

    trainer = make_trainer(tmp_path, make_model("gpt2"), tokenizer, [PackNet()])
    trainer.is_deepspeed_enabled = True  # as if under DeepSpeed, but model_wrapped is the bare model
    with pytest.raises(RuntimeError, match="PackNet edit.*no DeepSpeed engine with an optimizer"):
        trainer._hook_zero_optimizer()


def test_a_hooked_zero2_optimizer_is_freed_when_dropped_without_waiting_for_the_garbage_collector():
    # Each task gets a new engine; the old optimizer's fp32 master and Adam state must go with it (a GPU's memory).
    import gc
    import weakref

    optimizer = _fake_zero2(per_group=True)
    ds.hook_zero2_step(optimizer, lambda partition: None, lambda master: None)
    gone = weakref.ref(optimizer)
    gc.disable()
    try:
        del optimizer
        assert gone() is None, "the hooks keep the optimizer in a reference cycle"
    finally:
        gc.enable()
