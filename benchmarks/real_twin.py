"""The offline twin of a real-model recipe: the same recipe file, run on local stand-ins.

A recipe such as ``recipes/real/qwen2.5-0.5b-instruct-lora.yaml`` names a Hub model and Hub datasets.
Neither the CPU machines of the tests nor the lent GPU machine reach the Hub, so this writes:

- a model of the same architecture (Qwen2, built from its config, random weights) and a tokenizer
  with a chat template, saved with ``save_pretrained`` to a folder;
- for every dataset the recipe loads (tasks' train/eval splits and reference sets), a local JSONL
  file **with the Hub dataset's own column names and value types** (``HUB_LAYOUTS``), so the
  recipe's column mapping (``prompt_column: question`` ...) is exercised as written;

and returns the ``--section.key value`` overrides that point the recipe at them. Everything else in
the recipe (trainer, LoRA, strategies, reference set, training arguments) runs as written, apart
from the size overrides the caller adds.

    python benchmarks/real_twin.py recipes/real/qwen2.5-0.5b-instruct-lora.yaml /tmp/twin      # prints the overrides
    python benchmarks/real_twin.py RECIPE /tmp/twin --qwen-shape   # Qwen2.5-0.5B's shape (for the GPU run)
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clm_hf.layouts import COLUMN_OPTIONS  # noqa: E402
from clm_hf.recipe import load_recipe  # noqa: E402

# Words of the twin tokenizer (build_tokenizer splits on whitespace: one word, one token).
_WORDS = list("abcdefgh")
# ChatML as Qwen2.5-Instruct writes it, with spaces around each piece so that the word-level
# tokenizer sees one token per marker.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
# Qwen2.5-0.5B(-Instruct)'s shape, as benchmarks/gpu_check.py builds it, with its 151,936-row embedding
# (the twin tokenizer uses the first ids only); vocab 0 = the twin tokenizer's size.
QWEN_0_5B_SHAPE = {"layers": 24, "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864, "vocab": 151936}
TINY_SHAPE = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "intermediate": 64, "vocab": 0}


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _gsm8k(rng: random.Random, i: int) -> dict[str, Any]:
    question = _words(rng, rng.randint(3, 6))
    return {"question": question, "answer": " ".join(reversed(question.split()))}


def _tldr(rng: random.Random, i: int) -> dict[str, Any]:
    post = _words(rng, rng.randint(6, 10))
    return {"prompt": post, "completion": " " + " ".join(post.split()[:3])}


def _capybara(rng: random.Random, i: int) -> dict[str, Any]:
    turns = rng.randint(1, 2)
    messages = []
    for _ in range(turns):
        asked = _words(rng, rng.randint(2, 4))
        messages += [{"content": asked, "role": "user"}, {"content": " ".join(sorted(asked.split())), "role": "assistant"}]
    return {"source": "twin", "messages": messages, "num_turns": turns}


def _humaneval(rng: random.Random, i: int) -> dict[str, Any]:
    prompt = _words(rng, 4)
    return {"task_id": f"HumanEval/{i}", "prompt": prompt, "canonical_solution": " " + prompt.split()[0],
            "test": "check", "entry_point": "f"}


# Hub dataset id -> one row with that dataset's columns (names and types as on the Hub).
HUB_LAYOUTS: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "openai/gsm8k": _gsm8k,                      # question: str, answer: str
    "trl-lib/tldr": _tldr,                       # prompt: str, completion: str
    "trl-lib/Capybara": _capybara,               # source: str, messages: list[{content, role}], num_turns: int
    "openai/openai_humaneval": _humaneval,       # task_id, prompt, canonical_solution, test, entry_point: str
}


def build_model(folder: str | Path, shape: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A random Qwen2 model and a chat-template tokenizer, saved to ``folder`` (loadable by ``name_or_path``)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from clm_hf.tasks import build_tokenizer

    shape = {**TINY_SHAPE, **(shape or {})}
    tokenizer = build_tokenizer(extra_tokens=CHAT_TOKENS, model_max_length=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=max(shape["vocab"], len(tokenizer)), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=1_000_000.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    folder = Path(folder)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write_rows(path_id: str, file: Path, num_rows: int, seed: int) -> None:
    if path_id not in HUB_LAYOUTS:
        raise KeyError(f"No offline layout for the Hub dataset {path_id!r}: add its columns to HUB_LAYOUTS in "
                       f"{Path(__file__).name} (known: {sorted(HUB_LAYOUTS)}).")
    rng = random.Random(f"{path_id}-{seed}")
    with file.open("w") as handle:
        for i in range(num_rows):
            handle.write(json.dumps(HUB_LAYOUTS[path_id](rng, i)) + "\n")


def _point_at(prefix: str, entry: dict[str, Any], file: Path) -> list[str]:
    """Overrides that make one load_dataset() entry read ``file`` (its column options are kept)."""
    out = [f"--{prefix}.path", "json", f"--{prefix}.data_files", str(file), f"--{prefix}.split", "train"]
    for key in entry:
        if key not in ("path", "data_files", "split") and key not in COLUMN_OPTIONS:
            out += [f"--{prefix}.{key}", "null"]  # e.g. a Hub config name: the json builder has none
    return out


def twin_overrides(recipe_path: str | Path, folder: str | Path, *, num_train: int = 8, num_eval: int = 4,
                   shape: dict[str, int] | None = None) -> list[str]:
    """Write the twin model and data under ``folder``; return the overrides that point the recipe at them.

    Args:
        recipe_path (`str` or `Path`): A recipe with ``model.name_or_path`` and Hub ``tasks``/``reference`` entries.
        folder (`str` or `Path`): Where the model (``folder/model``) and the JSONL files go.
        num_train (`int`, *optional*): Rows per training file.
        num_eval (`int`, *optional*): Rows per eval and reference file.
        shape (`dict`, *optional*): Model shape (``layers``, ``hidden``, ``heads``, ``kv_heads``, ``intermediate``).

    Returns:
        `list[str]`: ``["--model.name_or_path", ..., "--tasks.0.train.path", "json", ...]``.

    >>> import tempfile
    >>> overrides = twin_overrides("recipes/real/qwen2.5-0.5b-instruct-lora.yaml", tempfile.mkdtemp())  # doctest: +SKIP
    """
    recipe = load_recipe(recipe_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    overrides = ["--model.name_or_path", str(build_model(folder / "model", shape))]
    for i, task in enumerate(recipe["tasks"]):
        for split, rows in (("train", num_train), ("eval", num_eval)):
            if task.get(split) is None:
                continue
            file = folder / f"task{i}_{split}.jsonl"
            _write_rows(task[split]["path"], file, rows, seed=1 if split == "eval" else 0)
            overrides += _point_at(f"tasks.{i}.{split}", task[split], file)
    for name, entry in (recipe.get("reference") or {}).items():
        file = folder / f"reference_{name}.jsonl"
        _write_rows(entry["path"], file, num_eval, seed=2)
        overrides += _point_at(f"reference.{name}", entry, file)
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("folder")
    parser.add_argument("--num-train", type=int, default=8)
    parser.add_argument("--num-eval", type=int, default=4)
    parser.add_argument("--qwen-shape", action="store_true", help="Qwen2.5-0.5B's layers and widths (not a tiny model).")
    args = parser.parse_args(argv)
    overrides = twin_overrides(args.recipe, args.folder, num_train=args.num_train, num_eval=args.num_eval,
                               shape=QWEN_0_5B_SHAPE if args.qwen_shape else None)
    print(shlex.join(overrides))


if __name__ == "__main__":
    main()
