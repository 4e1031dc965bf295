"""Staged pretraining of the benchmark's second backbone, ``Bench-RN-S``.

``Bench-RN-T`` (``pretrain.py``: one contrastive stage from scratch) recognises colour but
hardly shape, so no classifier on its features beats the text prior and prompt learning has
no room. This recipe builds the image tower first and the text tower second, as LiT (Zhai et
al. 2022) does, in four stages, every batch a pure function of (seed, stage, step):

1. **clean**: the image tower learns the world's free labels (the main object's colour, shape
   and fill pattern; three linear heads on the L2-normalised image feature) from ``clean``
   renderings (large object, little clutter), where shape is learnt fastest;
2. **photo**: the same on the mixed styles of ``PHOTO_STYLE_MIX`` (mostly ``photo``; a few
   ``clean``, ``sketch``, ``noisy`` and ``pastel``; never ``clutter``, a test-only domain);
   stages 1-2 share one warm-up + cosine schedule;
2b. **refine**: ``refine_steps`` more steps on the photo mix with fresh heads and a schedule of
   their own (the photo accuracy is still rising when stage 2's schedule has decayed; this
   stage lifted the 16-shot probe on ShapeWorld base from 57 to 65%);
3. **text**: the image tower is locked (eval mode, features computed once for a pool of
   images) and only the text tower and the logit scale learn CLIP's contrastive loss against
   captions drawn fresh at every step from ``captions`` (version ``caption_version``), with a
   share of Fashion-MNIST images (whose labels the image tower never saw).

The pretraining tiers of ``catalog.PRETRAIN_TIERS`` hold in every stage: unseen combinations
never appear (not even as distractors) and rare ones a tenth as often. Fashion-MNIST enters only
the text stage, from the same 50,000-image pretraining pool as ``Bench-RN-T``'s.

The architecture (``CLIP_ARCHS["Bench-RN-S"]``) is ``clip.model.CLIP``'s ModifiedResNet at
``image_resolution`` 64: the benchmark's 32-px images are upsampled (PIL bicubic, as the trainers'
``Resize``), so the stem's stride-2 convolution and pooling leave a 16x16 map of the 32-px
image instead of ``Bench-RN-T``'s 8x8, which is what makes shape learnable in the budget.
Trainer configs for this backbone set ``INPUT.SIZE (64, 64)``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selftpt.benchmark import captions, fashion
from selftpt.benchmark.catalog import PRETRAIN_SEED_BASE, PRETRAIN_TIERS, FashionDataset
from selftpt.benchmark.pretrain import contrastive_step
from selftpt.benchmark.world import COLORS, PATTERNS, SHAPES, WORLD_VERSION, SceneSampler, render_scenes
from selftpt.clip_loader import CLIP_ARCHS
from selftpt.text_encoder import encode_text_tokens

log = logging.getLogger("selftpt.benchmark.staged")

BACKBONE_NAME = "Bench-RN-S"
ASSET_FILE = "bench_rn_small.pt"
ARCH = CLIP_ARCHS[BACKBONE_NAME]
PHOTO_STYLE_MIX = {"photo": 0.6, "clean": 0.15, "sketch": 0.09, "noisy": 0.08, "pastel": 0.08}
PATTERN_PROB = 0.45
STAGE_SEEDS = {"clean": 1, "photo": 2, "pool": 3, "text": 4, "fashion": 5, "refine": 6}
COLOR_NAMES = list(COLORS)


@dataclass(frozen=True)
class Recipe:
    """Every setting of the staged pretraining (recorded in the asset's JSON sidecar)."""

    seed: int = 1
    batch_size: int = 128
    clean_steps: int = 1200
    photo_steps: int = 300
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 50
    head_scale: float = 16.0  # heads read the L2-normalised feature times this
    pattern_weight: float = 0.5
    photo_style_mix: dict = field(default_factory=lambda: dict(PHOTO_STYLE_MIX))
    refine_steps: int = 500  # stage 2b: fresh heads, the photo mix again, its own cosine schedule
    refine_lr: float = 1e-3
    refine_warmup: int = 20
    text_steps: int = 300
    text_batch: int = 256
    text_lr: float = 1e-3
    text_weight_decay: float = 0.1
    text_warmup: int = 20
    pool_world: int = 12000  # images whose locked features the text stage pairs with captions
    pool_fashion: int = 2000
    caption_version: int = 3


# --------------------------------------------------------------------------------- the data

def _weights(keys) -> np.ndarray:
    from selftpt.benchmark.catalog import RARE_WEIGHT

    w = np.array([{"unseen": 0.0, "rare": RARE_WEIGHT}.get(PRETRAIN_TIERS.get(k, "common"), 1.0) for k in keys])
    return w / w.sum()


_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
_PAIR_P = _weights(_PAIRS)
_PATTERN_P = {s: _weights([(p, s) for p in PATTERNS[1:]]) for s in SHAPES}
_SAMPLER = SceneSampler(excluded_pairs=frozenset(k for k, t in PRETRAIN_TIERS.items() if t == "unseen"))


def draw_scenes(rng: np.random.Generator, n: int, style_mix: dict):
    """``n`` pretraining scenes (tiers respected) and their rendered uint8 32-px images."""
    idx = rng.choice(len(_PAIRS), size=n, p=_PAIR_P)
    colors = [_PAIRS[i][0] for i in idx]
    shapes = [_PAIRS[i][1] for i in idx]
    styles = list(rng.choice(list(style_mix), size=n, p=np.array(list(style_mix.values())) / sum(style_mix.values())))
    patterns = ["solid" if st == "sketch" or rng.random() >= PATTERN_PROB
                else PATTERNS[1 + int(rng.choice(len(PATTERNS) - 1, p=_PATTERN_P[s]))]
                for s, st in zip(shapes, styles)]
    scenes = _SAMPLER.sample(rng, n, colors=colors, shapes=shapes, patterns=patterns, styles=styles)
    return scenes, render_scenes(scenes)


def to_input(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 32-px images -> the model's normalised input at ``resolution`` (PIL bicubic)."""
    from selftpt.benchmark.quality import resize_images
    from selftpt.benchmark.zeroshot import to_model_input

    return to_model_input(resize_images(images, resolution))


class SupervisedBatches(torch.utils.data.Dataset):
    """Batch ``i`` of a supervised stage: (images, colour, shape, pattern labels)."""

    def __init__(self, recipe: Recipe, stage: str, steps: int, resolution: int):
        self.recipe, self.stage, self.steps, self.resolution = recipe, stage, steps, resolution

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        rng = np.random.default_rng([PRETRAIN_SEED_BASE, self.recipe.seed, STAGE_SEEDS[self.stage], step])
        mix = {"clean": 1.0} if self.stage == "clean" else self.recipe.photo_style_mix
        scenes, images = draw_scenes(rng, self.recipe.batch_size, mix)
        return (to_input(images, self.resolution),
                torch.tensor([COLOR_NAMES.index(c) for c in scenes.color]),
                torch.tensor([SHAPES.index(s) for s in scenes.shape]),
                torch.tensor([PATTERNS.index(p) for p in scenes.pattern]))


def _worker_init(_):
    torch.set_num_threads(1)


def _schedule(opt, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))


def _param_groups(params, weight_decay: float):
    decay = [p for _, p in params if p.ndim >= 2]
    rest = [p for _, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------- stages

def train_image_tower(model, recipe: Recipe, workers: int = 1, progress=None) -> dict:
    """Stages 1-2: the image tower learns colour, shape and pattern of the main object."""
    visual = model.visual
    res = visual.input_resolution
    dim = visual.attnpool.c_proj.out_features
    torch.manual_seed(recipe.seed)
    heads = torch.nn.Linear(dim, len(COLORS) + len(SHAPES) + len(PATTERNS), bias=True)
    steps = recipe.clean_steps + recipe.photo_steps
    params = list(visual.named_parameters()) + list(heads.named_parameters())
    opt = torch.optim.AdamW(_param_groups(params, recipe.weight_decay), lr=recipe.lr)
    sched = _schedule(opt, steps, recipe.warmup)
    visual.train()
    nc, ns = len(COLORS), len(SHAPES)
    history, start, step = [], time.time(), 0
    for stage, n in (("clean", recipe.clean_steps), ("photo", recipe.photo_steps)):
        if n == 0:
            continue
        loader = torch.utils.data.DataLoader(
            SupervisedBatches(recipe, stage, n, res), batch_size=None, shuffle=False, num_workers=workers,
            worker_init_fn=_worker_init if workers else None, prefetch_factor=4 if workers else None)
        for x, yc, ys, yp in loader:
            f = visual(x)
            out = recipe.head_scale * F.normalize(f, dim=-1) @ heads.weight.t() + heads.bias
            lc = F.cross_entropy(out[:, :nc], yc)
            ls = F.cross_entropy(out[:, nc:nc + ns], ys)
            lp = F.cross_entropy(out[:, nc + ns:], yp)
            loss = lc + ls + recipe.pattern_weight * lp
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            acc_s = float((out[:, nc:nc + ns].argmax(1) == ys).float().mean())
            acc_c = float((out[:, :nc].argmax(1) == yc).float().mean())
            history.append((loss.item(), acc_c, acc_s))
            step += 1
            if step % 100 == 0 or step == steps:
                h = np.mean(history[-50:], axis=0)
                log.info("%s step %d/%d loss %.3f colour %.2f shape %.2f (%.0fs)", stage, step, steps, *h,
                         time.time() - start)
                if progress:
                    progress(stage, step, model)
    visual.eval()
    curve = [[round(float(v), 3) for v in np.mean(history[i:i + 100], axis=0)] for i in range(0, len(history), 100)]
    return {"image_seconds": round(time.time() - start, 1), "image_curve_loss_colour_shape": curve}


def refine_image_tower(model, recipe: Recipe, workers: int = 1) -> dict:
    """Stage 2b: ``refine_steps`` more steps on the photo mix with freshly initialised heads and
    a new warm-up + cosine schedule at ``refine_lr`` (the photo stage's accuracy is still rising
    when its schedule has decayed)."""
    visual = model.visual
    res = visual.input_resolution
    dim = visual.attnpool.c_proj.out_features
    torch.manual_seed(recipe.seed + 1000)
    heads = torch.nn.Linear(dim, len(COLORS) + len(SHAPES) + len(PATTERNS), bias=True)
    params = list(visual.named_parameters()) + list(heads.named_parameters())
    opt = torch.optim.AdamW(_param_groups(params, recipe.weight_decay), lr=recipe.refine_lr)
    sched = _schedule(opt, recipe.refine_steps, recipe.refine_warmup)
    visual.train()
    nc, ns = len(COLORS), len(SHAPES)
    history, start = [], time.time()
    loader = torch.utils.data.DataLoader(
        SupervisedBatches(recipe, "refine", recipe.refine_steps, res), batch_size=None, shuffle=False,
        num_workers=workers, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None)
    for step, (x, yc, ys, yp) in enumerate(loader, 1):
        out = recipe.head_scale * F.normalize(visual(x), dim=-1) @ heads.weight.t() + heads.bias
        loss = (F.cross_entropy(out[:, :nc], yc) + F.cross_entropy(out[:, nc:nc + ns], ys)
                + recipe.pattern_weight * F.cross_entropy(out[:, nc + ns:], yp))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append((loss.item(), float((out[:, :nc].argmax(1) == yc).float().mean()),
                        float((out[:, nc:nc + ns].argmax(1) == ys).float().mean())))
        if step % 100 == 0 or step == recipe.refine_steps:
            log.info("refine step %d/%d loss %.3f colour %.2f shape %.2f (%.0fs)", step, recipe.refine_steps,
                     *np.mean(history[-50:], axis=0), time.time() - start)
    visual.eval()
    curve = [[round(float(v), 3) for v in np.mean(history[i:i + 100], axis=0)] for i in range(0, len(history), 100)]
    return {"refine_seconds": round(time.time() - start, 1), "refine_curve_loss_colour_shape": curve}


def make_pool(model, recipe: Recipe, fashion_pool) -> dict:
    """The text stage's images: scenes and locked features (world), and Fashion-MNIST picks."""
    rng = np.random.default_rng([PRETRAIN_SEED_BASE, recipe.seed, STAGE_SEEDS["pool"]])
    from selftpt.benchmark.quality import encode

    scenes_all, feats = [], []
    chunk = 1000
    for i in range(0, recipe.pool_world, chunk):
        scenes, images = draw_scenes(rng, min(chunk, recipe.pool_world - i), recipe.photo_style_mix)
        scenes_all.append(scenes)
        feats.append(encode(model, images))
    world = [(sc.color[i], sc.shape[i], sc.pattern[i], sc.style[i], float(sc.size[i]), sc.distractors[i],
              sc.background_color[i], sc.background[i]) for sc in scenes_all for i in range(len(sc.color))]
    pool = {"world": world, "world_feats": torch.cat(feats)}
    if fashion_pool is not None and recipe.pool_fashion:
        fx, fy = fashion_pool
        frng = np.random.default_rng([PRETRAIN_SEED_BASE, recipe.seed, STAGE_SEEDS["fashion"]])
        pick = frng.choice(len(fy), size=recipe.pool_fashion, replace=False)
        images = fashion.to_rgb32(fx[pick])
        flip = frng.random(len(pick)) < 0.5
        images[flip] = images[flip][:, :, ::-1]
        pool["fashion_labels"] = fy[pick]
        pool["fashion_feats"] = encode(model, images)
    return pool


def train_text_tower(model, recipe: Recipe, pool: dict, progress=None) -> dict:
    """Stage 3 (LiT): only the text tower and the logit scale learn; image features are fixed."""
    import clip

    caption = captions.world_caption_version(recipe.caption_version)
    fashion_caption = captions.fashion_caption_version(recipe.caption_version)
    fashion_names = FashionDataset().classnames
    text_params = [(n, p) for n, p in model.named_parameters() if not n.startswith("visual.")]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("visual."))
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in text_params if p.ndim >= 2 and "embedding" not in n],
          "weight_decay": recipe.text_weight_decay},
         {"params": [p for n, p in text_params if p.ndim < 2 or "embedding" in n], "weight_decay": 0.0}],
        lr=recipe.text_lr, betas=(0.9, 0.98), eps=1e-6)
    sched = _schedule(opt, recipe.text_steps, recipe.text_warmup)
    model.transformer.train()
    n_world = len(pool["world"])
    n_fashion = len(pool.get("fashion_labels", ()))
    total = n_world + n_fashion
    labels = torch.arange(recipe.text_batch)
    history, start = [], time.time()
    for step in range(recipe.text_steps):
        rng = np.random.default_rng([PRETRAIN_SEED_BASE, recipe.seed, STAGE_SEEDS["text"], step])
        pick = rng.choice(total, size=recipe.text_batch, replace=False)
        texts, feats = [], []
        for i in pick:
            if i < n_world:
                texts.append(caption(rng, *pool["world"][i]))
                feats.append(pool["world_feats"][i])
            else:
                j = i - n_world
                texts.append(fashion_caption(rng, fashion_names[int(pool["fashion_labels"][j])]))
                feats.append(pool["fashion_feats"][j])
        img = torch.stack(feats)
        tokens = clip.tokenize(texts, context_length=model.context_length, truncate=True)
        txt = encode_text_tokens(model, tokens)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        history.append(contrastive_step(model, img, txt, labels, opt, sched))
        if (step + 1) % 50 == 0 or step + 1 == recipe.text_steps:
            log.info("text step %d/%d loss %.3f scale %.1f (%.0fs)", step + 1, recipe.text_steps,
                     np.mean(history[-50:]), model.logit_scale.exp().item(), time.time() - start)
            if progress:
                progress("text", step + 1, model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"text_seconds": round(time.time() - start, 1),
            "text_curve": [round(float(np.mean(history[i:i + 50])), 4) for i in range(0, len(history), 50)]}


