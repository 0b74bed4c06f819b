"""The continual trainer: drop-in behaviour, hooks, accumulation, streams, checkpoints, errors."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from clm_hf import (
    EWC,
    ContinualCausalLMTrainer,
    ContinualResults,
    ContinualSeq2SeqTrainer,
    ContinualSeq2SeqTrainingArguments,
    ContinualTrainer,
    Replay,
    Strategy,
    StrategyConfig,
)
from clm_hf.strategies.base import register_strategy, trainable_parameters
from clm_hf.tasks import make_task, tokenize_for_causal_lm
from tests.conftest import AtTaskStep, small_args


def _trainer(tmp_path, model, tokenizer, strategies=(), **arg_overrides):
    return ContinualCausalLMTrainer(
        model=model, args=small_args(tmp_path, **arg_overrides), processing_class=tokenizer, strategies=list(strategies)
    )


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- penalties and gradient accumulation ---------------------------------------------------------
def _one_step_with_ewc(tmp_path, make_model, tokenizer, batch, accumulation):
    model = make_model("gpt2")
    gen = torch.Generator().manual_seed(0)
    ewc = EWC(ewc_lambda=50.0)
    params = trainable_parameters(model)
    ewc.terms = [({n: torch.rand(p.shape, generator=gen) for n, p in params.items()},
                  {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for n, p in params.items()})]
    trainer = _trainer(tmp_path / f"b{batch}", model, tokenizer, [ewc], per_device_train_batch_size=batch,
                       gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5,
                       save_continual_state=False, max_grad_norm=0.0)
    grads = {}

    class Capture(Strategy):
        name = "capture"

        def edit_gradients(self, model):
            grads.update({n: p.grad.detach().clone() for n, p in trainable_parameters(model).items()})

    capture = Capture()
    trainer.strategies.append(capture)
    capture.setup(trainer)
    rows = tokenize_for_causal_lm(make_task("reverse", 8, seed=5), tokenizer)
    trainer.train_task(rows, task_id="t")
    return grads, _params(model), trainer


def test_penalty_correct_under_gradient_accumulation(tmp_path, make_model, tokenizer):
    grads_a, params_a, trainer_a = _one_step_with_ewc(tmp_path, make_model, tokenizer, batch=8, accumulation=1)
    grads_b, params_b, _ = _one_step_with_ewc(tmp_path, make_model, tokenizer, batch=4, accumulation=2)
    assert grads_a and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(params_b[name], params_a[name], rtol=0, atol=1e-6)
    # the penalty is logged by name through the Trainer's own log history
    assert any("ewc_penalty" in entry for entry in trainer_a.state.log_history)


def test_penalty_only_in_training(tmp_path, make_model, tokenizer):
    model = make_model("gpt2")
    ewc = EWC(ewc_lambda=1e4)
    params = trainable_parameters(model)
    ewc.terms = [({n: torch.ones_like(p) for n, p in params.items()}, {n: p.detach() + 1.0 for n, p in params.items()})]
    trainer = _trainer(tmp_path, model, tokenizer, [ewc])
    ewc._bind(model)
    rows = tokenize_for_causal_lm(make_task("copy", 4), tokenizer)
    batch = trainer.data_collator([rows[i] for i in range(4)])
    plain = model(**batch).loss
    model.eval()
    assert torch.allclose(trainer.compute_loss(model, batch), plain)
    model.train()
    # Here the penalty's gradient is added in edit_gradients (training steps only), so the loss is the model's.
    assert torch.allclose(trainer.compute_loss(model, batch), plain)
    ewc._direct = False  # where gradients cannot be edited (DeepSpeed) the penalty is a loss term
    model.eval()
    assert torch.allclose(trainer.compute_loss(model, batch), plain)
    model.train()
    assert trainer.compute_loss(model, batch) > plain + 1.0
    eval_loss = trainer.evaluate(eval_dataset=rows)["eval_loss"]
    assert eval_loss == pytest.approx(plain.item(), rel=1e-4)


# --- gradient-edit hook ---------------------------------------------------------------------
class _ZeroGrads(Strategy):
    """Zeroes every gradient right before the optimizer step and counts the hook calls."""

    name = "zero_grads_test"

    def __init__(self):
        super().__init__()
        self.edits = self.after_steps = 0
        self.saw_grads = True

    def edit_gradients(self, model):
        self.edits += 1
        for p in model.parameters():
            if p.requires_grad:
                self.saw_grads &= p.grad is not None
                p.grad.zero_()

    def after_optimizer_step(self, model):
        self.after_steps += 1


def test_edit_gradients_runs_once_per_optimizer_step_before_it(tmp_path, make_model, tokenizer):
    model = make_model("gpt2")
    before = _params(model)
    hook = _ZeroGrads()
    trainer = _trainer(tmp_path, model, tokenizer, [hook], optim="sgd", gradient_accumulation_steps=2,
                       per_device_train_batch_size=4, save_continual_state=False)
    rows = tokenize_for_causal_lm(make_task("copy", 32), tokenizer)
    trainer.train_task(rows, task_id=0)
    assert hook.edits == hook.after_steps == 4  # 32 rows / (4 x 2)
    assert hook.saw_grads
    after = _params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # zeroed grads -> SGD moved nothing


# --- the stream -------------------------------------------------------------------------------
def test_fit_builds_full_score_matrix_and_saves_it(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [Replay(buffer_size=16), EWC()])
    results = trainer.fit(tiny_stream)
    assert results.task_names == ["copy", "reverse", "sort"]
    for metric in ("exact_match", "token_accuracy", "loss", "perplexity"):
        matrix = results.matrix(metric)
        assert len(matrix) == 3 and all(len(r) == 3 and None not in r for r in matrix)
        assert len(results.baseline[metric]) == 3
    assert set(results.summary()) == {"acc", "bwt", "fwt", "forgetting"}
    saved = ContinualResults.load(tmp_path / "run" / "results.json")
    assert saved.matrix("loss") == results.matrix("loss")
    # per-task scores went through the Trainer's logs (what report_to trackers receive)
    assert any(k.startswith("cl/after_sort/copy/") for e in trainer.state.log_history for k in e)
    # replay holds rows of every task, tokenized, with their task id
    counts = trainer.strategies[0].buffer.task_counts()
    assert set(counts) == {"copy", "reverse", "sort"} and sum(counts.values()) == 16


def test_train_task_accepts_dataloaders_as_in_the_original_quick_start(tmp_path, make_model, tokenizer):
    rows = tokenize_for_causal_lm(make_task("copy", 16), tokenizer)
    as_lists = [{k: torch.tensor(v) for k, v in rows[i].items()} for i in range(len(rows))]
    trainer = ContinualTrainer(model=make_model("gpt2"), config={
        "optimizer": {"type": "adam", "lr": 0.001},
        "continual_strategy": {"ewc": {"enabled": True, "lambda": 100.0}},
        "output_dir": str(tmp_path / "quick"),
        "training": {"report_to": "none", "disable_tqdm": True, "save_strategy": "no"},
    })
    assert trainer.args.learning_rate == 0.001 and trainer.args.weight_decay == 0.0
    assert isinstance(trainer.strategies[0], EWC) and trainer.strategies[0].config.ewc_lambda == 100.0
    loader = DataLoader(as_lists, batch_size=4)
    trainer.train_task(train_loader=loader, val_loader=DataLoader(as_lists, batch_size=4), task_id=0,
                       task_name="task_0", num_epochs=1)
    assert trainer.results.task_names == ["task_0"] and len(trainer.results.matrix()) == 1
    assert trainer.strategies[0].terms, "EWC stored its Fisher after the task"


def test_train_task_tokenizes_raw_prompt_answer_rows(tmp_path, make_model, tokenizer):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer)
    trainer.train_task(make_task("copy", 8), make_task("copy", 4, seed=1), task_id="copy")
    assert trainer.results.matrix()[0][0] is not None


@pytest.mark.parametrize(
    "config, message",
    [
        ({"optimiser": {}}, "Did you mean 'optimizer'"),
        ({"optimizer": {"type": "adan"}}, "Unknown optimizer type 'adan'"),
        ({"continual_strategy": {"ewk": {}}}, "Did you mean 'ewc'"),
        ({"continual_strategy": {"ewc": {"lambda": -1}}}, "ewc_lambda"),
    ],
)
def test_config_dict_errors_name_the_key(config, message, make_model):
    with pytest.raises(ValueError, match=message):
        ContinualTrainer(model=make_model("gpt2"), config=config)


def test_task_id_used_twice_is_an_error(tmp_path, make_model, tokenizer):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, save_continual_state=False)
    rows = tokenize_for_causal_lm(make_task("copy", 8), tokenizer)
    trainer.train_task(rows, task_id="a")
    with pytest.raises(ValueError, match="Task id 'a' was already trained"):
        trainer.train_task(rows, task_id="a")
    with pytest.raises(KeyError, match="Unknown task 'b'"):
        with trainer.use_task("b"):
            pass
    with pytest.raises(ValueError, match="appear more than once"):
        trainer.fit([{"name": "x", "train": rows}, {"name": "x", "train": rows}])


@pytest.mark.parametrize(
    "rows, message",
    [
        # input_ids without labels now train (labels = input_ids); unknown columns name the accepted layouts.
        (Dataset.from_dict({"ids": [[5, 6]]}), r"columns \['ids'\], which fit no accepted layout"),
        (Dataset.from_dict({"input_ids": [], "labels": []}), "is empty"),
        (Dataset.from_dict({"input_ids": [[5, 6]], "labels": [[-100, -100]]}), "Every label"),
        (Dataset.from_dict({"input_ids": [[5, 999]], "labels": [[5, 999]]}), "outside the model's vocabulary"),
    ],
)
def test_bad_datasets_get_clear_errors(rows, message, tmp_path, make_model, tokenizer):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer)
    with pytest.raises(ValueError, match=message):
        trainer.train_task(rows, task_id="bad")
    assert trainer.tasks == []  # nothing registered, nothing trained


def test_strategy_objects_are_checked(make_model):
    with pytest.raises(TypeError, match="Strategy objects"):
        ContinualTrainer(model=make_model("gpt2"), strategies=["ewc"])
    with pytest.raises(ValueError, match="listed twice"):
        ContinualTrainer(model=make_model("gpt2"), strategies=[EWC(), EWC()])


def test_custom_strategy_is_one_class_plus_a_registry_entry(tmp_path, make_model, tokenizer):
    from dataclasses import dataclass

    @dataclass
    class L2Config(StrategyConfig):
        weight: float = 1.0

    @register_strategy
    class L2(Strategy):
        name = "l2_test"
        config_class = L2Config

        def loss(self, model, inputs, outputs):
            return {"l2": self.config.weight * sum((p ** 2).sum() for p in model.parameters())}

    from clm_hf.strategies import build_strategy

    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [build_strategy("l2_test", weight=1e-3)],
                       save_continual_state=False)
    trainer.train_task(tokenize_for_causal_lm(make_task("copy", 8), tokenizer), task_id=0)
    assert any("l2" in entry for entry in trainer.state.log_history)


# --- seq2seq ---------------------------------------------------------------------------------
def test_seq2seq_trainer_runs_a_stream_with_replay_and_ewc(tmp_path, make_model, tokenizer, tiny_stream):
    from transformers import Seq2SeqTrainer

    args = small_args(tmp_path, args_class=ContinualSeq2SeqTrainingArguments)
    trainer = ContinualSeq2SeqTrainer(model=make_model("t5"), args=args, processing_class=tokenizer,
                                      strategies=[Replay(buffer_size=8), EWC()])
    assert isinstance(trainer, Seq2SeqTrainer)
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}
    results = trainer.fit(stream)
    assert len(results.matrix()) == 2
    assert results.matrix("loss")[0][0] < results.baseline["loss"][0]  # it learned something


# --- checkpoints and resume ----------------------------------------------------------------------
def _final_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


_CrashAt = AtTaskStep  # simulates a kill after the given optimizer step of the given task


def _crash_then_resume(tmp_path, make_model, tokenizer, stream, strategies, task_index, step, **overrides):
    crashing = _trainer(tmp_path, make_model("gpt2"), tokenizer, strategies(), **overrides)
    crashing.add_callback(_CrashAt(crashing, task_index, step))
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(stream)
    # a fresh process: other initial weights, the same settings
    resumed = _trainer(tmp_path, make_model("gpt2", seed=123), tokenizer, strategies(), **overrides)
    return resumed, resumed.fit(stream, resume_from_checkpoint=True)


def test_resume_between_tasks_reproduces_uninterrupted_run(tmp_path, make_model, tokenizer, tiny_stream):
    def strategies():
        return [Replay(buffer_size=16), EWC()]

    full = _trainer(tmp_path / "full", make_model("gpt2"), tokenizer, strategies())
    full_results = full.fit(tiny_stream)
    resumed, results = _crash_then_resume(tmp_path / "cut", make_model, tokenizer, tiny_stream, strategies,
                                          task_index=2, step=2)
    assert [t.task_id for t in resumed.tasks] == ["copy", "reverse", "sort"]
    reference = _final_state(full)
    for name, value in _final_state(resumed).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)
    for metric in ("loss", "exact_match"):
        torch.testing.assert_close(torch.tensor(results.matrix(metric)), torch.tensor(full_results.matrix(metric)),
                                   rtol=0, atol=1e-6)
    assert results.baseline["loss"] == pytest.approx(full_results.baseline["loss"], abs=1e-6)


def test_resume_skips_a_corrupt_checkpoint_and_uses_the_last_good_one(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC()])
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    newest = tmp_path / "run" / "continual" / "task-001"
    state = newest / "model.safetensors"
    state.write_bytes(state.read_bytes()[:-10])  # truncated
    resumed = _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC()])
    resumed.fit({k: tiny_stream[k] for k in ("copy", "reverse")}, resume_from_checkpoint=True)
    # task-000 was good: the stream restarts at task 1 and finishes
    assert [t.task_id for t in resumed.tasks] == ["copy", "reverse"]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]


def test_resume_refuses_changed_strategies(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC(ewc_lambda=10.0)])
    trainer.fit({"copy": tiny_stream["copy"]})
    other = _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC(ewc_lambda=20.0)])
    with pytest.raises(ValueError, match="written with strategies"):
        other.fit(tiny_stream, resume_from_checkpoint=True)


def test_resume_inside_a_task_from_a_trainer_checkpoint(tmp_path, make_model, tokenizer, tiny_stream):
    stream = {k: tiny_stream[k] for k in ("copy", "reverse")}

    def strategies():
        return [Replay(buffer_size=16), EWC()]

    full = _trainer(tmp_path / "full", make_model("gpt2"), tokenizer, strategies(), save_strategy="steps", save_steps=2)
    full.fit(stream)
    resumed, _ = _crash_then_resume(tmp_path / "cut", make_model, tokenizer, stream, strategies, task_index=1, step=3,
                                    save_strategy="steps", save_steps=2)
    assert (tmp_path / "cut" / "run" / "task-001" / "checkpoint-2" / "continual_state" / "manifest.json").is_file()
    reference = _final_state(full)
    for name, value in _final_state(resumed).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)


def test_trainer_features_still_work(tmp_path, make_model, tokenizer):
    """eval_dataset + eval_strategy, callbacks, save_model / from_pretrained, as with a plain Trainer."""
    from transformers import AutoModelForCausalLM

    seen = []

    class Recorder(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(metrics)

    rows = tokenize_for_causal_lm(make_task("copy", 16), tokenizer)
    trainer = ContinualCausalLMTrainer(
        model=make_model("gpt2"), args=small_args(tmp_path, eval_strategy="epoch", num_train_epochs=2),
        processing_class=tokenizer, strategies=[EWC()], eval_dataset=rows, callbacks=[Recorder()],
    )
    trainer.train_task(rows, task_id="copy")
    assert len(seen) == 2 and all("eval_loss" in m for m in seen)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    batch = trainer.data_collator([rows[i] for i in range(4)])
    trainer.model.eval()
    torch.testing.assert_close(reloaded(**batch).logits, trainer.model(**batch).logits)


def test_fit_joint_is_the_multitask_upper_bound(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer)
    results = trainer.fit_joint(tiny_stream)
    rows = results.matrix("loss")
    assert len(rows) == 3 and rows[0] == rows[1] == rows[2]
    assert results.metadata["joint"] and results.summary()["bwt"] == 0.0
    assert len(trainer.train_dataset) == sum(len(t["train"]) for t in tiny_stream.values())
    assert all(r < b for r, b in zip(rows[0], results.baseline["loss"]))  # it learned every task


class _EditNorms(Strategy):
    """Records, in ``edit_gradients``, the norm of the gradient strategies get to edit."""

    name = "edit_norms"

    def __init__(self):
        super().__init__()
        self.norms: list[float] = []

    def edit_gradients(self, model):
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


@pytest.mark.parametrize("loss_scale", [None, 2.0**10])
def test_gradient_edits_run_before_clipping_on_unscaled_gradients(tmp_path, make_model, tokenizer, tiny_stream,
                                                                  loss_scale):
    # Edits see the unclipped gradient (the norm the Trainer then clips with and logs), unscaled
    # under an fp16 GradScaler, whose unscale then runs once per step (a second would raise).
    probe = _EditNorms()
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [probe], max_grad_norm=1e-3, save_continual_state=False)
    if loss_scale is not None:  # fp16 loss scaling as on a GPU, simulated with a CPU GradScaler
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale)
        trainer.accelerator.native_amp = True
        trainer.accelerator.state._mixed_precision = "fp16"
        assert trainer.accelerator.mixed_precision == "fp16"
    trainer.fit({"copy": tiny_stream["copy"]})
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(probe.norms) == len(logged) == 4
    for seen, clip_norm in zip(probe.norms, logged):
        assert seen == pytest.approx(clip_norm, rel=1e-4) and seen > 1e-2  # unclipped and unscaled
    assert "unscale_gradients" not in vars(trainer.accelerator)  # the accelerator's own method is back


# --- fit() on a trainer that already trained tasks -----------------------------------------------------
def _saved_rows(trainer):
    from pathlib import Path

    saved = json.loads((Path(trainer._base_output_dir) / "results.json").read_text())
    return saved["task_names"], saved["scores"]["loss"]


def test_a_later_fit_continues_the_stream_and_the_results_keep_every_row(tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, [EWC(fisher_samples=8)], max_steps=2)
    copy = tiny_stream["copy"]
    trainer.train_task(copy["train"], copy["eval"], task_id="copy")  # the config-dict / train_task form first
    baseline = dict(trainer.results.baseline)
    first = trainer.results.matrix("loss")[0][0]
    # The whole stream in order: 'copy' is skipped (not retrained by position), 'reverse' is trained.
    results = trainer.fit({"copy": copy, "reverse": tiny_stream["reverse"]})
    assert [t.task_id for t in trainer.tasks] == ["copy", "reverse"]
    assert results.task_names == ["copy", "reverse"] and results.matrix("loss")[0][0] == first
    # Only the next task: the matrix grows by a row and a column, the earlier rows are kept, on disk too.
    results = trainer.fit({"sort": tiny_stream["sort"]})
    assert [t.task_id for t in trainer.tasks] == ["copy", "reverse", "sort"]
    loss = results.matrix("loss")
    assert results.task_names == ["copy", "reverse", "sort"] and len(loss) == 3 and loss[0][0] == first
    assert all(v is not None for v in loss[2])
    assert results.baseline == baseline  # the FWT baseline is taken once, before the first task
    names, saved = _saved_rows(trainer)
    assert names == ["copy", "reverse", "sort"] and len(saved) == 3 and saved[0][0] == first
    # The whole stream again: nothing left to train, nothing lost.
    weights = _params(trainer.model)
    assert trainer.fit(tiny_stream).matrix("loss") == loss
    assert all(torch.equal(weights[n], p) for n, p in trainer.model.named_parameters())


def test_a_later_fit_warns_once_per_trained_task_whose_eval_set_or_name_changed(tmp_path, make_model, tokenizer,
                                                                                tiny_stream, caplog):
    from datasets import Dataset, DatasetDict

    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, max_steps=1)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    loss = trainer.results.matrix("loss")
    # The same sets, rebuilt as new objects with the same rows: nothing to say.
    rebuilt = {k: DatasetDict({s: Dataset.from_dict(tiny_stream[k][s].to_dict()) for s in ("train", "eval")})
               for k in ("copy", "reverse")}
    with caplog.at_level("WARNING"):
        trainer.fit(rebuilt)
    assert not [r for r in caplog.records if "trained task" in r.getMessage()]
    caplog.clear()
    other_eval = DatasetDict({"train": tiny_stream["copy"]["train"], "eval": tiny_stream["sort"]["eval"]})
    stream = [{"task_id": "copy", "train": other_eval["train"], "eval": other_eval["eval"]},
              {"task_id": "reverse", "name": "flip", **tiny_stream["reverse"]},
              {"task_id": "sort", "name": "sort", **tiny_stream["sort"]}]
    with caplog.at_level("WARNING"):
        results = trainer.fit(stream)
    warned = [r.getMessage() for r in caplog.records if "trained task" in r.getMessage()]
    assert len(warned) == 2
    assert "'copy'" in warned[0] and "different eval set" in warned[0] and "registered one kept" in warned[0]
    assert "'reverse'" in warned[1] and "display name 'flip'" in warned[1] and "eval set" not in warned[1]
    # The registered ones are kept: names, and the earlier rows' scores.
    assert results.task_names == ["copy", "reverse", "sort"]
    assert [row[:2] for row in results.matrix("loss")[:2]] == loss
    # A new task that takes a trained task's display name is refused, naming both tasks.
    with pytest.raises(ValueError, match=r"display names that trained tasks already use: 'next' \('sort', the name "
                                         r"of trained task 'sort'\)"):
        trainer.fit([{"task_id": "next", "name": "sort", **tiny_stream["copy"]}])


@pytest.mark.parametrize("stream", [["reverse", "sort"], ["sort", "copy"], ["reverse"]])
def test_a_later_fit_that_does_not_continue_the_stream_is_refused_before_anything_changes(
        stream, tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, max_steps=1)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    before = trainer.results.to_dict()
    saved = _saved_rows(trainer)
    with pytest.raises(ValueError, match=r"already trained tasks \['copy', 'reverse'\].*stream "
                                         + repr(stream).replace("[", r"\[").replace("]", r"\]")
                                         + r".*Pass only the new tasks.*whole stream in order"):
        trainer.fit({k: tiny_stream[k] for k in stream})
    assert [t.task_id for t in trainer.tasks] == ["copy", "reverse"]
    assert trainer.results.to_dict() == before
    assert _saved_rows(trainer) == saved


def test_fit_warns_once_for_each_task_without_an_eval_set(tmp_path, make_model, tokenizer, tiny_stream, caplog):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, max_steps=1, save_continual_state=False)
    with caplog.at_level("WARNING"):
        trainer.fit({"copy": {"train": tiny_stream["copy"]["train"]}, "reverse": tiny_stream["reverse"],
                     "sort": {"train": tiny_stream["sort"]["train"]}})
    warned = [r.getMessage() for r in caplog.records if "has no eval set" in r.getMessage()]
    assert len(warned) == 2 and all("score matrices" in w for w in warned)
    assert "task 'copy'" in warned[0] and "task 'sort'" in warned[1]


def test_a_task_trained_with_no_eval_set_anywhere_still_gets_its_row(tmp_path, make_model, tokenizer, tiny_stream):
    # Nothing is scored after 'copy' (no eval set registered at all); its row must still be there, or
    # the row after 'reverse' would take its place and every later row would sit one task too early.
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, max_steps=1, save_continual_state=False)
    trainer.train_task(tiny_stream["copy"]["train"], task_id="copy")
    results = trainer.fit({"copy": tiny_stream["copy"], "reverse": tiny_stream["reverse"]})
    loss = results.matrix("loss")
    assert results.num_trained == 2 and len(loss) == 2, loss
    assert loss[0] == [None, None] and None not in loss[1], loss


def test_a_later_fit_scores_a_trained_task_with_the_streams_eval_set_or_warns(tmp_path, make_model, tokenizer,
                                                                            tiny_stream, caplog):
    # 'copy' is trained without eval rows (as after from_pretrained): continuing with the whole stream
    # registers its eval set (its training is skipped), so it is scored after 'reverse'.
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, max_steps=1, save_continual_state=False)
    # 'reverse' is scored from the start so that the row after 'copy' exists (a row needs a score).
    trainer.add_eval_task("reverse", tiny_stream["reverse"]["eval"])
    trainer.train_task(tiny_stream["copy"]["train"], task_id="copy")
    weights = _params(trainer.model)
    with caplog.at_level("WARNING"):
        results = trainer.fit({"copy": tiny_stream["copy"], "reverse": tiny_stream["reverse"]})
    assert not [r for r in caplog.records if "has no eval set" in r.getMessage()]
    assert [t.task_id for t in trainer.tasks] == ["copy", "reverse"] and results.task_names == ["copy", "reverse"]
    loss = results.matrix("loss")
    assert loss[0][0] is None and loss[1][0] is not None and loss[1][1] is not None
    assert not all(torch.equal(weights[n], p) for n, p in trainer.model.named_parameters())  # 'reverse' trained
    # A trained task still without eval set is named by the no-eval warning.
    caplog.clear()
    other = _trainer(tmp_path / "other", make_model("gpt2"), tokenizer, max_steps=1, save_continual_state=False)
    other.train_task(tiny_stream["copy"]["train"], task_id="copy")
    with caplog.at_level("WARNING"):
        other.fit({"copy": {"train": tiny_stream["copy"]["train"]}, "reverse": tiny_stream["reverse"]})
    warned = [r.getMessage() for r in caplog.records if "has no eval set" in r.getMessage()]
    assert len(warned) == 1 and "trained task 'copy'" in warned[0] and "forgetting" in warned[0]


def test_a_later_fit_with_a_list_stream_named_by_position_is_the_whole_list(tmp_path, make_model, tokenizer,
                                                                           tiny_stream, caplog):
    pairs = [(tiny_stream[n]["train"], tiny_stream[n]["eval"]) for n in ("copy", "reverse", "sort")]
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, max_steps=1, save_continual_state=False)
    trainer.fit(pairs[:2])
    before = trainer.results.to_dict()
    # Only the new task, as a list: its entry is '0' by position, a trained id: refused, not skipped.
    with pytest.raises(ValueError, match=r"list stream whose entries are named by position \['0'\].*A list names "
                                         r"its tasks by position.*whole list in order.*dict with new names"):
        trainer.fit(pairs[2:])
    assert [t.task_id for t in trainer.tasks] == ["0", "1"] and trainer.results.to_dict() == before
    # The whole list in order: the trained entries are skipped, and a warning says so.
    with caplog.at_level("WARNING"):
        results = trainer.fit(pairs)
    assert [t.task_id for t in trainer.tasks] == ["0", "1", "2"] and len(results.matrix("loss")) == 3
    warned = [r.getMessage() for r in caplog.records if "named by position" in r.getMessage()]
    assert len(warned) == 1 and "['0', '1']" in warned[0] and "skipped" in warned[0]


def test_tasks_added_by_a_later_fit_have_no_fwt(tmp_path, make_model, tokenizer, tiny_stream, caplog):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, max_steps=1, save_continual_state=False)
    trainer.fit({"copy": tiny_stream["copy"]})
    with caplog.at_level("INFO", logger="clm_hf"):
        results = trainer.fit({"reverse": tiny_stream["reverse"]})
    # The baseline is the initial model's: 'reverse' was not in the stream then, so FWT has no term.
    assert results.baseline["loss"][0] is not None and results.baseline["loss"][1] is None
    assert results.summary("loss")["fwt"] is None and results.summary("loss")["bwt"] is not None
    logged = [r.getMessage() for r in caplog.records if "FWT is None" in r.getMessage()]
    assert len(logged) == 1 and "['reverse']" in logged[0]
    # The same two tasks in one fit have an FWT.
    whole = _trainer(tmp_path / "whole", make_model("gpt2"), tokenizer, max_steps=1, save_continual_state=False)
    assert whole.fit({k: tiny_stream[k] for k in ("copy", "reverse")}).summary("loss")["fwt"] is not None


def test_evaluate_task_tokenizes_raw_rows_as_the_per_task_scoring_does(tmp_path, make_model, tokenizer):
    trainer = _trainer(tmp_path, make_model("gpt2"), tokenizer, max_steps=1, save_continual_state=False)
    eval_rows = make_task("copy", 6, seed=1)  # raw prompt/answer rows
    trainer.train_task(make_task("copy", 8), eval_rows, task_id="copy")
    scores = trainer.evaluate_task(eval_rows)
    assert scores["loss"] == pytest.approx(trainer.results.matrix("loss")[0][0], abs=1e-6)
    assert scores["exact_match"] == trainer.results.matrix("exact_match")[0][0]
