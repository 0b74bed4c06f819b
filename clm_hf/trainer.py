"""Drop-in continual versions of the Hugging Face ``Trainer`` and ``Seq2SeqTrainer``.

The trainer owns the stream: it registers tasks, lets each strategy prepare the model and the
data, runs the ordinary ``Trainer.train()`` for the task, evaluates every task, records the score
matrix and writes a continual checkpoint. It knows nothing of any particular method: strategies
act only through the hooks of :class:`~clm_hf.strategies.base.Strategy`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shutil
import weakref
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from datasets import Dataset, DatasetDict, IterableDataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput, rotate_checkpoints

from . import hub, tracking
from . import state as ckpt
from ._logging import follow_training_args
from .args import ContinualSeq2SeqTrainingArguments, ContinualTrainingArguments
from .config import parse_config_dict
from .data import ContinualDataCollator, UserCollator, _full_sequence, dataset_from_loader, validate_lm_dataset
from .evaluation import (TaskScorer, TokenMetric, _OrderedSampler, argmax_logits, first_scored_logit, forward_logits,
                         is_seq2seq, length_sorted_order)
from .generation_eval import GENERATION_PREFIX, evaluate_generation, generation_metric_names
from .layouts import tokenize_full_text, tokenize_rows
from .results import ContinualResults
from .sharding import any_dtensor, reshard
from .strategies.base import Strategy, TaskInfo, eval_mode, sharded_state_io, unwrap_model
from .validation import (
    check_checkpoint_matches_model,
    check_primary_metric,
    check_row_lengths,
    check_tensor_columns,
    check_training_length,
)

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self  # typing.Self needs Python 3.11

logger = logging.getLogger(__name__)

CONTINUAL_DIR = ckpt.CONTINUAL_DIR
IN_TASK_STATE_DIR = "continual_state"
RESULTS_NAME = "results.json"
_TASK_DIR = re.compile(r"task-\d+(-[\w.-]+)?")  # task-003, task-003-retrain: a task's Trainer checkpoints
_TRAINER_CHECKPOINT = re.compile(r"checkpoint-\d+")
_STREAM_CHECK_ROWS = 64  # rows of a streamed task read ahead to check it


class _StrategyStepHooks(TrainerCallback):
    """Runs the strategies' gradient hooks at the Trainer's own optimizer-step events.

    The gradient edits normally run earlier, from ``_clip_grad_norm``/``_get_grad_norm`` (before
    clipping, see :meth:`ContinualTrainerMixin._edit_gradients`); ``on_pre_optimizer_step`` is the
    fallback for a step on which neither ran, so an edit is never skipped.
    """

    def __init__(self, trainer: "ContinualTrainerMixin") -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._gradients_edited = False  # also after a step an exception cut short

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._hook_zero_optimizer()  # the task's DeepSpeed engine exists from here on

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._edit_gradients(self.trainer.model)
        self.trainer._restore_unscale()
        self.trainer._gradients_edited = False  # the next optimizer step edits its own gradients

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.model
        for strategy in self.trainer.strategies:
            # Under DeepSpeed ZeRO-2 some wrote the master weights inside its step (_hook_zero_optimizer).
            if strategy not in self.trainer._zero_held:
                strategy.after_optimizer_step(model)


class ContinualTrainerMixin:
    """The continual machinery shared by :class:`ContinualTrainer` and :class:`ContinualSeq2SeqTrainer`."""

    args_class: type = ContinualTrainingArguments

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        strategies: Sequence[Strategy] | None = None,
        config: dict[str, Any] | None = None,
        task_metrics: dict[str, TokenMetric] | None = None,
        generation_scorer: Callable[[list[str], list[str]], dict[str, float]] | None = None,
        **kwargs: Any,
    ) -> None:
        strategies = list(strategies or [])
        if config is not None:
            args_kwargs, config_strategies = parse_config_dict(config, self.args_class)
            if args is None:
                args_kwargs.setdefault("output_dir", "clm_hf_output")
                args = self.args_class(**args_kwargs)
            elif args_kwargs:
                raise ValueError("Pass training settings either in `args` or in `config`, not both.")
            strategies += config_strategies
        if args is None:
            args = self.args_class(output_dir="clm_hf_output")
        _check_strategies(strategies)
        # A user's collator is honoured for training; scoring always pads with clm-hf's own (labels kept).
        self._user_collator = kwargs.get("data_collator") is not None
        self._scoring_collator = ContinualDataCollator(pad_token_id=_pad_token_id(model, kwargs.get("processing_class")))
        if self._user_collator and not isinstance(kwargs["data_collator"], (ContinualDataCollator, UserCollator)):
            kwargs["data_collator"] = UserCollator(kwargs["data_collator"])
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = self._default_data_collator(model, kwargs.get("processing_class"))
        # eval_strategy steps/epoch without a Trainer eval_dataset is fine here: inside a task,
        # evaluate() scores that task's eval set(s) given to fit()/train_task (see evaluate()).
        from transformers.trainer_utils import IntervalStrategy

        eval_strategy = getattr(args, "eval_strategy", None)
        if kwargs.get("eval_dataset") is not None or eval_strategy in (None, "no", IntervalStrategy.NO):
            super().__init__(model=model, args=args, **kwargs)
        else:
            args.eval_strategy = IntervalStrategy.NO  # the Trainer refuses it without an eval_dataset
            try:
                super().__init__(model=model, args=args, **kwargs)
            finally:
                args.eval_strategy = eval_strategy
        follow_training_args(self.args)  # args.log_level sets clm-hf's level too, as it does transformers'
        if self.compute_metrics is not None and self.preprocess_logits_for_metrics is None:
            # The per-task scores hand compute_metrics arg-max ids; the Trainer's own evaluate() then does too,
            # so one compute_metrics works for both (and no full logits pile up in memory).
            self.preprocess_logits_for_metrics = argmax_logits
            # It changes what a plain Trainer's evaluate() hands compute_metrics: say so, and how to opt out.
            logger.info(
                "clm-hf: compute_metrics is given without preprocess_logits_for_metrics, so the trainer installs "
                "clm_hf.evaluation.argmax_logits: compute_metrics receives arg-max token ids (rows, positions), not "
                "logits, in the Trainer's own evaluate() as in the per-task scores. To get something else, pass your "
                "own preprocess_logits_for_metrics (e.g. lambda logits, labels: logits; it then runs in the per-task "
                "scores too)."
            )
        self.strategies: list[Strategy] = strategies
        self.task_metrics = dict(task_metrics or {})
        self.generation_scorer = generation_scorer
        self.tasks: list[TaskInfo] = []  # tasks trained (or in training), in order
        self.current_task: TaskInfo | None = None
        self.results: ContinualResults | None = None
        self._eval_sets: dict[str, Dataset] = {}  # task_id -> tokenized eval rows
        # task_id -> the eval rows as given (no copy), to tell a later stream's different set from it.
        self._eval_given: dict[str, Any] = {}
        self._reference_sets: dict[str, Dataset] = {}  # name -> tokenized rows scored after every task, never trained
        self._task_names: dict[str, str] = {}
        self._base_output_dir = self.args.output_dir
        self._loss_terms: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.current_gradient_accumulation_steps = 1
        self._finite_watch: list[tuple[int, str, torch.Tensor]] = []  # (step, term, value) not yet checked
        self._pending_rng: tuple[Path, dict[str, Any]] | None = None  # a mid-task resume's RNG, set before train()
        self._gradients_edited = False  # whether this optimizer step's gradients went through edit_gradients
        # Strategies whose edit_gradients / after_optimizer_step DeepSpeed ZeRO-2's step runs instead (_hook_zero_optimizer).
        self._zero_edited: list[Strategy] = []
        self._zero_held: list[Strategy] = []
        self._warned_stalled_metric = False  # the stalled-primary-metric warning is given once per trainer
        self._restored_run: Path | None = None  # the run folder resume_stream restored (_claim_output_dir accepts it)
        self._run_base_written: str | None = None  # the run folder whose base_model_config/ is written
        self._hub_pushed = False  # a push to the Hub was attempted (only the first one's failure stops the run)
        self._scaler_unscaled = False  # whether _edit_gradients unscaled fp16 gradients for this step
        self._selecting_rows = False  # True while a task's own train() runs: strategies may pick each epoch's rows
        self._in_task_train = False  # True while train_task/fit/run_training_phase run the Trainer's own train()
        self._direct_train_logged = False
        self._direct_sources: dict[str, Any] = {}  # the user's train/eval datasets of the last direct train()
        _check_vocabulary(self.model, self.processing_class)
        # Settings that would only fail (or silently do nothing) after the first task, checked now.
        computed = [*self._setting("eval_metrics"), *self.task_metrics, *generation_metric_names(self._setting("generation_metrics"))]
        # compute_metrics' keys, and a scorer's gen_* keys, are known only once they have run.
        if self.compute_metrics is None and not (
            generation_scorer is not None and str(self._setting("primary_metric")).startswith(GENERATION_PREFIX)
        ):
            check_primary_metric(self._setting("primary_metric"), computed)
        if self._generates() and self.processing_class is None:
            raise ValueError("generation_metrics / generation_scorer need processing_class=tokenizer to decode the answers.")
        check_training_length(self.args.num_train_epochs, self.args.max_steps, "args.")
        self._check_backend_support()
        self._check_compile_support()
        self._check_generation_support()
        self._check_single_writer()
        self._run_lock: ckpt.RunLock | None = None  # held while this trainer writes output_dir
        self._owns_output_dir = False  # True once output_dir was checked free of other runs' state
        self.add_callback(_StrategyStepHooks(self))
        tracking.attach(self)  # MLflow / TensorBoard from report_to follow the whole stream
        for strategy in self.strategies:
            strategy.setup(self)

    def _default_data_collator(self, model: nn.Module | None, processing_class: Any) -> Any:
        """The collator used when none is passed (``None`` lets the parent Trainer build its own)."""
        return ContinualDataCollator(pad_token_id=_pad_token_id(model, processing_class))

    # --- the continual settings, also when plain TrainingArguments are passed -----------------
    def _setting(self, name: str) -> Any:
        if hasattr(self.args, name):
            return getattr(self.args, name)
        spec = ContinualTrainingArguments.__dataclass_fields__[name]
        return spec.default_factory() if callable(spec.default_factory) else spec.default

    def _check_backend_support(self) -> None:
        """Refuse strategies that cannot work on the active distributed backend, naming both."""
        from accelerate.utils import DistributedType

        backend = getattr(getattr(self, "accelerator", None), "distributed_type", None)
        if backend == DistributedType.FSDP or getattr(self, "is_fsdp_enabled", False):
            # A strategy declares FSDP2 support (``supports_fsdp``) once tests/test_fsdp.py shows it
            # ends equal to an unsharded run; the others would mix DTensor shards with whole tensors.
            self._refuse(
                lambda s: not s.supports_fsdp,
                "is not supported on FSDP: FSDP shards every parameter into a DTensor, and this strategy reads, "
                "copies or masks whole parameters or gradients. Use DDP (recipes/accelerate/multi_gpu.yaml); "
                "docs/distributed.md lists the strategies that run on FSDP2.",
            )
            save_strategy = getattr(self.args.save_strategy, "value", self.args.save_strategy)
            plugin = getattr(getattr(self.accelerator, "state", None), "fsdp_plugin", None)
            state_dict_type = str(getattr(plugin, "state_dict_type", None))
            if self._setting("save_continual_state") and save_strategy != "no" and "SHARDED_STATE_DICT" not in state_dict_type:
                # Mid-task checkpoints resume from the Trainer's sharded (DCP) model and optimizer files next
                # to clm-hf's sharded continual state (tests/test_fsdp_crash_resume.py); the Trainer's
                # FULL_STATE_DICT save failed at the first checkpoint of a 2-process FSDP2 run (gloo collective
                # mismatch, transformers 5.25 / accelerate 1.16), so that path is neither working nor tested.
                raise NotImplementedError(
                    f"save_strategy={save_strategy!r} with save_continual_state=True under FSDP needs "
                    f"fsdp_config={{'state_dict_type': 'SHARDED_STATE_DICT'}} (accelerate: fsdp_state_dict_type: "
                    f"SHARDED_STATE_DICT), got {state_dict_type.split('.')[-1]}: mid-task checkpoints resume from "
                    "the Trainer's sharded model and optimizer files. Or set save_strategy='no' (end-of-task "
                    "continual checkpoints are sharded whatever the setting); see docs/distributed.md."
                )
            return
        if backend != DistributedType.DEEPSPEED:
            return
        plugin = getattr(getattr(self.accelerator, "state", None), "deepspeed_plugin", None)
        ds_config = getattr(plugin, "hf_ds_config", None)  # a --deepspeed JSON file, when given
        stage = ds_config.get_value("zero_optimization.stage") if hasattr(ds_config, "get_value") else None
        stage = getattr(plugin, "zero_stage", None) if stage is None else stage
        # A strategy that edits ZeRO-2's gradient partition inside its optimizer step (edit_zero_gradients,
        # run by _hook_zero_optimizer), and writes weights after the step into ZeRO-2's master partition
        # (edit_zero_master_weights), runs on ZeRO-2; on ZeRO-3 the weights it reads whole are partitioned.
        zero_hook = lambda s, hook: getattr(type(s), hook) is not getattr(Strategy, hook) and stage == 2  # noqa: E731
        self._refuse(
            lambda s: ((type(s).edit_gradients is not Strategy.edit_gradients and not s.adds_loss_gradient
                        and not zero_hook(s, "edit_zero_gradients"))
                       or (type(s).after_optimizer_step is not Strategy.after_optimizer_step
                           and not zero_hook(s, "edit_zero_master_weights"))),
            "edits gradients or weights around the optimizer step, which is not supported on the DeepSpeed backend"
            + (f" with ZeRO-{stage}" if stage not in (2, None) else "") + ": "
            "DeepSpeed steps its optimizer inside backward(), before that hook runs, so the edit would be silently lost"
            + (" (GEM, A-GEM and PackNet edit ZeRO-2's gradient partitions inside its step, PackNet also its fp32 "
               "master partitions; ZeRO-1 does not partition the gradients, and ZeRO-3 also partitions the weights GEM's "
               "reference gradients are computed from and PackNet masks and prunes whole; use ZeRO-2)"
               if stage != 2 else "") + ". "
            "Train without DeepSpeed (plain DDP, one process per GPU) or use a strategy that only adds loss terms or "
            "data (replay, EWC, LwF).",
        )
        if stage == 3:
            # ZeRO-3 leaves each rank an empty placeholder of every parameter outside forward/backward.
            self._refuse(
                lambda s: not s.supports_partitioned_parameters,
                "reads or copies whole parameters (a Fisher and anchors, a teacher snapshot, columns or adapters), "
                "which is not supported on DeepSpeed ZeRO-3: it partitions every parameter across the ranks, so the "
                "strategy would see empty placeholders. Use ZeRO-2 (recipes/accelerate/deepspeed_zero2.yaml) or DDP; "
                "replay and LwF(cache_teacher=True) work on ZeRO-3.",
            )

    def _check_compile_support(self) -> None:
        """Refuse, in one line, a strategy whose options cannot train under ``torch_compile=True``."""
        if not getattr(self.args, "torch_compile", False):
            return
        for strategy in self.strategies:
            problem = strategy.torch_compile_problem()
            if problem:
                raise NotImplementedError(f"Strategy {strategy.name!r} does not support torch_compile=True: {problem}.")

    def _check_generation_support(self) -> None:
        """Refuse, before any training, a strategy that cannot generate the answers scored after each task."""
        if not self._generates():
            return
        for strategy in self.strategies:
            problem = strategy.generation_problem(self.model)
            if problem:
                raise NotImplementedError(
                    f"Strategy {strategy.name!r} cannot generate answers for generation_metrics="
                    f"{list(self._setting('generation_metrics'))!r}"
                    + (" / generation_scorer" if self.generation_scorer is not None else "")
                    + f": {problem}. Drop generation_metrics (and generation_scorer): the teacher-forced scores "
                    "(loss, token_accuracy, exact_match) need no generation."
                )

    def _check_single_writer(self) -> None:
        """Refuse a ``torchrun`` launch in which every rank believes it is the only process.

        On a machine without a GPU, ``torchrun`` without ``use_cpu=True`` leaves each rank's
        ``TrainingArguments`` non-distributed: every rank trains alone, reports ``should_save``
        and writes the same files of ``output_dir``.
        """
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and self.args.world_size == 1:
            raise RuntimeError(
                f"This process was started as one of {launched} (WORLD_SIZE={launched}, e.g. by torchrun), but the "
                "Trainer runs it as a single process (parallel mode "
                f"{getattr(self.args.parallel_mode, 'name', self.args.parallel_mode)}), so every rank would train "
                f"alone and write the same output_dir ({self.args.output_dir}). On a machine without GPUs pass "
                "use_cpu=True (clm-hf train: --training.use_cpu true) to train the ranks together with DDP on CPU, "
                "or start a single process."
            )

    def _refuse(self, unsupported: Callable[[Strategy], bool], reason: str) -> None:
        """Raise ``NotImplementedError`` naming every strategy that ``unsupported`` picks.

        It is given the strategy itself, so a support flag may depend on the options (LwF's cached
        teacher runs where its live teacher cannot).
        """
        names = [s.name for s in self.strategies if unsupported(s)]
        if names:
            raise NotImplementedError(f"Strategy {', '.join(repr(n) for n in names)} {reason}")

    def _strategies_overriding(self, hook: str) -> list[Strategy]:
        """The strategies whose class implements ``hook`` (the base class's version does nothing)."""
        default = getattr(Strategy, hook)
        return [s for s in self.strategies if getattr(type(s), hook) is not default]

    # --- gradients: every strategy edit runs before clipping ----------------------------------
    def _edit_gradients(self, model: nn.Module) -> None:
        """Run every strategy's ``edit_gradients`` once per optimizer step, before clipping.

        Clipping must see the gradient the optimizer will use: a PackNet mask zeroes the fixed
        weights' entries, which would otherwise still count in the clip norm, and a GEM projection
        must compare the memory gradients with the unclipped ``g``. Under fp16 the gradients are
        unscaled first, so every edit sees true gradients.
        """
        if self._gradients_edited:
            return
        self._gradients_edited = True
        # A loss term's gradient goes in first: the other edits must see the gradient of the whole loss.
        editors = sorted(self._strategies_overriding("edit_gradients"), key=lambda s: not s.adds_loss_gradient)
        # Under DeepSpeed ZeRO-2 some edited the gradient partition inside its step (_hook_zero_optimizer).
        editors = [s for s in editors if s not in self._zero_edited]
        if not editors:
            return
        with self._unscaled_once():
            for strategy in editors:
                strategy.edit_gradients(model)

    def _hook_zero_optimizer(self) -> None:
        """Under DeepSpeed ZeRO-2, run the strategies' ZeRO hooks inside ZeRO's optimizer step.

        DeepSpeed steps inside ``backward()``, before the Trainer's step events, on a gradient each
        rank holds only its partition of: :func:`~clm_hf.deepspeed_support.hook_zero2_step` wraps the
        step of this task's engine (each task gets a new one) so the ``edit_zero_gradients`` edits come
        first, before DeepSpeed's clipping, and ``edit_zero_master_weights`` edits each group's fp32
        master partition between its update and DeepSpeed's copy of it into the model's weights. On
        an fp16 step that overflowed (DeepSpeed skips it) nothing is edited.
        """
        self._zero_edited, self._zero_held = [], []
        editors = self._strategies_overriding("edit_zero_gradients")
        holders = self._strategies_overriding("edit_zero_master_weights")
        if not (editors or holders) or not getattr(self, "is_deepspeed_enabled", False):
            return
        engine = getattr(self, "model_wrapped", None)
        if engine is None or getattr(engine, "optimizer", None) is None:
            # These strategies' own step hooks are skipped under DeepSpeed: without the engine's step
            # to hook, their edits would be lost silently.
            names = ", ".join(dict.fromkeys(type(s).__name__ for s in [*editors, *holders]))
            raise RuntimeError(f"{names} edit(s) the gradient or the weights inside DeepSpeed ZeRO-2's optimizer step, "
                               "but at the start of training the Trainer holds no DeepSpeed engine with an optimizer.")
        from .deepspeed_support import hook_zero2_step

        model = self.model

        def edit(gradients) -> None:
            if gradients.overflowed():
                return
            for strategy in editors:
                strategy.edit_zero_gradients(model, gradients)

        def hold(master) -> None:
            for strategy in holders:
                strategy.edit_zero_master_weights(model, master)

        hook_zero2_step(engine.optimizer, edit if editors else None, hold if holders else None)
        # Their edit_gradients / after_optimizer_step would come after DeepSpeed's step: the trainer skips them,
        # decided here once per task rather than at every step.
        self._zero_edited, self._zero_held = editors, holders

    @contextlib.contextmanager
    def _unscaled_once(self) -> Iterator[None]:
        """Unscale fp16 gradients now; the Trainer's own unscale (in ``clip_grad_norm_``) then does nothing.

        ``GradScaler.unscale_`` may run once per step, and ``Accelerator.clip_grad_norm_`` calls it
        unconditionally, so it is made a no-op on this accelerator until the step is taken.
        """
        accelerator = getattr(self, "accelerator", None)
        scaler = getattr(accelerator, "scaler", None)
        if scaler is None or getattr(accelerator, "mixed_precision", None) != "fp16":
            yield
            return
        accelerator.unscale_gradients()
        accelerator.unscale_gradients = lambda optimizer=None: None  # instance attribute, see _restore_unscale
        self._scaler_unscaled = True
        yield

    def _restore_unscale(self) -> None:
        """Give the accelerator its own ``unscale_gradients`` back once this step's norm is taken."""
        if getattr(self, "_scaler_unscaled", False):
            self.accelerator.__dict__.pop("unscale_gradients", None)
            self._scaler_unscaled = False

    def _clip_grad_norm(self, model):
        self._edit_gradients(model)
        try:
            return super()._clip_grad_norm(model)
        finally:
            self._restore_unscale()

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # no clipping this step (max_grad_norm <= 0): edit before the norm is taken
            self._edit_gradients(model)
        try:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        finally:
            self._restore_unscale()

    # --- the rows of every epoch -------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Dataset | None = None):
        """The Trainer's sampler, or, when a strategy picks each epoch's rows, one that asks it every epoch."""
        sampler = super()._get_train_sampler(train_dataset)
        selectors = self._strategies_overriding("select_train_rows")
        if not selectors or not self._selecting_rows or self.current_task is None or sampler is None:
            return sampler
        if len(selectors) > 1:
            raise ValueError(
                f"Strategies {[s.name for s in selectors]} each choose the training rows of every epoch; "
                "a trainer can have only one of them."
            )
        if not isinstance(sampler, (torch.utils.data.RandomSampler, torch.utils.data.SequentialSampler)):
            raise NotImplementedError(
                f"Strategy {selectors[0].name!r} chooses the training rows of every epoch, which needs "
                f"train_sampling_strategy='random' (the default) or 'sequential'; got "
                f"{self.args.train_sampling_strategy!r}."
            )
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if selectors[0].select_train_rows(len(dataset), self.current_task, 0) is None:
            return sampler  # nothing to choose for this task (e.g. replay's buffer is still empty)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return _EpochRowsSampler(selectors[0], self.current_task, len(dataset),
                                 shuffle=isinstance(sampler, torch.utils.data.RandomSampler), seed=seed)

    # --- loss: model loss + named strategy terms ---------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's loss plus every strategy's terms (training only), each logged by name.

        The HF loss is already normalised over the whole accumulated batch when the model takes
        ``num_items_in_batch``, so a per-micro-batch penalty is divided by the number of
        accumulation steps, and a per-token term (named in the strategy's ``per_token_terms``) is
        weighted by the micro-batch's share of the batch's tokens, as the model's loss is;
        otherwise ``training_step`` divides the summed loss itself.
        """
        hidden = self._side_columns()
        model_inputs = {k: v for k, v in inputs.items() if k not in hidden}
        loss, outputs = super().compute_loss(model, model_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._watch_finite("model loss", loss)
        if model.training and self.strategies:
            scale, token_share = 1.0, None
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                scale = 1.0 / self.current_gradient_accumulation_steps
                if num_items_in_batch is not None and any(s.per_token_terms for s in self.strategies):
                    token_share = self._token_share(model, inputs, num_items_in_batch)
            for strategy in self.strategies:
                per_token = set(strategy.per_token_terms)
                for name, term in strategy.loss(model, inputs, outputs).items():
                    self._loss_terms[name].append(term.detach())
                    self._watch_finite(name, term)
                    loss = loss + term * (token_share if name in per_token and token_share is not None else scale)
        return (loss, outputs) if return_outputs else loss

    def _token_share(self, model, inputs: Mapping[str, Any], num_items_in_batch) -> torch.Tensor | float | None:
        """The factor that turns a mean over this micro-batch's supervised tokens into its part of
        the mean over the accumulated batch's: ``tokens here / num_items_in_batch``, times the
        factor HF's ``compute_loss`` multiplies its loss by when tokens are averaged across
        processes (DDP then averages the gradients). ``None`` without labels.

        The tokens are counted as HF counts ``num_items_in_batch`` (``shift_labels`` if given,
        else the labels shifted by one for a causal LM), as a tensor: no host sync.
        """
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs.get("labels")
            if labels is None:
                return None
            shifts = getattr(self, "_loss_shifts_labels", None)
            if shifts is None:  # older Trainers: causal LMs shift, seq2seq decoders do not
                shifts = not is_seq2seq(model)
            if shifts:
                labels = labels[..., 1:]
        tokens = labels.ne(-100).sum()
        total = num_items_in_batch.clamp_min(1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1)
        share = tokens / total
        if self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func):
            # Mirrors Trainer.compute_loss: the global token count, then DDP's mean over ranks.
            share = share * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
        return share

    def _watch_finite(self, name: str, value: torch.Tensor) -> None:
        """Remember a loss term to check for NaN/inf later, in one batch, without a per-step sync.

        The Trainer's ``logging_nan_inf_filter`` hides a non-finite loss from the logs; these
        checks run when the loss is logged, before every checkpoint and after every ``train()``.
        """
        self._finite_watch.append((self.state.global_step, name, value.detach()))
        if len(self._finite_watch) >= 1024:  # bounded memory when logging and saving are rare
            self._check_finite()

    def _check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first step and term whose value was NaN or inf."""
        watch, self._finite_watch = self._finite_watch, []
        if not watch:
            return
        values = torch.stack([v.float().sum() for _, _, v in watch])
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        first = int((~finite).nonzero()[0, 0])
        step, name, value = watch[first]
        task = self.current_task.name if self.current_task else "?"
        if name == "model loss":
            fix = "Lower the learning rate, check the rows (labels, token ids) and the precision (fp16 overflows)."
        else:
            fix = f"Lower the strategy's weight for '{name}' or the learning rate."
        raise FloatingPointError(
            f"The {name if name == 'model loss' else f'strategy loss term {name!r}'} became {float(values[first])} at "
            f"optimizer step {step + 1} of task '{task}'; training stopped before saving it. {fix}"
        )

    def _side_columns(self) -> set[str]:
        return {"task_id", *(c for s in self.strategies for c in s.side_columns)}

    def _set_signature_columns_if_needed(self) -> None:
        # Keep strategies' side columns when remove_unused_columns drops what forward() lacks.
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in self._side_columns() if c not in self._signature_columns]

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of every strategy loss term since the last log to training logs."""
        if "loss" in logs:
            self._check_finite()
            for strategy in self.strategies:
                for name, value in strategy.logged_values(self.model).items():
                    self._loss_terms[name].append(value.detach())
        if "loss" in logs and self._loss_terms:
            for name, values in self._loss_terms.items():
                value = torch.stack(values).mean().item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"The strategy loss term '{name}' became {value} by step {self.state.global_step} "
                        f"of task '{self.current_task.name if self.current_task else '?'}'. Lower its weight or the learning rate."
                    )
                logs[name] = value
            self._loss_terms.clear()
        super().log(logs, start_time)

    # --- tasks ------------------------------------------------------------------------------
    def _register_task(self, task_id: Any, task_name: str | None) -> TaskInfo:
        if task_id is None:
            task_id = task_name if task_name is not None else len(self.tasks)
        if not isinstance(task_id, (str, int)) or isinstance(task_id, bool):
            raise TypeError(f"task_id must be a str or an int, got {type(task_id).__name__}.")
        key = str(task_id)
        if any(t.task_id == key for t in self.tasks):
            raise ValueError(
                f"Task id '{key}' was already trained in this stream (tasks so far: {[t.task_id for t in self.tasks]}). "
                "Give every task a unique task_id."
            )
        name = task_name or self._task_names.get(key) or (key if isinstance(task_id, str) else f"task_{key}")
        self._check_display_name(key, name)
        return TaskInfo(task_id=key, name=name, index=len(self.tasks))

    def _check_display_name(self, task_id: str, name: str) -> None:
        """One display name per task: results, logs and plots are keyed by it."""
        taken = [k for k, n in self._task_names.items() if n == name]
        taken = [k for k in dict.fromkeys([*taken, *(t.task_id for t in self.tasks if t.name == name)]) if k != task_id]
        if taken:
            raise ValueError(
                f"Task '{task_id}' has display name '{name}', which task '{taken[0]}' already uses. Results and plots are "
                "keyed by display name: give every task its own task_name."
            )

    def task(self, task_id: Any) -> TaskInfo:
        """The :class:`TaskInfo` of a trained task; an unknown id raises a ``KeyError`` listing the known ones."""
        key = str(task_id)
        for task in self.tasks:
            if task.task_id == key:
                return task
        raise KeyError(f"Unknown task '{key}'. Tasks trained so far: {[t.task_id for t in self.tasks]}.")

    @contextlib.contextmanager
    def use_task(self, task_id: Any) -> Iterator[nn.Module]:
        """Make the model behave as it did for a trained task (PackNet masks, PNN columns, ...).

        >>> with trainer.use_task("reverse"):  # doctest: +SKIP
        ...     scores = trainer.evaluate_task(eval_rows)
        """
        task = self.task(task_id)
        with contextlib.ExitStack() as stack:
            for strategy in self.strategies:
                stack.enter_context(strategy.use_task(self.model, task))
            yield self.model

    def _prepare_rows(self, dataset: Any, what: str, *, scoring: bool = False) -> Dataset | IterableDataset:
        """Tokenize the rows whatever their layout (:mod:`clm_hf.layouts`), then validate them.

        ``scoring`` rows are eval rows: their labels always cover the answer only, whatever
        ``answer_only_loss`` says for training, so the scores never include the prompt; they are
        collated by clm-hf's own collator, so they always carry their labels. A streamed
        (``IterableDataset``) eval split is read once into memory; a streamed train split stays a
        stream, tokenized as it is read, and its first rows are checked.
        """
        if isinstance(dataset, DataLoader):
            dataset = dataset_from_loader(dataset)
        if isinstance(dataset, IterableDataset) and scoring:
            dataset = Dataset.from_list(list(dataset))
        seq2seq = is_seq2seq(self.model)
        if isinstance(dataset, (Dataset, IterableDataset)):
            dataset = tokenize_rows(dataset, self.processing_class, seq2seq=seq2seq,
                                    answer_only_loss=scoring or self._setting("answer_only_loss"),
                                    what=what)
        checked = dataset
        if isinstance(dataset, IterableDataset):
            self._check_streaming(what)
            checked = Dataset.from_list(list(dataset.take(_STREAM_CHECK_ROWS)))  # the first rows stand for the stream
            what = f"{what} (its first {len(checked)} rows)"
        config = getattr(unwrap_model(self.model), "config", None)
        vocab = getattr(config, "vocab_size", None)
        validate_lm_dataset(checked, what=what, vocab_size=vocab, causal=not seq2seq, training=not scoring)
        if isinstance(self.data_collator, UserCollator) and not scoring:
            self._check_collator_labels(checked, what)
        if not seq2seq:
            check_row_lengths(checked, getattr(config, "max_position_embeddings", None), what)
        if scoring or not self.args.remove_unused_columns:  # eval rows always reach the collator whole
            check_tensor_columns(checked, what, keep=self._side_columns())
        return dataset

    def _check_streaming(self, what: str) -> None:
        """A stream has no length: it trains ``max_steps`` steps, with strategies that read its rows once."""
        if self.args.max_steps is None or self.args.max_steps <= 0:
            raise ValueError(f"The {what} is a streaming IterableDataset, which has no length, so epochs cannot be "
                             "counted: set max_steps > 0 (steps per task).")
        names = [s.name for s in self.strategies if not s.supports_streaming]
        if names:
            raise NotImplementedError(
                f"Strategy {', '.join(repr(n) for n in names)} cannot train the streamed {what} (IterableDataset): it "
                "reads the task's rows again after training (a Fisher estimate, a memory, a retraining pass or a "
                "teacher cache), and a stream is read once. Load the task as a datasets.Dataset, or use replay, LwF "
                "(live teacher), PNN or O-LoRA.")

    def _check_collator_labels(self, rows: Dataset, what: str) -> None:
        """The user's data collator must turn two of the rows into a batch with labels, before any training."""
        collator = self.data_collator
        sample = [{k: v for k, v in rows[i].items() if k not in self._side_columns()} for i in range(min(2, len(rows)))]
        name = type(collator.collator).__name__
        try:
            collator.probe(sample)
            batch = collator(sample)
        except Exception as err:  # the collator's own error says little about which rows it choked on
            raise ValueError(
                f"The data_collator ({name}) fails on two rows of the {what}: {type(err).__name__}: {err}. Rows with "
                "a prompt/completion or chat loss mask keep their 'labels' (-100 outside the answer): use a collator "
                "that pads labels (DataCollatorForSeq2Seq), or leave data_collator unset."
            ) from err
        if collator.builds_labels and not all(_full_sequence(r) for r in sample):
            # Rows of a prompt/completion or chat layout: the collator would replace their mask by a full-sequence loss.
            raise ValueError(
                f"The data_collator ({name}) builds its own labels (a loss on every token), but the {what} has a loss "
                "mask (-100 outside the completion or the assistant turns) that it would silently replace. Use a "
                "collator that keeps labels (DataCollatorForSeq2Seq), or leave data_collator unset."
            )
        if batch.get("labels") is None:
            raise ValueError(
                f"The data_collator ({name}) returns no 'labels' for the {what}, so there is nothing to learn. Use a "
                "collator that builds labels (DataCollatorForLanguageModeling(tokenizer, mlm=False)) or keeps them "
                "(DataCollatorForSeq2Seq), or leave data_collator unset."
            )

    def add_eval_task(self, task_id: Any, eval_dataset: Any, task_name: str | None = None) -> None:
        """Register a task's evaluation rows, so it is scored after every task (also before it is trained)."""
        key = str(task_id)
        name = task_name or self._task_names.get(key) or (key if isinstance(task_id, str) else f"task_{key}")
        self._check_display_name(key, name)
        self._eval_sets[key] = self._prepare_rows(eval_dataset, f"eval dataset of task '{name}'", scoring=True)
        self._eval_given[key] = eval_dataset
        self._task_names[key] = name
        if self.results is None:
            self.results = ContinualResults(task_names=[], primary_metric=self._setting("primary_metric"))
        if name not in self.results.task_names:
            self.results.add_task(name)

    def add_reference_set(self, name: str, dataset: Any) -> None:
        """Register a reference eval set: scored before the first task and after every task, never trained on.

        It measures general ability (e.g. perplexity on general text) next to the tasks' scores; its
        scores are kept in their own columns of the results (``results.reference``), tables and plots,
        and never enter ACC/BWT/FWT/forgetting.

        Args:
            name (`str`): The set's name in results, logs and plots.
            dataset (`datasets.Dataset`): ``text`` rows (scored on the whole text: loss, perplexity,
                token accuracy), raw ``prompt``/``answer`` rows, or tokenized ``input_ids``/``labels``
                rows (prompt/answer rows also get exact match and the ``gen_*`` scores).

        Example:

        >>> from datasets import Dataset
        >>> trainer.add_reference_set("general", Dataset.from_dict({"text": ["a b c d", "h g f e"]}))  # doctest: +SKIP
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"A reference set's name must be a non-empty str, got {name!r}.")
        what = f"reference set '{name}'"
        if isinstance(dataset, DataLoader):
            dataset = dataset_from_loader(dataset)
        if isinstance(dataset, Dataset) and "input_ids" not in dataset.column_names and "text" in dataset.column_names:
            dataset = tokenize_full_text(dataset, self.processing_class, is_seq2seq(self.model), what)
        self._reference_sets[name] = self._prepare_rows(dataset, what, scoring=True)

    def evaluate_reference_sets(self) -> dict[str, dict[str, float]]:
        """Score every reference set with the model as it is now (outside any task's ``use_task``).

        Rows without a prompt (whole-text rows) get the loss-based scores only: exact match and the
        generated-text scores need an answer to compare with.
        """
        scores: dict[str, dict[str, float]] = {}
        for name, rows in self._reference_sets.items():
            has_prompt = is_seq2seq(self.model) or all(labels[0] == -100 for labels in rows["labels"])
            values = self.evaluate_task(rows, description=f"reference {name}", generate=has_prompt)
            if not has_prompt:
                values.pop("exact_match", None)
            scores[name] = values
        return scores

    def train_task(
        self,
        train_dataset: Dataset | DataLoader | None = None,
        eval_dataset: Dataset | DataLoader | None = None,
        task_id: str | int | None = None,
        task_name: str | None = None,
        num_epochs: float | None = None,
        *,
        train_loader: DataLoader | None = None,
        val_loader: DataLoader | None = None,
        resume_from_checkpoint: str | bool | None = None,
    ) -> TrainOutput:
        """Train one task of the stream, then evaluate every task and save the continual state.

        Each call starts a fresh optimizer and learning-rate schedule.

        Args:
            train_dataset (`Dataset`, `IterableDataset` or `DataLoader`): The task's rows in any layout of
                :mod:`clm_hf.layouts` (``text``, ``prompt``/``completion``, ``messages``, ``input_ids``); text
                needs ``processing_class``, a stream needs ``max_steps``.
            eval_dataset (`Dataset` or `DataLoader`, *optional*): Rows to score this task on.
            task_id (`str` or `int`, *optional*): Unique id; defaults to the task's position.
            task_name (`str`, *optional*): Display name; defaults to the id.
            num_epochs (`float`, *optional*): Overrides ``args.num_train_epochs`` for this task.
            train_loader / val_loader: The original quick start's names for the two datasets.
            resume_from_checkpoint: Passed to ``Trainer.train`` to resume inside this task.

        Returns:
            `TrainOutput` of the task's ``train()``.

        Example:

        >>> trainer.train_task(train_rows, eval_rows, task_id="reverse", num_epochs=2)  # doctest: +SKIP
        """
        if train_dataset is not None and train_loader is not None:
            raise ValueError("Pass the training data once: train_dataset or train_loader.")
        if eval_dataset is not None and val_loader is not None:
            raise ValueError("Pass the evaluation data once: eval_dataset or val_loader.")
        train_dataset = train_dataset if train_dataset is not None else train_loader
        eval_dataset = eval_dataset if eval_dataset is not None else val_loader
        if train_dataset is None:
            raise ValueError("train_task needs training data: train_dataset= (or train_loader=).")
        check_training_length(num_epochs, self.args.max_steps, "train_task: ", "num_epochs")
        self._check_generation_support()
        task = self._register_task(task_id, task_name)
        task.train_dataset = self._prepare_rows(train_dataset, f"train dataset of task '{task.name}'")
        # Rows are checked first, so refused input leaves nothing in output_dir, not even the lock.
        # A trainer that already holds tasks (restored by from_pretrained or an earlier fit) continues
        # its own run; a fresh one must not start inside another run's checkpoints. The lock stays
        # held between train_task calls and is released when the trainer is garbage-collected.
        self._claim_output_dir(Path(self._base_output_dir) if self.tasks else None)
        if eval_dataset is not None:
            self.add_eval_task(task.task_id, eval_dataset, task.name)
        elif self.results is None or task.name not in self.results.task_names:
            if self.results is None:
                self.results = ContinualResults(task_names=[], primary_metric=self._setting("primary_metric"))
            self.results.add_task(task.name)
        self._task_names[task.task_id] = task.name
        if isinstance(train_loader, DataLoader) and train_loader.batch_size:
            self.args.per_device_train_batch_size = train_loader.batch_size
        return self._run_task(task, num_epochs=num_epochs, resume_from_checkpoint=resume_from_checkpoint)

    def _run_task(self, task: TaskInfo, *, num_epochs: float | None, resume_from_checkpoint: Any = None) -> TrainOutput:
        self.tasks.append(task)
        self.current_task = task
        if self.results is not None and task.name in self.results.task_names:
            # The metrics read column j as the j-th trained task: an eval set registered before
            # others (add_eval_task) takes its training position now.
            self.results.move_task(task.name, task.index)
        logger.info("clm-hf: training task %d '%s' (%s rows)", task.index, task.name,
                    len(task.train_dataset) if isinstance(task.train_dataset, Dataset) else "streamed")
        if task.index == 0:
            logger.info("clm-hf: device %s, mixed precision %s, %d process(es)%s", self.args.device,
                        self.args.mixed_precision, self.args.world_size,
                        ", FSDP" if getattr(self, "is_fsdp_enabled", False) else "")
        for strategy in self.strategies:
            self._set_model(strategy.prepare_model(self.model, task))
        rows = task.train_dataset
        for strategy in self.strategies:
            rows = strategy.prepare_train_dataset(rows, task)
        self.train_dataset = rows
        # A new task starts from a fresh optimizer and schedule: old moments would drag the new
        # task towards the previous one, and parameter sets may have changed (PNN, PackNet).
        self.optimizer, self.lr_scheduler = None, None
        for strategy in self.strategies:
            strategy.before_task(self, task)
        with self._task_scope(task, num_epochs):
            if self._pending_rng is not None:
                # Resuming inside the task: the RNG as it was at that checkpoint, after the hooks above.
                ckpt.load_rng(*self._pending_rng)
                self._pending_rng = None
            self._drop_stale_wrapper()
            if isinstance(resume_from_checkpoint, (str, os.PathLike)):
                check_checkpoint_matches_model(unwrap_model(self.model), resume_from_checkpoint)
            self._selecting_rows = True
            try:
                output = self._task_train(resume_from_checkpoint=resume_from_checkpoint)
            finally:
                self._selecting_rows = False
        self._check_finite()
        for strategy in self.strategies:
            strategy.after_task(self, task)
        self.current_task = None
        task.resumed = False
        self._evaluate_stream(row=True)
        if self._setting("save_continual_state"):
            self.save_continual_checkpoint()
        tracking.task_finished(self)  # results files and plots to MLflow / TensorBoard
        hub.task_finished(self)  # push after the task when args.push_to_hub
        return output

    def _task_train(self, **kwargs: Any) -> TrainOutput:
        """The Trainer's own ``train()``, for the task (or phase) in progress."""
        previous, self._in_task_train = self._in_task_train, True
        try:
            return self.train(**kwargs)
        finally:
            self._in_task_train = previous

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> TrainOutput:
        """``Trainer.train``, continual: a direct call trains ``self.train_dataset`` as the next task.

        A script written for ``Trainer`` that sets ``trainer.train_dataset = task_k`` (and
        optionally ``trainer.eval_dataset = eval_k``) and calls ``trainer.train()`` once per task
        gets a continual run: each call is :meth:`train_task` on those rows with the id
        ``task-<k>`` (k = tasks trained so far), so every strategy's hooks run, every registered
        eval set is scored after the call and ``results.json`` and the continual checkpoint are
        written. ``self.eval_dataset`` becomes the new task's eval set unless it is the object
        a previous call already registered (a fixed eval set is then only scored by
        ``eval_strategy``, as the Trainer does). ``resume_from_checkpoint`` resumes inside that
        task from its Trainer checkpoint (``True``: the newest in ``<output_dir>/task-<k>``).

        Args:
            resume_from_checkpoint (`str` or `bool`, *optional*): As in ``Trainer.train``, for this task.
            trial: Not supported (hyperparameter search would treat each trial as a new task).
            ignore_keys_for_eval (`list[str]`, *optional*): Not supported on a direct call (use
                ``Trainer.train`` semantics through :meth:`train_task` instead).

        Returns:
            `TrainOutput` of the task.

        Example:

        >>> for rows in (copy_rows, reverse_rows):  # doctest: +SKIP
        ...     trainer.train_dataset = rows
        ...     trainer.train()  # task-0, task-1: strategies active, results recorded
        >>> trainer.results.task_names  # doctest: +SKIP
        ['task-0', 'task-1']
        """
        if self._in_task_train:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        if trial is not None or ignore_keys_for_eval is not None or kwargs:
            given = [n for n, v in (("trial", trial), ("ignore_keys_for_eval", ignore_keys_for_eval)) if v is not None]
            raise TypeError(f"trainer.train() trains the next task of the stream and does not take "
                            f"{given + sorted(kwargs)}; call train_task() or fit() for the continual options.")
        if self.train_dataset is None:
            raise ValueError("trainer.train() trains trainer.train_dataset as the next task of the stream, but it is "
                             "None: set trainer.train_dataset = rows (or call train_task(rows) / fit(stream)).")
        if resume_from_checkpoint and not self.tasks and run_state_paths(self._base_output_dir):
            raise ValueError(
                f"trainer.train(resume_from_checkpoint=...) on a fresh trainer: {self._base_output_dir} holds a "
                "continual run whose earlier tasks this trainer does not have. Rebuild the trainer with its state "
                f"({type(self).__name__}.from_pretrained('{self._base_output_dir}', ...)) and call train() for "
                "the next task, or resume the whole stream with fit(stream, resume_from_checkpoint=True)."
            )
        task_id = f"task-{len(self.tasks)}"
        source = self.train_dataset
        if source is self._direct_sources.get("train"):
            logger.warning("clm-hf: trainer.train() got the same train_dataset as the previous call; training it "
                           "again as the new task '%s'.", task_id)
        eval_source = self.eval_dataset if isinstance(self.eval_dataset, Dataset) else None
        if eval_source is not None and eval_source is self._direct_sources.get("eval"):
            eval_source = None  # the same object again: a fixed eval set, not this task's own
        if not self._direct_train_logged:
            self._direct_train_logged = True
            logger.warning(
                "clm-hf: trainer.train() trains trainer.train_dataset as the next task of the continual stream "
                "('%s', strategies %s); each later call is the task after it. Results go to %s. Use fit() or "
                "train_task() to name the tasks.", task_id, [s.name for s in self.strategies] or "none",
                os.path.join(self._base_output_dir, RESULTS_NAME))
        self._direct_sources = {"train": source, "eval": self.eval_dataset}
        try:
            return self.train_task(source, eval_source, task_id=task_id, resume_from_checkpoint=resume_from_checkpoint)
        finally:
            # The task leaves the strategy-prepared rows (e.g. mixed with replay) in train_dataset;
            # give the user's own rows back, as a plain Trainer leaves them.
            self.train_dataset = source

    def run_training_phase(self, dataset: Dataset, *, num_epochs: float, phase: str) -> TrainOutput:
        """Run an extra short ``train()`` inside the current task (e.g. PackNet's retraining).

        It uses a fresh optimizer and the same hooks; checkpoints go to a ``phase`` sub-folder.
        """
        task = self.current_task or (self.tasks[-1] if self.tasks else None)
        if task is None:
            raise RuntimeError("run_training_phase needs a task in progress.")
        previous, self.train_dataset = self.train_dataset, dataset
        self.optimizer, self.lr_scheduler = None, None
        try:
            with self._task_scope(task, num_epochs, suffix=f"-{phase}"):
                self._drop_stale_wrapper()
                output = self._task_train()
            self._check_finite()
            return output
        finally:
            self.train_dataset = previous
            self.optimizer, self.lr_scheduler = None, None

    @contextlib.contextmanager
    def _task_scope(self, task: TaskInfo, num_epochs: float | None, suffix: str = "") -> Iterator[None]:
        # Trainer checkpoints of each task go to their own folder, since global_step restarts.
        saved_dir, saved_epochs = self.args.output_dir, self.args.num_train_epochs
        self.args.output_dir = os.path.join(self._base_output_dir, f"task-{task.index:03d}{suffix}")
        if num_epochs is not None:
            self.args.num_train_epochs = num_epochs
        try:
            yield
        finally:
            self.args.output_dir, self.args.num_train_epochs = saved_dir, saved_epochs

    def _drop_stale_wrapper(self) -> None:
        """Let the next ``train()`` wrap the model anew (DDP, DeepSpeed) instead of reusing the last task's.

        DDP fixes the parameters it all-reduces when it is built, and the Trainer reuses its wrapper
        across ``train()`` calls. Strategies change that set between tasks (PNN adds a column or an
        adapter, PackNet freezes the shared weights): under a stale wrapper a new parameter's
        gradient is never averaged and the ranks silently drift apart. A fresh wrapper also
        broadcasts rank 0's weights, so every task starts in step.
        """
        ddp = nn.parallel.DistributedDataParallel
        models = getattr(self.accelerator, "_models", None)
        if isinstance(models, list):  # let old wrappers (and their gradient buckets) be freed
            models[:] = [m for m in models if not isinstance(m, ddp)]
        if isinstance(self.model_wrapped, ddp):
            self.model_wrapped = self.model
        if getattr(self, "is_deepspeed_enabled", False) and self.model_wrapped is not self.model:
            # The Trainer cannot train() twice under DeepSpeed: the second call finds the last
            # engine, prepares only a new optimizer, and backward() fails on a missing engine.
            # Each task gets a new engine (and its optimizer) around the same module.
            if isinstance(models, list):
                models[:] = [m for m in models if m is not self.model_wrapped]
            self.accelerator.deepspeed_engine_wrapped = None
            self.model_wrapped = self.model
            self.deepspeed = None

    def _set_model(self, model: nn.Module) -> None:
        if model is not self.model:
            self.model = model
            self.model_wrapped = model

    # --- evaluation -----------------------------------------------------------------------------
    def _generates(self) -> bool:
        """Whether every evaluation also scores generated answers (``args.generation_metrics`` or a scorer)."""
        return bool(self._setting("generation_metrics")) or self.generation_scorer is not None

    def evaluate_task(self, dataset: Dataset, *, description: str | None = None, generate: bool = True) -> dict[str, float]:
        """Score the model as it is now on rows, with the Trainer's evaluation settings.

        Rows in any layout of :mod:`clm_hf.layouts` (``prompt``/``completion``, ``messages``, ...) are
        tokenized first, as :meth:`evaluate` does (labels on the answer only); tokenized rows
        (``input_ids``/``labels``) are scored as they are.

        The rows go through the Trainer's evaluation DataLoader (``per_device_eval_batch_size``,
        or ``continual_eval_batch_size`` when set; the collator; split across processes), sorted
        by length unless ``continual_eval_sort_by_length=False`` (scores are the same; a causal
        LM's head skips the positions before the batch's first answer token unless
        ``compute_metrics`` or ``preprocess_logits_for_metrics`` is set), each
        forward pass runs under the Trainer's autocast, and the per-row counts of every process
        are gathered, so all ranks return the scores of all rows. ``compute_metrics`` (and
        ``preprocess_logits_for_metrics``) given to the trainer add their keys to the scores.
        The answer-token log-likelihood is computed in chunks (:func:`~clm_hf.evaluation.answer_nll`):
        no full-vocabulary float32 log-softmax of the batch is ever held. When
        ``args.generation_metrics`` or ``generation_scorer`` ask for them and ``generate`` is true,
        the ``gen_*`` scores of generated answers are added
        (:func:`~clm_hf.generation_eval.evaluate_generation`).
        """
        # Raw prompt/answer (text, messages) rows are tokenized as evaluate() and the per-task scoring do.
        dataset = self._rows_for_evaluate(dataset, description or "dataset given to evaluate_task")
        accelerator = self.accelerator
        batch_size = self._setting("continual_eval_batch_size") or self.args.eval_batch_size
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False  # score every row
        # A user's training collator may build its own labels: scoring pads with clm-hf's, labels kept.
        collator = self.data_collator
        if self._user_collator:
            self.data_collator = self._scoring_collator
        try:
            # Rows of similar length batched together (longest first): few pad tokens are computed.
            # The scorer puts the rows back in the dataset's order (gather_for_metrics keeps the
            # sampler's order across processes).
            order = length_sorted_order(dataset, is_seq2seq(self.model)) if self._setting("continual_eval_sort_by_length") \
                else list(range(len(dataset)))
            loader = self._get_dataloader(dataset=dataset, description="Continual scoring", batch_size=batch_size,
                                          sampler_fn=lambda _: _OrderedSampler(order))
        finally:
            self.args.dataloader_drop_last, self.data_collator = drop_last, collator

        def gather(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if accelerator.num_processes > 1:  # rows of different lengths on each rank: pad before gathering
                tensors = {k: accelerator.pad_across_processes(v, dim=1, pad_index=-100) if v.dim() > 1 else v
                           for k, v in tensors.items()}
            return accelerator.gather_for_metrics(tensors)

        compute_metrics = self.compute_metrics
        if compute_metrics is not None and self.args.batch_eval_metrics:  # one call with every row: the last one
            compute_metrics = functools.partial(compute_metrics, compute_result=True)
        scorer = TaskScorer(self._setting("eval_metrics"), self.task_metrics, compute_metrics=compute_metrics,
                            preprocess_logits_for_metrics=self.preprocess_logits_for_metrics, gather=gather,
                            order=order, what=description or "eval dataset")
        model, seq2seq, hidden = self.model, is_seq2seq(self.model), self._side_columns()
        trim = compute_metrics is None and self.preprocess_logits_for_metrics is None
        # Iterating a DataLoader draws a seed from the global RNG: fork it, so how many eval sets are
        # scored between tasks never changes the training randomness of the next task (or a resume).
        with torch.random.fork_rng(devices=[]), eval_mode(model), torch.inference_mode():
            for batch in tqdm(loader, desc=description, disable=self.args.disable_tqdm, leave=False):
                batch = self._prepare_inputs(batch)
                # The same autocast as Trainer.evaluate: its own context plus Accelerate's mixed precision.
                # No logits for the prompt positions before the batch's first answer token, unless
                # compute_metrics / preprocess_logits_for_metrics expect the whole sequence.
                start = first_scored_logit(batch["labels"], seq2seq) if trim else 0
                with self.autocast_smart_context_manager(), accelerator.autocast():
                    logits = forward_logits(model, batch, seq2seq, hidden, logits_from=start)
                scorer.add(logits, batch["labels"][:, start:], seq2seq)
                del logits
        scores = scorer.result()
        if generate and self._generates():
            scores.update(evaluate_generation(
                self.model, dataset, self.processing_class, metrics=self._setting("generation_metrics"),
                scorer=self.generation_scorer, max_new_tokens=self._setting("generation_max_new_tokens"),
                num_beams=self._setting("generation_num_beams"), batch_size=batch_size,
                device=self.args.device, what=description or "eval dataset", disable_progress=self.args.disable_tqdm,
            ))
        return scores

    def evaluate_tasks(self) -> dict[str, dict[str, float]]:
        """Score every registered task: trained ones under ``use_task``, unseen ones as the model is."""
        trained = {t.task_id for t in self.tasks if t is not self.current_task}
        scores: dict[str, dict[str, float]] = {}
        for task_id, rows in self._eval_sets.items():
            name = self._task_names[task_id]
            scope = self.use_task(task_id) if task_id in trained else contextlib.nullcontext()
            with scope:
                scores[name] = self.evaluate_task(rows, description=f"eval {name}")
        return scores

    def evaluate(self, eval_dataset: Dataset | dict[str, Dataset] | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval", **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``, falling back on the stream's eval sets when no eval set is given.

        With ``eval_dataset`` (here or to the trainer) it is exactly ``Trainer.evaluate``. Without:

        - inside a task (``eval_strategy="steps"``/``"epoch"``), the task's own eval set, given to
          ``fit()``/``train_task``, with the usual ``eval_<metric>`` keys (``metric_for_best_model``
          works as with a plain Trainer);
        - outside a task (e.g. after ``fit()``), every registered task's eval set, trained tasks
          under :meth:`use_task`, with ``eval_<task name>_<metric>`` keys as for a dict of eval sets.

        Example:

        >>> trainer.fit(stream)  # doctest: +SKIP
        >>> trainer.evaluate()["eval_copy_loss"]  # doctest: +SKIP
        """
        if eval_dataset is not None or self.eval_dataset is not None:
            given = eval_dataset if eval_dataset is not None else self.eval_dataset
            # Raw prompt/answer rows (as fit() takes them) are tokenized as the per-task scoring does.
            if isinstance(given, dict):
                given = {k: self._rows_for_evaluate(v, k) for k, v in given.items()}
            else:
                given = self._rows_for_evaluate(given, "eval_dataset")
            return super().evaluate(given, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix, **kwargs)
        task = self.current_task
        if task is not None:
            rows = self._eval_sets.get(task.task_id)
            if rows is None:
                raise ValueError(
                    f"evaluate() ran inside task '{task.name}' (eval_strategy={getattr(self.args.eval_strategy, 'value', self.args.eval_strategy)!r}), but that task "
                    "has no eval set and the trainer has no eval_dataset. Give the task one (fit: {'train': ..., "
                    "'eval': ...}; train_task(rows, eval_rows)), pass eval_dataset= to the trainer, or set "
                    "eval_strategy='no'."
                )
            return super().evaluate(rows, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix, **kwargs)
        if not self._eval_sets:
            raise ValueError("evaluate() needs an eval set: pass eval_dataset=, give the trainer one, or give the "
                             "stream's tasks eval sets (fit with 'eval' splits, add_eval_task).")
        trained = {t.task_id for t in self.tasks}
        metrics: dict[str, float] = {}
        for task_id, rows in self._eval_sets.items():
            name = self._task_names[task_id]
            with self.use_task(task_id) if task_id in trained else contextlib.nullcontext():
                metrics.update(super().evaluate(rows, ignore_keys=ignore_keys,
                                                metric_key_prefix=f"{metric_key_prefix}_{name}", **kwargs))
        return metrics

    def _rows_for_evaluate(self, dataset: Any, what: str) -> Any:
        if isinstance(dataset, Dataset) and "input_ids" not in dataset.column_names:
            return self._prepare_rows(dataset, what, scoring=True)
        return dataset

    def _evaluate_stream(self, *, row: bool) -> None:
        if self.results is None:
            return
        if not (self._eval_sets or self._reference_sets):
            if row:  # a row of None all the same: the matrices keep one row per trained task, in stream order
                self.results.add_row({m: [None] * len(self.results.task_names) for m in self._setting("eval_metrics")})
                self._save_results()
            return
        scores = self.evaluate_tasks()
        reference = self.evaluate_reference_sets()
        metrics = list(self._setting("eval_metrics")) + list(self.task_metrics)
        metrics += [m for s in scores.values() for m in s if m not in metrics]  # compute_metrics' and gen_* keys
        metrics = list(dict.fromkeys(metrics))
        table = {m: [scores[n].get(m) if n in scores else None for n in self.results.task_names] for m in metrics}
        for name in self.task_metrics:
            self.results.higher_is_better.setdefault(name, True)
        if reference:
            self.results.reference_metric = self._setting("reference_metric")
        if row:
            self.results.add_row(table, reference=reference or None)
            stage = f"after_{self.tasks[-1].name}"
        else:
            self.results.set_baseline(table, reference=reference or None)
            stage = "baseline"
        logs = {f"cl/{stage}/{n}/{m}": v for n, s in scores.items() for m, v in s.items()}
        logs.update({f"cl/{stage}/reference/{n}/{m}": v for n, s in reference.items() for m, v in s.items()})
        if row:
            logs.update({f"cl/{k}": v for k, v in self.results.summary().items() if v is not None})
        self.log(logs)
        if row:
            logger.info("clm-hf: after task '%s': %s", self.tasks[-1].name,
                        {n: round(s[self.results.primary_metric], 4) for n, s in scores.items()})
            # Once per trainer: a summary on a metric that never moves reads as "no forgetting".
            stalled = None if self._warned_stalled_metric else self.results.stalled_primary_metric()
            if stalled is not None:
                self._warned_stalled_metric = True
                logger.warning("clm-hf: %s", stalled)
        self._save_results()

    def _save_results(self) -> None:
        if self.results is not None and self.args.should_save:
            os.makedirs(self._base_output_dir, exist_ok=True)
            self.results.metadata["strategies"] = [{"name": s.name, **s.config.to_dict()} for s in self.strategies]
            self.results.save(os.path.join(self._base_output_dir, "results.json"))

    # --- the whole stream -------------------------------------------------------------------------
    def fit(
        self,
        tasks: Mapping[str, Any] | Sequence[Any],
        resume_from_checkpoint: str | bool | None = None,
        num_epochs: float | None = None,
        force_resume: bool = False,
        restart_on_damage: bool = False,
        reference_sets: Mapping[str, Any] | None = None,
    ) -> ContinualResults:
        """Train a whole stream of tasks, evaluating every task after each one.

        On a trainer that already trained tasks (an earlier ``fit``, ``train_task``,
        ``from_pretrained``), without ``resume_from_checkpoint``, the stream continues: give only
        the new tasks, or the whole stream in order (the trained task ids first, which are
        skipped); ``results`` keep their rows and grow. A trained task that has no eval set yet
        (after ``from_pretrained``) gets the stream's, so it is scored after the new tasks. A list
        names its entries by position (``'0'``, ``'1'``, ...) unless they carry ``task_id`` or
        ``name``: such a list must be the whole stream (a warning names the entries skipped); use
        a dict to give only new tasks. Any other stream raises a ``ValueError`` naming the trained
        ids and the given ones. Tasks added by a later ``fit`` have no FWT (``None``): the
        baseline is the initial model's, taken once before the first task. A task without an eval
        set is trained but not scored: a warning names it when ``fit`` starts.

        Args:
            tasks: Either a dict ``{task name: DatasetDict / {"train": ..., "eval": ...} / (train, eval)}``
                or a list of such entries (``{"name", "train", "eval"}`` dicts or ``(train, eval)`` pairs).
            resume_from_checkpoint (`str` or `bool`, *optional*): ``True`` continues from the newest
                valid checkpoint in ``args.output_dir``; a path continues from that run folder or
                checkpoint.
            num_epochs (`float`, *optional*): Epochs per task, overriding ``args.num_train_epochs``.
            force_resume (`bool`, *optional*): Resume even though the strategies' settings changed
                since the checkpoint was written (the strategy list itself must be the same).
            restart_on_damage (`bool`, *optional*): When resuming finds checkpoints but every one is
                damaged, train the stream again from its first task instead of raising
                :class:`~clm_hf.state.CheckpointError`.
            reference_sets (`dict[str, Dataset]`, *optional*): Name -> eval set scored before the first
                task and after every task but never trained on (general ability), see
                :meth:`add_reference_set`. Pass them again when resuming.

        Returns:
            [`ContinualResults`]: the score matrices and summary metrics, also written to
            ``<output_dir>/results.json``.

        Example:

        >>> from clm_hf.tasks import make_suite
        >>> results = trainer.fit(make_suite(["copy", "reverse", "sort"]))  # doctest: +SKIP
        >>> results.summary()["bwt"]  # doctest: +SKIP
        """
        check_training_length(num_epochs, self.args.max_steps, "fit: ", "num_epochs")
        if reference_sets is not None and not isinstance(reference_sets, Mapping):
            raise TypeError(f"reference_sets must be a dict name -> dataset, got {type(reference_sets).__name__}.")
        self._check_generation_support()
        # A trainer that already trained tasks (an earlier fit, train_task, from_pretrained) continues
        # its stream when not resuming: the trained tasks are skipped and the results grow.
        continuing = bool(self.tasks) and not resume_from_checkpoint
        specs = self._plan_stream(tasks, continuing=continuing)
        for name, dataset in (reference_sets or {}).items():
            self.add_reference_set(name, dataset)
        resume_run = None
        if resume_from_checkpoint:
            resume_run = resolve_run_dir(self._base_output_dir if resume_from_checkpoint is True else resume_from_checkpoint)[0]
        self._claim_output_dir(resume_run)
        try:
            mid_task_checkpoint = None
            if resume_from_checkpoint:
                mid_task_checkpoint = self.resume_stream(resume_from_checkpoint, specs, force=force_resume,
                                                         restart_on_damage=restart_on_damage)
            elif self._setting("eval_before_training") and not continuing:  # the baseline is taken once
                self._evaluate_stream(row=False)
            # Resuming restored the stream's first tasks (their ids checked against it), continuing
            # checked they open it: either way the trained ids are the ones to skip.
            trained = {t.task_id for t in self.tasks}
            self._announce_unmeasured(specs, trained, continuing=continuing)
            for index, spec in enumerate(specs):
                if spec["task_id"] in trained:
                    continue
                task = self._register_task(spec["task_id"], spec["name"])
                task.train_dataset = self._prepare_rows(spec["train"], f"train dataset of task '{task.name}'")
                resume = None
                if mid_task_checkpoint is not None and index == mid_task_checkpoint[0]:
                    resume = str(mid_task_checkpoint[1])
                    task.resumed = True
                self._run_task(task, num_epochs=num_epochs, resume_from_checkpoint=resume)
        finally:
            self._release_output_dir()
        return self.results

    def _announce_unmeasured(self, specs: list[dict[str, Any]], trained: set[str], *, continuing: bool) -> None:
        """Before a stream trains, say which of its scores will be missing: tasks without an eval set (no
        column, or no BWT for a trained one) and, when continuing, new tasks without a baseline (no FWT)."""
        for spec in specs:
            if spec["task_id"] in self._eval_sets:
                continue
            if spec["task_id"] in trained:
                logger.warning("clm-hf: trained task '%s' has no eval set: it is not scored after the next tasks, "
                               "so its forgetting (BWT) is not measured. Give its eval set in the stream (fit: "
                               "{'train': ..., 'eval': ...}) or from_pretrained(eval_datasets=...).",
                               self.task(spec["task_id"]).name)
            else:
                logger.warning("clm-hf: task '%s' has no eval set: it is trained but never scored, so its column "
                               "of the score matrices stays empty. Give it one (fit: {'train': ..., 'eval': ...}) "
                               "to measure it.", spec["name"])
        if not (continuing and self.results.baseline):
            return

        def has_baseline(task_id: str) -> bool:
            column = self.results.task_names.index(self._task_names[task_id])
            return any(len(v) > column and v[column] is not None for v in self.results.baseline.values())

        added_later = [s["name"] for s in specs if s["task_id"] not in trained and s["task_id"] in self._eval_sets
                       and not has_baseline(s["task_id"])]
        if added_later:
            # The baseline is the initial model's score, gone once tasks were trained: FWT cannot
            # be measured for tasks that join the stream later.
            logger.info("clm-hf: task(s) %s join a stream that already trained tasks: the initial model's "
                        "baseline on them was never taken, so their FWT is None (ACC, BWT and forgetting "
                        "are measured).", added_later)

    def _plan_stream(self, tasks: Mapping[str, Any] | Sequence[Any], *, continuing: bool = False) -> list[dict[str, Any]]:
        """Register every task of a stream (names, eval rows) before any training.

        ``continuing``: this trainer already trained tasks and the stream goes on from them, so
        the results (score matrices) are kept and grow, and the trained tasks are left as they are.
        """
        specs = normalize_tasks(tasks)
        names = [s["name"] for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Display name(s) {duplicates} are used by more than one task of the stream; results and "
                             "plots are keyed by display name, so give every task its own name.")
        for spec in specs:
            if isinstance(spec["train"], IterableDataset):  # refused before any task trains
                self._check_streaming(f"train dataset of task '{spec['name']}'")
        if continuing:
            specs = self._check_continuation(specs)
        if not continuing or self.results is None:
            self.results = ContinualResults(task_names=[], primary_metric=self._setting("primary_metric"))
        trained = {t.task_id for t in self.tasks} if continuing else set()
        for spec in specs:
            if spec["task_id"] in trained:
                # Trained: only its training is skipped. A trainer from from_pretrained (or a task
                # trained by train_task without eval rows) has no eval set for it: the stream's one is
                # registered under the trained name, so the task is scored after the next tasks
                # (its BWT/forgetting); one registered already is kept.
                name = self.task(spec["task_id"]).name
                if spec["eval"] is not None and spec["task_id"] not in self._eval_sets:
                    self.add_eval_task(spec["task_id"], spec["eval"], name)
                    ignored = []
                else:
                    given = self._eval_given.get(spec["task_id"])
                    ignored = ["eval set"] if spec["eval"] is not None and not _same_rows(spec["eval"], given) else []
                if spec.get("named") and spec["name"] != name:  # a default task_N name is no request
                    ignored.append(f"display name {spec['name']!r}")
                if ignored:
                    # The registered ones stay: the matrix's earlier rows were scored on them.
                    logger.warning(
                        "clm-hf: the stream's entry for trained task %r (%s) brings a different %s than the one "
                        "registered; it is ignored and the registered one kept (its earlier scores were taken on it). "
                        "To score other rows, register them under a new task id with add_eval_task.",
                        spec["task_id"], name, " and ".join(ignored))
                continue
            self._task_names[spec["task_id"]] = spec["name"]
            if spec["eval"] is not None:
                self.add_eval_task(spec["task_id"], spec["eval"], spec["name"])
            elif spec["name"] not in self.results.task_names:
                self.results.add_task(spec["name"])
        return specs

    def _check_continuation(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Check that a stream given to ``fit`` on a trainer with trained tasks continues them.

        Accepted: the trained tasks' ids first, in training order, then new ones (the whole
        stream), or only new ids (the next tasks). Anything else would skip or retrain tasks by
        position, so it raises before anything is registered.
        """
        trained = [t.task_id for t in self.tasks]
        given = [s["task_id"] for s in specs]
        opens_with_trained = given[: len(trained)] == trained
        rest = given[len(trained):] if opens_with_trained else given
        again = [i for i in rest if i in trained]
        by_position = [s["task_id"] for s in specs if s.get("positional") and s["task_id"] in trained]
        if again:
            why = "trains " + repr(again) + " again" if opens_with_trained else "its first ids are not the trained ones"
            if by_position:  # a list entry without task_id/name is named by its position: it cannot be "new"
                raise ValueError(
                    f"This trainer already trained tasks {trained}, and fit() got a list stream whose entries are "
                    f"named by position {given}, which does not continue it ({why}). A list names its tasks by "
                    "position, so it cannot name only the new tasks: pass the whole list in order (the trained "
                    "entries first: they are skipped), or a dict with new names (fit({'next_task': ...})); to "
                    "train from scratch, build a new trainer."
                )
            raise ValueError(
                f"This trainer already trained tasks {trained}, and fit() got the stream {given}, which does not "
                f"continue it ({why}). Pass only the new tasks "
                "(fit({'next_task': ...})), or the whole stream in order, starting with the trained tasks; to "
                "train from scratch, build a new trainer."
            )
        if by_position:
            # Taken as the whole list in order; a list of only new tasks cannot be told from it, so say
            # which entries are skipped rather than skip them silently.
            logger.warning("clm-hf: fit() got a list stream named by position: its entries %s are taken as the "
                           "trained tasks %s and skipped (not trained). To add only new tasks, pass a dict with new "
                           "names (fit({'next_task': ...})).", by_position, by_position)
        names = {t.name: t.task_id for t in self.tasks}
        clash = [f"{s['task_id']!r} ({s['name']!r}, the name of trained task {names[s['name']]!r})"
                 for s in specs if s["task_id"] in rest and s["name"] in names]
        if clash:
            raise ValueError(f"New task(s) of the stream use display names that trained tasks already use: "
                             f"{', '.join(clash)}; results and plots are keyed by display name, so give every task "
                             "its own name.")
        return specs

    def fit_joint(self, tasks: Mapping[str, Any] | Sequence[Any], num_epochs: float | None = None) -> ContinualResults:
        """Multitask training on all tasks at once: the upper bound a continual run aims for.

        The rows of every task are shuffled together and trained as one task. The results
        repeat the final scores in every row, so ACC is the joint model's mean score and
        BWT/forgetting are 0; ``metadata["joint"]`` marks them.

        >>> joint = trainer.fit_joint(make_suite(["copy", "reverse"]))  # doctest: +SKIP
        """
        from datasets import concatenate_datasets

        specs = self._plan_stream(tasks)
        self._claim_output_dir()
        try:
            if self._setting("eval_before_training"):
                self._evaluate_stream(row=False)
            streamed = [s["name"] for s in specs if isinstance(s["train"], IterableDataset)]
            if streamed:  # the joint run shuffles all rows together, which needs them all at hand
                raise ValueError(f"fit_joint needs every task's train split as a datasets.Dataset; task(s) {streamed} "
                                 "are streams (IterableDataset). Load them without streaming.")
            rows = [self._prepare_rows(s["train"], f"train dataset of task '{s['name']}'") for s in specs]
            task = self._register_task("joint", "joint")
            task.train_dataset = concatenate_datasets(rows)
            saved = self._setting("save_continual_state")
            self.args.save_continual_state = False
            try:
                self._run_task(task, num_epochs=num_epochs)
            finally:
                self.args.save_continual_state = saved
            final = {m: rows[-1] for m, rows in self.results.scores.items()}
            final_reference = {n: {m: v[-1] for m, v in ms.items()} for n, ms in self.results.reference.items()}
            while self.results.num_trained < len(self.results.task_names):
                self.results.add_row(final, reference=final_reference or None)
            self.results.metadata["joint"] = True
            self._save_results()
            tracking.task_finished(self)
            hub.task_finished(self)
        finally:
            self._release_output_dir()
        return self.results

    # --- checkpoints ------------------------------------------------------------------------------
    def _continual_state(self) -> dict[str, Any]:
        return {
            "tasks": [t.to_json() for t in self.tasks if t is not self.current_task],
            "current_task": self.current_task.to_json() if self.current_task else None,
            "strategies": [{"name": s.name, "config": s.config.to_dict()} for s in self.strategies],
        }

    def _claim_output_dir(self, resume_run: Path | None = None) -> None:
        """Become the one writer of ``output_dir`` before anything is written there.

        Takes the run lock (:class:`~clm_hf.state.RunLock`), then, unless the run resumes from this
        folder (``resume_run``) or this trainer already owns it, refuses a folder that holds another
        run's continual checkpoints: a later resume would continue that run's state under this
        run's name. ``overwrite_output_dir=True`` deletes them instead.
        """
        if not self.args.should_save:  # the other ranks write nothing
            return
        run_dir = Path(self._base_output_dir)
        if self._run_lock is None or not self._run_lock.held:
            self._run_lock = ckpt.RunLock(run_dir).acquire()
            weakref.finalize(self, self._run_lock.release)
        resuming_here = resume_run is not None and resume_run.resolve() == run_dir.resolve()
        # from_pretrained restored this trainer from (a copy into) output_dir: that state is this run's.
        restored_here = self._restored_run is not None and self._restored_run.resolve() == run_dir.resolve()
        if self._owns_output_dir or resuming_here or restored_here:
            self._owns_output_dir = True
            return
        found = run_state_paths(run_dir)
        if found and self._setting("overwrite_output_dir"):
            logger.warning("clm-hf: overwrite_output_dir=True: deleting the earlier run's %s in %s",
                           sorted(p.name for p in found), run_dir)
            for path in found:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif found:
            self._release_output_dir()
            names = ", ".join(str(p.relative_to(run_dir)) for p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise ckpt.OutputDirInUseError(
                f"output_dir {run_dir} already holds another run's continual checkpoints ({names}). A new run there "
                "would mix with it: a later resume would continue the old run's state. Resume it instead "
                f"(fit(..., resume_from_checkpoint=True), clm-hf train --resume {run_dir}), pass "
                "overwrite_output_dir=True (--training.overwrite_output_dir true) to delete that state first, or "
                "choose another output_dir."
            )
        self._owns_output_dir = True

    def _release_output_dir(self) -> None:
        """Release the run lock (the folder stays this trainer's: a later call takes the lock again)."""
        if self._run_lock is not None:
            self._run_lock.release()

    def save_continual_checkpoint(self, directory: str | os.PathLike | None = None) -> Path | None:
        """Write the whole continual state (model, strategies, buffer, results, RNG) atomically.

        Defaults to ``<output_dir>/continual/task-XXX`` for the last finished task.
        """
        model = unwrap_model(self.model)
        # Under FSDP2 every rank writes its shards (torch.distributed.checkpoint), rank 0 the rest.
        sharded = any_dtensor(reshard(model).parameters())
        if not self.args.should_save and not sharded:
            return None
        in_run = directory is None
        if directory is None:
            directory = Path(self._base_output_dir) / CONTINUAL_DIR / f"task-{len(self.tasks) - 1:03d}"
        path = ckpt.save_continual_checkpoint(
            directory, state=self._continual_state(), strategies=self.strategies,
            model=model, results=self.results, sharded=sharded, writer=self.args.should_save,
        )
        if not self.args.should_save:
            return None
        if in_run and self._run_base_written != self._base_output_dir:
            # Once per run folder: the model's config and the tokenizer, so that from_pretrained(run)
            # rebuilds them with no model=/processing_class= (the checkpoint holds the weights only).
            hub.write_run_base(self, self._base_output_dir)
            self._run_base_written = self._base_output_dir
        limit = self._setting("continual_save_total_limit")
        if limit:
            for old in ckpt.list_checkpoints(Path(self._base_output_dir) / CONTINUAL_DIR)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def export_model(self, directory: str | os.PathLike, task: Any = None) -> Path | None:
        """Write the trained model whole, as ``model.safetensors`` + ``config.json``, for ``from_pretrained``.

        Each strategy has its say first (:meth:`Strategy.export_model`), before anything is written:
        O-LoRA writes the base model with every task's adapter merged in (all of them answer at
        inference), ``PNN(mode="lora")`` the base model with ``task``'s adapter merged in (it needs
        ``task``), and ``PNN(mode="columns")`` raises, naming what to keep instead (the continual
        checkpoint, read back by ``from_pretrained(run_dir)``). A merged export holds a second copy
        of the model in memory while it is written; the trainer's model is left as it is. With
        ``task``, the model is exported as :meth:`use_task` makes it for that task (e.g. PackNet's
        masks applied).

        Under FSDP2 this is a collective (every rank calls it): the shards are gathered to rank 0 on the
        CPU (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), which writes the folder
        atomically; one name is kept per shared storage (tied embeddings), which ``from_pretrained``
        ties again. Without FSDP2 rank 0 writes ``save_pretrained``'s folder.

        Args:
            directory (`str` or `os.PathLike`): The folder to write (replaced if it exists).
            task (`str` or `int`, *optional*): The id of a trained task to export the model of.

        Returns:
            `pathlib.Path` on the rank that wrote, else `None`.

        Example:

        >>> trainer.fit(stream)  # doctest: +SKIP
        >>> trainer.export_model("runs/ewc/export")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("runs/ewc/export")  # doctest: +SKIP
        >>> trainer.export_model("runs/pnn/export-copy", task="copy")  # PNN(mode="lora"): that task's adapter  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        from .sharding import local_part

        info = self.task(task) if task is not None else None  # an unknown id raises, naming the trained ones
        with self.use_task(info.task_id) if info is not None else contextlib.nullcontext():
            model = unwrap_model(self.model)
            exported = model
            for strategy in self.strategies:
                exported = strategy.export_model(exported, info)
            if not any_dtensor(reshard(model).parameters()):
                if not self.args.should_save:
                    return None
                return ckpt.atomic_write_dir(directory, lambda tmp: exported.save_pretrained(str(tmp)))
            if exported is not model:
                raise NotImplementedError(
                    f"Strategies {[s.name for s in self.strategies]} export a model built from the trained one (merged "
                    "adapters), which is not supported under FSDP2; save the continual checkpoint "
                    "(save_continual_checkpoint) and export from a single process."
                )
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.args.should_save:
                return None
            tensors, seen = {}, set()
            for name, tensor in model.state_dict().items():
                ptr = local_part(tensor).data_ptr()
                if ptr in seen:  # a tied weight: stored once
                    continue
                seen.add(ptr)
                tensors[name] = full[name].detach().contiguous()

        def fill(tmp: Path) -> None:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(str(tmp))
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(str(tmp))

        return ckpt.atomic_write_dir(directory, fill)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The Trainer pickles its arguments into every save (training_args.bin): keep Hub tokens out.
        with _tokens_hidden(self.args):
            super()._save(output_dir, state_dict=state_dict)
        # safetensors writes its files 0600 whatever the umask; give them the umask's mode like the rest.
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save and folder.is_dir():
            mode = 0o666 & ~ckpt.process_umask()
            for path in folder.glob("*.safetensors"):
                if path.name.startswith(("model", "adapter_model")) and path.is_file():
                    os.chmod(path, mode)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The Trainer's weight reload for a mid-task resume, keeping the adapters the strategies set up.

        For a PEFT model with several adapters the Trainer reloads every adapter's weights, but then
        makes only the first active adapter active and trainable (it assumes one). O-LoRA trains the
        newest of several active adapters, so that would train the first task's adapter instead.
        The weights are taken from the checkpoint; which adapters are active and which parameters
        train are put back as they were.
        """
        target = unwrap_model(model if model is not None else self.model)
        active = list(getattr(target, "active_adapters", None) or []) if hasattr(target, "peft_config") else []
        trainable = {name: p.requires_grad for name, p in target.named_parameters()}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if len(active) > 1:
            target.base_model.set_adapter(active)
        for name, param in target.named_parameters():
            if name in trainable:
                param.requires_grad_(trainable[name])

    def _save_checkpoint(self, model, trial):
        """The Trainer's own mid-task save, plus the continual state needed to resume inside the task.

        The continual state is written last and lists the size and sha256 of the Trainer's files, so
        a checkpoint whose save was interrupted, or a file damaged since, is skipped on resume. Under
        FSDP2 it is a collective: every rank writes its strategy shards (DCP) into the folder rank 0
        names, and rank 0 the JSON, the manifest and the rename (see ``save_sharded_continual_checkpoint``).
        """
        self._check_finite()  # never save weights a NaN/inf loss has already reached
        # Under FSDP2 the strategies' state is sharded like the parameters: every rank writes its shards
        # (torch.distributed.checkpoint), rank 0 the JSON, RNG and manifest, as for end-of-task checkpoints.
        sharded = self.current_task is not None and any_dtensor(reshard(unwrap_model(self.model)).parameters())
        writes_state = self.current_task is not None and self.args.should_save
        limit = self.args.save_total_limit
        if writes_state:
            # The Trainer deletes older checkpoints at the end of its own save. Here that comes only
            # once the new one has its continual state: else, with save_total_limit=1, a kill in
            # between would leave no complete mid-task checkpoint and the task would restart at 0.
            self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.current_task is None:
            return
        # Every rank writes its own rng_state_{rank}.pth into the folder: all must be done before
        # rank 0 lists and hashes it, or a late file is missing from (or half-hashed in) the list.
        self.accelerator.wait_for_everyone()
        # On every rank, before rank 0 reads the strategies' state: a strategy whose state is split across
        # the ranks (EWC's slices of DeepSpeed ZeRO-3 partitions) gathers it here, and drops it after.
        for strategy in self.strategies:
            strategy.before_save(self)
        try:
            if not writes_state and not sharded:
                return
            checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            state = self._continual_state()
            if writes_state:  # the Trainer's files (under FSDP2 its sharded model and optimizer folders too)
                state["trainer_files"] = ckpt.describe_files(checkpoint, exclude=IN_TASK_STATE_DIR)
            if sharded:  # its per-rank files (data order, RNG, optimizer shards) resume on as many processes only
                state["world_size"] = self.args.world_size
            ckpt.save_continual_checkpoint(checkpoint / IN_TASK_STATE_DIR, state=state, strategies=self.strategies,
                                           model=None, results=self.results, sharded=sharded, writer=writes_state)
        finally:
            for strategy in self.strategies:
                strategy.after_save(self)
        if not writes_state:
            return
        rotate_checkpoints(output_dir=self._get_output_dir(trial=trial), save_total_limit=limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def resume_stream(self, checkpoint: str | bool, specs: list[dict[str, Any]], *,
                      force: bool = False, restart_on_damage: bool = False) -> tuple[int, Path] | None:
        """Restore the stream from a run folder or checkpoint; return a mid-task checkpoint if any.

        Damaged checkpoints are skipped in favour of older ones. When checkpoints exist but every
        one is damaged, a :class:`~clm_hf.state.CheckpointError` names the damage, unless
        ``restart_on_damage`` lets the stream start again from its first task.
        """
        run_dir, task_ckpt = resolve_run_dir(self._base_output_dir if checkpoint is True else checkpoint)
        with self.args.main_process_first(desc="clm-hf: repairing interrupted checkpoint swaps"):
            if self.args.should_save:  # one writer; the other ranks read the repaired folder after it
                ckpt.recover_interrupted_swaps(run_dir / CONTINUAL_DIR)
                for inner_checkpoint in run_dir.glob("task-*/checkpoint-*"):
                    ckpt.recover_interrupted_swaps(inner_checkpoint)
        damaged: list[tuple[Path, ckpt.CheckpointError]] = []
        if task_ckpt is None:
            task_ckpt = ckpt.latest_valid_checkpoint(ckpt.list_checkpoints(run_dir / CONTINUAL_DIR), damaged)
        if task_ckpt is None:
            if not (run_dir / CONTINUAL_DIR).exists() and not list(run_dir.glob("task-*/checkpoint-*")):
                raise FileNotFoundError(
                    f"No clm-hf checkpoint to resume from in {run_dir}: nothing was saved there yet (or it is not the "
                    "run's output_dir). Start the run again without resuming."
                )
            done = 0
        else:
            meta = ckpt.read_continual_state(task_ckpt)
            self._restore(task_ckpt, meta, specs, load_model=True, force=force)
            done = len(meta["tasks"])
            # The run folder whose state this trainer now holds (_claim_output_dir accepts it).
            self._restored_run = run_dir
        if done >= len(specs):
            return None
        # A Trainer checkpoint inside the next task, with its continual state, resumes mid-task.
        task_dir = run_dir / f"task-{done:03d}"
        inner = sorted(task_dir.glob("checkpoint-*"), key=ckpt.checkpoint_sort_key)
        interrupted: list[Path] = []
        for candidate in reversed(inner):
            if not (candidate / IN_TASK_STATE_DIR).exists():
                # The Trainer wrote its files, and the kill came before clm-hf's state was renamed in
                # (written last, atomically): an interrupted save, expected after a crash, not damage.
                logger.warning("Skipping mid-task checkpoint %s: its save was interrupted before clm-hf's state "
                               "was written (no %s folder).", candidate, IN_TASK_STATE_DIR)
                interrupted.append(candidate)
                continue
            try:
                meta = ckpt.read_continual_state(candidate / IN_TASK_STATE_DIR, with_model=False)
                if "trainer_files" not in meta:
                    raise ckpt.CheckpointError(f"{candidate / IN_TASK_STATE_DIR / ckpt.STATE_FILE} has no "
                                               "'trainer_files' list of the Trainer checkpoint's files.")
                # The Trainer reads its files by name (weights, optimizer, RNG, trainer_state.json).
                ckpt.verify_files(candidate, meta["trainer_files"], required=("trainer_state.json",),
                                  exclude=IN_TASK_STATE_DIR, what=f"the trainer_files list of {candidate}")
            except ckpt.CheckpointVersionError:
                raise
            except ckpt.CheckpointError as err:
                logger.warning("Skipping unusable mid-task checkpoint %s: %s", candidate, err)
                damaged.append((candidate, err))
                continue
            written_by = meta.get("world_size")
            if written_by is not None and written_by != self.args.world_size:
                raise ValueError(
                    f"The mid-task checkpoint {candidate} was written by an FSDP2 run of {written_by} processes, but "
                    f"this run has {self.args.world_size}: a mid-task checkpoint resumes on as many processes as wrote "
                    f"it (the Trainer's data order, RNG and optimizer files are per rank). Resume with {written_by} "
                    f"processes, or move the checkpoint-* folders of {task_dir} aside to resume from the end-of-task "
                    "checkpoint before them, on any number of processes."
                )
            self._restore(candidate / IN_TASK_STATE_DIR, meta, specs, load_model=False, force=force)
            return done, candidate
        if task_ckpt is None and damaged:
            listing = "; ".join(f"{path}: {err}" for path, err in damaged)
            if not restart_on_damage:
                raise ckpt.CheckpointError(
                    f"Cannot resume from {run_dir}: every checkpoint there is damaged ({listing}). Repair or remove "
                    "them, or pass restart_on_damage=True (clm-hf train --restart-on-damage) to train the stream "
                    "again from its first task."
                )
            logger.warning("clm-hf: every checkpoint in %s is damaged (%s); restart_on_damage: training the stream "
                           "again from its first task.", run_dir, listing)
        elif task_ckpt is None and interrupted:
            logger.warning("clm-hf: no checkpoint in %s was complete: the first save (%s) was interrupted. Nothing "
                           "was lost; training the stream from its first task.", run_dir, interrupted[-1].name)
        if task_ckpt is None and self._setting("eval_before_training"):
            self._evaluate_stream(row=False)
        return None

    def _restore(self, directory: Path, meta: dict[str, Any], specs: list[dict[str, Any]], *, load_model: bool,
                 force: bool = False) -> None:
        saved = [(s["name"], s["config"]) for s in meta["strategies"]]
        current = [(s.name, s.config.to_dict()) for s in self.strategies]
        same_names = [n for n, _ in saved] == [n for n, _ in current]
        if saved != current and not (force and same_names):
            hint = (" or pass force_resume=True (clm-hf train --force-resume) to go on with the new settings"
                    if same_names else " (force_resume cannot change the list of strategies: their states differ)")
            raise ValueError(
                f"The checkpoint in {directory} was written with strategies {saved}, but this trainer has {current}. "
                f"Resume with the same strategies and settings{hint}."
            )
        if saved != current:
            logger.warning("clm-hf: force_resume: the checkpoint's strategy settings %s are replaced by %s.", saved, current)
        for i, done in enumerate(meta["tasks"]):
            if i >= len(specs) or specs[i]["task_id"] != done["task_id"]:
                raise ValueError(f"The checkpoint's task {i} is '{done['task_id']}', but the stream given has "
                                 f"{specs[i]['task_id'] if i < len(specs) else 'no task'} there.")
        # A checkpoint of an FSDP2 run keeps its sharded tensors in dcp/; DCP reshards them to this run's
        # layout. One written unsharded and read into an FSDP2 run is sharded like the parameters.
        model = unwrap_model(self.model)
        if getattr(self, "is_fsdp_enabled", False) and not any_dtensor(model.parameters()):
            # Shard now, as Accelerate does at the first train() (it keeps a model already sharded): the
            # restored state is then laid out like the parameters, as after a task of an uninterrupted
            # run, and the strategies' before_task hooks see the sharded parameters.
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            self._set_model(fsdp2_prepare_model(self.accelerator, self.model))
            model = unwrap_model(self.model)
        loaded = ckpt.load_continual_tensors(directory, model)
        convert = None if ckpt.is_sharded_checkpoint(directory) else ckpt.plain_to_sharded(model)
        for i, strategy in enumerate(self.strategies):
            with sharded_state_io(ckpt.strategy_dir(Path(), i, strategy.name).as_posix(), loaded=loaded, convert=convert):
                strategy.load_state(ckpt.strategy_dir(directory, i, strategy.name))
            self._set_model(strategy.restore_model(self.model))
        if load_model:
            ckpt.load_sharded_model_weights(unwrap_model(self.model), directory)
        self.tasks = [TaskInfo(**t) for t in meta["tasks"]]
        results_path = directory / ckpt.RESULTS_FILE
        if results_path.is_file():
            loaded = ContinualResults.load(results_path)
            for name in (self.results.task_names if self.results else []):
                if name not in loaded.task_names:  # the stream may have grown since the save
                    loaded.add_task(name)
            self.results = loaded
        if load_model:
            ckpt.load_rng(directory, meta["rng"])
        else:  # inside a task: restored right before train(), after the task's hooks ran again
            self._pending_rng = (directory, meta["rng"])
        logger.info("clm-hf: resumed from %s after %d task(s)", directory, len(self.tasks))

    # --- the Hugging Face Hub (clm_hf.hub) --------------------------------------------------------
    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **kwargs: Any) -> Any:
        """``Trainer.push_to_hub`` plus the continual state, results, plots and a continual model card.

        See :mod:`clm_hf.hub` for the repository layout; ``kwargs`` go to the model card.
        """
        return hub.push_to_hub(self, super().push_to_hub, commit_message=commit_message, blocking=blocking,
                               token=token, revision=revision, private=private, **kwargs)

    def create_model_card(self, **kwargs: Any) -> None:
        """Write the continual model card (tasks, strategies, score matrices) to ``<output_dir>/README.md``."""
        hub.write_model_card(self, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Mid-task weights are never pushed: the repo gets whole continual states after each task.
        if self.current_task is not None:
            return
        # Outside fit() (a direct train()), the Trainer pickles self.args into output_dir/training_args.bin
        # and uploads that folder: hide the tokens while it writes; hub.public_uploads gives the uploads
        # the token directly and rewrites the uploaded training_args.bin without absolute local paths.
        with hub.public_uploads(self.args, self.args.hub_token), _tokens_hidden(self.args):
            super()._push_from_checkpoint(checkpoint_folder)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, args: Any = None,
                        strategies: Sequence[Strategy] | None = None, **kwargs: Any) -> Self:
        """Rebuild a trainer with its whole continual state from a Hub repo or a local folder.

        >>> trainer = ContinualCausalLMTrainer.from_pretrained("user/my-stream")  # doctest: +SKIP
        >>> trainer.fit(stream)  # doctest: +SKIP

        See :func:`clm_hf.hub.from_pretrained` for the options.
        """
        return hub.from_pretrained(cls, path_or_repo, args=args, strategies=strategies, **kwargs)


class ContinualTrainer(ContinualTrainerMixin, Trainer):
    """A [`~transformers.Trainer`] that learns a stream of tasks with continual-learning strategies.

    Everything ``Trainer`` accepts still works (callbacks, ``report_to``, ``eval_dataset``,
    ``processing_class``, saving). The continual parts:

    Args:
        model (`nn.Module`, *optional*): The model to train (causal or seq2seq LM, optionally a PEFT model).
        args ([`ContinualTrainingArguments`], *optional*): Plain ``TrainingArguments`` work too.
        strategies (`list[Strategy]`, *optional*): Applied in order; an empty list is plain
            sequential fine-tuning. E.g. ``[Replay(), EWC()]``.
        config (`dict`, *optional*): The original config-dict form (optimizer + continual_strategy).
        task_metrics (`dict[str, callable]`, *optional*): Extra per-task scores,
            ``fn(predictions, references) -> float`` over answer token ids.
        generation_scorer (`callable`, *optional*): ``fn(predictions, references) -> dict[str, float]``
            over generated and reference texts; each key is recorded as ``gen_<key>`` after every task
            (with ``args.generation_metrics``, see :mod:`clm_hf.generation_eval`).
        **kwargs: Any other ``Trainer`` argument.

    Example:

    >>> from clm_hf import ContinualTrainer, ContinualTrainingArguments, EWC, Replay
    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model, make_suite
    >>> tok = build_tokenizer(); model = build_tiny_model("gpt2", tok)
    >>> trainer = ContinualTrainer(model=model, args=ContinualTrainingArguments(output_dir="runs/doc"),
    ...                            processing_class=tok, strategies=[Replay(), EWC()])
    >>> results = trainer.fit(make_suite(["copy", "reverse"], num_train=32, num_eval=8))  # doctest: +SKIP
    """


class ContinualCausalLMTrainer(ContinualTrainer):
    """[`ContinualTrainer`] for decoder-only language models (GPT-2, Llama, ...).

    Each task of :meth:`~ContinualTrainer.fit` runs the Trainer's own ``train()``; after each, every
    task's eval set is scored and the score matrices, ACC/BWT/FWT/forgetting and a continual
    checkpoint are written under ``args.output_dir``.

    Args:
        model (`nn.Module`, *optional*): The decoder-only model to train (a PEFT model works too).
        args ([`ContinualTrainingArguments`], *optional*): The Trainer's settings plus the continual
            ones; plain ``TrainingArguments`` work too. Default: ``output_dir="clm_hf_output"``.
        strategies (`list[Strategy]`, *optional*): Applied in order; ``None`` or ``[]`` is plain
            sequential fine-tuning. E.g. ``[Replay(), EWC()]``.
        config (`dict`, *optional*): The original config-dict form (``optimizer`` +
            ``continual_strategy`` + ...), see :func:`clm_hf.config.parse_config_dict`; not with ``args``.
        task_metrics (`dict[str, callable]`, *optional*): Extra per-task scores,
            ``fn(predictions, references) -> float`` over answer token ids.
        generation_scorer (`callable`, *optional*): ``fn(predictions, references) -> dict[str, float]``
            over generated and reference texts, recorded as ``gen_<key>`` after every task.
        **kwargs: Any other ``Trainer`` argument (``processing_class``, ``data_collator``,
            ``callbacks``, ``compute_metrics``, ...).

    Example:

    >>> from transformers import PrinterCallback
    >>> from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments, Replay
    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model, make_suite
    >>> tok = build_tokenizer(); model = build_tiny_model("gpt2", tok)
    >>> args = ContinualTrainingArguments(output_dir="runs/causal", num_train_epochs=1, report_to="none",
    ...                                   disable_tqdm=True, save_continual_state=False, use_cpu=True)
    >>> trainer = ContinualCausalLMTrainer(model=model, args=args, processing_class=tok,
    ...                                    strategies=[Replay(buffer_size=8)])
    >>> trainer.remove_callback(PrinterCallback)  # the Trainer would print its logs here
    >>> results = trainer.fit(make_suite(["copy", "reverse"], num_train=8, num_eval=4))
    >>> results.task_names, len(results.matrix("exact_match")), len(trainer.strategies[0].buffer)
    (['copy', 'reverse'], 2, 8)
    """


class ContinualSeq2SeqTrainer(ContinualTrainerMixin, Seq2SeqTrainer):
    """A [`~transformers.Seq2SeqTrainer`] with the continual machinery of [`ContinualTrainer`].

    For encoder-decoder models (T5, BART, ...): the prompt is the encoder's input and the answer the
    decoder's labels; ``fit``, the scores and the checkpoints are those of [`ContinualTrainer`].

    Args:
        model (`nn.Module`, *optional*): The encoder-decoder model to train.
        args ([`ContinualSeq2SeqTrainingArguments`], *optional*): ``Seq2SeqTrainingArguments`` plus
            the continual fields. Default: ``output_dir="clm_hf_output"``.
        strategies (`list[Strategy]`, *optional*): Applied in order; ``None`` or ``[]`` is plain
            sequential fine-tuning.
        config (`dict`, *optional*): The original config-dict form, see
            :func:`clm_hf.config.parse_config_dict`; not with ``args``.
        task_metrics (`dict[str, callable]`, *optional*): Extra per-task scores,
            ``fn(predictions, references) -> float`` over answer token ids.
        generation_scorer (`callable`, *optional*): ``fn(predictions, references) -> dict[str, float]``
            over generated and reference texts, recorded as ``gen_<key>`` after every task.
        **kwargs: Any other ``Seq2SeqTrainer`` argument.

    Example:

    >>> from clm_hf import ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments
    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model
    >>> tok = build_tokenizer(); model = build_tiny_model("t5", tok)
    >>> trainer = ContinualSeq2SeqTrainer(model=model, args=ContinualSeq2SeqTrainingArguments(output_dir="runs/t5"),
    ...                                   processing_class=tok)
    """

    args_class = ContinualSeq2SeqTrainingArguments


# --- helpers ------------------------------------------------------------------------------------
class _EpochRowsSampler(torch.utils.data.Sampler[int]):
    """Yields, every epoch, the rows a strategy's ``select_train_rows`` picks for it, shuffled.

    Not a ``RandomSampler`` (Accelerate would swap that for its own); the Trainer's ``set_epoch``
    reaches it through the prepared DataLoader, also on a resumed epoch whose first batches are
    skipped. The shuffle is seeded with ``seed + epoch``, so every rank and every resume sees the
    same order.
    """

    def __init__(self, strategy: Strategy, task: TaskInfo, num_rows: int, *, shuffle: bool, seed: int) -> None:
        self.strategy, self.task, self.num_rows = strategy, task, num_rows
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self._length = len(self._rows(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self, epoch: int) -> torch.Tensor:
        picked = self.strategy.select_train_rows(self.num_rows, self.task, epoch)
        if picked is None:
            return torch.arange(self.num_rows)
        rows = torch.as_tensor(list(picked), dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            raise IndexError(f"Strategy {self.strategy.name!r} selected rows outside [0, {self.num_rows}) "
                             f"for epoch {epoch} of task '{self.task.name}'.")
        return rows

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[int]:
        rows = self._rows(self.epoch)
        if len(rows) != self._length:
            raise ValueError(
                f"Strategy {self.strategy.name!r} selected {len(rows)} rows for epoch {self.epoch} of task "
                f"'{self.task.name}' but {self._length} for its first epoch; every epoch must have as many rows."
            )
        if self.shuffle:
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed + self.epoch))]
        return iter(rows.tolist())


def run_state_paths(run_dir: str | os.PathLike) -> list[Path]:
    """A run's own entries of its folder (``continual/``, ``task-*/``, ``results.json``) when it holds
    a complete checkpoint that a resume would read (one with a ``manifest.json``); else ``[]``."""
    run_dir = Path(run_dir)
    continual = run_dir / CONTINUAL_DIR
    task_dirs = sorted((p for p in run_dir.glob("task-*") if p.is_dir() and _TASK_DIR.fullmatch(p.name)),
                       key=ckpt.checkpoint_sort_key)
    complete = any(continual.glob(f"*/{ckpt.MANIFEST}")) or any(
        any(d.glob(f"checkpoint-*/{IN_TASK_STATE_DIR}/{ckpt.MANIFEST}")) for d in task_dirs)
    if not complete:
        return []
    return [p for p in (continual, *task_dirs, run_dir / RESULTS_NAME, run_dir / hub.BASE_CONFIG_DIR) if p.exists()]


def resolve_run_dir(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """The run folder a resume path belongs to, and the end-of-task checkpoint it names, if any.

    ``<run>`` gives ``(<run>, None)`` (its newest valid checkpoint is used), ``<run>/continual``
    the same, and ``<run>/continual/task-XXX`` gives ``(<run>, that checkpoint)``. A Trainer
    checkpoint inside a task (``<run>/task-XXX/checkpoint-N``, its ``continual_state`` or the
    ``task-XXX`` folder) and a continual checkpoint outside a run (an export's
    ``continual_state``) raise ``ValueError``: resuming there would nest a new run inside them.

    >>> resolve_run_dir("runs/ewc/continual/task-002")  # doctest: +SKIP
    (PosixPath('runs/ewc'), PosixPath('runs/ewc/continual/task-002'))
    """
    path = Path(path)
    if path.name == CONTINUAL_DIR and path.is_dir() and not (path / ckpt.MANIFEST).is_file():
        return path.parent, None
    if path.parent.name == CONTINUAL_DIR and ((path / ckpt.MANIFEST).is_file() or re.fullmatch(r"task-\d+", path.name)):
        return path.parent.parent, path
    inner = None
    if path.name == IN_TASK_STATE_DIR and _TRAINER_CHECKPOINT.fullmatch(path.parent.name):
        inner = path.parent.parent
    elif _TRAINER_CHECKPOINT.fullmatch(path.name) and _TASK_DIR.fullmatch(path.parent.name):
        inner = path.parent
    elif (_TASK_DIR.fullmatch(path.name) and any(path.glob("checkpoint-*")) and not (path / CONTINUAL_DIR).exists()
          and not (path / RESULTS_NAME).exists()):
        inner = path
    if inner is not None:
        raise ValueError(
            f"{path} is inside the task folder {inner} of the run {inner.parent}, not a run folder: resuming into it "
            f"would nest a new run inside that checkpoint. Resume the run folder instead (clm-hf train --resume "
            f"{inner.parent}, or resume_from_checkpoint='{inner.parent}'): clm-hf picks its newest complete "
            "checkpoint, mid-task ones included."
        )
    if (path / ckpt.MANIFEST).is_file():
        raise ValueError(
            f"{path} is a continual checkpoint outside a run's {CONTINUAL_DIR}/ folder (an export?). Rebuild a trainer "
            f"from it with ContinualCausalLMTrainer.from_pretrained('{path.parent}') and resume that, or pass the run folder."
        )
    return path, None


@contextlib.contextmanager
def _tokens_hidden(args: Any) -> Iterator[None]:
    """Set every ``*_token`` string field of ``args`` to None for the duration of a save."""
    hidden = {name: value for name, value in vars(args).items() if name.endswith("_token") and isinstance(value, str)}
    for name in hidden:
        setattr(args, name, None)
    try:
        yield
    finally:
        for name, value in hidden.items():
            setattr(args, name, value)


def _check_vocabulary(model: nn.Module | None, tokenizer: Any) -> None:
    """A tokenizer with more tokens than the model has embedding rows makes out-of-range ids."""
    if model is None or tokenizer is None or not hasattr(tokenizer, "__len__"):
        return
    bare = unwrap_model(model)
    embeddings = bare.get_input_embeddings() if hasattr(bare, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None) or getattr(getattr(bare, "config", None), "vocab_size", None)
    try:
        size = len(tokenizer)
    except TypeError:
        return
    if isinstance(rows, int) and size > rows:
        raise ValueError(
            f"The tokenizer has {size} tokens but the model's input embeddings have only {rows} rows, so token ids "
            f">= {rows} would index past the embedding. Call model.resize_token_embeddings(len(tokenizer)) before "
            "building the trainer, or use the tokenizer the model was trained with."
        )


def _check_strategies(strategies: list[Any]) -> None:
    seen: set[str] = set()
    for strategy in strategies:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"strategies must be Strategy objects (e.g. clm_hf.EWC()), got {type(strategy).__name__}. "
                "Build one from a name with clm_hf.strategies.build_strategy(name, **options)."
            )
        if strategy.name in seen:
            raise ValueError(f"Strategy '{strategy.name}' is listed twice; list each strategy once.")
        seen.add(strategy.name)


def _pad_token_id(model: nn.Module | None, tokenizer: Any) -> int:
    for source in (tokenizer, getattr(unwrap_model(model), "config", None) if model is not None else None):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None)
            if isinstance(value, int):
                return value
    return 0


def _same_rows(given: Any, registered: Any) -> bool:
    """Whether a stream's eval rows are the ones registered: the same object, equal Datasets, or equal lists.

    Datasets compare by fingerprint, then by content (a stream built again from the same files or
    dicts is the same set); other objects (a DataLoader, ...) only by identity.
    """
    if given is registered:
        return True
    if isinstance(given, Dataset) and isinstance(registered, Dataset):
        if given._fingerprint == registered._fingerprint:
            return True
        if len(given) != len(registered) or given.column_names != registered.column_names:
            return False
        return given.with_format("arrow")[:].equals(registered.with_format("arrow")[:])
    if isinstance(given, (list, tuple, Mapping)) and isinstance(registered, (list, tuple, Mapping)):
        try:
            return bool(given == registered)
        except Exception:  # noqa: BLE001 - rows whose values do not compare (arrays): cannot tell, so different
            return False
    return False


def normalize_tasks(tasks: Mapping[str, Any] | Sequence[Any]) -> list[dict[str, Any]]:
    """Normalise a stream given as a dict or a list into ``[{"task_id", "name", "train", "eval"}]``."""
    if isinstance(tasks, DatasetDict):
        raise TypeError("fit() takes a stream of tasks; wrap a single DatasetDict as {'name': dataset_dict}.")
    entries: Iterable[tuple[Any, Any]]
    if isinstance(tasks, Mapping):
        entries = list(tasks.items())
    elif isinstance(tasks, Sequence) and not isinstance(tasks, (str, bytes)):
        entries = [(None, entry) for entry in tasks]
    else:
        raise TypeError(f"fit() expects a dict or a list of tasks, got {type(tasks).__name__}.")
    specs: list[dict[str, Any]] = []
    for position, (key, entry) in enumerate(entries):
        name = key
        if isinstance(entry, (DatasetDict, Mapping)):
            unknown = set(entry) - {"train", "eval", "validation", "test", "name", "task_id"}
            if unknown:
                raise ValueError(f"Task entry {position} has unknown key(s) {sorted(unknown)}; use 'train' and 'eval'.")
            if "train" not in entry:
                raise ValueError(f"Task entry {position} ({name or entry.get('name')}) has no 'train' split.")
            train = entry["train"]
            evaluation = next((entry[k] for k in ("eval", "validation", "test") if k in entry), None)
            name = entry.get("name", name) if isinstance(entry, Mapping) and not isinstance(entry, DatasetDict) else name
            task_id = entry.get("task_id") if isinstance(entry, Mapping) and not isinstance(entry, DatasetDict) else None
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            (train, evaluation), task_id = entry, None
        else:
            raise TypeError(f"Task entry {position} must be a DatasetDict, a dict with 'train'/'eval' or a (train, eval) pair.")
        # An entry with neither task_id nor name is known by its position only: continuing a stream
        # (fit on a trainer with trained tasks) cannot tell such an entry from a trained task.
        positional = task_id is None and name is None
        task_id = str(task_id if task_id is not None else (name if name is not None else position))
        specs.append({"task_id": task_id, "name": str(name if name is not None else f"task_{position}"),
                      "train": train, "eval": evaluation, "positional": positional, "named": name is not None})
    if not specs:
        raise ValueError("fit() got an empty stream: give at least one task.")
    ids = [s["task_id"] for s in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"Task id(s) {duplicates} appear more than once in the stream; task ids must be unique.")
    return specs
