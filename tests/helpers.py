"""Small worlds for the tests: a tiny random-weight CLIP and a tiny image-folder dataset.

Both go through the project's normal paths: the CLIP is saved as a state_dict file and
loaded by ``MODEL.BACKBONE.NAME``; the dataset is registered in ``DATASET_REGISTRY`` and
read from PNG files listed in a CoOp-style split.
"""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import selftpt.text_encoder as text_encoder_module
import trainers  # noqa: F401  (registers the trainers)
from selftpt.clip_loader import build_random_clip, save_state_dict
from selftpt.config import extend_cfg
from selftpt.toolbox import DATASET_REGISTRY, DatasetBase, Datum, get_cfg_default, set_random_seed
from selftpt.trainer_facts import registered_trainers

TINY_CLIP_ARCH = dict(embed_dim=64, image_resolution=32, vision_layers=1, vision_width=64,
                      vision_patch_size=16, context_length=32, vocab_size=49408,
                      transformer_width=64, transformer_heads=1, transformer_layers=1)

# Classes that differ in colour and shape, so a prompt can learn them from a few images.
TINY_CLASSES = [("red", "square"), ("green", "circle"), ("blue", "triangle"),
                ("yellow", "square"), ("purple", "circle"), ("orange", "triangle")]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 20), "purple": (150, 30, 180), "orange": (250, 140, 0)}
N_PER_SPLIT = {"train": 8, "val": 2, "test": 4}


def project_trainers(trains: bool | None = None) -> list[str]:
    """The registered trainers of ``trainers/`` (all, or those whose ``TRAINS`` is ``trains``),
    in table order. Test modules may register trainers of their own; only the project's are meant."""
    return [name for name, cls in registered_trainers().items()
            if cls.__module__.startswith("trainers.") and (trains is None or cls.TRAINS == trains)]


