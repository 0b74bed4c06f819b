"""Pushing a continual run to the Hub (with the upload stood in by a fake) and continuing it elsewhere."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clm_hf import EWC, ContinualCausalLMTrainer, Replay
from clm_hf import state as ckpt
from clm_hf.hub import save_continual_pretrained
from tests.conftest import small_args

SECRET = "hf_TESTSECRET123"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Stands in for the Hub: create_repo / upload_folder / snapshot_download work on tmp_path/hub."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    hub = SimpleNamespace(root=tmp_path / "hub", repos=[], uploads=[], downloads=[])

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        full = repo_id if "/" in repo_id else f"tester/{repo_id}"
        hub.repos.append({"repo_id": full, "token": token})
        return SimpleNamespace(repo_id=full)

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, token=None, run_as_future=False,
                      ignore_patterns=None, revision=None, path_in_repo=None, **kwargs):
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        target = hub.root / repo_id
        for rel in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, target / rel)
        hub.uploads.append({"repo_id": repo_id, "message": commit_message, "token": token})
        info = SimpleNamespace(repo_id=repo_id, commit_message=commit_message)
        if run_as_future:
            future = Future()
            future.set_result(info)
            return future
        return info

    def snapshot_download(repo_id, *, revision=None, token=None, cache_dir=None, ignore_patterns=None, **kwargs):
        source = hub.root / repo_id
        local = tmp_path / "hf_cache" / repo_id.replace("/", "--")
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        kept = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        for rel in kept:
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, local / rel)
        hub.downloads.append({"repo_id": repo_id, "files": kept})
        return str(local)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return hub


def _strategies():
    return [Replay(buffer_size=16), EWC(ewc_lambda=50.0)]


def _trainer(path, make_model, tokenizer, **overrides):
    return ContinualCausalLMTrainer(model=make_model("gpt2"), args=small_args(path, **overrides),
                                    processing_class=tokenizer, strategies=_strategies())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer, tiny_stream):
    """The uninterrupted three-task run every resumed run must reproduce."""
    from clm_hf.tasks import build_tiny_model
    from tests.conftest import NO_DROPOUT

    trainer = ContinualCausalLMTrainer(model=build_tiny_model("gpt2", tokenizer, **NO_DROPOUT["gpt2"]),
                                       args=small_args(tmp_path_factory.mktemp("reference")),
                                       processing_class=tokenizer, strategies=_strategies())
    results = trainer.fit(tiny_stream)
    return SimpleNamespace(results=results, weights={n: p.detach().clone() for n, p in trainer.model.named_parameters()})


def _assert_same_weights(model, weights):
    for name, value in model.named_parameters():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=1e-6)


def test_push_after_each_task_has_everything_to_resume_and_no_secret(
        tmp_path, fake_hub, make_model, tokenizer, tiny_stream, reference):
    from huggingface_hub import ModelCard

    trainer = _trainer(tmp_path / "first", make_model, tokenizer, push_to_hub=True, hub_model_id="tester/cl-stream",
                       hub_token=SECRET, save_strategy="steps", save_steps=2)
    trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    assert fake_hub.repos[0]["repo_id"] == "tester/cl-stream" and trainer.hub_model_id == "tester/cl-stream"
    assert (tmp_path / "first" / "run" / "task-000" / "checkpoint-2").is_dir()  # saved mid-task, not pushed
    # One push after each task (the Trainer's mid-task pushes are not used), each with the token.
    assert [u["message"] for u in fake_hub.uploads] == ["clm-hf: after task 0 (copy)", "clm-hf: after task 1 (reverse)"]
    assert all(u["token"] == SECRET and u["repo_id"] == "tester/cl-stream" for u in fake_hub.uploads)
    assert trainer.args.hub_token == SECRET and trainer.args.output_dir == str(tmp_path / "first" / "run")

    repo = fake_hub.root / "tester/cl-stream"
    for name in ("README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "clm_hf_continual.json", "base_model_config/config.json", "plots/heatmap.png",
                 "plots/task_curves.png", "continual_state/results.json", "continual_state/rng.safetensors",
                 "continual_state/strategies/00-replay/buffer/reservoir_state.json", "continual_state/strategies/01-ewc/state.safetensors"):
        assert (repo / name).is_file(), name
    assert json.loads((repo / "continual_state/continual_state.json").read_text())["tasks"][-1]["task_id"] == "reverse"
    ckpt.verify_manifest(repo / "continual_state")
    leaked = [p for p in repo.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []

    card = ModelCard.load(repo / "README.md")
    assert {"continual-learning", "clm-hf", "replay", "ewc"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert trainer.results.to_markdown() in card.text and "| ACC | BWT | FWT | forgetting |" in card.text
    assert "| 1 | reverse | reverse | yes |" in card.text and "ewc_lambda=50.0" in card.text
    assert 'from_pretrained("tester/cl-stream"' in card.text

    # Someone else continues the stream from the repo and gets the uninterrupted run exactly.
    resumed = ContinualCausalLMTrainer.from_pretrained("tester/cl-stream", output_dir=str(tmp_path / "second"))
    assert "model.safetensors" not in fake_hub.downloads[0]["files"]  # the root weights are not needed
    assert [t.task_id for t in resumed.tasks] == ["copy", "reverse"]
    assert [(s.name, s.config) for s in resumed.strategies] == [(s.name, s.config) for s in _strategies()]
    assert resumed.args.learning_rate == 3e-3 and not resumed.args.push_to_hub and resumed.args.hub_token is None
    results = resumed.fit(tiny_stream, resume_from_checkpoint=True)
    assert [t.task_id for t in resumed.tasks] == ["copy", "reverse", "sort"]
    _assert_same_weights(resumed.model, reference.weights)
    # The first run never scored "sort" (its stream ended before): those cells stay empty.
    for metric in ("loss", "exact_match"):
        got, want = results.matrix(metric), reference.results.matrix(metric)
        assert [row[2] for row in got[:2]] == [None, None]
        torch.testing.assert_close(torch.tensor([r[:2] for r in got[:2]]), torch.tensor([r[:2] for r in want[:2]]),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(got[2]), torch.tensor(want[2]), rtol=0, atol=1e-6)
    assert results.baseline["loss"][:2] == pytest.approx(reference.results.baseline["loss"][:2], abs=1e-6)
    assert (tmp_path / "second" / "continual" / "task-002" / "manifest.json").is_file()


def test_local_folder_resume_with_train_task(tmp_path, make_model, tokenizer, tiny_stream, reference):
    first = _trainer(tmp_path / "first", make_model, tokenizer)
    first.fit({"copy": tiny_stream["copy"]})
    folder = save_continual_pretrained(first, tmp_path / "export")
    assert (folder / "README.md").is_file() and (folder / "continual_state" / "manifest.json").is_file()

    resumed = ContinualCausalLMTrainer.from_pretrained(folder, output_dir=str(tmp_path / "second"),
                                                       eval_datasets={"copy": tiny_stream["copy"]["eval"]})
    resumed.train_task(tiny_stream["reverse"]["train"], tiny_stream["reverse"]["eval"], task_id="reverse")
    # The row after "reverse" scores "copy" too, and equals the uninterrupted run's.
    assert resumed.results.matrix()[1] == pytest.approx(reference.results.matrix()[1][:2], abs=1e-6)
    assert resumed.results.matrix()[0] == [pytest.approx(reference.results.matrix()[0][0], abs=1e-6), None]


@pytest.mark.parametrize("where", ["run folder", "other folder"])
def test_from_pretrained_then_fit_of_the_whole_stream_scores_the_restored_tasks(
        where, tmp_path, make_model, tokenizer, tiny_stream, reference):
    first = _trainer(tmp_path, make_model, tokenizer)
    first.fit({"copy": tiny_stream["copy"]})
    run_dir = tmp_path / "run"
    # A run folder records no training arguments: give the first run's (output_dir aside).
    args = small_args(tmp_path if where == "run folder" else tmp_path / "second")
    resumed = ContinualCausalLMTrainer.from_pretrained(run_dir, model=make_model("gpt2"), processing_class=tokenizer,
                                                       args=args)
    # fit without resume_from_checkpoint continues the stream: no OutputDirInUseError in the restored
    # folder, 'copy' is skipped but its eval set is registered, so it is scored after 'reverse'.
    results = resumed.fit({"copy": tiny_stream["copy"], "reverse": tiny_stream["reverse"]})
    assert [t.task_id for t in resumed.tasks] == ["copy", "reverse"]
    loss = results.matrix("loss")
    assert loss[1] == pytest.approx(reference.results.matrix("loss")[1][:2], abs=1e-6)
    assert loss[0] == [pytest.approx(reference.results.matrix("loss")[0][0], abs=1e-6), None]
    assert results.summary("loss")["bwt"] is not None and results.summary("loss")["forgetting"] is not None
    target = Path(args.output_dir)
    assert (target / "continual" / "task-001" / "manifest.json").is_file()
    assert json.loads((target / "results.json").read_text())["task_names"] == ["copy", "reverse"]


def test_from_pretrained_of_a_run_folder_continues_in_place(tmp_path, make_model, tokenizer, tiny_stream):
    first = _trainer(tmp_path, make_model, tokenizer)
    first.fit({"copy": tiny_stream["copy"]})
    run_dir = tmp_path / "run"
    # The first continual checkpoint wrote the model's config and the tokenizer (no weights): no
    # model= nor processing_class= is needed, from the run folder or from one of its checkpoints.
    base = run_dir / "base_model_config"
    assert (base / "config.json").is_file() and (base / "tokenizer_config.json").is_file()
    assert not list(base.glob("*.safetensors"))
    from clm_hf.trainer import run_state_paths

    assert base in run_state_paths(run_dir)  # overwrite_output_dir=True deletes it with the run's checkpoints
    again = ContinualCausalLMTrainer.from_pretrained(run_dir)
    assert again.args.output_dir == str(run_dir) and [t.task_id for t in again.tasks] == ["copy"]
    _assert_same_weights(again.model, {n: p.detach() for n, p in first.model.named_parameters()})
    assert again.processing_class("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]
    moved = ContinualCausalLMTrainer.from_pretrained(run_dir / "continual" / "task-000",
                                                     output_dir=str(tmp_path / "moved"))
    assert moved.processing_class is not None and [t.task_id for t in moved.tasks] == ["copy"]
    _assert_same_weights(moved.model, {n: p.detach() for n, p in first.model.named_parameters()})
    moved.fit({"reverse": tiny_stream["reverse"]})  # the continued run writes its own copy with its first checkpoint
    assert (tmp_path / "moved" / "base_model_config" / "config.json").is_file()
    # A run folder without it (written before it existed) names both missing pieces in one error.
    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match="pass model=.* and processing_class="):
        ContinualCausalLMTrainer.from_pretrained(run_dir)
    first.save_model()  # the Trainer's own config.json and tokenizer at the root serve too
    assert [t.task_id for t in ContinualCausalLMTrainer.from_pretrained(run_dir).tasks] == ["copy"]
    # Importing into a folder that holds another run is refused.
    other = _trainer(tmp_path / "other", make_model, tokenizer)
    other.fit({"reverse": tiny_stream["reverse"], "sort": tiny_stream["sort"]})
    with pytest.raises(ValueError, match="already holds another run"):
        ContinualCausalLMTrainer.from_pretrained(run_dir, output_dir=str(tmp_path / "other" / "run"))


def test_hub_strategy_end_pushes_only_on_request_to_the_run_folder_name(tmp_path, fake_hub, make_model, tokenizer,
                                                                       tiny_stream):
    from huggingface_hub import ModelCard

    trainer = _trainer(tmp_path, make_model, tokenizer, push_to_hub=True, hub_strategy="end")
    trainer.fit({"copy": tiny_stream["copy"]})
    assert fake_hub.uploads == []
    trainer.push_to_hub(tags=["my-tag"], license="mit", commit_message="final")
    assert fake_hub.repos[0]["repo_id"] == "tester/run"  # named after output_dir, as with a plain Trainer
    assert [u["message"] for u in fake_hub.uploads] == ["final"]
    card = ModelCard.load(fake_hub.root / "tester/run" / "README.md")
    assert "my-tag" in card.data.tags and card.data.license == "mit"
    # A later push waits for nothing and rewrites the staged folder.
    trainer.push_to_hub(blocking=False)
    assert len(fake_hub.uploads) == 2


def test_direct_train_with_every_save_pushes_writes_and_uploads_no_token(tmp_path, fake_hub, make_model, tokenizer,
                                                                        tiny_stream):
    """A direct ``train()`` is the stream's next task: the push after it must not carry the token,
    and the Trainer's mid-task saves push nothing (weights are pushed as whole continual states)."""
    from clm_hf.tasks import tokenize_task

    trainer = ContinualCausalLMTrainer(
        model=make_model("gpt2"), processing_class=tokenizer,
        train_dataset=tokenize_task(tiny_stream["copy"]["train"], tokenizer, False),
        args=small_args(tmp_path, push_to_hub=True, hub_model_id="tester/plain", hub_strategy="every_save",
                        save_strategy="steps", save_steps=2, hub_token=SECRET),
    )
    trainer.train()
    assert [t.task_id for t in trainer.tasks] == ["task-0"]
    messages = [u["message"] for u in fake_hub.uploads]
    assert "clm-hf: after task 0 (task-0)" in messages
    assert not [m for m in messages if m.startswith("Training in progress")]
    assert all(u["token"] == SECRET for u in fake_hub.uploads)  # passed explicitly (not the stored login)
    assert trainer.args.hub_token == SECRET
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    uploaded = [p for p in (fake_hub.root / "tester/plain").rglob("*") if p.is_file()]
    assert "training_args.bin" in {p.name for p in written} and "training_args.bin" in {p.name for p in uploaded}
    leaks = [str(p) for p in written + uploaded if SECRET.encode() in p.read_bytes()]
    assert leaks == []
    local = [str(p) for p in uploaded if str(tmp_path).encode() in p.read_bytes()]
    assert local == []  # no absolute local path published either