def build_model(seed: int):
    from clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**ARCH).float()


def load_fashion_pool():
    fx, fy = fashion.load_split("train")
    n = FashionDataset().pretrain_pool
    return fx[:n], fy[:n]


IMAGE_STAGE_KEYS = ("seed", "batch_size", "clean_steps", "photo_steps", "lr", "weight_decay", "warmup",
                    "head_scale", "pattern_weight", "photo_style_mix")


def image_stage_key(recipe: Recipe, refine: bool = False) -> str:
    """A name for the image tower that stages 1-2 (and 2b) of ``recipe`` produce (for ``image_cache``)."""
    import hashlib

    keys = IMAGE_STAGE_KEYS + (("refine_steps", "refine_lr", "refine_warmup") if refine else ())
    settings = json.dumps({k: getattr(recipe, k) for k in keys}, sort_keys=True)
    return f"{BACKBONE_NAME}-w{WORLD_VERSION}-{hashlib.sha1(settings.encode()).hexdigest()[:12]}"


def _clock() -> tuple[float, float, float]:
    t = os.times()
    return time.time(), t.user + t.system, t.children_user + t.children_system


def _since(start: tuple[float, float, float]) -> dict:
    """Wall and CPU seconds (this process; its finished data-loading workers) since ``start``."""
    now = _clock()
    return {"wall_seconds": round(now[0] - start[0], 1), "cpu_seconds_process": round(now[1] - start[1], 1),
            "cpu_seconds_workers": round(now[2] - start[2], 1)}


