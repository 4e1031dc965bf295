"""Finding finished runs under result folders: ``results.json`` first, Dassl logs otherwise.

A directory with ``results.json`` (``selftpt.results``) is a run described by that file's
fields. A directory with only Dassl logs (runs made by CoOp-family code) is described by the
``** Config **`` block of its newest log (``selftpt.dassl_log``). The folder layout
(``.../base2new/test_new/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<S>``, CoOp/PromptSRC style)
is used only for what those sources lack: the protocol (folder names ``base2new``, ``xd``,
``dg``, ``fewshot``; no results field holds it) and, for logs without a config block, seed,
shots, base/new, dataset and trainer. A run's shard folders (``RUN/shards/<i>of<n>``, each a
slice of its test set) are never runs: the run counts once its shards are merged.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from selftpt import dassl_log, dataset_catalog, protocols
from selftpt.results import RESULTS_FILENAME, ResultsFileError, read_results
from selftpt.shards import is_shard_folder
from selftpt.trainer_facts import registered_trainers

# Folder names that say which protocol a run belongs to (nearest to the run wins).
_PROTOCOL_DIRS = protocols.folder_names()
_SUBSAMPLE_DIRS = {"train_base": "base", "test_base": "base", "test_new": "new", "test_all": "all"}
# Every dataset's squashed spellings -> registered name (selftpt.dataset_catalog: a user names the
# benchmark's source "shapeworld" as the paper's "imagenet"), and the row/column order of tables:
# the paper's datasets in the catalogue's order; benchmark datasets sort by name after these.
_DATASETS = {**dataset_catalog.alias_table(dataset_catalog.BENCHMARK),
             **dataset_catalog.alias_table(dataset_catalog.PAPER)}
DATASET_ORDER = dataset_catalog.table_order(dataset_catalog.PAPER)
# Trainer folder names of CoOp-family repositories whose trainers are not registered here, so
# that their logs without a config block still name a method; the registered trainers
# (selftpt.trainer_facts) are recognised too.
FOREIGN_TRAINERS = ("KgCoOp", "MaPLe", "PromptSRC", "IVLP")


def known_trainers() -> set[str]:
    """Trainer names recognised in folder names: the registered ones and ``FOREIGN_TRAINERS``."""
    return set(registered_trainers()) | set(FOREIGN_TRAINERS)


def canonical_dataset(name: str) -> str:
    """Registered Dassl name for a dataset name or config-file name (unknown names unchanged)."""
    return _DATASETS.get(dataset_catalog.squash(name), name)


@dataclass(frozen=True)
class FinishedRun:
    """One evaluated run (one seed of one setting), as read back from its results file or log.

    Not ``selftpt.sweep.Run``, which is a run the sweep plans to make.
    """

    method: str
    dataset: str
    subsample: str  # all | base | new
    shots: int
    seed: int  # negative: not seeded (e.g. zero-shot CLIP), counts as one complete run
    backbone: str
    split: str
    protocol: str  # base2new | xd | dg | fewshot | "" (unknown)
    metrics: Mapping[str, float | None]
    source: Path  # the results file or log it came from
    origin: str  # "results" | "log"
    config_digest: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # results.json "extra"
    trainer: str = ""  # TRAINER.NAME that produced it ("" when unknown); ranks its rows in tables

    @property
    def key(self) -> "GroupKey":
        return GroupKey(self.protocol, self.split, self.method, self.backbone, self.shots,
                        self.dataset, self.subsample)


@dataclass(frozen=True, order=True)
class GroupKey:
    """What the seeds of one table cell share."""

    protocol: str
    split: str
    method: str
    backbone: str
    shots: int
    dataset: str
    subsample: str


@dataclass
class Collection:
    """Runs found under the roots, and notes about what was skipped or suspicious."""

    runs: list[FinishedRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _protocol_from_path(path: Path, subsample: str) -> str:
    for part in reversed(path.parts):
        if part.lower() in _PROTOCOL_DIRS:
            return _PROTOCOL_DIRS[part.lower()]
    return "base2new" if subsample in ("base", "new") else ""


def _fields_from_path(run_dir: Path) -> dict:
    """Best-effort fields from CoOp/PromptSRC folder names (the fallback)."""
    parts = run_dir.parts
    found: dict = {}
    trainers = known_trainers()
    for i, part in enumerate(parts):
        if m := re.fullmatch(r"seed(-?\d+)", part):
            found["seed"] = int(m.group(1))
        elif m := re.fullmatch(r"shots_(\d+)|.*?_?(\d+)shots", part):
            found["shots"] = int(m.group(1) or m.group(2))
        elif part in _SUBSAMPLE_DIRS:
            found["subsample"] = _SUBSAMPLE_DIRS[part]
            # base2new layout: <sub>/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<S>
            if len(parts) > i + 3 and re.fullmatch(r"shots_\d+", parts[i + 2]):
                found.setdefault("dataset", parts[i + 1])
                found.setdefault("method", parts[i + 3])
        elif dataset_catalog.squash(part) in _DATASETS:
            found.setdefault("dataset", part)
        elif part in trainers:
            found.setdefault("method", part)
    return found


def _int_or(value: str | None, default: int) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def _evaluated_shots(num_shots: int, path_fields: dict) -> int:
    """The shots a run counts under: its own NUM_SHOTS, or, for an evaluation on every image
    (-1) in a sweep's folder (``shots_<K>``), the K its model was trained with, so that a cross-
    dataset method's source and target runs are one row of the table."""
    return num_shots if num_shots > 0 else path_fields.get("shots", num_shots)


