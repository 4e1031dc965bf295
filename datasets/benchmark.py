"""The built-in CPU-scale benchmark (``selftpt.benchmark``) as ordinary Dassl datasets.

Each dataset is generated on first use into ``<DATASET.ROOT>/<folder>/`` (or, when
``DATASET.ROOT`` is empty, into ``$SELFTPT_DATA`` or ``~/.cache/selftpt/data``) in CoOp's
layout (``images/`` + ``split_<Name>.json``), then read exactly as CoOp's datasets are:
few-shot sampling (``DATASET.NUM_SHOTS``, cached per seed) and the base/new class halves
(``DATASET.SUBSAMPLE_CLASSES``) for the datasets with a training split; the test-only domain
shifts of ShapeWorld behave like CoOp's ImageNet variants (their test set is also ``train_x``,
and shots and class halves do not apply).
"""
from __future__ import annotations

import contextlib
import os.path as osp
from dataclasses import dataclass
from typing import Any, Iterator

from selftpt import dataset_catalog
from selftpt.benchmark.catalog import DATASETS as BENCHMARK
from selftpt.benchmark.catalog import WorldDataset
from selftpt.benchmark.fashion import FashionMNISTUnavailable
from selftpt.benchmark.materialize import default_data_root, materialize, split_filename
from selftpt.toolbox import DATASET_REGISTRY, DatasetBase

from .catalog import DatasetSpec
from .common import DatasetError, read_split
from .template import SplitDataset


@dataclass(frozen=True)
class BenchmarkSpec(DatasetSpec):
    """A benchmark dataset's layout; its fix is always "let it be generated again"."""

    def setup_fix(self, root: str = "$DATA") -> str:
        # --force: without it the command sees benchmark.json and the split file, takes the copy
        # as complete and regenerates nothing (the images are not listed one by one at each load)
        return (f"regenerate it (the same images, seeded): `python -m selftpt.benchmark.materialize --force "
                f"--root {root} --datasets {self.name}`, or delete {root}/{self.folder}/ and run again")

    def download_fix(self, root: str = "$DATA") -> str:
        return self.setup_fix(root)


def _spec(name: str, stem: str = "") -> BenchmarkSpec:
    """The layout of a generated dataset; its stem is the catalogue's (``selftpt.dataset_catalog``)
    unless given (a dataset that is not in the catalogue, e.g. a test's)."""
    bench = BENCHMARK[name]
    return BenchmarkSpec(
        name=name, stem=stem or dataset_catalog.by_name(name).stem, folder=bench.dataset_dir, image_dir="images",
        num_classes=len(bench.classnames), data_dirs=("images",),
        source="the generator in selftpt.benchmark", anchor="built-in-benchmark",
        split_file=split_filename(name),
        test_only=isinstance(bench, WorldDataset) and bench.n_train == 0,
    )


@contextlib.contextmanager
def _benchmark_fix(spec: BenchmarkSpec, root: str) -> Iterator[None]:
    """Give a split-file error the benchmark's fix: ``read_split`` suggests ``prepare_data.py
    download`` for an unreadable split file, which knows only the downloadable datasets."""
    try:
        yield
    except DatasetError as exc:
        if "prepare_data.py" not in exc.fix:
            raise
        raise DatasetError(exc.dataset, exc.problem, exc.path, spec.setup_fix(root)) from None


class BenchmarkDataset(SplitDataset):
    """A benchmark dataset with train/val/test splits (CoOp's ``SplitDataset`` flow)."""

    def _locate(self, cfg: Any) -> str:
        spec = self.spec
        given = str(cfg.DATASET.ROOT or "").strip()
        root = osp.abspath(osp.expanduser(given)) if given else str(default_data_root())
        try:
            materialize(spec.name, root, download=True)
        except FashionMNISTUnavailable as exc:  # names the Fashion-MNIST folder, not the data root
            raise DatasetError(spec.name, exc.problem, exc.path, exc.fix) from None
        self.dataset_dir = osp.join(root, spec.folder)
        self.image_dir = osp.join(self.dataset_dir, spec.image_dir)
        return root

    def read_full_split(self):
        """The split as ``SplitDataset`` reads it, with the benchmark's fix in its errors."""
        with _benchmark_fix(self.spec, self.root):
            return super().read_full_split()


class BenchmarkShift(BenchmarkDataset):
    """A test-only domain shift of ShapeWorld (like CoOp's ImageNet variants)."""

    def __init__(self, cfg: Any):
        self.root = self._locate(cfg)
        self.split_path = osp.join(self.dataset_dir, self.spec.split_file)
        with _benchmark_fix(self.spec, self.root):
            _, _, test = read_split(self.split_path, self.image_dir, self.spec.name, self.spec.setup_fix(self.root))
        DatasetBase.__init__(self, train_x=test, test=test)


@DATASET_REGISTRY.register()
class ShapeWorld(BenchmarkDataset):
    """Colour x shape world, 64 classes ("red triangle"); the benchmark's ImageNet."""

    spec = _spec("ShapeWorld")


@DATASET_REGISTRY.register()
class MoreShapes(BenchmarkDataset):
    """Other colours x other shapes, 48 classes ("cyan pentagon"); a cross-dataset target."""

    spec = _spec("MoreShapes")


@DATASET_REGISTRY.register()
class ShapePatterns(BenchmarkDataset):
    """Fill pattern x shape, 40 classes ("striped star"), any colour; a cross-dataset target."""

    spec = _spec("ShapePatterns")


@DATASET_REGISTRY.register()
class FashionMNIST(BenchmarkDataset):
    """Fashion-MNIST (Xiao et al. 2017), 10 classes, real images; a cross-dataset target."""

    spec = _spec("FashionMNIST")


@DATASET_REGISTRY.register()
class ShapeWorldSketch(BenchmarkShift):
    """ShapeWorld's classes drawn as outlines on paper (like ImageNet-Sketch)."""

    spec = _spec("ShapeWorldSketch")


@DATASET_REGISTRY.register()
class ShapeWorldNoisy(BenchmarkShift):
    """ShapeWorld under heavy pixel noise and blur (a corruption shift)."""

    spec = _spec("ShapeWorldNoisy")


@DATASET_REGISTRY.register()
class ShapeWorldPastel(BenchmarkShift):
    """ShapeWorld in washed-out colours under tinted light (a palette shift)."""

    spec = _spec("ShapeWorldPastel")


@DATASET_REGISTRY.register()
class ShapeWorldClutter(BenchmarkShift):
    """ShapeWorld with smaller objects among many distractors and occluders (like ImageNet-A)."""

    spec = _spec("ShapeWorldClutter")
