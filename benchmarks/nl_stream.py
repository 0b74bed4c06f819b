"""A small natural-language stream: five topic tasks (short English descriptions -> a topic label of
one to three words), a 4-layer tiny GPT-2, scored by label likelihood.

Each task has four labels; a row's prompt is a gloss built from two of the label's clue phrases
(``"describe : something that has feathers and can fly high ="``) and its answer the label
(``"a bird"``). Evaluation is task-aware: a held-out row counts as right when its own label has the
highest log-likelihood ``log p(label | prompt)`` among the four labels of its task. The held-out
rows use clue pairs never seen in training. Plain fine-tuning learns each task and then forgets it,
which is what EWC's and LwF's settings are swept against here.

Run (1 thread, 20-150 s a run depending on the machine's load)::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/nl_stream.py --seeds 0,1,2

writes ``benchmarks/results/nl_stream.json`` (every run's accuracy matrix) and prints the sweep
table (mean and range over seeds). ``--runs`` picks other settings, e.g.
``--runs "plain;ewc;ewc:ewc_lambda=100;lwf:alpha=3"`` (``name`` alone = the strategy's defaults);
the default ``--runs`` is the sweep of docs/strategies.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import NO_DROPOUT, machine, quiet, save_json  # noqa: E402

import torch  # noqa: E402

# task -> label -> clue phrases (each gloss joins two clues of its label)
TOPICS: dict[str, dict[str, list[str]]] = {
    "animals": {
        "a bird": ["has feathers", "can fly high", "has a sharp beak", "builds a nest in a tree", "sings in the morning"],
        "a fish": ["lives in the water", "has fins and scales", "breathes with gills", "swims in a river", "is caught with a net"],
        "an insect": ["has six legs", "is very small", "can sting you", "lives in a large colony", "has thin wings and antennae"],
        "a farm animal": ["gives us milk", "eats grass in a field", "lives in a barn", "is kept by a farmer", "gives us wool"],
    },
    "food": {
        "a fruit": ["grows on a tree", "is sweet and juicy", "has seeds inside", "is red or yellow when ripe", "is eaten raw"],
        "a vegetable": ["grows in the ground", "is green and leafy", "is cooked in a soup", "is a root", "is good for your health"],
        "a sweet dessert": ["is made with sugar", "is eaten after dinner", "is baked in an oven", "has cream on top", "is served cold"],
        "a hot drink": ["is made with boiling water", "is served in a cup", "is drunk in the morning", "keeps you awake", "is brewed from leaves"],
    },
    "weather": {
        "heavy rain": ["falls from dark clouds", "makes the streets wet", "fills the rivers", "needs an umbrella", "drops on the roof"],
        "cold snow": ["is white and soft", "falls in winter", "covers the mountains", "melts in the spring", "is used to make a snowman"],
        "strong wind": ["moves the trees", "blows hats away", "turns the windmills", "pushes the sails of a boat", "howls at night"],
        "hot sun": ["shines in a clear sky", "makes the day warm", "burns your skin", "dries the clothes", "is bright in summer"],
    },
    "jobs": {
        "a doctor": ["works in a hospital", "helps sick people", "gives you medicine", "listens to your heart", "studies the human body"],
        "a teacher": ["works in a school", "helps children learn", "gives homework", "writes on the board", "marks the tests"],
        "a farmer": ["works in the fields", "grows wheat and corn", "drives a tractor", "feeds the animals", "gets up early"],
        "a cook": ["works in a kitchen", "makes the meals", "uses a sharp knife", "follows a recipe", "tastes the sauce"],
    },
    "tools": {
        "a kitchen tool": ["cuts the bread", "stirs the soup", "is kept in a drawer", "is used to cook", "is washed after dinner"],
        "a garden tool": ["digs the soil", "cuts the grass", "is kept in a shed", "is used to plant flowers", "rakes the leaves"],
        "a music instrument": ["makes a sound", "is played with the fingers", "has strings or keys", "is used in a band", "plays a song"],
        "a writing tool": ["leaves ink on paper", "is held in the hand", "writes a letter", "is used to draw", "is sharpened with a blade"],
    },
}
TEMPLATES = ("something that {a} and {b}", "it {a} and it {b}", "a word for a thing that {a} and {b}")
PROMPT = "describe : {gloss} ="
HELD_OUT_PAIRS = 2  # of the ten clue pairs of each label, never trained on
# The stream's training recipe: each task learned to ~0.9-1.0 task-aware accuracy.
MODEL = {"hidden_size": 64, "num_layers": 4, "num_heads": 4}
RECIPE = {"num_train_epochs": 10, "learning_rate": 1e-3, "batch_size": 16}
DEFAULT_RUNS = ("plain;ewc:ewc_lambda=100;ewc:ewc_lambda=1000;ewc:ewc_lambda=3000;ewc:ewc_lambda=10000;"
                "lwf:alpha=0.7;lwf:alpha=3;lwf;lwf:alpha=10;lwf:alpha=10,temperature=1")


def make_stream(data_seed: int = 0) -> dict[str, dict[str, list[dict[str, str]]]]:
    """``{task: {"train": rows, "eval": rows}}`` with ``{"prompt", "answer", "label_index"}`` rows.

    The held-out clue pairs are chosen by ``data_seed`` (fixed across the runs of a sweep).
    """
    rng = random.Random(data_seed)
    stream = {}
    for task, labels in TOPICS.items():
        splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
        for index, (label, clues) in enumerate(labels.items()):
            pairs = list(itertools.combinations(clues, 2))
            rng.shuffle(pairs)
            for split, chosen in (("eval", pairs[:HELD_OUT_PAIRS]), ("train", pairs[HELD_OUT_PAIRS:])):
                for a, b in chosen:
                    for x, y in ((a, b), (b, a)):
                        for template in TEMPLATES:
                            gloss = template.format(a=x, b=y)
                            splits[split].append({"prompt": PROMPT.format(gloss=gloss), "answer": label, "label_index": index})
        stream[task] = splits
    return stream


def build_tokenizer():
    """The library's in-memory word-level tokenizer, with every word of the stream."""
    from clm_hf.tasks import build_tokenizer as build

    words = {w for labels in TOPICS.values() for label, clues in labels.items() for text in (label, *clues) for w in text.split()}
    words |= {w for text in (*TEMPLATES, PROMPT) for w in text.split() if "{" not in w}
    return build(extra_tokens=sorted(words), model_max_length=128)


