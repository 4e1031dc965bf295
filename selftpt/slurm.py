"""Running a sweep's chains as SLURM jobs, through ``submitit`` (``LAUNCHER=slurm``).

One job per chain (a training run, then the tests that load it), submitted together as one job
array. The sweep's semantics hold on the cluster because a job runs the very code a local
worker runs (``sweep.run_chain``): finished runs are skipped before submitting, a run
interrupted mid-way resumes from its last checkpoint (a requeued or resubmitted job reruns the
chain: its finished runs are skipped under their locks, the unfinished one resumes), and nothing
finished is overwritten. Preempted or timed-out jobs are requeued by ``submitit``.

Settings come from a YAML file (``SUBMIT_CONFIG``) and then environment variables, which win::

    SUBMIT_PARTITION  partition            SUBMIT_ACCOUNT  account
    SUBMIT_TIME       minutes or [D-]H:M:S SUBMIT_QOS      quality of service
    SUBMIT_GPUS       GPUs per job         SUBMIT_MEM      memory per job, e.g. 32G
    SUBMIT_CPUS       CPUs per job         SUBMIT_ARRAY_PARALLELISM  jobs of the array at once
    SUBMIT_SBATCH     further #SBATCH options, e.g. "--constraint=a100 --exclude=node7"
    SUBMIT_SETUP      shell lines run before the job, e.g. "module load cuda/12.1"

They are not named ``SLURM_*``: srun and sbatch read many ``SLURM_*`` variables themselves, and
the jobs inherit the environment they are submitted from.
"""
from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from selftpt.errors import UserError

CONFIG_ENV = "SUBMIT_CONFIG"
# setting -> (environment variable, what it is, for --help and messages)
SETTINGS: dict[str, tuple[str, str]] = {
    "partition": ("SUBMIT_PARTITION", "partition"),
    "time": ("SUBMIT_TIME", "time limit per job: minutes, or [D-]HH:MM[:SS] [1440]"),
    "gpus": ("SUBMIT_GPUS", "GPUs per job [0]"),
    "cpus": ("SUBMIT_CPUS", "CPUs per job (also the job's torch threads)"),
    "mem": ("SUBMIT_MEM", "memory per job, e.g. 32G"),
    "account": ("SUBMIT_ACCOUNT", "account to charge"),
    "qos": ("SUBMIT_QOS", "quality of service"),
    "array_parallelism": ("SUBMIT_ARRAY_PARALLELISM", "jobs of the array running at once"),
    "sbatch": ("SUBMIT_SBATCH", "further #SBATCH options, e.g. '--constraint=a100 --exclude=node7'"),
    "setup": ("SUBMIT_SETUP", "shell lines run before each job, e.g. 'module load cuda/12.1'"),
}


class SlurmError(UserError):
    """A SLURM setting, or the cluster itself, that makes submitting impossible."""


@dataclass(frozen=True)
class SlurmSettings:
    """What each job asks SLURM for (``None``: the cluster's default)."""

    partition: str | None = None
    time_min: int = 24 * 60
    gpus: int = 0
    cpus: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int = 256
    sbatch: Mapping[str, Any] = field(default_factory=dict)  # option name (no dashes) -> value or True
    setup: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line, for the sweep's first line and --dry-run."""
        parts = [f"partition {self.partition or '(default)'}", f"time {self.time_min} min",
                 f"gpus {self.gpus}", f"cpus {self.cpus or '(default)'}", f"mem {self.mem or '(default)'}"]
        parts += [f"{name} {value}" for name, value in (("account", self.account), ("qos", self.qos)) if value]
        parts += [f"--{k}" + ("" if v is True else f"={v}") for k, v in self.sbatch.items()]
        return ", ".join(parts)


