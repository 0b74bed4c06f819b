"""Dataset layouts (clm_hf.layouts): text, prompt/completion (and prompt/answer), messages, conversational
prompt/completion, pre-tokenized input_ids, a user data_collator and streaming, on every registered strategy."""

from __future__ import annotations

import dataclasses

import datasets
import pytest
import torch
from tokenizers import processors
from transformers import DataCollatorForLanguageModeling

from clm_hf import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments
from clm_hf.data import ContinualDataCollator
from clm_hf.layouts import detect_layout, rename_columns, tokenize_rows
from clm_hf.strategies import STRATEGY_REGISTRY, build_strategy, get_strategy_class
from clm_hf.tasks import build_tiny_model, build_tokenizer, make_suite
from tests.conftest import FAST_OPTIONS, NO_DROPOUT, small_args

TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} = {% endfor %}" \
           "{% if add_generation_prompt %}assistant : {% endif %}"
# The same template with {% generation %} tags: the mask then comes from return_assistant_tokens_mask.
TAGGED_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['role'] }} : {% generation %}" \
                  "{{ m['content'] }} = {% endgeneration %}{% else %}" \
                  "{{ m['role'] }} : {{ m['content'] }} = {% endif %}{% endfor %}"
LAYOUTS = ["text", "prompt_completion", "prompt_answer", "messages", "conversational", "tokenized"]
STRATEGIES = sorted(n for n in STRATEGY_REGISTRY if n in FAST_OPTIONS)
STREAMING = sorted(n for n in STRATEGIES if get_strategy_class(n).supports_streaming is True or n == "lwf")


@pytest.fixture(scope="module")
def chat_tok():
    tok = build_tokenizer(extra_tokens=["user", "assistant"])
    tok.chat_template = TEMPLATE
    return tok


def _rows(layout: str, split: datasets.Dataset, tok) -> datasets.Dataset:
    prompts, answers = split["prompt"], split["answer"]
    user = [[{"role": "user", "content": p}] for p in prompts]
    bot = [[{"role": "assistant", "content": a}] for a in answers]
    if layout == "text":
        return datasets.Dataset.from_dict({"text": [f"{p} {a}" for p, a in zip(prompts, answers)]})
    if layout == "prompt_completion":
        return datasets.Dataset.from_dict({"prompt": prompts, "completion": answers})
    if layout == "prompt_answer":
        return split
    if layout == "messages":
        return datasets.Dataset.from_dict({"messages": [u + b for u, b in zip(user, bot)]})
    if layout == "conversational":
        return datasets.Dataset.from_dict({"prompt": user, "completion": bot})
    ids = [tok(f"{p} {a}")["input_ids"] + [tok.eos_token_id] for p, a in zip(prompts, answers)]
    return datasets.Dataset.from_dict({"input_ids": ids})


def _stream(layout: str, tok, num_train: int = 16) -> dict:
    suite = make_suite(["copy", "reverse"], num_train=num_train, num_eval=4, min_len=2, max_len=3)
    return {name: {"train": _rows(layout, d["train"], tok), "eval": _rows(layout, d["eval"], tok)}
            for name, d in suite.items()}


def _expected_supervised(layout: str, tok, row_ids: list[int], answer: str) -> list[str]:
    """The tokens that must carry the loss, per layout."""
    if layout in ("text", "tokenized"):
        return tok.convert_ids_to_tokens(row_ids)
    if layout in ("messages", "conversational"):
        return [*answer.split(), "="]  # the turn and its end marker; not the generation prompt "assistant :"
    return [*answer.split(), "<eos>"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_labels_are_exactly_the_supervised_tokens(layout, chat_tok):
    split = make_suite(["reverse"], num_train=6, num_eval=2)["reverse"]["train"]
    rows = tokenize_rows(_rows(layout, split, chat_tok), chat_tok, seq2seq=False)
    assert rows.column_names[:1] == ["input_ids"] and "labels" in rows.column_names
    for row, answer in zip(rows, split["answer"]):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels)
        kept = [i for i, label in enumerate(labels) if label != -100]
        assert all(labels[i] == ids[i] for i in kept)  # supervised positions keep their ids, all others are -100
        assert chat_tok.convert_ids_to_tokens([ids[i] for i in kept]) == _expected_supervised(layout, chat_tok, ids, answer)
        assert kept == list(range(kept[0], len(ids)))  # one answer span, at the end (single-turn rows)


