"""Dataset layouts of user data, and their tokenization for causal and seq2seq language models.

A task's rows may come in any of the layouts Hugging Face users already have (TRL's names):

| layout | columns | loss on |
| --- | --- | --- |
| `text` | `text` (a string) | every token, as `run_clm` with `DataCollatorForLanguageModeling` (causal LMs only) |
| `prompt_completion` | `prompt` + `completion` (alias `answer`), strings | the completion and the `<eos>` after it |
| conversational `prompt_completion` | `prompt` + `completion`, lists of `{role, content}` messages | the completion turns |
| `messages` | `messages`, a list of `{role, content}` messages | the assistant turns (causal LMs only) |
| `tokenized` | `input_ids` (+ `labels`, + `attention_mask`) | `labels`, else every token |

Text is tokenized the way the tokenizer itself does it (`add_special_tokens=True`), so a tokenizer whose
post-processor adds `<bos>` (Llama-3 style) keeps it; conversations go through the chat template of the
tokenizer. :func:`detect_layout` picks the layout from the column names; :func:`tokenize_rows` tokenizes.

The synthetic suite (:mod:`clm_hf.tasks`) re-exports the older `tokenize_*` helpers defined here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import transformers

from ._logging import get_logger

__all__ = [
    "CHAT_ROLES",
    "COLUMN_OPTIONS",
    "LAYOUTS",
    "detect_layout",
    "rename_columns",
    "tokenize_for_causal_lm",
    "tokenize_for_seq2seq",
    "tokenize_messages",
    "tokenize_rows",
    "tokenize_task",
    "tokenize_text",
]

LAYOUTS: tuple[str, ...] = ("tokenized", "messages", "prompt_completion", "text")
# Recipe keys that rename a user's columns to the names the layouts expect.
COLUMN_OPTIONS: dict[str, str] = {
    "text_column": "text",
    "prompt_column": "prompt",
    "completion_column": "completion",
    "messages_column": "messages",
}
_ACCEPTED = (
    "'text' (full-sequence loss), 'prompt' + 'completion' or 'prompt' + 'answer' (completion-only loss; strings, or "
    "lists of chat messages), 'messages' (chat; loss on assistant turns), or tokenized 'input_ids' (+ 'labels')"
)
# transformers stores "no limit" as a huge sentinel; anything above this is treated as unset.
_UNBOUNDED_LENGTH = 1_000_000
# The roles chat templates know (OpenAI's and TRL's names); anything else is a typo the template would render as is.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool", "developer")


logger = get_logger(__name__)


def _check_positive_int(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _column_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None and isinstance(dataset, datasets.IterableDataset):
        # A stream whose features are unknown until read: the first row tells.
        first = next(iter(dataset.take(1)), None)
        names = list(first) if first is not None else []
    return list(names or [])


def detect_layout(dataset: Any, *, what: str = "dataset") -> str:
    """The layout of a task's rows, from its column names (see the module docstring).

    Pre-tokenized `input_ids` win over text columns, then `messages`, then `prompt` + `completion`/`answer`,
    then `text`.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): One split.
        what (`str`, *optional*): How to name it in errors, e.g. `"train dataset of task 'qa'"`.

    Returns:
        `str`: One of [`LAYOUTS`].

    Raises:
        `ValueError`: No layout fits; the message names the columns found and the layouts accepted.

    Example:

    ```python
    >>> import datasets
    >>> from clm_hf.layouts import detect_layout
    >>> detect_layout(datasets.Dataset.from_dict({"prompt": ["2+2="], "completion": ["4"]}))
    'prompt_completion'
    >>> detect_layout(datasets.Dataset.from_dict({"text": ["hello"]}))
    'text'

    ```
    """
    columns = set(_column_names(dataset))
    if "input_ids" in columns:
        return "tokenized"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and ({"completion", "answer"} & columns):
        return "prompt_completion"
    if "text" in columns:
        return "text"
    hint = ""
    if "prompt" in columns:
        hint = " It has 'prompt' but no 'completion' (or 'answer') column."
    raise ValueError(
        f"The {what} has columns {sorted(columns)}, which fit no accepted layout. Accepted: {_ACCEPTED}.{hint} Rename "
        "the columns (dataset.rename_column), or in a recipe map them with text_column, prompt_column, "
        "completion_column or messages_column."
    )


def rename_columns(dataset: Any, mapping: Mapping[str, Any], *, what: str = "dataset") -> Any:
    """Rename a user's columns to the names the layouts expect, from recipe options such as `prompt_column: question`.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): One split.
        mapping (`Mapping[str, str]`): Keys of [`COLUMN_OPTIONS`] -> the user's column names.
        what (`str`, *optional*): How to name the dataset in errors.

    Returns:
        The dataset with the columns renamed.

    Raises:
        `ValueError`: An unknown option, a column that is not there, or a target name already taken.

    Example:

    ```python
    >>> import datasets
    >>> from clm_hf.layouts import rename_columns
    >>> ds = datasets.Dataset.from_dict({"question": ["2+2="], "answer": ["4"]})
    >>> rename_columns(ds, {"prompt_column": "question"}).column_names
    ['prompt', 'answer']

    ```
    """
    columns = _column_names(dataset)
    renames: dict[str, str] = {}
    for option, source in mapping.items():
        if option not in COLUMN_OPTIONS:
            raise ValueError(f"Unknown column option {option!r} for the {what}; valid: {', '.join(COLUMN_OPTIONS)}.")
        target = COLUMN_OPTIONS[option]
        if not isinstance(source, str) or not source:
            raise ValueError(f"{option} must name a column of the {what} (a string), got {source!r}.")
        if source == target:
            continue
        if source not in columns:
            raise ValueError(f"{option}: the {what} has no column {source!r}; its columns are {columns}.")
        if target in columns:
            raise ValueError(
                f"{option}: cannot rename column {source!r} of the {what} to {target!r}: it already has a {target!r} "
                f"column (columns {columns}). Drop one of them first."
            )
        renames[source] = target
    return dataset.rename_columns(renames) if renames else dataset


def _special_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's own post-processor puts before and after a text (e.g. `<bos>` for Llama 3)."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []


def _map(dataset: Any, fn: Any, *, desc: str) -> Any:
    """`Dataset.map` for a split or a stream (a stream maps lazily, as its rows are read)."""
    kwargs: dict[str, Any] = dict(batched=True, with_indices=True, remove_columns=_column_names(dataset))
    if isinstance(dataset, datasets.Dataset):
        kwargs["desc"] = desc
    return dataset.map(fn, **kwargs)


def _check_text(value: Any, column: str, idx: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"Row {idx}: column {column!r} must hold a string, got {type(value).__name__}.")
    return value


def tokenize_text(
    dataset: Any,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    text_column: str = "text",
    with_labels: bool = True,
) -> Any:
    """Tokenize a `text` column for a causal LM with a loss on every token.

    `input_ids` are exactly what `tokenizer(text)` gives (special tokens included, e.g. a Llama-3 `<bos>`), and
    `labels` equal `input_ids`: after padding they match [`~transformers.DataCollatorForLanguageModeling`] with
    `mlm=False`. Nothing is truncated; `<eos>` is only added if the tokenizer adds it itself.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): Rows with a string `text_column`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The tokenizer.
        max_length (`int`, *optional*): Longest row allowed; defaults to `tokenizer.model_max_length` when set.
        text_column (`str`, *optional*, defaults to `"text"`): The text column.
        with_labels (`bool`, *optional*, defaults to `True`): Add `labels`; `False` leaves them to a data collator.

    Returns:
        The rows as `input_ids`, `attention_mask` (and `labels`); other columns are removed.

    Example:

    ```python
    >>> import datasets
    >>> from clm_hf.layouts import tokenize_text
    >>> from clm_hf.tasks import build_tokenizer
    >>> tok = build_tokenizer()
    >>> row = tokenize_text(datasets.Dataset.from_dict({"text": ["copy : a b = a b"]}), tok)[0]
    >>> row["labels"] == row["input_ids"] == tok("copy : a b = a b")["input_ids"]
    True

    ```
    """
    limit = _resolve_max_length(tokenizer, max_length)

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        texts = [_check_text(t, text_column, i) for t, i in zip(batch[text_column], indices)]
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        for row, idx in zip(ids, indices):
            _check_length(len(row), limit, idx, "text")
        out: dict[str, list[list[int]]] = {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}
        if with_labels:
            out["labels"] = [list(r) for r in ids]
        return out

    return _map(dataset, encode, desc="Tokenizing (text)")


def _render(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _check_messages(value: Any, column: str, idx: int) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
        raise ValueError(
            f"Row {idx}: column {column!r} must hold a list of {{'role', 'content'}} messages, got {value!r:.120}."
        )
    for turn, message in enumerate(value):
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            hint = (f" Roles are lower-case: write {role.lower()!r}." if isinstance(role, str) and role.lower() in CHAT_ROLES
                    else "")
            raise ValueError(f"Row {idx}: column {column!r}, turn {turn} has role {role!r}, which is not one of "
                             f"{list(CHAT_ROLES)}.{hint}")
        # An assistant turn is what the model learns: without text it would train on the end-of-turn marker alone.
        # (A tool-calling turn may carry its call instead of text.)
        if role == "assistant" and not message.get("tool_calls") and not (isinstance(content, str) and content.strip()):
            raise ValueError(f"Row {idx}: column {column!r}, turn {turn} (assistant) has no content to learn (got "
                             f"{content!r}); an assistant turn needs a non-empty string.")
    return [dict(m) for m in value]


def _supervised_spans(tokenizer: Any, prompt: list[dict[str, Any]], answer: list[dict[str, Any]] | None,
                      idx: int) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry the loss.

    For `messages` (`answer is None`), each assistant turn; for a conversational prompt/completion, the whole
    completion. A span runs from the end of the conversation rendered up to that turn with the generation prompt
    to the end of the conversation rendered with that turn, so it includes the turn's end-of-turn marker.
    """
    conversation = prompt + (answer or [])
    full = _render(tokenizer, conversation, generation_prompt=False)
    if answer is not None:
        cuts = [(len(prompt), len(conversation))]
    else:
        cuts = [(i, i + 1) for i, m in enumerate(conversation) if m["role"] == "assistant"]
    spans = []
    for start_turn, end_turn in cuts:
        before = _render(tokenizer, conversation[:start_turn], generation_prompt=True) if start_turn else ""
        upto = _render(tokenizer, conversation[:end_turn], generation_prompt=False)
        if not (full.startswith(before) and upto.startswith(before) and full.startswith(upto)):
            # A template that rewrites earlier turns (e.g. drops past reasoning) has no stable prefix.
            raise ValueError(
                f"Row {idx}: the chat template does not render the conversation prefix by prefix (turn {start_turn} "
                "changes earlier text), so the assistant tokens cannot be located. Use a template with "
                "{% generation %} tags, or pre-tokenize the rows with input_ids and labels."
            )
        spans.append((len(before), len(upto)))
    return full, spans


