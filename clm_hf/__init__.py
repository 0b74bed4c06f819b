"""clm-hf: continual learning for Hugging Face Transformers.

>>> from clm_hf import ContinualCausalLMTrainer, ContinualTrainingArguments, Replay, EWC
"""

__version__ = "0.1.0"

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


def __getattr__(name: str):
    # TRL is an optional extra: clm_hf.ContinualSFTTrainer imports clm_hf.sft (and trl) on first use only.
    if name in ("ContinualSFTConfig", "ContinualSFTTrainer"):
        from . import sft

        return getattr(sft, name)
    raise AttributeError(f"module 'clm_hf' has no attribute {name!r}")
