"""The efficiency-efficacy picture: accuracy against images per second, one point per method.

Accuracy comes from the aggregated tables (``selftpt.tables``: the base-to-new average HM, or
the mean over target datasets); speed and memory from the efficiency benchmark's JSON, whose
format is defined here (schema 1)::

    {
      "schema": 1,
      "device": "NVIDIA H200",            # free text: GPU name or "cpu (16 threads)"
      "backbone": "ViT-B/16",
      "methods": {
        "SelfTPT": {
          "images_per_s": {"1": 146.7, "100": 910.2},   # batch size (as a string) -> median
          "peak_mem_mb": 320.0,           # CUDA peak allocated (GPU) / peak RSS (CPU); null = not measured
          "one_time_s": 12.3              # one-time cost (class-name adaptation, text features); null = none measured
        },
        "TPT": {"images_per_s": {"1": 5.3}, "peak_mem_mb": 11200.0, "one_time_s": 0.0}
      }
    }

Required: ``schema`` (= 1), ``device``, ``backbone``, ``methods`` (non-empty); per method
``images_per_s`` (non-empty; keys are positive integers written as strings, values positive
finite numbers), ``peak_mem_mb`` and ``one_time_s`` (non-negative numbers or null). Any other
top-level key (``precision``, ``num_classes``, ``num_images``, ``repeats``, ``created``, ...)
is free metadata. Method names are the results files' ``method`` names (table row labels).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

EFFICIENCY_SCHEMA = 1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_efficiency(obj: Any, where: str = "efficiency JSON") -> dict:
    """Check an efficiency benchmark object against schema 1; return it or raise ValueError."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("schema") != EFFICIENCY_SCHEMA:
        raise ValueError(f"{where}: schema {obj.get('schema')!r} is not {EFFICIENCY_SCHEMA}")
    for key in ("device", "backbone"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"{where}: {key!r} must be a string, got {obj.get(key)!r}")
    methods = obj.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"{where}: 'methods' must be a non-empty object")
    for name, entry in methods.items():
        at = f"{where}: methods[{name!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{at} must be an object")
        speeds = entry.get("images_per_s")
        if not isinstance(speeds, dict) or not speeds:
            raise ValueError(f"{at}.images_per_s must be a non-empty object")
        for batch, ips in speeds.items():
            if not (isinstance(batch, str) and batch.isdigit() and int(batch) > 0):
                raise ValueError(f"{at}.images_per_s: batch size key {batch!r} is not a positive integer")
            if not (_number(ips) and ips > 0):
                raise ValueError(f"{at}.images_per_s[{batch!r}] must be a positive number, got {ips!r}")
        for key in ("peak_mem_mb", "one_time_s"):
            if key not in entry:
                raise ValueError(f"{at} lacks {key!r} (use null if not measured)")
            value = entry[key]
            if value is not None and not (_number(value) and value >= 0):
                raise ValueError(f"{at}.{key} must be a non-negative number or null, got {value!r}")
    return obj


def load_efficiency(path: str | os.PathLike) -> dict:
    """Read and validate an efficiency JSON file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    return validate_efficiency(obj, where=str(path))


def plot_efficiency(
    accuracy: Mapping[str, float],
    efficiency: Mapping[str, Any],
    out_path: str | os.PathLike,
    batch_size: str | int | None = None,
    accuracy_label: str = "Accuracy (%)",
    flagged: frozenset[str] | set[str] = frozenset(),
) -> tuple[Path, list[str]]:
    """Write the accuracy-vs-throughput scatter as a PNG.

    Args:
        accuracy: method name -> accuracy (e.g. ``Table.headline`` means).
        efficiency: a schema-1 efficiency object (see module docstring).
        out_path: PNG path; parent folders are created.
        batch_size: which ``images_per_s`` entry to plot; default: the smallest batch size
            that every plotted method has.
        accuracy_label: y-axis label.
        flagged: methods whose accuracy comes from incomplete results (marked with ``*``).

    Returns:
        The PNG path and notes about methods present on one side only.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    validate_efficiency(efficiency)
    speeds = efficiency["methods"]
    names = [m for m in accuracy if m in speeds]
    notes = [f"{m}: in results but not in the efficiency JSON; not plotted"
             for m in accuracy if m not in speeds]
    notes += [f"{m}: in the efficiency JSON but has no results; not plotted"
              for m in speeds if m not in accuracy]
    if not names:
        raise ValueError(f"no method is in both the results ({sorted(accuracy)}) and the "
                         f"efficiency JSON ({sorted(speeds)}); names must match")
    common = set.intersection(*(set(speeds[m]["images_per_s"]) for m in names))
    batch = str(batch_size) if batch_size is not None else (
        min(common, key=int) if common else None)
    if batch is None or batch not in common:
        raise ValueError(f"batch size {batch} is not measured for every plotted method; "
                         f"common batch sizes: {sorted(common, key=int)}")

    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=150)
    for name in names:
        x, y = speeds[name]["images_per_s"][batch], accuracy[name]
        mem = speeds[name]["peak_mem_mb"]
        ax.scatter([x], [y], s=60, zorder=3)
        label = name + ("*" if name in flagged else "")
        if mem is not None:
            label += f"\n{mem / 1024:.2f} GB"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")  # TPT-style and prompt-only methods differ by orders of magnitude
    ax.set_xlabel(f"Images per second (batch {batch}, log scale)")
    ax.set_ylabel(accuracy_label)
    ax.set_title(f"{efficiency['backbone']} on {efficiency['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    if flagged & set(names):
        fig.text(0.01, 0.01, "*: accuracy from incomplete results", fontsize=7)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out, notes