def _first_visible(text: str, start: int, end: int) -> int:
    """Where a token's first non-space character is, or -1 for an empty (special) token.

    A token is supervised when that character lies in a span: byte-level BPE tokens carry the space before
    a word ("Ġb"), and that space belongs to the text before the span.
    """
    if end <= start:
        return -1
    piece = text[start:end]
    return start + (len(piece) - len(piece.lstrip()) if piece.strip() else 0)


def tokenize_messages(
    dataset: Any,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    messages_column: str = "messages",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    conversational_prompt_completion: bool = False,
    what: str = "dataset",
) -> Any:
    """Tokenize conversations with the tokenizer's chat template, with the loss on assistant turns only.

    Each row is rendered with `tokenizer.apply_chat_template` and tokenized without adding special tokens again
    (the template writes them). `labels` equal `input_ids` on the assistant turns (their text and end-of-turn
    marker) and are -100 elsewhere. When the template marks assistant turns with `{% generation %}`, the mask comes
    from `return_assistant_tokens_mask`; otherwise the turns are located by rendering the conversation prefix by
    prefix. With `conversational_prompt_completion`, rows hold `prompt` and `completion` message lists and the loss
    covers the completion.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): The rows.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): A fast tokenizer with a `chat_template`.
        max_length (`int`, *optional*): Longest row allowed; defaults to `tokenizer.model_max_length` when set.
        messages_column, prompt_column, completion_column (`str`, *optional*): Column names.
        conversational_prompt_completion (`bool`, *optional*, defaults to `False`): Rows are prompt/completion
            message lists rather than one `messages` list.
        what (`str`, *optional*): How to name the dataset in warnings, e.g. `"train dataset of task 'qa'"`.

    Returns:
        The rows as `input_ids`, `attention_mask`, `labels`.

    Each turn's role must be one of [`CHAT_ROLES`] and each assistant turn's content a non-empty string. A word
    the tokenizer does not know (its `<unk>`, when that is a token of its own) is an error inside an assistant turn
    and a warning (a count of rows, and the first) in the rest of the conversation.

    Raises:
        `ValueError`: No chat template, a malformed message list, an unknown role, an assistant turn without
        content, a conversation without an assistant turn, an unknown word in an assistant turn, or a row longer
        than `max_length`.

    Example:

    ```python
    >>> import datasets
    >>> from clm_hf.layouts import tokenize_messages
    >>> from clm_hf.tasks import build_tokenizer
    >>> tok = build_tokenizer(extra_tokens=["user", "assistant"])
    >>> tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} = {% endfor %}"
    >>> ds = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "a b"},
    ...                                               {"role": "assistant", "content": "b a"}]]})
    >>> row = tokenize_messages(ds, tok)[0]
    >>> tok.convert_ids_to_tokens([t for t in row["labels"] if t != -100])
    ['assistant', ':', 'b', 'a', '=']

    ```
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The rows are conversations, but the tokenizer has no chat_template to render them. Set "
            "tokenizer.chat_template (or use an instruct model's tokenizer)."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("Conversational rows need a fast tokenizer (offset mapping) to locate the assistant tokens.")
    limit = _resolve_max_length(tokenizer, max_length)
    unknown = _unknown_id(tokenizer)
    tagged = "{% generation %}" in tokenizer.chat_template or "{%- generation %}" in tokenizer.chat_template

    def encode_one(prompt: list[dict[str, Any]], answer: list[dict[str, Any]] | None, idx: int) -> tuple[list[int], list[int]]:
        if tagged and answer is None:
            out = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        else:
            text, spans = _supervised_spans(tokenizer, prompt, answer, idx)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            mask = [int(any(lo <= _first_visible(text, start, end) < hi for lo, hi in spans))
                    for start, end in enc["offset_mapping"]]
        if not any(mask):
            raise ValueError(f"Row {idx}: the conversation has no assistant tokens to learn from.")
        if unknown is not None and any(m and t == unknown for t, m in zip(ids, mask)):
            column = completion_column if answer is not None else messages_column
            raise ValueError(f"Row {idx}: an assistant turn of column {column!r} contains words unknown to the tokenizer "
                             f"(read as {tokenizer.unk_token!r}), which the model would learn to write: "
                             f"{[m['content'] for m in (answer or prompt) if m['role'] == 'assistant']!r:.300}."
                             f"{_unknown_advice(tokenizer)}")
        _check_length(len(ids), limit, idx, "the conversation")
        return ids, [t if m else -100 for t, m in zip(ids, mask)]

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for row, idx in enumerate(indices):
            if conversational_prompt_completion:
                prompt = _check_messages(batch[prompt_column][row], prompt_column, idx)
                answer = _check_messages(batch[completion_column][row], completion_column, idx)
            else:
                prompt, answer = _check_messages(batch[messages_column][row], messages_column, idx), None
                if not any(m["role"] == "assistant" for m in prompt):
                    raise ValueError(f"Row {idx}: column {messages_column!r} has no assistant turn to learn from.")
            ids, labels = encode_one(prompt, answer, idx)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    return _warn_unknown_context(_map(dataset, encode, desc="Tokenizing (chat)"), tokenizer, what, "chat context")


def _is_conversational(dataset: Any, column: str) -> bool:
    feature = getattr(dataset, "features", None)
    if feature is not None and column in feature:
        kind = feature[column]
        return isinstance(kind, (list, datasets.Sequence, datasets.LargeList)) or type(kind).__name__ == "List"
    first = next(iter(dataset.take(1) if isinstance(dataset, datasets.IterableDataset) else [dataset[0]]), None)
    return first is not None and isinstance(first.get(column), list)


def tokenize_rows(
    dataset: Any,
    tokenizer: transformers.PreTrainedTokenizerBase | None,
    *,
    seq2seq: bool,
    answer_only_loss: bool = True,
    labels_from_collator: bool = False,
    what: str = "dataset",
) -> Any:
    """Tokenize a task's rows whatever their layout (see [`detect_layout`]).

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): One split, in any accepted layout.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): Needed for every layout but `tokenized`.
        seq2seq (`bool`): Tokenize for an encoder-decoder model (only `prompt`/`completion` text, or `tokenized` rows
            with `labels`, make sense there).
        answer_only_loss (`bool`, *optional*, defaults to `True`): For standard prompt/completion rows of a causal LM,
            mask the prompt with -100; `False` supervises every token.
        labels_from_collator (`bool`, *optional*, defaults to `False`): A user data collator builds the labels of
            `text` and label-less `tokenized` rows (e.g. `DataCollatorForLanguageModeling`): leave them out.
        what (`str`, *optional*): How to name the dataset in errors.

    Returns:
        The tokenized rows (a stream stays a stream, tokenized lazily).

    Raises:
        `ValueError`: No layout fits, a layout the model type cannot train, or no tokenizer for text rows.

    Example:

    ```python
    >>> import datasets
    >>> from clm_hf.layouts import tokenize_rows
    >>> from clm_hf.tasks import build_tokenizer
    >>> tok = build_tokenizer()
    >>> ds = datasets.Dataset.from_dict({"prompt": ["reverse : a b ="], "completion": ["b a"]})
    >>> row = tokenize_rows(ds, tok, seq2seq=False)[0]
    >>> tok.convert_ids_to_tokens([t for t in row["labels"] if t != -100])
    ['b', 'a', '<eos>']

    ```
    """
    layout = detect_layout(dataset, what=what)
    columns = _column_names(dataset)
    _warn_unused_layout_columns(columns, layout, what)
    if layout == "tokenized":
        if "labels" in columns or labels_from_collator:
            return dataset
        if seq2seq:
            raise ValueError(
                f"The {what} has 'input_ids' but no 'labels': an encoder-decoder model needs target labels. Add a "
                "'labels' column, or give 'prompt'/'completion' text."
            )

        def add_labels(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
            masks = batch.get("attention_mask") or [[1] * len(r) for r in batch["input_ids"]]
            return {"labels": [[t if m else -100 for t, m in zip(r, mask)] for r, mask in zip(batch["input_ids"], masks)]}

        kwargs: dict[str, Any] = dict(batched=True, with_indices=True)
        if isinstance(dataset, datasets.Dataset):
            kwargs["desc"] = "Adding labels"
        return dataset.map(add_labels, **kwargs)
    if tokenizer is None:
        raise ValueError(
            f"The {what} holds raw text in the {layout!r} layout (columns {columns}); pass processing_class=tokenizer "
            "to the trainer to tokenize it."
        )
    if layout in ("text", "messages") and seq2seq:
        raise ValueError(
            f"The {what} is in the {layout!r} layout, which is for causal (decoder-only) LMs: an encoder-decoder model "
            "needs an input and a target. Give 'prompt'/'completion' columns, or train a causal LM."
        )
    if layout == "text":
        # Every token of a text row is learned, an <unk> too: said once per split, as for prompts.
        return _warn_unknown_context(tokenize_text(dataset, tokenizer, with_labels=not labels_from_collator),
                                     tokenizer, what, "text")
    if layout == "messages":
        return tokenize_messages(dataset, tokenizer, what=what)
    completion = "completion" if "completion" in columns else "answer"
    if _is_conversational(dataset, "prompt"):
        if seq2seq:
            raise ValueError(f"The {what} has conversational prompt/completion rows, which need a causal LM's chat "
                             "template; give string prompt/completion columns for an encoder-decoder model.")
        return tokenize_messages(dataset, tokenizer, completion_column=completion, conversational_prompt_completion=True,
                                 what=what)
    if seq2seq:
        return tokenize_for_seq2seq(dataset, tokenizer, answer_column=completion, what=what)
    # TRL's prompt/completion rows are joined exactly as written (a template-formatted prompt ends where the
    # completion starts); the project's own prompt/answer rows (the synthetic suite) keep the separating space.
    if completion == "completion":
        _warn_glued_join(dataset, what)
    return tokenize_for_causal_lm(dataset, tokenizer, answer_only_loss=answer_only_loss, answer_column=completion,
                                  separator="" if completion == "completion" else None, what=what)



def _warn_glued_join(dataset: Any, what: str) -> None:
    """One warning when most rows join two non-space characters (``"...?"`` + ``"Natalia"``): prompt/completion
    rows are joined as written, TRL's convention, where prompt/answer rows get a space, so a user who relied on
    that space (e.g. a recipe mapping ``completion_column: answer``) sees it is gone. A stream is not read ahead."""
    if not isinstance(dataset, datasets.Dataset) or dataset.num_rows == 0:
        return
    table = dataset.select_columns(["prompt", "completion"]).with_format("arrow")[:]  # honours select()/shuffle()
    prompt, completion = table.column("prompt"), table.column("completion")
    if not (pa.types.is_string(prompt.type) or pa.types.is_large_string(prompt.type)) or \
            not (pa.types.is_string(completion.type) or pa.types.is_large_string(completion.type)):
        return
    last, first = pc.utf8_slice_codeunits(prompt, -1), pc.utf8_slice_codeunits(completion, 0, 1)
    glued = pc.and_(pc.and_(pc.greater(pc.utf8_length(last), 0), pc.invert(pc.utf8_is_space(last))),
                    pc.and_(pc.greater(pc.utf8_length(first), 0), pc.invert(pc.utf8_is_space(first))))
    count = pc.sum(glued).as_py() or 0
    if 2 * count <= len(table):
        return
    row = pc.index(glued, True).as_py()
    logger.warning(
        "clm-hf: %d of the %d rows of the %s join 'prompt' and 'completion' with no space between them (row %d: "
        "%r + %r). prompt/completion rows are joined as written (TRL's convention; prompt/answer rows get a "
        "space): end the prompt or start the completion with a space if the text needs one.",
        count, len(table), what, row, prompt[row].as_py()[-20:], completion[row].as_py()[:20],
    )


def _warn_unused_layout_columns(columns: Sequence[str], layout: str, what: str) -> None:
    """One warning when the columns of a layout that lost to another (see `detect_layout`) are present: they are
    neither trained nor scored. Tokenized rows are left alone: the text columns they keep after `dataset.map` are
    usually what their `input_ids` were made from."""
    names = set(columns)
    if layout == "tokenized":
        return
    # Every full layout the columns hold, in detect_layout's order of precedence: the first one is read.
    present = [["messages"]] if "messages" in names else []
    present += [["prompt", c] for c in ("completion", "answer") if "prompt" in names and c in names]
    present += [["text"]] if "text" in names else []
    if len(present) < 2:
        return
    chosen = present[0]
    unused = list(dict.fromkeys(c for group in present[1:] for c in group if c not in chosen))
    logger.warning(
        "clm-hf: the %s has the columns of more than one layout; it is read as the %r layout (columns %s), so "
        "column(s) %s are dropped, neither trained nor scored. Remove them (dataset.remove_columns) or rename the "
        "ones you mean (data.md: if several fit, input_ids win, then messages, then prompt + completion/answer, "
        "then text).", what, layout, chosen, unused,
    )


def _resolve_max_length(
    tokenizer: transformers.PreTrainedTokenizerBase, max_length: int | None
) -> int | None:
    if max_length is not None:
        _check_positive_int(max_length, "max_length")
        return max_length
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _UNBOUNDED_LENGTH:
        return limit
    return None


def _check_dataset(dataset: datasets.Dataset, columns: Sequence[str], what: str = "dataset") -> None:
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(
            f"Expected a datasets.Dataset (a single split) for the {what}, got {type(dataset).__name__}. "
            "For a DatasetDict, tokenize each split."
        )
    names = _column_names(dataset)
    for column in columns:
        if column not in names:
            raise ValueError(
                f"Column {column!r} not found in the {what}; columns present: {names}."
            )
    if isinstance(dataset, datasets.Dataset) and dataset.num_rows == 0:
        raise ValueError(f"Cannot tokenize the {what}: it is empty (0 rows), and a task needs at least one example.")


def _unknown_id(tokenizer: Any) -> int | None:
    """The tokenizer's `<unk>` id, or None when it has none or reuses it (GPT-2: one id for unk/eos/pad/bos)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    reused = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    return None if unk is None or unk in reused else unk


