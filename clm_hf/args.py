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
        if isinstance(self.eval_metrics, str):  # "exact_match" or "exact_match,loss": not read letter by letter
            self.eval_metrics = [m.strip() for m in self.eval_metrics.split(",") if m.strip()]
        unknown = [m for m in self.eval_metrics if m not in BUILTIN_METRICS]
        if unknown:
            raise ValueError(f"eval_metrics has unknown metric(s) {unknown}; choose from {list(BUILTIN_METRICS)}.")
        if not self.eval_metrics:
            raise ValueError("eval_metrics must name at least one metric.")
        if isinstance(self.generation_metrics, str):  # "bleu" or "exact_match,bleu" from a recipe or the CLI
            self.generation_metrics = [m.strip() for m in self.generation_metrics.split(",") if m.strip()]
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


@dataclass
class ContinualSeq2SeqTrainingArguments(Seq2SeqTrainingArguments, ContinualTrainingArguments):
    """[`~transformers.Seq2SeqTrainingArguments`] with the continual fields of
    [`ContinualTrainingArguments`].

    >>> from clm_hf import ContinualSeq2SeqTrainingArguments
    >>> ContinualSeq2SeqTrainingArguments(output_dir="runs/t5").primary_metric
    'exact_match'
    """
