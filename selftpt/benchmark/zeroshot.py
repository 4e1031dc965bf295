"""Zero-shot CLIP accuracy with a hand-crafted prompt, for the benchmark's quality checks.

``zeroshot_accuracy`` works on any CLIP model and any images already at the model's
resolution; ``evaluate_dataset`` reads a materialised benchmark dataset's test split and
reports top-1 over all classes and, as in base-to-new tables, over each half of the classes
(labels below / from ``ceil(n / 2)``, CoOp's ``subsample_classes`` rule), plus the accuracy per
pretraining tier (common / rare / unseen class names).

Command line::

    python -m selftpt.benchmark.zeroshot [--backbone Bench-RN-T] [--root DIR] [--datasets ...]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selftpt.clip_loader import tokenize

# CLIP's input normalisation (Dassl's INPUT.PIXEL_MEAN / PIXEL_STD in CoOp's configs)
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images (n, h, w, 3) -> normalised float tensor (n, 3, h, w)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255).permute(0, 3, 1, 2)
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_prompts(model, classnames: list[str], template: str) -> torch.Tensor:
    """L2-normalised text features (n_cls, d) of ``template.format(name)`` for every class."""
    device = next(model.parameters()).device
    tokens = tokenize([template.format(c) for c in classnames], model.context_length).to(device)
    feats = model.encode_text(tokens).float()
    return feats / feats.norm(dim=-1, keepdim=True)


@torch.no_grad()
def encode_images(model, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image features (n, d) of uint8 images (n, h, w, 3)."""
    device = next(model.parameters()).device
    dtype = model.visual.conv1.weight.dtype
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_input(images[i:i + batch_size]).to(device, dtype)
        f = model.encode_image(x).float()
        out.append(f / f.norm(dim=-1, keepdim=True))
    return torch.cat(out) if out else torch.empty(0)


def zeroshot_logits(model, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP's logits: cosine similarity x the model's logit scale, (n_img, n_cls)."""
    return model.logit_scale.exp().float().cpu() * image_features.cpu() @ text_features.cpu().t()


def zeroshot_accuracy(model, images: np.ndarray, labels: np.ndarray, classnames: list[str],
                      template: str) -> float:
    """Top-1 accuracy (%) of zero-shot classification of ``images`` among ``classnames``."""
    logits = zeroshot_logits(model, encode_images(model, images), encode_prompts(model, classnames, template))
    return float((logits.argmax(1).numpy() == np.asarray(labels)).mean() * 100)


def load_split_images(dataset_dir: str | Path, name: str, split: str = "test",
                      limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (n, h, w, 3) uint8, labels and class names of a split of a CoOp-format dataset."""
    dataset_dir = Path(dataset_dir)
    with open(dataset_dir / f"split_{name}.json") as f:
        split_file = json.load(f)
    entries = split_file[split]
    names = {lab: cname for _, lab, cname in split_file["train"] + entries}
    if limit is not None:
        entries = entries[:: max(1, len(entries) // limit)][:limit]
    images = np.stack([np.asarray(Image.open(dataset_dir / "images" / rel).convert("RGB")) for rel, _, _ in entries])
    labels = np.array([lab for _, lab, _ in entries])
    return images, labels, [names[i] for i in range(len(names))]


def _accuracy_within(logits: torch.Tensor, labels: np.ndarray, keep: np.ndarray) -> float:
    """Accuracy on the images whose label is in ``keep``, choosing among ``keep`` only."""
    keep = np.asarray(sorted(keep))
    mask = np.isin(labels, keep)
    if not mask.any():
        return float("nan")
    pred = keep[logits[mask][:, keep].argmax(1).numpy()]
    return float((pred == labels[mask]).mean() * 100)


def evaluate_dataset(model, name: str, root: str | Path | None = None, template: str | None = None,
                     limit: int | None = None) -> dict:
    """Zero-shot top-1 (%) on a benchmark dataset's test split: all classes, base and new
    halves (each judged among its own classes), per pretraining tier, and chance levels."""
    from selftpt.benchmark.catalog import WorldDataset, get_dataset, tier_of
    from selftpt.benchmark.materialize import materialize

    spec = get_dataset(name)
    folder = materialize(name, root)
    images, labels, classnames = load_split_images(folder, name, "test", limit)
    template = template or spec.template
    logits = zeroshot_logits(model, encode_images(model, images), encode_prompts(model, classnames, template))
    n = len(classnames)
    m = math.ceil(n / 2)
    result = {
        "dataset": name, "template": template, "n_classes": n, "n_images": int(len(labels)),
        "all": _accuracy_within(logits, labels, np.arange(n)), "chance_all": 100 / n,
        "base": _accuracy_within(logits, labels, np.arange(m)), "chance_base": 100 / m,
        "new": _accuracy_within(logits, labels, np.arange(m, n)), "chance_new": 100 / (n - m),
    }
    if isinstance(spec, WorldDataset):
        pred = logits.argmax(1).numpy()
        for tier in ("common", "rare", "unseen"):
            ids = [i for i, c in enumerate(spec.classes) if tier_of(c) == tier]
            mask = np.isin(labels, ids)
            result[f"tier_{tier}"] = float((pred[mask] == labels[mask]).mean() * 100) if mask.any() else float("nan")
    return result


def main(argv=None) -> None:
    from tabulate import tabulate

    from selftpt.benchmark.catalog import DATASETS
    from selftpt.clip_loader import load_clip

    parser = argparse.ArgumentParser(description="Zero-shot accuracy of a CLIP backbone on the benchmark datasets")
    parser.add_argument("--backbone", default="Bench-RN-T")
    parser.add_argument("--root", default="")
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = load_clip(args.backbone)
    rows = [evaluate_dataset(model, n, args.root or None) for n in (args.datasets or list(DATASETS))]
    cols = ["dataset", "n_classes", "n_images", "all", "chance_all", "base", "new", "chance_base",
            "tier_common", "tier_rare", "tier_unseen"]
    print(tabulate([[r.get(c, "") for c in cols] for r in rows], headers=cols, floatfmt=".1f"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
