"""Efficiency benchmark: images per second, peak memory and one-time cost of each method.

Every method is measured by the project's own trainer, built from its reference config (a
registered trainer's ``REFERENCE_CONFIGS``: ``configs/trainers/<Trainer>/<stem>.yaml``) and the
command line, on the same images:

- **one-time cost** = the trainer's ``prepare_for_test`` (what ``ClipTrainer.test`` runs once
  before the first image): e.g. the class-prompt text features, or a class-name adaptation
  plus text features; nothing for a method that adapts per image.
- **images/s** at each batch size = batch size / median seconds of ``model_inference`` on one
  batch (what ``test`` calls per batch), after ``warmup`` untimed batches, over ``repeats``
  passes (or until ``max_seconds``); the batch is built from the method's own test transform
  (test-time views included) before the clock starts, so decoding and augmentation are not
  timed; CUDA is synchronised around each call. A ``PER_IMAGE`` trainer adapts per image: only
  its batch-1 figure exists (larger batches: not applicable).
- **peak memory** of the inference phase (the schema's ``peak_mem_mb``; the one-time phase's
  peak is reported separately): on CUDA ``torch.cuda.max_memory_allocated`` after a reset;
  on CPU the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` after
  a ``malloc_trim``; where that reset is impossible, the process's ``ru_maxrss``). Each
  method runs in a fresh subprocess, so no method sees another's allocations.

Without weights (no file, nothing in the CLIP download cache), a ``CLIP_ARCHS`` architecture is
built with random weights: speed and memory do not depend on weight values. Without a dataset,
a synthetic one is written: ``num_images`` images at the backbone's resolution and
``num_classes`` class names ("synthetic object 17").

The optional cache sweep measures ``TEST.FEATURE_CACHE`` (``selftpt.feature_cache``): seeds x
methods evaluated with ``ClipTrainer.test`` on one split through the cache, against one
uncached evaluation pass (image decoding + encoding); one-time costs (``prepare_for_test``) and
model loading are excluded from both. Which methods the comparisons use and the targets they
are held to are data: ``configs/efficiency.yaml``.

Modules: ``synthetic`` (the dataset), ``memory`` (peak memory), ``methods`` (settings, method
configs through ``selftpt.launch.setup_cfg``), ``timing`` (timing loops), ``measure`` (the
measurements), ``jobs`` (one job per subprocess), ``targets``, ``report`` (JSON and table),
``cli`` (``benchmark_efficiency.py``). The output is the efficiency JSON of ``selftpt.plots``
(schema 1) plus metadata, read by ``parse_results.py --plot``.
"""
from selftpt.efficiency.cli import main
from selftpt.efficiency.memory import PeakMemory
from selftpt.efficiency.synthetic import SYNTHETIC_DATASET, write_synthetic_dataset

__all__ = ["PeakMemory", "SYNTHETIC_DATASET", "main", "write_synthetic_dataset"]
