"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796),
with the online variant of Schwarz et al. 2018 (https://arxiv.org/abs/1805.06370).

After each task, EWC estimates the diagonal of the Fisher information F from per-sample
gradients of each row's answer log-likelihood ``log p(answer | prompt)``, and keeps the weights θ* it ended with. While later tasks train,
it adds λ/2 · Σ F · (θ − θ*)² over the trainable parameters, so weights that mattered for old
tasks move less.

- ``mode="separate"`` keeps one (F, θ*) pair per task: memory grows with the number of tasks.
- ``mode="online"`` keeps one running F* ← γ·F* + F_task and the latest θ*: 8 bytes per
  parameter (two fp32 tensors) whatever the number of tasks. As in Schwarz et al. (eq. 4), the
  next task is penalised with γ·F*, so the newest task's Fisher is decayed once as well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..deepspeed_support import (Zero3QuadraticPenalty, gather_partition, gathered_without_hooks, is_zero3_run, slice_partition,
                                 zero3_parameters)
from ..modeling import decoder_inputs, is_seq2seq, unwrap_model
from ..sharding import all_reduce_sum_like, any_dtensor, like_param, local_part, reshard
from ._functional import FunctionalModel, batchable_attention, no_padding_warning
from ._row_gradients import SquareSumSink, check_hooked, hooked_group_gradients, row_gradient_modules
from .base import Strategy, StrategyConfig, TaskInfo, check_range, eval_mode, register_strategy, trainable_parameters

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

    from ..trainer import ContinualTrainer

logger = logging.getLogger(__name__)


# EWCConfig.state_dtype -> (dtype of the Fisher, dtype of the anchor).
STATE_DTYPES = {"float32": (torch.float32, torch.float32), "bfloat16": (torch.bfloat16, torch.bfloat16),
                "bfloat16_fisher": (torch.bfloat16, torch.float32)}
# On the CPU, edit_gradients takes tensors of fewer elements than this (64 KiB in fp32: biases, norms,
# small embeddings) through two fused _foreach calls, and the larger ones one at a time (see there).
FOREACH_MAX_NUMEL = 16384


@dataclass
class EWCConfig(StrategyConfig):
    """Settings of :class:`EWC`.

    Args:
        ewc_lambda (`float`): Strength λ of the penalty (alias ``lambda``). The Fisher of a
            language model is small per weight, so useful values are large. The default, 1000,
            cut forgetting on a natural-language topic stream (BWT −0.66 → −0.21, ACC 0.46 → 0.72
            over 3 seeds; ``benchmarks/nl_stream.py``, docs/strategies.md); tune it per model.
        mode (`str`): ``"online"`` (one running Fisher, constant memory) or ``"separate"``
            (one Fisher and anchor per task).
        gamma (`float`): Decay of the old Fisher in online mode, in [0, 1]: the running Fisher is
            F* ← γ·F* + F_task and the penalty uses γ·F* (Schwarz et al. 2018, eq. 4), so
            ``gamma=0`` turns the online penalty off. Ignored by ``mode="separate"``.
        fisher_samples (`int`): At most this many rows of the task estimate the Fisher.
        fisher_batch_size (`int`): Rows per vectorised per-sample-gradient pass (bounds memory).
        fisher_type (`str`): ``"true"`` (default): gradients of the log-likelihood of answers
            sampled from the model itself, the Fisher of the paper; ``"empirical"``: gradients of
            the dataset's own answers. The empirical Fisher vanishes on rows the model already
            fits, so it underestimates what matters (Kunstner et al. 2019,
            https://arxiv.org/abs/1905.12558).
        fisher_method (`str`): ``"hooks"`` (one plain forward and backward per batch, each layer's
            per-row gradients rebuilt from its input and output gradient and squared into the
            Fisher; models whose trainable weights are all in ``nn.Linear``, ``Conv1D``,
            ``nn.LayerNorm`` or ``nn.Embedding`` layers, e.g. GPT-2), ``"vmap"`` (torch.func
            per-sample gradients), ``"loop"`` (one backward per row) or ``"auto"`` (the hooks where
            they apply, checked once per task against the loop on two rows, else vmap, falling back
            to the loop if the model cannot be vmapped; see :func:`estimate_fisher`).
        seed (`int`): Seed of the choice of Fisher rows and of the answers the true Fisher samples
            (inverse-CDF draws from the model's own next-token distribution, taken from the same
            forward pass that gives the gradient: one forward per row).
        state_dtype (`str`): The dtype the Fisher and the anchor are kept (and checkpointed) in:
            ``"float32"`` (default, 8 bytes per trainable parameter online), ``"bfloat16_fisher"``
            (a bf16 Fisher and an fp32 anchor: 6 bytes) or ``"bfloat16"`` (both bf16: 4 bytes). The
            penalty and its gradient are accumulated in fp32 in every case, and the Fisher is
            estimated (online: decayed and summed) in fp32 and rounded once when stored. A bf16
            Fisher is harmless (a relative error of at most 2⁻⁸ per weight); a bf16 anchor is not:
            θ* moves by up to 2⁻⁸·|θ*|, so the penalty pulls towards a rounded point, a gradient
            error of 15% of the penalty's gradient on the tiny model of docs/strategies.md against
            0.17% for ``"bfloat16_fisher"``.

    Example:

    >>> from clm_hf.strategies.ewc import EWCConfig
    >>> config = EWCConfig.from_dict({"lambda": 500.0, "mode": "separate"})  # the config-dict alias of ewc_lambda
    >>> config.ewc_lambda, config.mode, config.fisher_method
    (500.0, 'separate', 'auto')
    """

    aliases = {"lambda": "ewc_lambda", "lambda_": "ewc_lambda", "ewc_mode": "mode"}

    ewc_lambda: float = field(default=1000.0, metadata={"help": "Penalty strength λ."})
    mode: str = field(default="online", metadata={"help": "'online' or 'separate'."})
    gamma: float = field(default=1.0, metadata={"help": "Online decay of the old Fisher, in [0, 1]."})
    fisher_samples: int = field(default=256, metadata={"help": "Max rows used to estimate the Fisher."})
    fisher_batch_size: int = field(default=16, metadata={"help": "Rows per per-sample-gradient pass."})
    fisher_type: str = field(default="true", metadata={"help": "'true' (sampled answers) or 'empirical'."})
    fisher_method: str = field(default="auto", metadata={"help": "'hooks', 'vmap', 'loop' or 'auto'."})
    seed: int = field(default=0, metadata={"help": "Seed of the Fisher rows and of the sampled answers."})
    state_dtype: str = field(default="float32",
                             metadata={"help": "'float32', 'bfloat16_fisher' or 'bfloat16': dtype of the Fisher and anchor."})

    def validate(self) -> None:
        check_range("ewc_lambda", self.ewc_lambda, low=0.0)
        if self.mode not in ("online", "separate"):
            raise ValueError(f"EWC mode must be 'online' or 'separate', got {self.mode!r}.")
        check_range("gamma", self.gamma, low=0.0, high=1.0)
        check_range("fisher_samples", self.fisher_samples, low=1)
        check_range("fisher_batch_size", self.fisher_batch_size, low=1)
        if self.fisher_type not in ("true", "empirical"):
            raise ValueError(f"fisher_type must be 'true' or 'empirical', got {self.fisher_type!r}.")
        if self.fisher_method not in ("auto", "hooks", "vmap", "loop"):
            raise ValueError(f"fisher_method must be 'auto', 'hooks', 'vmap' or 'loop', got {self.fisher_method!r}.")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"EWC state_dtype must be one of {sorted(STATE_DTYPES)}, got {self.state_dtype!r}.")


