"""PackNet (Mallya & Lazebnik 2018, https://arxiv.org/abs/1711.05769): several tasks packed into
one network by iterative pruning.

Each task trains only the weights no earlier task owns. After the task, the weights it trained are
pruned by magnitude, layer by layer: the smallest ``prune_percentage`` of them are set to zero and
stay free for later tasks, the rest are retrained briefly and then belong to the task for good.
Evaluating task ``t`` later zeroes the weights of tasks after ``t`` (and the free ones), which
gives back exactly the network task ``t`` ended with: old tasks cannot be forgotten (BWT = 0), at
the price of a shrinking share of the network for each new task.

Bookkeeping is one ``uint8`` tensor per prunable weight, whatever the number of tasks:
``0`` = free, ``k`` = owned by the task of index ``k - 1``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..sharding import all_reduce_sum_like, is_dtensor, like_param, local_part, reshard, shard_like
from .base import Strategy, StrategyConfig, TaskInfo, check_range, register_strategy, unwrap_model

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import ContinualTrainer

logger = logging.getLogger(__name__)

FREE = "free"
_MAX_TASKS = 255  # owners are stored in uint8, 0 meaning free
# Below this share of fixed weights in a tensor, they are restored by index rather than by a
# masked select of a full copy (measured on the CPU, benchmarks/step_overhead.py).
_INDEX_RESTORE_MAX_SHARE = 0.5


class PackNetCapacityError(RuntimeError):
    """Raised when a new task starts and every prunable weight already belongs to an earlier task."""


@dataclass
class PackNetConfig(StrategyConfig):
    """Settings of :class:`PackNet`.

    Args:
        prune_percentage (`float`): Share of the weights a task trained that are pruned (set to
            zero and left free for later tasks) after the task, in (0, 1). The task keeps the
            rest, so task ``k`` owns about ``(1 - p) * p**k`` of the prunable weights.
        use_magnitude_pruning (`bool`): Prune the smallest weights by absolute value, per layer
            (the paper's rule). ``False`` prunes a random subset of the same size (an ablation).
        retrain_epochs (`float`): Epochs of retraining of the surviving weights after pruning,
            on the task's own rows, with a fresh optimizer. ``0`` skips retraining.
        prunable (`str` or `list[str]`): Which weights are packed. ``"auto"``: the 2-D weights of
            every ``nn.Linear`` and HF ``Conv1D`` module that trains, except the input and output
            embeddings (``lm_head``). Or a list of regular expressions: every trainable parameter
            with 2 or more dimensions whose name matches one of them (``re.search``).
        seed (`int`): Seed of random pruning (``use_magnitude_pruning=False``).

    Example:

    >>> from clm_hf.strategies.packnet import PackNetConfig
    >>> config = PackNetConfig(prune_percentage=0.5, prunable=["mlp"])  # regular expressions
    >>> config.prune_percentage, config.prunable
    (0.5, ['mlp'])
    """

    aliases = {"prune_ratio": "prune_percentage", "prune_fraction": "prune_percentage",
               "magnitude_pruning": "use_magnitude_pruning", "post_prune_epochs": "retrain_epochs"}

    prune_percentage: float = field(default=0.75, metadata={"help": "Share of a task's weights pruned after it, in (0, 1)."})
    use_magnitude_pruning: bool = field(default=True, metadata={"help": "Prune by magnitude per layer (else at random)."})
    retrain_epochs: float = field(default=1.0, metadata={"help": "Epochs of retraining after pruning (0 = none)."})
    prunable: Any = field(default="auto", metadata={"help": "'auto' or a list of regexes over parameter names."})
    seed: int = field(default=0, metadata={"help": "Seed of random pruning."})

    def validate(self) -> None:
        check_range("prune_percentage", self.prune_percentage, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_range("retrain_epochs", self.retrain_epochs, low=0.0)
        if isinstance(self.prunable, str):
            if self.prunable != "auto":
                raise ValueError(f"prunable must be 'auto' or a list of regular expressions, got {self.prunable!r}.")
            return
        if not isinstance(self.prunable, (list, tuple)) or not self.prunable or not all(isinstance(p, str) for p in self.prunable):
            raise ValueError(f"prunable must be 'auto' or a non-empty list of regular expressions, got {self.prunable!r}.")
        self.prunable = list(self.prunable)  # a tuple would not compare equal after a JSON round trip
        for pattern in self.prunable:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"prunable pattern {pattern!r} is not a valid regular expression: {err}.") from None


@register_strategy
class PackNet(Strategy):
    """Pack tasks into one network: train free weights, prune, retrain, freeze; mask at evaluation.

    What is packed and what is frozen:

    - **Prunable** weights (see ``prunable``; by default the 2-D weights of the ``nn.Linear`` /
      ``Conv1D`` layers, e.g. GPT-2's ``c_attn``/``c_proj``/``c_fc``, Llama's ``q/k/v/o_proj``
      and ``gate/up/down_proj``, T5's ``q/k/v/o``/``wi``/``wo``) are shared out between tasks.
      While task ``t`` trains, the weights earlier tasks own get a zero gradient and are put back
      to their saved values after every optimizer step (AdamW's weight decay and momentum would
      otherwise move them); the free weights train.
    - **Every other trainable parameter** (embeddings, ``lm_head``, biases, norms, T5's relative
      position buckets) is trained with the first task and frozen (``requires_grad=False``) from
      the second task on, as in the paper (which froze biases and batch norms after task 1).
      They stay frozen after the stream. A module without bias (Llama, T5) simply has none.

    After each task: prune (per layer, the ``prune_percentage`` smallest of the weights the task
    trained are set to 0 and stay free), retrain the survivors for ``retrain_epochs`` with pruned
    weights held at exactly 0, then give the survivors to the task. ``use_task(model, task)``
    zeroes the weights of later tasks and the free ones, so every old task is scored with the
    exact network it ended with (BWT = 0). When no free weight is left for a new task,
    ``prepare_model`` raises :class:`PackNetCapacityError`.

    The share of the prunable weights each task owns is :meth:`parameter_usage`, and is written
    after every task to ``trainer.results.metadata["parameter_usage"]``, which ``clm-hf report``
    draws as ``packnet_parameter_usage.png``.

    Args:
        config ([`PackNetConfig`], *optional*): Or pass its fields as keyword arguments.

    Example:

    >>> from clm_hf.strategies.packnet import PackNet
    >>> packnet = PackNet(prune_percentage=0.75, use_magnitude_pruning=True)
    >>> packnet.config.retrain_epochs
    1.0

    Reference: Mallya & Lazebnik, *PackNet: Adding Multiple Tasks to a Single Network by Iterative
    Pruning*, CVPR 2018, https://arxiv.org/abs/1711.05769.
    """

    name = "packnet"
    config_class = PackNetConfig
    # Under FSDP2 the ownership tensors are DTensors sharded like their weights; every mask, hold
    # and restore works on the local shard, and pruning thresholds are found over the whole weight.
    supports_fsdp = True
    # Under DeepSpeed ZeRO-2 the masks and held values are cut like the partitions (edit_zero_gradients,
    # edit_zero_master_weights); ZeRO-3 stays refused (it partitions the weights PackNet prunes whole).

    def __init__(self, config: PackNetConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        # name -> uint8 owner tensor (0 = free, k = the task of index k - 1), one per prunable weight.
        self.ownership: dict[str, torch.Tensor] = {}
        # Trainable non-prunable parameters: trained with the first task, frozen afterwards.
        self.shared_names: list[str] = []
        # The tasks packed so far, in order: {"index", "task_id", "name"}.
        self.packed: list[dict[str, Any]] = []
        # (parameter, fixed mask, values to hold at the fixed positions) while a phase trains. The
        # values are None for a weight held by index (see _hold): its values are in _indexed.
        self._guard: dict[str, tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]] = {}
        self._indexed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (flat indices, values)
        self._pruned: dict[str, torch.Tensor] = {}  # during retraining: the weights held at 0
        self.phase: str | None = None  # "train" or "retrain" while a task is in progress
        # Under DeepSpeed ZeRO-2: (kind, id(optimizer), group) -> (weak ref to the optimizer, the fixed mask, or
        # the mask and held values, cut like that partition), for the phase's _guard; emptied with it.
        self._zero_cuts: dict[tuple, tuple] = {}
        self._pending_frozen: dict[str, torch.Tensor] | None = None

    # --- which weights ------------------------------------------------------------------------
    def select_prunable(self, model: nn.Module) -> list[str]:
        """Names of the parameters ``prunable`` selects in ``model`` (see [`PackNetConfig`])."""
        bare = unwrap_model(model)
        named = dict(bare.named_parameters())
        if self.config.prunable == "auto":
            from transformers.pytorch_utils import Conv1D

            embeddings = set()
            for getter in ("get_input_embeddings", "get_output_embeddings"):
                module = getattr(bare, getter, lambda: None)()
                if module is not None and getattr(module, "weight", None) is not None:
                    embeddings.add(id(module.weight))
            chosen = set()
            for module in bare.modules():
                weight = getattr(module, "weight", None)
                if (isinstance(module, (nn.Linear, Conv1D)) and isinstance(weight, nn.Parameter) and weight.ndim == 2
                        and weight.requires_grad and id(weight) not in embeddings):
                    chosen.add(id(weight))
            names = [n for n, p in named.items() if id(p) in chosen]
        else:
            patterns = [re.compile(p) for p in self.config.prunable]
            names = [n for n, p in named.items()
                     if p.requires_grad and p.ndim >= 2 and any(pat.search(n) for pat in patterns)]
        if not names:
            raise ValueError(
                f"PackNet found no prunable weight in {type(bare).__name__} with prunable={self.config.prunable!r} "
                "(it needs trainable nn.Linear/Conv1D weights, or a pattern matching trainable 2-D parameters)."
            )
        return names

    def _parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        # After a forward without backward (evaluation) FSDP2 may still hold unsharded plain copies
        # in the parameters' places: reshard, so that these are the DTensor parameters themselves.
        named = dict(reshard(unwrap_model(model)).named_parameters())
        missing = [n for n in self.ownership if n not in named]
        if missing:
            raise ValueError(f"PackNet owns weights the model does not have: {missing[:5]}. Use the same architecture.")
        for name, own in self.ownership.items():
            if own.shape != named[name].shape:
                raise ValueError(f"PackNet's ownership of '{name}' has shape {tuple(own.shape)}, "
                                 f"the model's weight {tuple(named[name].shape)}.")
            if own.device != named[name].device:
                self.ownership[name] = own = own.to(named[name].device)
            if is_dtensor(named[name]) and not is_dtensor(own):
                # Built (or loaded) whole before FSDP2 sharded the model: keep this rank's slice.
                self.ownership[name] = shard_like(own, named[name])
        return {n: named[n] for n in self.ownership}

    # --- lifecycle ------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, task: TaskInfo) -> nn.Module:
        bare = unwrap_model(model)
        if not self.ownership:
            names = self.select_prunable(bare)
            named = dict(bare.named_parameters())
            self.ownership = {n: torch.zeros(named[n].shape, dtype=torch.uint8, device=named[n].device) for n in names}
            self.shared_names = [n for n, p in named.items() if p.requires_grad and n not in self.ownership]
        params = self._parameters(bare)
        if task.index + 1 > _MAX_TASKS:
            raise PackNetCapacityError(f"PackNet stores owners in uint8 and packs at most {_MAX_TASKS} tasks.")
        free = sum(int(all_reduce_sum_like((local_part(own) == 0).sum(), own)) for own in self.ownership.values())
        if free == 0:
            total = sum(own.numel() for own in self.ownership.values())
            raise PackNetCapacityError(
                f"PackNet has no free weight left for task '{task.name}': the {len(self.packed)} task(s) packed so far "
                f"({', '.join(t['name'] for t in self.packed)}) own all {total} prunable weights. Use a lower "
                f"prune_percentage (now {self.config.prune_percentage}) so that each task keeps less of the network, "
                "or a larger model."
            )
        if self.packed:  # from the second task on, only the free prunable weights train
            named = dict(bare.named_parameters())
            for name in self.shared_names:
                if name in named:
                    named[name].requires_grad_(False)
        logger.info("clm-hf PackNet: task '%s' trains %d free weights (%.1f%% of %d prunable).", task.name, free,
                    100.0 * free / sum(p.numel() for p in params.values()), sum(p.numel() for p in params.values()))
        return model

    def before_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        params = self._parameters(trainer.model)
        pending, self._pending_frozen = self._pending_frozen, None
        self._guard, self._indexed, self._zero_cuts = {}, {}, {}
        with torch.no_grad():
            for name, p in params.items():
                fixed = local_part(self.ownership[name]) != 0
                if not bool(fixed.any()):
                    continue
                if task.resumed and pending is not None and name in pending:
                    # The values the interrupted run held: also where the mid-task weights hold them.
                    held, weight = pending[name], local_part(p)
                    if held.shape == p.shape:  # saved sharded: shaped like the weight (see state_dict)
                        torch.where(fixed, local_part(held).to(device=weight.device, dtype=weight.dtype), weight, out=weight)
                    else:
                        weight.masked_scatter_(fixed, held.to(device=weight.device, dtype=weight.dtype))
                self._hold(name, p, fixed)
        self.phase = "train"

    def _hold(self, name: str, p: nn.Parameter, fixed: torch.Tensor) -> None:
        """Hold ``p`` at its current values where ``fixed`` is set, for the phase about to train.

        When fixed weights are a minority, ``after_optimizer_step`` puts them back by index (an
        ``index_put_`` of their values), which moves a fraction of the data a full masked select
        moves: about 3x faster when a quarter of the weights are fixed (the second task), and
        smaller (8 + 4 bytes per fixed weight instead of 4 + 1 per weight). Otherwise it keeps a
        full copy and selects with ``torch.where``. Both restore the values exactly.
        """
        self._indexed.pop(name, None)
        weight = local_part(p).detach()  # under FSDP2 ``fixed`` and the held values are this rank's shard
        share = float(fixed.sum()) / max(fixed.numel(), 1)
        if share < _INDEX_RESTORE_MAX_SHARE and weight.is_contiguous():
            index = fixed.reshape(-1).nonzero().squeeze(1)
            self._indexed[name] = (index, weight.reshape(-1)[index].clone())
            self._guard[name] = (p, fixed, None)
        else:
            self._guard[name] = (p, fixed, weight.clone())

    def _held_values(self, name: str) -> torch.Tensor:
        """A tensor shaped like the weight whose fixed positions hold the values it is held at."""
        p, _, values = self._guard[name]
        if values is not None:
            return values
        index, held = self._indexed[name]
        weight = local_part(p).detach()
        return weight.reshape(-1).clone().index_put_((index,), held).view_as(weight)

    def edit_gradients(self, model: nn.Module) -> None:
        # g - g * fixed: 0 at the fixed weights and g elsewhere (exactly, for finite g), in one
        # fused pass over all the weights; a bool masked_fill_ per weight is several times slower
        # on the CPU (benchmarks/step_overhead.py, docs/benchmarks.md).
        pairs = [(local_part(p.grad), fixed) for p, fixed, _ in self._guard.values() if p.grad is not None]
        if pairs:
            grads, masks = [g for g, _ in pairs], [m for _, m in pairs]
            torch._foreach_addcmul_(grads, grads, masks, value=-1.0)

    def after_optimizer_step(self, model: nn.Module) -> None:
        # Zero gradients are not enough: decoupled weight decay and Adam's momentum still move
        # a weight whose gradient is 0, so the fixed weights are put back after every step.
        with torch.no_grad():
            for name, (p, fixed, values) in self._guard.items():
                weight = local_part(p)  # fetched at every step: FSDP2 may re-home the shard at its lazy init
                if values is None:
                    index, held = self._indexed[name]
                    weight.view(-1).index_put_((index,), held)
                else:
                    torch.where(fixed, values, weight, out=weight)

    # --- DeepSpeed ZeRO-2: the same mask and hold, on this rank's partitions -------------------------
    def edit_zero_gradients(self, model: nn.Module, gradients: Any) -> None:
        # edit_gradients on this rank's partition of the reduced gradient, before DeepSpeed's clipping.
        cut = self._zero_cut(gradients, with_values=False)
        if cut is not None:
            flat = gradients.read()
            gradients.write(flat.masked_fill_(cut[0], 0.0))

    def edit_zero_master_weights(self, model: nn.Module, master: Any) -> None:
        # after_optimizer_step on the fp32 master partition: DeepSpeed copies it over the model's weights
        # after every step, so a hold written into the model alone would be undone at the next step.
        cut = self._zero_cut(master, with_values=True)
        if cut is not None:
            torch.where(cut[0], cut[1], master.weights, out=master.weights)

    def _zero_cut(self, partition: Any, with_values: bool) -> tuple[torch.Tensor, ...] | None:
        """The held weights' mask (and, ``with_values``, their held values) cut like ``partition``.

        ``partition`` is a ZeRO-2 :class:`~clm_hf.deepspeed_support.Zero2GradientPartition` or
        :class:`~clm_hf.deepspeed_support.Zero2MasterPartition`; the cut is kept for the phase (the
        engine's layout and the held values do not change inside it). ``None`` when nothing is held.
        """
        if not self._guard:
            return None
        optimizer = partition.optimizer
        key = (with_values, id(optimizer), getattr(partition, "group_no", None))
        hit = self._zero_cuts.get(key)
        if hit is not None and hit[0]() is optimizer:
            return hit[1]
        names = list(self._guard)
        params = [self._guard[n][0] for n in names]
        device = params[0].device
        mask = partition.slice_rows([self._guard[n][1].unsqueeze(0) for n in names], params,
                                    torch.empty(1, partition.numel, dtype=torch.bool, device=device))[0]
        cut: tuple[torch.Tensor, ...] = (mask,)
        if with_values:
            values = partition.slice_rows([self._held_values(n).unsqueeze(0) for n in names], params,
                                          torch.empty(1, partition.numel, dtype=partition.weights.dtype, device=device))
            cut = (mask, values[0])
        self._zero_cuts[key] = (weakref.ref(optimizer), cut)
        return cut

    def after_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        params = self._parameters(trainer.model)
        owner = task.index + 1
        kept: dict[str, torch.Tensor] = {}
        pruned: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in params.items():
                candidates = local_part(self.ownership[name]) == 0  # the weights this task trained
                mask = self._prune_mask(p, candidates, task.index)
                local_part(p).masked_fill_(mask, 0.0)
                pruned[name], kept[name] = mask, candidates & ~mask
        if self.config.retrain_epochs > 0 and any(bool(k.any()) for k in kept.values()):
            # Retrain the survivors with both the earlier tasks' weights and the pruned ones held.
            self._guard, self._indexed, self._zero_cuts = {}, {}, {}
            with torch.no_grad():
                for name, p in params.items():
                    fixed = (local_part(self.ownership[name]) != 0) | pruned[name]
                    if bool(fixed.any()):
                        self._hold(name, p, fixed)
            self._pruned, self.phase = pruned, "retrain"
            try:
                trainer.run_training_phase(task.train_dataset, num_epochs=self.config.retrain_epochs,
                                           phase="packnet-retrain")
            finally:
                self._pruned = {}
        for name, own in self.ownership.items():
            local_part(own).masked_fill_(kept[name], owner)
        self.packed.append({"index": task.index, "task_id": task.task_id, "name": task.name})
        self._guard, self._indexed, self._zero_cuts, self.phase = {}, {}, {}, None
        usage = self.parameter_usage()
        logger.info("clm-hf PackNet: after task '%s', parameter usage %s", task.name,
                    {k: round(v, 4) for k, v in usage.items()})
        self._record_usage(trainer)

    def _prune_mask(self, p: torch.Tensor, candidates: torch.Tensor, task_index: int) -> torch.Tensor:
        """The ``floor(prune_percentage * n)`` candidates to prune: smallest |w|, or random ones.

        ``candidates`` and the returned mask are shaped like ``p``'s local shard under FSDP2, where
        ``n`` and the choice are over the whole weight (:func:`_smallest_over_shards`)."""
        count = int(all_reduce_sum_like(candidates.sum(), p))  # over every shard
        n_prune = math.floor(self.config.prune_percentage * count)
        mask = torch.zeros_like(candidates)
        if n_prune == 0:
            return mask
        if self.config.use_magnitude_pruning:
            scores = local_part(p).detach().abs().float()
        else:
            generator = torch.Generator().manual_seed(self.config.seed + 7919 * (task_index + 1) + p.numel())
            # The whole weight's draw on every rank, each keeping its slice: the one-process draw.
            scores = local_part(shard_like(torch.rand(p.shape, generator=generator), p)).to(local_part(p).device)
        if is_dtensor(p):
            return _smallest_over_shards(scores, candidates, n_prune, p)
        # Weights owned by earlier tasks score +inf: never among the smallest n_prune.
        scores = scores.masked_fill(~candidates, math.inf)
        smallest = torch.topk(scores.flatten(), n_prune, largest=False, sorted=False).indices
        mask.view(-1)[smallest] = True
        return mask

    # --- evaluation -----------------------------------------------------------------------------
    def use_task(self, model: nn.Module, task: TaskInfo) -> contextlib.AbstractContextManager:
        """Zero the weights of tasks after ``task`` and the free ones; put them back exactly on exit.

        A task PackNet has not packed (yet) sees the model as it is.
        """
        if not any(t["index"] == task.index for t in self.packed):
            return contextlib.nullcontext()
        return self._masked(model, task.index + 1)

    @contextlib.contextmanager
    def _masked(self, model: nn.Module, owner: int) -> Iterator[None]:
        hidden: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, p in self._parameters(model).items():
                    own, weight = local_part(self.ownership[name]), local_part(p)  # this rank's shard under FSDP2
                    hide = (own == 0) | (own > owner)
                    if bool(hide.any()):
                        hidden.append((p, hide, weight[hide].clone()))
                        weight.masked_fill_(hide, 0.0)
            yield
        finally:
            with torch.no_grad():
                for p, hide, values in hidden:
                    local_part(p).masked_scatter_(hide, values)
            # FSDP2 may keep unsharded copies of the masked weights after the evaluation's forward
            # (the root's, or all with reshard_after_forward=False): a later forward must not reuse them.
            reshard(unwrap_model(model))

    # --- reporting ------------------------------------------------------------------------------
    def parameter_usage(self) -> dict[str, float]:
        """Share of the prunable weights owned by each packed task (by name, in order) and ``"free"``.

        >>> PackNet().parameter_usage()
        {}
        """
        if not self.ownership:
            return {}
        total = sum(own.numel() for own in self.ownership.values())
        counts = torch.zeros(_MAX_TASKS + 1, dtype=torch.long)
        for own in self.ownership.values():
            counts += torch.bincount(local_part(own).flatten().long().cpu(), minlength=_MAX_TASKS + 1)
        sharded = next((own for own in self.ownership.values() if is_dtensor(own)), None)
        if sharded is not None:  # every ownership tensor is sharded alike: one sum of the counts over the ranks
            counts = all_reduce_sum_like(counts, sharded)
        usage = {t["name"]: int(counts[t["index"] + 1]) / total for t in self.packed}
        usage[FREE] = int(counts[0]) / total
        return usage

    def _record_usage(self, trainer: ContinualTrainer) -> None:
        """``results.metadata["parameter_usage"]``: after each packed task, the shares of every task
        of the results (in ``results.task_names`` order) at that stage; free = 1 - their sum."""
        results = getattr(trainer, "results", None)
        if results is None:
            return
        shares = self.parameter_usage()
        history: dict[str, list[float]] = {}
        for stage, done in enumerate(self.packed):
            owned_then = {t["name"]: shares[t["name"]] for t in self.packed[: stage + 1]}
            history[done["name"]] = [owned_then.get(name, 0.0) for name in results.task_names]
        results.metadata["parameter_usage"] = history

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "ownership": dict(self.ownership),
            "shared_names": list(self.shared_names),
            "packed": [dict(t) for t in self.packed],
        }
        if self.phase is not None and self._guard:
            # Mid-task: the values the earlier tasks' weights are held at (owned positions only).
            state["frozen"] = {n: self._frozen_values(n) for n in self._guard}
        return state

    def _frozen_values(self, name: str) -> torch.Tensor:
        """The values the owned weights of ``name`` are held at: those positions' values in a 1-D
        tensor, or, under FSDP2, a DTensor sharded like the weight holding them (0 elsewhere)."""
        p, held, own = self._guard[name][0], self._held_values(name), local_part(self.ownership[name])
        if not is_dtensor(p):
            return held[own != 0]
        return like_param(torch.where(own != 0, held, torch.zeros_like(held)), p)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ownership = {n: t.to(torch.uint8) for n, t in state.get("ownership", {}).items()}
        self.shared_names = list(state.get("shared_names", []))
        self.packed = [dict(t) for t in state.get("packed", [])]
        self._pending_frozen = dict(state["frozen"]) if state.get("frozen") else None
        self._guard, self._indexed, self._pruned, self._zero_cuts, self.phase = {}, {}, {}, {}, None


def _smallest_over_shards(scores: torch.Tensor, candidates: torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the mask of the ``count`` smallest candidate ``scores`` of a sharded weight.

    The scores are non-negative floats (``|w|`` or uniform draws) of this rank's shard of ``like``
    (a DTensor sharded on dimension 0). Their float32 bit patterns, read as integers, sort like the
    values, so the ``count``-th smallest value over all shards is found exactly by bisection on
    those integers: 31 rounds, each an all-reduced count of candidates at or below the midpoint; no
    score leaves its rank. Every candidate below it is pruned, and of those equal to it, the first
    ones in the weight's flat order (lower ranks first) until ``count`` are: the same set as a
    ``topk`` over the whole weight when the values are distinct (among ties, ``topk``'s choice is
    unspecified).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    if like.device_mesh.ndim != 1 or like.placements != (Shard(0),):
        raise NotImplementedError(f"PackNet prunes FSDP2 weights sharded on dimension 0 over a 1-D mesh; got "
                                  f"placements {like.placements} on a {like.device_mesh.ndim}-D mesh.")
    bits = scores.float().contiguous().view(torch.int32)[candidates].long()

    def below(limit: int) -> int:
        return int(all_reduce_sum_like((bits <= limit).sum(), like))

    low, high = 0, 0x7FFFFFFF  # every non-negative float32 (NaN included) lies in between
    while low < high:  # the smallest bit pattern t with at least ``count`` candidates <= t
        mid = (low + high) // 2
        if below(mid) >= count:
            high = mid
        else:
            low = mid + 1
    all_bits = scores.float().contiguous().view(torch.int32).long()
    mask = candidates & (all_bits < low)
    ties = candidates & (all_bits == low)
    missing = count - int(all_reduce_sum_like(mask.sum(), like))
    # Ties go in the weight's flat order: the shards of lower mesh coordinates come first.
    mesh = like.device_mesh
    tie_counts = [torch.zeros(1, dtype=torch.long, device=scores.device) for _ in range(mesh.size())]
    dist.all_gather(tie_counts, ties.sum().reshape(1), group=mesh.get_group())
    earlier = sum(int(c) for c in tie_counts[: mesh.get_local_rank()])
    take = max(0, min(missing - earlier, int(tie_counts[mesh.get_local_rank()])))
    if take:
        mask.view(-1)[ties.reshape(-1).nonzero().squeeze(1)[:take]] = True
    return mask
