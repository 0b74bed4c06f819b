"""Saving and loading the whole continual state, atomically, with safetensors and JSON only.

A continual checkpoint is a folder::

    model.safetensors          the model's weights (save_model_weights: tied weights once)
    strategies/<i>-<name>/     each strategy's own state (state.safetensors + state.json, a buffer)
    rng.safetensors            torch / numpy RNG arrays
    continual_state.json       task list, progress, strategy configs, python RNG, versions
    results.json               the score matrices so far
    manifest.json              size + sha256 of every file above, written last

It is built in a temporary sibling folder, every file is fsynced, and the folder is renamed into
place, so a crash leaves either the old checkpoint or the new one, never half of one. Loading
checks the manifest first and names the file that is missing, truncated or corrupt.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from ._io import atomic_write_dir, process_umask, respect_umask  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "continual_state.json"
MODEL_FILE = "model.safetensors"
RNG_FILE = "rng.safetensors"
RESULTS_FILE = "results.json"
STRATEGIES_DIR = "strategies"
DCP_DIR = "dcp"  # under FSDP2: the model's and the strategies' sharded tensors (torch.distributed.checkpoint)
DCP_METADATA = f"{DCP_DIR}/.metadata"
CONTINUAL_DIR = "continual"  # a run folder's end-of-task checkpoints: <output_dir>/continual/task-XXX


class CheckpointError(ValueError):
    """A continual checkpoint is missing, incomplete, corrupt or from an incompatible version."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint written in another checkpoint format: never skipped silently, always reported."""


# --- RNG -----------------------------------------------------------------------------------
def capture_rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, numpy and torch (CPU and CUDA) RNG states, split into JSON and tensors."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(py_state), gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    return meta, tensors


def restore_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# --- atomic folders and manifests ------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(root: Path) -> None:
    files = {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format_version": FORMAT_VERSION, "clm_hf_version": __version__, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify_manifest(root: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check every file listed in ``manifest.json``; raise :class:`CheckpointError` naming the bad one.

    Args:
        root: The checkpoint folder.
        required (`tuple[str]`): Files this kind of checkpoint always has (e.g. ``model.safetensors``);
            a manifest that does not list one of them is an error, even if the file is absent too.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{root} has no {MANIFEST}: it is not a complete clm-hf checkpoint.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({err}).") from err
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path} is malformed: it holds a {type(manifest).__name__}, not an object.")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{root} was written with checkpoint format {version!r} (clm-hf {manifest.get('clm_hf_version')}); "
            f"this clm-hf ({__version__}) reads format {FORMAT_VERSION}. Resume it with the clm-hf version that "
            "wrote it, or start a new run in another output_dir."
        )
    if "files" not in manifest:
        raise CheckpointError(f"{manifest_path} is malformed: it has no 'files' entry.")
    verify_files(root, manifest["files"], required=required, exclude=MANIFEST, what=str(manifest_path))
    return manifest