@register_strategy
class EWC(Strategy):
    """Elastic Weight Consolidation: a quadratic pull towards old weights, weighted by the Fisher.

    Args:
        config ([`EWCConfig`], *optional*): Or pass its fields as keyword arguments.

    Example:

    >>> from clm_hf import EWC
    >>> ewc = EWC(ewc_lambda=1000.0, mode="online", gamma=0.9)
    >>> ewc.config.mode
    'online'

    Reference: Kirkpatrick et al., *Overcoming catastrophic forgetting in neural networks*, PNAS
    2017, https://arxiv.org/abs/1612.00796; online EWC: Schwarz et al., *Progress & Compress*, ICML
    2018, https://arxiv.org/abs/1805.06370.
    """

    name = "ewc"
    config_class = EWCConfig
    # Under FSDP2 the Fisher and anchor are DTensors sharded like their parameters, the penalty is
    # the sum of the local parts, all-reduced (tests/test_fsdp.py: "ewc", "ewc-true", "ewc-separate").
    supports_fsdp = True
    # Under DeepSpeed ZeRO-3 the Fisher and anchor are this rank's flat slices of the partitioned
    # parameters, and the penalty is added inside each module's forward while ZeRO-3 has gathered
    # its weights (clm_hf/deepspeed_support.py; tests/test_deepspeed.py: "ewc", "ewc-separate").
    supports_partitioned_parameters = True
    # The penalty's gradient goes straight into ``.grad`` (edit_gradients) where gradients can be
    # edited; on DeepSpeed the penalty is a loss term instead (see setup).
    adds_loss_gradient = True

    def __init__(self, config: EWCConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        # True once setup() found gradients this strategy may edit: the penalty's gradient is then
        # added to ``.grad`` once per optimizer step instead of through every micro-batch's loss.
        # False outside a trainer (a hand-written loop calling ``loss``) and on DeepSpeed.
        self._direct = False
        self._scratch: list[torch.Tensor] | None = None
        # edit_gradients' CPU split (with _scratch): indices of the small fp32 tensors fused by _foreach, and the others.
        self._small: list[int] = []
        self._large: list[int] = []
        self._sharded = False
        # One (fisher, anchor) pair per term; online mode keeps a single term.
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        # Bound once per task (see _bind): the live parameters, and the Fisher and anchor they are
        # pulled towards, as aligned lists for one fused (torch._foreach_*) pass per step.
        self._params: list[nn.Parameter] = []
        self._fishers: list[torch.Tensor] = []
        self._anchors: list[torch.Tensor] = []
        self._offset: torch.Tensor | float = 0.0  # the constant part of a multi-term penalty
        self._zero3: Zero3QuadraticPenalty | None = None  # the forward hooks adding the penalty under ZeRO-3
        self._zero3_whole: list | None = None  # the gathered terms for state_dict, from after_task to the next step
        self._zero3_pending = None  # a hook binding on the first forward after ZeRO-3 partitioned the model

    def setup(self, trainer: ContinualTrainer) -> None:
        super().setup(trainer)
        from accelerate.utils import DistributedType

        # DeepSpeed steps its optimizer inside backward(), before any gradient edit could run.
        backend = getattr(getattr(trainer, "accelerator", None), "distributed_type", None)
        self._direct = backend != DistributedType.DEEPSPEED
        # Under ZeRO-3 each rank holds only its slices of F and θ*: mid-task checkpoints get the whole
        # terms gathered by every rank in before_save, before rank 0 writes them.

    # --- penalty ---------------------------------------------------------------------------
    def before_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        self._bind(trainer.model)

    def _bind(self, model: nn.Module) -> None:
        """Pair each live parameter with its Fisher and anchor once per task, not per step.

        Several terms (``mode="separate"``) are merged here into one:
        ``Σ_k F_k (θ − θ*_k)² = F̄ (θ − θ̄*)² + c`` with ``F̄ = Σ_k F_k``, the Fisher-weighted
        anchor ``θ̄* = Σ_k F_k θ*_k / F̄`` and the constant ``c = Σ_k F_k (θ*_k − θ̄*)²``, so
        the per-step cost does not grow with the number of tasks and the gradient,
        ``λ F̄ (θ − θ̄*) = λ Σ_k F_k (θ − θ*_k)``, is unchanged.
        """
        params = trainable_parameters(reshard(model))  # FSDP2: the DTensor parameters, not the root's unsharded copies
        self._params, self._fishers, self._anchors, self._offset = [], [], [], 0.0
        if self._zero3 is not None:
            self._zero3.remove()
            self._zero3 = None
        if self._zero3_pending is not None:
            self._zero3_pending.remove()
            self._zero3_pending = None
        self._scratch = None  # edit_gradients' CPU buffer, shaped like this binding's tensors
        self._sharded = any_dtensor(params.values())
        if not self.terms:
            return
        zero3 = bool(zero3_parameters(params))
        if not zero3 and self.trainer is not None and is_zero3_run(self.trainer):
            # ZeRO-3 partitions a model built whole when the task's train() builds the engine, after this
            # (a run resumed from a checkpoint): bind again at the first forward, before any module runs,
            # so that the per-module hooks exist for that very forward.
            unwrapped = unwrap_model(model)

            def bind_partitioned(module, args):
                if zero3_parameters(trainable_parameters(unwrapped)):
                    self._bind(unwrapped)

            self._zero3_pending = unwrapped.register_forward_pre_hook(bind_partitioned, prepend=True)
        if zero3:  # whole tensors (loaded from a checkpoint) become this rank's slices of the partitions
            def cut(name: str, tensor: torch.Tensor) -> torch.Tensor:
                whole = name in params and tuple(tensor.shape) == tuple(params[name].ds_shape)
                return slice_partition(tensor, params[name]) if whole else tensor

            self.terms = [tuple({n: cut(n, t) for n, t in part.items()} for part in term) for term in self.terms]
        # A parameter another strategy froze since (PackNet) cannot move, so its penalty term is a
        # constant: skipping it changes no gradient.
        offset = None
        for name in self.terms[0][0]:
            if name not in params:
                continue
            p = params[name]
            # Under FSDP2 the merge is element-wise on this rank's shards (local_part is the identity
            # on a plain tensor); only the constant is summed over the ranks, below.
            if len(self.terms) == 1:  # kept in the state dtype: the penalty upcasts tensor by tensor
                fisher = local_part(self.terms[0][0][name]).to(p.device)
                anchor = local_part(self.terms[0][1][name]).to(p.device)
            else:  # merged in fp32, then kept in the state dtype like a single term
                fishers = [local_part(fisher[name]).to(p.device, torch.float32) for fisher, _ in self.terms]
                anchors = [local_part(anchor[name]).to(p.device, torch.float32) for _, anchor in self.terms]
                fisher = torch.stack(fishers).sum(0)
                weighted = torch.stack([f * a for f, a in zip(fishers, anchors)]).sum(0)
                anchor = torch.where(fisher > 0, weighted / fisher.clamp_min(torch.finfo(fisher.dtype).tiny), anchors[-1])
                const = sum((f * (a - anchor).square()).sum() for f, a in zip(fishers, anchors))
                offset = const if offset is None else offset + const
                fisher, anchor = fisher.to(self._fisher_dtype), anchor.to(self._anchor_dtype)
            self._params.append(p)
            self._fishers.append(fisher)
            self._anchors.append(anchor)
        if offset is not None:
            self._offset = all_reduce_sum_like(offset, self._params[0])
            if zero3 and _world()[0] > 1:  # the slices' constants, summed over the ranks
                import torch.distributed as dist

                dist.all_reduce(self._offset, op=dist.ReduceOp.SUM)
        if zero3:
            self._zero3 = Zero3QuadraticPenalty(unwrap_model(model), self._params, self._fishers, self._anchors)

    def penalty(self) -> torch.Tensor:
        """λ/2 · Σ_terms Σ_params F · (θ − θ*)², differentiable in θ (0 before the first task ends);
        in online mode F is γ·F*, the decayed running Fisher.

        Computed by :class:`_QuadraticPenalty`: a handful of fused ``torch._foreach_*`` calls over
        all parameters at once, whose backward writes ``λ F (θ − θ*)`` directly.
        """
        if not self._params:
            return torch.zeros(())
        strength = self._strength()
        if self._zero3 is not None:  # the terms the last training forward's hooks added (ZeRO-3)
            self._zero3_whole = None  # training has started: the gathered copy for state_dict is stale
            total = self._zero3.penalty(0.5 * strength)
            return total + 0.5 * strength * self._offset if isinstance(self._offset, torch.Tensor) else total
        total = _QuadraticPenalty.apply(0.5 * strength, self._fishers, self._anchors, *self._params)
        if isinstance(self._offset, torch.Tensor):
            total = total + 0.5 * strength * self._offset
        return total

    def _strength(self) -> float:
        """λ, times γ in online mode (Schwarz et al. penalise with γ·F*, not F* itself)."""
        if self.config.mode == "online":
            return self.config.ewc_lambda * self.config.gamma
        return self.config.ewc_lambda

    def loss(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        """The penalty as a loss term, where its gradient cannot be added in :meth:`edit_gradients`
        (DeepSpeed, or outside a trainer); nothing otherwise.

        So under a trainer on a plain, DDP or FSDP2 backend the logged ``loss`` is the model's loss
        (plus other strategies' terms) without the penalty, and ``ewc_penalty`` is logged apart
        (:meth:`logged_values`); on DeepSpeed ``loss`` includes the penalty, also logged as ``ewc_penalty``.

        Example:

        >>> EWC().loss(None, {}, None)  # no Fisher yet: no term
        {}
        """
        if not self._params or self._direct:
            return {}
        return {"ewc_penalty": self.penalty()}

    def edit_gradients(self, model: nn.Module) -> None:
        """Add the penalty's gradient ``λ F (θ − θ*)`` to ``.grad``, once per optimizer step.

        The same gradient the autograd penalty gives (its share of each micro-batch's loss is
        divided by the accumulation steps, so the shares sum to one penalty), without an autograd
        node or any per-micro-batch work: two fused ``torch._foreach_*`` passes (θ − θ*, then
        ``grad += λ F (θ − θ*)``). The trainer calls it after accumulation and the DDP all-reduce
        (identical on every rank, so the all-reduce's mean would not change it), on unscaled fp16
        gradients and before clipping, so the clip norm includes it. Under FSDP2 each rank adds its
        shards' part to its gradient shards. A bf16 gradient gets the fp32 term, rounded once.
        """
        if not self._direct or not self._params:
            return
        strength = self._strength()
        with torch.no_grad():
            grads = [p.grad for p in self._params]
            if any(g is None for g in grads):  # no gradient reached it this step: the penalty's is the whole gradient
                for p in self._params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grads = [p.grad for p in self._params]
            thetas = self._params
            if self._sharded:
                grads, thetas = [local_part(g) for g in grads], [local_part(p) for p in thetas]
            if not thetas[0].is_cuda:
                # On the CPU the _foreach ops are a loop over the tensors anyway: one tensor at a time
                # through one reused fp32 scratch buffer (the largest tensor's size) allocates nothing
                # and keeps each tensor in cache between the two passes (tiny model: 0.11 vs 0.19 ms,
                # medium: 3.0 vs 3.8 ms, /tmp scratch timing at load 7).
                # Tensors under FOREACH_MAX_NUMEL elements (all fp32) go through two _foreach calls
                # instead: one call each for dozens of biases and norms, whose per-op dispatch outweighs
                # their arithmetic (tiny model, all its tensors: 0.102 -> 0.068 ms warm; medium, 50 of
                # its 76: 2.33 -> 2.15 ms; the same numbers; /tmp timing at load 6). Their differences
                # are allocated, small enough to come from the heap, where the large ones would be fresh
                # pages (medium all through _foreach: 8.4 ms).
                if self._scratch is None:
                    buffer = torch.empty(max(t.numel() for t in thetas), dtype=torch.float32, device=thetas[0].device)
                    self._scratch = [buffer[: t.numel()].view(t.shape) for t in thetas]
                    # .grad has its parameter's dtype: dtypes checked once per binding hold at every step.
                    self._small = [i for i, t in enumerate(thetas) if t.numel() < FOREACH_MAX_NUMEL and all(
                        x.dtype == torch.float32 for x in (t, self._anchors[i], self._fishers[i]))]
                    fused = set(self._small)
                    self._large = [i for i in range(len(thetas)) if i not in fused]
                if self._small:
                    small = self._small
                    diffs = torch._foreach_sub([thetas[i] for i in small], [self._anchors[i] for i in small])
                    torch._foreach_addcmul_([grads[i] for i in small], diffs, [self._fishers[i] for i in small], value=strength)
                for i in self._large:
                    theta, anchor, fisher, grad, scratch = thetas[i], self._anchors[i], self._fishers[i], grads[i], self._scratch[i]
                    diff = torch.sub(theta, anchor, out=scratch)  # in fp32
                    if grad.dtype == torch.float32:
                        grad.addcmul_(diff, fisher, value=strength)
                    else:  # computed in fp32, rounded once to the gradient's dtype
                        grad.add_(diff.mul_(fisher).mul_(strength))
                return
            thetas = [t if t.dtype == torch.float32 else t.float() for t in thetas]
            diffs = torch._foreach_sub(thetas, self._anchors)
            if all(g.dtype == torch.float32 for g in grads):
                torch._foreach_addcmul_(grads, diffs, self._fishers, value=strength)
                return
            torch._foreach_mul_(diffs, self._fishers)
            torch._foreach_mul_(diffs, strength)
            for grad, pull in zip(grads, diffs):
                grad.add_(pull)  # computed in fp32, rounded once to the gradient's dtype

    def logged_values(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``ewc_penalty`` at the weights of the logging step, when it is not a loss term (``_direct``)."""
        if not self._direct or not self._params:
            return {}
        with torch.no_grad():
            return {"ewc_penalty": self.penalty()}

    # --- Fisher ------------------------------------------------------------------------------
    def after_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        zero3 = bool(zero3_parameters(trainable_parameters(trainer.model)))
        if not zero3:
            self._after_task(trainer, task, zero3=False)
            return
        # ZeRO-3: the whole model is gathered on every rank, its hooks off, for the Fisher's vmapped
        # per-row gradients (gathered_without_hooks says why whole); the Fisher and anchor are then
        # cut to this rank's partition slices before the weights are re-partitioned.
        with gathered_without_hooks(unwrap_model(trainer.model)):
            self._after_task(trainer, task, zero3=True)
        self._bind(trainer.model)
        # The whole terms, gathered now (every rank runs after_task): the continual checkpoint that
        # follows is written by rank 0 alone and must not wait for a collective.
        self._zero3_whole = self._gathered_terms(trainer.model)

    def _gathered_terms(self, model: nn.Module) -> list:
        """The whole Fisher and anchor of every term, from every rank's ZeRO-3 slices (a collective)."""
        params = trainable_parameters(model)
        return [tuple({n: gather_partition(t, params[n]) for n, t in part.items()} for part in term)
                for term in self.terms]

    def _after_task(self, trainer: ContinualTrainer, task: TaskInfo, *, zero3: bool) -> None:
        model = trainer.model
        rows = task.train_dataset
        count = min(self.config.fisher_samples, len(rows))
        rows = rows.shuffle(seed=self.config.seed + task.index).select(range(count))
        # Under DDP every rank estimates on its own share of the chosen rows; the sums of squared
        # per-row gradients are all-reduced, then divided by the global row count: the same
        # Fisher as one process on all rows (never the square of a rank-averaged gradient).
        world, rank = _world()
        # Under FSDP2 (DTensor parameters) estimate_fisher splits the rows between the ranks itself
        # (it squares each row's gradient before FSDP2 sums them over the ranks) and draws the true
        # Fisher's samples as one process would: it gets all rows and one seed, and its shards are whole.
        sharded = any_dtensor(trainable_parameters(reshard(model)).values())
        if world > 1 and not sharded:
            rows = rows.shard(num_shards=world, index=rank, contiguous=True)
        fisher = estimate_fisher(
            model, rows,
            batch_size=self.config.fisher_batch_size,
            # ZeRO-3: never the loop's backward, which would run DeepSpeed's gradient hooks on the parameters.
            method="vmap" if zero3 else self.config.fisher_method,
            sampled=self.config.fisher_type == "true",
            seed=self.config.seed + task.index + (0 if sharded else 1_000_003 * rank),
            device=trainer.args.device, disable_progress=trainer.args.disable_tqdm, reduction="sum",
        )
        if world > 1 and not sharded:
            import torch.distributed as dist

            for value in fisher.values():
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
        torch._foreach_div_([local_part(v) for v in fisher.values()], float(count))  # estimate_fisher's own sums
        # One host sync for all tensors; the offending name is looked up only on failure. Sharded,
        # the count of non-finite shards is summed so that every rank raises together.
        finite = torch.stack([torch.isfinite(local_part(value)).all() for value in fisher.values()])
        bad = all_reduce_sum_like(finite.logical_not().sum(), next(iter(fisher.values())))
        if int(bad):
            name = list(fisher)[int(finite.logical_not().nonzero()[0])] if not bool(finite.all()) else "a shard on another rank"
            raise FloatingPointError(f"EWC's Fisher for '{name}' is not finite after task '{task.name}'.")
        anchor = {n: p.detach().to(self._anchor_dtype, copy=True) for n, p in trainable_parameters(model).items()}
        if zero3:
            params = trainable_parameters(model)
            fisher = {n: slice_partition(f, params[n]) for n, f in fisher.items()}
            anchor = {n: slice_partition(a, params[n]) for n, a in anchor.items()}
        online = self.config.mode == "online" and bool(self.terms)
        if online:
            old_fisher, _ = self.terms[0]
            # Decayed and summed in fp32, rounded once to the state dtype.
            fisher = {n: self.config.gamma * old_fisher[n].to(f.device, torch.float32) + f for n, f in fisher.items()}
        fisher = {n: f.to(self._fisher_dtype) for n, f in fisher.items()}
        self.terms = [(fisher, anchor)] if online else [*self.terms, (fisher, anchor)]
        if not zero3:  # ZeRO-3 binds once the parameters are partitioned again
            self._bind(model)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._zero3 is not None:  # ZeRO-3: the terms are slices; the whole ones were gathered after the task
            if self._zero3_whole is None:
                raise NotImplementedError(
                    "EWC's Fisher and anchor are partitioned across the ranks under DeepSpeed ZeRO-3 and are "
                    "gathered only at the end of a task and in before_save, which every rank must call before the "
                    "state is read (the trainer's checkpoints do).")
            return {"terms": [{"fisher": f, "anchor": a} for f, a in self._zero3_whole]}
        return {"terms": [{"fisher": f, "anchor": a} for f, a in self.terms]}

    def before_save(self, trainer: ContinualTrainer) -> None:
        """Under DeepSpeed ZeRO-3, gather the whole Fisher and anchor from every rank's slices (a collective:
        the trainer calls it on every rank), for the mid-task checkpoint rank 0 then writes. Nothing otherwise.

        >>> EWC().before_save(None)  # not on ZeRO-3: nothing to gather
        """
        if self._zero3 is None or self._zero3_whole is not None:
            return
        self._zero3_whole = self._gathered_terms(trainer.model)

    def after_save(self, trainer: ContinualTrainer) -> None:
        """Drop the whole copy :meth:`before_save` gathered: training needs only this rank's slices."""
        if self._zero3 is not None:
            self._zero3_whole = None

    @property
    def _fisher_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.config.state_dtype][0]

    @property
    def _anchor_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.config.state_dtype][1]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # In the configured dtypes, whatever the checkpoint holds (a run resumed with another state_dtype).
        fisher_dtype, anchor_dtype = self._fisher_dtype, self._anchor_dtype
        self.terms = [({n: f.to(fisher_dtype) for n, f in t["fisher"].items()},
                       {n: a.to(anchor_dtype) for n, a in t["anchor"].items()}) for t in state.get("terms", [])]
        self._params, self._fishers, self._anchors, self._offset = [], [], [], 0.0
        self._zero3_whole = list(self.terms)  # whole tensors: what state_dict returns under ZeRO-3 until training
        if self.trainer is not None and self.terms:
            self._bind(self.trainer.model)


class _QuadraticPenalty(torch.autograd.Function):
    """``scale · Σ_i Σ F_i (θ_i − θ*_i)²`` over lists of tensors, with a hand-written backward.

    The plain autograd form costs about a dozen kernels and graph nodes per parameter tensor
    (cast, subtract, square, multiply, sum, add, and as many backward nodes), which dominates the
    step of a small model. Here the forward is two fused ``torch._foreach_*`` calls and one dot
    product per tensor (on a GPU: a third ``_foreach`` call and one fused L1 norm instead of the
    dots, the products being never negative), and the backward one ``_foreach`` scaling of
    the pull ``F (θ − θ*)`` saved by the forward (``∂/∂θ_i = 2 · scale · F_i (θ_i − θ*_i)``). For a large
    model the cost is memory traffic: about 8 reads and writes of a parameter-sized buffer in the
    forward and 2 in the backward (before autograd adds the result into ``.grad``).
    """

    @staticmethod
    def forward(ctx, scale: float, fishers: list[torch.Tensor], anchors: list[torch.Tensor], *params: torch.Tensor):
        # Under FSDP2, ``params`` are DTensors and ``fishers``/``anchors`` this rank's shards (see
        # EWC._bind): the sum runs over the local shards and is then summed over the ranks, so every
        # rank gets the whole penalty; the gradient of each shard is its own local pull, wrapped
        # like the parameter. Unsharded, local_part is the identity and nothing is reduced.
        thetas = [local_part(p) for p in params]
        thetas = [t if t.dtype == torch.float32 else t.float() for t in thetas]
        diffs = torch._foreach_sub(thetas, anchors)
        pulls = torch._foreach_mul(diffs, fishers)  # F (θ − θ*), kept for the backward
        total = _weighted_square_sum(diffs, pulls, fused=diffs[0].is_cuda) * scale
        if params and any_dtensor(params[:1]):
            total = all_reduce_sum_like(total, params[0])
            ctx.params = params  # the mesh and placements to wrap the local gradients with
        ctx.save_for_backward(*pulls)
        ctx.scale = scale
        ctx.dtypes = [p.dtype for p in params]
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = torch._foreach_mul(ctx.saved_tensors, grad_output * (2.0 * ctx.scale))
        grads = [g if g.dtype == dtype else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        sharded = getattr(ctx, "params", None)
        if sharded is not None:
            grads = [like_param(g, p) for g, p in zip(grads, sharded)]
        return (None, None, None, *grads)


def _weighted_square_sum(diffs: list[torch.Tensor], pulls: list[torch.Tensor], *, fused: bool) -> torch.Tensor:
    """``Σ_i d_i · q_i`` with ``q_i = F_i d_i`` (so every product is >= 0).

    ``fused``: the L1 norm of the products in one multi-tensor kernel (the GPU path: on a
    launch-bound step, one dot kernel per tensor costs more than the extra pass over the products);
    otherwise one dot per tensor (the CPU path, where that extra pass made the penalty 2x slower:
    37 vs 18 ms for 6.7M parameters in one thread).
    """
    if fused:
        return torch.stack(torch._foreach_norm(torch._foreach_mul(diffs, pulls), 1)).sum()
    return torch.stack([torch.dot(d.view(-1), q.view(-1)) for d, q in zip(diffs, pulls)]).sum()


def _unpadded_batches(rows, batch_size: int, device) -> list[dict[str, torch.Tensor]]:
    """Batches of rows of equal length, so that no padding and no attention mask is needed.

    Without padding, the per-row loss is exactly the loss of that row alone, and the model takes
    no data-dependent branch on a mask, which ``torch.func.vmap`` cannot trace.
    """
    columns = [c for c in rows.column_names if c in ("input_ids", "labels", "token_type_ids")]
    data = rows.select_columns(columns)[:]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(tuple(len(data[c][i]) for c in columns), []).append(i)
    batches = []
    for indices in groups.values():  # one tensor per group and column, split into batches (views)
        group = {c: torch.tensor([data[c][i] for i in indices]).to(device) for c in columns}
        for start in range(0, len(indices), batch_size):
            batches.append({c: t[start : start + batch_size] for c, t in group.items()})
    return batches


def estimate_fisher(
    model: nn.Module,
    rows: Dataset,
    *,
    batch_size: int = 16,
    method: str = "auto",
    sampled: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
    disable_progress: bool = True,
    reduction: str = "mean",
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: the mean over rows of the squared per-row loss gradient.

    Each row's loss is the NLL of its answer, ``−log p(answer | prompt)``, summed over its own
    supervised tokens (``labels != -100``): the Fisher of one sample as the EWC paper defines it,
    whatever the answer's length (a per-token mean would divide it by T² for T answer tokens).
    Squares are taken per row, never of a batch-averaged gradient (which would underestimate F by up to
    the batch size). One forward per row gives both the logits and, for the true Fisher, the
    tokens sampled from them (see :func:`_row_loss`).

    Args:
        model (`nn.Module`): The model (dropout is switched off while estimating).
        rows (`datasets.Dataset`): Tokenized rows (``input_ids``, ``labels``).
        batch_size (`int`): Rows per vectorised pass.
        method (`str`): ``"hooks"``, ``"vmap"``, ``"loop"`` or ``"auto"``. ``"hooks"``: one plain
            forward and one backward per batch that computes only the activations' gradients; each
            layer's per-row weight gradients are rebuilt from its input and output gradient (one
            batched product per layer) and squared and summed over the rows straight into the Fisher
            (:func:`_hooked_squared_grads`). Every trainable weight must be that of an
            ``nn.Linear``, GPT-2's ``Conv1D``, an ``nn.LayerNorm`` or an ``nn.Embedding``
            (:func:`~clm_hf.strategies._row_gradients.row_gradient_modules`, else ``ValueError``).
            ``"vmap"``: per-row gradients of the whole model at once (:func:`_vmapped_row_grads`);
            ``"loop"``: one backward per row. ``"auto"`` takes the hooks where every trainable
            weight is hookable, after comparing their squares on the first rows with the loop's
            once per call (a weight also used outside its module, which the hooks cannot see, is
            caught there), and the vmapped pass otherwise or if that fails, then the loop. A model
            sharded with FSDP2 (DTensor parameters) always takes a per-row backward through the
            sharded model, its rows split between the ranks (:func:`_estimate_fisher_sharded`).
        sampled (`bool`): Score each row's answer positions against tokens sampled from the
            model's own teacher-forced prediction there (the true Fisher) instead of the
            dataset's tokens (the empirical Fisher).
        seed (`int`): Seed of those samples: the same seed gives the same Fisher.
        device: Where to run.
        reduction (`str`): ``"mean"`` over rows (the Fisher) or ``"sum"`` of the squared per-row
            gradients (what ranks all-reduce before dividing by the global row count).

    Returns:
        `dict[str, torch.Tensor]`: fp32 Fisher diagonal per trainable parameter name.

    Example:

    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model, make_task, tokenize_for_causal_lm
    >>> tok = build_tokenizer(); model = build_tiny_model("gpt2", tok)
    >>> rows = tokenize_for_causal_lm(make_task("copy", 4), tok)
    >>> fisher = estimate_fisher(model, rows)
    >>> all(f.min() >= 0 for f in fisher.values())
    True
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("EWC found no trainable parameter to estimate a Fisher for.")
    names = list(params)
    device = device or next(iter(params.values())).device
    if any_dtensor(params.values()):
        return _estimate_fisher_sharded(model, rows, params, batch_size=batch_size, sampled=sampled, seed=seed,
                                        device=device, disable_progress=disable_progress, reduction=reduction)
    totals = [torch.zeros_like(params[n], dtype=torch.float32) for n in names]
    batches = _unpadded_batches(rows, batch_size, device)
    use_vmap = method in ("vmap", "auto")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    forward = FunctionalModel(model, params)  # built once: the frozen weights, the pure call
    seq2seq = is_seq2seq(model)
    per_row = None  # the vmapped pass, built where it runs
    modules = None
    if method in ("hooks", "auto"):
        try:
            modules = row_gradient_modules(forward.model, params)
        except ValueError:  # a weight of a layer type the hooks do not know (Llama's RMSNorm): vmap
            if method == "hooks":
                raise
    checked = False  # the hooked squares are compared with the loop's on the first rows, once
    with eval_mode(model), no_padding_warning(forward.model):
        for batch in tqdm(batches, desc="EWC Fisher", disable=disable_progress, leave=False):
            labels = batch.pop("labels")
            # No labels: the model computes logits only. A seq2seq decoder is teacher-forced on the
            # dataset's answer, as in training; only the scored tokens are sampled.
            inputs = {**batch, **decoder_inputs(forward.model, {**batch, "labels": labels}, seq2seq)}
            # The sampler's randomness: one uniform per label position, drawn here from the seeded
            # generator (on the CPU, so a seed gives the same draws on any device) and shared by
            # the hooked, vmap and loop paths.
            uniforms = torch.rand(labels.shape, generator=generator).to(device) if sampled else None
            # Before the first hooked pass, its first rows alone go through the check (then the rest).
            pieces = [slice(None)] if modules is None or checked else [slice(0, _CHECK_ROWS), slice(_CHECK_ROWS, None)]
            for piece in pieces:
                part = ({k: v[piece] for k, v in inputs.items()}, labels[piece], None if uniforms is None else uniforms[piece])
                if part[1].shape[0] == 0:
                    continue
                squared = reference = None
                if modules is not None:
                    try:
                        squared = _hooked_squared_grads(forward.model, modules, params, *part, seq2seq)
                        if not checked:
                            reference = _squared_grads_loop(model, params, names, *part, seq2seq)
                            _check_hooked_fisher(names, squared, reference, params)
                            checked = True
                    except Exception as err:  # noqa: BLE001 - any model the hooks do not fit falls back
                        # Not out of memory: the vmapped pass needs more memory than the hooked one.
                        if method == "hooks" or isinstance(err, torch.OutOfMemoryError):
                            raise
                        logger.warning("EWC: the hooked per-row gradients failed (%s); using the vmapped ones.", err)
                        modules = None
                        squared = reference  # the loop's squares of these rows where the check got them, else None
                if squared is None and use_vmap:
                    try:
                        per_row = per_row or _vmapped_row_grads(forward, seq2seq)
                        grads = per_row(forward.detached(), *part)
                        squared = [_square_sum_rows(grads[n]) for n in names]
                    except Exception as err:  # noqa: BLE001 - any vmap incompatibility falls back
                        if method == "vmap":
                            raise
                        logger.warning("EWC: per-sample gradients with torch.func failed (%s); using a loop.", err)
                        use_vmap = False
                if squared is None:
                    squared = _squared_grads_loop(model, params, names, *part, seq2seq)
                torch._foreach_add_(totals, squared)
    if reduction == "mean":
        torch._foreach_div_(totals, float(len(rows)))
    return dict(zip(names, totals))


# Rows of the first batch whose hooked squares are checked against the loop's (one backward per row).
_CHECK_ROWS = 2


def _hooked_squared_grads(model: nn.Module, modules: dict[nn.Module, dict[str, int]], params: dict[str, nn.Parameter],
                          inputs: dict[str, torch.Tensor], labels: torch.Tensor, uniforms: torch.Tensor | None,
                          seq2seq: bool) -> list[torch.Tensor]:
    """The sum over the rows of each row's squared gradient, in the order of ``params``, from ONE plain
    forward and ONE backward over the batch (:func:`~clm_hf.strategies._row_gradients.hooked_group_gradients`
    with one group per row).

    The loss is the sum of the rows' :func:`_row_loss`, and row ``b``'s depends on row ``b`` alone
    (equal-length rows, no mask, eval mode), so each layer's per-row weight gradients are its
    ``(rows, out, in)`` products ``dY_bᵀ X_b``: they are squared and summed over the rows there and
    then (:class:`~clm_hf.strategies._row_gradients.SquareSumSink`), never held for the whole model.
    """
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in params.values()]
    rows = labels.shape[0]
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}

    def loss_of() -> torch.Tensor:
        return _row_loss(model(**inputs, **extra).logits, labels, uniforms, seq2seq)

    hooked_group_gradients(model, modules, loss_of, rows, rows, SquareSumSink(totals), switch_to_eval=False)
    return totals


