"""The model side of Progressive Neural Networks (Rusu et al. 2016, https://arxiv.org/abs/1606.04671)
for Hugging Face transformers: :class:`ProgressiveModel`, a stack of columns joined by lateral adapters.

Column ``k`` is a whole copy of the language model. Every earlier column is frozen. Column ``k``
reads the hidden states of all earlier columns through one lateral adapter per transformer block:
the output of block ``l`` of column ``k`` becomes

    h_l^(k) = block_l^(k)(h_{l-1}^(k)) + U_l^(k) σ(V_l^(k) (α_l^(k) · [h_l^(1); …; h_l^(k-1)]))

where ``h_l^(j)`` is the output of block ``l`` of column ``j`` (itself computed with its own laterals).
The sum is what block ``l+1`` of column ``k`` reads (the last block's feeds the final norm and the LM
head), i.e. the term ``U σ(V α h_{i-1}^(<k))`` that the paper adds to the input of layer ``i``
(its eq. 2, the "adapter" form with a learned scale α and a rank-``r`` projection V). ``U`` starts
at zero, so a new column starts as exactly the network it was initialised from.

For encoder-decoder models (T5) the encoder blocks read the old encoders' block outputs and the
decoder blocks the old decoders' ones; every column sees the same inputs and decoder inputs.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}

# Keyword arguments that only concern the loss, the cache or the returned outputs: earlier columns
# only need their block outputs, so these are not passed to them.
_NOT_FOR_OLD_COLUMNS = {
    "labels", "num_items_in_batch", "use_cache", "past_key_values", "return_dict", "output_attentions",
    "output_hidden_states", "logits_to_keep", "return_loss", "decoder_head_mask", "cross_attn_head_mask",
}


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of a model, in execution order, as ``(name, module)`` pairs.

    Blocks are the modules of the outermost ``nn.ModuleList``s whose entries all have the same
    class: ``transformer.h`` (GPT-2), ``model.layers`` (Llama, Mistral, Qwen, ...), and
    ``encoder.block`` then ``decoder.block`` (T5). Lists nested inside a block (T5's sub-layers,
    mixture-of-experts experts) are not blocks.

    Raises:
        `ValueError`: if the model has no such list.

    Example:

    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model
    >>> [name for name, _ in find_blocks(build_tiny_model("gpt2", build_tokenizer()))]
    ['transformer.h.0', 'transformer.h.1']
    """
    blocks: list[tuple[str, nn.Module]] = []
    selected: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer in selected):
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(p.numel() for p in module[0].parameters()):
            continue
        selected.append(name)
        blocks += [(f"{name}.{i}" if name else str(i), child) for i, child in enumerate(module)]
    if not blocks:
        raise ValueError(
            f"PNN found no transformer blocks in {type(model).__name__}: it looks for an nn.ModuleList of "
            "identical blocks (e.g. transformer.h, model.layers, encoder.block/decoder.block)."
        )
    return blocks


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"PNN needs the hidden size of {type(model).__name__}: its config has no hidden_size.")


