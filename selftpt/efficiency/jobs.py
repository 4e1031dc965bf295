"""Running a job in a fresh Python process (or in this one), with its output in a log file.

A job is a JSON-able dict: what to measure (``kind``: ``method``, ``paired``, ``cache_sweep``)
and every setting it needs, among them ``register``: the modules that register trainers and
datasets (``methods.registration_modules``), imported by the job's process before it builds
anything. The subprocess finds them on the parent's import path, passed as ``PYTHONPATH``.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from selftpt.efficiency.measure import measure_cache_sweep, measure_method, measure_paired
from selftpt.fsmode import atomic_write

log = logging.getLogger("selftpt.efficiency")

_WORKER = "import sys; from selftpt.efficiency.jobs import worker_main; sys.exit(worker_main(sys.argv[1:]))"
_MEASURE = {"method": measure_method, "paired": measure_paired, "cache_sweep": measure_cache_sweep}


def run_job(job: dict) -> dict:
    """Run one job in this process; returns its result."""
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    for module in job.get("register", []):
        importlib.import_module(module)
    return _MEASURE[job["kind"]](job)


def worker_main(argv: Sequence[str]) -> int:
    """Subprocess entry: ``<job.json> <result.json>``; trainer output goes to stdout."""
    job_path, result_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    result = run_job(job)
    with atomic_write(result_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(result, indent=1))
    return 0


def _child_env() -> dict[str, str]:
    """This environment, with this process's import path as ``PYTHONPATH``: the child then
    imports what this process imports (the registration modules included), as a
    multiprocessing "spawn" child does."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(os.path.abspath(p) for p in sys.path))  # "" = this folder
    return env


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
    with open(log_path, "w", encoding="utf-8") as out:
        proc = subprocess.run([sys.executable, "-c", _WORKER, str(job_path), str(result_path)],
                              env=_child_env(), stdout=out, stderr=subprocess.STDOUT
                              if job.get("quiet") else None, check=False)
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"exit code {proc.returncode}{killed}: {' | '.join(tail)}", "log": str(log_path)}
    return json.loads(result_path.read_text(encoding="utf-8"))