def test_export_publishes_no_local_path_and_its_metadata_is_covered_by_the_manifest(
        tmp_path, make_model, tokenizer, tiny_stream):
    trainer = _trainer(tmp_path, make_model, tokenizer)
    trainer.fit({"copy": tiny_stream["copy"]})
    export = save_continual_pretrained(trainer, tmp_path / "export")
    files = [p for p in export.rglob("*") if p.is_file()]
    assert "training_args.bin" in {p.name for p in files}
    assert [str(p) for p in files if str(tmp_path).encode() in p.read_bytes()] == []
    manifest = json.loads((export / "continual_state" / ckpt.MANIFEST).read_text())
    assert "clm_hf_continual.json" in manifest["files"]
    assert (export / "clm_hf_continual.json").read_text() == (export / "continual_state/clm_hf_continual.json").read_text()
    assert ContinualCausalLMTrainer.from_pretrained(export, output_dir=str(tmp_path / "ok")).tasks[0].task_id == "copy"

    # An edited root copy (its training arguments would be applied) is refused, naming the file.
    meta = json.loads((export / "clm_hf_continual.json").read_text())
    meta["training_args"]["learning_rate"] = 1.0
    (export / "clm_hf_continual.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="clm_hf_continual.json differs from .*continual_state"):
        ContinualCausalLMTrainer.from_pretrained(export, output_dir=str(tmp_path / "edited"))
    # A metadata file the manifest does not cover at all is refused too.
    (export / "continual_state/clm_hf_continual.json").unlink()
    path = export / "continual_state" / ckpt.MANIFEST
    manifest["files"].pop("clm_hf_continual.json")
    path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="is not covered by the manifest"):
        ContinualCausalLMTrainer.from_pretrained(export, output_dir=str(tmp_path / "loose"))