def test_text_labels_match_data_collator_for_language_modeling(chat_tok):
    ds = datasets.Dataset.from_dict({"text": ["copy : a b = a b", "reverse : a b c = c b a", "sort : b a = a b"]})
    rows = tokenize_rows(ds, chat_tok, seq2seq=False)
    ours = ContinualDataCollator(pad_token_id=chat_tok.pad_token_id)([dict(r) for r in rows])
    reference = DataCollatorForLanguageModeling(chat_tok, mlm=False)(
        [chat_tok(t) for t in ds["text"]])
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["labels"], reference["labels"])


def test_messages_multi_turn_masks_every_assistant_turn_and_tagged_template_agrees(chat_tok):
    convo = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "b a"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "c c"}]
    ds = datasets.Dataset.from_dict({"messages": [convo]})
    row = tokenize_rows(ds, chat_tok, seq2seq=False)[0]
    tokens = chat_tok.convert_ids_to_tokens(row["input_ids"])
    kept = [t if label != -100 else None for t, label in zip(tokens, row["labels"])]
    assert kept == [None] * 7 + ["b", "a", "="] + [None] * 6 + ["c", "c", "="]
    tagged = build_tokenizer(extra_tokens=["user", "assistant"])
    tagged.chat_template = TAGGED_TEMPLATE
    assert tokenize_rows(ds, tagged, seq2seq=False)[0]["labels"] == row["labels"]


def test_bos_from_the_tokenizer_post_processor_is_kept():
    """A Llama-3-style tokenizer adds <bos> itself: every layout starts with it, and it is never a target."""
    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.bos_token_id)])
    assert tok("a b")["input_ids"][0] == tok.bos_token_id
    for layout, columns in [("text", {"text": ["copy : a b = a b"]}),
                            ("prompt_completion", {"prompt": ["copy : a b ="], "completion": ["a b"]})]:
        row = tokenize_rows(datasets.Dataset.from_dict(columns), tok, seq2seq=False)[0]
        assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"].count(tok.bos_token_id) == 1, layout
        if layout == "text":
            assert row["input_ids"] == tok("copy : a b = a b")["input_ids"]
        else:
            assert row["labels"][0] == -100
            assert tok.convert_ids_to_tokens([t for t in row["labels"] if t != -100]) == ["a", "b", "<eos>"]


def test_wrong_columns_get_one_error_naming_task_columns_and_layouts(tmp_path, make_model, tokenizer):
    trainer = ContinualCausalLMTrainer(model=make_model(), args=small_args(tmp_path), processing_class=tokenizer)
    bad = datasets.Dataset.from_dict({"question": ["copy : a ="], "reply": ["a"]})
    with pytest.raises(ValueError) as err:
        trainer.fit({"qa": {"train": bad}})
    message = str(err.value)
    for part in ("task 'qa'", "['question', 'reply']", "'text'", "'prompt' + 'completion'", "'messages'", "'input_ids'"):
        assert part in message
    with pytest.raises(ValueError, match="has 'prompt' but no 'completion'"):
        detect_layout(datasets.Dataset.from_dict({"prompt": ["x"]}))


def test_seq2seq_refuses_text_and_messages_and_trains_prompt_completion(tmp_path, tokenizer, chat_tok):
    for layout in ("text", "messages"):
        with pytest.raises(ValueError, match="for causal .decoder-only. LMs"):
            tokenize_rows(_stream(layout, chat_tok)["copy"]["train"], chat_tok, seq2seq=True)
    model = build_tiny_model("t5", tokenizer, **NO_DROPOUT["t5"])
    args = small_args(tmp_path, args_class=ContinualSeq2SeqTrainingArguments, max_steps=2)
    trainer = ContinualSeq2SeqTrainer(model=model, args=args, processing_class=tokenizer)
    results = trainer.fit(_stream("prompt_completion", tokenizer))
    assert results.num_trained == 2


