"""How a launched test driver ends: the ranks leave together, then the process exits at once.

``torch 2.13``'s gloo can abort a process that already finished its work: during interpreter
finalization, C++ objects still referenced from Python (asynchronous work handles kept by FSDP2's
state, gloo's transport threads) are destroyed after the interpreter is torn down, and the process
dies with ``terminate called without an active exception`` (SIGABRT), which ``torchrun`` reports as
a failed launch (seen on this machine once per few dozen FSDP2 launches; the same class of teardown
crash as pytorch/pytorch#179291). Every result is on disk when a driver calls :func:`leave`, so it
skips finalization.
"""

from __future__ import annotations

import os
import sys


def leave() -> None:
    """Barrier, destroy the process group, flush, and ``os._exit(0)``; a plain return when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # a rank that exits while the other still uses the gloo group can abort it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