def _run_from_results(path: Path) -> FinishedRun:
    rec = read_results(path)
    return FinishedRun(
        method=rec["method"],
        dataset=canonical_dataset(rec["dataset"]),
        subsample=rec["subsample_classes"],
        shots=_evaluated_shots(rec["num_shots"], _fields_from_path(path.parent.resolve())),
        seed=rec["seed"],
        backbone=rec["backbone"],
        split=rec["split"],
        protocol=_protocol_from_path(path.parent.resolve(), rec["subsample_classes"]),
        metrics=rec["metrics"],
        source=path,
        origin="results",
        config_digest=rec["config_digest"],
        extra=rec.get("extra") or {},
        trainer=rec["trainer"],
    )


def _run_from_log(log: dassl_log.ParsedLog) -> FinishedRun | str:
    """A FinishedRun, or the reason why the log gives none."""
    if log.metrics is None:
        state = "finished training but no test result" if log.finished else (
            "no test result" if log.eval_only else "training did not finish")
        return f"{log.path}: {state}; seed counted as missing"
    cfg, path_fields = log.config, _fields_from_path(log.path.parent.resolve())
    trainer = cfg.get("TRAINER.NAME") or path_fields.get("method")
    method = cfg.get("TRAINER.METHOD_NAME") or trainer
    dataset = cfg.get("DATASET.NAME") or path_fields.get("dataset")
    if not method or not dataset:
        return f"{log.path}: cannot tell its method/dataset (no config block, unknown layout); skipped"
    subsample = cfg.get("DATASET.SUBSAMPLE_CLASSES") or path_fields.get("subsample", "all")
    metrics: dict[str, float | None] = {"macro_f1": None, "ece": None, **log.metrics}
    return FinishedRun(
        method=method,
        dataset=canonical_dataset(dataset),
        subsample=subsample,
        shots=_evaluated_shots(_int_or(cfg.get("DATASET.NUM_SHOTS"), path_fields.get("shots", -1)), path_fields),
        seed=_int_or(cfg.get("SEED"), path_fields.get("seed", -1)),
        backbone=cfg.get("MODEL.BACKBONE.NAME", ""),
        split=cfg.get("TEST.SPLIT", "test"),
        protocol=_protocol_from_path(log.path.parent.resolve(), subsample),
        metrics=metrics,
        source=log.path,
        origin="log",
        trainer=trainer or "",
    )


def collect_runs(roots: Iterable[str | os.PathLike]) -> Collection:
    """Find every run under ``roots`` (recursively; hidden folders are skipped)."""
    found = Collection()
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"results root {root} is not a directory")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            run_dir = Path(dirpath)
            shards = [d for d in dirnames if is_shard_folder(run_dir / d)]
            if shards:  # slices of one run's test set: never a run of their own
                dirnames[:] = [d for d in dirnames if d not in shards]
                sharded = run_dir.parent
                if not (sharded / RESULTS_FILENAME).is_file():
                    found.notes.append(f"{sharded}: {len(shards)} shard(s) not merged yet; once all have finished, "
                                       f"python -m selftpt.shards {sharded} (a sweep merges them itself); "
                                       "seed counted as missing")
            if RESULTS_FILENAME in filenames:
                try:
                    found.runs.append(_run_from_results(run_dir / RESULTS_FILENAME))
                except ResultsFileError as err:
                    found.notes.append(f"{err}; seed counted as missing")
                continue
            log = dassl_log.newest_log(run_dir)
            if log is None:
                continue
            run = _run_from_log(dassl_log.parse_log(log))
            (found.runs if isinstance(run, FinishedRun) else found.notes).append(run)
    return found


def __getattr__(name: str) -> Any:
    # the old name, kept working for scripts that import it (ambiguous beside ``selftpt.sweep.Run``)
    if name == "Run":
        warnings.warn("selftpt.collect.Run is deprecated: use selftpt.collect.FinishedRun", DeprecationWarning,
                      stacklevel=2)
        return FinishedRun
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