def build_model(tokenizer, seed: int):
    from clm_hf.tasks import build_tiny_model

    return build_tiny_model("gpt2", tokenizer, seed=seed, **MODEL, **NO_DROPOUT)


@torch.no_grad()
def label_accuracy(model, tokenizer, rows: list[dict[str, Any]], labels: list[str], batch_size: int = 96) -> float:
    """Share of ``rows`` whose own label has the highest ``log p(label <eos> | prompt)`` among ``labels``."""
    model.eval()
    eos = tokenizer.eos_token_id
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] + [eos] for label in labels]
    sequences, answer_starts = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        for ids in label_ids:
            sequences.append(prompt + ids)
            answer_starts.append(len(prompt))
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1], -1)
        token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        positions = torch.arange(width - 1, device=device)[None, :]
        starts = torch.tensor(answer_starts[start : start + batch_size], device=device)[:, None]
        lengths = mask.sum(-1, keepdim=True)
        scored = (positions >= starts - 1) & (positions < lengths - 1)  # position t predicts token t + 1
        scores.append((token_logp * scored).sum(-1))
    scores = torch.cat(scores).view(len(rows), len(labels))
    truth = torch.tensor([row["label_index"] for row in rows], device=scores.device)
    return float((scores.argmax(-1) == truth).float().mean())


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ewc:ewc_lambda=100,mode=online"`` -> ``("ewc", {"ewc_lambda": 100.0, "mode": "online"})``."""
    name, _, options = spec.partition(":")
    parsed: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if value.strip().lower() in ("true", "false"):
            parsed[key.strip()] = value.strip().lower() == "true"
            continue
        for cast in (int, float, str):
            try:
                parsed[key.strip()] = cast(value)
                break
            except ValueError:
                continue
    return name.strip(), parsed