class LateralAdapter(nn.Module):
    """One lateral connection into a block of column ``k``: ``U σ(V (α [h^(1); …; h^(k-1)]))``.

    Args:
        num_sources (`int`): Number of earlier columns feeding it (``k``).
        hidden_size (`int`): Width of every column's hidden states.
        rank (`int`): Bottleneck width of ``V`` (the paper's dimensionality reduction).
        activation (`str`): ``σ``, one of :data:`ACTIVATIONS`.

    ``U`` (``up``) is zero-initialised, so the adapter outputs zero until it is trained.
    """

    def __init__(self, num_sources: int, hidden_size: int, rank: int, activation: str = "gelu", *,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown lateral activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        self.num_sources = num_sources
        self.activation = activation
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as bytes (a 0-dim tensor
        # cannot be viewed so) and FSDP2 shards along dim 0.
        self.alpha = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        self.down = nn.Linear(num_sources * hidden_size, rank, device=device, dtype=dtype)
        self.up = nn.Linear(rank, hidden_size, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and alpha.dim() == 0:  # saved before alpha became shape (1,)
            state_dict[prefix + "alpha"] = alpha.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, sources: list[torch.Tensor]) -> torch.Tensor:
        if len(sources) != self.num_sources:
            raise ValueError(f"This lateral adapter reads {self.num_sources} columns, got {len(sources)}.")
        x = sources[0] if len(sources) == 1 else torch.cat(sources, dim=-1)
        return self.up(ACTIVATIONS[self.activation](self.down(self.alpha * x)))


class _BlockHook:
    """Forward hook of block ``block`` of column ``column``: adds the laterals, records the output.

    It holds only the owner and two integers, so a deep copy of the whole :class:`ProgressiveModel`
    gets hooks pointing at the copy.
    """

    def __init__(self, owner: "ProgressiveModel", column: int, block: int) -> None:
        self.owner, self.column, self.block = owner, column, block

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        return self.owner._on_block_output(self.column, self.block, output)


@dataclass
class _Run:
    """One routed forward pass: the target column and the block outputs of the columns before it."""

    target: int
    states: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)


class ProgressiveModel(nn.Module):
    """Columns of a language model joined by lateral adapters, with the forward of a HF model.

    ``model(input_ids=..., attention_mask=..., labels=..., **kwargs)`` runs the earlier columns
    under ``torch.no_grad`` (collecting their block outputs), then the active column with its
    laterals, and returns the active column's own output (``.loss``, ``.logits``, ...). Keyword
    arguments such as ``num_items_in_batch`` reach the active column unchanged.

    Args:
        model (`PreTrainedModel`): Column 0 (used as is, not copied).
        lateral_rank (`int`): Bottleneck width of each lateral adapter.
        activation (`str`): Non-linearity of the adapters (see :data:`ACTIVATIONS`).
        column_init (`str`): How :meth:`add_column` initialises a column: ``"copy"`` (a copy of the
            newest column) or ``"fresh"`` (random weights from the model's config, as in the paper).

    Example:

    >>> import torch
    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model
    >>> pnn = ProgressiveModel(build_tiny_model("gpt2", build_tokenizer()), lateral_rank=8)
    >>> pnn.add_column()
    1
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> with torch.no_grad():
    ...     out = pnn.eval()(input_ids=ids, labels=ids)
    ...     with pnn.use_column(0):
    ...         old = pnn(input_ids=ids).logits
    >>> torch.equal(out.logits, old)  # a copied column with zero-initialised laterals starts identical
    True
    """

    main_input_name = "input_ids"

    def __init__(self, model: nn.Module, *, lateral_rank: int = 32, activation: str = "gelu",
                 column_init: str = "copy") -> None:
        super().__init__()
        if column_init not in ("copy", "fresh"):
            raise ValueError(f"column_init must be 'copy' or 'fresh', got {column_init!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown lateral activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        self.lateral_rank = lateral_rank
        self.activation = activation
        self.column_init = column_init
        self.hidden_size = _hidden_size(model)
        self.num_blocks = len(find_blocks(model))
        # The parameters the user left trainable: each new column trains the same ones.
        self._trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.columns = nn.ModuleList([model])
        self.laterals = nn.ModuleList([nn.ModuleList()])  # laterals[k] feed column k; column 0 has none
        self.active_column: int | None = None  # None: the newest column
        self._run: _Run | None = None
        self._install_hooks(0)

    # --- structure ------------------------------------------------------------------------------
    @property
    def num_columns(self) -> int:
        return len(self.columns)

    @property
    def current_column(self) -> int:
        """The column a forward pass runs: the one :meth:`use_column` set, else the newest."""
        return self.num_columns - 1 if self.active_column is None else self.active_column

    def add_column(self) -> int:
        """Append a column (and its laterals from every earlier column); freeze all earlier ones.

        Returns:
            `int`: The new column's index.
        """
        source = self.columns[-1]
        # Under FSDP2 the model's parameters are DTensors and its blocks carry FSDP2's hooks (FSDP2
        # refuses a deep copy): the new column is then built on the meta device and sharded below.
        sharded = _sharded_parameter(self)
        if self.column_init == "copy" and sharded is not None:
            column = _meta_like(source)  # filled from the previous column's shards once sharded
        elif self.column_init == "copy":
            self._remove_hooks(len(self.columns) - 1)  # hooks must not be copied along
            try:
                column = copy.deepcopy(source)
            finally:
                self._install_hooks(len(self.columns) - 1)
        else:
            column = _fresh_like(source)
        reference = next(source.parameters())
        index = len(self.columns)
        blocks = find_blocks(column)
        if len(blocks) != self.num_blocks:
            raise ValueError(f"Column {index} has {len(blocks)} blocks, column 0 has {self.num_blocks}.")
        adapters = nn.ModuleList(
            LateralAdapter(index, self.hidden_size, self.lateral_rank, self.activation,
                           device=reference.device, dtype=reference.dtype)
            for _ in blocks
        )
        self.columns.append(column)
        self.laterals.append(adapters)
        self._install_hooks(index)
        if sharded is not None:
            _shard_column(column, adapters, _unit_options(self, sharded))
            if self.column_init == "copy":
                _fill_from(column, source, reference.device)
        self._freeze_old_columns()
        self.train(self.training)
        return index

    def _freeze_old_columns(self) -> None:
        newest = self.num_columns - 1
        for k, (column, adapters) in enumerate(zip(self.columns, self.laterals)):
            for name, p in column.named_parameters():
                p.requires_grad_(k == newest and name in self._trainable_names)
            adapters.requires_grad_(k == newest)

    def train(self, mode: bool = True) -> "ProgressiveModel":
        """Set the train flag; frozen columns always stay in eval mode (no dropout in their features)."""
        super().train(mode)
        for column in self.columns[:-1]:
            column.eval()
        return self

    @contextlib.contextmanager
    def use_column(self, index: int) -> Iterator["ProgressiveModel"]:
        """Route forward passes through column ``index`` (and its laterals from columns < ``index``)."""
        if not 0 <= index < self.num_columns:
            raise IndexError(f"Column {index} does not exist; this model has {self.num_columns} column(s).")
        previous, self.active_column = self.active_column, index
        try:
            yield self
        finally:
            self.active_column = previous

    # --- hooks ------------------------------------------------------------------------------------
    def _install_hooks(self, column: int) -> None:
        for b, (_, block) in enumerate(find_blocks(self.columns[column])):
            block.register_forward_hook(_BlockHook(self, column, b))

    def _remove_hooks(self, column: int) -> None:
        for _, block in find_blocks(self.columns[column]):
            for key in [k for k, hook in block._forward_hooks.items() if isinstance(hook, _BlockHook)]:
                del block._forward_hooks[key]

    def _on_block_output(self, column: int, block: int, output: Any) -> Any:
        run = self._run
        if run is None or column > run.target:
            return None
        is_tuple = isinstance(output, tuple)
        hidden = output[0] if is_tuple else output
        if column > 0:
            sources = []
            for j in range(column):
                state = run.states[j][block]
                if state is None:
                    raise RuntimeError(f"PNN: block {block} of column {j} did not run before column {column} needed it.")
                sources.append(state)
            hidden = hidden + self.laterals[column][block](sources)
        if column < run.target:
            run.states[column][block] = hidden
        if column == 0:
            return None
        return (hidden, *output[1:]) if is_tuple else hidden

    def _pre_hook(self, target: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if args:
                if len(args) > 1 or "input_ids" in kwargs:
                    raise TypeError("PNN columns take their inputs as keyword arguments.")
                kwargs = {"input_ids": args[0], **kwargs}
            self._run_old_columns(target, kwargs)

        return hook

    def _run_old_columns(self, target: int, kwargs: dict[str, Any]) -> None:
        for name in ("past_key_values", "encoder_outputs"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(
                    f"PNN column {target} reads the hidden states of {target} earlier column(s), which `{name}` "
                    "does not provide: run full sequences (use_cache=False)."
                )
        inputs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_OLD_COLUMNS}
        seq2seq = self.is_encoder_decoder
        if seq2seq and inputs.get("decoder_input_ids") is None and inputs.get("decoder_inputs_embeds") is None:
            labels = kwargs.get("labels")
            if labels is None:
                raise ValueError("A seq2seq PNN forward needs decoder_input_ids or labels.")
            inputs["decoder_input_ids"] = self.prepare_decoder_input_ids_from_labels(labels=labels)
        inputs["use_cache"] = False
        # Columns run in order, each reading the states of those before it (its own laterals).
        # A causal LM's backbone is enough (no LM head); a seq2seq column runs whole.
        self._run = _Run(target, {j: [None] * self.num_blocks for j in range(target)})
        with torch.no_grad():
            for j in range(target):
                column = self.columns[j]
                backbone = column if seq2seq else getattr(column, "base_model", column)
                with _gathered_unit(column, skipped=backbone is not column):
                    backbone(**inputs)

    @contextlib.contextmanager
    def _routing(self, target: int) -> Iterator[None]:
        self._run = None
        if target == 0:
            yield
            return
        column = self.columns[target]
        handle = column.register_forward_pre_hook(self._pre_hook(target), with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            # Gradient checkpointing re-runs the blocks during backward: keep the old columns'
            # states until the next forward pass so that the recomputation adds the same laterals.
            keep = self.training and torch.is_grad_enabled() and _checkpointing(column)
            if not keep:
                self._run = None

    # --- the HF surface ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The active column's forward (same arguments and output), with the lateral inputs added."""
        named = {
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask,
            "token_type_ids": token_type_ids, "position_ids": position_ids, "inputs_embeds": inputs_embeds,
        }
        inputs = {k: v for k, v in named.items() if v is not None}
        inputs.update(kwargs)
        target = self.current_column
        with self._routing(target):
            return self.columns[target](**inputs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the active column, with its laterals (causal LMs; no KV cache past column 0)."""
        target = self.current_column
        if target > 0:
            if self.is_encoder_decoder:
                raise NotImplementedError("PNN generate() with laterals supports causal LMs only; score seq2seq "
                                          "columns with teacher forcing (clm_hf.evaluation.evaluate_lm).")
            if kwargs.get("use_cache"):
                raise ValueError("PNN columns after the first generate without a KV cache: drop use_cache=True.")
            kwargs["use_cache"] = False
        with self._routing(target):
            return self.columns[target].generate(*args, **kwargs)

    @property
    def config(self) -> Any:
        """The active column's config (every column has the same architecture)."""
        return self.columns[self.current_column].config

    @property
    def generation_config(self) -> Any:
        return getattr(self.columns[self.current_column], "generation_config", None)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.columns[0].config, "is_encoder_decoder", False))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self.columns[self.current_column].prepare_decoder_input_ids_from_labels(labels=labels)

    def get_input_embeddings(self) -> nn.Module:
        return self.columns[self.current_column].get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.columns[self.current_column].get_output_embeddings()

    def can_generate(self) -> bool:
        return bool(getattr(self.columns[0], "can_generate", lambda: False)())

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Turn activation (gradient) checkpointing on in every column; the laterals are recomputed too."""
        for column in self.columns:
            if hasattr(column, "activation_checkpointing_enable"):
                column.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
            else:  # transformers before activation_* names
                column.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        for column in self.columns:
            if hasattr(column, "activation_checkpointing_disable"):
                column.activation_checkpointing_disable()
            else:
                column.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return _checkpointing(self.columns[-1])

    @property
    def is_gradient_checkpointing(self) -> bool:
        return _checkpointing(self.columns[-1])

    # --- state dict: tied weights appear once ------------------------------------------------------
    def _aliases(self) -> dict[str, str]:
        """``{alias: canonical name}`` for tensors registered under several names (tied embeddings)."""
        seen: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for name, tensor in [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]:
            if id(tensor) in seen:
                aliases[name] = seen[id(tensor)]
            else:
                seen[id(tensor)] = name
        return aliases

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The usual state dict without the second name of tied tensors.

        ``safetensors.torch.save_file`` (which the Trainer uses for a model that is not a
        ``PreTrainedModel``) refuses tensors that share memory; :meth:`load_state_dict` fills the
        aliases back in, so strict loading still works.
        """
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for alias in self._aliases():
            state.pop(prefix + alias, None)
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        state_dict = dict(state_dict)
        for alias, canonical in self._aliases().items():
            if alias not in state_dict and canonical in state_dict:
                state_dict[alias] = state_dict[canonical]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def parameter_counts(self) -> dict[str, int]:
        """Unique parameters in total and those that train now (the newest column and its laterals)."""
        params = list(self.parameters())
        return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def _checkpointing(column: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, without transformers' deprecated name."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(column), attr):
            return bool(getattr(column, attr))
    return False


def _fresh_like(column: nn.Module) -> nn.Module:
    """A randomly initialised model of the same class and config, on the same device and dtype."""
    config = getattr(column, "config", None)
    if config is None:
        raise ValueError("column_init='fresh' needs a Hugging Face model (with a config) to build new columns from.")
    reference = next(column.parameters())
    fresh = type(column)(copy.deepcopy(config))
    return fresh.to(device=reference.device, dtype=reference.dtype)


# --- FSDP2: a new column is built on the meta device and sharded like the rest of the model ----------
def _sharded_parameter(model: nn.Module) -> torch.Tensor | None:
    """A DTensor parameter of ``model`` when FSDP2 has sharded it, else ``None``."""
    from ..sharding import is_dtensor, reshard

    reshard(model)  # after an evaluation FSDP2 may hold unsharded plain copies in the parameters' places
    return next((p for p in model.parameters() if is_dtensor(p)), None)


def _meta_like(source: nn.Module) -> nn.Module:
    """A column of ``source``'s class and config on the meta device (no memory, no random draws),
    each parameter in ``source``'s dtype; :func:`_fill_from` gives it ``source``'s values.

    Not drawing keeps the RNG stream that of an unsharded run, whose deep copy draws nothing.
    """
    config = getattr(source, "config", None)
    if config is None:
        raise ValueError(f"PNN under FSDP2 builds new columns from the model's config; {type(source).__name__} has none.")
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        column = type(source)(copy.deepcopy(config))
    _check_same_parameters(column, source)
    wanted = dict(source.named_parameters())
    for name, param in column.named_parameters():
        if param.dtype != wanted[name].dtype:
            param.data = param.data.to(wanted[name].dtype)
    if getattr(source, "generation_config", None) is not None:
        column.generation_config = copy.deepcopy(source.generation_config)
    column.train(source.training)
    return column


def _check_same_parameters(column: nn.Module, source: nn.Module) -> None:
    mine, theirs = {n for n, _ in column.named_parameters()}, {n for n, _ in source.named_parameters()}
    if mine != theirs:
        raise RuntimeError(
            f"PNN under FSDP2: a column rebuilt from the config of {type(source).__name__} does not have the "
            f"parameters of the previous one (only there: {sorted(theirs - mine)[:5]}, only in the rebuilt column: "
            f"{sorted(mine - theirs)[:5]})."
        )


def _fill_from(column: nn.Module, source: nn.Module, device: torch.device) -> None:
    """Materialise the meta ``column`` on ``device`` and copy ``source``'s values into it.

    Under FSDP2 both are sharded alike (same mesh, shapes and placements), so each rank copies its
    own shard of every parameter: no communication, and no rank ever holds a whole column.
    Buffers (never sharded) are cloned. A plain ``column`` is filled whole.
    """
    from ..sharding import is_dtensor, local_part

    column.to_empty(device=device)
    if not any(is_dtensor(p) for p in column.parameters()) and hasattr(column, "tie_weights"):
        column.tie_weights()  # to_empty gives a plain module's tied weights separate storage
    _check_same_parameters(column, source)
    params = dict(column.named_parameters())
    with torch.no_grad():
        for name, value in source.named_parameters():
            local_part(params[name]).copy_(local_part(value))
        buffers = dict(column.named_buffers())
        for name, value in source.named_buffers():
            if name in buffers:
                _set_buffer(column, name, local_part(value).detach().clone())


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._buffers[leaf] = value


@contextlib.contextmanager
def _gathered_unit(column: nn.Module, *, skipped: bool) -> Iterator[None]:
    """Gather the parameters of ``column``'s own FSDP2 unit while only a submodule of it runs.

    A column added under FSDP2 is its own unit (embeddings, final norm, head); running its backbone
    alone would skip that unit's hooks and meet its sharded embeddings, so they are gathered first
    and resharded after. A no-op for the first column (Accelerate's root unit holds its
    embeddings, and the root is gathered while the model's forward runs) and without FSDP2.
    """
    unshard = getattr(column, "unshard", None)
    if not skipped or not callable(unshard) or not callable(getattr(column, "reshard", None)):
        yield
        return
    unshard()
    try:
        yield
    finally:
        column.reshard()


def _unit_options(model: nn.Module, sharded: torch.Tensor) -> dict[str, Any]:
    """``fully_shard`` options for new units: those of a unit Accelerate made (a block of column 0).

    FSDP2 keeps them only on its parameter groups (no public getter), so they are read from there;
    without one, the mesh alone (FSDP2's defaults). Reusing them keeps a new column in the model's
    mixed precision (``mp_policy``, e.g. bf16 compute), offloading and ``reshard_after_forward``.
    """
    from torch.distributed.fsdp import FSDPModule

    options: dict[str, Any] = {"mesh": sharded.device_mesh, "reshard_after_forward": True}
    for module in model.modules():
        if module is model or not isinstance(module, FSDPModule):
            continue
        group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
        if group is None:
            continue
        for name in ("mp_policy", "offload_policy"):
            if getattr(group, name, None) is not None:
                options[name] = getattr(group, name)
        if hasattr(group, "post_forward_mesh_info"):  # None: the unit keeps its gathered weights after forward
            options["reshard_after_forward"] = group.post_forward_mesh_info is not None
        break
    return options


def _shard_column(column: nn.Module, adapters: nn.ModuleList, options: dict[str, Any]) -> None:
    """Shard a new column and its laterals with FSDP2 (``options``: see :func:`_unit_options`), as
    Accelerate shards a model: one unit per block, one for the rest of the column (embeddings, final
    norm, head; tied weights stay tied), and one per lateral adapter. Called before the task's
    optimizer is built."""
    from torch.distributed.fsdp import fully_shard

    for _, block in find_blocks(column):
        fully_shard(block, **options)
    fully_shard(column, **options)
    for adapter in adapters:
        fully_shard(adapter, **options)
