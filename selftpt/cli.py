"""What every command line of the project shares: how a user error reaches the user.

A command's ``main`` raises ``selftpt.errors.UserError`` (or a subclass) for anything the user
must fix; :func:`user_errors` turns it into one line, ``error: <message>``, on stderr and exit
status 2. Exit codes that mean something else (a sweep's changed settings, Ctrl-C) stay the
command's own.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from selftpt.errors import UserError

EXIT_USER_ERROR = 2


def one_line(text: Any) -> str:
    """``str(text)`` on one line: a user error is a single line, whatever its parts hold."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def user_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command line's ``main``: a ``UserError`` it raises becomes ``error: <one line>``
    on stderr and the return value ``EXIT_USER_ERROR``; any other exception propagates."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapped
