"""Protocol sweeps behind ``scripts/<method>/*.sh``: seeds x datasets (x shots) as train.py runs.

Protocols (output layout as CoOp/PromptSRC, so existing habits and parsers carry over):

- ``base2new``: train on the base classes of each dataset, test on base (the training run's
  own evaluation) and on new (a separate eval-only run that never reuses the training
  folder) — ``OUT/base2new/{train_base,test_new}/<ds>/shots_<K>/<Trainer>/<cfg>/seed<S>``.
  With ``--source``: train once on the source, then test base and new of each dataset.
- ``xd``: train once on the source, test on every target —
  ``OUT/xd/{train,test}/<ds>/shots_<K>/<Trainer>/<cfg>/seed<S>``.
- ``dg``: as ``xd``, with the source's shifted variants as targets (``OUT/dg/...``).
- ``fewshot``: train and test on each dataset for each shot count —
  ``OUT/fewshot/<ds>/shots_<K>/<Trainer>/<cfg>/seed<S>``.

``--cfg`` names one config (``configs/trainers/<Trainer>/<cfg>.yaml``, used by every run) or a
config plan of ``configs/plans.yaml`` (a config per dataset and shot count, as published
protocols prescribe); ``<cfg>`` in a folder is always the config that run used. A test run
uses the config of the run that trained its prompts.

Runs of one (dataset, seed) chain execute in order; chains run in parallel in ``--jobs`` worker
processes (each pinned to one of ``CUDA_VISIBLE_DEVICES`` when GPUs exist, else to its share of
the CPU cores), and each worker runs its runs in-process, importing torch and CLIP once. The
trainers and datasets are registered by the modules the command line names (``--register``;
scripts/common.sh: ``datasets`` and ``trainers``), imported by the launcher and by every worker:
the library imports neither. Before anything runs, the launcher plans every run
(:func:`plan_sweep`):

- no ``results.json``: run it; a folder without one is resumed by train.py from its checkpoints;
- ``results.json`` made with the requested settings (the config train.py builds for the run,
  compared key by key with the config stored in the file): skip it;
- made with other settings: reported with the keys that differ, never reused nor overwritten;
  the sweep stops before running anything unless ``--rerun-changed`` (run again in a new folder
  next to it, ``seed1-2``) or ``--replace-changed`` (move it aside to ``.seed1.replaced-<time>``,
  out of the tables, and run again in its folder) says what to do. Eval-only runs of a retrained
  model follow it. Of several finished runs of one seed (``seed1``, ``seed1-2``) the newest
  counts, for the sweep as for the tables (``selftpt.tables.dedupe_runs``);
- a torn ``results.json`` (not valid JSON): moved aside to ``results.json.torn-<time>`` and the
  run is redone.

A worker works in a run folder only while it holds the folder's lock (:class:`RunLock`), so two
sweeps over one output split the work instead of doing it twice; runs held by another process
are reported and left to it. A worker that dies fails only the run it was in (the rest of its
chain is not started) and is replaced for the other chains. Ctrl-C (or SIGTERM) stops every
worker within seconds, leaving each run resumable, and prints how to resume.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import importlib
import io
import json
import multiprocessing
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from selftpt import dassl_log, dataset_catalog, protocols
from selftpt.benchmark.protocols import available_targets
from selftpt.cli import user_errors
from selftpt.errors import UserError
from selftpt.results import (
    RESULTS_FILENAME,
    ResultsFileError,
    TornResultsError,
    config_differences,
    config_digest,
    read_results,
)
from selftpt.shards import (
    SHARDS_DIR,
    Shard,
    finished_shard,
    merge_shards,
    read_shard_settings,
    shard_folder,
    shard_settings_digest,
)
from selftpt.trainer_facts import registered_trainers, trainer_class

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = tuple(protocols.PROTOCOLS)  # selftpt.protocols: datasets, shots and chains of each


def planned_trainer(name: str) -> type:
    """The registered trainer ``name``, whose ``TRAINS`` (train, or evaluate directly) and
    ``DETERMINISTIC`` (run once, unseeded) plan its runs. The command line registers them (its
    ``--register`` modules); PlanError when ``name`` is not a registered trainer."""
    cls = trainer_class(name)
    if cls is None:
        registered = ", ".join(registered_trainers()) or (
            "none; pass the modules that register the trainers and datasets, e.g. --register trainers "
            "--register datasets, as scripts/ do")
        raise PlanError(f"unknown trainer {name!r} (registered: {registered})")
    return cls


PLANS_FILE = REPO / "configs" / "plans.yaml"
_PLAN_KEYS = ("default", "datasets", "shots")


class PlanError(UserError, ValueError):
    """A config or plan that does not resolve; the message is one line for the user."""


@dataclass(frozen=True)
class ConfigPlan:
    """The trainer config (a stem under ``configs/trainers/<Trainer>/``) of each run of one protocol.

    One config for every run is the plan with only a default. A dataset entry wins over a shots
    entry: CoOp trains ImageNet 50 epochs whatever the shot count.
    """

    name: str  # what was asked for: a plan name or a config stem
    default: str
    datasets: Mapping[str, str] = field(default_factory=dict)
    shots: Mapping[int, str] = field(default_factory=dict)

    def stem(self, dataset: str, shots: int) -> str:
        """The config stem of a run that trains on ``dataset`` with ``shots`` shots per class."""
        return self.datasets.get(dataset) or self.shots.get(shots) or self.default

    @property
    def stems(self) -> list[str]:
        """Every config stem the plan can pick."""
        return sorted({self.default, *self.datasets.values(), *self.shots.values()})


def config_file(trainer: str, stem: str) -> Path:
    """``configs/trainers/<trainer>/<stem>.yaml``."""
    return REPO / "configs" / "trainers" / trainer / f"{stem}.yaml"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_plans(plans_file: Path = PLANS_FILE) -> dict:
    """``plans_file`` as ``{trainer: {plan: {protocol: entry}}}``; empty when the file is absent."""
    if not plans_file.is_file():
        return {}
    import yaml
    try:
        plans = yaml.safe_load(plans_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PlanError(f"{_shown(plans_file)} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(plans, dict) or not all(isinstance(v, dict) for v in plans.values()):
        raise PlanError(f"{_shown(plans_file)}: expected <Trainer>: <plan>: <protocol>: entries")
    return plans


def resolve_plan(trainer: str, name: str, protocol: str, plans_file: Path = PLANS_FILE) -> ConfigPlan:
    """The configs of a sweep's runs: ``name`` is a config stem of ``trainer`` (that config for
    every run) or a plan of ``plans_file`` (checked: every stem and dataset it names exists).

    A name that is both a stem and a plan is refused, so a name always means one thing.
    """
    plans = load_plans(plans_file).get(trainer) or {}
    where = _shown(plans_file)
    single = config_file(trainer, name).is_file()
    if single and name in plans:
        raise PlanError(f"{name!r} is both a config ({_shown(config_file(trainer, name))}) and a plan of "
                        f"{trainer} in {where}; rename one")
    if single:
        return ConfigPlan(name, name)
    if name not in plans:
        folder = config_file(trainer, name).parent
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise PlanError(f"no config {_shown(config_file(trainer, name))} and no plan {trainer}/{name} in {where} "
                        f"(known for {trainer}: configs {', '.join(known) or 'none'}; "
                        f"plans {', '.join(sorted(plans)) or 'none'})")
    what = f"plan {trainer}/{name} in {where}"
    entry = (plans[name] or {}).get(protocol)
    if not isinstance(entry, dict):
        raise PlanError(f"{what} has no entry for protocol {protocol} "
                        f"(it has: {', '.join(sorted(plans[name] or {})) or 'none'}); pass a config stem instead")
    unknown = sorted(set(entry) - set(_PLAN_KEYS))
    datasets, shots = entry.get("datasets") or {}, entry.get("shots") or {}
    if unknown or not isinstance(entry.get("default"), str) or not isinstance(datasets, dict) \
            or not isinstance(shots, dict) or not all(isinstance(k, int) for k in shots):
        raise PlanError(f"{what}, {protocol}: expected a 'default' stem and optional 'datasets' "
                        f"{{dataset: stem}} and 'shots' {{K: stem}}, got keys {', '.join(map(str, entry))}")
    plan = ConfigPlan(name, entry["default"], {str(k): str(v) for k, v in datasets.items()},
                      {int(k): str(v) for k, v in shots.items()})
    bad = [d for d in plan.datasets if not (REPO / "configs" / "datasets" / f"{d}.yaml").is_file()]
    if bad:
        raise PlanError(f"{what}, {protocol}: no dataset config configs/datasets/{bad[0]}.yaml")
    missing = [s for s in plan.stems if not config_file(trainer, s).is_file()]
    if missing:
        raise PlanError(f"{what}, {protocol}: no config {_shown(config_file(trainer, missing[0]))}")
    return plan


def protocol_defaults(protocol: str, data: str) -> protocols.Defaults:
    """A protocol's defaults: the paper's datasets with a ``$DATA`` root, else the benchmark's."""
    return protocols.get_protocol(protocol).defaults(dataset_catalog.PAPER if data else dataset_catalog.BENCHMARK)


