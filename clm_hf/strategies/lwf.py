"""Learning without Forgetting (Li & Hoiem 2016, https://arxiv.org/abs/1606.09282), for language models.

At the start of every task after the first, LwF keeps the model as it is (the *teacher*). While
the new task trains, it adds a distillation term that keeps the model's next-token distribution
close to the teacher's on the new task's own inputs, so no old data is needed:

    alpha · T² · mean over supervised positions of KL(p_teacher^T || p_student^T)

where ``p^T = softmax(logits / T)`` over the vocabulary. The KL is teacher-first,
``Σ p_t (log p_t − log p_s)`` (the forward KL the student is trained on, whose gradient in the
student logits is ``T · (p_s^T − p_t^T)`` after the T² factor). Positions are those whose label is
not -100, aligned with the logits as the model's own loss aligns them (shifted by one for causal
LMs, as is for seq2seq decoders).

The teacher is a frozen snapshot of the model's *trainable* parameters at task start, run with
``torch.func.functional_call`` on the live module (frozen parameters are shared, since nothing
trains them). For a full fine-tune that is one copy of the weights; for a PEFT model it is a copy
of the adapter weights only, never of the base model. Snapshotting the adapters (rather than
running the base with adapters disabled) is what makes the teacher right on every task: with
fresh LoRA adapters (B = 0) the snapshot *is* the base model's function, and once adapters have
trained on earlier tasks it is the adapted model those tasks left behind, which is what LwF must
preserve.

Under FSDP2 the snapshot is taken shard by shard (DTensors sharded like the parameters), and the
teacher runs as the sharded model itself: its shards are copied into the parameters' local shards
for the teacher's no-grad forward (FSDP2 gathers each block from them) and the live shards are put
back before the student's backward (:func:`fsdp_weights_swapped`).

With ``cache_teacher=True`` the teacher's top-k log-probabilities are computed once per task, at
every supervised position of every training row (replayed rows included), and stored as side
columns of the training rows: training then needs no teacher forward pass and holds no teacher.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from ..sharding import any_dtensor, local_part, reshard
from ._functional import FunctionalModel
from .base import Strategy, StrategyConfig, TaskInfo, check_range, eval_mode, register_strategy, trainable_parameters, unwrap_model

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

    from ..trainer import ContinualTrainer

logger = logging.getLogger(__name__)

IDS_COLUMN = "lwf_topk_ids"
LOGPROBS_COLUMN = "lwf_topk_logprobs"
# Columns of a training row that feed the model (what the teacher pass of the cache needs).
_MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels", "decoder_input_ids", "decoder_attention_mask")


@dataclass
class LwFConfig(StrategyConfig):
    """Settings of :class:`LwF`.

    Args:
        alpha (`float`): Weight of the distillation term (λ_o in the paper, alias ``lambda_o``).
            It multiplies ``T² · KL``, so it stays comparable across temperatures.
        temperature (`float`): Temperature T applied to both the teacher's and the student's
            logits (the paper uses 2). Higher values transfer more of the teacher's ranking of
            unlikely tokens.
        cache_teacher (`bool`): Compute the teacher's top-k log-probs once per task and store
            them in the training rows instead of running the teacher at every step.
        cache_top_k (`int`): Tokens kept per supervised position by the cache (clamped to the
            vocabulary size; ``k = vocab size`` makes the cached loss exact).
        cache_batch_size (`int`): Rows per teacher forward pass when filling the cache.

    Example:

    >>> from clm_hf.strategies.lwf import LwFConfig
    >>> config = LwFConfig(alpha=0.5, cache_teacher=True)
    >>> config.temperature, config.to_dict()["cache_teacher"]
    (2.0, True)
    """

    aliases = {"lambda_o": "alpha", "lwf_alpha": "alpha", "T": "temperature", "top_k": "cache_top_k"}

    alpha: float = field(default=5.0, metadata={"help": "Weight of the distillation term (multiplies T² · KL)."})
    temperature: float = field(default=2.0, metadata={"help": "Distillation temperature T (> 0)."})
    cache_teacher: bool = field(default=False, metadata={"help": "Precompute the teacher's top-k log-probs per task."})
    cache_top_k: int = field(default=8, metadata={"help": "Tokens per position kept by the cache."})
    cache_batch_size: int = field(default=32, metadata={"help": "Rows per teacher pass when filling the cache."})

    def validate(self) -> None:
        check_range("alpha", self.alpha, low=0.0)
        check_range("temperature", self.temperature, low=0.0, low_inclusive=False)
        if not isinstance(self.cache_teacher, bool):
            raise ValueError(f"cache_teacher must be a bool, got {self.cache_teacher!r}.")
        check_range("cache_top_k", self.cache_top_k, low=1)
        check_range("cache_batch_size", self.cache_batch_size, low=1)


# --- the loss ----------------------------------------------------------------------------------
def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position ``KL(softmax(z_t/T) || softmax(z_s/T))`` over the last dimension (teacher first).

    Example:

    >>> z = torch.tensor([[1.0, 2.0, 0.5]])
    >>> float(distillation_kl(z, z, 2.0))
    0.0
    """
    return _DistillationKL.apply(student_logits, teacher_logits, float(temperature))


