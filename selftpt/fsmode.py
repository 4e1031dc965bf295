"""Permissions of files and folders made through ``tempfile``: the user's umask, as ``open`` gives.

``tempfile.mkstemp`` creates files with mode 0600 and ``mkdtemp`` folders with 0700 whatever
the umask is: right for secrets, wrong for results, checkpoints and datasets that an atomic
write publishes with ``os.replace`` (on a shared ``$DATA`` or output root the group could not
read them). The helpers below give such a file or folder the mode a plain ``open`` /
``os.mkdir`` would have: ``0o666 & ~umask`` and ``0o777 & ~umask``.

Standard library only: ``selftpt.results`` and ``datasets.common`` import it without torch.
"""
from __future__ import annotations

import os
import threading

__all__ = ["current_umask", "file_mode", "folder_mode", "chmod_file", "chmod_folder"]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``).

    ``os.umask`` can only be read by setting it; the fallback sets and restores it under a lock,
    which still leaves a moment where another thread's new file gets the temporary value, hence
    ``/proc`` first.
    """
    try:
        with open("/proc/self/status", "r") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode ``os.mkdir(path)`` gives a new folder under the current umask."""
    return 0o777 & ~current_umask()


def chmod_file(fd_or_path: int | str | os.PathLike) -> None:
    """Give a ``mkstemp`` file (its descriptor or path) the umask's file mode.

    Best effort: some network or FUSE filesystems refuse ``chmod``; the write itself must not
    fail because of that, and such filesystems impose their own modes anyway.
    """
    try:
        if isinstance(fd_or_path, int):
            os.fchmod(fd_or_path, file_mode())
        else:
            os.chmod(fd_or_path, file_mode())
    except OSError:
        pass


def chmod_folder(path: str | os.PathLike) -> None:
    """Give a ``mkdtemp`` folder the umask's folder mode (best effort, as :func:`chmod_file`)."""
    try:
        os.chmod(path, folder_mode())
    except OSError:
        pass
