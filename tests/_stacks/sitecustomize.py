"""Imported at start-up by every Python process the tests launch (``tests/_launch.py`` puts this
folder on ``PYTHONPATH``): ``SIGUSR1`` then writes every thread's Python stack to the process's
stderr, the launch log. A launch that hangs past its timeout is sent ``SIGUSR1`` before it is killed,
so its log says where each rank (and ``torchrun`` itself) was waiting.
"""

import faulthandler
import signal

if hasattr(signal, "SIGUSR1"):
    faulthandler.register(signal.SIGUSR1, all_threads=True)
