"""LwF: the KL's value, direction and gradient, the teacher snapshot (full and PEFT), the top-k cache,
composition with Replay, and checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from clm_hf import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualSeq2SeqTrainingArguments, Replay, Strategy
from clm_hf.strategies.base import TaskInfo, trainable_parameters
from clm_hf.strategies.lwf import IDS_COLUMN, LOGPROBS_COLUMN, LwF, distillation_kl, teacher_topk
from clm_hf.tasks import make_task, tokenize_for_causal_lm, tokenize_for_seq2seq
from tests.conftest import small_args


def _trainer(tmp_path, model, tokenizer, strategies, **overrides):
    return ContinualCausalLMTrainer(model=model, args=small_args(tmp_path, **overrides), processing_class=tokenizer,
                                    strategies=list(strategies))


def _rows(tokenizer, name="reverse", n=6, seed=3, seq2seq=False):
    rows = make_task(name, n, seed=seed, min_len=2, max_len=5)
    return tokenize_for_seq2seq(rows, tokenizer) if seq2seq else tokenize_for_causal_lm(rows, tokenizer)


def _batch(trainer, rows):
    return trainer.data_collator([rows[i] for i in range(len(rows))])


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in (IDS_COLUMN, LOGPROBS_COLUMN)}


def _perturb(model, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(scale * torch.randn(p.shape, generator=gen))


class _Logits(nn.Module):
    """A 'model' whose logits are its one parameter: (batch 1, 2 positions, vocab 3)."""

    def __init__(self, logits):
        super().__init__()
        self.z = nn.Parameter(logits.clone())

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return SimpleNamespace(logits=self.z)


def _toy_loss(z_student, z_teacher, *, alpha, temperature):
    """LwF's loss where position 0 predicts label 1 (causal shift) and position 1 is unsupervised."""
    student = _Logits(z_student)
    lwf = LwF(alpha=alpha, temperature=temperature)
    lwf.teacher = {"z": z_teacher.clone()}
    inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([[-100, 1]])}
    return student, lwf.loss(student, inputs, student(**inputs))["lwf_distillation"]


# --- the term ----------------------------------------------------------------------------------
def test_gradient_matches_hand_computation_on_one_position():
    z_s = torch.tensor([[[0.3, -1.2, 2.0], [5.0, 5.0, 5.0]]])
    z_t = torch.tensor([[[1.5, 0.2, -0.7], [-9.0, 0.0, 9.0]]])
    alpha, temperature = 0.7, 2.0
    student, loss = _toy_loss(z_s, z_t, alpha=alpha, temperature=temperature)
    loss.backward()
    p_s, p_t = torch.softmax(z_s[0, 0] / temperature, -1), torch.softmax(z_t[0, 0] / temperature, -1)
    # d/dz_s of alpha T² KL(p_t || p_s) = alpha T (p_s - p_t); the unsupervised position gets nothing
    expected = torch.zeros_like(z_s)
    expected[0, 0] = alpha * temperature * (p_s - p_t)
    torch.testing.assert_close(student.z.grad, expected, rtol=1e-5, atol=1e-7)
    value = alpha * temperature**2 * (p_t * (p_t.log() - p_s.log())).sum()
    torch.testing.assert_close(loss.detach(), value, rtol=1e-5, atol=1e-7)


