"""The benchmark's ViT backbone, ``Bench-ViT-S``, distilled from ``Bench-RN-S``.

MaPLe, PromptSRC, their +TPT variants and PromptAlign prompt the layers of a ViT image tower,
which neither ResNet benchmark backbone has. Training a tiny ViT from scratch with
``staged.py``'s recipe learns shape far more slowly on two cores (shape top-1 0.12 against the
ResNet's 0.21 after 300 steps, at 1.7x the time per step), so this recipe distils instead:

* the **text tower** (token and positional embeddings, transformer, projection, logit scale) is
  ``Bench-RN-S``'s, copied unchanged: the two backbones read class names identically;
* the **image tower** is ``clip.model.VisionTransformer`` (``CLIP_ARCHS["Bench-ViT-S"]``: 4 layers
  of width 128, patch 16 at 64 px, so 4x4 patches of the 32-px images upsampled as the trainers'
  ``Resize`` does), trained from a random start on images drawn fresh at every step: the photo
  mix of ``staged.py`` (never ``clutter``, the test-only domain; the pretraining tiers hold) and
  a share of the Fashion-MNIST pretraining pool (random horizontal flips), as the teacher's text
  stage saw. Its loss, per image, is the sum of
  - ``1 - cosine`` between the student's and the teacher's image features;
  - ``kd_weight`` x the KL divergence from the teacher's to the student's softmax over a fixed
    bank of pretraining captions (``caption_bank``) at CLIP's logit scale: the directions the
    text tower reads weigh most;
  - ``hint_weight`` x intermediate hints (``HINTS``, FitNets): patch tokens after student blocks
    2 and 4, through linear maps trained alongside and discarded, against the teacher's ResNet
    stages 2 and 3 pooled to the patch grid.

The student is aligned with the text tower only as far as it matches the teacher, so its
quality is measured exactly as the teacher's (``quality.quality_table``) and recorded in the JSON
sidecar; ``docs/benchmark.md`` has the candidates compared and why this one. Every batch is a
pure function of (seed, step). Usage::

    python -m selftpt.benchmark.pretrain --recipe distilled    # writes selftpt/assets/bench_vit_small.pt
"""
from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from selftpt.benchmark import fashion
from selftpt.benchmark.catalog import PRETRAIN_SEED_BASE
from selftpt.benchmark.staged import PHOTO_STYLE_MIX, draw_scenes, to_input
from selftpt.benchmark.world import WORLD_VERSION
from selftpt.clip_loader import CLIP_ARCHS

log = logging.getLogger("selftpt.benchmark.distill")

BACKBONE_NAME = "Bench-ViT-S"
ASSET_FILE = "bench_vit_small.pt"
ARCH = CLIP_ARCHS[BACKBONE_NAME]
STEP_SEED = 7  # distinct from staged.STAGE_SEEDS: the student never sees the teacher's batches again
BANK_SEED = 8
# Intermediate hints (FitNets, Romero et al. 2015): the patch tokens after student block i are
# matched, through a linear map trained alongside and then discarded, to the teacher's ResNet
# stage output average-pooled to the student's patch grid.
HINTS = ((1, "layer2"), (3, "layer3"))


@dataclass(frozen=True)
class Recipe:
    """Every setting of the distillation (recorded in the asset's JSON sidecar)."""

    seed: int = 1
    teacher: str = "Bench-RN-S"
    steps: int = 3000
    batch_size: int = 128
    fashion_share: float = 0.1  # of each batch, from the Fashion-MNIST pretraining pool
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    style_mix: dict = field(default_factory=lambda: dict(PHOTO_STYLE_MIX))
    eval_every: int = 500  # steps between zero-shot checks on ShapeWorld base (logged, recorded)
    kd_weight: float = 1.0  # weight of the caption-bank term (caption_bank); 0 = the cosine alone
    bank_size: int = 4096  # pretraining captions whose similarities to an image the student matches
    caption_version: int = 3
    hint_weight: float = 1.0  # weight of the intermediate-map term (HINTS); 0 = off


class DistillBatches(torch.utils.data.Dataset):
    """Batch ``i``: the student's input images (world photo mix + Fashion-MNIST share)."""

    def __init__(self, recipe: Recipe, resolution: int, fashion_pool: np.ndarray | None):
        self.recipe, self.resolution, self.fashion_pool = recipe, resolution, fashion_pool

    def __len__(self) -> int:
        return self.recipe.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([PRETRAIN_SEED_BASE, self.recipe.seed, STEP_SEED, step])
        n_fashion = round(self.recipe.batch_size * self.recipe.fashion_share) if self.fashion_pool is not None else 0
        _, images = draw_scenes(rng, self.recipe.batch_size - n_fashion, self.recipe.style_mix)
        if n_fashion:
            picked = fashion.to_rgb32(self.fashion_pool[rng.choice(len(self.fashion_pool), n_fashion, replace=False)])
            flip = rng.random(n_fashion) < 0.5
            picked[flip] = picked[flip][:, :, ::-1]
            images = np.concatenate([images, picked])
        return to_input(images, self.resolution)