def default_datasets(protocol: str, data: str) -> tuple[str, list[str]]:
    """(source, targets) config stems of :func:`protocol_defaults`."""
    defaults = protocol_defaults(protocol, data)
    return defaults.source, list(defaults.targets)


def current_stems(stems: list[str]) -> list[str]:
    """``stems`` with renamed dataset config stems replaced by their current names, one note each."""
    current = []
    for stem in stems:
        new = dataset_catalog.renamed_stem(stem)
        if new:
            print(f"note: dataset config {stem} is now {new} (configs/datasets/{new}.yaml); "
                  f"runs go under {new}/", file=sys.stderr)
        current.append(new or stem)
    return current


@dataclass
class Run:
    """One train.py invocation."""

    output_dir: Path
    dataset: str  # config stem, e.g. oxford_pets
    cfg: str  # trainer config stem this run uses (from the sweep's plan)
    opts: list[str] = field(default_factory=list)
    eval_only: bool = False
    model_dir: Path | None = None

    @property
    def finished(self) -> bool:
        """Its own folder holds a results file (whatever settings made it; see :func:`plan_chain`)."""
        return (self.output_dir / RESULTS_FILENAME).is_file()


@dataclass(kw_only=True)
class Sweep:
    """The settings shared by every run of one protocol sweep (keyword arguments only: twelve
    fields are too many to pass by position).

    Every run of a chain uses the config its plan picks for the chain's training dataset (the
    dataset itself; the source for xd, dg and base-to-new with a source) and shot count, so a
    test run always has its training run's config and folder name.
    """

    protocol: str
    trainer: str
    cfg: str  # a config stem of the trainer, or a plan of configs/plans.yaml
    data: str
    datasets: list[str]
    seeds: list[int]
    shots: list[int]
    output: Path
    source: str = ""
    backbone: str = ""
    extra_opts: list[str] = field(default_factory=list)
    prompts_from: str = ""  # "<Trainer>/<cfg or plan>": a training-free method starts from those prompts
    shards: int = 1  # evaluations split into this many shards (selftpt.shards), run side by side, then merged
    plan: ConfigPlan = field(init=False, repr=False)
    prompt_plan: ConfigPlan | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        """Resolve the configs (PlanError when a name does not resolve) before any run is built."""
        trains = planned_trainer(self.trainer).TRAINS  # PlanError for an unknown trainer, before any work
        if self.prompts_from and (trains or self.prompts_from.count("/") != 1):
            free = ", ".join(name for name, cls in registered_trainers().items() if not cls.TRAINS)
            raise PlanError(f"--prompts-from {self.prompts_from!r} needs the form <Trainer>/<cfg> "
                            f"and a training-free trainer ({free}), not {self.trainer}")
        self.plan = resolve_plan(self.trainer, self.cfg, self.protocol)
        if self.prompts_from:
            self.prompt_plan = resolve_plan(*self.prompts_from.split("/"), self.protocol)

    @property
    def trains(self) -> bool:
        return planned_trainer(self.trainer).TRAINS

    def run_cfg(self, trained_on: str, shots: int) -> str:
        """The cfg folder of a run whose chain trains on ``trained_on``: the config it uses
        (``bench+CoOp-bench`` when started from CoOp/bench prompts, so TPT and TPT+CoOp never
        share a folder)."""
        stem = self.plan.stem(trained_on, shots)
        if self.prompt_plan is None:
            return stem
        return f"{stem}+{self.prompts_from.split('/')[0]}-{self.prompt_plan.stem(trained_on, shots)}"

    @property
    def method_name(self) -> str:
        """Display name for the tables of runs started from another method's prompts: the
        trainer's ``PROMPTED_NAME`` (``MaPLe+TPT``), else ``TPT+CoOp`` for TPT from CoOp's."""
        if not self.prompts_from:
            return ""
        return planned_trainer(self.trainer).PROMPTED_NAME or f"{self.trainer}+{self.prompts_from.split('/')[0]}"

    def folder(self, *parts: str, dataset: str, shots: int, seed: int, cfg: str, trainer: str = "") -> Path:
        """``OUT/<protocol>/<parts>/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<S>`` (``unseeded`` below 0)."""
        return self.output.joinpath(self.protocol, *parts, dataset, f"shots_{shots}", trainer or self.trainer,
                                    cfg, f"seed{seed}" if seed >= 0 else "unseeded")

    def prompt_source(self, part: str, dataset: str, shots: int, seed: int) -> Path | None:
        """The training run of ``prompts_from`` whose prompts a training-free run starts from."""
        if self.prompt_plan is None:
            return None
        return self.folder(part, dataset=dataset, shots=shots, seed=seed, trainer=self.prompts_from.split("/")[0],
                           cfg=self.prompt_plan.stem(dataset, shots))

    def missing_prompt_sources(self) -> list[Path]:
        """``prompts_from`` runs that the chains need but that have not finished."""
        if not self.prompts_from:
            return []
        needed = {run.model_dir for chain in self.chains() for run in chain if run.model_dir is not None}
        return sorted(d for d in needed if not (current_dir(d) / RESULTS_FILENAME).is_file())

    def chains(self) -> list[list[Run]]:
        """Lists of runs; each list runs in order, lists run in parallel."""
        chains = []
        for seed in ([-1] if planned_trainer(self.trainer).DETERMINISTIC else self.seeds):
            for shots in self.shots:
                chains += protocols.get_protocol(self.protocol).chains(self, seed, shots)
        return chains

    def make_run(self, part: str, dataset: str, trained_on: str, shots: int, seed: int, opts: list[str],
                 eval_only: bool = False, model_dir: Path | None = None) -> Run:
        """A run on ``dataset`` under ``OUT/<protocol>/<part>`` with the config of its chain's
        training dataset ``trained_on`` (the protocols build their chains of these)."""
        folder = self.folder(*([part] if part else []), dataset=dataset, shots=shots, seed=seed,
                             cfg=self.run_cfg(trained_on, shots))
        if self.method_name:  # a user's own TRAINER.METHOD_NAME in extra_opts comes later and wins
            opts = opts + ["TRAINER.METHOD_NAME", self.method_name]
        return Run(folder, dataset, self.plan.stem(trained_on, shots), opts + ["SEED", str(seed)], eval_only,
                   model_dir)

    def train_args(self, run: Run) -> list[str]:
        """``train.py``'s arguments for ``run`` (what a user would type after ``python train.py``)."""
        cmd = ["--trainer", self.trainer,
               "--dataset-config-file", str(REPO / "configs" / "datasets" / f"{run.dataset}.yaml"),
               "--config-file", str(config_file(self.trainer, run.cfg)),
               "--output-dir", str(run.output_dir)]
        if self.data:
            cmd += ["--root", self.data]
        if self.backbone:
            cmd += ["--backbone", self.backbone]
        if run.eval_only:
            cmd += ["--eval-only"]
            if run.model_dir is not None:
                cmd += ["--model-dir", str(run.model_dir)]
        return cmd + run.opts + self.extra_opts


