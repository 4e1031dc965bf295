"""The command line behind ``benchmark_efficiency.py``: flags, the backbone, the jobs, the output."""
from __future__ import annotations

import argparse
import logging
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from selftpt.cli import user_errors
from selftpt.clip_loader import (
    CLIP_ARCHS,
    BackboneError,
    build_random_clip,
    image_resolution,
    is_open_clip_name,
    local_backbone_file,
    read_state_dict,
    save_state_dict,
)
from selftpt.efficiency.jobs import dispatch
from selftpt.efficiency.methods import load_settings, methods, registration_modules
from selftpt.efficiency.report import assemble, format_table, target_lines, write_json
from selftpt.efficiency.synthetic import SYNTHETIC_DATASET, write_synthetic_dataset
from selftpt.efficiency.targets import evaluate_targets
from selftpt.errors import UserError
from selftpt.plots import validate_efficiency

log = logging.getLogger("selftpt.efficiency")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def prepare_backbone(name: str, path: str = "", random_weights: bool = False,
                     work_dir: str | os.PathLike = "output/efficiency", seed: int = 0) -> dict[str, Any]:
    """The backbone's job settings and report fields: weights from ``path`` or a local file
    (``clip_loader.local_backbone_file``, never a download), else random weights of a
    ``CLIP_ARCHS`` architecture, written once under ``work_dir/backbones`` (speed and memory
    do not depend on weight values)."""
    if is_open_clip_name(name):  # OpenCLIP / EVA-CLIP: its own configs, cache and preprocessing
        from selftpt.open_clip_backend import benchmark_backbone
        return benchmark_backbone(name, path, random_weights, work_dir, seed)
    file = path or (None if random_weights else local_backbone_file(name))
    if file:
        label = Path(name).stem if os.path.isfile(name) else name
        return {"label": label, "backbone_name": name, "backbone_path": os.path.abspath(file), "weights": file,
                "resolution": image_resolution(read_state_dict(file))}
    if name not in CLIP_ARCHS:
        raise BackboneError(
            f"No weights for backbone {name!r} here and it is not an architecture that can be built "
            f"with random weights (those are: {', '.join(CLIP_ARCHS)}); pass a weights file")
    file = Path(work_dir) / "backbones" / f"random_{_safe(name)}_seed{seed}.pt"
    if not file.is_file():
        log.info("building %s with random weights (seed %d) -> %s", name, seed, file)
        file.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(build_random_clip(name, seed=seed), file)  # fp16, as OpenAI's files
    else:
        log.info("reusing random %s weights %s", name, file)
    return {"label": name, "backbone_name": name, "backbone_path": str(file), "weights": f"random (seed {seed})",
            "resolution": int(CLIP_ARCHS[name]["image_resolution"])}


def _jobs(args: argparse.Namespace, base_job: dict, tag: str, work_dir: Path, first: bool) -> list[dict]:
    """The jobs of one class setting: each method, then the paired timing and the cache sweep."""
    scratch = work_dir / "scratch" / tag
    jobs = [dict(base_job, kind="method", method=m, tag=f"{tag}_{m}", scratch=str(scratch / m)) for m in args.methods]
    if args.paired:
        jobs.append(dict(base_job, kind="paired", tag=f"{tag}_paired", scratch=str(scratch / "paired")))
    if args.cache_sweep and first:
        jobs.append(dict(base_job, kind="cache_sweep", tag=f"{tag}_cache_sweep", scratch=str(scratch / "cache_sweep"),
                         sweep_batch_size=max(args.batch_sizes)))
    return jobs


