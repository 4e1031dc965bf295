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

Fashion-MNIST is the one dataset whose images come from outside the repository (Debian's
``dataset-fashion-mnist`` package, ``$SELFTPT_FASHION_MNIST`` or torchvision's download). Where
they cannot be had, :func:`available_targets` leaves it out of a protocol's *default* datasets
with one ``note:`` line, and refuses an explicit request with one ``error:`` line saying how to
get the files; ``--available`` prints the default datasets that way (``scripts/main.sh`` uses it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from selftpt import dataset_catalog
from selftpt.errors import UserError
from selftpt.protocols import Defaults, folder_names, get_protocol


def benchmark_defaults(protocol: str) -> Defaults:
    """A protocol's benchmark defaults, by name or alias."""
    return get_protocol(protocol).defaults(dataset_catalog.BENCHMARK)


def available_targets(stems: list[str], explicit: bool, root: str | os.PathLike | None = None,
                      download: bool = True) -> list[str]:
    """The benchmark datasets (config stems) of ``stems`` that can be generated here.

    A stem of Fashion-MNIST whose files are neither here nor downloadable (see
    ``materialize.unavailable``) is left out with one ``note:`` line on stderr when ``stems`` are a
    protocol's defaults; when the user named it (``explicit``), or when ``$SELFTPT_FASHION_MNIST``
    names a folder without its files (the user's explicit choice, never passed over), it is a
    ``UserError`` whose one line says how to get the files. Other stems, unknown ones included,
    are returned as they are.

    Args:
        stems: config stems, e.g. a protocol's targets.
        explicit: whether the user named ``stems`` (``DATASETS``) rather than taking the defaults.
        root: the benchmark's data root (None: ``$SELFTPT_DATA`` or ``~/.cache/selftpt/data``).
        download: allow torchvision to download Fashion-MNIST into the root's cache now.
    """
    from selftpt.benchmark import fashion, materialize

    kept = []
    for stem in stems:
        info = dataset_catalog.find(stem, dataset_catalog.BENCHMARK)
        problem = materialize.unavailable(info.name, root, download) if info else None
        if problem is None:
            kept.append(stem)
            continue
        message = " ".join(str(problem).split())
        if explicit or os.environ.get(fashion.ENV_VAR):
            raise UserError(f"{info.name} ({stem}) cannot be generated: {message}")
        print(f"note: {info.name} left out of the default datasets: {' '.join(problem.problem.split())}. "
              f"To include it: {problem.fix}", file=sys.stderr, flush=True)
    return kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a benchmark protocol's dataset config stems")
    parser.add_argument("protocol", choices=sorted(folder_names()))
    parser.add_argument("--names", action="store_true", help="registry names instead of config stems")
    parser.add_argument("--available", action="store_true",
                        help="the target datasets that can be generated here (Fashion-MNIST's files found or "
                             "downloaded), one note line for each default left out")
    parser.add_argument("--datasets", nargs="*", default=None,
                        help="with --available: check these stems instead of the defaults (an error if one "
                             "cannot be generated)")
    args = parser.parse_args(argv)
    stems = benchmark_defaults(args.protocol).datasets
    if args.available:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the list (a download's lines are not)
                stems = tuple(available_targets(list(args.datasets or benchmark_defaults(args.protocol).targets),
                                                explicit=args.datasets is not None))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
    if args.names:
        stems = tuple(dataset_catalog.find(stem, dataset_catalog.BENCHMARK).name for stem in stems)
    print(" ".join(stems))


if __name__ == "__main__":
    main()
