"""How good a benchmark backbone is, measured without running any prompt-learning method.

* ``linear_probe``: a 16-shot multinomial logistic regression on the frozen, L2-normalised
  image features (the shots drawn by a seed from the train split, the weight decay picked on
  the val split), scored on the test split of the base (or new, or all) classes;
* ``text_init_probe``: the issue's quick proxy for "prompt learning has room": the same
  16-shot classifier, but with weights that start from the class text features (times the
  logit scale) and a few steps of Adam, scored against zero-shot on the same classes;
* ``zeroshot_row``: zero-shot top-1 on all classes and on each half (as
  ``zeroshot.evaluate_dataset``), for a backbone of any input resolution.

Images are brought to the backbone's input resolution as the trainers' test pipeline does
(PIL bicubic resize of the 32-px images), so a 64-px backbone is measured on what it sees
downstream. Command line::

    python -m selftpt.benchmark.quality --backbone Bench-RN-S [--seeds 1 2 3]
"""
from __future__ import annotations

import argparse
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selftpt.benchmark.zeroshot import encode_prompts, to_model_input


def resize_images(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 images (n, h, w, 3) resized to (n, resolution, resolution, 3) with PIL bicubic
    (Dassl's test transform for square images; a no-op at the native size)."""
    if images.shape[1] == resolution and images.shape[2] == resolution:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC))
                     for im in images])