def describe_files(root: str | os.PathLike, exclude: str | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``root`` (but not under its sub-folder ``exclude``)."""
    root = Path(root)
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and not (exclude and p.relative_to(root).parts[0] == exclude)
    }


def confined_path(root: str | os.PathLike, rel: Any, *, what: str = "file") -> Path:
    """``root / rel``, checked to stay inside ``root``; raise :class:`CheckpointError` naming ``rel`` if not.

    A checkpoint names its own files with paths relative to its folder. An absolute path or ``..``
    components would make the loader read (hash, size, load) arbitrary local files, so they are
    refused. The check is on the path as written, not on where symbolic links lead: a Hub download
    (``snapshot_download``) is a folder of links into the cache's blob store.

    Args:
        root: The checkpoint folder.
        rel: The relative path read from the checkpoint.
        what (`str`): What the path names, for the error message.
    """
    root = Path(root)
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise CheckpointError(f"Checkpoint {root} names a {what} with an invalid path {rel!r}.")
    parts = PurePosixPath(rel.replace("\\", "/"))
    if parts.is_absolute() or PureWindowsPath(rel).drive or PureWindowsPath(rel).is_absolute():
        raise CheckpointError(f"Checkpoint {root} names a {what} by the absolute path {rel!r}; "
                              "checkpoint paths must be relative to the checkpoint folder.")
    if ".." in parts.parts:
        raise CheckpointError(f"Checkpoint {root} names a {what} {rel!r} that leads outside the checkpoint folder.")
    return root / rel


def verify_files(root: str | os.PathLike, files: Any, *, required: tuple[str, ...] = (),
                 exclude: str | None = None, what: str = "the file list") -> None:
    """Check files against :func:`describe_files` output; raise :class:`CheckpointError` naming the bad one.

    Beyond each file's size and sha256, the list itself is checked: it must be a mapping of
    relative paths inside ``root`` to ``{"size": int, "sha256": str}``, it must list every path in
    ``required``, and every file under ``root`` (but ``exclude``, a file or first-level folder
    name, hidden names and ``datasets`` cache files) must be listed, since loaders read files by name and an unlisted one
    would be read unverified.

    Args:
        root: The folder the paths are relative to.
        files: The ``{path: {"size", "sha256"}}`` mapping read from a manifest.
        required (`tuple[str]`): Paths that must be listed.
        exclude (`str`, *optional*): A name directly under ``root`` that the list does not cover.
        what (`str`): Where the list comes from, for the error messages.
    """
    root = Path(root)
    if not isinstance(files, dict):
        raise CheckpointError(f"{what} is malformed: 'files' must map paths to {{size, sha256}}, "
                              f"not be a {type(files).__name__}.")
    for rel, info in files.items():
        confined_path(root, rel, what=f"file in {what}")
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and not isinstance(info["size"], bool)
                and info["size"] >= 0 and isinstance(info.get("sha256"), str) and len(info["sha256"]) == 64):
            raise CheckpointError(f"{what} is malformed: the entry of {rel!r} must be {{'size': bytes, 'sha256': "
                                  f"64 hex digits}}, got {info!r:.200}.")
    for rel in required:
        if rel not in files:
            raise CheckpointError(f"{what} does not list {rel}, which this kind of checkpoint always has: "
                                  f"the checkpoint {root} is incomplete or its manifest was edited.")
    listed = {Path(rel) for rel in files}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        # Never loaded, so harmless: hidden names (leftovers of interrupted atomic writes, .tmp-*, .old-*)
        # and the cache-*.arrow files `datasets` writes next to a memory-mapped dataset (a replay
        # buffer, a GEM memory) when it is transformed; load_from_disk reads only the files its
        # state.json names.
        ignored = any(part.startswith(".") for part in rel.parts) or fnmatch.fnmatch(rel.name, "cache-*.arrow")
        if path.is_file() and rel not in listed and not ignored and not (exclude and rel.parts[0] == exclude):
            raise CheckpointError(f"Checkpoint {root} holds {rel.as_posix()}, which {what} does not list: "
                                  "it would be loaded unverified.")
    for rel, info in files.items():
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"Checkpoint {root} is missing {rel}.")
        if path.stat().st_size != info["size"]:
            raise CheckpointError(f"Checkpoint file {path} is truncated or changed: {path.stat().st_size} bytes, expected {info['size']}.")
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"Checkpoint file {path} is corrupt: its sha256 does not match the manifest.")


def write_atomically(final_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` in a temporary sibling, add a manifest, fsync, rename it in.

    See :func:`clm_hf._io.atomic_write_dir` for the guarantees; the manifest lets a later load
    refuse a folder damaged since.
    """

    def fill_and_list(tmp: Path) -> None:
        fill(tmp)
        write_manifest(tmp)

    return atomic_write_dir(final_dir, fill_and_list)


# --- continual checkpoint ------------------------------------------------------------------
def strategy_dir(root: Path, index: int, name: str) -> Path:
    return root / STRATEGIES_DIR / f"{index:02d}-{name}"


def save_continual_checkpoint(
    final_dir: str | os.PathLike,
    *,
    state: dict[str, Any],
    strategies: list[Any],
    model: torch.nn.Module | None,
    results: Any | None,
    extra_files: dict[str, str] | None = None,
    sharded: bool = False,
    writer: bool = True,
) -> Path:
    """Write one continual checkpoint atomically (see the module docstring for the layout).

    With ``sharded=True`` (an FSDP2 model: every rank calls this, ``writer`` on rank 0 only) the
    model's and the strategies' sharded tensors go to ``dcp/`` with ``torch.distributed.checkpoint``,
    each rank writing its own shards; see :func:`save_sharded_continual_checkpoint`.

    Args:
        final_dir: Where the checkpoint folder ends up.
        state (`dict`): JSON-able trainer progress (tasks, index, strategy configs, ...).
        strategies: The strategies; each writes its own sub-folder through ``save_state``.
        model: The model whose weights to store; ``None`` when the Trainer already saved them.
        results: A :class:`~clm_hf.results.ContinualResults` or ``None``.
        extra_files (`dict[str, str]`, *optional*): More text files (name -> content) to store in
            the checkpoint, so that its manifest covers them too.
    """
    if sharded:
        return save_sharded_continual_checkpoint(final_dir, state=state, strategies=strategies, model=model,
                                                 results=results, extra_files=extra_files, writer=writer)
    rng_meta, rng_tensors = capture_rng_state()

    def fill(tmp: Path) -> None:
        if model is not None:
            save_model_weights(model, tmp / MODEL_FILE)
        for i, strategy in enumerate(strategies):
            strategy.save_state(strategy_dir(tmp, i, strategy.name))
        _write_state_files(tmp, state, rng_meta, rng_tensors, results, extra_files)

    return write_atomically(final_dir, fill)


def _write_state_files(tmp: Path, state: dict[str, Any], rng_meta: dict[str, Any], rng_tensors: dict[str, Any],
                       results: Any, extra_files: dict[str, str] | None) -> None:
    """What one process writes into every continual checkpoint: RNG, state JSON, results, extra files."""
    save_file(rng_tensors, str(tmp / RNG_FILE))
    payload = {"format_version": FORMAT_VERSION, "clm_hf_version": __version__, "rng": rng_meta, **state}
    (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1, allow_nan=False))
    if results is not None:
        results.save(tmp / RESULTS_FILE)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")