def parse_time(text: str) -> int:
    """Minutes, from the formats of ``sbatch --time``: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``
    (seconds round up to a minute)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SlurmError(f"SUBMIT_TIME {text!r} is not a time limit; use minutes or [D-]HH:MM[:SS]")
    days, first, second, third = (int(g) if g else 0 for g in m.groups())
    if m.group(1) is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = first, second, third
    elif m.group(4) is not None:  # H:M:S
        hours, minutes, seconds = first, second, third
    else:  # M[:S]
        hours, minutes, seconds = 0, first, second
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def _sbatch_options(text: str) -> dict[str, Any]:
    """``"--constraint=a100 --exclusive"`` -> ``{"constraint": "a100", "exclusive": True}``."""
    options: dict[str, Any] = {}
    for word in shlex.split(text):
        if not word.startswith("--"):
            raise SlurmError(f"SUBMIT_SBATCH: {word!r} is not a long #SBATCH option; write e.g. --constraint=a100")
        name, sep, value = word[2:].partition("=")
        options[name.replace("-", "_")] = value if sep else True
    return options


def _positive(name: str, text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise SlurmError(f"{SETTINGS[name][0]} {text!r} is not a whole number")
    return int(text)


def read_settings(environ: Mapping[str, str] | None = None, config_file: str | Path | None = None) -> SlurmSettings:
    """The settings from ``config_file`` (YAML, the keys of ``SETTINGS``), then the environment."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = config_file or environ.get(CONFIG_ENV, "")
    if path:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise SlurmError(f"{CONFIG_ENV} {path}: cannot read it ({type(exc).__name__}: {reason})") from None
        if not isinstance(loaded, dict) or set(loaded) - set(SETTINGS):
            unknown = sorted(set(loaded) - set(SETTINGS)) if isinstance(loaded, dict) else ["(not a mapping)"]
            raise SlurmError(f"{path}: unknown settings {', '.join(map(str, unknown))}; known: {', '.join(SETTINGS)}")
        raw.update({k: str(v) if not isinstance(v, list) else "\n".join(map(str, v)) for k, v in loaded.items()})
    for name, (env, _) in SETTINGS.items():
        if environ.get(env, "").strip():
            raw[name] = environ[env]
    kwargs: dict[str, Any] = {}
    for name in ("partition", "mem", "account", "qos"):
        if raw.get(name):
            kwargs[name] = raw[name].strip()
    if raw.get("time"):
        kwargs["time_min"] = parse_time(raw["time"])
    for name in ("gpus", "cpus", "array_parallelism"):
        if raw.get(name):
            kwargs[name] = _positive(name, raw[name])
    if raw.get("sbatch"):
        kwargs["sbatch"] = _sbatch_options(raw["sbatch"])
    if raw.get("setup"):
        kwargs["setup"] = tuple(line for line in raw["setup"].splitlines() if line.strip())
    return SlurmSettings(**kwargs)


def _executor(settings: SlurmSettings, folder: Path, name: str) -> Any:
    try:
        import submitit
    except ImportError:
        raise SlurmError('LAUNCHER=slurm needs submitit: pip install -e ".[slurm]"') from None
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
    params: dict[str, Any] = dict(job_name=name, time=settings.time_min, array_parallelism=settings.array_parallelism,
                                  setup=list(settings.setup), additional_parameters=dict(settings.sbatch))
    params["additional_parameters"].setdefault("chdir", os.getcwd())  # registration modules import from here
    for key, value in (("partition", settings.partition), ("cpus_per_task", settings.cpus), ("mem", settings.mem),
                       ("account", settings.account), ("qos", settings.qos)):
        if value:
            params[key] = value
    if settings.gpus:
        params["gpus_per_node"] = settings.gpus
    executor.update_parameters(**params)
    return executor


def _checkpointable() -> type:
    try:
        from submitit.helpers import Checkpointable
    except ImportError:
        return object
    return Checkpointable


class ChainJob(_checkpointable()):  # type: ignore[misc]
    """One chain as a SLURM job: the runs a local worker would run, in order, in this process.

    ``submitit`` calls ``checkpoint`` when SLURM preempts the job or its time runs out, and
    requeues it; the requeued job runs the chain again, which skips finished runs and resumes
    the interrupted one from its checkpoint.
    """

    def __init__(self, sweep: Any, steps: list[tuple[int, Any]], modules: Sequence[str], threads: int = 0) -> None:
        self.sweep, self.steps, self.modules, self.threads = sweep, steps, tuple(modules), threads

    def __call__(self) -> list[tuple[int, str, str]]:
        from selftpt import sweep as sweeps

        for name in self.modules:  # the trainers and datasets the command line registered
            importlib.import_module(name)
        if self.threads:
            import torch
            torch.set_num_threads(self.threads)
        ended: list[tuple[int, str, str]] = []
        folders = {index: step.folder for index, step in self.steps}

        def report(kind: str, index: int, *rest: str) -> None:  # the job's log: one line per run
            if kind == "end":
                ended.append((index, rest[0], rest[1]))
                print(f"{rest[0]}: {folders[index]} ({rest[1]})", flush=True)

        sweeps.run_chain(self.sweep, self.steps, report, os.getpid())
        return ended


