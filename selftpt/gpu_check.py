"""The GPU check: every trainer on the path a GPU user runs, in a few minutes.

A ViT-B/16-shaped CLIP with random weights (no download; speed, memory and numerics do not
depend on weight values), 1000 synthetic class names (ImageNet's scale: Self-TPT's stage 2
adapts in 16 chunks, TPT tunes 1000 prompts per image), each trainer in the precision its
paper config gives on the device (PREC auto: fp16 for CoOp's family and Self-TPT, amp for
TPT), a few training steps where the trainer trains, then its evaluation (Self-TPT's
class-name adaptation included). Every loss, tuned parameter and logit must be finite;
time and peak memory are printed per trainer.

Run it from the repository root on a machine with a CUDA device::

    python gpu_check.py                 # ~minutes on one GPU
    python gpu_check.py --device cpu --arch Bench-RN-T --classes 70 --precision fp16   # CPU rehearsal

Exit status 0 when every trainer passed, 1 otherwise (each failure is one line).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tabulate import tabulate

from selftpt import launch
from selftpt.clip_loader import CLIP_ARCHS, build_random_clip, save_state_dict
from selftpt.efficiency import SYNTHETIC_DATASET, PeakMemory, write_synthetic_dataset
from selftpt.toolbox import build_trainer, set_random_seed
from selftpt.trainer_facts import reference_configs

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("method", "precision", "classes", "build s", "train s/step", "one-time s", "ms/image", "peak MB",
           "CPT loss", "result")


@dataclass(frozen=True)
class Check:
    """One trainer as its paper config runs it.

    Args:
        label: row name.
        trainer: ``TRAINER.NAME``.
        config: stem under ``configs/trainers/<trainer>/``.
        opts: further ``KEY VALUE`` options.
    """

    label: str
    trainer: str
    config: str
    opts: tuple[str, ...] = ()


def checks() -> list[Check]:
    """One check per reference config of the registered trainers (``REFERENCE_CONFIGS``), in
    table order; the command line registers the trainers first."""
    return [Check(label, trainer, stem, opts) for label, (trainer, stem, opts) in reference_configs().items()]


def _config(check: Check, args: argparse.Namespace, root: Path, weights: Path, out: Path) -> Any:
    resolution = CLIP_ARCHS[args.arch]["image_resolution"]
    opts = ["DATASET.NAME", SYNTHETIC_DATASET, "MODEL.BACKBONE.NAME", args.arch, "MODEL.BACKBONE.PATH", str(weights),
            "INPUT.SIZE", f"({resolution}, {resolution})", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TEST.BATCH_SIZE", str(args.images), "USE_CUDA", str(args.device == "cuda"),
            "TRAINER.SELFTPT.TTA_STEPS", str(args.tta_steps), *check.opts]
    if args.precision != "auto":
        node = launch.TRAINER_REGISTRY.get(check.trainer).CFG_NODE
        opts += [f"TRAINER.{node}.PREC", args.precision]
    argv = ["--root", str(root), "--trainer", check.trainer, "--seed", "1", "--output-dir", str(out),
            "--config-file", str(REPO / "configs" / "trainers" / check.trainer / f"{check.config}.yaml"), *opts]
    return launch.setup_cfg(launch.build_parser().parse_args(argv))


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def run_check(check: Check, args: argparse.Namespace, root: Path, weights: Path, out: Path) -> dict:
    """Build, train ``args.steps`` steps (if the trainer trains), evaluate; a row of the report."""
    memory = PeakMemory(torch.device(args.device))
    memory.reset()
    set_random_seed(1)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(_config(check, args, root, weights, out))
    row = {"method": check.label, "precision": trainer.precision, "classes": trainer.num_classes,
           "build s": time.perf_counter() - start}
    problems = []
    if trainer.TRAINS:
        trainer.set_model_mode("train")
        trainer.epoch, trainer.num_batches = 0, args.steps + 1  # no epoch end: no LR step
        batches = iter(trainer.train_loader_x)
        start = time.perf_counter()
        for step in range(args.steps):
            trainer.batch_idx = step
            summary = trainer.forward_backward(next(batches))
            bad = {k: v for k, v in summary.items() if not math.isfinite(v)}
            if bad:
                problems.append(f"step {step}: non-finite {bad}")
        _sync(args.device)
        row["train s/step"] = (time.perf_counter() - start) / args.steps
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.test()
    timing = trainer.test_result["timing"]
    row["one-time s"], row["ms/image"] = timing["prepare_seconds"], 1000 * timing["seconds_per_image"]
    row["peak MB"] = memory.peak_mb()
    tuned = [p for name in trainer.get_model_names() for p in trainer._models[name].parameters()]
    if not _finite(*tuned):
        problems.append("non-finite tuned parameters")
    if any(p.dtype != torch.float32 for p in tuned):
        problems.append("a tuned parameter is not an fp32 master copy")
    images, _ = trainer.parse_batch_test(next(iter(trainer.test_loader)))
    with torch.no_grad():
        if not _finite(trainer.model_inference(images)):
            problems.append("non-finite logits")
    tta = trainer.result_extra.get("tta")
    if tta is not None:
        if tta["classes_covered"] != trainer.num_classes:
            problems.append(f"stage 2 covered {tta['classes_covered']} of {trainer.num_classes} classes")
        if not (math.isfinite(tta["cpt_loss_before"]) and math.isfinite(tta["cpt_loss_after"])):
            problems.append("non-finite CPT loss in stage 2")
        row["CPT loss"] = f"{tta['cpt_loss_before']:.3f} -> {tta['cpt_loss_after']:.3f}"
    row["result"] = "ok" if not problems else "FAILED: " + "; ".join(problems)
    return row


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--arch", default="ViT-B/16", choices=sorted(CLIP_ARCHS), help="random-weight architecture")
    p.add_argument("--classes", type=int, default=1000, help="synthetic class names [1000]")
    p.add_argument("--images", type=int, default=4, help="test images per trainer [4]")
    p.add_argument("--steps", type=int, default=3, help="training steps per trainer [3]")
    p.add_argument("--tta-steps", type=int, default=2, help="Self-TPT stage-2 passes over all classes [2]")
    p.add_argument("--precision", default="auto", choices=("auto", "fp16", "fp32", "amp"),
                   help="PREC for every trainer [auto: each config's, i.e. the paper path]")
    p.add_argument("--methods", nargs="+", choices=[c.label for c in checks()], help="[all]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run on a GPU machine, or rehearse with --device cpu")
        return 2
    selected = [c for c in checks() if not args.methods or c.label in args.methods]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"GPU check: {args.arch} (random weights), {args.classes} classes, {args.images} test images, "
          f"{args.steps} training steps, on {device_name}, torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="selftpt-gpu-check-") as tmp:
        tmp_path = Path(tmp)
        resolution = CLIP_ARCHS[args.arch]["image_resolution"]
        root = write_synthetic_dataset(tmp_path / "data", args.classes, args.images, resolution)
        weights = tmp_path / "weights.pt"
        save_state_dict(build_random_clip(args.arch, seed=0), weights)
        for check in selected:
            try:
                row = run_check(check, args, root, weights, tmp_path / check.label)
            except Exception as exc:  # noqa: BLE001 - one failed trainer must not hide the others
                last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                row = {"method": check.label, "result": f"FAILED: {last}"}
            rows.append(row)
            print(f"{row['method']}: {row['result']}", flush=True)
    print(tabulate([[row.get(c) for c in COLUMNS] for row in rows], headers=COLUMNS, floatfmt=".3g",
                   missingval="-"))
    failed = [r["method"] for r in rows if r["result"] != "ok"]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