def read_continual_state(directory: str | os.PathLike, *, with_model: bool = True) -> dict[str, Any]:
    """Verify a checkpoint and return its ``continual_state.json`` content.

    Args:
        directory: The continual checkpoint folder.
        with_model (`bool`, defaults to `True`): Whether this kind of checkpoint holds the model's
            weights (an end-of-task one does; the continual state inside a Trainer checkpoint does
            not). The manifest must list every file the kind requires: the state, the RNG, the
            weights if ``with_model``, and each strategy's ``state.json``.

    Raises:
        `CheckpointError`: naming the missing, unlisted, damaged or malformed file.
    """
    directory = Path(directory)
    required = (STATE_FILE, RNG_FILE, MODEL_FILE) if with_model else (STATE_FILE, RNG_FILE)
    if with_model and _lists(directory, DCP_METADATA):
        required = (STATE_FILE, RNG_FILE, DCP_METADATA)  # an FSDP2 run's checkpoint: the weights are in dcp/
    manifest = verify_manifest(directory, required=required)
    state_path = directory / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_path} is not valid JSON ({err}).") from err
    problem = _state_problem(state)
    if problem:
        raise CheckpointError(f"{state_path} is malformed: {problem}.")
    for i, entry in enumerate(state["strategies"]):
        # Every strategy writes a state.json (Strategy.save_state), so a missing one is damage.
        rel = (strategy_dir(Path(), i, entry["name"]) / "state.json").as_posix()
        if rel not in manifest["files"]:
            raise CheckpointError(f"The manifest of {directory} does not list {rel}: the state of strategy "
                                  f"'{entry['name']}' is missing.")
    return state


