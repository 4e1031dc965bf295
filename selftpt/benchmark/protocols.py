"""The paper's three evaluation protocols, instantiated on the built-in benchmark (as data).

Used by the scripts as their defaults when no ``$DATA`` is given:

* base-to-new: each dataset's classes halved (CoOp's rule); prompts trained on the base half
  (16 shots) and tested on both halves. The world's halves are checkerboard cuts of its grids,
  so every new class is an unseen combination of words that base classes used.
* cross-dataset: prompts trained on ShapeWorld (the benchmark's ImageNet, all 64 classes, 16
  shots) and tested on other class sets: other shapes and colours, fill patterns, and
  Fashion-MNIST's real images.
* domain generalisation: the same ShapeWorld prompts tested on shifted renderings of its
  classes (outline sketches, heavy noise, pastel palette, clutter and occlusion).

``python -m selftpt.benchmark.protocols base2new`` prints a protocol's config stems (source
first, for cross-dataset and domain generalisation), one line, for shell scripts.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

BACKBONE = "Bench-RN-T"
SHOTS = 16
SEEDS = (1, 2, 3)

# registry name -> configs/datasets/<stem>.yaml
CONFIG_STEMS: dict[str, str] = {
    "ShapeWorld": "shapeworld",
    "ShapeWorldSketch": "shapeworld_sketch",
    "ShapeWorldNoisy": "shapeworld_noisy",
    "ShapeWorldPastel": "shapeworld_pastel",
    "ShapeWorldClutter": "shapeworld_clutter",
    "MoreShapes": "moreshapes",
    "ShapePatterns": "shapepatterns",
    "FashionMNIST": "fashion_mnist",
}


@dataclass(frozen=True)
class EvalProtocol:
    """One protocol: where prompts are trained and where they are tested.

    Attributes:
        name: ``base2new``, ``cross_dataset`` or ``domain_generalization``.
        source: the training dataset ("" for base-to-new, which trains on each dataset's base half).
        targets: the test datasets (for base-to-new: the datasets, each tested on base and new).
        shots: training shots per class.
    """

    name: str
    source: str
    targets: tuple[str, ...]
    shots: int = SHOTS

    @property
    def datasets(self) -> tuple[str, ...]:
        return ((self.source,) if self.source else ()) + self.targets

    def stems(self) -> list[str]:
        return [CONFIG_STEMS[d] for d in self.datasets]


BASE_TO_NEW = EvalProtocol("base2new", "", ("ShapeWorld", "MoreShapes", "ShapePatterns", "FashionMNIST"))
CROSS_DATASET = EvalProtocol("cross_dataset", "ShapeWorld", ("MoreShapes", "ShapePatterns", "FashionMNIST"))
DOMAIN_GENERALIZATION = EvalProtocol(
    "domain_generalization", "ShapeWorld",
    ("ShapeWorldSketch", "ShapeWorldNoisy", "ShapeWorldPastel", "ShapeWorldClutter"),
)
PROTOCOLS: dict[str, EvalProtocol] = {p.name: p for p in (BASE_TO_NEW, CROSS_DATASET, DOMAIN_GENERALIZATION)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print a benchmark protocol's dataset config stems")
    parser.add_argument("protocol", choices=sorted(PROTOCOLS))
    parser.add_argument("--names", action="store_true", help="registry names instead of config stems")
    args = parser.parse_args(argv)
    p = PROTOCOLS[args.protocol]
    print(" ".join(p.datasets if args.names else p.stems()))


if __name__ == "__main__":
    main()
