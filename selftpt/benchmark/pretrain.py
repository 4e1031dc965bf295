"""Pretrain the benchmark's tiny CLIP on captioned images of the world and Fashion-MNIST.

The model is OpenAI's ``clip.model.CLIP`` with small dimensions (``BENCH_ARCH``), the real
BPE tokenizer (vocabulary 49408) and CLIP's contrastive loss, so every loader, prompt learner
and trainer path downstream is the real one. Data ("the web"):

* world scenes (``world.py``) with noisy partial captions (``captions.py``): the main object's
  (colour, shape) drawn over all 12 x 14 combinations, except that the *unseen* combinations
  of ``catalog.PRETRAIN_TIERS`` never appear (not even as distractors) and the *rare* ones
  appear a tenth as often; styles ``STYLE_MIX``: mostly ``clean`` (large object, little
  clutter: shape is learnt far faster from those) and ``photo``, a few ``sketch``, ``noisy``
  and ``pastel`` renderings, never ``clutter``;
* 15% Fashion-MNIST: the first 50,000 training images (the benchmark's Fashion-MNIST dataset
  uses the rest and the official test set) with clothing captions.

Every batch is a pure function of (seed, step), so runs are reproducible whatever the number
of data-loading workers. Usage::

    python -m selftpt.benchmark.pretrain --out selftpt/assets/bench_rn_tiny.pt [--steps N]

writes the fp16 state_dict (``clip_loader.save_state_dict``) and a JSON sidecar with the
settings, the time taken and the zero-shot accuracy on every benchmark dataset.

``--recipe staged`` pretrains the second backbone, ``Bench-RN-S``, instead (``staged.py``:
supervised image tower on the world's free labels, clean then mixed styles, then the text tower
against the locked image tower)::

    python -m selftpt.benchmark.pretrain --recipe staged --out selftpt/assets/bench_rn_small.pt

``--recipe distilled`` makes the benchmark's ViT, ``Bench-ViT-S`` (``distill.py``: Bench-RN-S's
text tower, a ViT image tower distilled from Bench-RN-S's image features)::

    python -m selftpt.benchmark.pretrain --recipe distilled
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from selftpt.benchmark import captions, fashion
from selftpt.benchmark.catalog import DATASETS, PRETRAIN_SEED_BASE, PRETRAIN_TIERS, RARE_WEIGHT, FashionDataset
from selftpt.benchmark.world import COLORS, PATTERNS, SHAPES, WORLD_VERSION, SceneSampler, render_scenes
from selftpt.benchmark.zeroshot import to_model_input
from selftpt.clip_loader import CLIP_ARCHS
from selftpt.text_encoder import encode_text_tokens

log = logging.getLogger("selftpt.benchmark.pretrain")

BACKBONE_NAME = "Bench-RN-T"
ASSET_FILE = "bench_rn_tiny.pt"
# clip.model.CLIP arguments (see CLIP_ARCHS). Context 32 fits a 16-token CoOp context, a class
# name of up to 13 tokens and SOS/EOS.
BENCH_ARCH = CLIP_ARCHS[BACKBONE_NAME]
STYLE_MIX = {"clean": 0.6, "photo": 0.26, "sketch": 0.05, "noisy": 0.05, "pastel": 0.04}
PATTERN_PROB = 0.45  # share of main objects with a non-solid fill
FASHION_FRACTION = 0.15


def contrastive_step(model: torch.nn.Module, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor,
                     opt: torch.optim.Optimizer, sched: Any) -> float:
    """One CLIP training step on L2-normalised image and text features: the symmetric
    cross-entropy of their scaled cosines, the optimiser and scheduler steps, and CLIP's clamp
    of the logit scale at 100. Returns the loss."""
    logits = model.logit_scale.exp() * img @ txt.t()
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


# --------------------------------------------------------------------------------- the data


def _main_object_table() -> tuple[list[tuple[str, str]], np.ndarray]:
    """All (colour, shape) pairs with their sampling weights (unseen 0, rare RARE_WEIGHT)."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    w = np.array([{"unseen": 0.0, "rare": RARE_WEIGHT}.get(PRETRAIN_TIERS.get(p, "common"), 1.0) for p in pairs])
    return pairs, w / w.sum()


def _pattern_weights(shape: str) -> np.ndarray:
    w = np.array([{"unseen": 0.0, "rare": RARE_WEIGHT}.get(PRETRAIN_TIERS.get((p, shape), "common"), 1.0)
                  for p in PATTERNS[1:]])
    return w / w.sum()


