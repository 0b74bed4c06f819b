"""The library logger: ``clm_hf`` and its children (``clm_hf.trainer``, ``clm_hf.strategies.ewc``, ...).

Its level follows the Trainer's settings like transformers' own logger does:

- ``TrainingArguments(log_level=...)`` (``log_level_replica`` on the other processes) sets it when a
  continual trainer is built;
- with ``log_level="passive"`` (the default) it follows transformers' verbosity
  (``transformers.logging.set_verbosity_info()``, ``TRANSFORMERS_VERBOSITY``) when that is not the
  default ``warning``; at the default, clm-hf's records go by the standard ``logging``
  configuration (``logging.basicConfig``, pytest's caplog), like any library's.

When the application has configured no logging at all, records the level lets through are printed
to stderr as bare messages. Standard library only: this module is imported by ``import clm_hf``.

>>> import logging
>>> from clm_hf._logging import get_logger, set_verbosity
>>> set_verbosity(logging.ERROR)
>>> get_logger("clm_hf.trainer").isEnabledFor(logging.INFO)
False
>>> set_verbosity(None)  # back to the standard logging configuration
"""

from __future__ import annotations

import logging
import sys
from typing import Any

LIBRARY_LOGGER = "clm_hf"

__all__ = ["LIBRARY_LOGGER", "follow_training_args", "get_logger", "set_verbosity"]

# Whether the level now on the library logger was put there by follow_training_args (so a later
# trainer may change it back) rather than by the application through set_verbosity.
_level_from_args = False


class _FallbackHandler(logging.StreamHandler):
    """Prints clm-hf's records to stderr only while the root logger has no handler (nothing configured)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # the application configured logging: records propagate there
            return
        self.stream = sys.stderr  # follow redirections (pytest's capsys, contextlib.redirect_stderr)
        super().emit(record)


def _library_logger() -> logging.Logger:
    logger = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(h, _FallbackHandler) for h in logger.handlers):
        logger.addHandler(_FallbackHandler())
    return logger


def get_logger(name: str) -> logging.Logger:
    """The logger of a clm-hf module, e.g. ``get_logger(__name__)``; its level follows :func:`set_verbosity`.

    Args:
        name (`str`): A dotted name under ``clm_hf``.

    Returns:
        `logging.Logger`
    """
    _library_logger()
    return logging.getLogger(name)


def set_verbosity(level: int | str | None) -> None:
    """Set the level of every clm-hf logger, like ``transformers.logging.set_verbosity``.

    Args:
        level (`int`, `str` or `None`): ``logging.INFO``, ``"warning"``, ...; ``None`` leaves it to
            the standard logging configuration (the root logger's level).
    """
    global _level_from_args
    _level_from_args = False
    _set(level)


def _set(level: int | str | None) -> None:
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"Unknown log level {level!r}; use debug, info, warning, error or critical.")
    _library_logger().setLevel(logging.NOTSET if level is None else level)


def follow_training_args(args: Any) -> None:
    """Give clm-hf's loggers the level ``args.log_level`` / ``log_level_replica`` asks for on this process.

    Called by the continual trainers when they are built, after the Trainer has applied the same
    level to transformers' logger. With ``passive`` it follows transformers' verbosity unless that
    is the default ``warning`` (then the standard logging configuration decides); a level set by the
    application through :func:`set_verbosity` is kept in that case.

    Args:
        args (`transformers.TrainingArguments`): The trainer's arguments.
    """
    global _level_from_args
    passive = (args.log_level if args.should_log else args.log_level_replica) == "passive"
    level = args.get_process_log_level()  # transformers' verbosity where passive
    if passive and level == logging.WARNING:
        if _level_from_args:  # undo what an earlier trainer set, but not the application's choice
            _set(None)
            _level_from_args = False
        return
    if passive and not _level_from_args and logging.getLogger(LIBRARY_LOGGER).level != logging.NOTSET:
        return  # the application chose clm-hf's level itself
    _set(level)
    _level_from_args = True