@dataclass
class SlurmOutcome:
    """What became of the submitted chains."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # one line per failed job: id, reason, log


def submit(sweep: Any, plan: list[list[Any]], settings: SlurmSettings, modules: Sequence[str],
           dry_run: bool = False, poll_s: float = 5.0, out: Any = None) -> SlurmOutcome | None:
    """Submit every chain of ``plan`` with work left as one job of an array; wait for them and
    print one line per run as its job ends. ``dry_run``: print what would be submitted, submit
    nothing, return None."""
    out = out or sys.stdout
    work = [[(i, s) for i, s in enumerate(chain) if s.action != "skip"] for chain in plan]
    work = [steps for steps in work if steps]
    logs = sweep.output / sweep.protocol / "slurm" / f"{sweep.trainer}-{sweep.cfg}"
    print(f"slurm: {len(work)} jobs ({settings.describe()}); logs in {logs}", file=out, flush=True)
    if dry_run:
        for n, steps in enumerate(work):
            runs = ", ".join(str(step.folder.relative_to(sweep.output)) for _, step in steps)
            print(f"  job {n}: {runs}", file=out)
        return None
    if not work:
        return SlurmOutcome()
    executor = _executor(settings, logs, f"{sweep.trainer}-{sweep.protocol}")
    threads = settings.cpus or 0
    try:
        with executor.batch():
            jobs = [executor.submit(ChainJob(sweep, steps, modules, threads)) for steps in work]
    except Exception as exc:  # sbatch refused the array (unknown partition, account, ...)
        raise SlurmError(f"sbatch refused the jobs: {str(exc).strip().splitlines()[-1]}") from None
    ids = sorted({job.job_id.split("_")[0] for job in jobs})
    print(f"slurm: submitted array {', '.join(ids)} ({len(jobs)} jobs)", file=out, flush=True)
    return _wait(jobs, work, sweep, poll_s, out)


def _left_the_queue(job: Any) -> bool:
    """True when SLURM no longer lists ``job`` and it left no result: cancelled (``scancel``) or
    lost with its node. ``submitit`` learns job states from ``sacct``, which a cluster without
    accounting storage lacks; ``squeue`` always answers."""
    try:
        listed = subprocess.run(["squeue", "-h", "-o", "%i", "-j", job.job_id], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if listed.returncode != 0 and "invalid job id" not in listed.stderr.lower():
        return False  # squeue itself failed: no conclusion
    return not listed.stdout.strip() and not Path(job.paths.result_pickle).exists()


def _wait(jobs: list[Any], work: list[list[tuple[int, Any]]], sweep: Any, poll_s: float, out: Any) -> SlurmOutcome:
    outcome = SlurmOutcome()
    pending = dict(enumerate(jobs))
    unlisted: Counter = Counter()  # polls in a row in which a job was neither listed nor done
    while pending:
        for n, job in pending.items():
            unlisted[n] = unlisted[n] + 1 if not job.done() and _left_the_queue(job) else 0
        for n in [n for n, job in pending.items() if job.done() or unlisted[n] >= 2]:
            job = pending.pop(n)
            try:
                if unlisted[n] >= 2:
                    raise RuntimeError("it left the queue without a result (cancelled, or its node was lost)")
                ended = job.result()
            except Exception as exc:  # the job failed, was cancelled, or its node died
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                outcome.counts["failed"] += len(work[n])
                outcome.failures.append(f"job {job.job_id} failed ({reason[:200]}); log: {job.paths.stdout}")
                print(f"FAILED: job {job.job_id}: {len(work[n])} runs not finished; log: {job.paths.stdout}",
                      file=out, flush=True)
                continue
            for index, kind, text in ended:
                step = dict(work[n])[index]
                outcome.counts[kind] += 1
                if kind != "blocked":
                    print(f"{text}: {step.folder.relative_to(sweep.output)} (job {job.job_id})", file=out, flush=True)
        if pending:
            time.sleep(poll_s)
    return outcome


def describe_help() -> str:
    """The settings, for the scripts' --help."""
    return "\n".join(f"  {env:<24} {text}" for env, text in SETTINGS.values()) + \
        f"\n  {CONFIG_ENV:<24} a YAML file with the same settings (keys: {', '.join(SETTINGS)}); variables win"


