"""Continual supervised fine-tuning with TRL: :class:`ContinualSFTTrainer` over ``trl.SFTTrainer``.

TRL's ``SFTTrainer`` prepares each task's rows itself (plain ``text``, ``prompt``/``completion``,
conversational ``messages`` through the tokenizer's chat template, packing, completion-only and
assistant-only loss, ``peft_config``); the continual machinery of :class:`~clm_hf.ContinualTrainer`
(strategies, the per-task score matrix, checkpoints) then runs on those tokenized rows.

Needs the optional extra: ``pip install 'clm-hf[trl]'``. ``import clm_hf`` never imports TRL.

>>> from clm_hf.sft import ContinualSFTConfig, ContinualSFTTrainer  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # the optional extra is missing
    raise ImportError(
        "clm_hf.sft needs TRL (trl.SFTTrainer), which is not installed: pip install 'clm-hf[trl]'."
    ) from err

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer

from ._logging import get_logger
from .args import ContinualTrainingArguments, _document_continual_fields
from .data import ContinualDataCollator, _rows_without_supervision, dataset_from_loader
from .strategies.base import Strategy, unwrap_model
from .trainer import ContinualTrainerMixin

__all__ = ["ContinualSFTConfig", "ContinualSFTTrainer"]

logger = get_logger(__name__)

# TRL's packing adds this column (document lengths of a packed row) for its padding-free collator.
_SEQ_LENGTHS = "seq_lengths"


@_document_continual_fields  # appends the continual fields' Args: section to the docstring
@dataclass
class ContinualSFTConfig(SFTConfig, ContinualTrainingArguments):
    """[`trl.SFTConfig`] with the continual fields of [`ContinualTrainingArguments`] (``eval_metrics``,
    ``primary_metric``, ``eval_before_training``, ``save_continual_state``, ...).

    The fields are inherited, not copied: both classes keep one definition. TRL's defaults (e.g.
    ``learning_rate=2e-5``, ``max_length=1024``, ``packing=False``) apply to each task's ``train()``.

    Example:

    >>> from clm_hf.sft import ContinualSFTConfig
    >>> args = ContinualSFTConfig(output_dir="runs/sft", packing=True, max_length=64, primary_metric="loss",
    ...                           use_cpu=True)  # TRL defaults to bf16, which needs a GPU
    >>> args.packing, args.primary_metric
    (True, 'loss')
    """


class _SFTLoss(SFTTrainer):
    """``SFTTrainer.compute_loss`` for the continual mixin, which always asks for the model outputs.

    TRL's loss runs a fused LM head that never builds the logits; asked for outputs it re-runs the
    model without gradient. Strategies need no outputs unless ``uses_output_logits`` (LwF's student
    logits, with gradient): then, as for models without TRL's fused head (a PNN column stack) and in
    evaluation, the loss is the model's own, from one ordinary forward that also gives the logits.
    """

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if not return_outputs:
            return super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        if model.training and self._fused_loss_applies(model):
            loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
            return loss, None  # strategies without uses_output_logits ignore the outputs
        if self.args.loss_type != "nll" and model.training:
            raise ValueError(
                f"loss_type={self.args.loss_type!r} needs TRL's fused LM head, but this step runs the model's own "
                f"forward and loss (a strategy reads the logits, or replaced the model: "
                f"{[s.name for s in self.strategies]}). Use loss_type='nll'."
            )
        inputs = {**inputs, "use_cache": False}
        return Trainer.compute_loss(self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

    def _fused_loss_applies(self, model: nn.Module) -> bool:
        if any(s.uses_output_logits for s in self.strategies) or self.compute_loss_func is not None:
            return False
        if self.label_smoother is not None:
            return False
        bare = unwrap_model(model)
        if hasattr(bare, "get_base_model"):  # PEFT forwards extra keyword arguments to the base model
            bare = bare.get_base_model()
        # add_fused_lm_head patches the instance's forward; a model a strategy built since has none.
        return "forward" in vars(bare)


class ContinualSFTTrainer(ContinualTrainerMixin, _SFTLoss):
    """A [`trl.SFTTrainer`] that learns a stream of tasks with continual-learning strategies.

    Each task's rows go through TRL's own preparation (``text``, ``prompt``/``completion`` or
    ``messages`` with the tokenizer's chat template, ``packing``, ``completion_only_loss``,
    ``assistant_only_loss``); ``peft_config`` wraps the model once, as in TRL. Evaluation rows are
    never packed nor truncated to ``max_length`` and are always scored on the answer only: a
    ``prompt``/``completion`` row on its completion, a ``messages`` row on its last (assistant)
    message. Training rows TRL truncates to ``max_length`` or drops are counted in a warning.

    Args:
        model: The model (a ``PreTrainedModel``) or a Hub id TRL loads.
        args ([`ContinualSFTConfig`], *optional*): TRL's ``SFTConfig`` plus the continual fields.
        strategies (`list[Strategy]`, *optional*): E.g. ``[Replay(), EWC()]``. With padding-free
            packing (``packing=True`` and ``packing_strategy='bfd'``, TRL's default) a strategy that
            needs one row per example (LwF) is refused when the trainer is built.
        train_dataset (`Dataset`, *optional*): Not trained here (``fit``/``train_task`` give each
            task's rows); TRL reads its format at construction. Defaults to a one-row placeholder.
        peft_config (`peft.PeftConfig`, *optional*): Passed to ``SFTTrainer``.
        **kwargs: Any other ``SFTTrainer`` / continual trainer argument (``processing_class``,
            ``task_metrics``, ``generation_scorer``, ``callbacks``, ...).

    Example:

    >>> from datasets import Dataset
    >>> from clm_hf import Replay
    >>> from clm_hf.sft import ContinualSFTConfig, ContinualSFTTrainer
    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model
    >>> tok = build_tokenizer(); model = build_tiny_model("gpt2", tok)
    >>> rows = Dataset.from_dict({"prompt": ["a b ="] * 8, "completion": [" b a"] * 8})
    >>> trainer = ContinualSFTTrainer(model=model, args=ContinualSFTConfig(output_dir="runs/sft", max_steps=2,
    ...                               report_to=[], use_cpu=True), processing_class=tok, strategies=[Replay()])
    >>> results = trainer.fit({"swap": {"train": rows, "eval": rows}})  # doctest: +SKIP
    """

    args_class = ContinualSFTConfig

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        *,
        strategies: Sequence[Strategy] | None = None,
        train_dataset: Dataset | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None and kwargs.get("config") is None:
            args = ContinualSFTConfig(output_dir="clm_hf_output")
        if train_dataset is None:
            train_dataset = _placeholder_rows(args)
        self._user_collator = kwargs.get("data_collator") is not None
        super().__init__(model=model, args=args, strategies=strategies, train_dataset=train_dataset, **kwargs)
        if self.args.loss_type != "nll":
            self._refuse(lambda s: s.uses_output_logits,
                         f"reads the model's logits, which TRL's fused loss (loss_type={self.args.loss_type!r}) never "
                         "builds: each step then runs the model's own cross-entropy. Use loss_type='nll'.")
        if self.padding_free:
            self._refuse(
                lambda s: not s.supports_packed_rows or bool(s.side_columns),
                "needs one row per example in every batch, but padding-free packing (packing=True with "
                f"packing_strategy={self.args.packing_strategy!r}) flattens each batch into one sequence. Use "
                "packing_strategy='wrapped', or packing=False.",
            )
        elif not self._user_collator:
            # TRL's collator keeps input_ids/labels only: strategies' side columns would be dropped.
            self.data_collator = _PaddedRows(ContinualDataCollator(pad_token_id=self._tokenizer.pad_token_id))
        self._scoring_collator = _PaddedRows(ContinualDataCollator(pad_token_id=self._tokenizer.pad_token_id))

    def _default_data_collator(self, model: nn.Module | None, processing_class: Any) -> Any:
        return None  # SFTTrainer builds its own (padding-free packing refuses any other)

    # --- rows: TRL's own preparation, then the continual checks --------------------------------
    def _prepare_rows(self, dataset: Any, what: str, *, scoring: bool = False) -> Dataset:
        """Tokenize raw rows with ``SFTTrainer._prepare_dataset``, then validate them as every task's rows.

        ``scoring`` rows are eval rows: never packed, shuffled or truncated to ``max_length``, labels on the
        answer only. Training rows TRL truncates or drops are counted in a warning.
        """
        if isinstance(dataset, DataLoader):
            dataset = dataset_from_loader(dataset)
        if isinstance(dataset, Dataset) and "input_ids" not in dataset.column_names and not self._skip_prepare_dataset:
            dataset = self._sft_tokenize(dataset, what, scoring=scoring)
        return super()._prepare_rows(dataset, what, scoring=scoring)

    def _sft_tokenize(self, dataset: Dataset, what: str, *, scoring: bool) -> Dataset:
        columns = set(dataset.column_names)
        if len(dataset) == 0:
            raise ValueError(f"The {what} is empty: a task needs at least one example.")
        if scoring and "messages" in columns and "prompt" not in columns:
            dataset = _split_last_turn(dataset, what)
            columns = set(dataset.column_names)
        is_prompt_completion = {"prompt", "completion"} <= columns
        # First TRL's tokenization alone: no truncation (TRL then drops the rows it left without a supervised
        # token), no packing, no shuffle. Scoring rows stay whole: the continual checks then refuse, naming the
        # row, what cannot be scored (too long for the model, nothing supervised), as for every other trainer.
        whole = copy.copy(self.args)
        whole.max_length, whole.shuffle_dataset = None, False
        if self.args.completion_only_loss is None:  # TRL's rule, per task: prompt/completion rows -> completion only
            completion_only = is_prompt_completion
        else:
            completion_only = self.args.completion_only_loss
        with _attribute(self, "completion_only_loss", completion_only or (scoring and is_prompt_completion)):
            dataset = self._prepare_dataset(dataset, self.processing_class, whole, False, self._formatting_func, what)
            if not scoring:
                dataset = self._truncate_and_pack(dataset, what)
        # TRL keeps the raw text columns; only its model columns go on (replay mixes tasks of any layout).
        return dataset.select_columns([c for c in ("input_ids", "labels", _SEQ_LENGTHS) if c in dataset.column_names])

    def _truncate_and_pack(self, rows: Dataset, what: str) -> Dataset:
        """TRL's truncation to ``max_length`` (and its dropping of rows left with no supervised token), packing and
        shuffle, on rows it tokenized; never silent: the rows cut or dropped are counted in a warning."""
        max_length, packing = self.args.max_length, self.args.packing
        # Wrapped packing splits a long row across packed rows (nothing is lost); otherwise what passes
        # max_length is cut off (bfd packing keeps a row's start, as truncation_mode='keep_start' does).
        cuts = max_length is not None and not (packing and self.args.packing_strategy == "wrapped")
        lengths = pc.list_value_length(rows.with_format("arrow")[:].column("input_ids"))
        truncated = pc.sum(pc.greater(lengths, max_length)).as_py() or 0 if cuts else 0
        # TRL's second pass sees tokenized rows: it only truncates, drops, packs and shuffles them.
        prepared = self._prepare_dataset(rows, self.processing_class, self.args, packing, None, what)
        if packing:
            # TRL drops rows left with no supervised token only when it does not pack; a packed row made of
            # prompt tokens only (bfd: a long prompt cut at max_length; wrapped: a split row's prompt chunk)
            # carries no loss either, so it is dropped here, as TRL does unpacked ones, and counted.
            unsupervised = _rows_without_supervision(prepared.with_format("arrow")[:].column("labels"))
            dropped = len(unsupervised)
            if dropped:
                prepared = prepared.select(np.setdiff1d(np.arange(len(prepared)), unsupervised))
        else:
            dropped = len(rows) - len(prepared)
        if truncated or dropped:
            how = f"packing_strategy={self.args.packing_strategy!r}" if packing else \
                f"truncation_mode={self.args.truncation_mode!r}"
            logger.warning(
                "clm-hf: TRL's preparation of the %s (%d rows given) truncated %d row(s) longer than max_length=%s (%s) "
                "and dropped %d %s left with no supervised token; %d %srows train. Raise max_length to train "
                "them whole.", what, len(rows), truncated, max_length, how, dropped,
                "packed row(s)" if packing else "row(s)", len(prepared), "packed " if packing else "",
            )
        return prepared

    # --- evaluation: one padded row per example ------------------------------------------------
    def evaluate_task(self, dataset: Dataset, *, description: str | None = None, generate: bool = True) -> dict[str, float]:
        with _attribute(self, "data_collator", self._scoring_collator):
            return super().evaluate_task(dataset, description=description, generate=generate)


class _PaddedRows:
    """:class:`ContinualDataCollator` without TRL's ``seq_lengths`` column of packed rows, which only
    the padding-free collator reads (a model's ``forward`` would reject it)."""

    def __init__(self, collator: ContinualDataCollator) -> None:
        self.collator = collator

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.collator([{k: v for k, v in f.items() if k != _SEQ_LENGTHS} for f in features])


@contextlib.contextmanager
def _attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _placeholder_rows(args: Any) -> Dataset:
    """One row TRL reads the dataset format from at construction; each task's rows replace it."""
    if getattr(args, "assistant_only_loss", False):
        return Dataset.from_dict({"messages": [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]})
    return Dataset.from_dict({"prompt": ["a"], "completion": [" b"]})


def _split_last_turn(dataset: Dataset, what: str) -> Dataset:
    """``messages`` rows -> conversational ``prompt`` (every turn but the last) / ``completion`` (the last,
    assistant turn), so a conversation is scored on its final answer."""

    def split(row: dict[str, Any], index: int) -> dict[str, Any]:
        messages = row["messages"]
        if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
            raise ValueError(
                f"Row {index} of the {what} must end with an 'assistant' message after at least one other turn, to be "
                f"scored on that answer; its roles are {[m.get('role') for m in messages or []]}."
            )
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    return dataset.map(split, with_indices=True, remove_columns=["messages"], desc=f"Splitting {what} into prompt/answer")