class _DistillationKL(torch.autograd.Function):
    """:func:`distillation_kl` as one autograd node, its gradient written by hand.

    The composed form (two log-softmaxes, an exp, a product and a sum, each with its own backward
    node) costs per-op overhead twice per step; here the backward is one expression,
    ``d KL / d z_s = (p_s - p_t) / T`` per position, from the two distributions kept by the
    forward. Same values as the composed form (float32 throughout); the teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        log_p_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
        p_t = log_p_t.exp()
        kl = (p_t * (log_p_t - log_p_s)).sum(-1)
        ctx.save_for_backward(log_p_s, p_t)
        ctx.temperature, ctx.dtype = temperature, student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        log_p_s, p_t = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # (p_s - p_t) / T; the saved tensors stay untouched (a retained graph may run backward again).
        grad = log_p_s.exp().sub_(p_t).mul_(grad_kl.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.dtype), None, None


def topk_distillation_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """Per-position KL from a top-k teacher: ``Σ_{i in top-k} q_i (log q_i − log p_s(i))``.

    ``teacher_logprobs`` are the teacher's log-probabilities (at T = 1) of ``teacher_ids``;
    ``q = softmax(teacher_logprobs / T)`` is the tempered teacher renormalised over those k tokens
    (for a softmax, tempering then truncating equals truncating the logits then tempering, so
    no T needs to be fixed when the cache is filled). ``p_s`` is the student's *full* tempered
    distribution gathered at the ids, so this is the exact KL between the truncated teacher and
    the student: it is >= 0, zero only when the student puts all its mass on the teacher's top k
    in the teacher's proportions, and equals :func:`distillation_kl` when k is the vocabulary.
    """
    log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    log_q = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p_s)).sum(-1)


def supervised_mask(logits: torch.Tensor, labels: torch.Tensor, seq2seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits with labels as the model's loss does; return (aligned logits, mask of supervised positions).

    Causal LMs predict token ``t+1`` at position ``t`` (the same shift as
    :func:`clm_hf.evaluation.supervised_predictions`); seq2seq decoders are already aligned.
    """
    if not seq2seq:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels != -100


