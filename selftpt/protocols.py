"""The evaluation protocols as objects: names, default datasets and the runs each one makes.

A protocol knows its name (the sweep's argument and the output folder ``OUT/<name>/``), the
other folder names its runs have in CoOp-family layouts (``cross_dataset``, ``base2novel``, ...),
its defaults in each suite of ``selftpt.dataset_catalog`` (the paper's datasets under ``$DATA``
or the built-in benchmark), and how a sweep's runs chain: which run trains, which evaluate its
prompts, with which ``DATASET.SUBSAMPLE_CLASSES``. ``selftpt.sweep`` asks it for chains;
``selftpt.collect`` and ``selftpt.tables`` take folder names and order from :data:`PROTOCOLS`.

Adding a protocol: a subclass here (registered with :func:`register`) whose defaults are
datasets of existing catalogue roles (a new role only for new kinds of datasets), and
``scripts/<method>/<name>.sh`` wrappers.

Plain Python: importing this module imports neither torch nor the sweep.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from selftpt import dataset_catalog

if TYPE_CHECKING:  # the sweep imports this module
    from selftpt.sweep import Run, Sweep

__all__ = ["SUITE_BACKBONES", "Defaults", "Protocol", "PROTOCOLS", "register", "get_protocol", "folder_names"]

# The backbone each suite's shipped trainer configs use (the paper's ViT-B/16, the benchmark's tiny CLIP).
SUITE_BACKBONES = {dataset_catalog.PAPER: "ViT-B/16", dataset_catalog.BENCHMARK: "Bench-RN-S"}


@dataclass(frozen=True)
class Defaults:
    """What a protocol runs in one suite when the command line names nothing."""

    source: str  # config stem trained on; "" when each dataset trains on itself
    targets: tuple[str, ...]  # config stems tested, in table order
    shots: tuple[int, ...]  # shot counts swept
    backbone: str  # the backbone of the suite's shipped configs

    @property
    def datasets(self) -> tuple[str, ...]:
        """The source (if any), then the targets."""
        return ((self.source,) if self.source else ()) + self.targets


def _num_shots(shots: int) -> list[str]:
    return ["DATASET.NUM_SHOTS", str(shots)]


def _classes(subsample: str) -> list[str]:
    return ["DATASET.SUBSAMPLE_CLASSES", subsample]


class Protocol(ABC):
    """One evaluation protocol. Subclasses set the class attributes and :meth:`chains`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()  # other folder names of its runs; also accepted by name
    source_role: ClassVar[str] = ""  # catalogue role of its default source ("" = none)
    target_role: ClassVar[str]  # catalogue role of its default targets
    shots: ClassVar[tuple[int, ...]] = (16,)  # default shot counts

    def defaults(self, suite: str) -> Defaults:
        """Source, targets, shots and backbone in ``suite``; the datasets are the catalogue's that
        play this protocol's roles (a suite has at most one source)."""
        sources = dataset_catalog.with_role(self.source_role, suite) if self.source_role else ()
        return Defaults(sources[0] if sources else "", dataset_catalog.with_role(self.target_role, suite),
                        self.shots, SUITE_BACKBONES[suite])

    @abstractmethod
    def chains(self, sweep: Sweep, seed: int, shots: int) -> list[list[Run]]:
        """The runs of one seed and shot count: each list runs in order, lists run in parallel."""


def train_then_test(sweep: Sweep, seed: int, shots: int, subsamples: tuple[str, ...]) -> list[list[Run]]:
    """One chain: train on the source (unless the trainer is training-free), then evaluate every
    target on each class subset with those prompts (``OUT/<p>/train``, ``OUT/<p>/test[_<sub>]``)."""
    if not sweep.source:
        raise SystemExit(f"error: protocol {sweep.protocol} needs a source dataset (--source / SOURCE)")
    chain: list[Run] = []
    model_dir = sweep.prompt_source("train", sweep.source, shots, seed)
    if sweep.trains:
        train = sweep.make_run("train", sweep.source, sweep.source, shots, seed, _num_shots(shots))
        chain.append(train)
        model_dir = train.output_dir
    for dataset in sweep.datasets:
        for sub in subsamples:
            where = "test" if sub == "all" else f"test_{sub}"
            chain.append(sweep.make_run(where, dataset, sweep.source, shots, seed, _classes(sub),
                                        eval_only=True, model_dir=model_dir))
    return [chain]