def test_direction_is_teacher_first():
    # Asymmetric pair: a confident teacher and a flat-ish student.
    z_t = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    z_s = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    _, loss = _toy_loss(z_s, z_t, alpha=1.0, temperature=1.0)
    p_t, p_s = torch.softmax(z_t[0, 0], -1), torch.softmax(z_s[0, 0], -1)
    kl_ts = float((p_t * (p_t / p_s).log()).sum())
    kl_st = float((p_s * (p_s / p_t).log()).sum())
    assert abs(kl_ts - kl_st) > 0.1
    assert float(loss.detach()) == pytest.approx(kl_ts, rel=1e-5)
    assert float(distillation_kl(z_s[0, :1], z_t[0, :1], 1.0)) == pytest.approx(kl_ts, rel=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_zero_when_teacher_is_the_student(arch, tmp_path, make_model, tokenizer):
    model = make_model(arch)
    trainer = _trainer(tmp_path, model, tokenizer, [])
    lwf = LwF(alpha=3.0)
    lwf.teacher = lwf.snapshot(model)
    batch = _batch(trainer, _rows(tokenizer, seq2seq=arch == "t5"))
    model.train()
    outputs = model(**batch)
    term = lwf.loss(model, batch, outputs)["lwf_distillation"]
    # GPT-2 is bitwise identical; T5's grad-enabled forward rounds differently from a no-grad one (~1e-6 in the logits).
    assert float(term.detach()) == 0.0 if arch == "gpt2" else float(term.detach()) < 1e-6
    term.backward()  # zero up to rounding (softmax sums to 1 within float precision)
    assert max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None) < 1e-6
    _perturb(model)  # and it is positive once they differ
    assert float(lwf.loss(model, batch, model(**batch))["lwf_distillation"]) > 1e-4


def test_no_term_without_a_teacher(tmp_path, make_model, tokenizer):
    model = make_model("gpt2")
    batch = _batch(_trainer(tmp_path, model, tokenizer, []), _rows(tokenizer))
    assert LwF().loss(model, batch, model(**batch)) == {}


# --- the top-k cache ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_cache_with_k_equal_to_vocab_matches_live_teacher(arch, tmp_path, make_model, tokenizer):
    seq2seq = arch == "t5"
    model = make_model(arch)
    vocab = model.config.vocab_size
    if seq2seq:
        trainer = ContinualSeq2SeqTrainer(model=model, args=small_args(tmp_path, args_class=ContinualSeq2SeqTrainingArguments),
                                          processing_class=tokenizer, strategies=[])
    else:
        trainer = _trainer(tmp_path, model, tokenizer, [])
    cached, live, truncated = LwF(cache_teacher=True, cache_top_k=vocab), LwF(), LwF(cache_teacher=True, cache_top_k=3)
    for strategy in (cached, truncated):
        strategy.setup(trainer)
    task = TaskInfo(task_id="t", name="t", index=1)
    rows = _rows(tokenizer, seq2seq=seq2seq)
    full_rows, top3_rows = cached.prepare_train_dataset(rows, task), truncated.prepare_train_dataset(rows, task)
    live.teacher = live.snapshot(model)
    n_supervised = [sum(label != -100 for label in (r if seq2seq else r[1:])) for r in rows["labels"]]
    assert [len(r) for r in full_rows[IDS_COLUMN]] == [n * vocab for n in n_supervised]
    assert [len(r) for r in top3_rows[LOGPROBS_COLUMN]] == [n * 3 for n in n_supervised]
    _perturb(model)  # the student moves away from the teacher
    model.train()
    batch = _batch(trainer, full_rows)
    outputs = model(**_model_inputs(batch))
    from_cache = cached.loss(model, batch, outputs)["lwf_distillation"]
    from_live = live.loss(model, _model_inputs(batch), outputs)["lwf_distillation"]
    assert float(from_live) > 1e-4
    torch.testing.assert_close(from_cache, from_live, rtol=1e-5, atol=1e-7)
    approx = truncated.loss(model, _batch(trainer, top3_rows), outputs)["lwf_distillation"]
    assert 0 < float(approx) and float(approx) != pytest.approx(float(from_live), rel=1e-3)


# --- teacher snapshots -----------------------------------------------------------------------------
class _Spy(Strategy):
    """Listed before LwF: records LwF's teacher and the model at the end of each task."""

    name = "spy"

    def __init__(self, lwf):
        super().__init__()
        self.lwf, self.teachers, self.weights = lwf, {}, {}

    def after_task(self, trainer, task):
        self.teachers[task.index] = self.lwf.teacher
        self.weights[task.index] = {n: p.detach().clone() for n, p in trainable_parameters(trainer.model).items()}