def _check_hooked_fisher(names: list[str], hooked: list[torch.Tensor], reference: list[torch.Tensor],
                         params: dict[str, nn.Parameter]) -> None:
    """``ValueError`` naming the first parameter whose hooked squares differ from the loop's (see
    :func:`~clm_hf.strategies._row_gradients.check_hooked`); squares of small gradients are tiny, hence the floor."""
    exact = all(p.dtype in (torch.float32, torch.float64) for p in params.values())
    check_hooked(names, hooked, reference, exact=exact, what="Fisher", against="the per-row loop's", floor=1e-12)


def _world() -> tuple[int, int]:
    """(world size, rank) of the default process group, or (1, 0) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _draw_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens drawn from ``softmax(logits)`` by inverse CDF, one per position.

    ``logits`` is ``[..., vocab]`` and ``uniforms`` ``[...]``, uniform on [0, 1). Token ``k`` is
    drawn when ``c_{k-1} <= u·c_V < c_k`` for the cumulative unnormalised weights
    ``c_k = Σ_{j<=k} exp(z_j − max z)``: with probability ``p_k = softmax(z)_k`` (to fp32
    rounding, about 1e-7 absolute per token). It needs ``vocab`` floats per position, where
    Gumbel-max would need as many random numbers.
    """
    weights = (logits - logits.amax(-1, keepdim=True)).exp_()
    cdf = weights.cumsum(-1)
    targets = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    drawn = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return drawn.clamp(max=logits.shape[-1] - 1)  # u·c_V may round up to c_V itself


