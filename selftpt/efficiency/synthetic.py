"""The benchmark's synthetic dataset: any number of class names and images, no download.

``EfficiencySynthetic`` registers itself (it is the library's own dataset, not one of
``datasets/``), so every process that imports ``selftpt.efficiency`` can build it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from selftpt.fsmode import atomic_write
from selftpt.toolbox import DATASET_REGISTRY, DatasetBase, Datum

SYNTHETIC_DATASET = "EfficiencySynthetic"
SYNTHETIC_SPEC = "synthetic.json"


class EfficiencySynthetic(DatasetBase):
    """``num_images`` test images over ``num_classes`` synthetic class names, from
    ``DATASET.ROOT/synthetic.json`` (``write_synthetic_dataset``). Every class appears in
    ``train_x`` (Dassl derives the class list from it); those entries reuse the test images'
    files and are never read by the benchmark."""

    def __init__(self, cfg: Any) -> None:
        root = Path(cfg.DATASET.ROOT).expanduser()
        spec = json.loads((root / SYNTHETIC_SPEC).read_text(encoding="utf-8"))
        names, images = spec["classnames"], [str(root / p) for p in spec["images"]]
        test = [Datum(impath=p, label=i % len(names), classname=names[i % len(names)])
                for i, p in enumerate(images)]
        train = [Datum(impath=images[c % len(images)], label=c, classname=name)
                 for c, name in enumerate(names)]
        super().__init__(train_x=train, test=test)


if SYNTHETIC_DATASET not in DATASET_REGISTRY.registered_names():
    DATASET_REGISTRY.register(EfficiencySynthetic)


def write_synthetic_dataset(root: str | os.PathLike, num_classes: int, num_images: int,
                            resolution: int, seed: int = 0) -> Path:
    """Write (or reuse) the synthetic dataset read by ``EfficiencySynthetic``; returns ``root``.

    Images are smooth random colour fields with noise, a little larger than ``resolution``
    so that the test transform's resize and centre crop do real work.
    """
    import numpy as np
    from PIL import Image

    root = Path(root)
    spec_path = root / SYNTHETIC_SPEC
    wanted = {"num_classes": num_classes, "num_images": num_images, "resolution": resolution, "seed": seed}
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if spec.get("params") == wanted and all((root / p).is_file() for p in spec["images"]):
            return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = max(resolution, round(resolution * 8 / 7))
    images = []
    for i in range(num_images):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (side, side), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (side, side, 3))
        name = f"img_{i:05d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name)
        images.append(name)
    spec = {"params": wanted, "classnames": [f"synthetic object {c}" for c in range(num_classes)],
            "images": images}
    with atomic_write(spec_path, "w", encoding="utf-8") as f:  # written last: a spec always describes complete images
        f.write(json.dumps(spec))
    return root