def _meta(args: argparse.Namespace, backbone: dict, results: dict, dataset: str, n_cls: int | None) -> dict:
    """Everything the JSON records beside the per-method results."""
    ok = [r for r in results.values() if "error" not in r]
    return {
        "backbone": backbone["label"], "device_hint": args.device, "weights": backbone["weights"],
        "precision": args.precision,
        "precision_by_method": {m: r.get("precision") for m, r in results.items() if "precision" in r},
        "num_classes": n_cls if n_cls is not None else (ok[0]["num_classes"] if ok else None),
        "num_images": min((r["num_images"] for r in ok), default=args.num_images),
        "dataset": dataset if n_cls is None else f"synthetic ({n_cls} class names)",
        "batch_sizes": sorted(set(args.batch_sizes)), "warmup": args.warmup, "repeats": args.repeats,
        "max_seconds": args.max_seconds, "tta_steps": args.tta_steps,
        "isolation": "in-process" if args.in_process else "one subprocess per method",
        "memory_scope": sorted({r["memory_scope"] for r in ok}),
        "timing": "median seconds of model_inference per batch; the batch is built with the method's "
                  "test transform before the clock starts (decoding, augmentation not timed); CUDA "
                  "synchronised",
        "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_benchmark(args: argparse.Namespace) -> list[Path]:
    """Measure every method for every class setting; write, print and return the JSON paths."""
    from tqdm import tqdm

    known = methods()
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise UserError(f"Unknown method(s) {unknown}; choose from {list(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device")
    work_dir = Path(args.output_dir).resolve()
    backbone = prepare_backbone(args.backbone, args.backbone_path, args.random_weights, work_dir)
    log.info("backbone %s (weights: %s, input %d px)", backbone["label"], backbone["weights"], backbone["resolution"])
    settings = [(args.dataset, None)] if args.dataset else [(SYNTHETIC_DATASET, n) for n in args.num_classes]
    written = []
    for index, (dataset, n_cls) in enumerate(settings):
        if n_cls is not None:
            root = write_synthetic_dataset(
                work_dir / "data" / f"synthetic_{n_cls}cls_{args.num_images}img_{backbone['resolution']}px",
                n_cls, args.num_images, backbone["resolution"])
            tag = f"{_safe(backbone['label'])}_{n_cls}cls"
        else:
            root = Path(args.root).expanduser().resolve()
            tag = f"{_safe(backbone['label'])}_{dataset}"
        base_job = {
            **{k: backbone[k] for k in ("backbone_name", "backbone_path", "resolution", "input_opts") if k in backbone},
            "dataset": dataset, "root": str(root),
            "dataset_config_file": os.path.abspath(args.dataset_config_file) if args.dataset_config_file else "",
            "subsample_classes": args.subsample_classes, "device": args.device, "precision": args.precision,
            "num_images": args.num_images, "batch_sizes": sorted(set(args.batch_sizes)),
            "warmup": args.warmup, "repeats": args.repeats, "max_seconds": args.max_seconds,
            "tta_steps": args.tta_steps, "opts": list(args.opts or []), "threads": args.threads,
            "quiet": args.quiet, "register": registration_modules(),
        }
        results, sweep, paired = {}, None, None
        jobs = _jobs(args, base_job, tag, work_dir, first=index == 0)
        bar = tqdm(jobs, desc=f"efficiency {tag}", dynamic_ncols=True, disable=args.quiet)
        for job in bar:
            what = job.get("method", job["kind"].replace("_", " "))
            bar.set_postfix_str(what)
            log.info("measuring %s (%s classes, %s); log: %s", what, n_cls or dataset, args.device,
                     work_dir / "logs" / f"{job['tag']}.log")
            start = time.perf_counter()
            res = dispatch(job, work_dir, isolate=not args.in_process)
            log.info("%s done in %.1f s%s", what, time.perf_counter() - start,
                     f" - FAILED: {res['error']}" if "error" in res else "")
            if job["kind"] == "cache_sweep":
                sweep = res
            elif job["kind"] == "paired":
                paired = res
            else:
                results[job["method"]] = res
        meta = _meta(args, backbone, results, dataset, n_cls)
        if sweep is not None:
            meta["cache_sweep"] = sweep
        if paired is not None:
            meta["paired_throughput"] = paired
        obj = assemble(results, meta)
        if not obj["methods"]:
            raise UserError(f"Every method failed; see the logs under {work_dir / 'logs'}: "
                            + "; ".join(f"{k}: {v['error']}" for k, v in obj.get("failed", {}).items()))
        obj["targets"] = evaluate_targets(obj)
        validate_efficiency(obj)
        path = Path(args.output) if (args.output and len(settings) == 1) else work_dir / f"efficiency_{tag}.json"
        write_json(obj, path)
        print(f"\n{backbone['label']} ({backbone['weights']}), {obj['num_classes']} classes, {obj['num_images']} "
              f"images, {obj['device']}, precision {args.precision}")
        print(format_table(obj))
        for line in target_lines(obj):
            print(line)
        print(f"wrote {path}")
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``benchmark_efficiency.py``; defaults and comparisons from configs/efficiency.yaml."""
    settings = load_settings()
    defaults = list(settings["default_methods"])
    paired, sweep = settings["paired"], settings["cache_sweep"]
    p = argparse.ArgumentParser(
        description=f"Images/s, peak memory and one-time cost of {', '.join(defaults[:-1])} and {defaults[-1]} "
                    "on the same images; writes the efficiency JSON that parse_results.py --plot reads")
    p.add_argument("--backbone", default="ViT-B/16",
                   help="CLIP architecture or backbone name, or a weights file (default ViT-B/16); an "
                        "architecture without local weights is built with random weights")
    p.add_argument("--backbone-path", default="", help="local weights file for --backbone")
    p.add_argument("--random-weights", action="store_true", help="random weights even if weights exist here")
    p.add_argument("--methods", nargs="+", default=defaults,
                   help=f"display names of the trainers' REFERENCE_CONFIGS (default: {' '.join(defaults)})")
    p.add_argument("--num-classes", nargs="+", type=int, default=[100, 1000],
                   help="synthetic class-set sizes, one JSON each (default 100 1000)")
    p.add_argument("--dataset", default="", help="a registered dataset instead of synthetic classes")
    p.add_argument("--root", default="", help="dataset root for --dataset")
    p.add_argument("--dataset-config-file", default="", help="dataset config file for --dataset")
    p.add_argument("--subsample-classes", default="all", choices=("all", "base", "new"))
    p.add_argument("--num-images", type=int, default=16, help="images measured (the first of the test split)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--warmup", type=int, default=1, help="untimed batches before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the images")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop repeating a batch size after this long (one timed batch at least)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("auto", "fp16", "fp32", "amp"), default="auto",
                   help="PREC of every method; auto = each method's own default (on CUDA its trainer's "
                        "AUTO_CUDA_PRECISION: fp16, or amp; fp32 on CPU)")
    p.add_argument("--tta-steps", type=int, default=None,
                   help=f"{settings['tta_steps_key']} (default: the method's config)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per method (0 = torch's default)")
    p.add_argument("--cache-sweep", action="store_true",
                   help=f"also measure TEST.FEATURE_CACHE: {len(sweep['seeds'])} seeds x {len(sweep['methods'])} "
                        "methods against one encoding pass")
    p.add_argument("--paired", action="store_true",
                   help=f"also time {paired['baseline']} and {paired['method']} alternately in one process (the "
                        "throughput ratio then does not depend on other load on the machine)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (faster start; peak memory then not isolated per method)")
    p.add_argument("--output-dir", default="output/efficiency", help="JSON, logs, random weights, synthetic data")
    p.add_argument("--output", default="", help="JSON path (one class setting only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; method output only in the logs")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE config options applied to every method (last on the line)")
    return p


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """``benchmark_efficiency.py``: 0 when written, 2 with one ``error:`` line for a user error.
    The trainers and datasets it measures are the ones registered in this process."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if len(args.opts) % 2:
        raise UserError(f"--opts takes KEY VALUE pairs; got {' '.join(args.opts)}")
    if min(args.batch_sizes) < 1 or args.num_images < 1 or args.repeats < 1:
        raise UserError("batch sizes, --num-images and --repeats must be positive")
    run_benchmark(args)
    return 0
