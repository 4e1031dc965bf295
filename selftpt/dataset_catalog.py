"""Every dataset the project knows, described once (plain data, no torch import).

Each entry holds the facts the library needs about a dataset: its registered Dassl name, its
config stem (``configs/datasets/<stem>.yaml``, also the dataset's folder name in sweep
outputs), other spellings found in result folders, its hand-crafted prompt template, and its
roles in the protocols' defaults (:data:`ROLES`). The entries' order is the order of table rows and
columns. Where a dataset lies on disk is not the library's business: ``datasets/catalog.py``
(CoOp's layouts, keyed by these names) and ``selftpt.benchmark.catalog`` (generated data) hold
that.

Two suites: ``paper`` (CoOp's 15 datasets, under ``$DATA``) and ``benchmark`` (the built-in
CPU world, used when no ``$DATA`` is given).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PAPER", "BENCHMARK", "SUITES", "DEFAULT_TEMPLATE", "ROLES", "DatasetInfo", "DATASETS", "squash", "find",
           "by_name", "suite_datasets", "table_order", "alias_table", "renamed_stem", "with_role"]

PAPER = "paper"
BENCHMARK = "benchmark"
SUITES = (PAPER, BENCHMARK)
DEFAULT_TEMPLATE = "a photo of a {}."

# The parts a dataset plays in the protocols' defaults; each protocol of selftpt.protocols
# names the roles its source and targets have.
ROLES = {
    "base2new": "its classes are split into base and new halves; also a few-shot dataset",
    "source": "what the transfer protocols (xd, dg) train on",
    "xd": "a cross-dataset target",
    "dg": "a domain-generalisation target: the source's classes, shifted images",
}


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset.

    Attributes:
        name: registered Dassl name (``DATASET.NAME``), as results files record it.
        stem: config stem, ``configs/datasets/<stem>.yaml``.
        suite: ``paper`` or ``benchmark``.
        template: the hand-crafted zero-shot prompt (``{}`` marks the class name).
        aliases: other spellings of the name in CoOp-family result folders and logs.
        renamed_from: config stems that named this dataset before and are still accepted.
        roles: its parts in the protocols' defaults (keys of :data:`ROLES`).
    """

    name: str
    stem: str
    suite: str
    template: str = DEFAULT_TEMPLATE
    aliases: tuple[str, ...] = ()
    renamed_from: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every name that means this dataset, squashed (see :func:`squash`)."""
        names = (self.name, self.stem, *self.aliases, *self.renamed_from)
        return tuple(dict.fromkeys(squash(n) for n in names))


def _paper(name: str, stem: str, template: str = DEFAULT_TEMPLATE, **facts) -> DatasetInfo:
    return DatasetInfo(name, stem, PAPER, template, **facts)


def _bench(name: str, stem: str, template: str = DEFAULT_TEMPLATE, **facts) -> DatasetInfo:
    return DatasetInfo(name, stem, BENCHMARK, template, **facts)


# Templates are CoOp's CUSTOM_TEMPLATES. Paper datasets in CoOp's order, then the ImageNet variants.
DATASETS: tuple[DatasetInfo, ...] = (
    _paper("ImageNet", "imagenet", roles=("base2new", "source")),
    _paper("Caltech101", "caltech101", roles=("base2new", "xd")),
    _paper("OxfordPets", "oxford_pets", "a photo of a {}, a type of pet.", roles=("base2new", "xd")),
    _paper("StanfordCars", "stanford_cars", roles=("base2new", "xd")),
    _paper("OxfordFlowers", "oxford_flowers", "a photo of a {}, a type of flower.", aliases=("flowers102",),
           roles=("base2new", "xd")),
    _paper("Food101", "food101", "a photo of {}, a type of food.", roles=("base2new", "xd")),
    _paper("FGVCAircraft", "fgvc_aircraft", "a photo of a {}, a type of aircraft.", roles=("base2new", "xd")),
    _paper("SUN397", "sun397", roles=("base2new", "xd")),
    _paper("DescribableTextures", "dtd", "{} texture.", roles=("base2new", "xd")),
    _paper("EuroSAT", "eurosat", "a centered satellite photo of {}.", roles=("base2new", "xd")),
    _paper("UCF101", "ucf101", "a photo of a person doing {}.", roles=("base2new", "xd")),
    # CoOp names the config imagenetv2.yaml (accepted as an alias); imagenet_v2 matches the other variants' stems
    _paper("ImageNetV2", "imagenet_v2", renamed_from=("imagenetv2",), roles=("dg",)),
    _paper("ImageNetSketch", "imagenet_sketch", roles=("dg",)),
    _paper("ImageNetA", "imagenet_a", roles=("dg",)),
    _paper("ImageNetR", "imagenet_r", roles=("dg",)),
    # the benchmark: ShapeWorld plays ImageNet, its shifted renderings the ImageNet variants
    _bench("ShapeWorld", "shapeworld", roles=("base2new", "source")),
    _bench("MoreShapes", "moreshapes", roles=("base2new", "xd")),
    _bench("ShapePatterns", "shapepatterns", roles=("base2new", "xd")),
    _bench("FashionMNIST", "fashion_mnist", "a photo of a {}, a type of clothing.", roles=("base2new", "xd")),
    _bench("ShapeWorldSketch", "shapeworld_sketch", roles=("dg",)),
    _bench("ShapeWorldNoisy", "shapeworld_noisy", roles=("dg",)),
    _bench("ShapeWorldPastel", "shapeworld_pastel", roles=("dg",)),
    _bench("ShapeWorldClutter", "shapeworld_clutter", roles=("dg",)),
)


def squash(name: str) -> str:
    """``name`` lower-cased without separators: ``Oxford_Pets``, ``oxford-pets`` -> ``oxfordpets``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def by_name(name: str) -> DatasetInfo:
    """The entry of a registered name (``KeyError`` for others)."""
    for info in DATASETS:
        if info.name == name:
            return info
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(d.name for d in DATASETS)}")


def find(name: str, suite: str | None = None) -> DatasetInfo | None:
    """The entry that ``name`` (a registered name, config stem or alias; any case and
    separators) means, optionally within one suite; None if there is none."""
    key = squash(name)
    return next((d for d in suite_datasets(suite) if key in d.spellings), None)


def suite_datasets(suite: str | None = None) -> tuple[DatasetInfo, ...]:
    """The entries of one suite (every entry for None), in table order."""
    return tuple(d for d in DATASETS if suite is None or d.suite == suite)


def table_order(suite: str = PAPER) -> list[str]:
    """Registered names in table order."""
    return [d.name for d in suite_datasets(suite)]


def alias_table(suite: str = PAPER) -> dict[str, str]:
    """Squashed spelling -> registered name, for reading names from folders and logs."""
    return {key: d.name for d in suite_datasets(suite) for key in d.spellings}


def renamed_stem(stem: str) -> str | None:
    """The current config stem of a stem that was renamed (``imagenetv2`` -> ``imagenet_v2``);
    None when ``stem`` is not an old name."""
    return next((d.stem for d in DATASETS if stem in d.renamed_from), None)


def with_role(role: str, suite: str) -> tuple[str, ...]:
    """Config stems of the datasets of ``suite`` that play ``role``, in table order."""
    return tuple(d.stem for d in suite_datasets(suite) if role in d.roles)
