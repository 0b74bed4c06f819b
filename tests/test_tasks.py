"""Tests for clm_hf.tasks: synthetic suite, offline tokenizer/model builders, tokenization."""

from __future__ import annotations

import itertools

import datasets
import pytest
import torch
import transformers

from clm_hf import tasks
from clm_hf.tasks import (
    SYNTHETIC_TASKS,
    build_tiny_model,
    build_tokenizer,
    is_seq2seq_model,
    make_suite,
    make_task,
    tokenize_for_causal_lm,
    tokenize_for_seq2seq,
    tokenize_task,
)

ALPHABET = "abcdefgh"
CAUSAL_ARCHS = ("gpt2", "llama")
ALL_ARCHS = (*CAUSAL_ARCHS, "t5")


# Independent reference implementations: the tests must not reuse the module's own mapping code.
def _reference_answer(task: str, seq: list[str], alphabet: str = ALPHABET) -> list[str]:
    if task == "copy":
        return list(seq)
    if task == "reverse":
        return list(reversed(seq))
    if task == "sort":
        return sorted(seq, key=lambda c: alphabet.find(c))
    if task == "shift":
        return [alphabet[(alphabet.find(c) + 1) % len(alphabet)] for c in seq]
    if task == "rotate":
        return seq[1:] + [seq[0]]
    if task == "count":
        return [d for d in str(len(seq))]
    raise AssertionError(task)


def _parse_prompt(prompt: str) -> tuple[str, list[str]]:
    words = prompt.split()
    assert words[1] == ":" and words[-1] == "=", prompt
    return words[0], words[2:-1]


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def small_ds() -> datasets.Dataset:
    return make_task("reverse", 8, seed=3)


# --------------------------------------------------------------------------- task definitions


def test_task_list():
    assert len(SYNTHETIC_TASKS) >= 6
    assert len(set(SYNTHETIC_TASKS)) == len(SYNTHETIC_TASKS)
    assert {"copy", "reverse", "sort", "shift", "rotate", "count"} <= set(SYNTHETIC_TASKS)


@pytest.mark.parametrize(
    ("task", "seq", "expected"),
    [
        ("copy", "a c b", "a c b"),
        ("reverse", "a c b", "b c a"),
        ("sort", "d a c b", "a b c d"),
        ("sort", "h a h", "a h h"),
        ("shift", "a c b", "b d c"),
        ("shift", "h", "a"),  # wraps around the alphabet
        ("rotate", "a c b d", "c b d a"),
        ("count", "a c b", "3"),
        ("count", "a b c d e f g h a b c d", "1 2"),  # multi-digit counts: one token per digit
    ],
)
def test_task_mapping_hand_examples(task, seq, expected):
    assert " ".join(tasks._TASK_FNS[task](seq.split(), ALPHABET)) == expected


def test_sort_follows_alphabet_order_not_codepoints():
    assert tasks._TASK_FNS["sort"](["a", "z", "m"], "zma") == ["z", "m", "a"]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_every_row_matches_reference(task):
    ds = make_task(task, 40, seed=11, min_len=2, max_len=5)
    assert ds.column_names == ["prompt", "answer"]
    assert ds.num_rows == 40
    for row in ds:
        name, seq = _parse_prompt(row["prompt"])
        assert name == task
        assert 2 <= len(seq) <= 5
        assert set(seq) <= set(ALPHABET)
        assert row["answer"].split() == _reference_answer(task, seq)
        assert row["answer"] == " ".join(row["answer"].split())  # single-space separated


def test_shift_wraps_through_public_api():
    ds = make_task("shift", 50, seed=0, min_len=1, max_len=1)
    pairs = {(_parse_prompt(r["prompt"])[1][0], r["answer"]) for r in ds}
    assert ("h", "a") in pairs
    assert all(ALPHABET[(ALPHABET.index(x) + 1) % 8] == y for x, y in pairs)


def test_custom_alphabet_used():
    ds = make_task("shift", 20, seed=0, alphabet="xyz")
    for row in ds:
        _, seq = _parse_prompt(row["prompt"])
        assert set(seq) <= set("xyz")
        assert row["answer"].split() == _reference_answer("shift", seq, "xyz")


