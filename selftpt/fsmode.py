"""Permissions of files and folders made through ``tempfile``: the user's umask, as ``open`` gives.

``tempfile.mkstemp`` creates files with mode 0600 and ``mkdtemp`` folders with 0700 whatever
the umask is: right for secrets, wrong for results, checkpoints and datasets that an atomic
write publishes with ``os.replace`` (on a shared ``$DATA`` or output root the group could not
read them). The helpers below give such a file or folder the mode a plain ``open`` /
``os.mkdir`` would have: ``0o666 & ~umask`` and ``0o777 & ~umask``.

:func:`atomic_write` (a file object) and :func:`atomic_path` (a path, for writers that open
the file themselves) are the one way the project replaces a file: a temporary file in the
target's folder (same filesystem, so ``os.replace`` is atomic), given the umask's mode, moved
onto the target only when the writer finished; on any error the temporary file is removed and
the target keeps its old content (or stays absent). Readers therefore see the old file or the
complete new one, never a prefix that might parse.

Standard library only: ``selftpt.results`` and ``datasets.common`` import it without torch.
"""
from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from typing import IO, Any, Iterator

__all__ = [
    "current_umask", "file_mode", "folder_mode", "chmod_file", "chmod_folder",
    "temp_file_beside", "atomic_write", "atomic_path",
]

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


def temp_file_beside(path: str | os.PathLike) -> tuple[int, str]:
    """Create ``.<name>.<random>.tmp`` in ``path``'s folder with the umask's file mode.

    Returns the open descriptor and the temporary path; the caller owns both. The folder must
    exist. The leading dot keeps the file out of ``*`` globs and ``ls``; the random part lets
    several writers of one target (sweep workers, parallel cache fills) never share a temp file.
    """
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    chmod_file(fd)
    return fd, tmp


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                 fsync: bool = False) -> Iterator[IO[Any]]:
    """Yield a file object whose content replaces ``path`` when the block ends without error.

    ``mode`` is ``"wb"`` or ``"w"`` (text, ``encoding`` as ``open``). ``fsync`` forces the data
    to the disk before the rename, for files that must survive a power cut and not just a killed
    process (dataset splits, results); it costs a disk flush per file. On an exception (or
    Ctrl-C) inside the block the temporary file is removed and the exception propagates.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a new file: mode 'w' or 'wb', not {mode!r}")
    if mode == "wb" and encoding is not None:
        raise ValueError("atomic_write: an encoding is for text mode 'w', not 'wb'")
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path that replaces ``path`` when the block ends without error.

    For writers that take a path rather than a file object (``shutil.copyfile``, archive
    tools). The temporary file exists, empty and with the umask's mode; the writer should write
    into it rather than delete and recreate it (which would lose that mode). ``fsync`` and the
    cleanup on error are as in :func:`atomic_write`.
    """
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