def _row_loss(logits: torch.Tensor, labels: torch.Tensor, uniforms: torch.Tensor | None, seq2seq: bool) -> torch.Tensor:
    """The NLL of the row's answer, ``−log p(answer | prompt)``: the *sum* over the answer positions
    (``labels != -100``).

    The sum, not HF's per-token mean: the gradient of a mean over T tokens is 1/T of the
    sample's log-likelihood gradient, so its square would shrink the Fisher by 1/T² and make
    λ mean something different for every answer length.

    With ``uniforms``, the answer tokens are first replaced by tokens drawn from the detached
    ``logits`` themselves (:func:`_draw_tokens`): the true Fisher from the same forward pass.
    """
    if not seq2seq:  # position t predicts token t + 1
        logits, labels = logits[..., :-1, :], labels[..., 1:]
        uniforms = None if uniforms is None else uniforms[..., 1:]
    logits = logits.float()
    if uniforms is not None:
        labels = torch.where(labels != -100, _draw_tokens(logits.detach(), uniforms), labels)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def _vmapped_row_grads(forward: FunctionalModel, seq2seq: bool):
    """``f(weights, inputs, labels, uniforms)`` → per-row gradients ``{name: [rows, *shape]}``.

    Every row (vmap lane) gets its own copy of the weights: a stride-0 ``expand`` to
    ``[rows, ...]`` (no memory copied), with ``requires_grad``. Row ``b``'s loss depends only on
    copy ``b``, so ONE ordinary backward of the summed row losses leaves every row's own gradient
    in the copies' ``.grad``: the numbers of ``vmap(grad(row_loss))``, but the backward runs
    through autograd on the batched kernels instead of being re-dispatched through torch.func's
    transforms (the trick of GEM's reference gradients; on CPU the true Fisher went from 1.73x to
    1.46x (tiny GPT-2) and 1.60x to 1.44x (medium) a training pass over the same rows, docs/benchmarks.md
    section 6). The numbers are identical.
    """
    import warnings

    from torch.func import vmap

    def loss(weights, inputs, labels, uniforms):
        logits = forward(weights, **{k: t.unsqueeze(0) for k, t in inputs.items()}).logits
        return _row_loss(logits, labels.unsqueeze(0), None if uniforms is None else uniforms.unsqueeze(0), seq2seq)

    def per_row(weights, inputs, labels, uniforms):
        rows = labels.shape[0]
        copies = {n: w.expand(rows, *w.shape).requires_grad_() for n, w in weights.items()}
        with batchable_attention(), torch.enable_grad(), warnings.catch_warnings():
            # fused attention kernels would loop over the rows under vmap (batchable_attention), and a
            # gradient's strides cannot match those of a stride-0 copy (harmless here).
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            losses = vmap(loss, in_dims=(0, 0, 0, None if uniforms is None else 0))(copies, inputs, labels, uniforms)
            torch.autograd.backward(losses.sum(), inputs=list(copies.values()))
        return {n: c.grad if c.grad is not None else torch.zeros(rows, *weights[n].shape, dtype=weights[n].dtype,
                                                                  device=weights[n].device)
                for n, c in copies.items()}

    return per_row


