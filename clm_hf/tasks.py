"""Seeded synthetic task suite and offline tiny-model/tokenizer builders.

Continual-learning methods are only testable when forgetting is cheap to provoke and easy to
measure. The tasks here share a single input distribution (random letter sequences) but map it
to *conflicting* outputs (copy vs. reverse vs. sort, ...), so training on one task demonstrably
overwrites another, within seconds, on a CPU. Everything is built in memory from configs: no
Hugging Face Hub access is ever needed.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

# Tokenization of user data lives in clm_hf.layouts; these names stay importable from here.
from .layouts import tokenize_for_causal_lm, tokenize_for_seq2seq, tokenize_task

__all__ = [
    "SYNTHETIC_TASKS",
    "build_tiny_model",
    "build_tokenizer",
    "is_seq2seq_model",
    "make_suite",
    "make_task",
    "tokenize_for_causal_lm",
    "tokenize_for_seq2seq",
    "tokenize_task",
]

DEFAULT_ALPHABET = "abcdefgh"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
SUPPORTED_ARCHS: tuple[str, ...] = ("gpt2", "llama", "t5")
# Fixed rather than tied to the tokenizer so a model can be reused with a longer tokenizer limit.
_MAX_POSITIONS = 128


def _sorted_by_alphabet(seq: list[str], alphabet: str) -> list[str]:
    # Sort by position in the alphabet, not by code point, so custom alphabets order as given.
    return sorted(seq, key=alphabet.index)


def _shift(seq: list[str], alphabet: str) -> list[str]:
    return [alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in seq]


def _count(seq: list[str], alphabet: str) -> list[str]:
    # One token per digit so lengths >= 10 stay inside the digit vocabulary of build_tokenizer.
    return list(str(len(seq)))


_TASK_FNS: dict[str, Callable[[list[str], str], list[str]]] = {
    "copy": lambda seq, alphabet: list(seq),
    "reverse": lambda seq, alphabet: seq[::-1],
    "sort": _sorted_by_alphabet,
    "shift": _shift,
    "rotate": lambda seq, alphabet: seq[1:] + seq[:1],
    "count": _count,
}

SYNTHETIC_TASKS: tuple[str, ...] = tuple(_TASK_FNS)


def _unknown_name_error(kind: str, name: object, valid: Sequence[str]) -> ValueError:
    msg = f"Unknown {kind} {name!r}. Valid {kind}s: {', '.join(valid)}."
    if isinstance(name, str):
        close = difflib.get_close_matches(name, valid, n=1)
        if close:
            msg += f" Did you mean {close[0]!r}?"
    return ValueError(msg)


def _check_positive_int(value: object, name: str) -> None:
    # bool is an int subclass; True silently meaning 1 would hide a wrong-argument bug.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _validate_alphabet(alphabet: str) -> None:
    if not isinstance(alphabet, str) or len(alphabet) < 2:
        # With one symbol, shift is the identity and sort/copy/reverse coincide: no conflict left.
        raise ValueError(f"alphabet must be a string of at least 2 symbols, got {alphabet!r}.")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet must not repeat symbols, got {alphabet!r}.")
    if any(c.isspace() for c in alphabet):
        raise ValueError("alphabet must not contain whitespace (tokens are whitespace separated).")


def _sample_inputs(
    num_examples: int,
    *,
    seed: int,
    min_len: int,
    max_len: int,
    alphabet: str,
    exclude: frozenset[tuple[str, ...]] = frozenset(),
) -> list[list[str]]:
    # The generator depends on the seed and the input-shape arguments only, never on the task
    # name: this is what makes every task see the same inputs for the same seed.
    rng = random.Random(seed)
    if exclude:
        space = sum(len(alphabet) ** n for n in range(min_len, max_len + 1))
        if space - len(exclude) < num_examples:
            raise ValueError(
                f"Cannot draw {num_examples} held-out inputs: only {space - len(exclude)} "
                f"sequences of length {min_len}-{max_len} over {alphabet!r} are unused."
            )
    out: list[list[str]] = []
    while len(out) < num_examples:
        length = rng.randint(min_len, max_len)
        seq = [rng.choice(alphabet) for _ in range(length)]
        if exclude and tuple(seq) in exclude:
            continue
        out.append(seq)
    return out


def _format_prompt(name: str, seq: Sequence[str]) -> str:
    return f"{name} : {' '.join(seq)} ="


def _build_task_dataset(name: str, inputs: list[list[str]], alphabet: str) -> datasets.Dataset:
    fn = _TASK_FNS[name]
    return datasets.Dataset.from_dict(
        {
            "prompt": [_format_prompt(name, seq) for seq in inputs],
            "answer": [" ".join(fn(seq, alphabet)) for seq in inputs],
        }
    )


def _validate_task_args(name: object, min_len: int, max_len: int, alphabet: str) -> None:
    if name not in _TASK_FNS:
        raise _unknown_name_error("task", name, SYNTHETIC_TASKS)
    _check_positive_int(min_len, "min_len")
    _check_positive_int(max_len, "max_len")
    if max_len < min_len:
        raise ValueError(f"max_len ({max_len}) must be >= min_len ({min_len}).")
    _validate_alphabet(alphabet)


def make_task(
    name: str,
    num_examples: int,
    *,
    seed: int = 0,
    min_len: int = 3,
    max_len: int = 6,
    alphabet: str = DEFAULT_ALPHABET,
) -> datasets.Dataset:
    """Build one synthetic sequence task.

    Inputs are random letter sequences (letters drawn uniformly with replacement, length uniform in
    `[min_len, max_len]`). The input stream depends only on `seed`, `min_len`, `max_len` and
    `alphabet`, so two tasks built with the same seed see exactly the same inputs and differ only
    in the mapping to the answer:

    - `copy`: the sequence unchanged.
    - `reverse`: the sequence reversed.
    - `sort`: the letters sorted by their position in `alphabet`.
    - `shift`: each letter replaced by the next one in `alphabet`, cyclically (last wraps to first).
    - `rotate`: the sequence rotated left by one (first letter moved to the end).
    - `count`: the sequence length as a digit string, one token per digit (`12` -> `"1 2"`).

    Args:
        name (`str`):
            Task name, one of [`SYNTHETIC_TASKS`].
        num_examples (`int`):
            Number of rows to generate; must be > 0.
        seed (`int`, *optional*, defaults to 0):
            Seed of the input generator. Same seed, same inputs, whatever the task.
        min_len (`int`, *optional*, defaults to 3):
            Minimum sequence length (inclusive).
        max_len (`int`, *optional*, defaults to 6):
            Maximum sequence length (inclusive).
        alphabet (`str`, *optional*, defaults to `"abcdefgh"`):
            Symbols to draw from; unique, non-whitespace characters, at least 2.

    Returns:
        `datasets.Dataset`: Columns `"prompt"` (e.g. `"reverse : a c b ="`) and `"answer"`
        (e.g. `"b c a"`), both strings with whitespace-separated tokens.

    Raises:
        `ValueError`: Unknown task name (the closest valid name is suggested), non-positive
        `num_examples`, or invalid length bounds / alphabet.

    Example:

    ```python
    >>> from clm_hf.tasks import make_task
    >>> ds = make_task("reverse", 2, seed=0)
    >>> ds.column_names
    ['prompt', 'answer']
    >>> ds[0]["prompt"].startswith("reverse : ") and ds[0]["prompt"].endswith(" =")
    True
    >>> make_task("copy", 2, seed=0)[0]["prompt"][len("copy"):] == ds[0]["prompt"][len("reverse"):]
    True

    ```
    """
    _validate_task_args(name, min_len, max_len, alphabet)
    _check_positive_int(num_examples, "num_examples")
    inputs = _sample_inputs(
        num_examples, seed=seed, min_len=min_len, max_len=max_len, alphabet=alphabet
    )
    return _build_task_dataset(name, inputs, alphabet)


def make_suite(
    task_names: Sequence[str] | None = None,
    *,
    num_train: int = 256,
    num_eval: int = 64,
    seed: int = 0,
    min_len: int = 3,
    max_len: int = 6,
    alphabet: str = DEFAULT_ALPHABET,
) -> dict[str, datasets.DatasetDict]:
    """Build an ordered continual-learning suite of synthetic tasks.

    Every task gets a `"train"` and an `"eval"` split. Train inputs are drawn with seed `2 * seed`
    and eval inputs with seed `2 * seed + 1`, and eval inputs that already occur in train are
    redrawn, so the eval split is held out (it measures generalisation, not memorisation). All
    tasks of the suite share the same train inputs and the same eval inputs, which is what makes
    their answers conflict.

    Args:
        task_names (`Sequence[str]`, *optional*):
            Tasks in training order. Defaults to the first 4 of [`SYNTHETIC_TASKS`].
        num_train (`int`, *optional*, defaults to 256):
            Rows per train split.
        num_eval (`int`, *optional*, defaults to 64):
            Rows per eval split.
        seed (`int`, *optional*, defaults to 0):
            Base seed of the suite.
        min_len, max_len, alphabet: The shared input distribution, as in [`make_task`].

    Returns:
        `dict[str, datasets.DatasetDict]`: Task name -> `DatasetDict({"train", "eval"})`, in the
        order given.

    Raises:
        `ValueError`: Empty or duplicated task names, unknown task name, or non-positive sizes.

    Example:

    ```python
    >>> from clm_hf.tasks import make_suite
    >>> suite = make_suite(["copy", "reverse"], num_train=8, num_eval=4)
    >>> list(suite)
    ['copy', 'reverse']
    >>> suite["copy"]["train"].num_rows, suite["copy"]["eval"].num_rows
    (8, 4)

    ```
    """
    if task_names is None:
        task_names = SYNTHETIC_TASKS[:4]
    if isinstance(task_names, str):
        # A bare string would otherwise be iterated letter by letter.
        raise ValueError(f"task_names must be a sequence of names, got the string {task_names!r}.")
    names = list(task_names)
    if not names:
        raise ValueError("task_names must not be empty.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Duplicate task names in suite: {duplicates}.")
    for name in names:
        _validate_task_args(name, min_len, max_len, alphabet)
    _check_positive_int(num_train, "num_train")
    _check_positive_int(num_eval, "num_eval")

    shape = {"min_len": min_len, "max_len": max_len, "alphabet": alphabet}
    train_inputs = _sample_inputs(num_train, seed=2 * seed, **shape)
    eval_inputs = _sample_inputs(
        num_eval,
        seed=2 * seed + 1,
        exclude=frozenset(tuple(s) for s in train_inputs),
        **shape,
    )
    return {
        name: datasets.DatasetDict(
            {
                "train": _build_task_dataset(name, train_inputs, alphabet),
                "eval": _build_task_dataset(name, eval_inputs, alphabet),
            }
        )
        for name in names
    }


def build_tokenizer(
    *,
    alphabet: str = DEFAULT_ALPHABET,
    task_names: Sequence[str] = SYNTHETIC_TASKS,
    extra_tokens: Sequence[str] = (),
    model_max_length: int = 64,
) -> transformers.PreTrainedTokenizerFast:
    """Build a word-level tokenizer for the synthetic tasks, entirely in memory.

    The vocabulary is, in order: `<pad>`, `<unk>`, `<bos>`, `<eos>` (ids 0-3), the alphabet letters,
    the digits `0`-`9`, `":"`, `"="`, the task names and `extra_tokens` (duplicates dropped).
    Text is split on whitespace and every word maps to exactly one id, so one symbol is one token.

    Args:
        alphabet (`str`, *optional*, defaults to `"abcdefgh"`):
            Letters to include as tokens.
        task_names (`Sequence[str]`, *optional*, defaults to [`SYNTHETIC_TASKS`]):
            Task names to include as tokens (they appear in prompts).
        extra_tokens (`Sequence[str]`, *optional*, defaults to `()`):
            Further whitespace-free words to add to the vocabulary.
        model_max_length (`int`, *optional*, defaults to 64):
            Stored on the tokenizer; also the default length limit of the `tokenize_*` helpers.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: With `pad`/`unk`/`bos`/`eos` tokens set and
        `padding_side="right"`. It round-trips through `save_pretrained`/`from_pretrained`.

    Raises:
        `ValueError`: A token containing whitespace (it could never be produced by the splitter),
        or an invalid alphabet.

    Example:

    ```python
    >>> from clm_hf.tasks import build_tokenizer
    >>> tok = build_tokenizer()
    >>> ids = tok("reverse : a c b =", add_special_tokens=False)["input_ids"]
    >>> tok.decode(ids)
    'reverse : a c b ='
    >>> tok.unk_token_id in ids
    False

    ```
    """
    _validate_alphabet(alphabet)
    _check_positive_int(model_max_length, "model_max_length")
    words: list[str] = [
        *SPECIAL_TOKENS,
        *alphabet,
        *(str(d) for d in range(10)),
        ":",
        "=",
        *task_names,
        *extra_tokens,
    ]
    for word in words:
        if not isinstance(word, str) or not word or any(c.isspace() for c in word):
            raise ValueError(f"Tokens must be non-empty strings without whitespace, got {word!r}.")
    vocab: dict[str, int] = {}
    for word in words:
        vocab.setdefault(word, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No post-processor on purpose: the tokenize_* helpers append <eos> themselves, so encoding
    # stays identical whether or not a caller passes add_special_tokens.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="right",
        model_max_length=model_max_length,
    )


def _kv_heads(num_heads: int) -> int:
    # Largest proper divisor <= num_heads // 2: a real grouped-query setup (fewer KV heads than
    # query heads) that is always valid for the given head count.
    if num_heads < 2:
        return 1
    return max(d for d in range(1, num_heads // 2 + 1) if num_heads % d == 0)


def build_tiny_model(
    arch: str,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    **config_overrides: Any,
) -> transformers.PreTrainedModel:
    """Build a tiny randomly initialised model from a config, without any download.

    | `arch`    | model class                         |
    |-----------|-------------------------------------|
    | `"gpt2"`  | [`~transformers.GPT2LMHeadModel`]   |
    | `"llama"` | [`~transformers.LlamaForCausalLM`] (grouped-query attention, fewer KV heads) |
    | `"t5"`    | [`~transformers.T5ForConditionalGeneration`] (`decoder_start_token_id` = pad) |

    `vocab_size` is `len(tokenizer)`, special-token ids come from the tokenizer, feed-forward
    sizes are `2 * hidden_size` and position limits are 128 (T5 uses relative positions).
    Initialisation runs under `torch.manual_seed(seed)` inside a forked RNG, so the same seed gives
    the same weights and the caller's global RNG state is left untouched.

    Args:
        arch (`str`):
            One of `"gpt2"`, `"llama"`, `"t5"`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer the model will be used with; must define `pad_token_id` and `eos_token_id`.
        hidden_size (`int`, *optional*, defaults to 64):
            Model width; must be divisible by `num_heads`.
        num_layers (`int`, *optional*, defaults to 2):
            Number of layers (per stack for T5).
        num_heads (`int`, *optional*, defaults to 4):
            Number of attention heads.
        seed (`int`, *optional*, defaults to 0):
            Seed for weight initialisation.
        config_overrides (`Any`):
            Extra config fields, applied last (they win over the values above), e.g.
            `resid_pdrop=0.0` or `num_key_value_heads=4`.

    Returns:
        [`~transformers.PreTrainedModel`]: The model, in float32 on CPU.

    Raises:
        `ValueError`: Unknown `arch`, `hidden_size` not divisible by `num_heads`, non-positive
        sizes, or a tokenizer without pad/eos tokens.

    Example:

    ```python
    >>> import torch
    >>> from clm_hf.tasks import build_tiny_model, build_tokenizer
    >>> tok = build_tokenizer()
    >>> model = build_tiny_model("gpt2", tok)
    >>> batch = tok(["copy : a b = a b"], return_tensors="pt")
    >>> out = model(**batch, labels=batch["input_ids"])
    >>> bool(torch.isfinite(out.loss))
    True

    ```
    """
    if arch not in SUPPORTED_ARCHS:
        raise _unknown_name_error("arch", arch, SUPPORTED_ARCHS)
    _check_positive_int(hidden_size, "hidden_size")
    _check_positive_int(num_layers, "num_layers")
    _check_positive_int(num_heads, "num_heads")
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})."
        )
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise ValueError("The tokenizer must define both a pad token and an eos token.")
    # Fall back to eos so a tokenizer without <bos> still yields a valid config.
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    vocab_size = len(tokenizer)
    ffn = 2 * hidden_size

    config: transformers.PreTrainedConfig
    model_cls: type[transformers.PreTrainedModel]
    if arch == "gpt2":
        kwargs: dict[str, Any] = dict(
            vocab_size=vocab_size,
            n_positions=_MAX_POSITIONS,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=ffn,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        config_cls, model_cls = transformers.GPT2Config, transformers.GPT2LMHeadModel
    elif arch == "llama":
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=ffn,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=_kv_heads(num_heads),
            max_position_embeddings=_MAX_POSITIONS,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        config_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    else:
        kwargs = dict(
            vocab_size=vocab_size,
            d_model=hidden_size,
            d_kv=hidden_size // num_heads,
            d_ff=ffn,
            num_layers=num_layers,
            num_decoder_layers=num_layers,
            num_heads=num_heads,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            # T5 convention: the decoder starts from <pad>; generation and label shifting use it.
            decoder_start_token_id=pad_id,
        )
        config_cls, model_cls = transformers.T5Config, transformers.T5ForConditionalGeneration
    kwargs.update(config_overrides)
    config = config_cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model


def is_seq2seq_model(model: Any) -> bool:
    """Whether `model` is an encoder-decoder model.

    Looks through PEFT wrappers (`get_base_model()`) and `torch.nn.parallel`/accelerate-style
    wrappers (`.module`) and reads `config.is_encoder_decoder`. A bare config is accepted too.

    Args:
        model (`Any`):
            A [`~transformers.PreTrainedModel`], a PEFT model, a wrapped module or a config.

    Returns:
        `bool`: `True` for encoder-decoder models (e.g. T5), `False` otherwise (including objects
        without a config).

    Example:

    ```python
    >>> from clm_hf.tasks import build_tiny_model, build_tokenizer, is_seq2seq_model
    >>> tok = build_tokenizer()
    >>> is_seq2seq_model(build_tiny_model("t5", tok))
    True
    >>> is_seq2seq_model(build_tiny_model("gpt2", tok))
    False

    ```
    """
    if isinstance(model, transformers.PreTrainedConfig):
        return bool(model.is_encoder_decoder)
    base = model
    get_base = getattr(base, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    # DDP/accelerate wrappers expose the real model as .module and have no config of their own.
    while getattr(base, "config", None) is None and isinstance(
        getattr(base, "module", None), torch.nn.Module
    ):
        base = base.module
    config = getattr(base, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))