def make_tiny_clip(path: Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP state_dict (fp16, as OpenAI's) and return its path."""
    save_state_dict(build_random_clip(TINY_CLIP_ARCH, seed=seed), path)
    return path


def _draw(colour: str, shape: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (32, 32), tuple(rng.randint(0, 60) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    x, y, s = rng.randint(2, 10), rng.randint(2, 10), rng.randint(14, 20)
    box = (x, y, x + s, y + s)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fill)
    return img


def make_tiny_images(root: Path, seed: int = 0) -> dict[str, list[tuple[str, int, str]]]:
    """Draw the tiny dataset under ``root/tiny_shapes`` and return its split lists."""
    rng = random.Random(seed)
    split: dict[str, list[tuple[str, int, str]]] = {k: [] for k in N_PER_SPLIT}
    for label, (colour, shape) in enumerate(TINY_CLASSES):
        name = f"{colour} {shape}"
        folder = root / "tiny_shapes" / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for part, n in N_PER_SPLIT.items():
            for i in range(n):
                path = folder / f"{part}_{i}.png"
                _draw(colour, shape, rng).save(path)
                split[part].append((str(path), label, name))
    return split


@DATASET_REGISTRY.register()
class TinyShapes(DatasetBase):
    """Six coloured-shape classes drawn at 32 px, for tests; honours NUM_SHOTS and base/new."""

    dataset_dir = "tiny_shapes"

    def __init__(self, cfg) -> None:
        root = Path(os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT)))
        split = make_tiny_images(root) if not (root / self.dataset_dir).is_dir() else _read_back(root)
        train, val, test = ([Datum(impath=p, label=y, classname=c) for p, y, c in split[k]]
                            for k in ("train", "val", "test"))
        if cfg.DATASET.NUM_SHOTS >= 1:
            train = self.generate_fewshot_dataset(train, num_shots=cfg.DATASET.NUM_SHOTS)
            val = self.generate_fewshot_dataset(val, num_shots=min(cfg.DATASET.NUM_SHOTS, 4))
        train, val, test = _subsample(train, val, test, cfg.DATASET.SUBSAMPLE_CLASSES)
        super().__init__(train_x=train, val=val, test=test)


def _read_back(root: Path) -> dict[str, list[tuple[str, int, str]]]:
    split: dict[str, list[tuple[str, int, str]]] = {k: [] for k in N_PER_SPLIT}
    for label, (colour, shape) in enumerate(TINY_CLASSES):
        name = f"{colour} {shape}"
        folder = root / "tiny_shapes" / name.replace(" ", "_")
        for part, n in N_PER_SPLIT.items():
            split[part] += [(str(folder / f"{part}_{i}.png"), label, name) for i in range(n)]
    return split


def _subsample(train, val, test, subsample: str):
    from datasets.common import subsample_classes
    return subsample_classes(train, val, test, subsample=subsample)


def tiny_opts(root: Path, clip_path: Path, trainer: str = "CoOp") -> list[str]:
    """``KEY VALUE`` options for ``trainer`` on TinyShapes with the tiny CLIP, fast CPU settings."""
    settings = {
        "DATASET.NAME": "TinyShapes", "DATASET.ROOT": str(root), "MODEL.BACKBONE.NAME": str(clip_path),
        "TRAINER.NAME": trainer, "INPUT.SIZE": "(32, 32)", "INPUT.INTERPOLATION": "bicubic",
        "INPUT.PIXEL_MEAN": "[0.48145466, 0.4578275, 0.40821073]",
        "INPUT.PIXEL_STD": "[0.26862954, 0.26130258, 0.27577711]",
        "INPUT.TRANSFORMS": "['random_resized_crop', 'random_flip', 'normalize']",
        "DATALOADER.NUM_WORKERS": "0", "DATALOADER.TRAIN_X.BATCH_SIZE": "8",
        "DATALOADER.TEST.BATCH_SIZE": "16", "OPTIM.NAME": "sgd", "OPTIM.LR": "0.01",
        "OPTIM.MAX_EPOCH": "2", "OPTIM.LR_SCHEDULER": "cosine", "TRAIN.PRINT_FREQ": "5",
        "USE_CUDA": "False",
    }
    settings.update(fp32_everywhere())
    return [x for kv in settings.items() for x in kv]


def fp32_everywhere() -> dict[str, str]:
    """``TRAINER.<NODE>.PREC fp32`` for every registered trainer's node: CPU tests compare
    against fp32 references, whatever a trainer's own default precision is."""
    return {f"TRAINER.{node}.PREC": "fp32" for node in sorted({cls.CFG_NODE for cls in registered_trainers().values()})}


def ctrl_c_as_in_a_terminal() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: a suite started in the
    background (``pytest &``, ``nohup``) hands its children SIGINT ignored, and Python then never
    raises KeyboardInterrupt; a terminal's Ctrl-C reaches a program with the default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def recorded_checkpoints(monkeypatch) -> list[int]:
    """A list that gets an entry each time the text encoder checkpoints a block (``GRAD_CHECKPOINT``)."""
    calls: list[int] = []
    original = text_encoder_module.checkpoint
    monkeypatch.setattr(text_encoder_module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def adamw_first_step(start: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """A tensor after torch's first AdamW step from ``start`` (TPT's optimiser: weight decay 0.01,
    eps 1e-8; the first step's bias-corrected moments make it ``lr * grad / (|grad| + eps)``)."""
    return start * (1 - lr * 0.01) - lr * grad / (grad.abs() + 1e-8)


def train_step(trainer, batch):
    """One ``forward_backward`` outside the epoch loop (as batch 0 of a long epoch)."""
    trainer.batch_idx, trainer.num_batches = 0, 99
    return trainer.forward_backward(batch)


def one_step_gradients(trainer, batch):
    """Context (and CPT head) gradients of one ``forward_backward`` on ``batch``."""
    train_step(trainer, batch)
    grads = {"ctx": trainer.model.prompt_learner.ctx.grad.detach().clone()}
    if hasattr(trainer, "cpt"):
        grads.update({f"head.{n}": p.grad.detach().clone() for n, p in trainer.cpt.head.named_parameters()
                      if p.grad is not None})
    return grads


def first_batch(trainer):
    """The first training batch, the same for every build (seeded)."""
    set_random_seed(3)
    return next(iter(trainer.train_loader_x))


def project_cfg(opts: list[str]):
    """Dassl's defaults extended with the project's keys, with ``opts`` (``KEY, VALUE, ...``) merged."""
    cfg = extend_cfg(get_cfg_default())
    cfg.merge_from_list(opts)
    return cfg


def tiny_cfg(root: Path, clip_path: Path, trainer: str = "CoOp", opts: tuple = ()):
    """The frozen-free config of ``tiny_opts`` plus ``opts``."""
    return project_cfg(tiny_opts(root, clip_path, trainer) + list(opts))


class ListLoader(list):
    """A list of batches that ``ClipTrainer.test()`` accepts in place of a DataLoader."""

    @property
    def dataset(self):
        return [None] * sum(len(batch["label"]) for batch in self)


def exact_calibration_batch():
    """(logits, labels, ECE%): top softmax probabilities exactly 0.25, 0.75 x3, 0.5 (4 classes).

    With 15 bins, 0.25 is in (3/15, 4/15], 0.5 in (7/15, 8/15], 0.75 in (11/15, 12/15]:
    ECE = 1/5 |1 - 0.25| + 3/5 |2/3 - 0.75| + 1/5 |0 - 0.5| = 0.15 + 0.05 + 0.10 = 30%.
    """
    import math

    quarter = [0.0, 0.0, 0.0, 0.0]  # 1/4 each, argmax 0
    half = [math.log(3.0), 0.0, 0.0, 0.0]  # 3/6
    three_quarters = [0.0, math.log(9.0), 0.0, 0.0]  # 9/12, argmax 1
    logits = torch.tensor([quarter, three_quarters, three_quarters, three_quarters, half])
    labels = torch.tensor([0, 1, 1, 2, 3])  # right, right, right, wrong, wrong
    return logits, labels, 30.0