def _square_sum_rows(g: torch.Tensor) -> torch.Tensor:
    # The per-row gradients are temporaries: square them in place rather than allocating another
    # rows x parameters buffer (a large share of the Fisher's time on a model of a few million
    # parameters).
    return (g.square_() if g.dtype == torch.float32 else g.float().square_()).sum(0)


def _squared_grads_loop(model: nn.Module, params: dict[str, nn.Parameter], names: list[str], inputs: dict[str, torch.Tensor],
                        labels: torch.Tensor, uniforms: torch.Tensor | None, seq2seq: bool) -> list[torch.Tensor]:
    """One backward per row: the reference the vmapped path must match (same draws)."""
    sums = [torch.zeros_like(params[n], dtype=torch.float32) for n in names]
    for i in range(labels.shape[0]):
        logits = model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
        loss = _row_loss(logits, labels[i : i + 1], None if uniforms is None else uniforms[i : i + 1], seq2seq)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        present = [(s, g) for s, g in zip(sums, grads) if g is not None]
        torch._foreach_addcmul_([s for s, _ in present], [g.float() for _, g in present], [g.float() for _, g in present])
    return sums


def _estimate_fisher_sharded(model: nn.Module, rows, params: dict[str, nn.Parameter], *, batch_size: int, sampled: bool,
                             seed: int, device, disable_progress: bool, reduction: str) -> dict[str, torch.Tensor]:
    """:func:`estimate_fisher` for a model sharded with FSDP2: one backward per row through the wrapped model,
    the rows split between the ranks.

    ``torch.func`` cannot trace FSDP2's in-place unshard, and ``torch.autograd.grad`` on the sharded
    parameters gets nothing (FSDP2 differentiates its unsharded copies, then reduce-scatters their
    gradients, averaged over the ranks, into the shards' ``.grad``). So each rank runs an ordinary
    forward and backward of the FSDP module on one of its rows per step, and a hook on each
    unsharded parameter replaces the row's gradient ``g`` by ``W·g²`` (``W`` ranks) before FSDP2
    reduces it: the reduce-scatter then leaves in this rank's ``.grad`` shard the sum over the
    ranks of their rows' squared gradients, which is added to the local Fisher shard. Squares are
    taken per row before any reduction, never of a rank-averaged gradient. A rank out of rows runs
    a row with its loss times 0 (FSDP2's collectives need every rank at every step). The samples of
    the true Fisher are drawn for every row in the unsharded order, so the result is that of one
    process. The result holds DTensors sharded like the parameters; no whole parameter is ever
    held. Gradients the model held before are put back afterwards.
    """
    from torch.distributed.fsdp import FSDPModule

    names = list(params)
    world = next(iter(params.values())).device_mesh.size()
    rank = next(iter(params.values())).device_mesh.get_local_rank()
    totals = [torch.zeros_like(local_part(params[n]), dtype=torch.float32) for n in names]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    seq2seq = is_seq2seq(model)
    # Every row with its inputs and draws, in the order (and with the draws) of the unsharded paths.
    items = []
    for batch in _unpadded_batches(rows, batch_size, device):
        labels = batch.pop("labels")
        inputs = {**batch, **decoder_inputs(model, {**batch, "labels": labels}, seq2seq)}
        uniforms = torch.rand(labels.shape, generator=generator).to(device) if sampled else None
        items.extend((inputs, labels, uniforms, i) for i in range(labels.shape[0]))
    per_rank = -(-len(items) // world)
    mine = items[rank * per_rank : (rank + 1) * per_rank]
    # The unsharded parameters FSDP2 differentiates: registered on the modules while unsharded.
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        module.unshard()
    unsharded = [p for n, p in unwrap_model(model).named_parameters() if n in params]
    reshard(model)

    def square(grad: torch.Tensor) -> torch.Tensor:
        return (grad.float().square() * world).to(grad.dtype)

    handles = [p.register_hook(square) for p in unsharded]
    saved = {n: p.grad for n, p in params.items()}
    try:
        with eval_mode(model), torch.enable_grad():
            for step in tqdm(range(per_rank), desc="EWC Fisher", disable=disable_progress, leave=False):
                inputs, labels, uniforms, i = mine[step] if step < len(mine) else items[0]
                for p in params.values():
                    p.grad = None
                logits = model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
                loss = _row_loss(logits, labels[i : i + 1], None if uniforms is None else uniforms[i : i + 1], seq2seq)
                (loss if step < len(mine) else loss * 0.0).backward()
                present = [(s, local_part(params[n].grad).float()) for s, n in zip(totals, names)
                           if params[n].grad is not None]
                torch._foreach_add_([s for s, _ in present], [g for _, g in present])
    finally:
        for handle in handles:
            handle.remove()
        for n, p in params.items():
            p.grad = saved[n]
    if reduction == "mean":
        torch._foreach_div_(totals, float(len(rows)))
    return {n: like_param(t, params[n]) for n, t in zip(names, totals)}