def test_from_pretrained_of_a_lora_run_folder_rebuilds_the_adapter(tmp_path, make_model, tokenizer, tiny_stream):
    import peft

    model = peft.get_peft_model(make_model("gpt2"), peft.LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                                                    fan_in_fan_out=True))
    first = ContinualCausalLMTrainer(model=model, args=small_args(tmp_path), processing_class=tokenizer,
                                     strategies=[EWC(ewc_lambda=50.0)])
    first.fit({"copy": tiny_stream["copy"]})
    assert (tmp_path / "run" / "base_model_config" / "adapter_config.json").is_file()
    again = ContinualCausalLMTrainer.from_pretrained(tmp_path / "run" / "continual" / "task-000",
                                                     output_dir=str(tmp_path / "again"))
    assert isinstance(again.model, peft.PeftModel)
    _assert_same_weights(again.model, {n: p.detach() for n, p in first.model.named_parameters()})
    assert sorted(n for n, p in again.model.named_parameters() if p.requires_grad) == sorted(
        n for n, p in first.model.named_parameters() if p.requires_grad)


def test_no_continual_state_writes_no_base_model_config(tmp_path, make_model, tokenizer, tiny_stream):
    _trainer(tmp_path, make_model, tokenizer, save_continual_state=False).fit({"copy": tiny_stream["copy"]})
    assert not (tmp_path / "run" / "base_model_config").exists()


