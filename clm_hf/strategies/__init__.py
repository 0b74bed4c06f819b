"""Continual-learning strategies and their registry."""

from .base import (
    STRATEGY_REGISTRY,
    Strategy,
    StrategyConfig,
    TaskInfo,
    build_strategy,
    get_strategy_class,
    register_strategy,
    strategies_from_specs,
)
from .ewc import EWC, EWCConfig
from .gem import AGEM, GEM, AGEMConfig, GEMConfig
from .lwf import LwF, LwFConfig
from .olora import OLoRA, OLoRAConfig
from .packnet import PackNet, PackNetConfig
from .pnn import PNN, PNNConfig
from .replay import Replay, ReplayConfig

__all__ = [
    "AGEM",
    "AGEMConfig",
    "GEM",
    "GEMConfig",
    "EWC",
    "EWCConfig",
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
    "STRATEGY_REGISTRY",
    "Strategy",
    "StrategyConfig",
    "TaskInfo",
    "build_strategy",
    "get_strategy_class",
    "register_strategy",
    "strategies_from_specs",
]