def _stage_times(saved: dict) -> dict:
    """A cached stage's record with its times under ``_since``'s names (scratch runs of the
    exploration named them wall_total / cpu_self / cpu_children)."""
    renamed = {"wall_total": "wall_seconds", "cpu_self": "cpu_seconds_process", "cpu_children": "cpu_seconds_workers"}
    return {renamed.get(k, k): (round(v, 1) if isinstance(v, float) else v) for k, v in saved.items()}


def pretrain_staged(out: str | os.PathLike, recipe: Recipe = Recipe(), workers: int = 1, threads: int = 1,
                    use_fashion: bool = True, evaluate: bool = True, eval_root: str | None = None,
                    image_cache: str | os.PathLike | None = None) -> dict:
    """Run the three stages, save the fp16 state_dict and its JSON sidecar; returns the record.

    ``image_cache``: a folder where the image tower after stages 1-2 is kept (fp32, keyed by the
    image-stage settings) and read back by a later run with the same settings, so that text-stage
    settings can be compared without training the image tower again. Off by default.
    """
    from selftpt.clip_loader import save_state_dict

    torch.set_num_threads(threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wall0 = time.time()
    model = build_model(recipe.seed)
    log.info("pretraining %s (staged): %s", BACKBONE_NAME, recipe)
    record = {"backbone": BACKBONE_NAME, "recipe": "staged", "arch": ARCH, "world_version": WORLD_VERSION,
              "settings": asdict(recipe), "fashion": use_fashion, "threads": threads, "workers": workers,
              "stages": {}}
    phases = [("image", False, train_image_tower)]
    if recipe.refine_steps:
        phases.append(("refine", True, refine_image_tower))
    for name, refine, train in phases:
        cached = Path(image_cache) / f"{image_stage_key(recipe, refine)}.pt" if image_cache else None
        if cached is not None and cached.is_file():
            saved = torch.load(cached, map_location="cpu", weights_only=True)
            model.visual.load_state_dict(saved["visual"])
            model.visual.eval()
            record["stages"][name] = {**_stage_times(saved["record"]), "from_cache": str(cached)}
            log.info("%s stage: image tower read from %s", name, cached)
            continue
        start = _clock()
        info = train(model, recipe, workers)
        info.update(_since(start))
        record["stages"][name] = info
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"visual": model.visual.state_dict(), "record": info}, cached)
    start = _clock()
    pool = make_pool(model, recipe, load_fashion_pool() if use_fashion else None)
    record["stages"]["text"] = {**train_text_tower(model, recipe, pool), **_since(start)}
    record["this_run_wall_seconds"] = round(time.time() - wall0, 1)
    stages = record["stages"].values()
    record["wall_seconds"] = round(sum(st["wall_seconds"] for st in stages), 1)  # cached stages: their own run
    record["cpu_seconds"] = round(sum(st["cpu_seconds_process"] + st["cpu_seconds_workers"] for st in stages), 1)
    model.eval().half()
    save_state_dict(model, out, half=False)
    record.update({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                   "file_mb": round(out.stat().st_size / 2 ** 20, 2)})
    log.info("saved %s (%.1f MiB): stages %.0fs wall, %.0fs CPU", out, record["file_mb"], record["wall_seconds"],
             record["cpu_seconds"])
    if evaluate:
        from selftpt.benchmark.quality import evaluate_asset

        record["quality"] = evaluate_asset(out, use_fashion, eval_root)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record