def test_a_model_with_no_pretrained_model_inside_gets_no_base_model_config(tmp_path):
    from clm_hf.hub import write_run_base

    trainer = SimpleNamespace(model=torch.nn.Linear(2, 2), args=SimpleNamespace(should_save=True), strategies=[],
                              processing_class=None)
    assert write_run_base(trainer, tmp_path) is None and not (tmp_path / "base_model_config").exists()


def _failing_uploads(monkeypatch, fail_calls):
    """Make the fake upload raise (as a wrong token would) on the given 0-based calls; returns the call count."""
    import huggingface_hub

    calls, upload = [], huggingface_hub.HfApi.upload_folder

    def maybe_failing(self, **kwargs):
        calls.append(kwargs.get("commit_message"))
        if len(calls) - 1 in fail_calls:
            raise PermissionError("401 Client Error: Invalid credentials in Authorization header")
        return upload(self, **kwargs)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", maybe_failing)
    return calls


def test_a_failed_first_push_stops_the_run_and_names_the_task(tmp_path, fake_hub, make_model, tokenizer, tiny_stream,
                                                              monkeypatch):
    # A wrong token or repo would fail after every task of a long run: the first push raises.
    calls = _failing_uploads(monkeypatch, fail_calls={0, 1, 2})
    trainer = _trainer(tmp_path, make_model, tokenizer, push_to_hub=True, hub_model_id="tester/cl-stream")
    with pytest.raises(RuntimeError, match=r"Pushing to the Hub after task 0 \('copy'\), the first push of this run, "
                                           r"failed: 401 Client Error.*hub_model_id='tester/cl-stream'") as info:
        trainer.fit({k: tiny_stream[k] for k in ("copy", "reverse")})
    assert isinstance(info.value.__cause__, PermissionError)
    assert calls == ["clm-hf: after task 0 (copy)"] and [t.task_id for t in trainer.tasks] == ["copy"]
    assert fake_hub.uploads == []
    assert "resume with resume_from_checkpoint=True" in str(info.value)