def test_teacher_is_the_frozen_task_start_model_and_training_leaves_it_alone(tmp_path, make_model, tokenizer, tiny_stream):
    model = make_model("gpt2")
    lwf = LwF()
    spy = _Spy(lwf)
    trainer = _trainer(tmp_path, model, tokenizer, [spy, lwf], save_continual_state=False)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    assert spy.teachers[0] is None  # no teacher on the first task
    teacher, start, end = spy.teachers[1], spy.weights[0], spy.weights[1]
    assert set(teacher) == set(start)
    for name, value in teacher.items():
        assert not value.requires_grad
        torch.testing.assert_close(value, start[name], rtol=0, atol=0)  # unchanged by a whole task of training
    assert any(not torch.equal(end[n], start[n]) for n in start)  # while the model did move
    terms = [e["lwf_distillation"] for e in trainer.state.log_history if "lwf_distillation" in e]
    assert len(terms) == 4 and terms[0] == 0.0 and max(terms) > 0  # 0 at the first step of task 2, then > 0
    assert lwf.teacher is None  # released after the task


def test_seq2seq_stream_runs_with_live_and_cached_teacher(tmp_path, make_model, tokenizer, tiny_stream):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    for cache in (False, True):
        args = small_args(tmp_path / str(cache), args_class=ContinualSeq2SeqTrainingArguments, save_continual_state=False)
        trainer = ContinualSeq2SeqTrainer(model=make_model("t5"), args=args, processing_class=tokenizer,
                                          strategies=[LwF(cache_teacher=cache)])
        trainer.fit(stream)
        terms = [e["lwf_distillation"] for e in trainer.state.log_history if "lwf_distillation" in e]
        assert len(terms) == 4 and max(terms) > 0