PROTOCOLS: dict[str, Protocol] = {}  # by name, in table order


def register(cls: type[Protocol]) -> type[Protocol]:
    """Class decorator: add a protocol to :data:`PROTOCOLS` (registration order = table order)."""
    PROTOCOLS[cls.name] = cls()
    return cls


@register
class BaseToNew(Protocol):
    """Train on the base half of each dataset's classes, test on base (the training run's own
    evaluation) and on new (an eval-only run in its own folder). With a source: train once on
    it, then test base and new of every dataset."""

    name = "base2new"
    aliases = ("base2novel",)
    target_role = "base2new"

    def chains(self, sweep: Sweep, seed: int, shots: int) -> list[list[Run]]:
        if sweep.source:
            return train_then_test(sweep, seed, shots, ("base", "new"))
        return [self._chain(sweep, dataset, seed, shots) for dataset in sweep.datasets]

    @staticmethod
    def _chain(sweep: Sweep, dataset: str, seed: int, shots: int) -> list[Run]:
        fewshot = _num_shots(shots)
        if sweep.trains:
            train = sweep.make_run("train_base", dataset, dataset, shots, seed, fewshot + _classes("base"))
            test = sweep.make_run("test_new", dataset, dataset, shots, seed, fewshot + _classes("new"),
                                  eval_only=True, model_dir=train.output_dir)
            return [train, test]
        prompts = sweep.prompt_source("train_base", dataset, shots, seed)
        return [sweep.make_run(f"test_{sub}", dataset, dataset, shots, seed, fewshot + _classes(sub),
                               eval_only=True, model_dir=prompts) for sub in ("base", "new")]


@register
class CrossDataset(Protocol):
    """Train once on the source (all classes), test on every target dataset."""

    name = "xd"
    aliases = ("cross_dataset", "crossdataset")
    source_role = "source"
    target_role = "xd"

    def chains(self, sweep: Sweep, seed: int, shots: int) -> list[list[Run]]:
        return train_then_test(sweep, seed, shots, ("all",))


@register
class DomainGeneralization(CrossDataset):
    """As cross-dataset, with the source's shifted variants (same classes) as targets."""

    name = "dg"
    aliases = ("domain_generalization",)
    target_role = "dg"


@register
class FewShot(Protocol):
    """Train and test on each dataset for each shot count."""

    name = "fewshot"
    aliases = ("few_shot",)
    target_role = "base2new"  # the base-to-new datasets, all classes
    shots = (1, 2, 4, 8, 16)

    def chains(self, sweep: Sweep, seed: int, shots: int) -> list[list[Run]]:
        return [[sweep.make_run("", dataset, dataset, shots, seed, _num_shots(shots), eval_only=not sweep.trains,
                                model_dir=sweep.prompt_source("", dataset, shots, seed))]
                for dataset in sweep.datasets]


def get_protocol(name: str) -> Protocol:
    """A protocol by name or alias (``KeyError`` naming the known ones otherwise)."""
    found = folder_names().get(name.lower())
    if found is None:
        raise KeyError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)} "
                       f"(or {', '.join(a for p in PROTOCOLS.values() for a in p.aliases)})")
    return PROTOCOLS[found]


def folder_names() -> dict[str, str]:
    """Every folder name that says which protocol a run belongs to -> the protocol's name."""
    return {alias: p.name for p in PROTOCOLS.values() for alias in (p.name, *p.aliases)}