def supervised_rows(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logits[:, :mask.shape[1]][mask]`` (the logits at the supervised positions, in row-major
    order), as one ``index_select`` on the flat positions.

    Its backward writes one zero tensor of the logits' size and adds the rows in; the slice and
    boolean index it replaces each wrote one (with a real vocabulary, tens of megabytes a step).

    Example:

    >>> z = torch.arange(12.0).view(1, 4, 3)
    >>> supervised_rows(z, torch.tensor([[False, True, True]])).tolist()
    [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    """
    batch, length = logits.shape[:2]
    flat = torch.arange(batch * length, device=logits.device).view(batch, length)[:, : mask.shape[1]][mask]
    return logits.reshape(batch * length, -1).index_select(0, flat)


def _is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(unwrap_model(model), "config", None), "is_encoder_decoder", False))


def has_active_dropout(model: nn.Module) -> bool:
    """Whether ``model`` can drop anything in training mode: a dropout module with ``p > 0``, or a
    module holding a dropout rate above 0 for a functional call (e.g. Llama's attention keeps
    ``attention_dropout`` as a float and passes it to the attention function in training only)."""
    for module in unwrap_model(model).modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if module.p > 0:
                return True
            continue
        for key, value in vars(module).items():
            if isinstance(value, float) and value > 0 and ("dropout" in key or "pdrop" in key):
                return True
    return False


def _teacher_logits(model: nn.Module, params: dict[str, torch.Tensor] | None, inputs: dict[str, Any],
                    seq2seq: bool, *, switch_to_eval: bool = True, forward: FunctionalModel | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``model`` with ``params`` swapped in (the live weights when None), no grad, dropout off.

    ``functional_call`` swaps the tensors for the duration of the call without touching the live
    parameters in place, so the student's autograd graph stays valid. ``switch_to_eval=False``
    skips the train/eval switch (a walk over every module, twice), for a model without active
    dropout, where the two modes compute the same thing. ``forward``: a :class:`FunctionalModel` of
    ``model`` built once, which swaps ``params`` in without ``functional_call``'s per-call walk
    over every module (the live teacher calls this at every step).

    ``rows`` (causal LMs; a boolean ``(batch, length)`` mask over the logits' positions): only
    the logits at those positions, as ``(n_true, vocab)`` in row-major order. They are asked of
    the model as a boolean ``logits_to_keep`` (transformers >= 5), so that its LM head (on a real
    vocabulary a good part of a forward pass) runs on those positions only; a model that does
    not take it is run whole and its logits gathered.
    """
    bare = unwrap_model(model)
    inputs = dict(inputs)
    if not seq2seq:
        inputs.pop("labels", None)  # the teacher's own loss is not needed; seq2seq needs labels for decoder inputs
    if getattr(getattr(bare, "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False
    asked = rows is not None and not seq2seq and _MASK_LOGITS_TO_KEEP and bare not in _NO_LOGITS_TO_KEEP
    if asked:
        inputs["logits_to_keep"] = rows
    with torch.no_grad(), (eval_mode(bare) if switch_to_eval else contextlib.nullcontext()):
        try:
            logits = _call(bare, params, inputs, forward)
        except (TypeError, IndexError, RuntimeError, ValueError):
            # A forward without ``logits_to_keep``, or one that only takes an int (custom or older
            # models). A genuine error raises again from the call without it.
            if not asked:
                raise
            inputs.pop("logits_to_keep")
            logits = _call(bare, params, inputs, forward)
            _NO_LOGITS_TO_KEEP.add(bare)
            logger.debug("LwF: %s does not take a boolean logits_to_keep; its teacher computes every position's logits.",
                         type(bare).__name__)
    if rows is None or logits.dim() == 2:  # (n_true, vocab): the model's head ran on the rows only
        return logits
    return supervised_rows(logits, rows)  # a forward taking **kwargs may ignore ``logits_to_keep``


def _call(bare: nn.Module, params: dict[str, torch.Tensor] | None, inputs: dict[str, Any],
          forward: FunctionalModel | None) -> torch.Tensor:
    if params is None:
        return bare(**inputs).logits
    if forward is not None:
        return forward(params, **inputs).logits
    from torch.func import functional_call

    return functional_call(bare, params, args=(), kwargs=inputs, tie_weights=True, strict=False).logits


def _mask_logits_to_keep() -> bool:
    """Whether transformers' causal LMs take a boolean ``(batch, length)`` ``logits_to_keep``
    (its helper, shared by the generated models, returns the ``True`` positions flattened)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    try:
        kept = slice_logits_to_keep(torch.zeros(1, 3, 1), torch.tensor([[True, False, True]]))
    except Exception:  # noqa: BLE001 - an older helper that cannot read a mask
        return False
    return tuple(kept.shape) == (2, 1)


_MASK_LOGITS_TO_KEEP = _mask_logits_to_keep()
# Models whose forward refused ``logits_to_keep``: not asked again.
_NO_LOGITS_TO_KEEP: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@contextlib.contextmanager
def fsdp_weights_swapped(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``model`` (sharded with FSDP2) computes with ``weights`` (DTensors sharded like its parameters).

    Swapping tensors into the module's parameter slots (what :class:`FunctionalModel` does) has no
    effect under FSDP2: its pre-forward hook gathers every block from the sharded parameters it
    holds itself. So this rank's shard of each ``weights`` tensor is copied into the parameter's
    own local shard, and copied back afterwards (also on error). Unsharded copies are dropped on
    entry and exit (``reshard``), so that nothing computed with the live weights (the student's
    root parameters, kept unsharded after its forward) serves the teacher and nothing computed with
    the teacher's serves the student's backward, which gathers the restored shards again. Extra
    memory: one copy of this rank's shards.

    Call it outside autograd (no grad), between the student's forward and backward or outside a step.

    Args:
        model (`nn.Module`): The FSDP2-sharded model (every FSDP2 module of it is resharded).
        weights (`dict[str, torch.Tensor]`): One DTensor per trainable parameter name, e.g. :meth:`LwF.snapshot`.

    >>> with fsdp_weights_swapped(model, lwf.teacher):  # doctest: +SKIP
    ...     teacher_logits = model(input_ids=ids).logits
    """
    live = trainable_parameters(reshard(model))
    missing = sorted(set(live) ^ set(weights))
    if missing:
        raise ValueError(f"The weights to swap into the FSDP2 model do not match its trainable parameters: {missing[:5]}.")
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, param in live.items():
                shard = local_part(param)
                saved[name] = shard.clone()
                shard.copy_(local_part(weights[name]))
        yield
    finally:
        reshard(model)
        with torch.no_grad():
            for name, backup in saved.items():
                local_part(live[name]).copy_(backup)


@torch.no_grad()
def teacher_topk(
    model: nn.Module,
    rows: Dataset,
    *,
    k: int,
    collator: Any = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    params: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probs (T = 1) at every supervised position of every row, in row order.

    Args:
        model (`nn.Module`): The teacher (or the live model, with ``params`` swapped in).
        rows (`datasets.Dataset`): Tokenized rows (``input_ids``, ``labels``; other columns ignored).
        k (`int`): Tokens per position (clamped to the vocabulary size).
        collator: Pads a list of rows into a batch; a :class:`~clm_hf.data.ContinualDataCollator` by default.
        batch_size (`int`): Rows per forward pass.
        device: Where to run; defaults to the model's device.
        params (`dict[str, torch.Tensor]`, *optional*): Parameters to swap in (a teacher snapshot).

    Returns:
        `(ids, logprobs, lengths)`: flat int32 ids and float32 log-probs, and per-row int64
        lengths ``n_supervised * k`` (the positions of a row, then its k tokens per position).

    Example:

    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model, make_task, tokenize_for_causal_lm
    >>> tok = build_tokenizer(); model = build_tiny_model("gpt2", tok)
    >>> rows = tokenize_for_causal_lm(make_task("copy", 4), tok)
    >>> ids, logprobs, lengths = teacher_topk(model, rows, k=3)
    >>> int(lengths.sum()) == ids.numel() == logprobs.numel()
    True
    """
    from ..data import ContinualDataCollator

    collator = collator or ContinualDataCollator(pad_token_id=0)
    seq2seq = _is_seq2seq(model)
    if device is None:
        device = next(model.parameters()).device
    view = rows.select_columns([c for c in rows.column_names if c in _MODEL_COLUMNS])
    ids_out, logprobs_out, lengths_out = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = view[start : start + batch_size]
        features = [dict(zip(chunk, values)) for values in zip(*chunk.values())]
        batch = {key: value.to(device) for key, value in collator(features).items()}
        logits, mask = supervised_mask(_teacher_logits(model, params, batch, seq2seq), batch["labels"], seq2seq)
        top = torch.log_softmax(logits[mask].float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
        ids_out.append(top.indices.to(torch.int32).reshape(-1).cpu())
        logprobs_out.append(top.values.reshape(-1).cpu())
        lengths_out.append(mask.sum(-1).cpu().long() * top.indices.shape[-1])
    return torch.cat(ids_out), torch.cat(logprobs_out), torch.cat(lengths_out)


@register_strategy
class LwF(Strategy):
    """Learning without Forgetting: distil the model as it was at task start into the model being trained.

    The distillation term is ``alpha · T² · KL(teacher || student)`` over the vocabulary, averaged
    over the supervised positions of each micro-batch (the trainer re-weights it over an accumulated
    batch's tokens, see ``per_token_terms``) and logged as ``lwf_distillation``. It is absent
    on the first task (there is no teacher yet).

    Memory and time:

    - live teacher (default): one extra copy of the *trainable* weights (the adapter weights only
      for a PEFT model; the base is shared) and one extra no-grad forward pass per micro-batch
      (a forward is roughly a third of a training step's compute). For a causal LM the teacher's
      LM head runs on the supervised (answer) positions only, and the KL over the vocabulary is
      one autograd node (see :func:`distillation_kl`).
    - ``cache_teacher=True``: one no-grad pass over the task's rows before training, then no
      teacher at all. The rows carry ``n_supervised · k`` ids (int32) and log-probs (float32),
      i.e. ``n_supervised · k · 8`` bytes per row in the Arrow table (``· 12`` once collated into
      int64 + float32 tensors); e.g. 256 answer tokens with k = 8 is 16 KiB per row. The loss
      then uses the teacher renormalised over its top k tokens (see
      :func:`topk_distillation_kl`), an approximation that is exact when k is the vocabulary
      size and close when the teacher's mass concentrates on few tokens. The cache is computed
      on the rows LwF is given, so list LwF *after* strategies that add rows (``Replay``): the
      replayed rows are then distilled as well.

    Checkpoints taken inside a task persist the teacher snapshot (or the cache), so resuming
    mid-task distils towards the true task-start model, not the partly trained one.

    Args:
        config ([`LwFConfig`], *optional*): Or pass its fields as keyword arguments.

    Example:

    >>> from clm_hf.strategies.lwf import LwF
    >>> lwf = LwF(alpha=1.0, temperature=2.0)
    >>> lwf.config.temperature, lwf.teacher is None
    (2.0, True)

    Reference: Li & Hoiem, *Learning without Forgetting*, 2016, https://arxiv.org/abs/1606.09282.
    """

    name = "lwf"
    config_class = LwFConfig
    # FSDP2: the teacher is a sharded snapshot run through the sharded model; the cache is filled by
    # the sharded model's forward on every rank (tests/test_fsdp.py: "lwf", "lwf-cached").
    supports_fsdp = True
    side_columns = (IDS_COLUMN, LOGPROBS_COLUMN)
    uses_output_logits = True  # the student's logits, with gradient
    supports_packed_rows = False  # the teacher cache is per row
    # A mean over the micro-batch's supervised tokens: the trainer normalises it over the
    # accumulated batch, as the model's loss (the same gradient for 8 x 1 and 4 x 2).
    per_token_terms = ("lwf_distillation",)

    @property
    def supports_partitioned_parameters(self) -> bool:  # type: ignore[override]
        # A cached teacher is a forward pass of the model before the task (which DeepSpeed ZeRO-3
        # gathers itself); a live teacher copies whole weights, which ZeRO-3 leaves as placeholders.
        return self.config.cache_teacher

    @property
    def supports_streaming(self) -> bool:  # type: ignore[override]
        # A live teacher only needs the task-start weights; a cached teacher scores the rows before training.
        return not self.config.cache_teacher

    def __init__(self, config: LwFConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        # Live mode: the trainable parameters at task start (detached copies), and whose task it is.
        self.teacher: dict[str, torch.Tensor] | None = None
        self.teacher_task: int | None = None
        # Cache mode: the rows the cache was attached to (for checkpoints), or a restored cache.
        self._cached_rows: Dataset | None = None
        self._cache_task: int | None = None
        self._restored_cache: dict[str, Any] | None = None
        self._dropout: tuple[nn.Module, bool] | None = None  # (model, whether it has active dropout)
        self._teacher_call: tuple[nn.Module, FunctionalModel] | None = None  # (model, the teacher as a call)

    def setup(self, trainer: ContinualTrainer) -> None:
        super().setup(trainer)
        if not self.config.cache_teacher:
            return
        strategies = list(getattr(trainer, "strategies", []))
        later = strategies[strategies.index(self) + 1 :] if self in strategies else []
        adders = [s.name for s in later if type(s).prepare_train_dataset is not Strategy.prepare_train_dataset]
        if adders:
            raise ValueError(
                f"LwF(cache_teacher=True) must come after strategies that change the training rows, but {adders} "
                f"come after it: list them first, e.g. strategies=[{', '.join(type(s).__name__ + '(...)' for s in later)}, LwF(...)], "
                "so that the cache covers every row that is trained on."
            )

    # --- the teacher -------------------------------------------------------------------------
    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Detached copies of ``model``'s trainable parameters (the adapter weights of a PEFT model).

        Under FSDP2, copies of this rank's shards (DTensors like the parameters): the model is
        resharded first, since after an evaluation FSDP2 keeps the root module's parameters
        unsharded and ``named_parameters`` would yield those plain tensors instead.
        """
        return {name: p.detach().clone() for name, p in trainable_parameters(reshard(model)).items()}

    def before_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        self._teacher_call = None  # the trainable parameters may differ from the last task's
        if task.index == 0:
            self.teacher, self.teacher_task = None, None
            return
        if self.config.cache_teacher:
            self.teacher, self.teacher_task = None, None
            self._check_cache_covers(trainer.train_dataset, task)
            return
        params = trainable_parameters(reshard(trainer.model))
        if task.resumed and self.teacher is not None and self.teacher_task == task.index:
            # Resuming inside the task: the model may already be partly trained, so keep the
            # task-start weights restored from the checkpoint.
            missing = sorted(set(params) ^ set(self.teacher))
            if missing:
                raise ValueError(f"LwF's restored teacher does not match the model's trainable parameters: {missing[:5]}.")
            self.teacher = {n: t.to(device=params[n].device, dtype=params[n].dtype) for n, t in self.teacher.items()}
            return
        if task.resumed:
            logger.warning("LwF: resuming task '%s' without a saved teacher; using the model as it is now.", task.name)
        self.teacher, self.teacher_task = self.snapshot(trainer.model), task.index

    def after_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        # The next task snapshots its own teacher; nothing needs to outlive this one.
        self.teacher, self.teacher_task = None, None
        self._cached_rows, self._cache_task, self._restored_cache = None, None, None

    # --- the cache -----------------------------------------------------------------------------
    def prepare_train_dataset(self, dataset: Dataset, task: TaskInfo) -> Dataset:
        if not self.config.cache_teacher or task.index == 0:
            return dataset
        dataset = dataset.remove_columns([c for c in self.side_columns if c in dataset.column_names])
        restored = self._restored_cache
        if task.resumed and restored is not None and restored["task"] == task.index and len(restored["lengths"]) == len(dataset):
            ids, logprobs, lengths = restored["ids"], restored["logprobs"], restored["lengths"]
        else:
            if task.resumed:
                logger.warning("LwF: resuming task '%s' without a saved cache; the model as it is now is the teacher.", task.name)
            if self.trainer is None:
                raise RuntimeError("LwF(cache_teacher=True) needs a trainer (setup) to fill its cache.")
            ids, logprobs, lengths = teacher_topk(
                self.trainer.model, dataset, k=self.config.cache_top_k, collator=self.trainer.data_collator,
                batch_size=self.config.cache_batch_size, device=self.trainer.args.device,
            )
        self._restored_cache = None
        rows = attach_cache(dataset, ids, logprobs, lengths, tag=f"lwf-{task.index}-{self.config.cache_top_k}")
        self._cached_rows, self._cache_task = rows, task.index
        return rows

    def _check_cache_covers(self, rows: Dataset | None, task: TaskInfo) -> None:
        if rows is None or self._cached_rows is None or self._cache_task != task.index:
            raise RuntimeError(f"LwF(cache_teacher=True) has no cache for task '{task.name}': was prepare_train_dataset skipped?")
        if any(c not in rows.column_names for c in self.side_columns) or len(rows) != len(self._cached_rows):
            raise ValueError(
                f"The rows trained on for task '{task.name}' ({len(rows)}) are not the rows LwF cached "
                f"({len(self._cached_rows)}): a strategy listed after LwF changed them. List LwF last."
            )

    # --- the loss --------------------------------------------------------------------------------
    def loss(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        labels = inputs.get("labels")
        cached = IDS_COLUMN in inputs
        if labels is None or (not cached and self.teacher is None):
            return {}
        seq2seq = _is_seq2seq(model)
        student, mask = supervised_mask(outputs.logits, labels, seq2seq)
        temperature = self.config.temperature
        if cached:
            kl = topk_distillation_kl(student[mask], *self._gather_cache(inputs, mask, student.shape[-1]), temperature)
        else:
            hidden = {"task_id", *self.side_columns}
            if self.trainer is not None:
                hidden.update(c for s in getattr(self.trainer, "strategies", []) for c in s.side_columns)
            teacher_inputs = {k: v for k, v in inputs.items() if k not in hidden}
            if self._dropout is None or self._dropout[0] is not model:  # once per model, not per step
                self._dropout = (model, has_active_dropout(model))
            # The teacher's head runs on the supervised positions only (a causal LM's prompt needs no
            # teacher logits), and the student's logits there are gathered before the KL.
            rows = None if seq2seq else nn.functional.pad(mask, (0, 1))  # mask over the logits' positions
            if any_dtensor(self.teacher.values()):  # FSDP2: the sharded model runs on the teacher's shards
                with fsdp_weights_swapped(model, self.teacher):
                    teacher = _teacher_logits(model, None, teacher_inputs, seq2seq, switch_to_eval=self._dropout[1], rows=rows)
            else:
                teacher = _teacher_logits(model, self.teacher, teacher_inputs, seq2seq, switch_to_eval=self._dropout[1],
                                          forward=self._teacher_forward(model), rows=rows)
            if seq2seq:
                teacher = teacher[mask]
            kl = distillation_kl(supervised_rows(outputs.logits, mask), teacher, temperature)
        # The mean over supervised tokens, and 0 (with a gradient path) when a batch has none, without
        # asking the device whether it has any (a host sync every step).
        return {"lwf_distillation": self.config.alpha * temperature**2 * kl.sum() / mask.sum().clamp_min(1)}

    def _teacher_forward(self, model: nn.Module) -> FunctionalModel | None:
        """The model as a call on the teacher's weights, built once per task and model, or None
        when the teacher does not name exactly the model's trainable parameters."""
        bare = unwrap_model(model)
        if self._teacher_call is None or self._teacher_call[0] is not bare:
            params = trainable_parameters(bare)
            usable = self.teacher is not None and set(params) == set(self.teacher)
            self._teacher_call = (bare, FunctionalModel(bare, params) if usable else None)
        return self._teacher_call[1]

    def _gather_cache(self, inputs: dict[str, Any], mask: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (ids, log-probs) of the batch as (n_supervised, k), in the order of ``mask``.

        Row ``b`` holds ``n_supervised(b) · k`` entries, then the collator's zero padding.
        """
        ids, logprobs = inputs[IDS_COLUMN], inputs[LOGPROBS_COLUMN]
        k = min(self.config.cache_top_k, vocab_size)
        lengths = mask.sum(-1) * k
        if int(lengths.max()) > ids.shape[1]:
            raise ValueError(
                "LwF's cached teacher columns are shorter than the batch's supervised positions need; "
                "were the rows changed after LwF cached them?"
            )
        valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        return ids[valid].view(-1, k), logprobs[valid].view(-1, k)

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The teacher snapshot (live mode) or the cache (cache mode) while a task is in progress.

        Between tasks nothing is kept: the next task's teacher is the model it starts from.
        """
        state: dict[str, Any] = {}
        if self.teacher is not None:
            state["teacher"] = dict(self.teacher)
            state["teacher_task"] = self.teacher_task
        if self._cached_rows is not None:
            # attach_cache returned a table without an indices mapping, so rows are in table order.
            table = self._cached_rows.data.table
            ids_col, lp_col = table.column(IDS_COLUMN), table.column(LOGPROBS_COLUMN)
            state["cache"] = {
                "task": self._cache_task,
                "ids": torch.from_numpy(pc.list_flatten(ids_col).to_numpy().astype("int32")),
                "logprobs": torch.from_numpy(pc.list_flatten(lp_col).to_numpy().astype("float32")),
                "lengths": torch.from_numpy(pc.list_value_length(ids_col).to_numpy().astype("int64")),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher = dict(state["teacher"]) if "teacher" in state else None
        self.teacher_task = state.get("teacher_task")
        self._restored_cache = state.get("cache")
        self._cached_rows, self._cache_task = None, None


def attach_cache(rows: Dataset, ids: torch.Tensor, logprobs: torch.Tensor, lengths: torch.Tensor, *, tag: str = "lwf") -> Dataset:
    """Add the flat per-row cache as the list columns ``lwf_topk_ids`` (int32) and ``lwf_topk_logprobs`` (float32)."""
    from datasets import List, Value

    if len(lengths) != len(rows) or int(lengths.sum()) != ids.numel() or ids.numel() != logprobs.numel():
        raise ValueError(f"LwF cache of {len(lengths)} rows / {ids.numel()} entries does not fit {len(rows)} rows.")
    offsets = pa.array(torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)]).numpy().astype("int32"))
    id_lists = pa.ListArray.from_arrays(offsets, pa.array(ids.numpy().astype("int32")))
    lp_lists = pa.ListArray.from_arrays(offsets, pa.array(logprobs.float().numpy()))
    # An explicit fingerprint spares datasets from hashing the (large) columns.
    base = hashlib.sha256(f"{rows._fingerprint}-{tag}".encode()).hexdigest()[:16]  # noqa: SLF001
    rows = rows.add_column(IDS_COLUMN, id_lists, new_fingerprint=base + "i", feature=List(Value("int32")))
    return rows.add_column(LOGPROBS_COLUMN, lp_lists, new_fingerprint=base + "l", feature=List(Value("float32")))