def test_determinism_by_seed():
    a = make_task("sort", 30, seed=5)
    b = make_task("sort", 30, seed=5)
    c = make_task("sort", 30, seed=6)
    assert a.to_dict() == b.to_dict()
    assert a["prompt"] != c["prompt"]


def test_all_tasks_share_inputs_for_same_seed():
    inputs = {
        task: [_parse_prompt(p)[1] for p in make_task(task, 30, seed=9)["prompt"]] for task in SYNTHETIC_TASKS
    }
    first = inputs[SYNTHETIC_TASKS[0]]
    assert all(seqs == first for seqs in inputs.values())
    # Not a degenerate stream: lengths and sequences vary.
    assert len({len(s) for s in first}) > 1
    assert len({tuple(s) for s in first}) > 20


def test_tasks_conflict_on_same_input():
    # One input with distinct, unsorted letters: all six tasks must disagree pairwise.
    seq = ["c", "a", "d", "b"]
    answers = {t: tuple(tasks._TASK_FNS[t](seq, ALPHABET)) for t in SYNTHETIC_TASKS}
    assert len(set(answers.values())) == len(SYNTHETIC_TASKS)

    # Over the shared distribution, every pair of tasks disagrees on most inputs.
    data = {t: make_task(t, 100, seed=1)["answer"] for t in SYNTHETIC_TASKS}
    for t1, t2 in itertools.combinations(SYNTHETIC_TASKS, 2):
        agree = sum(x == y for x, y in zip(data[t1], data[t2]))
        assert agree < 30, (t1, t2, agree)


def test_unknown_task_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'reverse'") as info:
        make_task("revrse", 4)
    for name in SYNTHETIC_TASKS:
        assert name in str(info.value)


@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_num_examples_must_be_positive_int(n):
    with pytest.raises(ValueError, match="num_examples"):
        make_task("copy", n)


@pytest.mark.parametrize(
    "kwargs", [dict(min_len=4, max_len=3), dict(min_len=0), dict(alphabet="a"), dict(alphabet="aab"), dict(alphabet="a b")]
)
def test_bad_shape_arguments(kwargs):
    with pytest.raises(ValueError):
        make_task("copy", 4, **kwargs)


# --------------------------------------------------------------------------- suite


def test_suite_structure_and_defaults():
    suite = make_suite(num_train=16, num_eval=8)
    assert list(suite) == list(SYNTHETIC_TASKS[:4])
    for name, dd in suite.items():
        assert isinstance(dd, datasets.DatasetDict)
        assert set(dd) == {"train", "eval"}
        assert dd["train"].num_rows == 16 and dd["eval"].num_rows == 8
        assert all(p.startswith(f"{name} : ") for p in dd["train"]["prompt"])


def test_suite_order_shared_inputs_and_heldout_eval():
    names = ["rotate", "copy", "count"]
    suite = make_suite(names, num_train=200, num_eval=50, seed=2)
    assert list(suite) == names
    train_inputs = {n: [tuple(_parse_prompt(p)[1]) for p in suite[n]["train"]["prompt"]] for n in names}
    eval_inputs = {n: [tuple(_parse_prompt(p)[1]) for p in suite[n]["eval"]["prompt"]] for n in names}
    assert train_inputs["rotate"] == train_inputs["copy"] == train_inputs["count"]
    assert eval_inputs["rotate"] == eval_inputs["copy"] == eval_inputs["count"]
    assert not set(train_inputs["copy"]) & set(eval_inputs["copy"])
    for n in names:
        for row in suite[n]["eval"]:
            assert row["answer"].split() == _reference_answer(n, _parse_prompt(row["prompt"])[1])


def test_suite_deterministic_and_seed_sensitive():
    a = make_suite(["copy"], num_train=10, num_eval=5, seed=4)
    b = make_suite(["copy"], num_train=10, num_eval=5, seed=4)
    c = make_suite(["copy"], num_train=10, num_eval=5, seed=5)
    assert a["copy"]["train"].to_dict() == b["copy"]["train"].to_dict()
    assert a["copy"]["eval"].to_dict() == b["copy"]["eval"].to_dict()
    assert a["copy"]["train"]["prompt"] != c["copy"]["train"]["prompt"]


