"""The one atomic writer of clm-hf: files and folders appear complete or not at all.

Everything clm-hf persists (``results.json``, continual checkpoints, replay buffers, GEM memories)
goes through here, so a kill at any instant leaves either the previous copy or the new one, never a
half-written file. Standard library only: this module sits below every other one.

>>> import os, tempfile
>>> from clm_hf._io import atomic_write_text, atomic_write_dir
>>> root = tempfile.mkdtemp()
>>> atomic_write_text(os.path.join(root, "a.json"), "{}")
>>> sorted(os.listdir(atomic_write_dir(os.path.join(root, "folder"), lambda tmp: (tmp / "x").write_text("1"))))
['x']
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write_dir", "atomic_write_text", "fsync_dir", "process_umask", "respect_umask"]


def process_umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def respect_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir``/``open`` would under the umask.

    ``tempfile.mkdtemp`` creates 0700 folders and safetensors writes 0600 files whatever the umask;
    a checkpoint should be as readable as any other file the user writes (a shared group
    folder, an umask of 022), and no more readable than the umask allows.
    """
    mask = process_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename inside ``path``; best effort, since not every platform can open a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [root, *[p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()]]:
        fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) so that readers see the old content or the new, never a part.

    The text goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
    ``path`` with `os.replace`. The file keeps the mode of the one it replaces, else the mode a plain
    ``open()`` gives under the umask. Parent folders are created.

    Args:
        path (`str` or `os.PathLike`): The destination file.
        text (`str`): The whole new content.

    Example:

    ```python
    >>> import os, tempfile
    >>> from clm_hf._io import atomic_write_text
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> atomic_write_text(path, "hello")
    >>> open(path).read()
    'hello'

    ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600 whatever the umask.
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o666 & ~process_umask()
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_dir(final_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` in a hidden sibling, fsync it, then rename it to ``final_dir``.

    The sibling is ``.tmp-<name>-*`` (same file system, so the last step is a rename, not a copy).
    Every file and folder gets the modes the umask gives and is fsynced before the rename. A folder
    cannot be renamed over a non-empty one on POSIX, so an existing ``final_dir`` is first moved to
    ``.old-<name>-<id>`` and deleted once the new copy is in: at every instant one complete copy
    exists. If the second rename fails with an `OSError` the old copy is put back; a kill between the
    two renames leaves the ``.old-*`` folder, which :func:`clm_hf.state.recover_interrupted_swaps`
    puts back. On any error while building, the temporary folder is removed and ``final_dir`` is
    untouched.

    Args:
        final_dir (`str` or `os.PathLike`): Where the folder ends up.
        fill (`Callable[[pathlib.Path], None]`): Writes the folder's content into the path it is given.

    Returns:
        `pathlib.Path`: ``final_dir``.

    Example:

    ```python
    >>> import os, tempfile
    >>> from clm_hf._io import atomic_write_dir
    >>> target = os.path.join(tempfile.mkdtemp(), "state")
    >>> _ = atomic_write_dir(target, lambda tmp: (tmp / "a.json").write_text("{}"))
    >>> _ = atomic_write_dir(target, lambda tmp: (tmp / "b.json").write_text("{}"))
    >>> os.listdir(target)
    ['b.json']

    ```
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        fill(tmp)
        respect_umask(tmp)
        _fsync_tree(tmp)
        if final_dir.exists():
            stale = final_dir.with_name(f".old-{final_dir.name}-{uuid.uuid4().hex[:12]}")
            os.replace(final_dir, stale)
            try:
                os.replace(tmp, final_dir)
            except OSError:
                os.replace(stale, final_dir)
                raise
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final_dir)
        fsync_dir(final_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir
