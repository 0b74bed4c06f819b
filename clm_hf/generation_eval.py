"""Generation-based scores: generate each eval row's answer from its prompt alone, then score the text.

Teacher-forced scores (:mod:`clm_hf.evaluation`) condition every answer token on the right prefix;
these scores instead let the model write its whole answer with ``model.generate`` (greedy or beam
search through the model's ``generation_config``), decode it, and compare it with the reference
text using :mod:`clm_hf.text_metrics` or a user scorer.

The prompt and the reference come from the tokenized eval rows themselves, so pre-tokenized rows
work as well as raw ``prompt``/``answer`` text:

- causal LM: the prompt is ``input_ids`` up to the first supervised label (labels are -100 on the
  prompt of eval rows), the reference is the supervised labels; prompts are **left**-padded so
  every row's answer starts right after its prompt;
- seq2seq: the prompt is the encoder's ``input_ids``, the reference is ``labels``.

Special tokens (eos, pad) are dropped when decoding both sides.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from .modeling import eval_mode, is_seq2seq, unwrap_model
from .text_metrics import TEXT_METRICS, TextScorer, compute_text_metrics

__all__ = ["GENERATION_PREFIX", "evaluate_generation", "generate_answers", "generation_metric_names", "split_rows"]

GENERATION_PREFIX = "gen_"
"""Generated-text scores are stored as ``gen_<metric>`` (``gen_exact_match``, ...), next to the
teacher-forced ``exact_match``; a user scorer's keys get the same prefix."""


def generation_metric_names(metrics: Sequence[str]) -> list[str]:
    """The names under which built-in generation metrics are recorded.

    >>> generation_metric_names(["exact_match", "bleu"])
    ['gen_exact_match', 'gen_bleu']
    """
    return [GENERATION_PREFIX + m for m in metrics]


def split_rows(dataset: Dataset, seq2seq: bool, what: str = "eval dataset") -> tuple[list[list[int]], list[list[int]]]:
    """Split tokenized eval rows into (prompt ids, reference ids).

    Args:
        dataset (`datasets.Dataset`): Rows with ``input_ids`` and ``labels`` (-100 = not scored).
        seq2seq (`bool`): Encoder-decoder rows (prompt = ``input_ids``) or causal rows (prompt =
            ``input_ids`` before the first supervised label).
        what (`str`): How to name the dataset in errors.

    Returns:
        `tuple[list[list[int]], list[list[int]]]`: the prompts and the reference answers.

    Raises:
        ValueError: a causal row with no prompt (its first label is supervised: the row was
            tokenized with the loss on the prompt too) or with no supervised label.

    Example:

    >>> from datasets import Dataset
    >>> rows = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]], "labels": [[-100, -100, 7, 8]]})
    >>> split_rows(rows, seq2seq=False)
    ([[5, 6]], [[7, 8]])
    """
    prompts, references = [], []
    for index, (ids, labels) in enumerate(zip(dataset["input_ids"], dataset["labels"])):
        ids, labels = list(ids), list(labels)
        supervised = [i for i, label in enumerate(labels) if label != -100]
        if not supervised:
            raise ValueError(f"Row {index} of the {what} has no supervised label (every label is -100): "
                             "there is no reference answer to generate.")
        if seq2seq:
            prompts.append(ids)
        else:
            start = supervised[0]
            if start == 0:
                raise ValueError(
                    f"Row {index} of the {what} has no prompt: its first label is supervised, so generation would "
                    "start from nothing. Generation scores need eval rows whose labels are -100 on the prompt "
                    "(raw prompt/answer rows are tokenized that way)."
                )
            prompts.append(ids[:start])
        references.append([label for label in labels[supervised[0]:] if label != -100])
    return prompts, references


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | None = None,
    max_new_tokens: int = 32,
    num_beams: int | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    disable_progress: bool = True,
) -> list[list[int]]:
    """Generate the answer tokens of every prompt, in batches, with the model's ``generation_config``.

    Args:
        model (`nn.Module`): A causal or seq2seq HF model (DDP/PEFT wrappers are fine).
        prompts (`list[list[int]]`): Prompt token ids, one list per row.
        pad_token_id (`int`): Pads the prompts (on the left for causal models) and ends finished rows.
        eos_token_id (`int`, *optional*): Stops a row; defaults to the generation config's.
        max_new_tokens (`int`): Longest answer generated.
        num_beams (`int`, *optional*): Beam width; ``None`` keeps the generation config's.
        batch_size (`int`): Prompts per ``generate`` call.
        device: Where to run; defaults to the model's device.
        disable_progress (`bool`): Hide the progress bar.

    Returns:
        `list[list[int]]`: the new tokens of each row (the prompt is not included).

    Example:

    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model
    >>> tok = build_tokenizer(); model = build_tiny_model("gpt2", tok)
    >>> out = generate_answers(model, [tok("copy : a b =")["input_ids"]], pad_token_id=tok.pad_token_id, max_new_tokens=3)
    >>> len(out[0]) <= 3
    True
    """
    if not prompts:
        raise ValueError("generate_answers got no prompt.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    seq2seq = is_seq2seq(model)
    bare = unwrap_model(model)  # DDP has no generate(); PEFT models keep theirs
    config = copy.deepcopy(getattr(bare, "generation_config", None))
    overrides: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id}
    if num_beams is not None:
        overrides["num_beams"] = num_beams
    if eos_token_id is not None and (config is None or config.eos_token_id is None):
        overrides["eos_token_id"] = eos_token_id
    if config is not None:
        # max_length from the config would cap (or warn about) max_new_tokens: the answer length is ours to set.
        config.max_length = None
    if device is None:
        device = next(bare.parameters()).device
    outputs: list[list[int]] = []
    with eval_mode(bare):
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=disable_progress, leave=False):
            rows = prompts[start : start + batch_size]
            input_ids, attention_mask = _pad(rows, pad_token_id, left=not seq2seq)
            generated = bare.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                      generation_config=config, **overrides)
            # Causal models return prompt + answer; encoder-decoders return the decoder start token + answer.
            new = generated[:, input_ids.shape[1]:] if not seq2seq else generated[:, 1:]
            outputs.extend(row.tolist() for row in new.cpu())
    return outputs


