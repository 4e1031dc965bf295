"""Efficiency benchmark: images per second, peak memory and one-time cost of each method.

Every method is measured by the project's own trainer, built from its config file
(``configs/trainers/<Trainer>/vit_b16*.yaml``) and the command line, on the same images:

- **one-time cost** = the trainer's ``prepare_for_test`` (what ``ClipTrainer.test`` runs once
  before the first image): the class-prompt text features for zero-shot CLIP and CoOp;
  class-name adaptation (CPT) plus text features for Self-TPT(-v); nothing for TPT.
- **images/s** at each batch size = batch size / median seconds of ``model_inference`` on one
  batch (what ``test`` calls per batch), after ``warmup`` untimed batches, over ``repeats``
  passes (or until ``max_seconds``); the batch is built from the method's own test transform
  (TPT's and Self-TPT-v's 64 views included) before the clock starts, so decoding and
  augmentation are not timed; CUDA is synchronised around each call. TPT adapts per image:
  only its batch-1 figure exists (larger batches: not applicable).
- **peak memory** of the inference phase (the schema's ``peak_mem_mb``; the one-time phase's
  peak is reported separately): on CUDA ``torch.cuda.max_memory_allocated`` after a reset;
  on CPU the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` after
  a ``malloc_trim``; where that reset is impossible, the process's ``ru_maxrss``). Each
  method runs in a fresh subprocess, so no method sees another's allocations.

Without weights (no file, nothing in the CLIP download cache), a ``CLIP_ARCHS`` architecture is
built with random weights: speed and memory do not depend on weight values. Without a dataset,
a synthetic one is written: ``num_images`` images at the backbone's resolution and
``num_classes`` class names ("synthetic object 17").

The optional cache sweep measures ``TEST.FEATURE_CACHE`` (``selftpt.feature_cache``): 3 seeds x
{zero-shot CLIP, CoOp, Self-TPT} evaluated with ``ClipTrainer.test`` on one split through
the cache, against one uncached evaluation pass (image decoding + encoding); one-time costs
(``prepare_for_test``) and model loading are excluded from both.

The output is the efficiency JSON of ``selftpt.plots`` (schema 1) plus metadata, read by
``parse_results.py --plot``. Entry points: ``benchmark_efficiency.py`` (``main``).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from selftpt.clip_loader import (
    ASSET_DIR,
    BUILTIN_BACKBONES,
    CLIP_ARCHS,
    BackboneError,
    build_random_clip,
    read_state_dict,
    save_state_dict,
)
from selftpt.errors import UserError
from selftpt.plots import EFFICIENCY_SCHEMA, validate_efficiency
from selftpt.toolbox import DATASET_REGISTRY, DatasetBase, Datum

log = logging.getLogger("selftpt.efficiency")

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_DATASET = "EfficiencySynthetic"
SYNTHETIC_SPEC = "synthetic.json"
CACHE_SWEEP_METHODS = ("ZeroshotCLIP", "CoOp", "SelfTPT")
CACHE_SWEEP_SEEDS = (1, 2, 3)
PRECISION_NODES = ("ZSCLIP", "COOP", "TPT", "SELFTPT", "COCOOP")
GIB = 1024.0


@dataclass(frozen=True)
class MethodSpec:
    """How the benchmark builds a method: trainer, method config file, extra options.

    Args:
        trainer: ``TRAINER.NAME``.
        config: method config file, relative to the repository root (skipped if absent).
        opts: further ``KEY VALUE`` options.
        per_image: adapts per image (TPT): batches larger than 1 are not applicable.
    """

    trainer: str
    config: str
    opts: tuple[str, ...] = ()
    per_image: bool = False


METHODS: dict[str, MethodSpec] = {
    "ZeroshotCLIP": MethodSpec("ZeroshotCLIP", "configs/trainers/ZeroshotCLIP/vit_b16.yaml"),
    "CoOp": MethodSpec("CoOp", "configs/trainers/CoOp/vit_b16_ep50.yaml"),
    "TPT": MethodSpec("TPT", "configs/trainers/TPT/vit_b16.yaml", per_image=True),
    "SelfTPT": MethodSpec("SelfTPT", "configs/trainers/SelfTPT/vit_b16_c4_ep10.yaml",
                          ("TRAINER.SELFTPT.N_VIEWS", "1")),
    "SelfTPT-v": MethodSpec("SelfTPT", "configs/trainers/SelfTPT/vit_b16_c4_ep10_v.yaml",
                            ("TRAINER.SELFTPT.N_VIEWS", "64", "TRAINER.METHOD_NAME", "SelfTPT-v")),
}


# ----------------------------------------------------------------------------- synthetic data
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
    tmp = spec_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec), encoding="utf-8")
    os.replace(tmp, spec_path)  # written last: a spec always describes complete images
    return root


# ---------------------------------------------------------------------------------- backbone
@dataclass(frozen=True)
class Backbone:
    """The backbone a benchmark runs: config values, what to report, and its input size."""

    label: str  # reported name, e.g. "ViT-B/16"
    name: str  # MODEL.BACKBONE.NAME
    path: str  # MODEL.BACKBONE.PATH
    weights: str  # "random (seed 0)" or the weights file
    resolution: int


def _resolution_from_state(state: dict[str, torch.Tensor]) -> int:
    """Input resolution of CLIP weights, inferred as ``clip.model.build_model`` does."""
    if "visual.proj" in state:  # ViT
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return int(patch * grid)
    grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return int(grid * 32)


def local_weights(name: str) -> str | None:
    """A local weights file for backbone ``name`` (a path, a built-in asset, or OpenAI's file
    already in the CLIP download cache), or None. Never downloads."""
    if os.path.isfile(name):
        return name
    if name in BUILTIN_BACKBONES and (ASSET_DIR / BUILTIN_BACKBONES[name]).is_file():
        return str(ASSET_DIR / BUILTIN_BACKBONES[name])
    import clip

    url = clip.clip._MODELS.get(name)
    if url:
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if cached.is_file():
            return str(cached)
    return None


def resolve_backbone(name: str, path: str = "", random_weights: bool = False,
                     work_dir: str | os.PathLike = "output/efficiency", seed: int = 0) -> Backbone:
    """Weights for ``name``: ``path``, a local file, or random weights of a ``CLIP_ARCHS``
    architecture (written once as a state_dict under ``work_dir/backbones``)."""
    file = path or (None if random_weights else local_weights(name))
    if file:
        state = read_state_dict(file)
        return Backbone(name if not os.path.isfile(name) else Path(name).stem, name, file, file,
                        _resolution_from_state(state))
    if name not in CLIP_ARCHS:
        raise BackboneError(
            f"No weights for backbone {name!r} here and it is not an architecture that can be built "
            f"with random weights (those are: {', '.join(CLIP_ARCHS)}); pass a weights file")
    safe = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    file = Path(work_dir) / "backbones" / f"random_{safe}_seed{seed}.pt"
    if not file.is_file():
        log.info("building %s with random weights (seed %d) -> %s", name, seed, file)
        file.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(build_random_clip(name, seed=seed), file)  # fp16, as OpenAI's files
    else:
        log.info("reusing random %s weights %s", name, file)
    return Backbone(name, name, str(file), f"random (seed {seed})", int(CLIP_ARCHS[name]["image_resolution"]))


# ------------------------------------------------------------------------------------ memory
def _read_vmhwm_kb() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory of a phase: CUDA peak allocated, or the CPU peak resident set size.

    ``scope`` says what was measured: ``cuda_max_allocated``, ``rss_since_reset`` (Linux
    VmHWM after a reset through ``/proc/self/clear_refs``) or ``rss_whole_process``
    (``ru_maxrss``: the process's peak, not resettable).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.scope = "cuda_max_allocated"
        else:
            self.scope = "rss_since_reset" if self._reset_rss() else "rss_whole_process"

    @staticmethod
    def _reset_rss() -> bool:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages first
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            return False
        return _read_vmhwm_kb() is not None

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.scope == "rss_since_reset":
            self._reset_rss()

    def current_mb(self) -> float | None:
        """Memory in use now (CUDA allocated / CPU resident): the floor of the next peak."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        try:
            match = re.search(r"VmRSS:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        except OSError:
            return None
        return int(match.group(1)) / 1024.0 if match else None

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.scope == "rss_since_reset":
            return _read_vmhwm_kb() / 1024.0
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / (2**20 if sys.platform == "darwin" else 1024.0)


# ----------------------------------------------------------------------------------- workers
def build_method_cfg(job: dict, method: str, seed: int = 1, extra: Sequence[str] = ()) -> Any:
    """The config of ``method`` for a job: dataset file < method file < benchmark settings <
    the user's ``--opts`` < ``extra``."""
    from selftpt.config import extend_cfg
    from selftpt.toolbox import get_cfg_default

    spec = METHODS[method]
    cfg = extend_cfg(get_cfg_default())
    if job.get("dataset_config_file"):
        cfg.merge_from_file(job["dataset_config_file"])
    config_file = REPO_ROOT / spec.config
    if config_file.is_file():
        cfg.merge_from_file(str(config_file))
    r = job["resolution"]
    opts = ["TRAINER.NAME", spec.trainer, "MODEL.BACKBONE.NAME", job["backbone_name"],
            "MODEL.BACKBONE.PATH", job["backbone_path"], "INPUT.SIZE", f"({r}, {r})",
            "DATASET.NAME", job["dataset"], "DATASET.ROOT", job["root"],
            "DATASET.SUBSAMPLE_CLASSES", job.get("subsample_classes", "all"),
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "1",
            "USE_CUDA", str(job["device"] == "cuda"), "OUTPUT_DIR", job["scratch"], "SEED", str(seed),
            *spec.opts]
    if job.get("precision", "auto") != "auto":
        for node in PRECISION_NODES:
            opts += [f"TRAINER.{node}.PREC", job["precision"]]
    if job.get("tta_steps") is not None:
        opts += ["TRAINER.SELFTPT.TTA_STEPS", str(job["tta_steps"])]
    cfg.merge_from_list(opts + list(job.get("opts", [])) + list(extra))
    cfg.freeze()
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_batches(infer: Callable[[torch.Tensor], Any], make_batch: Callable[[list[int]], torch.Tensor],
                 num_images: int, batch_size: int, warmup: int, repeats: int, max_seconds: float,
                 device: torch.device, desc: str = "") -> list[float]:
    """Seconds of ``infer`` per batch: ``warmup`` untimed batches, then ``repeats`` passes over
    the images in full batches (stopping early after ``max_seconds``, never before one timed
    batch). Batches are built by ``make_batch(indices)`` before the clock starts."""
    from tqdm import tqdm

    chunks = [list(range(i, i + batch_size)) for i in range(0, num_images - batch_size + 1, batch_size)]
    seconds: list[float] = []
    with torch.no_grad():
        for i in range(warmup):
            images = make_batch(chunks[i % len(chunks)])
            infer(images)
            _sync(device)
            del images
        start = time.perf_counter()
        bar = tqdm(total=repeats * len(chunks), desc=desc, dynamic_ncols=True, leave=False)
        for _ in range(repeats):
            for chunk in chunks:
                images = make_batch(chunk)
                _sync(device)
                t0 = time.perf_counter()
                infer(images)
                _sync(device)
                seconds.append(time.perf_counter() - t0)
                del images
                bar.update()
                if time.perf_counter() - start > max_seconds:
                    break
            else:
                continue
            break
        bar.close()
    return seconds


def measure_method(job: dict) -> dict:
    """Build one method's trainer and measure it (the work of one subprocess)."""
    from selftpt.toolbox import build_trainer

    method = job["method"]
    spec = METHODS[method]
    cfg = build_method_cfg(job, method)
    torch.manual_seed(0)
    start = time.perf_counter()
    trainer = build_trainer(cfg)
    build_s = time.perf_counter() - start
    dataset = trainer.test_loader.dataset
    num_images = min(job["num_images"], len(dataset))
    if num_images < job["num_images"]:
        log.warning("%s: the test split has only %d images (asked for %d)", method, num_images, job["num_images"])
    memory = PeakMemory(trainer.device)

    log.info("%s: one-time preparation (prepare_for_test) on %d classes", method, trainer.num_classes)
    trainer.set_model_mode("eval")
    memory.reset()
    start = time.perf_counter()
    trainer.prepare_for_test()
    _sync(trainer.device)
    one_time_s = time.perf_counter() - start
    one_time_peak = memory.peak_mb()

    def make_batch(indices: list[int]) -> torch.Tensor:
        return torch.stack([dataset[i]["img"] for i in indices]).to(trainer.device)

    speeds, best, samples, peaks, floors, not_applicable, skipped = {}, {}, {}, {}, {}, [], []
    for bs in job["batch_sizes"]:
        if spec.per_image and bs > 1:
            not_applicable.append(bs)
            continue
        if bs > num_images:
            log.warning("%s: batch size %d > %d images; skipped", method, bs, num_images)
            skipped.append(bs)
            continue
        log.info("%s: timing batch size %d", method, bs)
        torch.manual_seed(0)  # the same random views for every method that draws them
        memory.reset()
        floor = memory.current_mb()
        if floor is not None:
            floors[str(bs)] = round(floor, 1)
        times = time_batches(trainer.model_inference, make_batch, num_images, bs, job["warmup"],
                             job["repeats"], job["max_seconds"], trainer.device, desc=f"{method} batch {bs}")
        peaks[str(bs)] = round(memory.peak_mb(), 1)
        samples[str(bs)] = [round(t, 6) for t in times]
        speeds[str(bs)] = _sig(bs / statistics.median(times))
        best[str(bs)] = _sig(bs / min(times))  # robust to other load on the machine
    extra = getattr(trainer, "result_extra", None) or {}
    tta = extra.get("tta") or {}
    result = {
        "method": method, "trainer": spec.trainer, "images_per_s": speeds, "images_per_s_best": best,
        "peak_mem_mb": max(peaks.values()) if peaks else None, "peak_mem_mb_by_batch": peaks,
        "mem_at_start_mb_by_batch": floors,
        "one_time_s": one_time_s, "one_time_peak_mem_mb": round(one_time_peak, 1),
        "seconds_per_batch": samples, "not_applicable_batch_sizes": not_applicable,
        "skipped_batch_sizes": skipped,
        "build_s": build_s, "precision": trainer.precision, "num_classes": trainer.num_classes,
        "num_images": num_images, "memory_scope": memory.scope, "device_name": _device_name(trainer.device),
    }
    if tta:
        result.update(adaptation_s=tta.get("seconds"), tta_steps=tta.get("steps"),
                      cpt_loss_before=tta.get("cpt_loss_before"), cpt_loss_after=tta.get("cpt_loss_after"))
    if "text_features_seconds" in extra:
        result["text_features_s"] = extra["text_features_seconds"]
    return result


def _timed_test(trainer: Any) -> tuple[float, float]:
    """(seconds of the evaluation loop, seconds of prepare_for_test) of one ``trainer.test()``."""
    prepare = trainer.prepare_for_test
    box = {"prepare": 0.0}

    def timed_prepare() -> None:
        t0 = time.perf_counter()
        prepare()
        _sync(trainer.device)
        box["prepare"] = time.perf_counter() - t0

    trainer.prepare_for_test = timed_prepare
    try:
        start = time.perf_counter()
        trainer.test()
        _sync(trainer.device)
        total = time.perf_counter() - start
    finally:
        del trainer.prepare_for_test
    return total - box["prepare"], box["prepare"]


PAIRED_METHODS = ("ZeroshotCLIP", "SelfTPT")


def measure_paired(job: dict) -> dict:
    """Zero-shot CLIP and Self-TPT inference timed alternately in one process, on the same
    batches: their ratio is then immune to other load on the machine, which separate
    processes measured minutes apart are not. Self-TPT's adaptation is skipped here (TTA
    False): it changes the prompt's values, not the inference work."""
    from selftpt.toolbox import build_trainer

    trainers_ = {}
    for method in PAIRED_METHODS:
        torch.manual_seed(0)
        trainer = build_trainer(build_method_cfg(job, method, extra=["TRAINER.SELFTPT.TTA", "False"]))
        trainer.set_model_mode("eval")
        trainer.prepare_for_test()
        trainers_[method] = trainer
    datasets_ = {m: t.test_loader.dataset for m, t in trainers_.items()}
    same = len({repr(d.transform) for d in datasets_.values()}) == 1
    num_images = min(job["num_images"], *(len(d) for d in datasets_.values()))
    out: dict[str, Any] = {"methods": list(PAIRED_METHODS), "num_images": num_images, "batches": {}}
    for bs in job["batch_sizes"]:
        if bs > num_images:
            continue
        chunks = [list(range(i, i + bs)) for i in range(0, num_images - bs + 1, bs)]
        times: dict[str, list[float]] = {m: [] for m in PAIRED_METHODS}
        log.info("paired timing, batch size %d", bs)
        with torch.no_grad():
            for step in range(job["warmup"] + job["repeats"] * len(chunks)):
                chunk = chunks[step % len(chunks)]
                order = PAIRED_METHODS if step % 2 == 0 else PAIRED_METHODS[::-1]
                shared = torch.stack([datasets_[order[0]][i]["img"] for i in chunk]) if same else None
                for method in order:
                    trainer = trainers_[method]
                    images = (shared if same else torch.stack([datasets_[method][i]["img"] for i in chunk]))
                    images = images.to(trainer.device)
                    _sync(trainer.device)
                    t0 = time.perf_counter()
                    trainer.model_inference(images)
                    _sync(trainer.device)
                    if step >= job["warmup"]:
                        times[method].append(time.perf_counter() - t0)
        speed = {m: _sig(bs / statistics.median(v)) for m, v in times.items()}
        # each pair ran back to back: the median of per-pair ratios cancels slow drifts in load
        ratio = statistics.median(z / s for z, s in zip(times["ZeroshotCLIP"], times["SelfTPT"]))
        out["batches"][str(bs)] = {"images_per_s": speed, "ratio": _sig(ratio), "samples": len(times["SelfTPT"]),
                                   "seconds": {m: [round(t, 6) for t in v] for m, v in times.items()}}
    return out


def measure_cache_sweep(job: dict) -> dict:
    """One uncached evaluation pass against 3 seeds x 3 prompt methods through the cache."""
    from selftpt.toolbox import build_trainer

    cache_dir = Path(job["scratch"]) / "feature_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    batch = ["DATALOADER.TEST.BATCH_SIZE", str(job["sweep_batch_size"])]
    log.info("cache sweep: one uncached evaluation pass (ZeroshotCLIP)")
    trainer = build_trainer(build_method_cfg(job, "ZeroshotCLIP", extra=batch))
    single_pass_s, _ = _timed_test(trainer)
    num_images = len(trainer.test_loader.dataset)
    del trainer
    runs = []
    for seed in CACHE_SWEEP_SEEDS:
        for method in CACHE_SWEEP_METHODS:
            log.info("cache sweep: %s seed %d through the cache", method, seed)
            trainer = build_trainer(build_method_cfg(
                job, method, seed, extra=batch + ["TEST.FEATURE_CACHE", str(cache_dir)]))
            eval_s, prepare_s = _timed_test(trainer)
            runs.append({"method": method, "seed": seed, "eval_s": eval_s, "prepare_s": prepare_s,
                         "accuracy": trainer.test_result["metrics"].get("accuracy")})
            del trainer
    sweep_s = sum(r["eval_s"] for r in runs)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"single_pass_s": single_pass_s, "sweep_s": sweep_s, "ratio": sweep_s / single_pass_s,
            "evaluations": len(runs), "num_images": num_images, "batch_size": job["sweep_batch_size"],
            "runs": runs}


