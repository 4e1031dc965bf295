"""What the registered trainers say about themselves, for the modules that plan, run, time and
tabulate them without naming any trainer.

Each trainer declares its facts once, as class attributes with defaults on
``selftpt.trainer_base.ClipTrainer``: ``TRAINS``, ``DETERMINISTIC``, ``PER_IMAGE``,
``TABLE_ORDER``, ``PROMPTED_NAME`` and ``REFERENCE_CONFIGS``. Registration is done by the command lines
(``import trainers`` in ``train.py``, ``parse_results.py``, ...); the library never imports
``trainers/`` itself, so in a process that registered nothing every reader here sees no trainer
and its caller falls back (tables sort unknown names alphabetically after known ones).

This module imports neither torch nor the toolbox: the registry is read only when
``selftpt.toolbox`` is already loaded, which every registration goes through. Reading the facts
therefore never makes ``parse_results.py`` over someone else's logs pay for importing torch.
"""
from __future__ import annotations

import sys
from typing import Any

# Class attributes that mark a trainer of this project (ClipTrainer declares them all); classes
# registered by real Dassl itself (its DA/DG/SSL trainers) lack them and are left out.
_FACT = "TABLE_ORDER"


def registered_trainers() -> dict[str, type]:
    """Name -> class of every registered trainer that describes itself, in table order
    (``TABLE_ORDER``, then name); empty when nothing registered any trainer."""
    toolbox = sys.modules.get("selftpt.toolbox")
    if toolbox is None:  # nothing imported the registry, so nothing can have registered
        return {}
    registry = toolbox.TRAINER_REGISTRY
    classes = {name: registry.get(name) for name in registry.registered_names()}
    described = {name: cls for name, cls in classes.items() if hasattr(cls, _FACT)}
    return dict(sorted(described.items(), key=lambda item: (item[1].TABLE_ORDER, item[0])))


def trainer_class(name: str) -> type | None:
    """The registered trainer ``name``, or None when it is not registered (or does not
    describe itself)."""
    return registered_trainers().get(name)


def fact(name: str, attribute: str, default: Any) -> Any:
    """``attribute`` of the registered trainer ``name``; ``default`` when it is not registered."""
    cls = trainer_class(name)
    return default if cls is None else getattr(cls, attribute)


def table_rank(method: str, trainer: str = "") -> tuple:
    """Sort key of a table row: the rows of registered trainers in ``TABLE_ORDER``, the
    trainer's own row first and rows it produced under another display name
    (``TRAINER.METHOD_NAME``: ``SelfTPT-v``, ``TPT+CoOp``) right after it, alphabetically; then
    every other row alphabetically.

    Args:
        method: the row's display name.
        trainer: the trainer that produced it (``results.json``'s ``trainer``); when unknown,
            the part of ``method`` before a ``+`` (``TPT+CoOp`` was made by TPT).
    """
    trainer = trainer or method.split("+")[0]
    cls = trainer_class(trainer)
    if cls is None:
        return (1, 0, "", False, method)
    return (0, cls.TABLE_ORDER, trainer, method != trainer, method)


def reference_configs() -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Display name -> (trainer, config stem, extra ``KEY VALUE`` options) over every registered
    trainer's ``REFERENCE_CONFIGS``, in table order: the settings the efficiency benchmark times
    and the GPU check runs."""
    found: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for trainer, cls in registered_trainers().items():
        for label, (stem, opts) in cls.REFERENCE_CONFIGS.items():
            if label in found:
                raise ValueError(f"display name {label!r} is a reference config of both {found[label][0]} "
                                 f"and {trainer}; REFERENCE_CONFIGS names must be unique")
            found[label] = (trainer, stem, tuple(opts))
    return found
