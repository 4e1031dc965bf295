"""The paper's protocols on the built-in benchmark: their defaults, printed for shell scripts.

The protocols are ``selftpt.protocols``'s; their benchmark datasets are the catalogue's roles
(``selftpt.dataset_catalog``):

* base-to-new (and few-shot): ShapeWorld, MoreShapes, ShapePatterns, FashionMNIST, each
  dataset's classes halved (CoOp's rule); prompts trained on the base half, tested on both
  halves. The world's halves are checkerboard cuts of its grids, so every new class is an
  unseen combination of words that base classes used.
* cross-dataset (``xd``): prompts trained on ShapeWorld (the benchmark's ImageNet, all 64
  classes) and tested on other class sets: other shapes and colours, fill patterns, and
  Fashion-MNIST's real images.
* domain generalisation (``dg``): the same ShapeWorld prompts tested on shifted renderings of
  its classes (outline sketches, heavy noise, pastel palette, clutter and occlusion).

``python -m selftpt.benchmark.protocols xd`` prints a protocol's config stems (source first),
one line; the older names ``cross_dataset`` and ``domain_generalization`` are accepted too.
"""
from __future__ import annotations

import argparse

from selftpt import dataset_catalog
from selftpt.protocols import Defaults, folder_names, get_protocol


def benchmark_defaults(protocol: str) -> Defaults:
    """A protocol's benchmark defaults, by name or alias."""
    return get_protocol(protocol).defaults(dataset_catalog.BENCHMARK)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a benchmark protocol's dataset config stems")
    parser.add_argument("protocol", choices=sorted(folder_names()))
    parser.add_argument("--names", action="store_true", help="registry names instead of config stems")
    args = parser.parse_args(argv)
    stems = benchmark_defaults(args.protocol).datasets
    if args.names:
        stems = tuple(dataset_catalog.find(stem, dataset_catalog.BENCHMARK).name for stem in stems)
    print(" ".join(stems))


if __name__ == "__main__":
    main()
