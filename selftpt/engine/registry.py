"""Name -> object registries (Dassl's ``Registry``) and the "did you mean" name check."""
from __future__ import annotations

from difflib import SequenceMatcher
from typing import Any, Callable, Iterable, Optional

__all__ = [
    "Registry",
    "RegistryKeyError",
    "check_availability",
    "get_most_similar_str_to_a_from_b",
]


class RegistryKeyError(KeyError):
    """A ``KeyError`` whose message prints as one plain line (``KeyError`` would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_most_similar_str_to_a_from_b(a: str, b: Iterable[str]) -> Optional[str]:
    """Return the string in ``b`` most similar to ``a`` (difflib ratio), or None if ``b`` is empty."""
    best, best_ratio = None, -1.0
    for candidate in b:
        ratio = SequenceMatcher(None, a, candidate).ratio()
        if ratio >= best_ratio:
            best, best_ratio = candidate, ratio
    return best


def _unknown_name_message(requested: Any, available: Iterable[str], kind: str) -> str:
    available = [str(x) for x in available]
    if not available:
        return (
            f"Unknown {kind} {requested!r}; none is registered (is the module that "
            f"registers it imported, e.g. `import datasets.<name>` / `import trainers.<name>`?)"
        )
    suggestion = get_most_similar_str_to_a_from_b(str(requested), available)
    return (
        f"Unknown {kind} {requested!r}; did you mean {suggestion!r}? "
        f"Available: {', '.join(sorted(available))}"
    )


def check_availability(requested: Any, available: Iterable[str], kind: str = "name") -> None:
    """Raise ``ValueError`` (one line, with a "did you mean" suggestion) if ``requested`` is
    not in ``available``.

    Args:
        requested: the name asked for.
        available: the valid names.
        kind: what the name denotes, used in the message (e.g. ``"trainer"``). Not in Dassl;
            optional so that Dassl-style calls keep working.
    """
    available = list(available)
    if requested not in available:
        raise ValueError(_unknown_name_message(requested, available, kind))


class Registry:
    """Maps names to classes/functions; ``@REG.register()`` registers under ``__name__``.

    Args:
        name: the registry's name, e.g. ``"TRAINER"``; used (lower-cased) in error messages.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._obj_map: dict[str, Any] = {}

    def _do_register(self, name: str, obj: Any, force: bool = False) -> None:
        if name in self._obj_map and not force:
            raise RegistryKeyError(
                f"An object named {name!r} was already registered in the {self._name} registry "
                f"(pass force=True to replace it)"
            )
        self._obj_map[name] = obj

    def register(self, obj: Any = None, force: bool = False) -> Optional[Callable[[Any], Any]]:
        """Register ``obj`` under its ``__name__``; with no ``obj`` return a decorator."""
        if obj is None:

            def decorator(fn_or_class: Any) -> Any:
                self._do_register(fn_or_class.__name__, fn_or_class, force=force)
                return fn_or_class

            return decorator
        self._do_register(obj.__name__, obj, force=force)
        return None

    def get(self, name: str) -> Any:
        """Return the object registered as ``name``; ``KeyError`` (one line) if unknown."""
        if name not in self._obj_map:
            raise RegistryKeyError(
                _unknown_name_message(name, self._obj_map.keys(), self._name.lower())
            )
        return self._obj_map[name]

    def registered_names(self) -> list[str]:
        """Names registered so far, in registration order."""
        return list(self._obj_map.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._obj_map

    def __repr__(self) -> str:
        return f"Registry({self._name!r}, names={self.registered_names()})"
