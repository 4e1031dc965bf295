"""Timing loops: seconds per batch of a trainer's inference, and of a whole ``trainer.test()``."""
from __future__ import annotations

import platform
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that the clock measures it (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The device as reported: the GPU's name, or the CPU with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sig(value: float, digits: int = 5) -> float:
    """``value`` to ``digits`` significant digits (speeds span orders of magnitude)."""
    return float(f"{value:.{digits}g}")


def chunks_of(num_images: int, batch_size: int) -> list[list[int]]:
    """Image indices in full batches (a last partial batch is left out: it would time less work)."""
    return [list(range(i, i + batch_size)) for i in range(0, num_images - batch_size + 1, batch_size)]


def time_batches(infer: Callable[[torch.Tensor], Any], make_batch: Callable[[list[int]], torch.Tensor],
                 num_images: int, batch_size: int, warmup: int, repeats: int, max_seconds: float,
                 device: torch.device, desc: str = "") -> list[float]:
    """Seconds of ``infer`` per batch: ``warmup`` untimed batches, then ``repeats`` passes over
    the images in full batches (stopping early after ``max_seconds``, never before one timed
    batch). Batches are built by ``make_batch(indices)`` before the clock starts."""
    from tqdm import tqdm

    chunks = chunks_of(num_images, batch_size)
    seconds: list[float] = []
    with torch.no_grad():
        for i in range(warmup):
            images = make_batch(chunks[i % len(chunks)])
            infer(images)
            sync(device)
            del images
        start = time.perf_counter()
        bar = tqdm(total=repeats * len(chunks), desc=desc, dynamic_ncols=True, leave=False)
        for _ in range(repeats):
            for chunk in chunks:
                images = make_batch(chunk)
                sync(device)
                t0 = time.perf_counter()
                infer(images)
                sync(device)
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


def timed_test(trainer: Any) -> tuple[float, float]:
    """(seconds of the evaluation loop, seconds of prepare_for_test) of one ``trainer.test()``."""
    prepare = trainer.prepare_for_test
    box = {"prepare": 0.0}

    def timed_prepare() -> None:
        t0 = time.perf_counter()
        prepare()
        sync(trainer.device)
        box["prepare"] = time.perf_counter() - t0

    trainer.prepare_for_test = timed_prepare
    try:
        start = time.perf_counter()
        trainer.test()
        sync(trainer.device)
        total = time.perf_counter() - start
    finally:
        del trainer.prepare_for_test
    return total - box["prepare"], box["prepare"]