def evaluate_generation(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    *,
    metrics: Sequence[str] = tuple(TEXT_METRICS),
    scorer: TextScorer | None = None,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    what: str = "eval dataset",
    disable_progress: bool = True,
) -> dict[str, float]:
    """Score the text the model generates for each row's prompt against the row's answer.

    Args:
        model (`nn.Module`): A causal or seq2seq HF model.
        dataset (`datasets.Dataset`): Tokenized eval rows (``input_ids``, ``labels``), see :func:`split_rows`.
        tokenizer: Decodes both sides (special tokens skipped); gives the pad and eos ids.
        metrics (`Sequence[str]`): Built-in text metrics (``exact_match``, ``rouge_l``, ``bleu``).
        scorer (`callable`, *optional*): ``fn(predictions, references) -> dict[str, float]`` over
            the decoded texts.
        max_new_tokens (`int`, *optional*): Longest answer; defaults to the longest reference of
            ``dataset`` (eos included), enough for every right answer to end.
        num_beams (`int`, *optional*): Beam width; ``None`` keeps the model's ``generation_config``.
        batch_size (`int`): Prompts per ``generate`` call.
        device: Where to run; defaults to the model's device.
        what (`str`): How to name the dataset in errors.
        disable_progress (`bool`): Hide the progress bar.

    Returns:
        `dict[str, float]`: ``gen_<metric>`` for every metric and every key of the scorer.

    Example:

    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model, make_task, tokenize_for_causal_lm
    >>> tok = build_tokenizer(); model = build_tiny_model("gpt2", tok)
    >>> rows = tokenize_for_causal_lm(make_task("copy", 4), tok)
    >>> sorted(evaluate_generation(model, rows, tok, metrics=["exact_match", "bleu"]))
    ['gen_bleu', 'gen_exact_match']
    """
    if tokenizer is None:
        raise ValueError("Generation scores need a tokenizer to decode the answers: pass processing_class=tokenizer.")
    if len(dataset) == 0:
        raise ValueError(f"Cannot score generation on an empty {what}.")
    prompts, references = split_rows(dataset, is_seq2seq(model), what)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token: set tokenizer.pad_token to pad prompts.")
    if max_new_tokens is None:
        max_new_tokens = max(len(r) for r in references)
    generated = generate_answers(model, prompts, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                                 max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size,
                                 device=device, disable_progress=disable_progress)
    predictions = tokenizer.batch_decode(generated, skip_special_tokens=True)
    reference_texts = tokenizer.batch_decode(references, skip_special_tokens=True)
    scores = compute_text_metrics(predictions, reference_texts, metrics, scorer)
    return {GENERATION_PREFIX + name: value for name, value in scores.items()}