def _lists(directory: Path, rel: str) -> bool:
    """Whether the manifest of ``directory`` lists ``rel`` (False when it is missing or malformed:
    :func:`verify_manifest` then names the problem)."""
    try:
        files = json.loads((directory / MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(files, dict) and rel in files


def _state_problem(state: Any) -> str | None:
    """What is wrong with the shape of a ``continual_state.json``, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not an object"
    if not isinstance(state.get("tasks"), list) or not all(isinstance(t, dict) and "task_id" in t for t in state["tasks"]):
        return "'tasks' must be a list of task objects with a task_id"
    strategies = state.get("strategies")
    if not isinstance(strategies, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("config"), dict)
            for s in strategies):
        return "'strategies' must be a list of {name, config} objects"
    if any("/" in s["name"] or "\\" in s["name"] or s["name"] in ("", ".", "..") for s in strategies):
        return "a strategy name is not a plain name"
    if not isinstance(state.get("rng"), dict):
        return "'rng' must be an object"
    return None


# What safetensors' save_model/load_model raise for weights that are views of one flat buffer (after a
# DeepSpeed ZeRO-2 task): then the tensors are written and read one by one, ties by name.
_SHARED_VIEWS_ERROR = "covering the entire storage"


def save_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights to the safetensors file ``path`` with ``safetensors.torch.save_model``, or, where
    that refuses the model's tied weights, write each tied weight once in the same layout.

    ``save_model`` refuses tied weights that are views into a larger buffer ("None is covering the entire
    storage"): DeepSpeed ZeRO-2 keeps every weight of a parameter group as a view into one flat buffer, so
    GPT-2's tied ``lm_head.weight``/``transformer.wte.weight`` could not be saved after a ZeRO-2 task. Then
    names that are the same view (same address, shape, stride and dtype) are written once, under the name
    ``save_model`` keeps (the first in sorted order), the others recorded in the metadata as it does;
    :func:`load_model_weights` restores the tie.

    Args:
        model (`torch.nn.Module`): The model whose ``state_dict()`` to write.
        path (`str` or `os.PathLike`): The ``.safetensors`` file to write.

    Example:

    >>> import tempfile, torch
    >>> flat = torch.arange(6.0)
    >>> model = torch.nn.Module()
    >>> model.a, model.b = torch.nn.Parameter(flat[:4].view(2, 2)), torch.nn.Parameter(flat[4:])
    >>> model.c = model.a  # tied, and a view into a larger buffer
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_model_weights(model, path)
    >>> from safetensors import safe_open
    >>> with safe_open(str(path), "pt") as f:
    ...     sorted(f.keys()), sorted(f.metadata().items())
    (['a', 'b'], [('c', 'a'), ('format', 'pt')])
    """
    from safetensors.torch import save_file, save_model

    try:
        save_model(model, str(path))
        return
    except RuntimeError as err:
        if _SHARED_VIEWS_ERROR not in str(err):
            raise
    tensors = model.state_dict()
    kept: dict[tuple, str] = {}
    metadata = {"format": "pt"}
    for name in sorted(tensors):
        tensor = tensors[name]
        view = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and view in kept:
            metadata[name] = kept[view]
        else:
            kept.setdefault(view, name)
    # Views of one buffer that do not overlap are saved as they are; overlapping ones that are not the same
    # view make save_file raise.
    save_file({name: tensors[name].detach().contiguous() for name in tensors if name not in metadata}, str(path),
              metadata=metadata)


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load the weights :func:`save_model_weights` wrote into ``directory`` back into ``model``, in place.

    ``safetensors.torch.load_model`` refuses the same tied views into one buffer that ``save_model`` does;
    then the file is read with ``load_file``, every tied name given its kept tensor (the metadata says
    which), and copied into the model with ``load_state_dict``.

    Args:
        model (`torch.nn.Module`): The model to fill.
        directory (`str` or `os.PathLike`): The checkpoint folder holding ``model.safetensors``.

    Raises:
        CheckpointError: The file's names do not fit the model's (missing or unexpected weights).

    Example:

    >>> import tempfile, torch
    >>> model = torch.nn.Linear(2, 2)
    >>> folder = Path(tempfile.mkdtemp()); save_model_weights(model, folder / MODEL_FILE)
    >>> other = torch.nn.Linear(2, 2); load_model_weights(other, folder)
    >>> torch.equal(other.weight, model.weight)
    True
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    path = Path(directory) / MODEL_FILE
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as err:
        if _SHARED_VIEWS_ERROR not in str(err):
            raise
        with safe_open(str(path), "pt") as f:  # one read: the tensors and the tie aliases of the metadata
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            aliases = {k: v for k, v in (f.metadata() or {}).items() if k != "format"}
        tensors.update({alias: tensors[kept] for alias, kept in aliases.items() if kept in tensors})
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"The weights in {path} do not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}. "
            "Was the checkpoint written for another model or strategy set?"
        )


# --- sharded continual checkpoints (FSDP2) ---------------------------------------------------------
def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict for DCP, keyed ``model/<name>``: DTensors (this rank's shards) under FSDP2."""
    from .sharding import reshard

    reshard(model)  # after an evaluation FSDP2 may hold the root's unsharded copies in the parameters' places
    return {f"model/{name}": tensor for name, tensor in model.state_dict().items()}


def _sharded_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's DTensor parameters by name (empty when the model is not sharded)."""
    from .sharding import is_dtensor, reshard

    return {name: p for name, p in reshard(model).named_parameters() if is_dtensor(p)}


def _strategy_scope(index: int, name: str) -> str:
    return strategy_dir(Path(), index, name).as_posix()


def save_sharded_continual_checkpoint(
    final_dir: str | os.PathLike,
    *,
    state: dict[str, Any],
    strategies: list[Any],
    model: torch.nn.Module | None,
    results: Any | None,
    extra_files: dict[str, str] | None = None,
    writer: bool = True,
) -> Path:
    """Write a continual checkpoint of an FSDP2-sharded run: a collective, every rank calls it.

    The layout is the unsharded one, except that the weights and every sharded (DTensor) strategy
    tensor are in ``dcp/``, written with ``torch.distributed.checkpoint`` (each rank its own shards,
    ``dcp/.metadata`` by rank 0); ``state.json`` of a strategy names each of its sharded tensors with
    a ``{"__sharded__": key}`` marker. Rank 0 (``writer``) creates the temporary sibling folder and
    broadcasts its name so that every rank writes into it, writes the JSON state, RNG and results,
    and, after a barrier, the manifest of every file (all ranks' shards included), last; the folder
    is then renamed into place as in :func:`clm_hf._io.atomic_write_dir`. Every rank must see the
    same file system path (one node, or a shared file system).

    Args:
        final_dir: Where the checkpoint folder ends up.
        state (`dict`): JSON-able trainer progress.
        strategies: The strategies (every rank passes its own, in the same order).
        model: The FSDP2-sharded model; ``None`` for the continual state inside a mid-task Trainer
            checkpoint, whose weights the Trainer (Accelerate's sharded FSDP save) already wrote.
        results: A :class:`~clm_hf.results.ContinualResults` or ``None``.
        extra_files (`dict[str, str]`, *optional*): More text files written by rank 0.
        writer (`bool`): True on the one rank that writes everything but the shards (rank 0).

    Example:

    >>> save_sharded_continual_checkpoint("out/continual/task-000", state=state,  # doctest: +SKIP
    ...     strategies=trainer.strategies, model=model, results=None, writer=trainer.args.should_save)
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from .strategies.base import _split, sharded_state_io

    def collect(tmp: Path | None) -> dict[str, torch.Tensor]:
        tensors = _model_tensors(model) if model is not None else {}
        for i, strategy in enumerate(strategies):
            scope = _strategy_scope(i, strategy.name)
            with sharded_state_io(scope, collect=tensors):
                if tmp is not None:
                    strategy.save_state(strategy_dir(tmp, i, strategy.name))
                else:  # the other ranks only take their shards; rank 0 writes the rest
                    _split(strategy.state_dict(), "", {})
        keys: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(keys, sorted(tensors))
        if any(k != keys[0] for k in keys):
            differ = sorted(set(keys[0]).symmetric_difference(*map(set, keys[1:])))[:5]
            raise RuntimeError(f"The ranks hold different sharded tensors for the continual checkpoint {final_dir}: "
                               f"{differ}. A strategy's save_state must store what its state_dict() returns.")
        return tensors

    def shared_name(tmp: Path | None) -> Path:
        names = [str(tmp) if tmp is not None else None]
        dist.broadcast_object_list(names, src=0)
        if names[0] is None:
            raise RuntimeError(f"Rank 0 could not create the temporary folder of the checkpoint {final_dir}.")
        return Path(names[0])

    def write_shards(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
        dcp.save(tensors, checkpoint_id=str(tmp / DCP_DIR))
        dist.barrier()  # every rank's shards are on disk before rank 0 lists and hashes them

    if not writer:
        tmp = shared_name(None)
        write_shards(tmp, collect(None))
        status = [None]
        dist.broadcast_object_list(status, src=0)  # rank 0's rename (or failure) before anyone goes on
        if status[0] != "ok":
            raise RuntimeError(f"Rank 0 failed to write the continual checkpoint {final_dir}: {status[0]}")
        return Path(final_dir)

    rng_meta, rng_tensors = capture_rng_state()
    announced = [False]

    def fill(tmp: Path) -> None:
        shared_name(tmp)
        announced[0] = True
        write_shards(tmp, collect(tmp))
        _write_state_files(tmp, state, rng_meta, rng_tensors, results, extra_files)
        write_manifest(tmp)  # last: it covers every rank's shards

    try:
        path = atomic_write_dir(final_dir, fill)
    except BaseException as err:
        if not announced[0]:
            shared_name(None)  # releases the other ranks waiting for the folder's name (they raise)
        dist.broadcast_object_list([f"{type(err).__name__}: {err}"], src=0)
        raise
    dist.broadcast_object_list(["ok"], src=0)
    return path


def is_sharded_checkpoint(directory: str | os.PathLike) -> bool:
    """True when the checkpoint keeps its weights in ``dcp/`` (written by an FSDP2-sharded run)."""
    return (Path(directory) / DCP_METADATA).is_file()


def load_continual_tensors(directory: str | os.PathLike, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Read the strategies' sharded tensors of a checkpoint's ``dcp/`` folder, resharded for ``model``.

    DCP reshards on load: a tensor named after a sharded parameter of ``model`` (its key ends in the
    parameter's name, e.g. ``.../fisher/<name>``) with the same shape is read as a DTensor laid out
    like that parameter (each rank reads its own slice, whatever world size wrote it); any other,
    and every tensor when ``model`` is not sharded, is read whole. A collective when ``model`` is
    sharded. Returns ``{}`` for an unsharded checkpoint.

    Args:
        directory: The continual checkpoint folder.
        model: The model of the resuming run (sharded with FSDP2 or not).

    Example:

    >>> load_continual_tensors("out/continual/task-000", trainer.model)  # doctest: +SKIP
    {'strategies/00-ewc/terms/0/fisher/transformer.wte.weight': DTensor(...), ...}
    """
    if not is_sharded_checkpoint(directory):
        return {}
    import torch.distributed.checkpoint as dcp

    from .sharding import like_param, local_part

    params = _sharded_params(model)
    metadata = dcp.FileSystemReader(str(Path(directory) / DCP_DIR)).read_metadata()
    targets: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(STRATEGIES_DIR + "/"):
            continue
        like = params.get(key.rsplit("/", 1)[-1])
        if like is not None and tuple(like.shape) == tuple(meta.size):
            local = local_part(like)
            targets[key] = like_param(torch.empty(local.shape, dtype=meta.properties.dtype, device=local.device), like)
        else:
            targets[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    if targets:
        dcp.load(targets, checkpoint_id=str(Path(directory) / DCP_DIR))
    return targets


def plain_to_sharded(model: torch.nn.Module) -> Callable[[str, torch.Tensor], torch.Tensor] | None:
    """For a checkpoint written unsharded and read into an FSDP2 run: a function that shards each
    strategy tensor named after a sharded parameter (same shape) like that parameter. ``None`` when
    ``model`` is not sharded."""
    from .sharding import shard_like

    params = _sharded_params(model)
    if not params:
        return None

    def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:
        like = params.get(key.rsplit("/", 1)[-1])
        return shard_like(tensor, like) if like is not None and like.shape == tensor.shape else tensor

    return convert


def load_sharded_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint's weights into ``model``, across layouts: ``dcp/`` (sharded) or ``model.safetensors``.

    A sharded checkpoint is read with ``torch.distributed.checkpoint`` into the model's own state
    dict (DTensors under FSDP2, whole tensors otherwise), in place: DCP reshards to the current world
    size. A ``model.safetensors`` read into an FSDP2 model is sharded like each parameter. A plain
    model with a plain checkpoint goes through :func:`load_model_weights`.

    Raises:
        `CheckpointError`: the weights do not fit the model (names listed).
    """
    directory = Path(directory)
    params = _sharded_params(model)
    if not is_sharded_checkpoint(directory) and not params:
        load_model_weights(model, directory)
        return
    targets = _model_tensors(model)
    if is_sharded_checkpoint(directory):
        import torch.distributed.checkpoint as dcp

        saved = {k for k in dcp.FileSystemReader(str(directory / DCP_DIR)).read_metadata().state_dict_metadata
                 if k.startswith("model/")}
        missing, unexpected = sorted(set(targets) - saved), sorted(saved - set(targets))
        if missing or unexpected:
            raise CheckpointError(f"The weights in {directory / DCP_DIR} do not fit the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}. Was the checkpoint written for another model or "
                                  "strategy set?")
        dcp.load(targets, checkpoint_id=str(directory / DCP_DIR))  # in place, into the parameters' storage
        return
    from .sharding import local_part, shard_like

    full = load_file(str(directory / MODEL_FILE))
    for key, tensor in targets.items():
        name = key[len("model/"):]
        if name not in full:  # a tied weight: safetensors stores one name of each shared storage
            ptr = local_part(tensor).data_ptr()
            twin = next((k[len("model/"):] for k, t in targets.items()
                         if local_part(t).data_ptr() == ptr and k[len("model/"):] in full), None)
            if twin is None:
                raise CheckpointError(f"The weights in {directory / MODEL_FILE} do not fit the model: missing {name!r}.")
            name = twin
        with torch.no_grad():
            local_part(tensor).copy_(local_part(shard_like(full[name].to(tensor.dtype), tensor)))


def load_rng(directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    restore_rng_state(meta, load_file(str(Path(directory) / RNG_FILE)))


def list_checkpoints(run_dir: str | os.PathLike, pattern: str = "task-*") -> list[Path]:
    """Checkpoint folders under ``run_dir`` (not temporaries), oldest first by their number."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.glob(pattern) if p.is_dir() and not p.name.startswith(".")), key=checkpoint_sort_key)


def checkpoint_sort_key(path: Path) -> tuple[int, str]:
    """Sort key of ``task-7`` / ``checkpoint-120`` folders: by the number, so ``task-1000`` follows ``task-999``."""
    match = re.search(r"-(\d+)$", path.name)
    return (int(match.group(1)) if match else -1, path.name)


def latest_valid_checkpoint(candidates: list[Path], damaged: list[tuple[Path, CheckpointError]] | None = None
                            ) -> Path | None:
    """The newest folder of ``candidates`` that verifies as an end-of-task checkpoint; damaged ones are reported.

    Args:
        candidates: Checkpoint folders, oldest first.
        damaged (`list`, *optional*): Receives ``(folder, error)`` for each damaged folder skipped.
    """
    for path in reversed(candidates):
        try:
            read_continual_state(path, with_model=True)
            return path
        except CheckpointVersionError:
            raise  # another format is not damage: falling back to an older checkpoint would hide it
        except CheckpointError as err:
            logger.warning("Skipping unusable checkpoint %s: %s", path, err)
            if damaged is not None:
                damaged.append((path, err))
    return None


# --- interrupted swaps ---------------------------------------------------------------------------
def recover_interrupted_swaps(parent: str | os.PathLike) -> list[Path]:
    """Finish what :func:`write_atomically` left when a kill stopped it, for the folders in ``parent``.

    Replacing an existing checkpoint moves it to ``.old-<name>-<pid>`` before the new copy is
    renamed in; a kill between the two renames leaves only the ``.old-*`` folder, which is complete
    (its manifest was verified when it was written). It is put back under its name; when the new
    copy did arrive, the leftover is removed, and so are unfinished ``.tmp-*`` folders. Call this
    only while holding the run's :class:`RunLock`, so that no other writer is half-way through.

    Returns:
        `list[pathlib.Path]`: the folders put back.
    """
    parent = Path(parent)
    restored: list[Path] = []
    if not parent.is_dir():
        return restored
    for old in sorted(parent.glob(".old-*")):
        if not old.is_dir():
            continue
        final = parent / old.name[len(".old-"):].rsplit("-", 1)[0]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # the swap finished; only the clean-up was cut short
        else:
            os.replace(old, final)
            restored.append(final)
            logger.warning("clm-hf: put back %s: a kill interrupted its replacement (%s was left).", final, old.name)
    for tmp in parent.glob(".tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    return restored


# --- one writer per run folder ---------------------------------------------------------------------
LOCK_FILE = ".clm_hf.lock"


class RunLockError(RuntimeError):
    """Another live process holds the lock of a run folder."""


class OutputDirInUseError(FileExistsError):
    """A new run's ``output_dir`` holds another run's continual checkpoints (a user's choice to fix: resume the run,
    pass ``overwrite_output_dir=True`` or choose another folder); the command line shows it as one line."""


class RunLock:
    """An advisory lock on a run folder: ``<output_dir>/.clm_hf.lock`` holding the owner's pid and host.

    The file is created atomically with its content (a hard link of a finished temporary file), so
    a reader never sees an empty lock. A lock whose process is dead (same host, pid gone) is taken
    over; a lock of a live process, or of another host (whose pid cannot be checked), raises
    :class:`RunLockError` naming the holder. Taking a lock this process already holds succeeds.

    Example:

    >>> lock = RunLock("runs/x").acquire()  # doctest: +SKIP
    >>> lock.release()  # doctest: +SKIP
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    @staticmethod
    def _me() -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def holder(self) -> dict[str, Any] | None:
        """The content of the lock file, or ``None`` when there is none (or it is unreadable)."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @classmethod
    def _alive(cls, holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # another machine's pid cannot be checked: assume it runs
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OverflowError, ValueError):
            return True  # a process of another user (or a pid we cannot test): leave it alone
        return True

    def acquire(self) -> "RunLock":
        """Take the lock, taking over a stale one; raise :class:`RunLockError` if a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {**self._me(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        for _ in range(5):
            fd, tmp = tempfile.mkstemp(prefix=".clm_hf.lock-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(me, handle)
                try:
                    os.link(tmp, self.path)  # fails when the lock exists: creation and content in one step
                except FileExistsError:
                    raise
                except OSError:  # a file system without hard links: exclusive create, then write
                    with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as handle:
                        json.dump(me, handle)
                self.held = True
                return self
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            holder = self.holder()
            if holder is not None and {k: holder.get(k) for k in ("pid", "host")} == self._me():
                self.held = True  # this process took it already (an earlier trainer on this folder)
                return self
            if holder is not None and self._alive(holder):
                raise RunLockError(
                    f"{self.path.parent} is in use by another clm-hf run: process {holder.get('pid')} on host "
                    f"{holder.get('host')!r} (since {holder.get('started', '?')}) holds {self.path}. Two processes "
                    "writing one output_dir would mix their checkpoints. Wait for it to finish or use another "
                    f"output_dir; if that process is gone (for instance it ran on another machine), delete {self.path}."
                )
            self._break_stale(holder)
        raise RunLockError(f"Could not take the lock {self.path}: other processes keep taking it. Use another output_dir.")

    def _break_stale(self, stale: dict[str, Any] | None) -> None:
        """Move a dead process's lock aside; put it back if another process replaced it meanwhile."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed it first; try again
        try:
            taken = json.loads(aside.read_text())
        except (OSError, ValueError):
            taken = None
        if stale is not None and taken != stale:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # a live lock moved by mistake: restore it unless replaced
        else:
            logger.warning("clm-hf: took over the stale lock %s of process %s, which is no longer running.",
                           self.path, (stale or {}).get("pid"))
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held and {k: (self.holder() or {}).get(k) for k in ("pid", "host")} == self._me():
            self.path.unlink(missing_ok=True)
        self.held = False