def _is_builtin_tokenizer(tokenizer: Any) -> bool:
    """Whether the tokenizer is (a saved copy of) :func:`clm_hf.tasks.build_tokenizer`'s: a whitespace-split word
    vocabulary that starts with its four special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordLevel":
        return False
    return tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<unk>", "<bos>", "<eos>"]


def _unknown_advice(tokenizer: Any) -> str:
    if _is_builtin_tokenizer(tokenizer):
        return (" The tokenizer is build_tokenizer's word vocabulary: build it with the matching alphabet, task_names "
                "or extra_tokens.")
    return " Fix those rows, or use a tokenizer whose vocabulary covers them."


def _warn_unknown_context(tokenized: Any, tokenizer: Any, what: str, part: str) -> Any:
    """Warn, once per split, about rows with `<unk>` outside the answers (answers with one were refused already),
    or anywhere in `text` rows (``part="text"``: no answer of their own, every token is learned).

    The count reads the tokenized ids (arrow, vectorised), so it holds when `datasets` reuses a cached map.
    A stream is tokenized lazily, as it is read: its first such row is named when it is read (no count).
    """
    unk = _unknown_id(tokenizer)
    if unk is None:
        return tokenized
    if isinstance(tokenized, datasets.IterableDataset):
        warned = False

        def check(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
            nonlocal warned
            first = next((i for ids, i in zip(batch["input_ids"], indices) if unk in ids), None) if not warned else None
            if first is not None:
                warned = True
                logger.warning("clm-hf: row %d of the streamed %s has words unknown to the tokenizer in its %s, read "
                               "as %r (later rows are not reported).%s", first, what, part, tokenizer.unk_token,
                               _unknown_advice(tokenizer))
            return {}

        return tokenized.map(check, batched=True, with_indices=True)
    if not isinstance(tokenized, datasets.Dataset) or tokenized.num_rows == 0:
        return tokenized
    column = tokenized.data.column("input_ids").combine_chunks()
    hits = np.asarray(pc.list_flatten(column)) == unk
    if not hits.any():
        return tokenized
    rows = np.unique(np.asarray(pc.list_parent_indices(column))[hits])  # the table's rows, whatever its chunks
    logger.warning(
        "clm-hf: %d of %d rows of the %s have words unknown to the tokenizer in their %s (first: row %d), read as "
        "%r; they are trained and scored that way%s.%s", len(rows), tokenized.num_rows, what,
        part, int(rows[0]), tokenizer.unk_token, "" if part == "text" else " (the answers have none)",
        _unknown_advice(tokenizer))
    return tokenized


def _encode(
    tokenizer: transformers.PreTrainedTokenizerBase,
    texts: list[str],
    column: str,
    indices: list[int],
    *,
    supervised: bool = True,
) -> list[list[int]]:
    for text, idx in zip(texts, indices):
        if not isinstance(text, str):
            raise ValueError(
                f"Row {idx}: column {column!r} must hold a string, got {type(text).__name__}."
            )
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    unk = _unknown_id(tokenizer)
    if unk is not None and supervised:
        for row_ids, text, idx in zip(ids, texts, indices):
            if unk in row_ids:
                # An <unk> in the answer would train the model to write <unk>; in a prompt it is only context
                # (one code row's "{" in a SentencePiece vocabulary), counted in a warning after the map.
                raise ValueError(
                    f"Row {idx}: column {column!r} text {text!r:.300} contains words unknown to the tokenizer "
                    f"(read as {tokenizer.unk_token!r}), which the model would learn to write.{_unknown_advice(tokenizer)}"
                )
    return ids


def _check_length(length: int, max_length: int | None, idx: int, what: str) -> None:
    if max_length is not None and length > max_length:
        raise ValueError(
            f"Row {idx}: {what} is {length} tokens, more than max_length={max_length}. "
            "Refusing to truncate (it would silently drop answer tokens); raise max_length or "
            "shorten the example."
        )


def _require_eos(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer must define an eos token (it terminates every answer).")
    return tokenizer.eos_token_id


def tokenize_for_causal_lm(
    dataset: datasets.Dataset,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    answer_only_loss: bool = True,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    separator: str | None = None,
    what: str = "dataset",
) -> datasets.Dataset:
    """Tokenize prompt/answer rows for a decoder-only (causal) language model.

    Each row becomes `input_ids = prompt_ids + answer_ids + [eos]` with an all-ones
    `attention_mask`. `labels` is a copy of `input_ids` in which, when `answer_only_loss`, the
    prompt positions are `-100`; so the supervised positions are exactly the answer tokens and the
    final `<eos>`. Labels are **not** shifted: Transformers causal-LM heads shift them internally.
    Nothing is padded (leave that to a collator, e.g.
    [`~transformers.DataCollatorForSeq2Seq`], which pads labels with -100).

    The answer ids are taken from tokenizing prompt and answer jointly whenever that reproduces
    `prompt_ids` as a prefix, so subword tokenizers see the same boundary as at generation time; else
    they are the answer tokenized alone. With `separator=None` (the default, the `prompt`/`answer`
    rows of the synthetic suite) the joined text is `prompt + " " + answer`, the space added only when
    neither side already has one; with `separator=""` (what [`tokenize_rows`] uses for TRL's
    `prompt`/`completion` rows) it is `prompt + completion` exactly as written, as in TRL.

    A word the tokenizer does not know (its `<unk>`, when that is a token of its own) is an error in
    the answer, which the model would learn to write, and a warning in the prompt (a count of rows,
    and the first).

    Args:
        dataset (`datasets.Dataset`):
            One split with string columns `prompt_column` and `answer_column`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Must define an eos token.
        max_length (`int`, *optional*):
            Maximum total length. Defaults to `tokenizer.model_max_length` when that is a real
            limit, else unlimited.
        answer_only_loss (`bool`, *optional*, defaults to `True`):
            Mask the prompt with -100 in `labels`; if `False`, every token is supervised.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompt text.
        answer_column (`str`, *optional*, defaults to `"answer"`):
            Column holding the answer text.
        separator (`str`, *optional*):
            What joins prompt and answer: `None` adds a space when neither side has one; a string
            (`""`: TRL's convention) is put between them as is.
        what (`str`, *optional*, defaults to `"dataset"`):
            How to name the rows in errors and warnings, e.g. `"eval dataset of task 'qa'"`.

    Returns:
        `datasets.Dataset`: Columns `input_ids`, `attention_mask`, `labels`; all original columns
        are removed.

    Raises:
        `ValueError`: Missing column (the columns present are listed), empty dataset, a row longer
        than `max_length` (the row index is named; nothing is truncated), a non-string cell, or a
        word unknown to the tokenizer in an answer (when its unk token is distinct from eos/pad/bos).
        `TypeError`: `dataset` is not a `datasets.Dataset`.

    Example:

    ```python
    >>> import datasets
    >>> from clm_hf.layouts import tokenize_for_causal_lm
    >>> from clm_hf.tasks import build_tokenizer
    >>> tok = build_tokenizer()
    >>> ds = datasets.Dataset.from_dict({"prompt": ["reverse : a b ="], "answer": ["b a"]})
    >>> row = tokenize_for_causal_lm(ds, tok)[0]
    >>> tok.convert_ids_to_tokens(row["input_ids"])
    ['reverse', ':', 'a', 'b', '=', 'b', 'a', '<eos>']
    >>> row["labels"][:5], tok.convert_ids_to_tokens(row["labels"][5:])
    ([-100, -100, -100, -100, -100], ['b', 'a', '<eos>'])

    ```
    """
    _check_dataset(dataset, (prompt_column, answer_column), what)
    eos = _require_eos(tokenizer)
    limit = _resolve_max_length(tokenizer, max_length)
    # What the tokenizer itself puts first (Llama 3's <bos>) starts every row, unsupervised.
    lead, _ = _special_ids(tokenizer)

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        prompts, answers = batch[prompt_column], batch[answer_column]
        prompt_ids = _encode(tokenizer, prompts, prompt_column, indices, supervised=not answer_only_loss)
        answer_ids = _encode(tokenizer, answers, answer_column, indices)
        joined_texts = []
        for p, a in zip(prompts, answers):
            if separator is not None:
                sep = separator
            else:
                sep = " " if p and a and not p[-1].isspace() and not a[0].isspace() else ""
            joined_texts.append(p + sep + a)
        joined_ids = tokenizer(joined_texts, add_special_tokens=False)["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for p_ids, a_ids, j_ids, idx in zip(prompt_ids, answer_ids, joined_ids, indices):
            if j_ids[: len(p_ids)] == p_ids:
                a_ids = j_ids[len(p_ids) :]
            ids = lead + p_ids + a_ids + [eos]
            _check_length(len(ids), limit, idx, "prompt + answer + eos")
            if answer_only_loss:
                labels = [-100] * (len(lead) + len(p_ids)) + a_ids + [eos]
            else:
                labels = list(ids)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    return _warn_unknown_context(_map(dataset, encode, desc="Tokenizing (causal LM)"), tokenizer, what, "prompt")


def tokenize_for_seq2seq(
    dataset: datasets.Dataset,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    what: str = "dataset",
) -> datasets.Dataset:
    """Tokenize prompt/answer rows for an encoder-decoder model.

    Each row becomes `input_ids = prompt_ids + [eos]` (encoder side) with an all-ones
    `attention_mask`, and `labels = answer_ids + [eos]` (decoder targets; the model builds the
    decoder inputs by shifting them right behind `decoder_start_token_id`). Nothing is padded.

    Args:
        dataset (`datasets.Dataset`):
            One split with string columns `prompt_column` and `answer_column`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Must define an eos token.
        max_length (`int`, *optional*):
            Maximum length of the encoder input and, separately, of the labels. Defaults to
            `tokenizer.model_max_length` when that is a real limit, else unlimited.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompt text.
        answer_column (`str`, *optional*, defaults to `"answer"`):
            Column holding the answer text.
        what (`str`, *optional*, defaults to `"dataset"`):
            How to name the rows in errors and warnings, e.g. `"eval dataset of task 'qa'"`.

    Returns:
        `datasets.Dataset`: Columns `input_ids`, `attention_mask`, `labels`; all original columns
        are removed.

    Raises:
        `ValueError`: Same cases as [`tokenize_for_causal_lm`] (an unknown word is an error in the
        answer, a warning in the prompt).
        `TypeError`: `dataset` is not a `datasets.Dataset`.

    Example:

    ```python
    >>> import datasets
    >>> from clm_hf.layouts import tokenize_for_seq2seq
    >>> from clm_hf.tasks import build_tokenizer
    >>> tok = build_tokenizer()
    >>> ds = datasets.Dataset.from_dict({"prompt": ["reverse : a b ="], "answer": ["b a"]})
    >>> row = tokenize_for_seq2seq(ds, tok)[0]
    >>> tok.convert_ids_to_tokens(row["input_ids"]), tok.convert_ids_to_tokens(row["labels"])
    (['reverse', ':', 'a', 'b', '=', '<eos>'], ['b', 'a', '<eos>'])

    ```
    """
    _check_dataset(dataset, (prompt_column, answer_column), what)
    eos = _require_eos(tokenizer)
    limit = _resolve_max_length(tokenizer, max_length)
    lead, _ = _special_ids(tokenizer)

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        prompt_ids = _encode(tokenizer, batch[prompt_column], prompt_column, indices, supervised=False)
        answer_ids = _encode(tokenizer, batch[answer_column], answer_column, indices)
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for p_ids, a_ids, idx in zip(prompt_ids, answer_ids, indices):
            ids, labels = lead + p_ids + [eos], a_ids + [eos]
            _check_length(len(ids), limit, idx, "prompt + eos")
            _check_length(len(labels), limit, idx, "answer + eos")
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    return _warn_unknown_context(_map(dataset, encode, desc="Tokenizing (seq2seq)"), tokenizer, what, "prompt")


def tokenize_task(
    dataset: datasets.Dataset,
    tokenizer: transformers.PreTrainedTokenizerBase,
    model_or_seq2seq: Any,
    **kwargs: Any,
) -> datasets.Dataset:
    """Tokenize with [`tokenize_for_seq2seq`] or [`tokenize_for_causal_lm`] as the model requires.

    Args:
        dataset (`datasets.Dataset`):
            One split with prompt/answer columns.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer to use.
        model_or_seq2seq (`PreTrainedModel` or `bool`):
            A model (decided with [`is_seq2seq_model`]) or directly `True` for seq2seq /
            `False` for causal LM.
        kwargs (`Any`):
            Forwarded to the chosen function. `answer_only_loss=True` is accepted (and ignored) for
            seq2seq, where labels are always the answer only.

    Returns:
        `datasets.Dataset`: The tokenized split.

    Raises:
        `ValueError`: `answer_only_loss=False` with a seq2seq model (its labels cannot include the
        prompt), plus anything the chosen function raises.
        `TypeError`: `model_or_seq2seq` is `None`.

    Example:

    ```python
    >>> from clm_hf.layouts import tokenize_task
    >>> from clm_hf.tasks import build_tokenizer, make_task
    >>> tok = build_tokenizer()
    >>> ds = tokenize_task(make_task("copy", 4), tok, True)
    >>> ds.column_names
    ['input_ids', 'attention_mask', 'labels']

    ```
    """
    if model_or_seq2seq is None:
        raise TypeError("model_or_seq2seq must be a model or a bool, got None.")
    if isinstance(model_or_seq2seq, (bool, np.bool_)):
        seq2seq = bool(model_or_seq2seq)
    else:
        from .tasks import is_seq2seq_model

        seq2seq = is_seq2seq_model(model_or_seq2seq)
    if not seq2seq:
        return tokenize_for_causal_lm(dataset, tokenizer, **kwargs)
    if "answer_only_loss" in kwargs:
        if not kwargs.pop("answer_only_loss"):
            raise ValueError(
                "answer_only_loss=False is not supported for seq2seq models: the decoder labels "
                "are the answer; the prompt is the encoder input."
            )
    return tokenize_for_seq2seq(dataset, tokenizer, **kwargs)


def tokenize_full_text(dataset: datasets.Dataset, tokenizer: Any, seq2seq: bool, what: str) -> datasets.Dataset:
    """``text`` rows of a reference set -> ``input_ids`` + eos, every token supervised: the loss and
    perplexity of the whole text (unlike :func:`tokenize_text`, for training, which keeps what the
    tokenizer itself adds and appends nothing)."""
    if seq2seq:
        raise ValueError(f"The {what} has 'text' rows, which an encoder-decoder cannot score as a whole text; "
                         "give it 'prompt'/'answer' rows (or input_ids/labels).")
    if tokenizer is None:
        raise ValueError(f"The {what} has raw 'text' rows; pass processing_class=tokenizer to tokenize them.")
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        for text, index in zip(batch["text"], indices):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"Row {index} of the {what} has no text in column 'text' (got {text!r}).")
        ids = [row + ([eos] if eos is not None else []) for row in
               tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]
        return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": [list(r) for r in ids]}

    return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                       desc=f"Tokenizing {what}")
