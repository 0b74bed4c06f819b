"""clm-hf: continual learning for Hugging Face Transformers.

>>> from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments, Replay, EWC
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

from . import _logging  # noqa: F401  (installs the library logger's fallback handler; standard library only)

# The public names are imported on first use (PEP 562), so that `import clm_hf` and the `clm-hf`
# command line start without loading torch and transformers (`clm-hf --help` answers at once).
_LAZY = {
    "ContinualSeq2SeqTrainingArguments": "args",
    "ContinualTrainingArguments": "args",
    "ReservoirBuffer": "buffer",
    "ContinualDataCollator": "data",
    "ContinualResults": "results",
    "ContinualCausalLMTrainer": "trainer",
    "ContinualSeq2SeqTrainer": "trainer",
    "ContinualTrainer": "trainer",
    # TRL is an optional extra: these import clm_hf.sft (and trl) on first use only.
    "ContinualSFTConfig": "sft",
    "ContinualSFTTrainer": "sft",
    **{name: "strategies" for name in (
        "AGEM", "AGEMConfig", "EWC", "EWCConfig", "GEM", "GEMConfig", "LwF", "LwFConfig", "OLoRA", "OLoRAConfig",
        "PackNet", "PackNetConfig", "PNN", "PNNConfig", "Replay", "ReplayConfig", "STRATEGY_REGISTRY", "Strategy",
        "StrategyConfig", "TaskInfo", "build_strategy", "register_strategy",
    )},
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clm_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # static type checkers and IDEs see the eager imports
    from .args import ContinualSeq2SeqTrainingArguments, ContinualTrainingArguments
    from .buffer import ReservoirBuffer
    from .data import ContinualDataCollator
    from .results import ContinualResults
    from .strategies import (
        AGEM,
        GEM,
        AGEMConfig,
        GEMConfig,
        EWC,
        STRATEGY_REGISTRY,
        EWCConfig,
        LwF,
        LwFConfig,
        OLoRA,
        OLoRAConfig,
        PackNet,
        PackNetConfig,
        PNN,
        PNNConfig,
        Replay,
        ReplayConfig,
        Strategy,
        StrategyConfig,
        TaskInfo,
        build_strategy,
        register_strategy,
    )
    from .trainer import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer, ContinualTrainer


__all__ = [
    "AGEM",
    "AGEMConfig",
    "GEM",
    "GEMConfig",
    "EWC",
    "EWCConfig",
    "STRATEGY_REGISTRY",
    "ContinualCausalLMTrainer",
    "ContinualDataCollator",
    "ContinualResults",
    "ContinualSeq2SeqTrainer",
    "ContinualSeq2SeqTrainingArguments",
    "ContinualTrainer",
    "ContinualTrainingArguments",
    "LwF",
    "LwFConfig",
    "OLoRA",
    "OLoRAConfig",
    "PackNet",
    "PackNetConfig",
    "PNN",
    "PNNConfig",
    "Replay",
    "ReplayConfig",
    "ReservoirBuffer",
    "Strategy",
    "StrategyConfig",
    "TaskInfo",
    "build_strategy",
    "register_strategy",
    "__version__",
]