class CaptionedBatches(torch.utils.data.Dataset):
    """Batch ``i`` = (images (B, 3, 32, 32) normalised, tokens (B, ctx)), a function of (seed, i).

    Args:
        seed: run seed.
        batch_size: pairs per batch.
        context_length: tokenizer context.
        fashion_pool: (images (n, 28, 28), labels) used for pretraining, or None to skip.
    """

    def __init__(self, seed: int, batch_size: int, context_length: int, steps: int,
                 fashion_pool: tuple[np.ndarray, np.ndarray] | None):
        self.seed, self.batch_size, self.context_length, self.steps = seed, batch_size, context_length, steps
        self.fashion_pool = fashion_pool
        self.pairs, self.pair_p = _main_object_table()
        excluded = frozenset(k for k, t in PRETRAIN_TIERS.items() if t == "unseen")
        self.sampler = SceneSampler(excluded_pairs=excluded)
        self.fashion_names = FashionDataset().classnames

    def __len__(self) -> int:
        return self.steps

    def make(self, step: int) -> tuple[np.ndarray, list[str], dict]:
        """uint8 images (B, 32, 32, 3), captions, and what was drawn (for checks)."""
        import clip  # noqa: F401  (tokenizer import kept lazy for worker start-up)

        rng = np.random.default_rng([PRETRAIN_SEED_BASE, self.seed, step])
        b = self.batch_size
        n_fashion = int(rng.binomial(b, FASHION_FRACTION)) if self.fashion_pool is not None else 0
        n_world = b - n_fashion
        idx = rng.choice(len(self.pairs), size=n_world, p=self.pair_p)
        colors = [self.pairs[i][0] for i in idx]
        shapes = [self.pairs[i][1] for i in idx]
        patterns = [
            "solid" if rng.random() >= PATTERN_PROB
            else PATTERNS[1 + int(rng.choice(len(PATTERNS) - 1, p=_pattern_weights(s)))]
            for s in shapes
        ]
        styles = list(rng.choice(list(STYLE_MIX), size=n_world, p=list(STYLE_MIX.values())))
        patterns = ["solid" if st == "sketch" else p for p, st in zip(patterns, styles)]
        scenes = self.sampler.sample(rng, n_world, colors=colors, shapes=shapes, patterns=patterns, styles=styles)
        images = [render_scenes(scenes)]
        texts = [
            captions.world_caption(rng, scenes.color[i], scenes.shape[i], scenes.pattern[i], scenes.style[i],
                                   float(scenes.size[i]), scenes.distractors[i], scenes.background_color[i])
            for i in range(n_world)
        ]
        drawn = {"pairs": list(zip(colors, shapes)), "patterns": list(zip(patterns, shapes)),
                 "distractors": [d for ds in scenes.distractors for d in ds]}
        if n_fashion:
            fx, fy = self.fashion_pool
            pick = rng.integers(0, len(fy), n_fashion)
            fimg = fashion.to_rgb32(fx[pick])
            flip = rng.random(n_fashion) < 0.5
            fimg[flip] = fimg[flip][:, :, ::-1]
            images.append(fimg)
            texts += [captions.fashion_caption(rng, self.fashion_names[int(fy[i])]) for i in pick]
        order = rng.permutation(b)
        images = np.concatenate(images)[order]
        texts = [texts[i] for i in order]
        return images, texts, drawn

    def __getitem__(self, step: int):
        import clip

        images, texts, _ = self.make(step)
        tokens = clip.tokenize(texts, context_length=self.context_length, truncate=True)
        return to_model_input(images), tokens


def _worker_init(_):
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------- the model

