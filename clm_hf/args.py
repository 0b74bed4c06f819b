"""Training arguments for continual runs: ``TrainingArguments`` plus the continual knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .evaluation import BUILTIN_METRICS
from .text_metrics import TEXT_METRICS


@dataclass
class ContinualTrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] with the settings of a continual stream.

    Everything ``TrainingArguments`` takes still applies to each task's ``train()``; the fields
    below control what happens between tasks.

    Args:
        eval_metrics (`list[str]`, *optional*, defaults to all four): Per-task scores computed after
            every task: ``"exact_match"``, ``"token_accuracy"``, ``"loss"``, ``"perplexity"``.
        primary_metric (`str`, *optional*, defaults to `"exact_match"`): The score whose matrix gives
            ACC/BWT/FWT/forgetting in summaries and plots.
        eval_before_training (`bool`, *optional*, defaults to `True`): Score every task before any
            training: the baseline that forward transfer (FWT) needs.
        continual_eval_batch_size (`int`, *optional*): Rows per process in each forward pass of the
            per-task scoring; ``None``: ``per_device_eval_batch_size``, as ``Trainer.evaluate``.
        continual_eval_sort_by_length (`bool`, *optional*, defaults to `True`): Batch the scoring's
            rows by length (longest first) so few pad tokens are computed; the scores are the same.
        save_continual_state (`bool`, *optional*, defaults to `True`): Write a continual checkpoint
            (model, strategies, buffer, results, RNG) after every task, which a resume reads.
        continual_save_total_limit (`int`, *optional*): Keep at most this many end-of-task continual
            checkpoints (oldest deleted first); ``None`` keeps all.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`): Start a new run in an
            ``output_dir`` that holds another run's continual checkpoints by deleting them first;
            without it such a folder is refused unless the run resumes from it.
        generation_metrics (`list[str]`, *optional*, defaults to `[]`): Text metrics of generated
            answers computed after every task (``"exact_match"``, ``"rouge_l"``, ``"bleu"``), recorded
            as ``gen_<metric>``; a comma-separated string is split. Empty: no generation.
        generation_max_new_tokens (`int`, *optional*): Longest generated answer; ``None``: the
            longest reference answer of each eval set.
        generation_num_beams (`int`, *optional*): Beam width of the generated answers; ``None``: the
            model's ``generation_config`` (greedy).
        reference_metric (`str`, *optional*, defaults to `"perplexity"`): The score of the reference
            (never trained) eval sets shown in summaries and plots.
        answer_only_loss (`bool`, *optional*, defaults to `True`): When the trainer tokenizes
            prompt/answer rows itself, put the loss on the answer tokens only.

    Example:

    >>> from clm_hf import ContinualTrainingArguments
    >>> args = ContinualTrainingArguments(output_dir="runs/x", num_train_epochs=2, primary_metric="exact_match")
    >>> args.eval_metrics
    ['exact_match', 'token_accuracy', 'loss', 'perplexity']
    """

    eval_metrics: list[str] = field(
        default_factory=lambda: list(BUILTIN_METRICS),
        metadata={"help": "Per-task scores computed after every task: exact_match, token_accuracy, loss, perplexity "
                          "(a list; a string is read as comma-separated names)."},
    )
    primary_metric: str = field(
        default="exact_match",
        metadata={"help": "The score whose matrix gives ACC/BWT/FWT/forgetting in summaries and plots."},
    )
    eval_before_training: bool = field(
        default=True,
        metadata={"help": "Score every task before any training: the baseline b that forward transfer needs."},
    )
    continual_eval_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per process in each forward pass of the per-task scoring; None (default): "
                          "per_device_eval_batch_size, as Trainer.evaluate."},
    )
    continual_eval_sort_by_length: bool = field(
        default=True,
        metadata={"help": "Batch the per-task scoring's rows by length (longest first), so few pad tokens are "
                          "computed; scores are the same, and extra metrics / compute_metrics see the rows in order."},
    )
    save_continual_state: bool = field(
        default=True,
        metadata={"help": "Write a continual checkpoint (model, strategies, buffer, results, RNG) after every task."},
    )
    continual_save_total_limit: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many end-of-task continual checkpoints (oldest deleted first)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds another run's continual checkpoints by deleting "
                          "them first (continual/, task-*/, results.json). Without it such a folder is refused unless "
                          "the run resumes from it."},
    )
    generation_metrics: list[str] = field(
        default_factory=list,
        metadata={"help": "Text metrics of generated answers computed after every task, next to eval_metrics: "
                          "exact_match, rouge_l, bleu; recorded as gen_<metric>. Empty (the default): no generation."},
    )
    generation_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest generated answer; defaults to the longest reference answer of each eval set."},
    )
    generation_num_beams: int | None = field(
        default=None,
        metadata={"help": "Beam width of the generated answers; defaults to the model's generation_config (greedy)."},
    )
    reference_metric: str = field(
        default="perplexity",
        metadata={"help": "The score of the reference (never trained) eval sets shown in summaries and plots."},
    )
    answer_only_loss: bool = field(
        default=True,
        metadata={"help": "When the trainer tokenizes prompt/answer rows itself, put the loss on answer tokens only."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eval_metrics = _metric_names(self.eval_metrics)  # "exact_match,loss": not read letter by letter
        unknown = [m for m in self.eval_metrics if m not in BUILTIN_METRICS]
        if unknown:
            raise ValueError(f"eval_metrics has unknown metric(s) {unknown}; choose from {list(BUILTIN_METRICS)}.")
        if not self.eval_metrics:
            raise ValueError("eval_metrics must name at least one metric.")
        self.generation_metrics = _metric_names(self.generation_metrics)  # "exact_match,bleu" from a recipe or CLI
        unknown = [m for m in self.generation_metrics if m not in TEXT_METRICS]
        if unknown:
            raise ValueError(f"generation_metrics has unknown metric(s) {unknown}; choose from {list(TEXT_METRICS)}.")
        for name in ("generation_max_new_tokens", "generation_num_beams"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}.")
        if self.continual_eval_batch_size is not None and self.continual_eval_batch_size < 1:
            raise ValueError(f"continual_eval_batch_size must be >= 1, got {self.continual_eval_batch_size}.")
        if self.continual_save_total_limit is not None and self.continual_save_total_limit < 1:
            raise ValueError(f"continual_save_total_limit must be >= 1 or None, got {self.continual_save_total_limit}.")


def _metric_names(value: str | list[str]) -> list[str]:
    """A metric list as a recipe or the CLI writes it (``"exact_match, bleu"``) split at commas; a list as given."""
    if isinstance(value, str):
        return [m.strip() for m in value.split(",") if m.strip()]
    return value


def _continual_args_section() -> str:
    """The ``Args:`` section of :class:`ContinualTrainingArguments` (its continual fields), as written there.

    The argument classes that inherit those fields (Seq2Seq, TRL's ``SFTConfig``) append it to their
    own docstrings with :func:`_document_continual_fields`, so the fields are described in one place.

    >>> _continual_args_section().splitlines()[0].strip()
    'Args:'
    """
    doc = ContinualTrainingArguments.__doc__
    start = doc.index("    Args:")
    return doc[start : doc.index("    Example:", start)].rstrip() + "\n"


def _document_continual_fields(cls: type) -> type:
    """Append the continual fields' ``Args:`` section to the docstring of ``cls``, which inherits them.

    Args:
        cls (`type`): A subclass of :class:`ContinualTrainingArguments`.

    Returns:
        `type`: ``cls``, so it works as a class decorator.
    """
    if ContinualTrainingArguments.__doc__ is None or cls.__doc__ is None:  # python -OO strips docstrings
        return cls
    doc = cls.__doc__
    section = "    The continual fields, inherited from [`ContinualTrainingArguments`]:\n\n" + _continual_args_section()
    # Before the example, as in every other docstring of the package; at the end when there is none.
    at = doc.find("    Example:")
    cls.__doc__ = doc[:at] + section + "\n" + doc[at:] if at >= 0 else doc.rstrip() + "\n\n" + section + "    "
    return cls


@_document_continual_fields
@dataclass
class ContinualSeq2SeqTrainingArguments(Seq2SeqTrainingArguments, ContinualTrainingArguments):
    """[`~transformers.Seq2SeqTrainingArguments`] with the continual fields of
    [`ContinualTrainingArguments`] (listed below); the ``Seq2SeqTrainingArguments`` fields
    (``predict_with_generate``, ``generation_max_length``, ...) keep their meaning.

    Example:

    >>> from clm_hf import ContinualSeq2SeqTrainingArguments
    >>> ContinualSeq2SeqTrainingArguments(output_dir="runs/t5").primary_metric
    'exact_match'
    """
