"""Tee the console into the run's log file (Dassl's ``Logger`` / ``setup_logger``)."""
from __future__ import annotations

import os.path as osp
import sys
import time
from typing import IO, Any, Optional

from .utils import mkdir_if_missing

__all__ = ["Logger", "setup_logger"]


class Logger:
    """A stream that writes to the console and to a text file.

    Args:
        fpath: file to write (created with its folder); None = console only.
        console: the stream to mirror; defaults to the current ``sys.stdout``.
        file: an already open file to share (used to send stdout and stderr to one log).
        collapse_cr: keep only the final state of carriage-return redraws (progress bars)
            in the file, so that tqdm does not flood ``log.txt``.
    """

    def __init__(
        self,
        fpath: Optional[str] = None,
        console: Optional[IO[str]] = None,
        file: Optional[IO[str]] = None,
        collapse_cr: bool = False,
    ) -> None:
        self.console = console if console is not None else sys.stdout
        self.file = file
        if self.file is None and fpath is not None:
            mkdir_if_missing(osp.dirname(fpath))
            self.file = open(fpath, "w")
        self.collapse_cr = collapse_cr
        self._line = ""  # pending text of a line being redrawn with "\r"

    def write(self, msg: str) -> int:
        self.console.write(msg)
        if self.file is not None and not self.file.closed:
            self.file.write(self._collapse(msg) if self.collapse_cr else msg)
        return len(msg)

    def _collapse(self, msg: str) -> str:
        """Return the complete lines of ``msg``, each reduced to the text after its last \\r."""
        out = []
        for i, part in enumerate(msg.split("\n")):
            if i > 0:  # a newline ended the previous part
                out.append(self._line + "\n")
                self._line = ""
            if "\r" in part:
                self._line = part.rsplit("\r", 1)[1]
            else:
                self._line += part
        return "".join(out)

    def flush(self) -> None:
        self.console.flush()
        if self.file is not None and not self.file.closed:
            self.file.flush()

    def close(self) -> None:
        """Close the file (never the console)."""
        if self.file is not None and not self.file.closed:
            if self._line:
                self.file.write(self._line + "\n")
                self._line = ""
            self.file.close()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        if name == "console":  # not set yet (e.g. during copying): avoid recursion
            raise AttributeError(name)
        return getattr(self.console, name)


def setup_logger(output: Optional[str] = None) -> Optional[str]:
    """Tee ``sys.stdout`` and ``sys.stderr`` into a log file.

    Args:
        output: a folder (the log is ``output/log.txt``) or a ``.txt``/``.log`` file path.
            If that file exists, a new ``<file>-YYYY-MM-DD-HH-MM-SS`` is written instead
            (as in Dassl; the project's train.py rotates old logs itself beforehand).

    Returns:
        The path of the log file, or None when ``output`` is None.
    """
    if output is None:
        return None
    if output.endswith(".txt") or output.endswith(".log"):
        fpath = output
    else:
        fpath = osp.join(output, "log.txt")
    if osp.exists(fpath):
        fpath += time.strftime("-%Y-%m-%d-%H-%M-%S")

    # Calling twice must not chain tees: unwrap and close a previous logger.
    stdout, stderr = sys.stdout, sys.stderr
    if isinstance(stdout, Logger):
        stdout.close()
        stdout = stdout.console
    if isinstance(stderr, Logger):
        stderr.close()
        stderr = stderr.console

    mkdir_if_missing(osp.dirname(fpath))
    file = open(fpath, "w")
    sys.stdout = Logger(console=stdout, file=file)
    sys.stderr = Logger(console=stderr, file=file, collapse_cr=True)
    return fpath