# --------------------------------------------------------------------------- run folders

EXIT_FAILED = 1  # a run failed, or the worker running it died
EXIT_USAGE = 2
EXIT_CHANGED = 3  # finished runs were made with other settings: choose --rerun-changed or --replace-changed
EXIT_HELD = 75  # EX_TEMPFAIL: runs held by another process were left to it; rerun when it has finished
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program stopped by Ctrl-C
ON_CHANGE = ("rerun", "replace")
STOP_GRACE_S = 10.0  # how long stopped workers get to leave their runs before they are killed


def sibling_dirs(folder: Path) -> list[Path]:
    """``folder`` and the existing folders ``--rerun-changed`` made next to it (``seed1-2``,
    ``seed1-3``, ...), in that order."""
    pattern = re.compile(re.escape(folder.name) + r"-(\d+)")
    extra = []
    if folder.parent.is_dir():
        extra = sorted((int(m.group(1)), p) for p in folder.parent.iterdir()
                       if (m := pattern.fullmatch(p.name)) and p.is_dir())
    return [folder] + [p for _, p in extra]


def current_dir(folder: Path) -> Path:
    """The folder whose run counts for ``folder``: of those among :func:`sibling_dirs` that hold
    a ``results.json``, the one written last; ``folder`` itself when none does.

    This is the tables' rule (``selftpt.tables.dedupe_runs``: the newest file of a seed wins), so
    what the sweep reuses or compares against is what the tables show.
    """
    finished = [d / RESULTS_FILENAME for d in sibling_dirs(folder) if (d / RESULTS_FILENAME).is_file()]
    if not finished:
        return folder
    return max(finished, key=lambda p: (p.stat().st_mtime, str(p))).parent


def next_free_dir(folder: Path) -> Path:
    """Where ``--rerun-changed`` runs ``folder``'s run again: the first of ``folder-2``,
    ``folder-3``, ... without a ``results.json`` (one left unfinished by an earlier try resumes)."""
    n = 2
    while (folder.with_name(f"{folder.name}-{n}") / RESULTS_FILENAME).exists():
        n += 1
    return folder.with_name(f"{folder.name}-{n}")


def _aside(path: Path, tag: str, hidden: bool = False) -> Path:
    """A free name next to ``path`` to move it to: ``[.]<name>.<tag>-<time>[-n]``."""
    stem = f"{'.' if hidden else ''}{path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = path.with_name(stem), 2
    while target.exists():
        target, n = path.with_name(f"{stem}-{n}"), n + 1
    return target


@dataclass(frozen=True)
class Finished:
    """A run folder's ``results.json`` as the launcher reads it."""

    folder: Path
    record: dict | None  # None: torn, or not a results file this code can read
    problem: str = ""  # the reader's one-line message when record is None
    torn: bool = False  # not valid JSON: the run is redone


def read_finished(folder: Path) -> Finished | None:
    """The results of the run in ``folder``; None when it has none (not finished)."""
    path = folder / RESULTS_FILENAME
    if not path.is_file():
        return None
    try:
        return Finished(folder, read_results(path))
    except TornResultsError as err:
        return Finished(folder, None, str(err), torn=True)
    except (ResultsFileError, OSError) as err:
        return Finished(folder, None, str(err))


def requested_config(sweep: Sweep, run: Run, folder: Path, model_dir: Path | None) -> Any:
    """The config train.py builds for ``run`` in ``folder``: ``selftpt.launch.setup_cfg`` on the
    run's own arguments, so the comparison sees every source (dataset and method files, flags,
    ``KEY VALUE`` options) exactly as the run would. Imports torch, so it is called only for runs
    that have a result to compare."""
    from selftpt import launch
    argv = sweep.train_args(dataclasses.replace(run, output_dir=folder, model_dir=model_dir))
    return launch.setup_cfg(launch.build_parser().parse_args(argv))


def settings_changes(found: Finished, requested: Any, model_dir: Path | None) -> list[str]:
    """Why the finished run ``found`` is not the run asked for (``KEY: stored -> requested``
    lines); empty when it is."""
    if found.record is None:
        return [f"settings unknown: {found.problem}"]
    record = found.record
    if isinstance(record.get("config"), dict):
        changes = config_differences(record["config"], requested)
    elif record["config_digest"] == config_digest(requested):
        changes = []  # an older file without the config itself: equal digests are equal configs
    else:
        changes = [("settings unknown: this results.json predates stored configs and its config_digest "
                    "differs from the requested config's")]
    # An eval-only run's config does not say which weights it loaded; newer files record them.
    # Compared relative to the run folder, so moving a whole output folder changes nothing.
    model = record.get("model")
    if model_dir is not None and isinstance(model, dict) and model.get("source") == "checkpoint" \
            and isinstance(model.get("directory"), str):
        before = os.path.relpath(model["directory"], record["output_dir"])
        if before != os.path.relpath(model_dir, found.folder):
            changes.append(f"model: {model['directory']} -> {model_dir}")
    return changes


def _brief(changes: tuple[str, ...] | list[str], keep: int = 4) -> str:
    shown = "; ".join(changes[:keep])
    return shown + (f" (+{len(changes) - keep} more)" if len(changes) > keep else "")


# --------------------------------------------------------------------------- plan


@dataclass
class Step:
    """One run of a chain as the launcher decided to handle it.

    ``action``: ``skip`` (finished with the requested settings), ``run`` (new or resumed; in a
    new folder next to ``stale`` with ``--rerun-changed``), ``torn`` (move the torn results.json
    aside, then run), ``replace`` (move ``stale``, the folder itself, aside, then run), ``changed``
    (finished with other settings and no choice given: nothing runs).
    """

    run: Run
    folder: Path  # where it runs, or where its finished result is
    action: str
    model_dir: Path | None = None  # the weights an eval-only run loads
    changes: tuple[str, ...] = ()  # why the finished run in ``stale`` does not count
    stale: Path | None = None  # the finished run with other settings


