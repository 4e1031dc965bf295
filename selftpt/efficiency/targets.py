"""The pass / fail targets (``targets`` in configs/efficiency.yaml) against measured numbers.

Each target names a ``kind``, one of the checks below, and the methods and thresholds it
compares; a check returns ``(title suffix, ok, detail)`` lines, ``ok`` None when the run cannot
tell (a method missing, or not the target's setting: too few classes, another backbone).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from selftpt.efficiency.methods import load_settings

GIB = 1024.0  # MB per GB (memory is measured in MB)
# (title suffix, PASS True / FAIL False / n/a None, detail)
Line = tuple[str, "bool | None", str]


def fmt_speed(value: float) -> str:
    """Images/s as printed: whole numbers from 100 up, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _caveats(obj: dict, classes: int, backbone: str, few: str) -> str:
    """Why this run is not the target's setting (fewer than ``classes`` classes, said as
    ``few``; another backbone), or "" when it is."""
    n_cls, caveat = obj.get("num_classes"), []
    if n_cls is not None and n_cls < classes:
        caveat.append(few.format(n=n_cls))
    if obj["backbone"] != backbone:
        caveat.append(f"backbone {obj['backbone']}")
    return f" (not the target's setting: {', '.join(caveat)})" if caveat else ""


def _speed_ratio(obj: dict, t: dict) -> Iterator[Line]:
    """Per batch size: the paired timing when it ran, and the separate measurements."""
    sel, base = obj["methods"].get(t["method"]), obj["methods"].get(t["baseline"])
    paired = obj.get("paired_throughput") or {}
    if paired.get("batches") and set(paired.get("methods", ())) == {t["method"], t["baseline"]}:
        for bs, p in sorted(paired["batches"].items(), key=lambda kv: int(kv[0])):
            a, b = p["images_per_s"][t["method"]], p["images_per_s"][t["baseline"]]
            yield (f", batch {bs}, paired in one process", p["ratio"] >= t["min_ratio"],
                   f"{fmt_speed(a)} vs {fmt_speed(b)} img/s (medians); median ratio of back-to-back pairs "
                   f"{p['ratio']:.2f}x ({p['samples']} pairs)")
    elif paired.get("error"):
        yield ", paired", None, f"paired run failed: {paired['error']}"
    if sel and base:
        for bs in sorted(set(sel["images_per_s"]) & set(base["images_per_s"]), key=int):
            a, b = sel["images_per_s"][bs], base["images_per_s"][bs]
            yield (f", batch {bs}, one method after the other", a >= t["min_ratio"] * b,
                   f"{fmt_speed(a)} vs {fmt_speed(b)} img/s = {a / b:.2f}x")
    else:
        yield "", None, f"needs {t['method']} and {t['baseline']}"


def _speed_ratio_at_scale(obj: dict, t: dict) -> Iterator[Line]:
    sel, base = obj["methods"].get(t["method"]), obj["methods"].get(t["baseline"])
    bs = str(t["batch"])
    if not (sel and base and bs in sel["images_per_s"] and bs in base["images_per_s"]):
        yield "", None, f"needs {t['method']} and {t['baseline']} at batch {bs}"
        return
    a, b = sel["images_per_s"][bs], base["images_per_s"][bs]
    caveat = _caveats(obj, t["min_classes"], t["backbone"], "only {n} classes")
    yield ("", None if caveat else a >= t["min_ratio"] * b,
           f"{fmt_speed(a)} vs {fmt_speed(b)} img/s = {a / b:.1f}x at {obj.get('num_classes')} classes{caveat}")


def _memory_ratio(obj: dict, t: dict) -> Iterator[Line]:
    sel, base = obj["methods"].get(t["method"]), obj["methods"].get(t["baseline"])
    if not (sel and base and sel["peak_mem_mb"] and base["peak_mem_mb"]):
        yield "", None, f"needs {t['method']} and {t['baseline']} peak memory"
        return
    a, b = sel["peak_mem_mb"], base["peak_mem_mb"]
    floors = [m.get("mem_at_start_mb_by_batch", {}) for m in (sel, base)]
    floor = (f"; in use when the phase began: {max(floors[0].values()):.0f} vs {max(floors[1].values()):.0f} MB"
             if all(floors) else "")
    yield "", a <= t["max_ratio"] * b, f"{a:.0f} vs {b:.0f} MB = {a / b:.2f}x (inference phase{floor})"


def _cache_sweep(obj: dict, t: dict) -> Iterator[Line]:
    sweep = obj.get("cache_sweep")
    if not (sweep and "ratio" in sweep):
        yield "", None, "run with --cache-sweep"
        return
    yield ("", sweep["ratio"] <= t["max_ratio"],
           f"{sweep['sweep_s']:.2f} s for {sweep['evaluations']} evaluations vs {sweep['single_pass_s']:.2f} s "
           f"for one pass = {sweep['ratio']:.2f}x ({sweep['num_images']} images)")


def _one_time_memory(obj: dict, t: dict) -> Iterator[Line]:
    sel = obj["methods"].get(t["method"])
    if not (sel and sel.get("one_time_peak_mem_mb") is not None):
        yield "", None, f"needs {t['method']}"
        return
    peak = sel["one_time_peak_mem_mb"]
    caveat = _caveats(obj, t["classes"], t["backbone"], "{n} classes")
    detail = (f"{sel['one_time_s']:.1f} s one-time (of which {sel.get('adaptation_s') or 0:.1f} s in "
              f"{sel.get('tta_steps')} TTA steps), peak {peak / GIB:.2f} GB on {obj['device']}")
    yield "", None if caveat else peak <= t["max_gb"] * GIB, detail + caveat


CHECKS: dict[str, Callable[[dict, dict], Iterator[Line]]] = {
    "speed_ratio": _speed_ratio, "speed_ratio_at_scale": _speed_ratio_at_scale, "memory_ratio": _memory_ratio,
    "cache_sweep": _cache_sweep, "one_time_memory": _one_time_memory,
}


def evaluate_targets(obj: dict, targets: list[dict] | None = None) -> list[dict[str, Any]]:
    """Each target against the measured numbers: ``{target, status: PASS|FAIL|n/a, detail}``."""
    settings = load_settings()
    sweep = settings["cache_sweep"]
    counts = {"seeds": len(sweep["seeds"]), "methods": len(sweep["methods"])}
    lines = []
    for target in settings["targets"] if targets is None else targets:
        title = target["title"].format(**{**counts, **target})
        for suffix, ok, detail in CHECKS[target["kind"]](obj, target):
            lines.append({"target": title + suffix, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
                          "detail": detail})
    return lines