def test_peft_teacher_is_the_adapter_snapshot_not_a_model_copy(tmp_path, make_model, tokenizer, tiny_stream):
    peft = pytest.importorskip("peft")
    base = make_model("llama")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lwf = LwF()
    spy = _Spy(lwf)
    trainer = _trainer(tmp_path, model, tokenizer, [spy, lwf], save_continual_state=False)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    teacher = spy.teachers[1]
    stored = sum(t.numel() for t in teacher.values())
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert stored == lora and stored < sum(p.numel() for p in model.parameters()) / 10
    assert all("lora_" in name for name in teacher)
    # The teacher of task 2 is the adapters as task 1 left them, not the adapter-free base.
    batch = _batch(trainer, _rows(tokenizer))
    lwf.teacher = teacher
    _perturb(model)  # the adapters move on
    model.train()
    outputs = model(**batch)
    term = float(lwf.loss(model, batch, outputs)["lwf_distillation"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in teacher:
                p.copy_(teacher[name])
        model.eval()
        task_start = model(**batch).logits
        with model.disable_adapter():
            base_logits = model(**batch).logits
    assert term > 0
    assert float(lwf.loss(model, batch, SimpleNamespace(logits=task_start))["lwf_distillation"]) == 0.0
    assert not torch.allclose(task_start, base_logits, atol=1e-4)


# --- composition and checkpoints ------------------------------------------------------------------
def test_cache_covers_replayed_rows(tmp_path, make_model, tokenizer, tiny_stream):
    seen = {}

    class Capture(Strategy):
        name = "capture"

        def before_task(self, trainer, task):
            if task.index == 1:
                seen["rows"] = trainer.train_dataset
                seen["teacher"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    lwf = LwF(cache_teacher=True, cache_top_k=4)
    model = make_model("gpt2")
    trainer = _trainer(tmp_path, model, tokenizer, [Replay(buffer_size=16, replay_ratio=0.5), lwf, Capture()],
                       save_continual_state=False)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    rows = seen["rows"]
    assert len(rows) == 48  # 32 new + 16 replayed
    replayed = [i for i, r in enumerate(rows["input_ids"]) if r[0] == tokenizer.convert_tokens_to_ids("copy")]
    assert len(replayed) == 16
    for i, labels in enumerate(rows["labels"]):
        assert len(rows[i][IDS_COLUMN]) == 4 * sum(label != -100 for label in labels[1:])
    # the cached values of replayed rows are the task-start model's top-4
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(seen["teacher"][n])
    ids, logprobs, _ = teacher_topk(model, rows.select(replayed), k=4, collator=trainer.data_collator)
    assert torch.equal(ids, torch.tensor([x for i in replayed for x in rows[i][IDS_COLUMN]], dtype=torch.int32))
    torch.testing.assert_close(logprobs, torch.tensor([x for i in replayed for x in rows[i][LOGPROBS_COLUMN]]))
    assert any(not torch.equal(final[n], seen["teacher"][n]) for n in final)


def test_cache_listed_before_replay_is_refused(tmp_path, make_model, tokenizer):
    with pytest.raises(ValueError, match="must come after"):
        _trainer(tmp_path, make_model("gpt2"), tokenizer, [LwF(cache_teacher=True), Replay()])
    _trainer(tmp_path, make_model("gpt2"), tokenizer, [LwF(), Replay()])  # the live teacher does not care


def test_state_round_trip(tmp_path, make_model, tokenizer):
    model = make_model("gpt2")
    trainer = _trainer(tmp_path, model, tokenizer, [])
    task = TaskInfo(task_id="t", name="t", index=1, resumed=True)
    # live: the teacher snapshot persists and wins over the (partly trained) model on resume
    lwf = LwF()
    lwf.before_task(trainer, TaskInfo(task_id="t", name="t", index=1))
    lwf.save_state(tmp_path / "live")
    assert LwF().state_dict() == {}
    _perturb(model)
    restored = LwF()
    restored.load_state(tmp_path / "live")
    restored.before_task(trainer, task)
    assert restored.teacher.keys() == lwf.teacher.keys()
    for name, value in lwf.teacher.items():
        assert torch.equal(restored.teacher[name], value)
    # cache: the cached columns persist and are re-attached without recomputing
    rows = _rows(tokenizer)
    cached = LwF(cache_teacher=True, cache_top_k=5)
    cached.setup(trainer)
    first = cached.prepare_train_dataset(rows, TaskInfo(task_id="t", name="t", index=1))
    cached.save_state(tmp_path / "cache")
    again = LwF(cache_teacher=True, cache_top_k=5)
    again.setup(trainer)
    again.load_state(tmp_path / "cache")
    _perturb(model)  # a recomputed cache would differ
    second = again.prepare_train_dataset(rows, task)
    assert second[IDS_COLUMN] == first[IDS_COLUMN] and second[LOGPROBS_COLUMN] == first[LOGPROBS_COLUMN]
    # after the task nothing is kept
    cached.after_task(trainer, task)
    assert cached.state_dict() == {}


def test_resume_inside_a_task_reproduces_uninterrupted_run(tmp_path, make_model, tokenizer, tiny_stream):
    from tests.test_trainer import _crash_then_resume, _final_state

    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    full = _trainer(tmp_path / "full", make_model("gpt2"), tokenizer, [LwF(alpha=2.0)], save_strategy="steps", save_steps=2)
    full.fit(stream)
    resumed, _ = _crash_then_resume(tmp_path / "cut", make_model, tokenizer, stream, lambda: [LwF(alpha=2.0)],
                                    task_index=1, step=3, save_strategy="steps", save_steps=2)
    reference = _final_state(full)
    for name, value in _final_state(resumed).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [({"alpha": -1.0}, "alpha"), ({"temperature": 0.0}, "temperature"), ({"cache_top_k": 0}, "cache_top_k"),
     ({"cache_teacher": "yes"}, "cache_teacher"), ({"temprature": 2.0}, "Did you mean 'temperature'")],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        LwF(**options)


def test_teacher_runs_without_dropout_and_skips_the_mode_switch_only_when_nothing_drops(make_model, tokenizer, tmp_path):
    from clm_hf.strategies.lwf import _teacher_logits, has_active_dropout
    from clm_hf.tasks import build_tiny_model

    assert not has_active_dropout(make_model("gpt2"))  # the fixtures switch dropout off
    dropping = build_tiny_model("gpt2", tokenizer, resid_pdrop=0.3, embd_pdrop=0.0, attn_pdrop=0.0)
    assert has_active_dropout(dropping)
    functional = build_tiny_model("llama", tokenizer, attention_dropout=0.2)  # no Dropout module, a config rate
    assert has_active_dropout(functional)

    batch = _model_inputs(_batch(_trainer(tmp_path, dropping, tokenizer, []), _rows(tokenizer)))
    dropping.train()
    with torch.no_grad():
        dropping.eval()
        reference = dropping(**batch).logits
        dropping.train()
    teacher = _teacher_logits(dropping, None, batch, seq2seq=False)  # switches to eval: deterministic
    assert torch.equal(teacher, reference) and dropping.training
    noisy = _teacher_logits(dropping, None, batch, seq2seq=False, switch_to_eval=False)
    assert not torch.equal(noisy, reference)  # what skipping the switch would do with active dropout


def test_batch_without_supervised_tokens_gives_zero_with_a_gradient_path(tmp_path, make_model, tokenizer):
    model = make_model("gpt2")
    trainer = _trainer(tmp_path, model, tokenizer, [])
    lwf = LwF()
    lwf.teacher = lwf.snapshot(model)
    _perturb(model)
    batch = _batch(trainer, _rows(tokenizer))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    term = lwf.loss(model, batch, model(**_model_inputs(batch)))["lwf_distillation"]
    assert float(term) == 0.0 and term.requires_grad


def _one_step_gradient(tmp_path, make_model, tokenizer, rows, *, batch, accumulation, with_lwf):
    """The accumulated gradient of one optimizer step over ``rows`` (8 rows, one step)."""
    model = make_model("gpt2")
    grads = {}

    class PerturbedTeacher(LwF):  # a teacher that differs from the student from the first step
        def before_task(self, trainer, task):
            gen = torch.Generator().manual_seed(4)
            self.teacher = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen)
                            for n, p in trainable_parameters(trainer.model).items()}
            self.teacher_task = task.index

    class Capture(Strategy):
        name = "capture"

        def edit_gradients(self, model):
            grads.update({n: p.grad.detach().clone() for n, p in trainable_parameters(model).items()})

    strategies = [PerturbedTeacher(alpha=1.0, temperature=2.0)] if with_lwf else []
    trainer = _trainer(tmp_path / f"b{batch}-{with_lwf}", model, tokenizer, [*strategies, Capture()],
                       per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                       optim="sgd", max_grad_norm=0.0, save_continual_state=False)
    trainer.train_task(rows, task_id="t")
    return grads


def test_distillation_gradient_does_not_depend_on_the_micro_batch_split(tmp_path, make_model, tokenizer):
    """LwF's term is a mean over supervised tokens; over an accumulated batch it is normalised by the
    batch's tokens, as the model's loss (``num_items_in_batch``), not per micro-batch: the LwF
    gradient is the same for 8 rows x 1 step, 4 x 2 and 2 x 4 (rows of 3 to 6 answer tokens)."""
    rows = _rows(tokenizer, n=8, seed=5)
    lengths = {sum(label != -100 for label in row[1:]) for row in rows["labels"]}
    assert len(lengths) > 1, lengths  # unequal micro-batches, else every split agrees anyway
    lwf_grads = {}
    for batch, accumulation in ((8, 1), (4, 2), (2, 4)):
        plain = _one_step_gradient(tmp_path, make_model, tokenizer, rows, batch=batch, accumulation=accumulation, with_lwf=False)
        with_lwf = _one_step_gradient(tmp_path, make_model, tokenizer, rows, batch=batch, accumulation=accumulation, with_lwf=True)
        lwf_grads[batch] = torch.cat([(with_lwf[n] - plain[n]).flatten() for n in plain])
    assert float(lwf_grads[8].norm()) > 1e-3 * float(torch.cat([p.flatten() for p in plain.values()]).norm())
    for batch in (4, 2):
        torch.testing.assert_close(lwf_grads[batch], lwf_grads[8], rtol=1e-5, atol=1e-5 * float(lwf_grads[8].abs().max()))


# --- the live teacher's cost cuts (issue 13): same loss and gradient as the composed form ---------
def _former_live_loss(model, lwf, batch):
    """The live-teacher loss as computed before the cuts: teacher logits at every position, the KL
    composed of autograd ops (two log-softmaxes, exp, product, sum)."""
    from torch.func import functional_call

    out = model(**batch)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        teacher = functional_call(model, lwf.teacher, args=(), kwargs=inputs, strict=False).logits[:, :-1]
    student, mask = out.logits[:, :-1], batch["labels"][:, 1:] != -100
    t = lwf.config.temperature
    log_p_s = torch.log_softmax(student[mask].float() / t, dim=-1)
    log_p_t = torch.log_softmax(teacher[mask].float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return lwf.config.alpha * t**2 * kl.sum() / mask.sum()


@pytest.mark.parametrize("arch, vocab", [("gpt2", None), ("gpt2", 500), ("llama", 500)])
def test_live_teacher_loss_and_gradient_match_the_composed_full_logits_form(arch, vocab, tmp_path, make_model, tokenizer):
    model = make_model(arch)
    if vocab:
        model.resize_token_embeddings(vocab)
    trainer = _trainer(tmp_path, model, tokenizer, [])
    lwf = LwF(alpha=2.0, temperature=1.5)
    lwf.teacher = lwf.snapshot(model)
    _perturb(model, scale=0.2)
    rows = make_task("reverse", 6, seed=5, min_len=2, max_len=7)  # prompts of several lengths, right padding
    batch = _batch(trainer, tokenize_for_causal_lm(rows, tokenizer))
    assert int((batch["labels"][:, 1:] != -100).any(0).nonzero()[0, 0]) > 0  # a prompt the teacher's head can skip
    model.train()
    grads = []
    for compute in (lambda: lwf.loss(model, batch, model(**batch))["lwf_distillation"],
                    lambda: _former_live_loss(model, lwf, batch)):
        model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model).items()}))
    (new, new_grads), (old, old_grads) = grads
    assert float(old) > 1e-3
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
    for name in old_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_live_teacher_head_runs_on_supervised_positions_only_and_models_without_logits_to_keep_still_work(tmp_path, make_model, tokenizer):
    model = make_model("gpt2")
    trainer = _trainer(tmp_path, model, tokenizer, [])
    lwf = LwF()
    lwf.teacher = lwf.snapshot(model)
    batch = _batch(trainer, _rows(tokenizer))
    model.train()
    out = model(**batch)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, o: seen.append(tuple(args[0].shape)))
    try:
        lwf.loss(model, batch, out)
    finally:
        handle.remove()
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert supervised < batch["input_ids"].numel() and seen == [(supervised, model.config.n_embd)]
    # A model whose forward has no logits_to_keep: run whole, gathered, the same term.
    z_s = torch.tensor([[[0.3, -1.2, 2.0], [1.0, 0.0, 0.5], [5.0, 5.0, 5.0]]])
    z_t = torch.tensor([[[9.0, 9.0, 9.0], [1.5, 0.2, -0.7], [-9.0, 0.0, 9.0]]])
    student = _Logits(z_s)
    toy = LwF(alpha=1.0, temperature=1.0)
    toy.teacher = {"z": z_t.clone()}
    inputs = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.tensor([[-100, -100, 1]])}
    term = toy.loss(student, inputs, student(**inputs))["lwf_distillation"]
    assert float(term.detach()) == pytest.approx(float(distillation_kl(z_s[0, 1:2], z_t[0, 1:2], 1.0)), rel=1e-6)

    class _IntOnly(_Logits):  # takes logits_to_keep, but only as an int (slices with -logits_to_keep)
        def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0):
            return SimpleNamespace(logits=self.z[:, -logits_to_keep:])

    int_only = _IntOnly(z_s)
    term = toy.loss(int_only, inputs, int_only(**inputs))["lwf_distillation"]
    assert float(term.detach()) == pytest.approx(float(distillation_kl(z_s[0, 1:2], z_t[0, 1:2], 1.0)), rel=1e-6)


def test_distillation_kl_backward_is_the_composed_forms():
    gen = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(7, 11, generator=gen, requires_grad=True), torch.randn(7, 11, generator=gen)
    weights = torch.rand(7, generator=gen)
    (distillation_kl(z_s, z_t, 2.0) * weights).sum().backward()
    fused = z_s.grad.clone()
    z_s.grad = None
    log_p_s, log_p_t = torch.log_softmax(z_s / 2.0, -1), torch.log_softmax(z_t / 2.0, -1)
    ((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(fused, z_s.grad, rtol=1e-6, atol=1e-7)