def run(spec: str, seed: int, *, stream=None, tokenizer=None, recipe: dict[str, Any] | None = None,
        output_dir: str | None = None) -> dict[str, Any]:
    """Train the five tasks in order with the strategy of ``spec``; return the accuracy matrix and
    ACC / BWT / mean accuracy right after training (``learned``)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    from _common import training_args
    from clm_hf import ContinualCausalLMTrainer
    from clm_hf.strategies import build_strategy
    from clm_hf.tasks import tokenize_for_causal_lm

    name, options = parse_run(spec)
    recipe = {**RECIPE, **(recipe or {})}
    tokenizer = tokenizer or build_tokenizer()
    stream = stream or make_stream()

    model = build_model(tokenizer, seed)
    strategies = [] if name == "plain" else [build_strategy(name, **options)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        args = training_args(output_dir or scratch, batch_size=recipe["batch_size"], seed=seed,
                             num_train_epochs=recipe["num_train_epochs"], learning_rate=recipe["learning_rate"])
        trainer = ContinualCausalLMTrainer(model=model, args=args, processing_class=tokenizer, strategies=strategies)
        trainer.remove_callback(PrinterCallback)  # the end-of-train() summary line
        matrix = []
        tasks = list(TOPICS)
        for task in tasks:
            rows = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "answer")} for r in stream[task]["train"]])
            trainer.train_task(tokenize_for_causal_lm(rows, tokenizer), task_id=task)
            matrix.append([label_accuracy(trainer.model, tokenizer, stream[t]["eval"], list(TOPICS[t])) for t in tasks])
    last = len(matrix) - 1
    return {
        "run": spec, "seed": seed, "matrix": matrix,
        "acc": sum(matrix[last]) / len(matrix[last]),
        "bwt": sum(matrix[last][j] - matrix[j][j] for j in range(last)) / last,
        "learned": sum(matrix[j][j] for j in range(len(matrix))) / len(matrix),
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one line per setting, mean [min, max] over seeds of BWT, ACC and accuracy when learned."""
    lines = ["| run | BWT | ACC | learned (diagonal) | seeds |", "| --- | --- | --- | --- | --- |"]
    order = list(dict.fromkeys(r["run"] for r in results))
    for spec in order:
        group = [r for r in results if r["run"] == spec]

        def cell(key: str) -> str:
            values = [r[key] for r in group]
            return f"{sum(values) / len(values):+.3f} [{min(values):+.2f}, {max(values):+.2f}]"

        lines.append(f"| `{spec}` | {cell('bwt')} | {cell('acc')} | {cell('learned')} | {len(group)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="';'-separated 'name[:key=value,...]' settings.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated model/training seeds.")
    parser.add_argument("--epochs", type=float, default=RECIPE["num_train_epochs"], help="Epochs per task.")
    parser.add_argument("--learning-rate", type=float, default=RECIPE["learning_rate"])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "nl_stream.json"))
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(1)
    recipe = {**RECIPE, "num_train_epochs": args.epochs, "learning_rate": args.learning_rate}
    tokenizer, stream = build_tokenizer(), make_stream()
    results = []
    for spec in filter(None, (s.strip() for s in args.runs.split(";"))):
        for seed in (int(s) for s in args.seeds.split(",")):
            result = run(spec, seed, stream=stream, tokenizer=tokenizer, recipe=recipe)
            results.append(result)
            print(f"{spec:40s} seed {seed}: BWT {result['bwt']:+.3f} ACC {result['acc']:.3f} "
                  f"learned {result['learned']:.3f} ({result['seconds']} s)", flush=True)
            save_json({"machine": machine(), "recipe": recipe, "model": MODEL, "command": " ".join(sys.argv),
                       "results": results}, args.output)
    print(table(results))


if __name__ == "__main__":
    main()