def plan_chain(sweep: Sweep, chain: list[Run], on_change: str | None) -> list[Step]:
    """Decide each run of ``chain`` (see :class:`Step`); ``on_change`` is None, ``rerun`` or ``replace``.

    A run that loads the weights of a run trained again here (changed settings) is stale too,
    whatever its own config says (its config does not name the weights), and follows it.
    """
    if on_change not in (None, *ON_CHANGE):
        raise ValueError(f"on_change must be None or one of {ON_CHANGE}, not {on_change!r}")
    steps: list[Step] = []
    placed: dict[Path, Step] = {}  # a run's own folder -> its step, for the runs that load its weights
    for run in chain:
        model_dir, retrained = None, None
        if run.model_dir is not None:
            source = placed.get(run.model_dir)
            model_dir = source.folder if source else current_dir(run.model_dir)  # prompts of another sweep
            retrained = source.run.output_dir if source is not None and source.changes else None
        folder = current_dir(run.output_dir)
        found = read_finished(folder)
        changes: list[str] = []
        if found is not None and not found.torn:
            changes = settings_changes(found, requested_config(sweep, run, folder, model_dir), model_dir)
        if retrained is not None:
            changes = [c for c in changes if not c.startswith("model: ")] + \
                [f"model: {retrained.relative_to(sweep.output)} is trained again"]
        if found is not None and found.torn:
            step = Step(run, folder, "torn", model_dir)
        elif not changes:
            step = Step(run, folder, "run" if found is None else "skip", model_dir)
        elif on_change == "rerun":
            step = Step(run, next_free_dir(run.output_dir), "run", model_dir, tuple(changes),
                        folder if found is not None else None)
        elif found is None:  # only its model changes: it had not run yet
            step = Step(run, folder, "run", model_dir, tuple(changes))
        else:
            step = Step(run, folder, "replace" if on_change == "replace" else "changed", model_dir,
                        tuple(changes), folder)
        placed[run.output_dir] = step
        steps.append(step)
    return steps


def plan_sweep(sweep: Sweep, on_change: str | None = None) -> list[list[Step]]:
    """Every chain of ``sweep``, planned (:func:`plan_chain`)."""
    return [plan_chain(sweep, chain, on_change) for chain in sweep.chains()]


# --------------------------------------------------------------------------- locks