def test_suite_eval_is_held_out_even_when_collisions_are_likely():
    # 2000 draws cover most of the 512 length-3 sequences, so an independent eval draw would
    # almost surely repeat some training inputs; make_suite must redraw those.
    suite = make_suite(["copy"], num_train=2000, num_eval=500, seed=0)
    train = set(suite["copy"]["train"]["prompt"])
    assert not train & set(suite["copy"]["eval"]["prompt"])
    assert suite["copy"]["eval"].num_rows == 500


def test_heldout_sampling_fails_loudly_when_space_exhausted():
    with pytest.raises(ValueError, match="held-out"):
        tasks._sample_inputs(2, seed=0, min_len=1, max_len=1, alphabet="ab", exclude=frozenset({("a",)}))


@pytest.mark.parametrize("names", [["copy", "copy"], [], "copy", ["cpy"]])
def test_suite_bad_names(names):
    with pytest.raises(ValueError):
        make_suite(names, num_train=4, num_eval=2)


# --------------------------------------------------------------------------- tokenizer


def _all_symbols() -> list[str]:
    return [*ALPHABET, *"0123456789", ":", "=", *SYNTHETIC_TASKS]


def test_tokenizer_special_tokens_and_padding_side(tok):
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == ("<pad>", "<unk>", "<bos>", "<eos>")
    ids = {tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id}
    assert None not in ids and len(ids) == 4
    assert tok.padding_side == "right"
    assert tok.model_max_length == 64
    assert len(tok) == 4 + len(_all_symbols())


def test_every_symbol_encodes_to_one_known_token_and_decodes(tok):
    for sym in _all_symbols():
        ids = tok(sym, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, sym
        assert tok.decode(ids) == sym
    text = " ".join(_all_symbols())
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert len(set(ids)) == len(ids) == len(_all_symbols())
    assert tok.decode(ids) == text
    # Out-of-vocabulary words do map to <unk> (so the check above is meaningful).
    assert tok("zz", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_tokenizer_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for loader in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path)
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.pad_token_id == tok.pad_token_id
        assert loaded.eos_token_id == tok.eos_token_id
        assert loaded.bos_token_id == tok.bos_token_id
        assert loaded.unk_token_id == tok.unk_token_id
        assert loaded.padding_side == "right"
        assert loaded.model_max_length == 64
        text = "sort : h a c = a c h"
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]


def test_tokenizer_extra_tokens_and_alphabet():
    t = build_tokenizer(alphabet="xyz", task_names=("mytask",), extra_tokens=("<sep>", "x"))
    for sym in ["x", "y", "z", "mytask", "<sep>", "7"]:
        assert t.convert_tokens_to_ids(sym) != t.unk_token_id
    assert t.convert_tokens_to_ids("a") == t.unk_token_id
    with pytest.raises(ValueError):
        build_tokenizer(extra_tokens=("two words",))


# --------------------------------------------------------------------------- tokenization