def test_a_failed_first_push_without_continual_state_says_to_re_run(tmp_path, fake_hub, make_model, tokenizer,
                                                                    tiny_stream, monkeypatch):
    _failing_uploads(monkeypatch, fail_calls={0})
    trainer = _trainer(tmp_path, make_model, tokenizer, push_to_hub=True, hub_model_id="tester/cl-stream",
                       save_continual_state=False)
    with pytest.raises(RuntimeError, match="save_continual_state=False no continual checkpoint was written, so nothing "
                                           "can be resumed: fix the setting and re-run the stream") as info:
        trainer.fit({"copy": tiny_stream["copy"]})
    assert "resume_from_checkpoint" not in str(info.value)


def test_a_failed_later_push_is_a_warning_and_training_goes_on(tmp_path, fake_hub, make_model, tokenizer, tiny_stream,
                                                               monkeypatch, caplog):
    calls = _failing_uploads(monkeypatch, fail_calls={1})  # the Hub down after task 1 only
    trainer = _trainer(tmp_path, make_model, tokenizer, push_to_hub=True, hub_model_id="tester/cl-stream")
    with caplog.at_level("WARNING", logger="clm_hf.hub"):
        trainer.fit(tiny_stream)
    assert [t.task_id for t in trainer.tasks] == ["copy", "reverse", "sort"] and len(calls) == 3
    assert "pushing to the Hub after task 1 ('reverse') failed: 401 Client Error" in caplog.text
    assert [u["message"] for u in fake_hub.uploads] == ["clm-hf: after task 0 (copy)", "clm-hf: after task 2 (sort)"]
