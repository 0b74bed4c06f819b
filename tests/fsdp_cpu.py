"""Runs the real Trainer/Accelerate FSDP2 path in CPU processes (gloo), for tests and benchmarks.

Accelerate only turns FSDP on for accelerator device types: on a CPU-only host a ``torchrun``
launch is ``MULTI_CPU`` and ``TrainingArguments(fsdp=True)`` is ignored. Everything below that
decision works on CPU in torch 2.13 (``fully_shard`` over a ``DeviceMesh("cpu", ...)``, DTensor
parameters, forward, backward, AdamW, state-dict gathering), so the one patch here lets the state
record the FSDP plugin when the processes are CPU processes. Accelerate's own preparation then
runs unchanged: ``fully_shard`` per decoder block, the sharded optimizer, the gathered state dict.
"""

from __future__ import annotations

from typing import Any


def enable_fsdp_on_cpu() -> None:
    """Patches ``accelerate.state.AcceleratorState`` so that an FSDP plugin is honoured on CPU.

    Call it before the Trainer is built, in every process.

    >>> from tests.fsdp_cpu import enable_fsdp_on_cpu
    >>> enable_fsdp_on_cpu()  # then TrainingArguments(use_cpu=True, fsdp=True, fsdp_config={"version": 2})
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType

    if getattr(state.AcceleratorState.__init__, "_clm_fsdp_on_cpu", False):
        return
    original = state.AcceleratorState.__init__

    def init(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    init._clm_fsdp_on_cpu = True
    state.AcceleratorState.__init__ = init


def fsdp2_arguments(model: Any, *, reshard_after_forward: bool = True) -> dict[str, Any]:
    """``TrainingArguments`` fields for FSDP2 with one shard unit per decoder block of ``model``.

    ``reshard_after_forward=False`` keeps every block's unsharded weights after a forward pass
    without backward (evaluation), as FSDP2 always does for the root module.
    """
    blocks = sorted(set(getattr(model, "_no_split_modules", None) or []))
    config: dict[str, Any] = {"version": 2, "reshard_after_forward": reshard_after_forward}
    if blocks:
        config["transformer_layer_cls_to_wrap"] = blocks
    return {"fsdp": True, "fsdp_config": config}
