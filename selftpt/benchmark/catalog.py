"""The benchmark's datasets as data: classes, rendering style, sizes and seeds.

Class order is chosen so that CoOp's base/new split (``subsample_classes``: the first half of
the sorted labels is *base*, the second half *new*) cuts every grid of compositional classes
like a checkerboard: cells (row + column) even are base, odd are new. Each word (a colour, a
shape, a pattern) therefore occurs in both halves, and every new class is a combination that
the base classes never showed, of words that they did.

Pretraining tiers (``PRETRAIN_TIERS``): within each half of each grid, about one cell in
eight is *unseen* (no image of that combination is ever shown during pretraining, neither as
the main object nor as a distractor; its words are seen in other combinations) and one in
eight is *rare* (shown a tenth as often as the others): class names that the pretraining saw
less often, or never together, as happens with real web data. Test images of every dataset
are drawn from seeds that pretraining never uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from selftpt.benchmark.world import COLORS, PATTERNS
from selftpt.templates import template_for

Tier = Literal["common", "rare", "unseen"]


@dataclass(frozen=True)
class ClassSpec:
    """One class: its name and the attributes fixed for its main object (None = nuisance)."""

    name: str
    shape: str
    color: str | None = None
    pattern: str | None = None


@dataclass(frozen=True)
class WorldDataset:
    """A dataset rendered from the procedural world.

    Args:
        name: registry name (``DATASET.NAME``), also the split file's stem.
        dataset_dir: folder under the dataset root.
        classes: in label order.
        style: rendering style of every image (see ``world.STYLES``).
        n_train, n_val, n_test: images per class in each split (0 = split left empty;
            test-only datasets, like CoOp's ImageNet variants, use their test set as train).
        seed: base seed of the dataset's images.
        min_size: minimum circumradius of the main object (patterns need room to show).
    """

    name: str
    dataset_dir: str
    classes: tuple[ClassSpec, ...]
    style: str = "photo"
    n_train: int = 20
    n_val: int = 8
    n_test: int = 20
    seed: int = 0
    min_size: float = 0.0

    @property
    def classnames(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def template(self) -> str:
        """The hand-crafted zero-shot prompt (its entry in ``selftpt.dataset_catalog``)."""
        return template_for(self.name)


@dataclass(frozen=True)
class FashionDataset:
    """Fashion-MNIST (Xiao et al. 2017) converted to 32x32 RGB image folders.

    Pretraining uses the first ``pretrain_pool`` images of the official training set; this
    dataset's train/val come from the rest, its test set from the official test set.
    """

    name: str = "FashionMNIST"
    dataset_dir: str = "fashion_mnist"
    n_train: int = 100
    n_val: int = 20
    n_test: int = 200
    pretrain_pool: int = 50000
    classnames: tuple[str, ...] = (
        "t-shirt", "trousers", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "ankle boot",
    )

    @property
    def template(self) -> str:
        """The hand-crafted zero-shot prompt (its entry in ``selftpt.dataset_catalog``)."""
        return template_for(self.name)


def checkerboard(rows: list[str], cols: list[str], make) -> tuple[list, list]:
    """Split the grid rows x cols into (base cells, new cells) by the parity of (r + c)."""
    base = [make(r, c) for i, r in enumerate(rows) for j, c in enumerate(cols) if (i + j) % 2 == 0]
    new = [make(r, c) for i, r in enumerate(rows) for j, c in enumerate(cols) if (i + j) % 2 == 1]
    return base, new


# --- the grids -------------------------------------------------------------------------------
SHAPEWORLD_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]
SHAPEWORLD_SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "hexagon", "crescent"]
MORESHAPES_COLORS = ["red", "yellow", "green", "blue", "cyan", "gray", "white", "black"]
MORESHAPES_SHAPES = ["diamond", "pentagon", "ring", "arrow", "ellipse", "rectangle"]
PATTERN_NAMES = list(PATTERNS)  # solid, striped, dotted, checkered
PATTERN_SHAPES = ["circle", "square", "triangle", "star", "heart", "hexagon",
                  "diamond", "pentagon", "ellipse", "rectangle"]


def _color_shape(c: str, s: str) -> ClassSpec:
    return ClassSpec(name=f"{c} {s}", shape=s, color=c)


def _pattern_shape(p: str, s: str) -> ClassSpec:
    return ClassSpec(name=f"{p} {s}", shape=s, pattern=p)


_SW_BASE, _SW_NEW = checkerboard(SHAPEWORLD_COLORS, SHAPEWORLD_SHAPES, _color_shape)
_MS_BASE, _MS_NEW = checkerboard(MORESHAPES_COLORS, MORESHAPES_SHAPES, _color_shape)
_SP_BASE, _SP_NEW = checkerboard(PATTERN_NAMES, PATTERN_SHAPES, _pattern_shape)
SHAPEWORLD_CLASSES = tuple(_SW_BASE + _SW_NEW)
MORESHAPES_CLASSES = tuple(_MS_BASE + _MS_NEW)
PATTERN_CLASSES = tuple(_SP_BASE + _SP_NEW)


def _pick_tiers(cells: list[ClassSpec], key, seed: int, eligible=lambda c: True) -> dict:
    """Pick ~1/8 of ``cells`` as unseen and ~1/8 as rare, no row or column twice per tier."""
    rng = np.random.default_rng(seed)
    pool = [c for c in cells if eligible(c)]
    k = max(1, round(len(cells) / 8))
    tiers: dict = {}
    for tier in ("unseen", "rare"):
        used_rows, used_cols, picked = set(), set(), 0
        for i in rng.permutation(len(pool)):
            row, col = key(pool[i])
            if key(pool[i]) in tiers or row in used_rows or col in used_cols:
                continue
            tiers[key(pool[i])] = tier
            used_rows.add(row)
            used_cols.add(col)
            picked += 1
            if picked == k:
                break
    return tiers


def _build_tiers() -> dict[tuple[str, str], Tier]:
    tiers: dict[tuple[str, str], Tier] = {}
    cs = lambda c: (c.color, c.shape)  # noqa: E731
    ps = lambda c: (c.pattern, c.shape)  # noqa: E731
    for i, half in enumerate((_SW_BASE, _SW_NEW, _MS_BASE, _MS_NEW)):
        tiers.update(_pick_tiers(half, cs, seed=100 + i))
    for i, half in enumerate((_SP_BASE, _SP_NEW)):
        tiers.update(_pick_tiers(half, ps, seed=200 + i, eligible=lambda c: c.pattern != "solid"))
    return tiers


# (colour, shape) or (pattern, shape) -> tier; pairs absent here are common.
PRETRAIN_TIERS: dict[tuple[str, str], Tier] = _build_tiers()
RARE_WEIGHT = 0.1


def tier_of(spec: ClassSpec) -> Tier:
    """The pretraining tier of a class (a world class; Fashion-MNIST classes are common)."""
    key = (spec.color, spec.shape) if spec.color is not None else (spec.pattern, spec.shape)
    return PRETRAIN_TIERS.get(key, "common")


# --- the datasets ----------------------------------------------------------------------------
_SW = dict(classes=SHAPEWORLD_CLASSES)
DATASETS: dict[str, WorldDataset | FashionDataset] = {
    d.name: d for d in (
        WorldDataset("ShapeWorld", "shapeworld", **_SW, seed=11),
        # domain shifts of ShapeWorld's classes (test only, like CoOp's ImageNet variants)
        WorldDataset("ShapeWorldSketch", "shapeworld_sketch", **_SW, style="sketch",
                     n_train=0, n_val=0, n_test=16, seed=12),
        WorldDataset("ShapeWorldNoisy", "shapeworld_noisy", **_SW, style="noisy",
                     n_train=0, n_val=0, n_test=16, seed=13),
        WorldDataset("ShapeWorldPastel", "shapeworld_pastel", **_SW, style="pastel",
                     n_train=0, n_val=0, n_test=16, seed=14),
        WorldDataset("ShapeWorldClutter", "shapeworld_clutter", **_SW, style="clutter",
                     n_train=0, n_val=0, n_test=16, seed=15),
        # other class sets (cross-dataset targets)
        WorldDataset("MoreShapes", "moreshapes", MORESHAPES_CLASSES, seed=21),
        # close-ups (the clean style: large object, little clutter) so that the fill shows
        WorldDataset("ShapePatterns", "shapepatterns", PATTERN_CLASSES, style="clean", seed=31, min_size=0.28),
        FashionDataset(),
    )
}
# Seeds of the pretraining stream live far from every dataset's seed.
PRETRAIN_SEED_BASE = 10_000

assert all(c in COLORS for c in SHAPEWORLD_COLORS + MORESHAPES_COLORS)


def get_dataset(name: str) -> WorldDataset | FashionDataset:
    """A benchmark dataset definition by registry name (with a did-you-mean on typos)."""
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"Unknown benchmark dataset {name!r}{hint} Known: {', '.join(DATASETS)}")
    return DATASETS[name]