def test_causal_lm_labels_mask_exactly_prompt(tok, small_ds):
    out = tokenize_for_causal_lm(small_ds, tok)
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    assert out.num_rows == small_ds.num_rows
    for src, row in zip(small_ds, out):
        p = tok(src["prompt"], add_special_tokens=False)["input_ids"]
        a = tok(src["answer"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == p + a + [tok.eos_token_id]
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert len(row["labels"]) == len(row["input_ids"])
        masked = [i for i, lab in enumerate(row["labels"]) if lab == -100]
        assert masked == list(range(len(p)))
        # Not pre-shifted: each supervised label sits at the position of its own token.
        assert row["labels"][len(p) :] == row["input_ids"][len(p) :]


def test_causal_lm_answer_ids_match_joint_tokenization_for_subword_tokenizer():
    # A byte-level BPE tokenizer marks the leading space ("Ġa"): answer tokens must be the ones the
    # model sees after the prompt, not those of the answer tokenized on its own.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [f"{r['prompt']} {r['answer']}" for r in make_task("reverse", 50, seed=0)]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    bpe = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")

    ds = datasets.Dataset.from_dict({"prompt": ["reverse : a c b ="], "answer": ["b c a"]})
    row = tokenize_for_causal_lm(ds, bpe, max_length=64)[0]
    joint = bpe("reverse : a c b = b c a", add_special_tokens=False)["input_ids"]
    n_prompt = len(bpe("reverse : a c b =", add_special_tokens=False)["input_ids"])
    assert joint != bpe("reverse : a c b =")["input_ids"] + bpe("b c a")["input_ids"]  # boundary matters
    assert row["input_ids"] == joint + [bpe.eos_token_id]
    assert row["labels"] == [-100] * n_prompt + joint[n_prompt:] + [bpe.eos_token_id]
    assert bpe.decode(row["input_ids"][n_prompt:-1]) == " b c a"


def test_causal_lm_full_text_loss(tok, small_ds):
    out = tokenize_for_causal_lm(small_ds, tok, answer_only_loss=False)
    for row in out:
        assert row["labels"] == row["input_ids"]
        assert -100 not in row["labels"]


def test_seq2seq_tokenization(tok, small_ds):
    out = tokenize_for_seq2seq(small_ds, tok)
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    for src, row in zip(small_ds, out):
        p = tok(src["prompt"], add_special_tokens=False)["input_ids"]
        a = tok(src["answer"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == p + [tok.eos_token_id]
        assert row["attention_mask"] == [1] * len(p + [1])
        assert row["labels"] == a + [tok.eos_token_id]


def test_extra_columns_removed(tok):
    ds = datasets.Dataset.from_dict({"prompt": ["copy : a ="], "answer": ["a"], "task_id": [0]})
    assert tokenize_for_causal_lm(ds, tok).column_names == ["input_ids", "attention_mask", "labels"]


def test_custom_column_names(tok):
    ds = datasets.Dataset.from_dict({"q": ["copy : a b ="], "r": ["a b"]})
    out = tokenize_for_causal_lm(ds, tok, prompt_column="q", answer_column="r")
    assert out[0]["labels"].count(-100) == 5


def test_too_long_row_raises_with_row_index(tok):
    ds = datasets.Dataset.from_dict(
        {"prompt": ["copy : a =", "copy : a b c d e ="], "answer": ["a", "a b c d e"]}
    )
    with pytest.raises(ValueError, match=r"Row 1\b.*max_length=8"):
        tokenize_for_causal_lm(ds, tok, max_length=8)
    with pytest.raises(ValueError, match=r"Row 1\b"):
        tokenize_for_seq2seq(ds, tok, max_length=6)
    # Defaults to the tokenizer limit (64): a 70-letter row cannot sneak through.
    long = datasets.Dataset.from_dict({"prompt": ["copy : " + "a " * 35 + "="], "answer": ["a " * 35]})
    with pytest.raises(ValueError, match="Row 0"):
        tokenize_for_causal_lm(long, tok)
    assert len(tokenize_for_causal_lm(ds, tok, max_length=14)[1]["input_ids"]) == 14


def test_missing_column_names_column_and_present(tok):
    ds = datasets.Dataset.from_dict({"question": ["copy : a ="], "answer": ["a"]})
    for fn in (tokenize_for_causal_lm, tokenize_for_seq2seq):
        with pytest.raises(ValueError, match=r"'prompt'.*\['question', 'answer'\]"):
            fn(ds, tok)


def test_empty_dataset_raises(tok):
    ds = datasets.Dataset.from_dict({"prompt": [], "answer": []})
    for fn in (tokenize_for_causal_lm, tokenize_for_seq2seq):
        with pytest.raises(ValueError, match="empty"):
            fn(ds, tok)


def test_unknown_word_raises(tok):
    ds = datasets.Dataset.from_dict({"prompt": ["copy : a ="], "answer": ["zebra"]})
    with pytest.raises(ValueError, match="Row 0.*'answer'"):
        tokenize_for_causal_lm(ds, tok)


def test_tokenize_task_dispatch(tok, small_ds):
    causal = tokenize_for_causal_lm(small_ds, tok)
    seq2seq = tokenize_for_seq2seq(small_ds, tok)
    assert tokenize_task(small_ds, tok, False).to_dict() == causal.to_dict()
    assert tokenize_task(small_ds, tok, True).to_dict() == seq2seq.to_dict()
    assert tokenize_task(small_ds, tok, build_tiny_model("t5", tok)).to_dict() == seq2seq.to_dict()
    assert tokenize_task(small_ds, tok, build_tiny_model("gpt2", tok)).to_dict() == causal.to_dict()
    full = tokenize_task(small_ds, tok, False, answer_only_loss=False)
    assert full[0]["labels"] == full[0]["input_ids"]
    with pytest.raises(ValueError, match="answer_only_loss"):
        tokenize_task(small_ds, tok, True, answer_only_loss=False)


# --------------------------------------------------------------------------- models


def _batch_for(arch: str, tok) -> dict[str, torch.Tensor]:
    ds = make_task("sort", 4, seed=0)
    tokenized = tokenize_task(ds, tok, arch == "t5")
    collator = transformers.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    return collator([tokenized[i] for i in range(len(tokenized))])


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_each_arch_builds_and_gives_finite_loss(arch, tok):
    model = build_tiny_model(arch, tok)
    expected_cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "t5": transformers.T5ForConditionalGeneration,
    }[arch]
    assert isinstance(model, expected_cls)
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 500_000  # stays tiny
    batch = _batch_for(arch, tok)
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.logits.shape[-1] == len(tok)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_arch_specific_config(tok):
    t5 = build_tiny_model("t5", tok)
    assert t5.config.decoder_start_token_id == tok.pad_token_id
    assert t5.config.is_encoder_decoder
    llama = build_tiny_model("llama", tok, num_heads=4)
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    assert llama.config.num_attention_heads % llama.config.num_key_value_heads == 0
    assert llama.config.max_position_embeddings == 128
    assert build_tiny_model("gpt2", tok).config.n_positions == 128
    over = build_tiny_model("gpt2", tok, n_positions=32, resid_pdrop=0.0)
    assert over.config.n_positions == 32 and over.config.resid_pdrop == 0.0


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_model_seed_determinism_and_rng_isolation(arch, tok):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(arch, tok, seed=1)
    after = torch.rand(3)
    assert torch.equal(before, after)  # caller's RNG stream untouched
    b = build_tiny_model(arch, tok, seed=1)
    c = build_tiny_model(arch, tok, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_save_and_from_pretrained_identical_logits(arch, tok, tmp_path):
    model = build_tiny_model(arch, tok, seed=7).eval()
    model.save_pretrained(tmp_path)
    auto = transformers.AutoModelForSeq2SeqLM if arch == "t5" else transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    batch = _batch_for(arch, tok)
    with torch.no_grad():
        ref, got = model(**batch), loaded(**batch)
    assert torch.equal(ref.logits, got.logits)
    assert torch.equal(ref.loss, got.loss)


def test_bad_arch_and_bad_sizes(tok):
    with pytest.raises(ValueError, match="Did you mean 'gpt2'") as info:
        build_tiny_model("gtp2", tok)
    assert "llama" in str(info.value) and "t5" in str(info.value)
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model("gpt2", tok, hidden_size=30, num_heads=4)


def test_is_seq2seq_model_plain_and_wrapped(tok):
    t5, gpt2 = build_tiny_model("t5", tok), build_tiny_model("gpt2", tok)
    assert is_seq2seq_model(t5) is True
    assert is_seq2seq_model(gpt2) is False
    assert is_seq2seq_model(t5.config) is True
    assert is_seq2seq_model(object()) is False

    class Wrapper(torch.nn.Module):  # DDP-style: the real model lives under .module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert is_seq2seq_model(Wrapper(t5)) is True
    assert is_seq2seq_model(Wrapper(gpt2)) is False


def test_is_seq2seq_model_peft(tok):
    peft = pytest.importorskip("peft")
    t5 = build_tiny_model("t5", tok)
    gpt2 = build_tiny_model("gpt2", tok)
    wrapped_t5 = peft.get_peft_model(t5, peft.LoraConfig(r=2, target_modules=["q", "v"]))
    wrapped_gpt2 = peft.get_peft_model(gpt2, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert is_seq2seq_model(wrapped_t5) is True
    assert is_seq2seq_model(wrapped_gpt2) is False
