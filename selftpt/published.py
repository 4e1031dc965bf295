"""Published results to set beside measured tables: load, validate, match.

The numbers live in a data file, ``selftpt/reference/published.yaml`` (shipped with the
package; ``parse_results.py --reference published``), or in a file of the same form
(``--reference path.yaml``). The file holds *blocks*: one table of one paper, with its
settings (protocol, backbone, shots, source dataset), where it was read and whether it was
cross-checked; each block has rows (one method) of values per dataset, per named mean
(``means``: the datasets it averages), and for base-to-new per Base/New/HM. Nothing in this
module holds a number of its own: thresholds are the file's ``policy``.

A measured cell (:class:`CellQuery`) is compared with a published value only when everything
that defines the experiment agrees: protocol, test split, method, backbone, shots (a value
published for a method without labelled images, ``shots: null``, matches any), source
dataset (xd/dg), dataset, kind (base/new/hm/accuracy), and for a mean the exact set of
datasets averaged. A ViT-B/16 number is therefore never set beside an RN50 or benchmark run.
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from selftpt.collect import DATASET_ORDER, canonical_dataset

SCHEMA_VERSION = 1
BUILTIN_NAME = "published"  # --reference published
BUILTIN_PATH = Path(__file__).resolve().parent / "reference" / "published.yaml"
PROTOCOLS = ("base2new", "xd", "dg", "fewshot")
BASE2NEW_KINDS = ("base", "new", "hm")
ACCURACY_KIND = "accuracy"
CROSS_CHECKED = (True, False, "partly")
_POLICY_KEYS = ("flag_points", "rounding_tolerance")
_BLOCK_KEYS = {"id", "source", "table", "protocol", "backbone", "shots", "source_dataset",
               "read_from", "cross_checked", "notes", "caveat", "missing", "means", "rows"}
_ROW_KEYS = {"method", "as_published", "shots", "values"}
_EPS = 1e-9  # float noise on top of the rounding tolerance


class PublishedDataError(ValueError):
    """A published-results file that does not follow the schema or contradicts itself."""


def squash_backbone(name: str) -> str:
    """Backbone names compared without case and punctuation (``ViT-B/16`` = ``vit_b16``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class Source:
    """A paper."""

    id: str
    citation: str
    short: str


@dataclass(frozen=True)
class Block:
    """One published table (or the part of it for one backbone), with where it was read."""

    id: str
    source: Source
    table: str
    protocol: str
    backbone: str
    shots: int | None
    source_dataset: str | None
    read_from: tuple[str, ...]
    cross_checked: bool | str
    notes: str = ""
    caveat: str = ""
    missing: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How a table footnote names it."""
        return f"{self.source.short}, {self.table}"


@dataclass(frozen=True)
class Entry:
    """One published number."""

    block: Block
    method: str  # this project's method name (or the paper's, for methods not run here)
    as_published: str  # the row label in the source
    shots: int | None  # None: the method uses no labelled images; matches any shots
    dataset: str  # a dataset, or the name of a mean
    over: tuple[str, ...] | None  # the datasets a mean averages; None for a dataset
    kind: str  # base | new | hm | accuracy
    value: float

    def identity(self) -> tuple:
        """What must be unique in a file (shots are compared separately: None is a wildcard)."""
        where = frozenset(self.over) if self.over is not None else self.dataset
        return (self.block.protocol, squash_backbone(self.block.backbone), self.block.source_dataset,
                self.method, where, self.kind)


@dataclass(frozen=True)
class CellQuery:
    """What a measured table cell measures."""

    protocol: str
    split: str
    method: str
    backbone: str
    shots: int
    dataset: str
    kind: str
    over: tuple[str, ...] | None = None  # a mean: the datasets it averages
    source: str | None = None  # the source dataset named with --source, if any


@dataclass(frozen=True)
class Reference:
    """A validated published-results file."""

    path: Path
    sources: Mapping[str, Source]
    blocks: tuple[Block, ...]
    entries: tuple[Entry, ...]
    flag_points: float
    rounding_tolerance: float

    # ------------------------------------------------------------------ matching

    def _compatible(self, e: Entry, q: CellQuery) -> bool:
        if e.block.protocol != q.protocol or e.method != q.method:
            return False
        if squash_backbone(e.block.backbone) != squash_backbone(q.backbone):
            return False
        if e.shots is not None and e.shots != q.shots:
            return False
        return not (e.block.source_dataset and q.source
                    and canonical_dataset(q.source) != e.block.source_dataset)

    def match(self, q: CellQuery) -> Entry | None:
        """The published number for this cell, or None when none has the same settings."""
        if q.split != "test":
            return None
        for e in self.entries:
            if e.kind != q.kind or not self._compatible(e, q):
                continue
            if e.over is None and q.over is None and e.dataset == q.dataset:
                return e
            if e.over is not None and q.over is not None and set(e.over) == set(q.over):
                return e
        return None

    def unmatched_reason(self, protocol: str, split: str, method: str, backbone: str, shots: int,
                         source: str | None = None) -> str:
        """Why no number of a measured method/backbone/shots was compared (for footnotes)."""
        if split != "test":
            return f"published numbers are for the test split, not {split!r}"
        same = [e for e in self.entries if e.block.protocol == protocol]
        if not same:
            return f"no published numbers for protocol {protocol or '(unknown)'}"
        same_bb = [e for e in same if squash_backbone(e.block.backbone) == squash_backbone(backbone)]
        if not same_bb:
            known = ", ".join(sorted({e.block.backbone for e in same}))
            return f"no published number matches backbone {backbone}; published: {known}"
        same_m = [e for e in same_bb if e.method == method]
        if not same_m:
            return f"no published number for {method} on {backbone}"
        same_s = [e for e in same_m if e.shots is None or e.shots == shots]
        if not same_s:
            known = ", ".join(sorted({str(e.shots) for e in same_m}))
            return f"published {method} [{backbone}] numbers are for {known} shots, not {shots}"
        if source and not any(not e.block.source_dataset
                              or e.block.source_dataset == canonical_dataset(source) for e in same_s):
            known = ", ".join(sorted({e.block.source_dataset or "?" for e in same_s}))
            return f"published numbers are for source {known}, not {source}"
        return "no published number for the datasets or means of this table"

    def candidates(self, protocol: str, backbones: Iterable[str]) -> list[Entry]:
        """Every entry of a protocol on one of these backbones (reference-only rows)."""
        wanted = {squash_backbone(b) for b in backbones}
        return [e for e in self.entries
                if e.block.protocol == protocol and squash_backbone(e.block.backbone) in wanted]

    def is_off(self, measured: float, published: float, std: float | None) -> bool:
        """Whether a difference is marked: larger than the policy's points and the seed std."""
        diff = abs(measured - published)
        return diff > self.flag_points and diff > (std or 0.0)


# ---------------------------------------------------------------------- loading and validation


def _fail(where: str, message: str) -> None:
    raise PublishedDataError(f"{where}: {message}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, f"expected a number, got {value!r}")
    if not 0.0 <= value <= 100.0:
        _fail(where, f"{value} is not a percentage in [0, 100]")
    return float(value)


def _shots(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(where, f"shots must be a positive integer or null, got {value!r}")
    return value


def _text(value: Any, where: str, key: str, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        _fail(where, f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _dataset(name: Any, where: str) -> str:
    if not isinstance(name, str) or name not in DATASET_ORDER:
        _fail(where, f"unknown dataset {name!r}; use one of {', '.join(DATASET_ORDER)}")
    return name


def _source(sid: str, raw: Any, where: str) -> Source:
    if not isinstance(raw, Mapping):
        _fail(where, "a source needs 'citation' and 'short'")
    return Source(sid, _text(raw.get("citation"), where, "citation"), _text(raw.get("short"), where, "short"))


def _block(raw: Any, sources: Mapping[str, Source], where: str) -> tuple[Block, dict, list]:
    if not isinstance(raw, Mapping):
        _fail(where, "a block must be a mapping")
    unknown = set(raw) - _BLOCK_KEYS
    if unknown:
        _fail(where, f"unknown keys {sorted(unknown)}")
    bid = _text(raw.get("id"), where, "id")
    where = f"{where} ({bid})"
    if raw.get("source") not in sources:
        _fail(where, f"source {raw.get('source')!r} is not among the file's sources {sorted(sources)}")
    protocol = raw.get("protocol")
    if protocol not in PROTOCOLS:
        _fail(where, f"protocol {protocol!r} not in {PROTOCOLS}")
    source_dataset = raw.get("source_dataset")
    if protocol in ("xd", "dg"):
        source_dataset = _dataset(source_dataset, f"{where} source_dataset")
    elif source_dataset is not None:
        _fail(where, f"source_dataset applies to xd and dg only, got {source_dataset!r}")
    read_from = raw.get("read_from")
    if not isinstance(read_from, list) or not read_from:
        _fail(where, "'read_from' must list where the numbers were read")
    if raw.get("cross_checked", None) not in CROSS_CHECKED:
        _fail(where, f"'cross_checked' must be one of {CROSS_CHECKED}, got {raw.get('cross_checked')!r}")
    missing = raw.get("missing") or []
    if not isinstance(missing, list):
        _fail(where, "'missing' must be a list of strings")
    block = Block(
        id=bid, source=sources[raw["source"]], table=_text(raw.get("table"), where, "table"),
        protocol=protocol, backbone=_text(raw.get("backbone"), where, "backbone"),
        shots=_shots(raw.get("shots"), where), source_dataset=source_dataset,
        read_from=tuple(_text(r, where, "read_from") for r in read_from),
        cross_checked=raw["cross_checked"], notes=_text(raw.get("notes"), where, "notes", False),
        caveat=_text(raw.get("caveat"), where, "caveat", False),
        missing=tuple(_text(m, where, "missing") for m in missing))
    means = raw.get("means") or {}
    if not isinstance(means, Mapping):
        _fail(where, "'means' must map a mean's name to the datasets it averages")
    means = {_text(name, where, "means"): tuple(_dataset(d, f"{where} means.{name}") for d in ds or [])
             for name, ds in means.items()}
    for name, ds in means.items():
        if name in DATASET_ORDER or len(ds) < 2 or len(set(ds)) != len(ds):
            _fail(where, f"mean {name!r} needs a name that is not a dataset and >= 2 distinct datasets")
    rows = raw.get("rows")
    if not isinstance(rows, list) or not rows:
        _fail(where, "'rows' must be a non-empty list")
    return block, means, rows


def _row_entries(block: Block, means: Mapping[str, tuple[str, ...]], raw: Any, where: str) -> list[Entry]:
    if not isinstance(raw, Mapping) or set(raw) - _ROW_KEYS:
        _fail(where, f"a row has keys {sorted(_ROW_KEYS)}, got {raw!r}")
    method = _text(raw.get("method"), where, "method")
    where = f"{where} ({method})"
    shots = _shots(raw["shots"], where) if "shots" in raw else block.shots
    values = raw.get("values")
    if not isinstance(values, Mapping) or not values:
        _fail(where, "'values' must map datasets or means to numbers")
    entries = []
    for name, value in values.items():
        over = means.get(name)
        if over is None:
            _dataset(name, f"{where} values")
        cell_where = f"{where} {name}"
        if block.protocol == "base2new":
            if not isinstance(value, Mapping) or not value or set(value) - set(BASE2NEW_KINDS):
                _fail(cell_where, f"base-to-new values are {{base, new, hm}} mappings, got {value!r}")
            kinds = {k: v for k, v in value.items()}
        else:
            kinds = {ACCURACY_KIND: value}
        for kind, v in kinds.items():
            if v is None:  # marked missing in the file
                continue
            entries.append(Entry(block, method, _text(raw.get("as_published"), where, "as_published"),
                                 shots, name, over, kind, _number(v, f"{cell_where} {kind}")))
    return entries


def _check_consistency(entries: Sequence[Entry], tolerance: float) -> None:
    """HM = 2BN/(B+N) and means = average of their datasets, within rounding, where all given."""
    rows: dict[tuple, dict[tuple[str, str], Entry]] = defaultdict(dict)
    for e in entries:
        rows[(e.block.id, e.method)][(e.dataset, e.kind)] = e
    for (bid, method), cells in rows.items():
        for (dataset, kind), e in cells.items():
            where = f"block {bid}, {method}, {dataset}"
            if kind == "hm" and (dataset, "base") in cells and (dataset, "new") in cells:
                b, n = cells[(dataset, "base")].value, cells[(dataset, "new")].value
                hm = 2 * b * n / (b + n) if b + n else 0.0
                if abs(hm - e.value) > tolerance + _EPS:
                    _fail(where, f"HM {e.value} is not 2BN/(B+N) = {hm:.4f} of Base {b} and New {n}")
            if e.over is not None and all((d, kind) in cells for d in e.over):
                mean = sum(cells[(d, kind)].value for d in e.over) / len(e.over)
                if abs(mean - e.value) > tolerance + _EPS:
                    _fail(where, f"{kind} mean {e.value} is not the average {mean:.4f} of {', '.join(e.over)}")


def _check_duplicates(entries: Sequence[Entry]) -> None:
    seen: dict[tuple, list[Entry]] = defaultdict(list)
    for e in entries:
        for other in seen[e.identity()]:
            if e.shots is None or other.shots is None or e.shots == other.shots:
                _fail(f"block {e.block.id}", f"{e.method} {e.dataset} {e.kind} is also given by block "
                      f"{other.block.id} for the same protocol, backbone and shots")
        seen[e.identity()].append(e)


def parse_reference(data: Any, path: Path) -> Reference:
    """Validate a loaded file; raise :class:`PublishedDataError` naming the offending place."""
    where = str(path)
    if not isinstance(data, Mapping) or data.get("schema") != SCHEMA_VERSION:
        _fail(where, f"expected a mapping with schema: {SCHEMA_VERSION}")
    policy = data.get("policy")
    if not isinstance(policy, Mapping) or set(policy) != set(_POLICY_KEYS):
        _fail(where, f"'policy' must give exactly {_POLICY_KEYS}")
    for key in _POLICY_KEYS:
        value = policy[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            _fail(where, f"policy.{key} must be a non-negative number, got {value!r}")
    raw_sources = data.get("sources")
    if not isinstance(raw_sources, Mapping) or not raw_sources:
        _fail(where, "'sources' must map ids to papers")
    sources = {str(sid): _source(str(sid), raw, f"{where} sources.{sid}") for sid, raw in raw_sources.items()}
    raw_blocks = data.get("blocks")
    if not isinstance(raw_blocks, list) or not raw_blocks:
        _fail(where, "'blocks' must be a non-empty list")
    blocks, entries, ids = [], [], set()
    for i, raw in enumerate(raw_blocks):
        block, means, rows = _block(raw, sources, f"{where} blocks[{i}]")
        if block.id in ids:
            _fail(where, f"block id {block.id!r} used twice")
        ids.add(block.id)
        blocks.append(block)
        methods = [r.get("method") if isinstance(r, Mapping) else None for r in rows]
        if len(set(methods)) != len(methods):
            _fail(f"{where} block {block.id}", "a method has two rows")
        for j, row in enumerate(rows):
            entries += _row_entries(block, means, row, f"{where} block {block.id} rows[{j}]")
    _check_duplicates(entries)
    _check_consistency(entries, float(policy["rounding_tolerance"]))
    return Reference(path, sources, tuple(blocks), tuple(entries), float(policy["flag_points"]),
                     float(policy["rounding_tolerance"]))


def load_reference(name_or_path: str | os.PathLike = BUILTIN_NAME) -> Reference:
    """``published`` (the shipped file) or the path of a YAML file of the same schema."""
    path = BUILTIN_PATH if str(name_or_path) == BUILTIN_NAME else Path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PublishedDataError(f"no published-results file at {path} (use '{BUILTIN_NAME}' for the "
                                 f"shipped one)") from None
    except yaml.YAMLError as err:
        raise PublishedDataError(f"{path}: not valid YAML: {err}") from None
    return parse_reference(data, path)