def build_student(teacher, seed: int):
    """A ``Bench-ViT-S`` CLIP: random image tower, the teacher's text tower and logit scale."""
    from clip.model import CLIP

    torch.manual_seed(seed)
    student = CLIP(**ARCH).float()
    text_state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("visual.")}
    missing, unexpected = student.load_state_dict(text_state, strict=False)
    if unexpected or any(not k.startswith("visual.") for k in missing):
        raise RuntimeError(f"teacher {teacher!r} and {BACKBONE_NAME} text towers differ: "
                           f"missing {missing}, unexpected {unexpected}")
    return student


@torch.no_grad()
def caption_bank(teacher, recipe: Recipe, fashion_names: list[str] | None) -> torch.Tensor:
    """L2-normalised text features (``bank_size``, d) of captions of fresh pretraining scenes (the
    photo mix; captions of ``caption_version``, as the teacher's text stage drew them) and, in
    ``fashion_share``, of Fashion-MNIST class names: the directions the caption-bank term compares
    the student's and the teacher's image features along."""
    import clip

    from selftpt.benchmark import captions
    from selftpt.text_encoder import encode_text_tokens

    rng = np.random.default_rng([PRETRAIN_SEED_BASE, recipe.seed, BANK_SEED])
    n_fashion = round(recipe.bank_size * recipe.fashion_share) if fashion_names else 0
    scenes, _ = draw_scenes(rng, recipe.bank_size - n_fashion, recipe.style_mix)
    caption = captions.world_caption_version(recipe.caption_version)
    texts = [caption(rng, scenes.color[i], scenes.shape[i], scenes.pattern[i], scenes.style[i], float(scenes.size[i]),
                     scenes.distractors[i], scenes.background_color[i], scenes.background[i])
             for i in range(len(scenes.color))]
    fashion_caption = captions.fashion_caption_version(recipe.caption_version)
    picks = rng.integers(0, len(fashion_names or [0]), n_fashion)
    texts += [fashion_caption(rng, fashion_names[int(k)]) for k in picks]
    tokens = clip.tokenize(texts, context_length=teacher.context_length, truncate=True)
    feats = torch.cat([encode_text_tokens(teacher, tokens[i:i + 512]) for i in range(0, len(tokens), 512)])
    return F.normalize(feats.float(), dim=-1)