@torch.no_grad()
def encode(model, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image features (n, d) of uint8 32-px images, at the model's resolution."""
    res = model.visual.input_resolution
    dtype = model.visual.conv1.weight.dtype
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_input(resize_images(images[i:i + batch_size], res)).to(dtype)
        f = model.encode_image(x).float()
        out.append(f / f.norm(dim=-1, keepdim=True))
    return torch.cat(out)


@lru_cache(maxsize=16)
def _split(name: str, split: str, root: str | None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from selftpt.benchmark.materialize import materialize
    from selftpt.benchmark.zeroshot import load_split_images

    folder = materialize(name, root)
    images, labels, classnames = load_split_images(folder, name, split)
    return images, labels, tuple(classnames)


def _classes(n: int, which: str) -> np.ndarray:
    m = math.ceil(n / 2)
    return {"base": np.arange(m), "new": np.arange(m, n), "all": np.arange(n)}[which]


def _subset(images, labels, keep, shots: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    idx = []
    for c in keep:
        where = np.flatnonzero(labels == c)
        idx.extend(where if shots is None else rng.choice(where, size=min(shots, len(where)), replace=False))
    idx = np.asarray(idx)
    remap = {c: i for i, c in enumerate(keep)}
    return images[idx], np.array([remap[int(y)] for y in labels[idx]])


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, n_cls: int, weight_decay: float,
                init: torch.Tensor | None = None, scale: float = 1.0, steps: int = 300,
                lr: float = 0.05) -> torch.Tensor:
    """Weights (n_cls, d + 1) of a multinomial logistic regression (full-batch Adam)."""
    g = torch.Generator().manual_seed(0)
    w = (init.clone() if init is not None else torch.randn(n_cls, x.shape[1], generator=g) * 0.01)
    b = torch.zeros(n_cls)
    w.requires_grad_(True)
    b.requires_grad_(True)
    w0 = w.detach().clone() if init is not None else torch.zeros_like(w)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(scale * x @ w.t() + b, y) + weight_decay * (w - w0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([w.detach(), b.detach()[:, None]], 1)


def _accuracy(wb: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> float:
    logits = scale * x @ wb[:, :-1].t() + wb[:, -1]
    return float((logits.argmax(1) == y).float().mean() * 100)


def linear_probe(model, name: str = "ShapeWorld", which: str = "base", shots: int = 16, seed: int = 1,
                 root: str | None = None, decays=(1e-4, 1e-3, 1e-2, 1e-1)) -> float:
    """Test top-1 (%) of a ``shots``-shot logistic regression on frozen features (see module doc)."""
    tr_img, tr_lab, names = _split(name, "train", root)
    va_img, va_lab, _ = _split(name, "val", root)
    te_img, te_lab, _ = _split(name, "test", root)
    keep = _classes(len(names), which)
    xtr, ytr = _subset(tr_img, tr_lab, keep, shots, seed)
    xva, yva = _subset(va_img, va_lab, keep)
    xte, yte = _subset(te_img, te_lab, keep)
    ftr, fva, fte = encode(model, xtr), encode(model, xva), encode(model, xte)
    ytr, yva, yte = map(torch.as_tensor, (ytr, yva, yte))
    # features are unit-norm: scale them so that the regression can reach confident logits
    best = max(decays, key=lambda d: _accuracy(_fit_logreg(10 * ftr, ytr, len(keep), d), 10 * fva, yva))
    return _accuracy(_fit_logreg(10 * ftr, ytr, len(keep), best), 10 * fte, yte)


def text_init_probe(model, name: str = "ShapeWorld", which: str = "base", shots: int = 16, seed: int = 1,
                    root: str | None = None, template: str | None = None, steps: int = 100,
                    lr: float = 1e-3) -> tuple[float, float]:
    """(zero-shot, text-initialised 16-shot classifier) test top-1 (%) on one half of a dataset."""
    from selftpt.benchmark.catalog import get_dataset

    tr_img, tr_lab, names = _split(name, "train", root)
    te_img, te_lab, _ = _split(name, "test", root)
    keep = _classes(len(names), which)
    xtr, ytr = _subset(tr_img, tr_lab, keep, shots, seed)
    xte, yte = _subset(te_img, te_lab, keep)
    ftr, fte = encode(model, xtr), encode(model, xte)
    text = encode_prompts(model, [names[i] for i in keep], template or get_dataset(name).template)
    scale = float(model.logit_scale.exp())
    init = torch.cat([text, torch.zeros(len(keep), 1)], 1)
    zs = _accuracy(init, fte, torch.as_tensor(yte), scale)
    wb = _fit_logreg(ftr, torch.as_tensor(ytr), len(keep), 0.0, init=text, scale=scale, steps=steps, lr=lr)
    return zs, _accuracy(wb, fte, torch.as_tensor(yte), scale)


@torch.no_grad()
def zeroshot_row(model, name: str, root: str | None = None, template: str | None = None) -> dict:
    """Zero-shot top-1 (%) on a dataset's test split: all classes and each half, with chance
    (``template``: another prompt than the dataset's hand-crafted one)."""
    from selftpt.benchmark.catalog import get_dataset
    from selftpt.benchmark.zeroshot import _accuracy_within, zeroshot_logits

    images, labels, names = _split(name, "test", root)
    text = encode_prompts(model, list(names), template or get_dataset(name).template)
    logits = zeroshot_logits(model, encode(model, images), text)
    n, m = len(names), math.ceil(len(names) / 2)
    return {"dataset": name, "n_classes": n, "all": _accuracy_within(logits, labels, np.arange(n)),
            "chance_all": 100 / n, "base": _accuracy_within(logits, labels, np.arange(m)),
            "new": _accuracy_within(logits, labels, np.arange(m, n)), "chance_base": 100 / m}


def quality_table(model, seeds=(1, 2, 3), root: str | None = None, datasets=None) -> dict:
    """Probe (ShapeWorld base), proxy (ShapeWorld base) and zero-shot on every dataset."""
    from selftpt.benchmark.catalog import DATASETS

    names = list(datasets or DATASETS)
    probes = [linear_probe(model, seed=s, root=root) for s in seeds]
    proxies = [text_init_probe(model, seed=s, root=root) for s in seeds]
    return {
        "probe_shapeworld_base": {"seeds": list(seeds), "values": probes, "mean": float(np.mean(probes))},
        "proxy_shapeworld_base": {"seeds": list(seeds), "zeroshot": proxies[0][0],
                                  "values": [p[1] for p in proxies], "mean": float(np.mean([p[1] for p in proxies]))},
        "zeroshot": {n: zeroshot_row(model, n, root) for n in names},
    }


def evaluate_asset(path, use_fashion: bool = True, root: str | None = None) -> dict:
    """``quality_table`` of a pretrained asset loaded through the normal path (fp16 weights ->
    fp32), every line logged; Fashion-MNIST left out when it was not used."""
    import logging

    from selftpt.benchmark.catalog import DATASETS
    from selftpt.clip_loader import load_clip

    log = logging.getLogger("selftpt.benchmark.quality")
    names = [n for n in DATASETS if use_fashion or n != "FashionMNIST"]
    table = quality_table(load_clip(str(path)), (1, 2, 3), root, names)
    for n, r in table["zeroshot"].items():
        log.info("zero-shot %-18s all %5.1f (chance %4.1f)  base %5.1f  new %5.1f", n, r["all"], r["chance_all"],
                 r["base"], r["new"])
    log.info("probe ShapeWorld base %.1f; proxy %.1f -> %.1f", table["probe_shapeworld_base"]["mean"],
             table["proxy_shapeworld_base"]["zeroshot"], table["proxy_shapeworld_base"]["mean"])
    return table


def main(argv=None) -> None:
    from selftpt.clip_loader import load_clip

    parser = argparse.ArgumentParser(description="Probe, proxy and zero-shot quality of a benchmark backbone")
    parser.add_argument("--backbone", default="Bench-RN-S")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--root", default="")
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_clip(args.backbone)
    table = quality_table(model, args.seeds, args.root or None, args.datasets)
    print(f"probe ShapeWorld base: {table['probe_shapeworld_base']['mean']:.1f} "
          f"{['%.1f' % v for v in table['probe_shapeworld_base']['values']]}")
    px = table["proxy_shapeworld_base"]
    print(f"proxy ShapeWorld base: zero-shot {px['zeroshot']:.1f} -> text-initialised {px['mean']:.1f}")
    for n, r in table["zeroshot"].items():
        print(f"zero-shot {n:18s} all {r['all']:5.1f} (chance {r['chance_all']:4.1f})  "
              f"base {r['base']:5.1f}  new {r['new']:5.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