def build_model(seed: int) -> torch.nn.Module:
    from clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**BENCH_ARCH).float().train()


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "ln_" in name or name in ("logit_scale", "class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(out: str | os.PathLike, steps: int = 1200, batch_size: int = 128, lr: float = 1e-3,
             weight_decay: float = 0.1, warmup: int = 50, seed: int = 1, workers: int = 1,
             threads: int = 1, use_fashion: bool = True, eval_root: str | None = None,
             evaluate: bool = True) -> dict:
    """Pretrain and save the tiny CLIP; returns the run's record (also written as JSON).

    Args:
        out: path of the fp16 state_dict to write (its ``.json`` sidecar goes beside it).
        steps, batch_size, lr, weight_decay, warmup: AdamW with linear warm-up, cosine decay.
        seed: seeds the initialisation and the data stream.
        workers: data-rendering processes (0 = render in the training process).
        threads: torch threads for training (1 + one rendering worker fills two cores, and
            stays fast when other processes share them; 2 threads then run ~3x slower).
        use_fashion: include Fashion-MNIST in the corpus (needs its files, see fashion.py).
        eval_root: dataset root for the final zero-shot evaluation (default root if None).
        evaluate: run the zero-shot evaluation on every benchmark dataset at the end.
    """
    from selftpt.clip_loader import save_state_dict

    torch.set_num_threads(threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pool = None
    if use_fashion:
        fx, fy = fashion.load_split("train")
        n = FashionDataset().pretrain_pool
        pool = (fx[:n], fy[:n])
    data = CaptionedBatches(seed, batch_size, BENCH_ARCH["context_length"], steps, pool)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                         worker_init_fn=_worker_init if workers else None,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    model = build_model(seed)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    log.info("pretraining %s: %d steps x %d pairs, lr %g, seed %d, %d threads, %d workers",
             BACKBONE_NAME, steps, batch_size, lr, seed, threads, workers)
    start = time.time()
    labels = torch.arange(batch_size)
    history = []
    bar = tqdm(loader, total=steps, desc="pretrain", dynamic_ncols=True)
    for step, (images, tokens) in enumerate(bar):
        img = model.encode_image(images)
        txt = encode_text_tokens(model, tokens)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        history.append(contrastive_step(model, img, txt, labels, opt, sched))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-10:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f (%.0fs)", step + 1, steps, np.mean(history[-50:]), time.time() - start)
    seconds = time.time() - start
    model.eval().half()  # every tensor in fp16, the token embedding too (half the file)
    save_state_dict(model, out, half=False)
    record = {
        "backbone": BACKBONE_NAME, "arch": BENCH_ARCH, "world_version": WORLD_VERSION,
        "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
        "seed": seed, "fashion": use_fashion, "fashion_fraction": FASHION_FRACTION if use_fashion else 0.0,
        "style_mix": STYLE_MIX, "train_seconds": round(seconds, 1), "threads": threads, "workers": workers,
        "final_loss": float(np.mean(history[-50:])), "loss_curve": [round(float(np.mean(history[i:i + 50])), 4)
                                                                     for i in range(0, len(history), 50)],
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "file_mb": round(out.stat().st_size / 2 ** 20, 2),
    }
    log.info("saved %s (%.1f MiB) after %.0fs", out, record["file_mb"], seconds)
    if evaluate:
        from selftpt.benchmark.zeroshot import evaluate_dataset
        from selftpt.clip_loader import load_clip

        evaluated = load_clip(str(out))  # through the normal loading path, fp16 weights -> fp32
        names = [n for n in DATASETS if use_fashion or n != "FashionMNIST"]
        record["zeroshot"] = {n: evaluate_dataset(evaluated, n, eval_root) for n in names}
        for n, r in record["zeroshot"].items():
            log.info("zero-shot %-18s all %5.1f (chance %4.1f)  base %5.1f  new %5.1f", n, r["all"],
                     r["chance_all"], r["base"], r["new"])
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record


def main(argv=None) -> None:
    from selftpt.benchmark import distill, staged

    parser = argparse.ArgumentParser(description="Pretrain the benchmark's tiny CLIP (" + BACKBONE_NAME
                                     + ", " + staged.BACKBONE_NAME + " with --recipe staged, "
                                     + distill.BACKBONE_NAME + " with --recipe distilled)")
    parser.add_argument("--recipe", choices=("contrastive", "staged", "distilled"), default="contrastive",
                        help="contrastive: " + BACKBONE_NAME + " (this module); staged: "
                        + staged.BACKBONE_NAME + " (staged.py); distilled: " + distill.BACKBONE_NAME
                        + " (distill.py, from the staged recipe's asset)")
    parser.add_argument("--out", default="", help="state_dict to write [the recipe's file in selftpt/assets]")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"contrastive and distilled recipes [1200; distilled {distill.Recipe.steps}]")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"[128; distilled {distill.Recipe.batch_size}]")
    parser.add_argument("--lr", type=float, default=1e-3, help="contrastive recipe only")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-fashion", action="store_true", help="pretrain without Fashion-MNIST")
    parser.add_argument("--eval-root", default="", help="dataset root for the final zero-shot evaluation")
    parser.add_argument("--no-eval", action="store_true")
    defaults = staged.Recipe()
    staged_options = ("clean_steps", "photo_steps", "refine_steps", "text_steps", "text_batch", "pool_world",
                      "pool_fashion", "caption_version")
    for name in staged_options:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                            help=f"staged recipe only [{getattr(defaults, name)}]")
    parser.add_argument("--image-cache", default="",
                        help="staged recipe only: folder keeping the image tower after stages 1-2 (keyed by "
                        "their settings) and reading it back when present [off]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    assets = Path(__file__).resolve().parents[1] / "assets"
    if args.recipe == "distilled":
        given = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
        distill.pretrain_distilled(args.out or assets / distill.ASSET_FILE, distill.Recipe(seed=args.seed, **given),
                                   workers=args.workers, threads=args.threads, use_fashion=not args.no_fashion,
                                   evaluate=not args.no_eval, eval_root=args.eval_root or None)
        return
    args.batch_size = args.batch_size or 128
    if args.recipe == "staged":
        recipe = staged.Recipe(seed=args.seed, batch_size=args.batch_size,
                               **{k: getattr(args, k) for k in staged_options})
        staged.pretrain_staged(args.out or assets / staged.ASSET_FILE, recipe, workers=args.workers,
                               threads=args.threads, use_fashion=not args.no_fashion,
                               evaluate=not args.no_eval, eval_root=args.eval_root or None,
                               image_cache=args.image_cache or None)
        return
    steps = 1200 if args.steps is None else args.steps
    pretrain(args.out or str(assets / ASSET_FILE), steps=steps, batch_size=args.batch_size, lr=args.lr,
             seed=args.seed, workers=args.workers, threads=args.threads, use_fashion=not args.no_fashion,
             eval_root=args.eval_root or None, evaluate=not args.no_eval)


if __name__ == "__main__":
    main()