class _Outputs:
    """Forward hooks that keep the last output of each named module."""

    def __init__(self, modules: dict) -> None:
        self.values: dict = {}
        self.handles = [m.register_forward_hook(lambda _m, _i, out, key=key: self.values.__setitem__(key, out))
                        for key, m in modules.items()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def hint_loss(student_tokens: dict, teacher_maps: dict, adapters: torch.nn.ModuleList) -> torch.Tensor:
    """Mean over ``HINTS`` of 1 - cosine between each adapted patch token of the student (LND
    block outputs, class token first) and the teacher's stage map pooled to the same grid."""
    losses = []
    for (block, stage), adapter in zip(HINTS, adapters):
        tokens = student_tokens[block][1:].permute(1, 0, 2)  # (N, grid*grid, width)
        grid = math.isqrt(tokens.shape[1])
        target = F.adaptive_avg_pool2d(teacher_maps[stage].float(), grid).flatten(2).transpose(1, 2)
        losses.append(1 - F.cosine_similarity(adapter(tokens), target, dim=-1).mean())
    return torch.stack(losses).mean()


def _zeroshot_base(model, root: str | None) -> float:
    from selftpt.benchmark.quality import zeroshot_row

    model.eval()
    value = zeroshot_row(model, "ShapeWorld", root)["base"]
    model.visual.train()
    return value


def distill_image_tower(student, teacher, recipe: Recipe, fashion_pool, workers: int = 1,
                        eval_root: str | None = None) -> dict:
    """Train ``student.visual`` to the direction of ``teacher``'s image features (module doc)."""
    from selftpt.benchmark.staged import _param_groups, _schedule, _worker_init

    visual = student.visual
    for p in student.parameters():
        p.requires_grad_(False)
    for p in visual.parameters():
        p.requires_grad_(True)
    teacher.eval()
    bank = None
    if recipe.kd_weight:
        from selftpt.benchmark.catalog import FashionDataset

        bank = caption_bank(teacher, recipe, FashionDataset().classnames if fashion_pool is not None else None)
    scale = teacher.logit_scale.exp().item()
    params = list(visual.named_parameters())
    taps = None
    if recipe.hint_weight:
        torch.manual_seed(recipe.seed + 1)
        adapters = torch.nn.ModuleList(
            torch.nn.Linear(visual.conv1.out_channels, getattr(teacher.visual, stage)[-1].conv3.out_channels)
            for _, stage in HINTS)
        params += list(adapters.named_parameters())
        taps = (_Outputs({block: visual.transformer.resblocks[block] for block, _ in HINTS}),
                _Outputs({stage: getattr(teacher.visual, stage) for _, stage in HINTS}))
    opt = torch.optim.AdamW(_param_groups(params, recipe.weight_decay), lr=recipe.lr)
    sched = _schedule(opt, recipe.steps, recipe.warmup)
    loader = torch.utils.data.DataLoader(
        DistillBatches(recipe, visual.input_resolution, fashion_pool), batch_size=None, shuffle=False,
        num_workers=workers, worker_init_fn=_worker_init if workers else None, prefetch_factor=4 if workers else None)
    visual.train()
    history, checks, start = [], [], time.time()
    try:
        for step, x in enumerate(tqdm(loader, desc="distil", unit="step", mininterval=30), 1):
            with torch.no_grad():
                target = F.normalize(teacher.encode_image(x).float(), dim=-1)
            feature = F.normalize(visual(x), dim=-1)
            cos = (feature * target).sum(-1).mean()
            loss = 1 - cos
            if bank is not None:  # the teacher's distribution over the caption bank, at CLIP's logit scale
                loss = loss + recipe.kd_weight * F.kl_div(F.log_softmax(scale * feature @ bank.t(), -1),
                                                          F.log_softmax(scale * target @ bank.t(), -1),
                                                          reduction="batchmean", log_target=True)
            if taps is not None:
                loss = loss + recipe.hint_weight * hint_loss(taps[0].values, taps[1].values, adapters)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(cos.item())
            if step % 100 == 0 or step == recipe.steps:
                log.info("distil step %d/%d cosine %.3f (%.0fs)", step, recipe.steps, np.mean(history[-100:]),
                         time.time() - start)
            if recipe.eval_every and (step % recipe.eval_every == 0 or step == recipe.steps):
                checks.append([step, round(_zeroshot_base(student, eval_root), 2)])
                log.info("distil step %d: zero-shot ShapeWorld base %.1f", *checks[-1])
    finally:  # hooks on the teacher must not outlive this run, even a failed one
        for t in taps or ():
            t.remove()
    visual.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    curve = [round(float(np.mean(history[i:i + 100])), 4) for i in range(0, len(history), 100)]
    return {"seconds": round(time.time() - start, 1), "cosine_curve": curve,
            "zeroshot_shapeworld_base_curve": checks}


def pretrain_distilled(out, recipe: Recipe = Recipe(), workers: int = 1, threads: int = 1, use_fashion: bool = True,
                       evaluate: bool = True, eval_root: str | None = None) -> dict:
    """Distil, save the fp16 state_dict and its JSON sidecar; returns the record."""
    from selftpt.benchmark.staged import _clock, _since, load_fashion_pool
    from selftpt.clip_loader import load_clip, save_state_dict

    torch.set_num_threads(threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    teacher = load_clip(recipe.teacher)
    student = build_student(teacher, recipe.seed)
    log.info("pretraining %s (distilled from %s): %s", BACKBONE_NAME, recipe.teacher, recipe)
    record = {"backbone": BACKBONE_NAME, "recipe": "distilled", "arch": ARCH, "world_version": WORLD_VERSION,
              "settings": asdict(recipe), "fashion": use_fashion, "threads": threads, "workers": workers}
    start = _clock()
    fashion_pool = load_fashion_pool()[0] if use_fashion else None
    record["distil"] = {**distill_image_tower(student, teacher, recipe, fashion_pool, workers, eval_root),
                        **_since(start)}
    student.eval().half()
    save_state_dict(student, out, half=False)
    record.update({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                   "file_mb": round(out.stat().st_size / 2 ** 20, 2)})
    log.info("saved %s (%.1f MiB): %.0fs wall, %.0fs CPU", out, record["file_mb"], record["distil"]["wall_seconds"],
             record["distil"]["cpu_seconds_process"] + record["distil"]["cpu_seconds_workers"])
    if evaluate:
        from selftpt.benchmark.quality import evaluate_asset

        record["quality"] = evaluate_asset(out, use_fashion, eval_root)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record

