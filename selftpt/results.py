"""The machine-readable results file each run leaves in its output directory.

Tables are built from this file, not from regular expressions over ``log.txt`` (the log keeps
CoOp's lines for people and for old parsers). One run = one ``OUTPUT_DIR/results.json``:

.. code-block:: text

    {
      "schema": 1,
      "trainer": "SelfTPT",            # cfg.TRAINER.NAME
      "method": "SelfTPT-v",           # display name: cfg.TRAINER.METHOD_NAME if set, else trainer
      "dataset": "Caltech101",         # cfg.DATASET.NAME
      "split": "test",                 # cfg.TEST.SPLIT
      "subsample_classes": "new",      # cfg.DATASET.SUBSAMPLE_CLASSES: all | base | new
      "num_shots": 16,                 # cfg.DATASET.NUM_SHOTS (-1 = all images)
      "seed": 1,                       # cfg.SEED (negative = not seeded)
      "backbone": "ViT-B/16",          # cfg.MODEL.BACKBONE.NAME
      "config_digest": "<64 hex>",     # sha256 of the config without VOLATILE_CFG_KEYS
      "config": {"OPTIM": {"MAX_EPOCH": 10, ...}, ...},  # the full config (optional; see below)
      "metrics": {"accuracy": 93.2, "error_rate": 6.8, "macro_f1": 92.9, "ece": 3.1, ...},
      "num_images": 1549,              # images evaluated
      "extra": {...},                  # free-form JSON (adaptation time, CPT loss, ...)
      "model": {"source": "checkpoint", "directory": "/abs/run", "epoch": 10,
                "files": {"prompt_learner": "/abs/run/prompt_learner/model.pth.tar-10"}},
      "created": "2025-01-01T12:00:00+00:00",
      "output_dir": "/abs/path/to/output/dir"
    }

``model`` (optional; absent in older files) says which weights were evaluated: ``source`` is
``trained`` (trained in this run, ``resumed_from`` = ``{"directory", "epoch"}`` of the checkpoint
it continued, or null), ``checkpoint`` (loaded with ``--model-dir``) or ``none`` (a
training-free method without trained weights); ``directory``, ``epoch`` and ``files`` (model
name -> checkpoint path) where weights came from a checkpoint folder.

Metrics are percentages (0-100), like Dassl's evaluator; ``macro_f1`` and ``ece`` may be
``null`` when not computed; further metric keys may hold any finite number. Readers ignore
top-level keys they do not know, so schema 1 can grow optional fields without breaking them.

The config digest leaves out ``SEED`` on purpose: all seeds of one setting share a digest, so
the aggregator can tell when a group of seeds silently mixes different settings.

``config`` (optional; absent in older files) is the run's whole config as nested objects, so a
sweep that finds a finished run can name the settings that differ from the ones it was asked
for (:func:`config_differences`, e.g. ``OPTIM.MAX_EPOCH: 1 -> 200``) instead of only seeing
another digest.

A file that is not valid JSON is *torn* (a crash or a full disk while it was copied, a hand
edit): :func:`read_results` raises :class:`TornResultsError`, the tables count its seed as
missing, and the sweep moves the file aside and runs that run again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import yaml

from selftpt.fsmode import temp_file_beside

SCHEMA_VERSION = 1
RESULTS_FILENAME = "results.json"
# Keys that change between machines or re-runs without changing the experiment.
# The feature cache never changes results; checkpointing and printing only change what is saved
# and shown, so runs made before those keys existed still compare equal.
VOLATILE_CFG_KEYS: tuple[str, ...] = ("OUTPUT_DIR", "RESUME", "DATASET.ROOT", "SEED", "TEST.FEATURE_CACHE",
                                      "TRAIN.CHECKPOINT_FREQ", "TRAIN.KEEP_CHECKPOINTS", "TRAIN.PRINT_FREQ")
# Optional config key holding a display name such as "SelfTPT-v" or "CoOp+CPT".
METHOD_CFG_KEY = "TRAINER.METHOD_NAME"
SUBSAMPLE_CHOICES = ("all", "base", "new")
# ``model.source``: trained in this run | loaded from --model-dir | training-free, no weights.
MODEL_SOURCES = ("trained", "checkpoint", "none")
# Metrics every file carries; the first must be a number, the rest may be null.
REQUIRED_METRICS = ("accuracy", "error_rate", "macro_f1", "ece")

_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "schema": int,
    "trainer": str,
    "method": str,
    "dataset": str,
    "split": str,
    "subsample_classes": str,
    "num_shots": int,
    "seed": int,
    "backbone": str,
    "config_digest": str,
    "metrics": dict,
    "num_images": int,
    "extra": dict,
    "created": str,
    "output_dir": str,
}


class ResultsFileError(ValueError):
    """A results file (or record) that is unreadable or does not follow the schema."""


class TornResultsError(ResultsFileError):
    """A results file that is not valid JSON (cut short or damaged): the run must be redone."""


def _cfg_get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _cfg_as_dict(cfg: Any) -> dict:
    # A yacs CfgNode round-trips through its YAML dump; plain mappings are taken as they are.
    if hasattr(cfg, "dump"):
        return yaml.safe_load(cfg.dump()) or {}
    return json.loads(json.dumps(cfg, default=str))


def config_as_dict(cfg: Any) -> dict:
    """The config as nested JSON values (tuples become lists), as stored in ``config``."""
    return json.loads(json.dumps(_cfg_as_dict(cfg), default=str))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_ABSENT = object()


def config_differences(stored: Any, requested: Any,
                       volatile: tuple[str, ...] = VOLATILE_CFG_KEYS) -> list[str]:
    """The settings in which two configs differ, as ``KEY: stored -> requested`` lines (sorted).

    Keys in ``volatile`` are left out, as in :func:`config_digest`, so an empty list means equal
    digests. A key only one side has reads ``(absent)`` on the other: a key added to the
    defaults after a run was made is a difference, since that run may have behaved otherwise.
    """
    old, new = _flat(config_as_dict(stored)), _flat(config_as_dict(requested))
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in volatile:
            continue
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            shown = ["(absent)" if v is _ABSENT else json.dumps(v) for v in (a, b)]
            lines.append(f"{key}: {shown[0]} -> {shown[1]}")
    return lines


def config_digest(cfg: Any, volatile: tuple[str, ...] = VOLATILE_CFG_KEYS) -> str:
    """sha256 (hex) of the config without ``volatile`` keys, independent of key order."""
    tree = _cfg_as_dict(cfg)
    for dotted in volatile:
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _to_jsonable(obj: Any) -> Any:
    # numpy and torch scalars/arrays expose .item()/.tolist(); anything else is a caller bug.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a results file")


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def make_record(
    cfg: Any,
    metrics: Mapping[str, Any],
    num_images: int,
    extra: Mapping[str, Any] | None = None,
    method: str | None = None,
    output_dir: str | os.PathLike | None = None,
    model: Mapping[str, Any] | None = None,
) -> dict:
    """Build a schema-1 record from a yacs config and the evaluator's metrics.

    Args:
        cfg: the run's config (yacs ``CfgNode`` or nested mapping with Dassl's keys).
        metrics: percentages; ``accuracy`` is required, ``error_rate`` defaults to
            ``100 - accuracy``, ``macro_f1``/``ece`` to ``None``; extra keys are kept.
        num_images: number of evaluated images.
        extra: free-form JSON-serialisable details (numpy/torch values are converted).
        method: display name; defaults to ``cfg.TRAINER.METHOD_NAME`` or the trainer name.
        output_dir: defaults to ``cfg.OUTPUT_DIR``.
        model: which weights were evaluated (the ``model`` field; see the module docstring);
            None leaves the field out.
    """
    if "accuracy" not in metrics:
        raise ResultsFileError(f"metrics need an 'accuracy' entry, got keys {sorted(metrics)}")
    mets = {k: _as_float(v) for k, v in metrics.items()}
    mets.setdefault("error_rate", 100.0 - mets["accuracy"])
    mets.setdefault("macro_f1", None)
    mets.setdefault("ece", None)
    trainer = str(_cfg_get(cfg, "TRAINER.NAME", ""))
    record = {
        "schema": SCHEMA_VERSION,
        "trainer": trainer,
        "method": method or str(_cfg_get(cfg, METHOD_CFG_KEY, "") or "") or trainer,
        "dataset": str(_cfg_get(cfg, "DATASET.NAME", "")),
        "split": str(_cfg_get(cfg, "TEST.SPLIT", "test")),
        # CoOp adds SUBSAMPLE_CLASSES in extend_cfg; a plain Dassl config means "all".
        "subsample_classes": str(_cfg_get(cfg, "DATASET.SUBSAMPLE_CLASSES", "all")),
        "num_shots": int(_cfg_get(cfg, "DATASET.NUM_SHOTS", -1)),
        "seed": int(_cfg_get(cfg, "SEED", -1)),
        "backbone": str(_cfg_get(cfg, "MODEL.BACKBONE.NAME", "")),
        "config_digest": config_digest(cfg),
        "config": config_as_dict(cfg),
        "metrics": mets,
        "num_images": int(num_images),
        "extra": json.loads(json.dumps(dict(extra or {}), default=_to_jsonable)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output_dir": os.path.abspath(output_dir or _cfg_get(cfg, "OUTPUT_DIR", "") or "."),
    }
    if model is not None:
        record["model"] = json.loads(json.dumps(dict(model), default=_to_jsonable))
    validate_record(record)
    return record


def validate_record(record: Any, where: str = "results record") -> dict:
    """Check ``record`` against schema 1; raise :class:`ResultsFileError` naming ``where``."""
    if not isinstance(record, dict):
        raise ResultsFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get("schema") != SCHEMA_VERSION:
        raise ResultsFileError(
            f"{where}: schema {record.get('schema')!r} is not supported (this code reads "
            f"schema {SCHEMA_VERSION}); update selftpt or re-run"
        )
    for key, typ in _FIELD_TYPES.items():
        value = record.get(key)
        # bool is an int subclass; a True seed is a bug, not a seed.
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ResultsFileError(
                f"{where}: field {key!r} must be {getattr(typ, '__name__', typ)}, got {value!r}"
            )
    if not record["trainer"] or not record["method"] or not record["dataset"]:
        raise ResultsFileError(f"{where}: 'trainer', 'method' and 'dataset' must not be empty")
    if record["subsample_classes"] not in SUBSAMPLE_CHOICES:
        raise ResultsFileError(
            f"{where}: subsample_classes {record['subsample_classes']!r} not in {SUBSAMPLE_CHOICES}"
        )
    if record["num_images"] < 0:
        raise ResultsFileError(f"{where}: num_images must be >= 0")
    if "config" in record and not isinstance(record["config"], dict):
        raise ResultsFileError(f"{where}: field 'config' must be an object, got {record['config']!r}")
    model = record.get("model")
    if model is not None and (not isinstance(model, dict) or model.get("source") not in MODEL_SOURCES):
        raise ResultsFileError(f"{where}: field 'model' must be an object whose 'source' is one of "
                               f"{MODEL_SOURCES}, got {model!r}")
    metrics = record["metrics"]
    for name in REQUIRED_METRICS:
        if name not in metrics:
            raise ResultsFileError(f"{where}: metrics lack {name!r} (use null if not computed)")
    for name, value in metrics.items():
        if value is None and name in REQUIRED_METRICS[1:]:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ResultsFileError(f"{where}: metric {name!r} must be a finite number, got {value!r}")
        if name in REQUIRED_METRICS and not 0.0 <= value <= 100.0:
            raise ResultsFileError(f"{where}: metric {name!r}={value} is not a percentage (0-100)")
    return record


def results_path(path_or_dir: str | os.PathLike) -> Path:
    """The results file of a run directory (a file path is returned as is)."""
    path = Path(path_or_dir)
    return path if path.suffix == ".json" else path / RESULTS_FILENAME


def has_results(output_dir: str | os.PathLike) -> bool:
    """True when ``output_dir`` holds a finished run's results file (sweeps skip such runs)."""
    return results_path(output_dir).is_file()