def run_job(job: dict) -> dict:
    """Run one job (a method measurement or the cache sweep) in this process."""
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import trainers  # noqa: F401  (registers the trainers)

    if job["dataset"] != SYNTHETIC_DATASET and job["dataset"] not in DATASET_REGISTRY.registered_names():
        import datasets  # noqa: F401  (registers the repository's datasets)
    if job["kind"] == "cache_sweep":
        return measure_cache_sweep(job)
    if job["kind"] == "paired":
        return measure_paired(job)
    return measure_method(job)


_WORKER = "import sys; from selftpt.efficiency import worker_main; sys.exit(worker_main(sys.argv[1:]))"


def worker_main(argv: Sequence[str]) -> int:
    """Subprocess entry: ``<job.json> <result.json>``; trainer output goes to stdout."""
    job_path, result_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    result = run_job(job)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, result_path)
    return 0


def dispatch(job: dict, work_dir: Path, isolate: bool = True) -> dict:
    """Run ``job`` in a fresh Python process (``isolate``) or in this one; trainer output goes
    to ``work_dir/logs/<tag>.log``. Returns the result, or ``{"error": ...}``."""
    tag = job["tag"]
    logs, jobs = work_dir / "logs", work_dir / "jobs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{tag}.log"
    Path(job["scratch"]).mkdir(parents=True, exist_ok=True)
    if not isolate:
        with open(log_path, "w", encoding="utf-8") as out, contextlib.redirect_stdout(out):
            try:
                return run_job(job)
            except Exception as exc:  # noqa: BLE001 - reported per method, the others go on
                log.exception("%s failed", tag)
                return {"error": f"{type(exc).__name__}: {exc}", "log": str(log_path)}
    job_path, result_path = jobs / f"{tag}.json", jobs / f"{tag}.result.json"
    job_path.write_text(json.dumps(job, indent=1), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    with open(log_path, "w", encoding="utf-8") as out:
        proc = subprocess.run([sys.executable, "-c", _WORKER, str(job_path), str(result_path)],
                              cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                              if job.get("quiet") else None, check=False)
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"exit code {proc.returncode}{killed}: {' | '.join(tail)}", "log": str(log_path)}
    return json.loads(result_path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ the benchmark
SCHEMA_KEYS = ("images_per_s", "peak_mem_mb", "one_time_s")


def _sig(value: float, digits: int = 5) -> float:
    """``value`` to ``digits`` significant digits (speeds span orders of magnitude)."""
    return float(f"{value:.{digits}g}")


def _round(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def assemble(results: dict[str, dict], meta: dict) -> dict:
    """The schema-1 efficiency object from per-method results (failed ones in ``failed``)."""
    methods, failed = {}, {}
    for name, res in results.items():
        if "error" in res:
            failed[name] = res
            continue
        if not res["images_per_s"]:
            failed[name] = {"error": "no batch size could be timed"}
            continue
        entry = {k: res[k] for k in SCHEMA_KEYS}
        entry.update({k: v for k, v in res.items() if k not in SCHEMA_KEYS and k not in ("method",)})
        methods[name] = {k: (_round(v) if k != "seconds_per_batch" else v) for k, v in entry.items()}
    device_names = {r["device_name"] for r in results.values() if "device_name" in r}
    obj = {"schema": EFFICIENCY_SCHEMA, "device": ", ".join(sorted(device_names)) or meta.pop("device_hint", "?"),
           "backbone": meta.pop("backbone"), "methods": methods}
    meta.pop("device_hint", None)
    obj.update(meta)
    if failed:
        obj["failed"] = failed
    return obj


def evaluate_targets(obj: dict) -> list[dict]:
    """The issue's targets against the measured numbers: PASS, FAIL or n/a, with the numbers."""
    methods = obj["methods"]
    sel, zs, tpt = methods.get("SelfTPT"), methods.get("ZeroshotCLIP"), methods.get("TPT")
    n_cls = obj.get("num_classes")
    lines = []

    def add(target: str, ok: bool | None, detail: str) -> None:
        lines.append({"target": target, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
                      "detail": detail})

    t = "Self-TPT images/s >= 0.95x zero-shot CLIP's (same backbone and batch)"
    paired = obj.get("paired_throughput") or {}
    if paired.get("batches"):
        for bs, p in sorted(paired["batches"].items(), key=lambda kv: int(kv[0])):
            a, b = p["images_per_s"]["SelfTPT"], p["images_per_s"]["ZeroshotCLIP"]
            add(f"{t}, batch {bs}, paired in one process", p["ratio"] >= 0.95,
                f"{_fmt_speed(a)} vs {_fmt_speed(b)} img/s (medians); median ratio of back-to-back pairs {p['ratio']:.2f}x "
                f"({p['samples']} pairs)")
    elif paired.get("error"):
        add(t + ", paired", None, f"paired run failed: {paired['error']}")
    if sel and zs:
        for bs in sorted(set(sel["images_per_s"]) & set(zs["images_per_s"]), key=int):
            a, b = sel["images_per_s"][bs], zs["images_per_s"][bs]
            add(f"{t}, batch {bs}, one method after the other", a >= 0.95 * b, f"{_fmt_speed(a)} vs {_fmt_speed(b)} img/s = {a / b:.2f}x")
    else:
        add(t, None, "needs SelfTPT and ZeroshotCLIP")
    t = "Self-TPT >= 50x TPT's images/s at batch 1, >= 100 classes, ViT-B/16"
    if sel and tpt and "1" in sel["images_per_s"] and "1" in tpt["images_per_s"]:
        a, b = sel["images_per_s"]["1"], tpt["images_per_s"]["1"]
        caveat = []
        if n_cls is not None and n_cls < 100:
            caveat.append(f"only {n_cls} classes")
        if obj["backbone"] != "ViT-B/16":
            caveat.append(f"backbone {obj['backbone']}")
        detail = f"{_fmt_speed(a)} vs {_fmt_speed(b)} img/s = {a / b:.1f}x at {n_cls} classes"
        add(t, None if caveat else a >= 50 * b, detail + (f" (not the target's setting: {', '.join(caveat)})"
                                                          if caveat else ""))
    else:
        add(t, None, "needs SelfTPT and TPT at batch 1")
    t = "Self-TPT peak memory <= 1.1x zero-shot CLIP's"
    if sel and zs and sel["peak_mem_mb"] and zs["peak_mem_mb"]:
        a, b = sel["peak_mem_mb"], zs["peak_mem_mb"]
        floors = [m.get("mem_at_start_mb_by_batch", {}) for m in (sel, zs)]
        floor = (f"; in use when the phase began: {max(floors[0].values()):.0f} vs {max(floors[1].values()):.0f} MB"
                 if all(floors) else "")
        add(t, a <= 1.1 * b, f"{a:.0f} vs {b:.0f} MB = {a / b:.2f}x (inference phase{floor})")
    else:
        add(t, None, "needs SelfTPT and ZeroshotCLIP peak memory")
    t = "cache: 3 seeds x 3 prompt methods <= 1.2x one image-encoding pass"
    sweep = obj.get("cache_sweep")
    if sweep and "ratio" in sweep:
        add(t, sweep["ratio"] <= 1.2, f"{sweep['sweep_s']:.2f} s for {sweep['evaluations']} evaluations vs "
            f"{sweep['single_pass_s']:.2f} s for one pass = {sweep['ratio']:.2f}x ({sweep['num_images']} images)")
    else:
        add(t, None, "run with --cache-sweep")
    t = "Self-TPT adaptation on 1000 class names within 24 GB (CPU, ViT-B/16)"
    if sel and sel.get("one_time_peak_mem_mb") is not None:
        peak = sel["one_time_peak_mem_mb"]
        caveat = []
        if n_cls is not None and n_cls < 1000:
            caveat.append(f"{n_cls} classes")
        if obj["backbone"] != "ViT-B/16":
            caveat.append(f"backbone {obj['backbone']}")
        detail = (f"{sel['one_time_s']:.1f} s one-time (of which {sel.get('adaptation_s') or 0:.1f} s in "
                  f"{sel.get('tta_steps')} TTA steps), peak {peak / GIB:.2f} GB on {obj['device']}")
        add(t, None if caveat else peak <= 24 * GIB, detail + (f" (not the target's setting: {', '.join(caveat)})"
                                                                if caveat else ""))
    else:
        add(t, None, "needs SelfTPT")
    return lines


def _fmt_speed(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def format_table(obj: dict) -> str:
    """A terminal table: images/s per batch size, peak memory, one-time cost, speed-up vs TPT."""
    from tabulate import tabulate

    batches = sorted({b for m in obj["methods"].values() for b in m["images_per_s"]}
                     | {str(b) for b in obj.get("batch_sizes", [])}, key=int)
    tpt = obj["methods"].get("TPT", {}).get("images_per_s", {}).get("1")
    headers = ["method", *[f"img/s @{b}" for b in batches], "peak MB (infer)", "peak MB (one-time)",
               "one-time s", "x TPT @1"]
    rows = []
    for name, m in obj["methods"].items():
        cells = []
        for b in batches:
            if b in m["images_per_s"]:
                cells.append(_fmt_speed(m["images_per_s"][b]))
            else:
                cells.append("n/a (per image)" if int(b) in m.get("not_applicable_batch_sizes", []) else "-")
        one = m["one_time_s"]
        speedup = f"{m['images_per_s']['1'] / tpt:.1f}x" if tpt and "1" in m["images_per_s"] else "-"
        rows.append([name, *cells, f"{m['peak_mem_mb']:.0f}" if m["peak_mem_mb"] is not None else "-",
                     f"{m['one_time_peak_mem_mb']:.0f}" if m.get("one_time_peak_mem_mb") is not None else "-",
                     f"{one:.2f}" if one is not None else "-", speedup])
    for name, res in obj.get("failed", {}).items():
        rows.append([name, *(["failed"] * len(batches)), "-", "-", "-", "-"])
    return tabulate(rows, headers=headers, tablefmt="github")


def target_lines(obj: dict) -> list[str]:
    return [f"{t['status']:<4}  {t['target']}: {t['detail']}" for t in obj.get("targets", [])]


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def run_benchmark(args: argparse.Namespace) -> list[Path]:
    """Measure every method for every class setting; write, print and return the JSON paths."""
    from tqdm import tqdm

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UserError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device")
    work_dir = Path(args.output_dir).resolve()
    backbone = resolve_backbone(args.backbone, args.backbone_path, args.random_weights, work_dir)
    log.info("backbone %s (weights: %s, input %d px)", backbone.label, backbone.weights, backbone.resolution)
    if args.dataset:
        settings = [(args.dataset, None)]
    else:
        settings = [(SYNTHETIC_DATASET, n) for n in args.num_classes]
    safe_backbone = re.sub(r"[^A-Za-z0-9]+", "-", backbone.label).strip("-")
    written = []
    for index, (dataset, n_cls) in enumerate(settings):
        if n_cls is not None:
            root = write_synthetic_dataset(
                work_dir / "data" / f"synthetic_{n_cls}cls_{args.num_images}img_{backbone.resolution}px",
                n_cls, args.num_images, backbone.resolution)
            tag = f"{safe_backbone}_{n_cls}cls"
        else:
            root = Path(args.root).expanduser().resolve()
            tag = f"{safe_backbone}_{dataset}"
        base_job = {
            "backbone_name": backbone.name, "backbone_path": backbone.path, "resolution": backbone.resolution,
            "dataset": dataset, "root": str(root), "dataset_config_file": args.dataset_config_file or "",
            "subsample_classes": args.subsample_classes, "device": args.device, "precision": args.precision,
            "num_images": args.num_images, "batch_sizes": sorted(set(args.batch_sizes)),
            "warmup": args.warmup, "repeats": args.repeats, "max_seconds": args.max_seconds,
            "tta_steps": args.tta_steps, "opts": list(args.opts or []), "threads": args.threads,
            "quiet": args.quiet,
        }
        jobs = [dict(base_job, kind="method", method=m, tag=f"{tag}_{m}", scratch=str(work_dir / "scratch" / tag / m))
                for m in args.methods]
        if args.paired:
            jobs.append(dict(base_job, kind="paired", tag=f"{tag}_paired",
                             scratch=str(work_dir / "scratch" / tag / "paired")))
        if args.cache_sweep and index == 0:
            jobs.append(dict(base_job, kind="cache_sweep", tag=f"{tag}_cache_sweep",
                             scratch=str(work_dir / "scratch" / tag / "cache_sweep"),
                             sweep_batch_size=max(args.batch_sizes)))
        results, sweep, paired = {}, None, None
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
        ok = [r for r in results.values() if "error" not in r]
        meta = {
            "backbone": backbone.label, "device_hint": args.device, "weights": backbone.weights,
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
        _write_json(obj, path)
        print(f"\n{backbone.label} ({backbone.weights}), {obj['num_classes']} classes, {obj['num_images']} images, "
              f"{obj['device']}, precision {args.precision}")
        print(format_table(obj))
        for line in target_lines(obj):
            print(line)
        print(f"wrote {path}")
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Images/s, peak memory and one-time cost of ZeroshotCLIP, CoOp, TPT, SelfTPT and "
                    "SelfTPT-v on the same images; writes the efficiency JSON that parse_results.py --plot reads")
    p.add_argument("--backbone", default="ViT-B/16",
                   help="CLIP architecture or backbone name, or a weights file (default ViT-B/16); an "
                        "architecture without local weights is built with random weights")
    p.add_argument("--backbone-path", default="", help="local weights file for --backbone")
    p.add_argument("--random-weights", action="store_true", help="random weights even if weights exist here")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"default: {' '.join(METHODS)}")
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
                   help="PREC of every method; auto = each method's own default (fp16 on CUDA, TPT amp; fp32 on CPU)")
    p.add_argument("--tta-steps", type=int, default=None, help="Self-TPT's TTA_STEPS (default: its config)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per method (0 = torch's default)")
    p.add_argument("--cache-sweep", action="store_true",
                   help="also measure TEST.FEATURE_CACHE: 3 seeds x 3 methods against one encoding pass")
    p.add_argument("--paired", action="store_true",
                   help="also time ZeroshotCLIP and SelfTPT alternately in one process (the throughput "
                        "ratio then does not depend on other load on the machine)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (faster start; peak memory then not isolated per method)")
    p.add_argument("--output-dir", default="output/efficiency", help="JSON, logs, random weights, synthetic data")
    p.add_argument("--output", default="", help="JSON path (one class setting only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; method output only in the logs")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE config options applied to every method (last on the line)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if len(args.opts) % 2:
        print(f"error: --opts takes KEY VALUE pairs; got {' '.join(args.opts)}", file=sys.stderr)
        return 2
    if min(args.batch_sizes) < 1 or args.num_images < 1 or args.repeats < 1:
        print("error: batch sizes, --num-images and --repeats must be positive", file=sys.stderr)
        return 2
    try:
        run_benchmark(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
