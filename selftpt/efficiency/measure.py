"""The measurements, each the work of one job: a method, the paired timing, the cache sweep."""
from __future__ import annotations

import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from selftpt.efficiency.memory import PeakMemory
from selftpt.efficiency.methods import load_settings, method_cfg, method_spec
from selftpt.efficiency.timing import chunks_of, device_name, sig, sync, time_batches, timed_test

log = logging.getLogger("selftpt.efficiency")


def measure_method(job: dict) -> dict:
    """Build one method's trainer and measure it (the work of one subprocess)."""
    from selftpt.toolbox import build_trainer

    method = job["method"]
    spec = method_spec(method)
    cfg = method_cfg(job, method)
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
    sync(trainer.device)
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
        speeds[str(bs)] = sig(bs / statistics.median(times))
        best[str(bs)] = sig(bs / min(times))  # robust to other load on the machine
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
        "num_images": num_images, "memory_scope": memory.scope, "device_name": device_name(trainer.device),
    }
    if tta:
        result.update(adaptation_s=tta.get("seconds"), tta_steps=tta.get("steps"),
                      cpt_loss_before=tta.get("cpt_loss_before"), cpt_loss_after=tta.get("cpt_loss_after"))
    if "text_features_seconds" in extra:
        result["text_features_s"] = extra["text_features_seconds"]
    return result


def measure_paired(job: dict) -> dict:
    """The paired methods' inference (``paired`` in configs/efficiency.yaml) timed alternately
    in one process, on the same batches: their ratio is then immune to other load on the
    machine, which separate processes measured minutes apart are not."""
    from selftpt.toolbox import build_trainer

    paired = load_settings()["paired"]
    names = (paired["baseline"], paired["method"])
    trainers = {}
    for method in names:
        torch.manual_seed(0)
        trainer = build_trainer(method_cfg(job, method, extra=paired.get("opts", [])))
        trainer.set_model_mode("eval")
        trainer.prepare_for_test()
        trainers[method] = trainer
    datasets = {m: t.test_loader.dataset for m, t in trainers.items()}
    same = len({repr(d.transform) for d in datasets.values()}) == 1
    num_images = min(job["num_images"], *(len(d) for d in datasets.values()))
    out: dict[str, Any] = {"methods": list(names), "num_images": num_images, "batches": {}}
    for bs in job["batch_sizes"]:
        if bs > num_images:
            continue
        chunks = chunks_of(num_images, bs)
        times: dict[str, list[float]] = {m: [] for m in names}
        log.info("paired timing, batch size %d", bs)
        with torch.no_grad():
            for step in range(job["warmup"] + job["repeats"] * len(chunks)):
                chunk = chunks[step % len(chunks)]
                order = names if step % 2 == 0 else names[::-1]
                shared = torch.stack([datasets[order[0]][i]["img"] for i in chunk]) if same else None
                for method in order:
                    trainer = trainers[method]
                    images = (shared if same else torch.stack([datasets[method][i]["img"] for i in chunk]))
                    images = images.to(trainer.device)
                    sync(trainer.device)
                    t0 = time.perf_counter()
                    trainer.model_inference(images)
                    sync(trainer.device)
                    if step >= job["warmup"]:
                        times[method].append(time.perf_counter() - t0)
        speed = {m: sig(bs / statistics.median(v)) for m, v in times.items()}
        # each pair ran back to back: the median of per-pair ratios cancels slow drifts in load
        ratio = statistics.median(b / m for b, m in zip(times[names[0]], times[names[1]]))
        out["batches"][str(bs)] = {"images_per_s": speed, "ratio": sig(ratio), "samples": len(times[names[1]]),
                                   "seconds": {m: [round(t, 6) for t in v] for m, v in times.items()}}
    return out


def measure_cache_sweep(job: dict) -> dict:
    """One uncached evaluation pass against seeds x methods through the feature cache."""
    from selftpt.toolbox import build_trainer

    settings = load_settings()["cache_sweep"]
    cache_dir = Path(job["scratch"]) / "feature_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    batch = ["DATALOADER.TEST.BATCH_SIZE", str(job["sweep_batch_size"])]
    log.info("cache sweep: one uncached evaluation pass (%s)", settings["uncached"])
    trainer = build_trainer(method_cfg(job, settings["uncached"], extra=batch))
    single_pass_s, _ = timed_test(trainer)
    num_images = len(trainer.test_loader.dataset)
    del trainer
    runs = []
    for seed in settings["seeds"]:
        for method in settings["methods"]:
            log.info("cache sweep: %s seed %d through the cache", method, seed)
            trainer = build_trainer(method_cfg(
                job, method, seed, extra=batch + ["TEST.FEATURE_CACHE", str(cache_dir)]))
            eval_s, prepare_s = timed_test(trainer)
            runs.append({"method": method, "seed": seed, "eval_s": eval_s, "prepare_s": prepare_s,
                         "accuracy": trainer.test_result["metrics"].get("accuracy")})
            del trainer
    sweep_s = sum(r["eval_s"] for r in runs)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"single_pass_s": single_pass_s, "sweep_s": sweep_s, "ratio": sweep_s / single_pass_s,
            "evaluations": len(runs), "num_images": num_images, "batch_size": job["sweep_batch_size"],
            "runs": runs}