def read_results(path_or_dir: str | os.PathLike) -> dict:
    """Load and validate a results file (or ``<dir>/results.json``)."""
    path = results_path(path_or_dir)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no results file at {path} (the run has not finished?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        # the sweeps move such a file aside (never delete it) and redo the run; say so here,
        # since the tables print this message too
        raise TornResultsError(
            f"{path} is torn (not valid JSON: {err}); rerunning its sweep moves it aside and redoes the run"
        ) from None
    return validate_record(record, where=str(path))


def write_results(output_dir: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Atomically write ``record`` to ``<output_dir>/results.json``; never overwrite one.

    The record is validated first, written to a temporary file in the same directory and
    published with a hard link (which fails if the target appeared meanwhile) or, where the
    filesystem has no hard links, ``os.replace``. Readers never see a half-written file.
    """
    record = validate_record(dict(record))
    directory = Path(output_dir)
    path = directory / RESULTS_FILENAME
    refusal = (
        f"{path} already holds a finished run's results; choose another --output-dir "
        f"or delete {path} to re-run"
    )
    if path.exists():
        raise FileExistsError(refusal)
    directory.mkdir(parents=True, exist_ok=True)
    # not fsmode.atomic_write, which replaces the target: published by a hard link, which never does
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(refusal) from None
        except OSError:  # no hard links here (some network/FUSE filesystems)
            if path.exists():
                raise FileExistsError(refusal) from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