def test_rename_columns_errors():
    ds = datasets.Dataset.from_dict({"question": ["q"], "prompt": ["p"], "answer": ["a"]})
    with pytest.raises(ValueError, match="already has a 'prompt' column"):
        rename_columns(ds, {"prompt_column": "question"})
    with pytest.raises(ValueError, match="has no column 'query'"):
        rename_columns(ds, {"prompt_column": "query"})
    with pytest.raises(ValueError, match="Unknown column option 'prompt_col'"):
        rename_columns(ds, {"prompt_col": "question"})


def _fast(name: str):
    cls = get_strategy_class(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    return build_strategy(name, **{k: v for k, v in FAST_OPTIONS[name].items() if k in fields})


def _fit(tmp_path, tok, strategies, stream, collator=None, **overrides):
    model = build_tiny_model("gpt2", tok, **NO_DROPOUT["gpt2"])
    trainer = ContinualCausalLMTrainer(model=model, args=small_args(tmp_path, **{"max_steps": 2, **overrides}),
                                       processing_class=tok, strategies=strategies, data_collator=collator)
    return trainer, trainer.fit(stream)


_PLAIN: dict[str, dict[str, torch.Tensor]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_trains_every_layout(name, layout, tmp_path, chat_tok):
    """Two tasks per run; the strategy acts: the weights end elsewhere than plain fine-tuning's on the same rows."""
    stream = _stream(layout, chat_tok)
    if layout not in _PLAIN:  # plain fine-tuning is deterministic: one reference run per layout
        plain, _ = _fit(tmp_path / "plain", chat_tok, [], stream)
        _PLAIN[layout] = {n: p.detach().clone() for n, p in plain.model.named_parameters()}
    trainer, results = _fit(tmp_path / name, chat_tok, [_fast(name)], stream)
    assert results.num_trained == 2 and all(v is not None for v in results.scores["loss"][-1])
    base = _PLAIN[layout]
    moved = any(n not in base or base[n].shape != p.shape or not torch.equal(base[n], p)
                for n, p in trainer.model.named_parameters())
    strategy = trainer.strategies[0]
    if name in ("gem", "agem"):
        # Two steps rarely conflict with the memory, so no projection need happen: the strategy acts by checking
        # every step of task 2 against the memory of task 1, whose rows are this layout's tokenized rows.
        assert strategy.steps == 2 and list(strategy.memories) == ["copy", "reverse"]
        assert "labels" in strategy.memories["copy"].column_names
    else:
        assert moved, f"{name} left the weights exactly where plain fine-tuning puts them ({layout})"


def test_user_data_collator_builds_labels_and_is_used(tmp_path, chat_tok):
    seen = []

    class Recording(DataCollatorForLanguageModeling):
        def __call__(self, features, return_tensors=None):
            seen.append(sorted(features[0]))
            return super().__call__(features, return_tensors)

    collator = Recording(chat_tok, mlm=False)
    for layout in ("text", "tokenized"):
        seen.clear()
        trainer, results = _fit(tmp_path / layout, chat_tok, [], _stream(layout, chat_tok), collator=collator)
        assert trainer.data_collator.collator is collator and results.num_trained == 2
        assert seen and all("labels" not in keys for keys in seen)  # the rows reach it without labels; it builds them
    from transformers import DataCollatorForSeq2Seq

    keeps = DataCollatorForSeq2Seq(chat_tok)  # pads the rows' masked labels with -100: completion-only loss kept
    trainer, results = _fit(tmp_path / "seq2seq-collator", chat_tok, [], _stream("prompt_completion", chat_tok),
                            collator=keeps)
    assert results.num_trained == 2 and trainer.data_collator.builds_labels is False
    with pytest.raises(ValueError, match="builds its own labels .* train dataset of task 'copy' has a loss mask"):
        _fit(tmp_path / "masked", chat_tok, [], _stream("prompt_completion", chat_tok), collator=collator)
    with pytest.raises(ValueError, match="returns no 'labels'"):
        _fit(tmp_path / "none", chat_tok, [], _stream("text", chat_tok),
             collator=lambda rows: {"input_ids": torch.tensor([r["input_ids"][:1] for r in rows])})


def _iterable(stream: dict) -> dict:
    return {n: {"train": d["train"].to_iterable_dataset(num_shards=1), "eval": d["eval"]} for n, d in stream.items()}


@pytest.mark.parametrize("name", STRATEGIES)
def test_streaming_task_trains_with_max_steps_or_fails_at_start(name, tmp_path, chat_tok):
    stream = _iterable(_stream("prompt_completion", chat_tok))
    strategy = _fast(name)
    if not strategy.supports_streaming:
        with pytest.raises(NotImplementedError, match=f"Strategy '{name}' cannot train the streamed"):
            _fit(tmp_path, chat_tok, [strategy], stream)
        assert not (tmp_path / "run" / "task-000").exists()  # refused before the first task trained
        return
    trainer, results = _fit(tmp_path, chat_tok, [strategy], stream)
    assert results.num_trained == 2


def test_streaming_needs_max_steps(tmp_path, chat_tok):
    trainer = ContinualCausalLMTrainer(model=build_tiny_model("gpt2", chat_tok), args=small_args(tmp_path),
                                       processing_class=chat_tok)
    with pytest.raises(ValueError, match="streaming IterableDataset.*set max_steps"):
        trainer.fit(_iterable(_stream("text", chat_tok)))


def test_replay_fills_its_reservoir_from_the_stream_in_one_pass(tmp_path, chat_tok):
    """The streamed rows go through Algorithm R as they are read: the buffer equals add() of the same rows, and a
    second pass over the stream (max_steps beyond one epoch) offers nothing again."""
    from clm_hf import Replay
    from clm_hf.buffer import ReservoirBuffer

    stream = _stream("prompt_completion", chat_tok, num_train=24)
    replay = Replay(buffer_size=8, replay_ratio=0.5)
    # 24 rows, batch 8, ratio 0.5: 36 rows per pass; 10 steps = 80 rows, so the stream is read 3 times.
    trainer, _ = _fit(tmp_path, chat_tok, [replay], _iterable(stream), max_steps=10)
    assert replay.buffer.num_seen == 48 and replay.buffer.task_counts().keys() == {"copy", "reverse"}
    reference = ReservoirBuffer(8, seed=0)
    for name, task in stream.items():
        rows = tokenize_rows(task["train"], chat_tok, seq2seq=False)
        reference.add(rows.cast(reference.features) if reference.features else rows, name)
    assert replay.buffer.as_dataset()["input_ids"] == reference.as_dataset()["input_ids"]
    assert replay.buffer.as_dataset()["task_id"] == reference.as_dataset()["task_id"]


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_recipe_maps_columns_and_trains(tmp_path):
    """`prompt_column: question` used to reach load_dataset ("JsonConfig ... unexpected keyword")."""
    from clm_hf.recipe import build_task_stream, run_recipe

    suite = make_suite(["copy", "reverse"], num_train=8, num_eval=4, min_len=2, max_len=3)
    tasks = []
    for name, d in suite.items():
        train = _jsonl(tmp_path / f"{name}.jsonl", [{"question": p, "response": a} for p, a in
                                                    zip(d["train"]["prompt"], d["train"]["answer"])])
        evaluation = _jsonl(tmp_path / f"{name}-eval.jsonl", [{"q": p, "response": a} for p, a in
                                                             zip(d["eval"]["prompt"], d["eval"]["answer"])])
        tasks.append({"name": name, "prompt_column": "question", "completion_column": "response",
                      "train": {"path": "json", "data_files": train},
                      "eval": {"path": "json", "data_files": evaluation, "prompt_column": "q"}})
    stream = build_task_stream(tasks)
    assert stream["copy"]["train"].column_names == ["prompt", "completion"]
    assert stream["copy"]["eval"].column_names == ["prompt", "completion"]
    recipe = {"model": {"arch": "gpt2"}, "tasks": tasks, "strategies": [{"name": "replay", "buffer_size": 4}],
              "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "report_to": "none",
                           "save_strategy": "no", "disable_tqdm": True}}
    results, trainer = run_recipe(recipe)
    assert results.num_trained == 2 and len(trainer.strategies[0].buffer) == 4
    bad = [{**tasks[0], "prompt_column": "query"}]
    with pytest.raises(ValueError, match="train dataset of task 'copy' has no column 'query'; its columns are"):
        build_task_stream(bad)


def test_recipe_streaming_task(tmp_path):
    from clm_hf.recipe import build_task_stream

    suite = make_suite(["copy"], num_train=8, num_eval=4)
    train = _jsonl(tmp_path / "copy.jsonl", [{"question": p, "completion": a} for p, a in
                                             zip(suite["copy"]["train"]["prompt"], suite["copy"]["train"]["answer"])])
    stream = build_task_stream([{"name": "copy", "prompt_column": "question",
                                 "train": {"path": "json", "data_files": train, "streaming": True}}])
    rows = stream["copy"]["train"]
    assert isinstance(rows, datasets.IterableDataset)
    assert detect_layout(rows) == "prompt_completion" and next(iter(rows))["prompt"].startswith("copy :")


def test_fit_joint_refuses_streams(tmp_path, chat_tok):
    trainer = ContinualCausalLMTrainer(model=build_tiny_model("gpt2", chat_tok), args=small_args(tmp_path, max_steps=2),
                                       processing_class=chat_tok)
    with pytest.raises(ValueError, match=r"fit_joint needs .* task\(s\) \['copy', 'reverse'\] are streams"):
        trainer.fit_joint(_iterable(_stream("text", chat_tok)))


def test_messages_with_a_byte_level_bpe_tokenizer():
    """Byte-level BPE tokens carry the space before a word ("Ġb"); that space is outside the assistant span,
    yet the token is the answer's and must be supervised."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["user : a b c = assistant : c b a = "] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = TEMPLATE
    ds = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "a b c"},
                                                   {"role": "assistant", "content": "c b a"}]]})
    row = tokenize_rows(ds, tok, seq2seq=False)[0]
    supervised = [t for t in row["labels"] if t != -100]
    assert tok.decode(supervised).strip() == "c b a ="
    assert tok.decode(row["input_ids"][: len(row["input_ids"]) - len(supervised)]).rstrip() == "user : a b c = assistant :"


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_trains_with_a_user_collator(name, tmp_path, chat_tok):
    """`text` rows without labels, DataCollatorForLanguageModeling builds them: every strategy trains and scores."""
    collator = DataCollatorForLanguageModeling(chat_tok, mlm=False)
    trainer, results = _fit(tmp_path, chat_tok, [_fast(name)], _stream("text", chat_tok), collator=collator)
    assert trainer.data_collator.collator is collator and results.num_trained == 2
    assert all(v is not None for v in results.scores["loss"][-1])


# --- review je, findings 6, 8 and 10: chat roles and contents, unknown words, the prompt/completion join -------
def _bpe_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained in memory (GPT-2 style: tokens carry the space before a word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.parametrize("turn, expected", [
    ({"role": "robot", "content": "a b"}, r"Row 0: column 'messages', turn 1 has role 'robot', which is not one of "
                                          r"\['system', 'user', 'assistant', 'tool', 'developer'\]\.$"),
    ({"role": "Assistant", "content": "a b"}, r"turn 1 has role 'Assistant'.*Roles are lower-case: write 'assistant'"),
    ({"role": "assistant", "content": None}, r"Row 0: column 'messages', turn 1 \(assistant\) has no content.*None"),
    ({"role": "assistant", "content": ""}, r"Row 0: column 'messages', turn 1 \(assistant\) has no content.*''"),
])
def test_messages_roles_and_assistant_contents_are_checked(turn, expected, chat_tok):
    convo = [{"role": "user", "content": "copy : a b"}, turn, {"role": "assistant", "content": "a b"}]
    with pytest.raises(ValueError, match=expected):
        tokenize_rows(datasets.Dataset.from_list([{"messages": convo}]), chat_tok, seq2seq=False)


def test_messages_every_accepted_role_tokenizes(chat_tok):
    tok = build_tokenizer(extra_tokens=["user", "assistant", "system", "tool", "developer"])
    tok.chat_template = TEMPLATE
    convo = [{"role": r, "content": "a"} for r in ("system", "developer", "user", "tool")]
    row = tokenize_rows(datasets.Dataset.from_list([{"messages": convo + [{"role": "assistant", "content": "b"}]}]),
                        tok, seq2seq=False)[0]
    assert tok.convert_ids_to_tokens([t for t in row["labels"] if t != -100]) == ["b", "="]


def test_text_rows_with_unknown_words_warn_once_per_split_with_a_count_and_the_first_row(caplog):
    tok = build_tokenizer()
    rows = datasets.Dataset.from_dict({"text": ["copy : a b = a b", "copy : a ? = a ?", "copy : { c = { c"]})
    with caplog.at_level("WARNING", logger="clm_hf"):
        out = tokenize_rows(rows, tok, seq2seq=False, what="train dataset of task 'lm'")
        tokenize_rows(rows, tok, seq2seq=False, what="eval dataset of task 'lm'")
    assert out.num_rows == 3 and tok.unk_token_id in out[1]["labels"]  # learned as <unk>, not dropped
    warned = [r.getMessage() for r in caplog.records if "unknown to the tokenizer" in r.getMessage()]
    assert len(warned) == 2  # one per split, not one per row
    assert "2 of 3 rows of the train dataset of task 'lm' have words unknown to the tokenizer in their text " \
           "(first: row 1)" in warned[0] and "eval dataset of task 'lm'" in warned[1]
    assert "answers" not in warned[0] and "build_tokenizer's word vocabulary" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="clm_hf"):
        tokenize_rows(rows.select([0]), tok, seq2seq=False)
    assert not [r for r in caplog.records if "unknown to the tokenizer" in r.getMessage()]


def test_unknown_words_are_an_error_in_answers_and_a_warning_in_prompts(caplog):
    tok = build_tokenizer()
    rows = datasets.Dataset.from_dict({"prompt": ["copy : a ? =", "copy : b =", "copy : { c ="],
                                       "completion": ["a", "b", "c"]})
    with caplog.at_level("WARNING", logger="clm_hf"):
        for seq2seq in (False, True):
            out = tokenize_rows(rows, tok, seq2seq=seq2seq, what="train dataset of task 'qa'")
            assert out.num_rows == 3 and tok.unk_token_id in out[0]["input_ids"]  # trained as <unk>, not dropped
    warned = [r.getMessage() for r in caplog.records if "unknown to the tokenizer" in r.getMessage()]
    assert len(warned) == 2  # one per tokenized split, not one per row
    assert "2 of 3 rows of the train dataset of task 'qa'" in warned[0] and "(first: row 0)" in warned[0]
    assert "build_tokenizer's word vocabulary" in warned[0]  # the advice fits this tokenizer
    caplog.clear()
    with caplog.at_level("WARNING", logger="clm_hf"):
        streamed = tokenize_rows(rows.to_iterable_dataset(), tok, seq2seq=False, what="train dataset of task 'qa'")
        assert len(list(streamed)) == 3
    streamed_warnings = [r.getMessage() for r in caplog.records if "unknown to the tokenizer" in r.getMessage()]
    assert len(streamed_warnings) == 1  # once per stream, at its first such row
    assert streamed_warnings[0].startswith("clm-hf: row 0 of the streamed train dataset of task 'qa' has words unknown")
    # In the answer it stays an error, for causal and seq2seq rows.
    bad = datasets.Dataset.from_dict({"prompt": ["copy : a =", "copy : a ?"], "completion": ["a", "a ?"]})
    for seq2seq in (False, True):
        with pytest.raises(ValueError, match=r"Row 1: column 'completion' text 'a \?' contains words unknown.*"
                                             r"learn to write.*build_tokenizer's"):
            tokenize_rows(bad, tok, seq2seq=seq2seq)
    # In a chat: unknown in the context warns, in an assistant turn it is an error.
    chat = build_tokenizer(extra_tokens=["user", "assistant"])
    chat.chat_template = TEMPLATE
    caplog.clear()
    convo = [{"role": "user", "content": "copy : a ?"}, {"role": "assistant", "content": "a"}]
    with caplog.at_level("WARNING", logger="clm_hf"):
        tokenize_rows(datasets.Dataset.from_list([{"messages": convo}]), chat, seq2seq=False)
    assert any("1 of 1 rows of the dataset have words unknown to the tokenizer in their chat context" in r.getMessage()
               for r in caplog.records)
    convo[1]["content"] = "a ?"
    with pytest.raises(ValueError, match=r"Row 0: an assistant turn of column 'messages' contains words unknown"):
        tokenize_rows(datasets.Dataset.from_list([{"messages": convo}]), chat, seq2seq=False)


def test_unknown_word_advice_names_build_tokenizer_only_for_its_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, "copy": 3, ":": 4, "a": 5, "=": 6}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    with pytest.raises(ValueError) as err:
        tokenize_rows(datasets.Dataset.from_dict({"prompt": ["copy : a ="], "completion": ["a b"]}), other,
                      seq2seq=False)
    assert "unknown to the tokenizer" in str(err.value) and "build_tokenizer" not in str(err.value)
    assert "use a tokenizer whose vocabulary covers them" in str(err.value)


def test_prompt_completion_is_joined_as_written_and_prompt_answer_keeps_its_space():
    tok = _bpe_tokenizer(["Q: 2+2=4", "Q: 3+1=4", "<|assistant|>Hello", "Q: 2+2= 4"])
    rows = {"prompt": ["Q: 2+2=", "<|assistant|>", "Q: 2+2= "], "completion": ["4", "Hello", "4"]}
    out = tokenize_rows(datasets.Dataset.from_dict(rows), tok, seq2seq=False)
    # TRL's prompt/completion: prompt + completion exactly as written.
    assert [tok.decode(r["input_ids"]) for r in out] == ["Q: 2+2=4<eos>", "<|assistant|>Hello<eos>", "Q: 2+2= 4<eos>"]
    assert [tok.decode([t for t in r["labels"] if t != -100]) for r in out] == ["4<eos>", "Hello<eos>", "4<eos>"]
    # The project's prompt/answer rows (the synthetic suite's layout) keep the separating space.
    answer = tokenize_rows(datasets.Dataset.from_dict({"prompt": rows["prompt"][:1], "answer": ["4"]}), tok,
                           seq2seq=False)
    assert tok.decode(answer[0]["input_ids"]) == "Q: 2+2= 4<eos>"


def test_a_prompt_completion_join_that_glues_most_rows_warns_once_per_split(caplog):
    """prompt/completion rows are joined as written (TRL's convention) where prompt/answer rows get a space: a
    split whose rows mostly glue two words ("...=" + "b") says so once, naming the columns."""
    tok = build_tokenizer()
    glued = datasets.Dataset.from_dict({"prompt": ["reverse : a b =", "copy : a =", "reverse : c d ="],
                                        "completion": ["b a", "a", " d c"]})
    with caplog.at_level("WARNING", logger="clm_hf"):
        rows = tokenize_rows(glued, tok, seq2seq=False, what="train dataset of task 'r'")
    warned = [r.getMessage() for r in caplog.records if "no space between them" in r.getMessage()]
    assert warned == ["clm-hf: 2 of the 3 rows of the train dataset of task 'r' join 'prompt' and 'completion' with "
                      "no space between them (row 0: 'reverse : a b =' + 'b a'). prompt/completion rows are joined as "
                      "written (TRL's convention; prompt/answer rows get a space): end the prompt or start the "
                      "completion with a space if the text needs one."]
    assert len(rows) == 3  # a warning, not an error: every row is tokenized
    caplog.clear()
    spaced = glued.map(lambda r: {"completion": " " + r["completion"].lstrip()})
    as_answer = glued.rename_column("completion", "answer")  # prompt/answer rows get the space: nothing to say
    minority = datasets.Dataset.from_dict({"prompt": ["a =", "b =", "c ="], "completion": ["a", " b", " c"]})
    with caplog.at_level("WARNING", logger="clm_hf"):
        for data in (spaced, as_answer, minority):
            tokenize_rows(data, tok, seq2seq=False, what="train dataset of task 'r'")
    assert "no space between them" not in caplog.text