class RunLock:
    """An exclusive lock on one run folder, held while a process works in it.

    The lock is ``.<folder name>.lock`` next to the folder (not inside it: replacing a run moves
    the folder) and is taken with ``flock``, which the kernel drops when its holder exits however
    it exits: the file of a killed holder is simply taken over by the next process. The file
    names its holder (pid, sweep pid, host, since when) for whoever finds it held. On a file
    system without locks the work goes on unlocked rather than not at all.
    """

    def __init__(self, folder: Path, sweep_pid: int | None = None) -> None:
        self.path = folder.parent / f".{folder.name}.lock"
        self.sweep_pid = sweep_pid or os.getpid()
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock without waiting: None when taken, else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                return holder
            except OSError:  # ENOLCK, EOPNOTSUPP: no locks here
                self._fd = fd
                return None
            # The previous holder deletes the file on release; if it did so after we opened it,
            # we locked a file no one else will see: start again on the one at the path.
            try:
                same = os.path.samestat(os.stat(self.path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "sweep_pid": self.sweep_pid, "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            self._fd = fd
            return None
        return "another process (its lock file keeps changing)"

    @staticmethod
    def _holder(fd: int) -> str:
        for _ in range(5):  # the holder writes its name right after locking
            os.lseek(fd, 0, os.SEEK_SET)
            try:
                info = json.loads(os.read(fd, 4096) or b"null")
            except ValueError:
                info = None
            if isinstance(info, dict):
                worker = f" (worker {info.get('pid')})" if info.get("pid") != info.get("sweep_pid") else ""
                return f"sweep pid {info.get('sweep_pid')}{worker} on {info.get('host')} since {info.get('since')}"
            time.sleep(0.05)
        return "another process"

    def release(self) -> None:
        """Give the lock up (and remove its file, while still holding it, so no one takes a stale copy)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


# --------------------------------------------------------------------------- workers


class _Stopped(KeyboardInterrupt):
    """Raised in a worker by the launcher's SIGTERM: leave the current run where it is (resumable)."""


class _Terminated(KeyboardInterrupt):
    """Raised in the launcher by SIGTERM: stop as on Ctrl-C (a cluster's preemption, ``timeout``)."""


def _stop_worker(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the run's cleanup finish
    raise _Stopped()


def _send(conn: Connection, *message: Any) -> None:
    """Send to the launcher with SIGTERM held back, so that a stop never cuts a message in half."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        conn.send(message)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker(conn: Connection, device: str | None, threads: int, sweep_pid: int, modules: Sequence[str] = ()) -> None:
    """A worker process: run the chains the launcher sends, one at a time, until it sends None.

    ``modules`` register the trainers and datasets (the command line's ``--register``); they are
    found on the launcher's import path, which a "spawn" child inherits.

    It ignores Ctrl-C (the launcher decides when workers stop, and a terminal's Ctrl-C reaches
    the whole process group); the launcher stops it with SIGTERM. Messages: ``ready``,
    ``start <i>``, ``end <i> <kind> <text>``, ``idle`` (chain done).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the launcher until now
    try:
        if device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = device  # before anything starts CUDA
        for module in modules:
            importlib.import_module(module)
        if threads > 0:
            import torch
            torch.set_num_threads(threads)
        _send(conn, "ready")
        while (job := conn.recv()) is not None:
            sweep, steps = job
            run_chain(sweep, steps, lambda *message: _send(conn, *message), sweep_pid)
            _send(conn, "idle")
    except (_Stopped, EOFError, BrokenPipeError, ConnectionResetError):
        pass  # stopped by the launcher, or the launcher is gone


def run_chain(sweep: Sweep, steps: list[tuple[int, Step]], report: Callable[..., None],
               sweep_pid: int) -> None:
    """Run the steps of one chain in order, in this worker process.

    A worker imports torch and CLIP once for all its runs instead of once per run (~8 s each);
    ``launch.run`` seeds every run and restores the streams after it, so a run's result does
    not depend on what ran before it in the same process. A step whose model run ended without
    a result (failed, held elsewhere) is not started.
    """
    from selftpt import launch
    unusable: set[Path] = set()
    for index, step in steps:
        if step.model_dir in unusable:
            unusable.add(step.folder)
            report("end", index, "blocked", "not started")
            continue
        report("start", index)
        try:
            kind, text = _run_step(sweep, step, sweep_pid, launch)
        except _Stopped:
            report("end", index, "stopped", "stopped")
            raise
        if kind not in ("ok", "skip"):
            unusable.add(step.folder)
        report("end", index, kind, text)


def _run_step(sweep: Sweep, step: Step, sweep_pid: int, launch: Any) -> tuple[str, str]:
    """Run one step under its folder's lock; (kind, text) with kind ``ok``, ``skip``, ``held``,
    ``changed`` or ``failed``. What the plan saw is checked again under the lock, since another
    sweep may have finished, moved or replaced the run meanwhile."""
    lock = RunLock(step.folder, sweep_pid)
    holder = lock.acquire()
    if holder is not None:
        return "held", f"skipped (held by {holder})"
    try:
        return _run_locked(sweep, step, launch)
    except Exception as exc:  # e.g. the config no longer builds, a folder that cannot be moved
        return "failed", f"FAILED: {type(exc).__name__}: {exc}"
    finally:
        lock.release()


def _run_locked(sweep: Sweep, step: Step, launch: Any) -> tuple[str, str]:
    """:func:`_run_step` once the lock is held: a results.json found now (torn, or written by
    another process since the plan) is moved aside, compared or reused, then the run trains."""
    note = ""
    results = step.folder / RESULTS_FILENAME
    found = read_finished(step.folder)
    if found is not None and found.torn:
        aside = _aside(results, "torn")
        os.replace(results, aside)  # kept for whoever wants to look; the run is redone
        note = f" (torn {RESULTS_FILENAME} moved to {aside.name})"
    elif found is not None:
        changes = settings_changes(found, requested_config(sweep, step.run, step.folder, step.model_dir),
                                   step.model_dir)
        if step.action != "replace" or not changes:
            if not changes:
                return "skip", "skipped (finished meanwhile by another process)"
            return "changed", ("not run: finished meanwhile by another process with other settings "
                               f"({_brief(changes)})")
        aside = _aside(step.folder, "replaced", hidden=True)  # hidden: out of the tables, still on disk
        os.replace(step.folder, aside)
        note = f" (settings changed: {_brief(step.changes, 2)}; the old run moved to {aside.name})"
    elif step.stale is not None:
        note = f" (settings changed: {_brief(step.changes, 2)}; the old run stays in {step.stale.name})"
    state = "resumed" if step.folder.exists() else "ran"
    code, message = _train(sweep, step, launch)
    return ("ok", state + note) if code == 0 else ("failed", f"FAILED: {message}")


def _train(sweep: Sweep, step: Step, launch: Any) -> tuple[int, str]:
    """``train.py`` with the step's arguments, in this process; (exit code, last error line)."""
    argv = sweep.train_args(dataclasses.replace(step.run, output_dir=step.folder, model_dir=step.model_dir))
    messages = io.StringIO()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(messages):
        try:
            code = launch.main(argv)
        except SystemExit as exc:  # argparse's way of refusing arguments
            code = exc.code if isinstance(exc.code, int) else 2
        except Exception as exc:  # one failed run must not take the other chains down
            code = 1
            print(f"{type(exc).__name__}: {exc}", file=messages)
    return code, (messages.getvalue().strip().splitlines() or ["(no message)"])[-1]


def visible_devices() -> list[str]:
    """GPU ids to round-robin over: CUDA_VISIBLE_DEVICES, else every GPU torch sees, else none."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


# --------------------------------------------------------------------------- launcher


@dataclass
class _Slot:
    """One place in the worker pool: its device and the worker process now in it."""

    device: str | None
    process: Any = None  # multiprocessing.Process
    conn: Connection | None = None
    ready: bool = False
    chain: int | None = None  # index into _Launcher.work of the chain it runs
    running: int | None = None  # the step it has started and not ended
    ended: set[int] = field(default_factory=set)  # the steps of its chain that have ended
    broken: bool = False  # its chain was cut short and that is reported already


class _Launcher:
    """Runs planned chains in a bounded pool of worker processes it manages itself (not a
    ``ProcessPoolExecutor``, where one dead worker breaks the pool for every chain and Ctrl-C
    lets the workers go on through the queue); prints one line per run as it ends."""

    def __init__(self, sweep: Sweep, plan: list[list[Step]], jobs: int, devices: list[str], resume: str,
                 modules: Sequence[str] = ()) -> None:
        self.sweep, self.plan, self.resume, self.modules = sweep, plan, resume, tuple(modules)
        self.total = sum(len(chain) for chain in plan)
        # chains with work; skipped runs are reported here and never reach a worker
        self.work = [(c, [(i, s) for i, s in enumerate(chain) if s.action != "skip"]) for c, chain in enumerate(plan)]
        self.work = [w for w in self.work if w[1]]
        self.pending = deque(range(len(self.work)))
        jobs = max(1, min(jobs, len(self.work) or 1))
        self.slots = [_Slot(devices[i % len(devices)] if devices else None) for i in range(jobs)]
        self.threads = 0 if devices else max(1, (os.cpu_count() or 1) // jobs)
        self.context = multiprocessing.get_context("spawn")  # no CUDA or thread state inherited from here
        self.counts: Counter[str] = Counter()
        self.done = 0
        self.start_failures = 0
        self.stopping = False

    def _line(self, step: Step, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {text}: {step.folder.relative_to(self.sweep.output)}", flush=True)

    def _end(self, slot: _Slot, index: int, kind: str, text: str) -> None:
        step = self.plan[self.work[slot.chain][0]][index]
        slot.ended.add(index)
        slot.running = None
        if kind == "stopped" and not self.stopping:  # SIGTERM from elsewhere, not from this launcher
            kind, slot.broken = "died", True
            text = "FAILED: its worker was stopped by a SIGTERM from outside this sweep"
        self.counts[kind] += 1
        if kind not in ("blocked", "stopped"):  # those are summed up at the end
            self._line(step, text)

    def run(self) -> int:
        """Run every chain; the exit code (0, EXIT_FAILED, EXIT_CHANGED, EXIT_HELD, EXIT_INTERRUPTED)."""
        for chain in self.plan:
            for step in chain:
                if step.action == "skip":
                    self.counts["skip"] += 1
                    self._line(step, "skipped (finished)")
        try:
            while self.pending or any(slot.process is not None for slot in self.slots):
                self._fill()
                self._wait()
        except KeyboardInterrupt as exc:
            self._stop()
            finished = self.counts["ok"] + self.counts["skip"]
            how = "terminated" if isinstance(exc, _Terminated) else "interrupted"
            print(f"{how}: {finished} of {self.total} runs finished ({self.counts['ok']} in this sweep), "
                  f"{self.counts['stopped']} stopped mid-run and resume from their last checkpoint; "
                  f"resume with: {self.resume}", file=sys.stderr, flush=True)
            return 128 + signal.SIGTERM if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
        return self._summary()

    def _start(self, slot: _Slot) -> None:
        parent, child = self.context.Pipe()
        slot.process = self.context.Process(target=_worker, name="sweep-worker",
                                            args=(child, slot.device, self.threads, os.getpid(), self.modules))
        # Started with SIGINT blocked, so a Ctrl-C while it boots does not print a traceback
        # from it; the worker ignores SIGINT from then on (see _worker).
        # The slot is filled in before SIGINT is let through, so that _stop finds it whole.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            slot.process.start()
            child.close()
            slot.conn, slot.ready, slot.chain, slot.running, slot.ended, slot.broken = \
                parent, False, None, None, set(), False
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _fill(self) -> None:
        """Start workers for waiting chains, give chains to idle workers, let go of idle ones."""
        for slot in self.slots:
            if slot.process is None:
                if self.pending:
                    self._start(slot)
            elif slot.ready and slot.chain is None:
                if self.pending:
                    slot.chain, slot.ended = self.pending.popleft(), set()
                    slot.conn.send((self.sweep, self.work[slot.chain][1]))
                else:
                    slot.conn.send(None)
                    slot.ready = False  # on its way out

    def _wait(self) -> None:
        waiting: dict[Any, tuple[_Slot, str]] = {}
        for slot in self.slots:
            if slot.process is not None:
                waiting[slot.conn] = (slot, "conn")
                waiting[slot.process.sentinel] = (slot, "exit")
        for ready in wait(list(waiting)):
            slot, what = waiting[ready]
            if slot.process is None or (what == "conn" and slot.conn is not ready):
                continue  # reaped already in this round
            if what == "conn":
                self._receive(slot)
            else:
                self._reap(slot)

    def _receive(self, slot: _Slot) -> None:
        try:
            message = slot.conn.recv()
        except Exception:  # EOF, or a message cut short by a dying worker
            self._reap(slot)
            return
        if message[0] == "ready":
            slot.ready, self.start_failures = True, 0
        elif message[0] == "start":
            slot.running = message[1]
        elif message[0] == "end":
            self._end(slot, *message[1:])
        elif message[0] == "idle":
            slot.chain = None

    def _reap(self, slot: _Slot) -> None:
        """A worker exited: take its last messages; if it died in a chain, fail the run it was in."""
        with contextlib.suppress(Exception):
            while slot.conn is not None and slot.conn.poll():
                self._receive_quietly(slot)
        slot.process.join(5)
        code = slot.process.exitcode
        if slot.chain is not None and not self.stopping:
            chain, steps = self.work[slot.chain]
            left = [i for i, _ in steps if i not in slot.ended]
            if left and not slot.broken:
                killed = code is not None and code < 0
                how = f"killed by {signal.Signals(-code).name}" if killed else f"exit code {code}"
                hint = ", e.g. out of memory" if code == -signal.SIGKILL else ""
                where = "" if slot.running is not None else " before it started this run"
                self.counts["died"] += 1
                self._line(self.plan[chain][slot.running if slot.running is not None else left[0]],
                           f"FAILED: worker process died ({how}{hint}){where}")
                left = left[1:] if slot.running is None else [i for i in left if i != slot.running]
            # the rest of its chain is not started: later runs need the dead one, or wait for the next sweep
            self.counts["blocked"] += len(left)
        elif not slot.ready and slot.chain is None and code not in (0, None) and not self.stopping:
            self.start_failures += 1
            if self.start_failures >= 3:  # it is not one bad run: workers cannot start here
                print(f"error: sweep workers exit on start (exit code {code}); see the messages above",
                      file=sys.stderr, flush=True)
                self.counts["blocked"] += sum(len(self.work[c][1]) for c in self.pending)
                self.pending.clear()
        if slot.conn is not None:
            slot.conn.close()
        slot.process, slot.conn, slot.ready, slot.chain, slot.running = None, None, False, None, None

    def _receive_quietly(self, slot: _Slot) -> None:
        """A dead worker's last message (no reaping on EOF: the caller is reaping)."""
        message = slot.conn.recv()
        if message[0] == "start":
            slot.running = message[1]
        elif message[0] == "end":
            self._end(slot, *message[1:])
        elif message[0] == "idle":
            slot.chain = None

    def _stop(self) -> None:
        """Stop every worker (SIGTERM: each leaves its run resumable), wait STOP_GRACE_S for
        them, then kill what is left; a second Ctrl-C kills at once."""
        self.stopping = True
        self.pending.clear()
        live = [slot for slot in self.slots if slot.process is not None]
        for slot in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            while any(slot.process is not None for slot in self.slots) and time.monotonic() < deadline:
                waiting = {}
                for slot in self.slots:
                    if slot.process is not None:
                        if slot.conn is not None and not slot.conn.closed:
                            waiting[slot.conn] = (slot, "conn")
                        waiting[slot.process.sentinel] = (slot, "exit")
                for ready in wait(list(waiting), timeout=max(0.0, deadline - time.monotonic())):
                    slot, what = waiting[ready]
                    if slot.process is None or (what == "conn" and slot.conn is not ready):
                        continue
                    if what == "conn":
                        self._receive(slot)
                    else:
                        self._reap(slot)
        except KeyboardInterrupt:
            pass  # asked twice: do not wait
        for slot in self.slots:
            if slot.process is not None:
                slot.process.kill()
                slot.process.join()
                slot.process = None

    def _summary(self) -> int:
        return summarize(self.counts, self.resume)


def summarize(counts: Mapping[str, int], resume: str) -> int:
    """The exit code of a sweep whose runs ended as ``counts`` (kind -> runs), with one closing
    line when something was left undone; the same for every launcher."""
    failed, changed, held = counts.get("failed", 0) + counts.get("died", 0), counts.get("changed", 0), \
        counts.get("held", 0)
    blocked = counts.get("blocked", 0)
    if not (failed or changed or held or blocked):
        return 0
    parts = [f"{n} {what}" for n, what in ((failed, "failed"), (changed, "changed meanwhile"),
                                           (held, "held by another process, left to it"),
                                           (blocked, "not started (they need one of those)")) if n]
    print(f"sweep incomplete: {', '.join(parts)} (above); when that is dealt with, rerun: {resume}",
          file=sys.stderr, flush=True)
    return EXIT_FAILED if failed or not (changed or held) else EXIT_CHANGED if changed else EXIT_HELD


def execute(sweep: Sweep, jobs: int = 0, plan: list[list[Step]] | None = None, resume: str = "",
            modules: Sequence[str] = (), launcher: str = "local", dry_run: bool = False) -> int:
    """Run a planned sweep (default: planned now, stopping at changed runs) in ``jobs`` worker
    processes, each importing ``modules`` (those that register trainers and datasets) first;
    print one line per run; return the exit code.

    On GPUs each worker owns one device (round-robin over the visible ones); on CPU each gets
    an equal share of the cores as torch threads (small models scale better over processes
    than over threads).
    """
    plan = plan_sweep(sweep) if plan is None else plan
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher {launcher!r}; choose {' or '.join(LAUNCHERS)} (LAUNCHER=...)")
    launch = functools.partial(LAUNCHERS[launcher], jobs=jobs, resume=resume or "the same command",
                               modules=modules, dry_run=dry_run)
    if sweep.shards > 1:
        return run_sharded(sweep, plan, launch, dry_run)
    return launch(sweep, plan)


def run_local(sweep: Sweep, plan: list[list[Step]], jobs: int, resume: str, modules: Sequence[str],
              dry_run: bool = False) -> int:
    """The ``local`` launcher: the chains in a pool of worker processes on this machine."""
    if dry_run:
        print(f"{sweep.protocol}: {sweep.trainer}/{sweep.cfg}, would run locally:")
        for chain in plan:
            for step in chain:
                print(f"  {step.action}: {step.folder.relative_to(sweep.output)}")
        return 0
    # torch (to count GPUs) only when something runs: a finished sweep reports in a second
    devices = visible_devices() if any(step.action != "skip" for chain in plan for step in chain) else []
    if jobs <= 0:  # auto: one worker per GPU, else one per CPU core
        jobs = len(devices) or os.cpu_count() or 1
    pool = _Launcher(sweep, plan, jobs, devices, resume, modules)
    print(f"{sweep.protocol}: {sweep.trainer}/{_configs(sweep, plan)}, {pool.total} runs in {len(plan)} chains, "
          f"{len(pool.slots)} at a time{f' on GPUs {devices}' if devices else ' on CPU'}", flush=True)
    return pool.run()


def run_on_slurm(sweep: Sweep, plan: list[list[Step]], jobs: int, resume: str, modules: Sequence[str],
                 dry_run: bool = False) -> int:
    """The ``slurm`` launcher: one SLURM job per chain with work left, as one job array
    (``selftpt.slurm``; its settings from ``SUBMIT_*`` variables). ``jobs`` is the cluster's
    business here (``SUBMIT_ARRAY_PARALLELISM``)."""
    from selftpt import slurm

    settings = slurm.read_settings()  # SlurmError (one line) before anything is submitted
    total = sum(len(chain) for chain in plan)
    print(f"{sweep.protocol}: {sweep.trainer}/{_configs(sweep, plan)}, {total} runs in {len(plan)} chains, "
          "on SLURM", flush=True)
    skipped = [step for chain in plan for step in chain if step.action == "skip"]
    for step in skipped:
        print(f"skipped (finished): {step.folder.relative_to(sweep.output)}", flush=True)
    outcome = slurm.submit(sweep, plan, settings, modules, dry_run=dry_run)
    if outcome is None:  # dry run
        return 0
    for line in outcome.failures:
        print(line, file=sys.stderr, flush=True)
    return summarize(outcome.counts, resume)


# --------------------------------------------------------------------------- shards
INTERRUPTED_CODES = (EXIT_INTERRUPTED, 128 + signal.SIGTERM)


def sharded(step: Step) -> bool:
    """A run whose evaluation is still to do: with ``--shards`` its test set runs in shards."""
    return step.action in ("run", "torn", "replace")


def run_sharded(sweep: Sweep, plan: list[list[Step]], launch: Callable[..., int], dry_run: bool) -> int:
    """``--shards N``: every evaluation still to do runs as N shards of its test set, each shard
    index of a chain a chain of its own (local workers or SLURM array tasks side by side), then
    the shards are merged into the run's ``results.json``. In three rounds, each waiting for the
    one before: the training runs train (``TEST.NO_TEST``; finished and changed runs are
    reported); their own evaluations run in shards that resume after the last epoch; then the
    evaluation-only runs, whose models now have their ``results.json``, run in shards."""
    trainings = [[_without_test(step) if sharded(step) else step for step in chain
                  if not (sharded(step) and step.run.eval_only)] for chain in plan]
    codes = [launch(sweep, [chain for chain in trainings if chain])] if any(trainings) else []
    failed = held = 0
    for eval_only in (False, True):
        if codes and codes[-1] in INTERRUPTED_CODES:
            return codes[-1]
        code, round_failed, round_held = _shard_round(sweep, plan, eval_only, launch, dry_run)
        codes += [code] if code is not None else []
        failed, held = failed + round_failed, held + round_held
    if codes and codes[-1] in INTERRUPTED_CODES:
        return codes[-1]
    if failed or EXIT_FAILED in codes:
        return EXIT_FAILED
    return EXIT_CHANGED if EXIT_CHANGED in codes else EXIT_HELD if held or EXIT_HELD in codes else 0


def _without_test(step: Step) -> Step:
    """Training run ``step`` without its evaluation (``TEST.NO_TEST``): its shards do it."""
    return dataclasses.replace(step, run=dataclasses.replace(step.run, opts=[*step.run.opts, "TEST.NO_TEST", "True"]))


def _shard_round(sweep: Sweep, plan: list[list[Step]], eval_only: bool, launch: Callable[..., int],
                 dry_run: bool) -> tuple[int | None, int, int]:
    """Shard and merge the evaluations of the training runs (``eval_only`` False: their training
    has run, so a torn or replaced run was already set aside) or of the evaluation-only runs;
    (the launch's exit code or None when nothing ran, runs failed, runs held by others)."""
    evaluations: list[tuple[int, Step]] = []  # (chain index, evaluation to shard)
    failed = held = 0
    for number, chain in enumerate(plan):
        for step in chain:
            if not sharded(step) or step.run.eval_only != eval_only:
                continue
            if not eval_only:
                step = dataclasses.replace(step, action="run")
            if not eval_only and not dry_run and not _training_finished(step.folder):
                print(f"not started (its training did not finish): {step.folder.relative_to(sweep.output)}",
                      file=sys.stderr, flush=True)
                failed += 1
            elif not dry_run and step.model_dir is not None and not (step.model_dir / RESULTS_FILENAME).is_file():
                print(f"not started (its model run {step.model_dir.relative_to(sweep.output)} has not finished): "
                      f"{step.folder.relative_to(sweep.output)}", file=sys.stderr, flush=True)
                failed += 1
            elif dry_run or _clear_for_shards(sweep, step):
                evaluations.append((number, step))
            else:
                held += 1
    per_chain: dict[int, list[list[Step]]] = {}  # chain -> the shard steps of each of its evaluations
    for number, step in evaluations:
        per_chain.setdefault(number, []).append(shard_steps(sweep, step))
    # one chain per (chain, shard index): its evaluations' shards of that index, in order
    shard_chains = [list(same_index) for shard_lists in per_chain.values() for same_index in zip(*shard_lists)]
    code = launch(sweep, shard_chains) if shard_chains else None
    if code in INTERRUPTED_CODES:
        return code, failed, held
    for _, step in evaluations:
        where = step.folder.relative_to(sweep.output)
        if dry_run:
            print(f"  would merge {sweep.shards} shards into {where}/{RESULTS_FILENAME}")
            continue
        ok, text = _merge(step.folder)
        print(f"merged {sweep.shards} shards: {where}" if ok else f"merge FAILED: {where}: {text}",
              file=sys.stdout if ok else sys.stderr, flush=True)
        failed += not ok
    return code, failed, held


def _training_finished(folder: Path) -> bool:
    """The training round left ``folder`` trained to its last epoch (its log's end marker), so
    that shards resuming it evaluate instead of each refusing unfinished training."""
    log = folder / "log.txt"
    return log.is_file() and dassl_log.parse_log(log).finished


def shard_steps(sweep: Sweep, step: Step) -> list[Step]:
    """The ``sweep.shards`` shard runs of the evaluation of ``step`` (``<run>/shards/<i>of<n>``;
    a training run's resume its training); a finished shard is skipped."""
    steps = []
    for index in range(1, sweep.shards + 1):
        shard = Shard(index, sweep.shards)
        folder = shard_folder(step.folder, shard)
        resume = [] if step.run.eval_only else ["RESUME", str(step.folder)]  # after its training's last epoch
        run = dataclasses.replace(step.run, output_dir=folder, opts=[*step.run.opts, *resume, "TEST.SHARD", str(shard)])
        steps.append(Step(run, folder, "skip" if finished_shard(folder) else "run", step.model_dir))
    return steps


def _clear_for_shards(sweep: Sweep, step: Step) -> bool:
    """Before the shards of ``step`` run: move a torn results.json or a replaced run aside (as an
    unsharded run does under its lock), and set aside finished shards that cannot be merged into
    this run (another shard count, other settings, or a run redone because its settings or model
    changed), so they are run again instead of reused. False when another process holds the run."""
    lock = RunLock(step.folder)
    holder = lock.acquire()
    if holder is not None:
        print(f"skipped (held by {holder}): {step.folder.relative_to(sweep.output)}", file=sys.stderr, flush=True)
        return False
    try:
        if step.action == "torn":
            os.replace(step.folder / RESULTS_FILENAME, _aside(step.folder / RESULTS_FILENAME, "torn"))
        elif step.action == "replace" and step.folder.exists():
            os.replace(step.folder, _aside(step.folder, "replaced", hidden=True))
        wanted = None
        for folder in sorted((step.folder / SHARDS_DIR).glob("*of*")):
            if not finished_shard(folder):
                continue
            if not step.changes and folder.name.endswith(f"of{sweep.shards}"):
                if wanted is None:
                    wanted = shard_settings_digest(requested_config(sweep, step.run, step.folder, step.model_dir))
                if read_shard_settings(folder) == wanted:
                    continue
            aside = _aside(folder, "stale", hidden=True)
            os.replace(folder, aside)
            print(f"set aside (made for another shard count or with other settings): "
                  f"{aside.relative_to(sweep.output)}", flush=True)
        return True
    finally:
        lock.release()


def _merge(folder: Path) -> tuple[bool, str]:
    """Merge the shards of the run in ``folder`` under its lock; (merged, one-line reason if not)."""
    lock = RunLock(folder)
    holder = lock.acquire()
    if holder is not None:
        return False, f"held by {holder}"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            merge_shards(folder)
        return True, ""
    except UserError as exc:
        return False, str(exc)
    finally:
        lock.release()


def _configs(sweep: Sweep, plan: list[list[Step]]) -> str:
    stems = sorted({step.run.cfg for chain in plan for step in chain})
    return sweep.cfg if stems == [sweep.cfg] else f"{sweep.cfg} (configs {', '.join(stems)})"


# How a sweep's chains run: the one place a launcher is chosen (a new one is a function here).
LAUNCHERS: dict[str, Callable[..., int]] = {"local": run_local, "slurm": run_on_slurm}


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a protocol sweep of train.py runs and skip finished ones.")
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument("--trainer", required=True)
    p.add_argument("--cfg", required=True,
                   help="a config plan of configs/plans.yaml (the config per dataset and shot count, e.g. "
                        "CoOp's paper) or a config stem under configs/trainers/<trainer>/ for every run")
    p.add_argument("--data", default="", help="dataset root ($DATA); empty = the built-in benchmark")
    p.add_argument("--datasets", nargs="+", help="dataset config stems [the protocol's, see default_datasets]")
    p.add_argument("--source", default=None,
                   help="source dataset stem (xd, dg; optional for base2new) [the protocol's]")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--shots", nargs="+", type=int, help="[16; fewshot: 1 2 4 8 16]")
    p.add_argument("--backbone", default="")
    p.add_argument("--output", default="output")
    p.add_argument("--prompts-from", default="",
                   help="<Trainer>/<cfg or plan> whose trained prompts a training-free method starts from, e.g. "
                        "CoOp/bench for TPT+CoOp (that sweep must have run in the same --output)")
    p.add_argument("--launcher", default="local", choices=tuple(LAUNCHERS),
                   help="where the chains run: local (worker processes here) or slurm (one SLURM job per "
                        "chain, as a job array; settings from SUBMIT_* variables, see selftpt/slurm.py) [local]")
    p.add_argument("--dry-run", action="store_true", help="print what would run (or be submitted), run nothing")
    p.add_argument("--shards", type=_positive, default=1,
                   help="split each evaluation still to do (a training run's too: it trains first, then its "
                        "shards resume after the last epoch) into this many shards of its test set, run side by "
                        "side (workers or SLURM array tasks) and merged into one results.json, equal to an "
                        "unsharded run's (selftpt/shards.py) [1]")
    p.add_argument("--jobs", type=int, default=0,
                   help="worker processes; 0 = one per GPU, else one per CPU core [0]")
    change = p.add_mutually_exclusive_group()
    change.add_argument("--rerun-changed", dest="on_change", action="store_const", const="rerun",
                        help="run a finished run made with other settings again in a new folder next to it "
                             "(seed1-2, ...); the tables count the newest run of a seed")
    change.add_argument("--replace-changed", dest="on_change", action="store_const", const="replace",
                        help="move a finished run made with other settings aside (.<folder>.replaced-<time>, kept "
                             "on disk, out of the tables) and run it again in its folder")
    p.add_argument("--command", default="",
                   help="the command line that started this sweep (scripts/common.sh passes its own): printed "
                        "as the way to resume, and with CHANGED=rerun|replace in front as the way to choose")
    p.add_argument("--register", action="append", default=[], metavar="MODULE",
                   help="a module that registers trainers or datasets, imported here and by every worker "
                        "before any run (repeat it; scripts/common.sh passes --register datasets --register "
                        "trainers); the library imports none by itself")
    p.epilog = "Extra KEY VALUE config options for train.py go after a '--'."
    return p


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return int(text)


def _commands(args: argparse.Namespace, argv: list[str]) -> tuple[str, Callable[[str], str]]:
    """(the command that repeats this sweep, how = 'rerun'|'replace' -> the command that chooses how)."""
    if args.command:
        return ((f"CHANGED={args.on_change} " if args.on_change else "") + args.command,
                lambda how: f"CHANGED={how} {args.command}")
    cut = argv.index("--") if "--" in argv else len(argv)
    before = [a for a in argv[:cut] if a not in ("--rerun-changed", "--replace-changed")]
    python = ["python", "-m", "selftpt.sweep"]
    return (shlex.join(python + argv),
            lambda how: shlex.join(python + before + [f"--{how}-changed"] + argv[cut:]))


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


def import_modules(modules: Sequence[str]) -> None:
    """Import the modules that register trainers and datasets (``--register``); one line naming
    the module when one cannot be imported."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(f"--register {module}: cannot import it ({exc}); run the sweep from the folder "
                            "that holds it (the repository root)") from None


@user_errors
def main(argv: list[str] | None = None, modules: Sequence[str] = ()) -> int:
    """The sweep's command line: 0 when every run finished, else EXIT_FAILED, EXIT_USAGE (one
    ``error:`` line), EXIT_CHANGED, EXIT_HELD or EXIT_INTERRUPTED.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        modules: modules that register trainers and datasets, besides ``--register`` ones.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.opts = opts
    modules = list(dict.fromkeys([*modules, *args.register]))
    import_modules(modules)
    resume, choose = _commands(args, argv)
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # stop as on Ctrl-C
    try:
        return _main(args, resume, choose, modules)
    except KeyboardInterrupt as exc:  # before any run started (planning); execute handles its own
        print(f"{'terminated' if isinstance(exc, _Terminated) else 'interrupted'} before any run started; "
              f"rerun: {resume}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)


def _option(opts: Sequence[str], key: str) -> str | None:
    """The value that trailing ``KEY VALUE`` options give ``key`` (the last one), else None."""
    values = [opts[i + 1] for i in range(0, len(opts) - 1, 2) if opts[i] == key]
    return values[-1] if values else None


def _main(args: argparse.Namespace, resume: str, choose: Callable[[str], str], modules: Sequence[str]) -> int:
    defaults = protocol_defaults(args.protocol, args.data)
    args.source = defaults.source if args.source is None else current_stems([args.source])[0]
    explicit = bool(args.datasets)
    args.datasets = current_stems(args.datasets) if args.datasets else list(defaults.targets)
    args.shots = args.shots or list(defaults.shots)
    if not args.data:  # the benchmark: Fashion-MNIST's files may be missing (a default without them is
        # left out with a note; a named one is an error saying how to get them)
        args.datasets = available_targets(args.datasets, explicit, _option(args.opts, "DATASET.ROOT"))
        if args.source:
            available_targets([args.source], True, _option(args.opts, "DATASET.ROOT"))
        if not args.datasets:
            raise UserError("no dataset left to run (see the note above)")
    for stem in [*args.datasets, *([args.source] if args.source else [])]:
        if not (REPO / "configs" / "datasets" / f"{stem}.yaml").is_file():
            known = sorted(p.stem for p in (REPO / "configs" / "datasets").glob("*.yaml"))
            raise PlanError(f"no dataset config configs/datasets/{stem}.yaml (known: {', '.join(known)})")
    # Paths are the caller's: relative ones resolve against this process's directory, never the
    # workers' (scripts/common.sh resolves them against the user's before it changes directory).
    data = str(Path(args.data).expanduser().resolve()) if args.data else ""
    sweep = Sweep(protocol=args.protocol, trainer=args.trainer, cfg=args.cfg, data=data, datasets=args.datasets,
                  seeds=args.seeds, shots=args.shots, output=Path(args.output).expanduser().resolve(),
                  source=args.source, backbone=args.backbone, extra_opts=list(args.opts or []),
                  prompts_from=args.prompts_from, shards=args.shards)
    print(f"output: {sweep.output}", flush=True)
    missing = sweep.missing_prompt_sources()
    if missing:
        trainer = args.prompts_from.split("/")[0]
        raise UserError(f"{len(missing)} {args.prompts_from} run(s) that --prompts-from needs have not finished, "
                        f"e.g. {missing[0]}; run that method's {args.protocol} sweep with the same output, seeds "
                        f"and shots first (e.g. CFG={args.prompts_from.split('/')[1]} bash "
                        f"scripts/{trainer.lower()}/{args.protocol}.sh)")
    plan = plan_sweep(sweep, args.on_change)  # UserError when a requested config does not build
    changed = [step for chain in plan for step in chain if step.action == "changed"]
    if changed:
        for step in changed:
            print(f"changed: {step.folder.relative_to(sweep.output)}: {_brief(step.changes)}", file=sys.stderr)
        print(f"error: {len(changed)} finished run(s) above were made with other settings; nothing was run. "
              f"Run them again in new folders next to the old ones (the tables count the newest): "
              f"{choose('rerun')}", file=sys.stderr)
        print(f"  or move the old ones aside (.<folder>.replaced-<time>, out of the tables) and run them again "
              f"in place: {choose('replace')}", file=sys.stderr)
        return EXIT_CHANGED
    return execute(sweep, args.jobs, plan, resume, modules, args.launcher, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
