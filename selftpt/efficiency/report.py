"""The benchmark's output: the schema-1 efficiency JSON (``selftpt.plots``) and its terminal table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selftpt.efficiency.methods import load_settings
from selftpt.efficiency.targets import fmt_speed
from selftpt.fsmode import atomic_write
from selftpt.plots import EFFICIENCY_SCHEMA

SCHEMA_KEYS = ("images_per_s", "peak_mem_mb", "one_time_s")


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


def format_table(obj: dict) -> str:
    """A terminal table: images/s per batch size, peak memory, one-time cost, batch-1 speed-up
    over ``speedup_over`` (configs/efficiency.yaml)."""
    from tabulate import tabulate

    over = load_settings()["speedup_over"]
    batches = sorted({b for m in obj["methods"].values() for b in m["images_per_s"]}
                     | {str(b) for b in obj.get("batch_sizes", [])}, key=int)
    reference = obj["methods"].get(over, {}).get("images_per_s", {}).get("1")
    headers = ["method", *[f"img/s @{b}" for b in batches], "peak MB (infer)", "peak MB (one-time)",
               "one-time s", f"x {over} @1"]
    rows = []
    for name, m in obj["methods"].items():
        cells = []
        for b in batches:
            if b in m["images_per_s"]:
                cells.append(fmt_speed(m["images_per_s"][b]))
            else:
                cells.append("n/a (per image)" if int(b) in m.get("not_applicable_batch_sizes", []) else "-")
        one = m["one_time_s"]
        speedup = f"{m['images_per_s']['1'] / reference:.1f}x" if reference and "1" in m["images_per_s"] else "-"
        rows.append([name, *cells, f"{m['peak_mem_mb']:.0f}" if m["peak_mem_mb"] is not None else "-",
                     f"{m['one_time_peak_mem_mb']:.0f}" if m.get("one_time_peak_mem_mb") is not None else "-",
                     f"{one:.2f}" if one is not None else "-", speedup])
    for name in obj.get("failed", {}):
        rows.append([name, *(["failed"] * len(batches)), "-", "-", "-", "-"])
    return tabulate(rows, headers=headers, tablefmt="github")


def target_lines(obj: dict) -> list[str]:
    """One printed line per evaluated target."""
    return [f"{t['status']:<4}  {t['target']}: {t['detail']}" for t in obj.get("targets", [])]


def write_json(obj: dict, path: Path) -> None:
    """Write ``obj`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2))
