"""Paper-style result tables from collected runs (``selftpt.collect``): aggregate, render.

Aggregation (:func:`build_tables`): runs are grouped by (protocol, test split, method,
backbone, shots, dataset, base/new/all) and averaged over seeds. The std is the population
std (``ddof=0``) by default, as ``np.std`` in CoOp's ``parse_test_res.py``, so the numbers
compare with published CoOp-family tables; ``ddof=1`` (sample std) is an option and every
caption says which one was used. Base-to-new HM is ``2*B*N/(B+N)`` of the seed-averaged B and
N (never the mean of per-seed HMs), and the dataset-average HM is that of the averaged B and N,
as in CoCoOp's and MaPLe's tables. Nothing missing is averaged away silently: a cell with
fewer seeds than expected reads ``61.20 (2/3)`` / ``61.20 ± 0.40 (2/3)``, a cell derived from
incomplete inputs carries ``*``, an absent one ``—``.

:func:`with_reference` (``parse_results.py --reference``) sets published numbers
(``selftpt.published``) and the differences beside the measured cells; without it nothing changes.
"""
from __future__ import annotations

import csv
import io
import math
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from tabulate import tabulate

from selftpt.collect import DATASET_ORDER, FinishedRun, GroupKey, canonical_dataset
from selftpt.protocols import PROTOCOLS
from selftpt.published import ACCURACY_KIND, BASE2NEW_KINDS, CellQuery, Entry, Reference, squash_backbone
from selftpt.trainer_facts import table_rank

DEFAULT_SEEDS: tuple[int, ...] = (1, 2, 3)
FORMATS = ("terminal", "markdown", "csv", "latex")
MISSING = "—"

_PROTOCOL_ORDER = (*PROTOCOLS, "")  # the registry's order; runs of no known protocol last


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Cell:
    """One table entry: a seed average, or a value derived from seed averages."""

    mean: float | None
    std: float | None = None
    n: int = 0  # seeds found
    expected: int = 0  # seeds expected; 0 when not applicable (derived or seedless)
    missing_seeds: tuple[int, ...] = ()
    incomplete: bool = False  # derived from inputs with missing seeds or datasets

    @property
    def partial(self) -> bool:
        return self.expected > 0 and self.n < self.expected

    @property
    def flawed(self) -> bool:
        return self.mean is None or self.partial or self.incomplete

    def text(self, decimals: int = 2, show_std: bool = True, latex: bool = False) -> str:
        if self.mean is None:
            return "--" if latex else MISSING
        out = f"{self.mean:.{decimals}f}"
        if show_std and self.std is not None and self.n > 1:
            out += (r" $\pm$ " if latex else " ± ") + f"{self.std:.{decimals}f}"
        if self.partial:
            out += f" ({self.n}/{self.expected})"
        if self.incomplete:
            out += "*"
        return out


def seed_cell(values: Mapping[int, float], expected: Sequence[int] | None, ddof: int = 0) -> Cell:
    """Mean and std over seeds; ``expected=None`` takes whatever seeds were found."""
    if values and all(seed < 0 for seed in values):
        return Cell(mean=next(iter(values.values())), n=1)  # one deterministic run
    if expected is not None:
        values = {s: v for s, v in values.items() if s in expected}
    missing = tuple(s for s in expected if s not in values) if expected is not None else ()
    n_expected = len(expected) if expected is not None else 0
    if not values:
        return Cell(mean=None, expected=n_expected, missing_seeds=missing)
    xs = [values[s] for s in sorted(values)]
    mean = sum(xs) / len(xs)
    # one seed has no spread to report (a population std of 0 would look like a measurement)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - ddof)) if len(xs) > 1 else None
    return Cell(mean=mean, std=std, n=len(xs), expected=n_expected, missing_seeds=missing)


def harmonic_mean(base: Cell, new: Cell) -> Cell:
    """HM = 2BN/(B+N) of the (seed-averaged) base and new accuracies."""
    if base.mean is None or new.mean is None:
        return Cell(mean=None, incomplete=True)
    b, n = base.mean, new.mean
    hm = 2 * b * n / (b + n) if b + n > 0 else 0.0
    return Cell(mean=hm, incomplete=base.flawed or new.flawed)


def average_cells(cells: Sequence[Cell]) -> Cell:
    """Mean over datasets of the seed averages; ``*`` if any input is missing or partial."""
    present = [c.mean for c in cells if c.mean is not None]
    if not present:
        return Cell(mean=None, incomplete=True)
    return Cell(mean=sum(present) / len(present), incomplete=any(c.flawed for c in cells))


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True, order=True)
class Variant:
    """A table row/column family: one method on one backbone with one number of shots."""

    method: str
    backbone: str
    shots: int


@dataclass(frozen=True)
class CellRef:
    """Where a measured cell sits (row, column, its CSV record) and what it measures."""

    row: int
    col: int
    record: int
    query: CellQuery


@dataclass
class Table:
    """A rendered-format-independent table plus its tidy records for CSV."""

    title: str
    caption: str
    header: list[str]
    rows: list[list[str | Cell]]
    records: list[dict] = field(default_factory=list)
    headline: dict[str, Cell] = field(default_factory=dict)  # row label -> summary accuracy
    headline_label: str = ""
    refs: list[CellRef] = field(default_factory=list)  # measured cells (for --reference)


def method_ranker(runs: Sequence[FinishedRun]) -> Callable[[str], tuple]:
    """Sort key of a row by its display name: each row follows the trainer that produced its
    runs, in the registered trainers' ``TABLE_ORDER`` (``selftpt.trainer_facts.table_rank``);
    rows of unregistered trainers (or all rows, when nothing is registered) come after,
    alphabetically."""
    trainer_of: dict[str, str] = {}
    for run in runs:
        if run.trainer:
            trainer_of.setdefault(run.method, run.trainer)
    return lambda method: table_rank(method, trainer_of.get(method, ""))


def _dataset_rank(name: str) -> tuple:
    return (DATASET_ORDER.index(name) if name in DATASET_ORDER else len(DATASET_ORDER), name)


def _labels(variants: Sequence[Variant]) -> dict[Variant, str]:
    """Method names, with backbone/shots added only where a method has several."""
    labels = {}
    for v in variants:
        same = [w for w in variants if w.method == v.method]
        label = v.method
        if len({w.backbone for w in same}) > 1:
            label += f" [{v.backbone}]"
        if len({w.shots for w in same}) > 1:
            label += f" ({v.shots}-shot)" if v.shots > 0 else " (all)"
        labels[v] = label
    return labels


def _std_name(ddof: int) -> str:
    return "population std (ddof=0, as CoOp's parse_test_res.py)" if ddof == 0 else \
        "sample std (ddof=1)"


def _caption(runs: Sequence[FinishedRun], seeds: Sequence[int] | None, ddof: int, extra: str) -> str:
    seed_text = ", ".join(map(str, seeds)) if seeds is not None else "all seeds found"
    backbones = ", ".join(sorted({r.backbone or "?" for r in runs}))
    return (
        f"Mean ± {_std_name(ddof)} over seeds {seed_text}; backbone {backbones}. {extra}"
        f"(k/n): only k of n expected seeds found. *: computed from incomplete inputs. "
        f"{MISSING}: no result."
    )


def _record(table: str, key_fields: dict, metric: str, cell: Cell) -> dict:
    return {
        "table": table, **key_fields, "metric": metric,
        "mean": "" if cell.mean is None else round(cell.mean, 6),
        "std": "" if cell.std is None else round(cell.std, 6),
        "n_seeds": cell.n, "n_expected": cell.expected,
        "missing_seeds": " ".join(map(str, cell.missing_seeds)),
        "incomplete": int(cell.flawed),
    }


def _seed_values(runs: Sequence[FinishedRun], metric: str) -> dict[GroupKey, dict[int, float]]:
    grouped: dict[GroupKey, dict[int, float]] = defaultdict(dict)
    for run in runs:
        value = run.metrics.get(metric)
        if value is not None:
            grouped[run.key][run.seed] = float(value)
    return grouped


def _variants(runs: Sequence[FinishedRun], method_rank: Callable[[str], tuple]) -> list[Variant]:
    return sorted({Variant(r.method, r.backbone, r.shots) for r in runs},
                  key=lambda v: (method_rank(v.method), v))


def _base2new_table(title: str, runs: Sequence[FinishedRun], seeds: Sequence[int] | None, ddof: int,
                    ece: bool, method_rank: Callable[[str], tuple]) -> Table:
    variants = _variants(runs, method_rank)
    labels = _labels(variants)
    datasets = sorted({r.dataset for r in runs}, key=_dataset_rank)
    proto, split = runs[0].protocol, runs[0].split
    acc, cal = _seed_values(runs, "accuracy"), _seed_values(runs, "ece")

    def cell(values: dict, v: Variant, dataset: str, sub: str) -> Cell:
        key = GroupKey(proto, split, v.method, v.backbone, v.shots, dataset, sub)
        return seed_cell(values.get(key, {}), seeds, ddof)

    header = ["Dataset", "Method", "Base", "New", "HM"] + (["ECE Base", "ECE New"] if ece else [])
    table = Table(title, "", header, [], headline_label=f"HM (%), average over datasets ({title})")
    per_variant: dict[Variant, list[tuple[Cell, Cell, Cell, Cell]]] = defaultdict(list)
    for dataset in datasets:
        for i, v in enumerate(variants):
            b, n = cell(acc, v, dataset, "base"), cell(acc, v, dataset, "new")
            eb, en = cell(cal, v, dataset, "base"), cell(cal, v, dataset, "new")
            per_variant[v].append((b, n, eb, en))
            table.rows.append([dataset if i == 0 else "", labels[v], b, n, harmonic_mean(b, n)]
                              + ([eb, en] if ece else []))
            keyf = {"dataset": dataset, "method": labels[v], "backbone": v.backbone,
                    "shots": v.shots}
            for col, (metric, c) in enumerate((("base", b), ("new", n), ("hm", harmonic_mean(b, n))) + (
                    (("ece_base", eb), ("ece_new", en)) if ece else ()), start=2):
                table.refs.append(CellRef(len(table.rows) - 1, col, len(table.records),
                                          CellQuery(proto, split, v.method, v.backbone, v.shots, dataset, metric)))
                table.records.append(_record(title, keyf, metric, c))
    for i, v in enumerate(variants):
        cols = list(zip(*per_variant[v]))
        b, n = average_cells(cols[0]), average_cells(cols[1])
        hm = harmonic_mean(b, n)
        eb, en = average_cells(cols[2]), average_cells(cols[3])
        table.rows.append(["Average" if i == 0 else "", labels[v], b, n, hm]
                          + ([eb, en] if ece else []))
        keyf = {"dataset": "Average", "method": labels[v], "backbone": v.backbone, "shots": v.shots}
        # the datasets each average really covers (a mean over fewer is never compared)
        over = [tuple(d for d, c in zip(datasets, column) if c.mean is not None) for column in cols]
        over_hm = over[0] if over[0] == over[1] else ()
        for col, (metric, c, covered) in enumerate((("base", b, over[0]), ("new", n, over[1]), ("hm", hm, over_hm))
                                                   + ((("ece_base", eb, over[2]), ("ece_new", en, over[3]))
                                                      if ece else ()), start=2):
            table.refs.append(CellRef(len(table.rows) - 1, col, len(table.records),
                                      CellQuery(proto, split, v.method, v.backbone, v.shots, "Average",
                                                metric, covered)))
            table.records.append(_record(title, keyf, metric, c))
        table.headline[labels[v]] = hm
    table.caption = _caption(runs, seeds, ddof,
                             "HM = 2BN/(B+N) of the seed-averaged Base and New; Average = mean "
                             "over datasets, its HM from the averaged Base and New. ")
    return table


def _accuracy_table(title: str, runs: Sequence[FinishedRun], seeds: Sequence[int] | None, ddof: int,
                    metric: str, source: str | None,
                    method_rank: Callable[[str], tuple]) -> Table:
    variants = _variants(runs, method_rank)
    labels = _labels(variants)
    source = canonical_dataset(source) if source else None
    datasets = sorted({r.dataset for r in runs}, key=lambda d: (d != source, _dataset_rank(d)))
    targets = [d for d in datasets if d != source]
    proto, split, sub = runs[0].protocol, runs[0].split, runs[0].subsample
    values = _seed_values(runs, metric)
    mean_name = "Mean (targets)" if source in datasets else "Mean"
    header = ["Method"] + [f"{d} (source)" if d == source else d for d in datasets] + [mean_name]
    table = Table(title, "", header, [], headline_label=f"{metric} (%), {mean_name.lower()} ({title})")
    for v in variants:
        cells = {d: seed_cell(values.get(GroupKey(proto, split, v.method, v.backbone, v.shots,
                                                  d, sub), {}), seeds, ddof) for d in datasets}
        mean = average_cells([cells[d] for d in targets]) if targets else Cell(mean=None)
        table.rows.append([labels[v]] + [cells[d] for d in datasets] + [mean])
        keyf = {"method": labels[v], "backbone": v.backbone, "shots": v.shots}
        for col, d in enumerate(datasets, start=1):
            table.refs.append(CellRef(len(table.rows) - 1, col, len(table.records),
                                      CellQuery(proto, split, v.method, v.backbone, v.shots, d, metric,
                                                source=source)))
            table.records.append(_record(title, {"dataset": d, **keyf}, metric, cells[d]))
        covered = tuple(d for d in targets if cells[d].mean is not None)
        table.refs.append(CellRef(len(table.rows) - 1, len(datasets) + 1, len(table.records),
                                  CellQuery(proto, split, v.method, v.backbone, v.shots, mean_name, metric,
                                            covered, source)))
        table.records.append(_record(title, {"dataset": mean_name, **keyf}, metric, mean))
        table.headline[labels[v]] = mean
    note = f"{mean_name} = mean over {'target ' if source in datasets else ''}datasets. "
    table.caption = _caption(runs, seeds, ddof, note)
    return table


def _consistency_notes(runs: Sequence[FinishedRun], seeds: Sequence[int] | None) -> list[str]:
    notes = []
    by_key: dict[GroupKey, list[FinishedRun]] = defaultdict(list)
    for run in runs:
        by_key[run.key].append(run)
    for key, group in sorted(by_key.items()):
        where = f"{key.method}/{key.dataset}/{key.subsample}/{key.shots}-shot"
        digests = {r.config_digest for r in group if r.config_digest}
        if len(digests) > 1:
            notes.append(f"{where}: seeds come from {len(digests)} different configs "
                         f"(config_digest differs); check {', '.join(str(r.source) for r in group)}")
        if seeds is not None:
            extra = sorted({r.seed for r in group if r.seed >= 0 and r.seed not in seeds})
            if extra:
                notes.append(f"{where}: seeds {extra} are not in the expected seeds {list(seeds)}; "
                             f"left out (pass --seeds to include them)")
    return notes


def _preference(run: FinishedRun) -> tuple:
    """Which of two runs of one seed counts: a results file beats a log, then the newest file."""
    return (run.origin == "results", run.source.stat().st_mtime, str(run.source))


def dedupe_runs(runs: Sequence[FinishedRun]) -> tuple[list[FinishedRun], list[str]]:
    """One run per (group, seed): a results file beats a log, then the newest file wins."""
    chosen: dict[tuple[GroupKey, int], FinishedRun] = {}
    notes = []
    for run in runs:
        slot = (run.key, run.seed)
        other = chosen.get(slot)
        if other is None:
            chosen[slot] = run
            continue
        keep, drop = (run, other) if _preference(run) > _preference(other) else (other, run)
        chosen[slot] = keep
        if keep.metrics.get("accuracy") != drop.metrics.get("accuracy"):
            notes.append(f"two results for {run.key.method}/{run.key.dataset}/"
                         f"{run.key.subsample} seed {run.seed}: using {keep.source}, "
                         f"not {drop.source}")
    return list(chosen.values()), notes


def build_tables(
    runs: Sequence[FinishedRun],
    seeds: Sequence[int] | None = DEFAULT_SEEDS,
    ddof: int = 0,
    ece: bool = False,
    source: str | None = None,
    methods: Sequence[str] | None = None,
) -> tuple[list[Table], list[str]]:
    """Tables for every (protocol, split) found, and notes about the data.

    Args:
        runs: from :func:`collect_runs`.
        seeds: expected seeds (missing ones are flagged); ``None`` = whatever was found.
        ddof: 0 for population std (default, as CoOp), 1 for sample std.
        ece: add ECE (base-to-new: two columns; other protocols: a second table).
        source: the source dataset of cross-dataset/DG tables: shown first, not averaged.
        methods: keep only these methods, in this order.
    """
    runs, notes = dedupe_runs(runs)
    if methods:
        absent = [m for m in methods if m not in {r.method for r in runs}]
        notes += [f"method {m!r} requested but not found" for m in absent]
        runs = [r for r in runs if r.method in methods]
        rank = lambda m: (list(methods).index(m), m)  # noqa: E731  (requested order)
    else:
        rank = method_ranker(runs)
    notes += _consistency_notes(runs, seeds)
    tables: list[Table] = []
    parts: dict[tuple[str, str, bool], list[FinishedRun]] = defaultdict(list)
    for run in runs:
        parts[(run.protocol, run.split, run.subsample in ("base", "new"))].append(run)
    order = sorted(parts, key=lambda p: (_PROTOCOL_ORDER.index(p[0]) if p[0] in _PROTOCOL_ORDER
                                         else len(_PROTOCOL_ORDER), p))
    for protocol, split, is_b2n in order:
        group = parts[(protocol, split, is_b2n)]
        title = (protocol or ("base2new" if is_b2n else "accuracy")) + (
            f" ({split} split)" if split != "test" else "")
        if is_b2n:
            tables.append(_base2new_table(title, group, seeds, ddof, ece, rank))
        else:
            tables.append(_accuracy_table(title, group, seeds, ddof, "accuracy", source, rank))
            if ece:
                tables.append(_accuracy_table(f"{title}, ECE", group, seeds, ddof, "ece", source,
                                              rank))
    return tables, notes


# --------------------------------------------------------------------------- rendering

_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "\\": r"\textbackslash{}", "Δ": r"$\Delta$", "†": r"$^\dagger$"}


def gradient_alignment_table(runs: Sequence[FinishedRun], ddof: int = 0,
                             methods: Sequence[str] | None = None) -> Table | None:
    """cos(grad L_cpt, grad L_ce) on the context per training epoch (Self-TPT's diagnostic, the
    paper's gradient-alignment figure), per method: mean ± std over every training run found
    (datasets x seeds); only ``methods`` when given. None when no run recorded it."""
    curves: dict[str, list[list[float]]] = defaultdict(list)
    for r in runs:
        if r.extra.get("grad_cos_per_epoch") and (not methods or r.method in methods):
            curves[r.method].append([float(c) for c in r.extra["grad_cos_per_epoch"]])
    if not curves:
        return None
    epochs = max(len(c) for cs in curves.values() for c in cs)
    table = Table("Gradient alignment", "", ["Method", "runs"] + [f"ep {e + 1}" for e in range(epochs)], [])
    for method in sorted(curves, key=method_ranker(runs)):
        row: list[str | Cell] = [method, str(len(curves[method]))]
        for e in range(epochs):
            runs_at_epoch = [c[e] for c in curves[method] if len(c) > e]
            row.append(seed_cell(dict(enumerate(runs_at_epoch)), None, ddof))  # runs in place of seeds
            table.records.append(_record(table.title, {"method": method, "epoch": e + 1}, "grad_cos", row[-1]))
        table.rows.append(row)
    table.caption = (f"cos(grad L_cpt, grad L_ce) on the prompt context, mean ± {_std_name(ddof)} over the "
                     "training runs (datasets x seeds) that recorded it; positive = the self-supervised task "
                     "pushes the context the way classification does.")
    return table


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex(table: Table, decimals: int, show_std: bool) -> str:
    cols = "l" * sum(isinstance(c, str) for c in table.rows[0]) if table.rows else "l"
    cols += "c" * (len(table.header) - len(cols))
    lines = [r"\begin{table}[t]", r"\centering",
             r"\caption{" + _latex_escape(table.title) + ". " +
             _latex_escape(table.caption).replace("±", r"$\pm$").replace(MISSING, "--") + "}",
             r"\begin{tabular}{" + cols + "}", r"\toprule",
             " & ".join(_latex_escape(h) for h in table.header) + r" \\", r"\midrule"]
    for row in table.rows:
        if row and row[0] in ("Average",) and table.header[0] == "Dataset":
            lines.append(r"\midrule")
        lines.append(" & ".join(c.text(decimals, show_std, latex=True) if isinstance(c, Cell)
                                else _latex_escape(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def _csv(tables: Sequence[Table]) -> str:
    records = [r for t in tables for r in t.records]
    if not records:
        return ""
    fields = list(dict.fromkeys(k for r in records for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def render(tables: Sequence[Table], fmt: str = "terminal", decimals: int = 2,
           show_std: bool = True) -> str:
    """Tables as text. ``csv`` is one tidy file (a row per cell with numeric mean/std/seeds)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if fmt == "csv":
        return _csv(tables)
    chunks = []
    for table in tables:
        if fmt == "latex":
            chunks.append(_latex(table, decimals, show_std))
            continue
        rows = [[c.text(decimals, show_std) if isinstance(c, Cell) else c for c in row]
                for row in table.rows]
        if fmt == "markdown":
            body = tabulate(rows, table.header, tablefmt="github", disable_numparse=True)
            chunks.append(f"### {table.title}\n\n{body}\n\n{table.caption}")
        else:
            body = tabulate(rows, table.header, tablefmt="simple", disable_numparse=True)
            caption = textwrap.fill(table.caption, width=max(80, len(body.splitlines()[0])))
            chunks.append(f"== {table.title} ==\n{body}\n{caption}")
    return "\n\n".join(chunks) + "\n"


# --------------------------------------------------------------------------- published reference

FLAG = "†"  # a difference larger than the policy's points and the seed std
PUBLISHED_SUFFIX = " (published)"  # label of a row that only the reference has
_REFERENCE_FIELDS = ("published", "difference", "off_reference", "reference")
_COMPARABLE_KINDS = BASE2NEW_KINDS + (ACCURACY_KIND,)  # ECE is never published here


@dataclass(frozen=True)
class RefCell(Cell):
    """A published value or a difference set beside a measured cell; empty when there is none."""

    signed: bool = False
    flagged: bool = False

    def text(self, decimals: int = 2, show_std: bool = True, latex: bool = False) -> str:
        if self.mean is None:
            return ""
        out = f"{self.mean:+.{decimals}f}" if self.signed else f"{self.mean:.{decimals}f}"
        return out + ((r"$^\dagger$" if latex else FLAG) if self.flagged else "")


@dataclass(frozen=True)
class _Match:
    ref: CellRef
    entry: Entry
    cell: Cell
    diff: float | None
    off: bool


def _match_table(table: Table, reference: Reference) -> dict[tuple[int, int], _Match]:
    """The published counterpart of each measured cell that has one, by (row, column)."""
    matches = {}
    for ref in table.refs:
        entry = reference.match(ref.query)
        cell = table.rows[ref.row][ref.col]
        if entry is None or not isinstance(cell, Cell):
            continue
        diff = None if cell.mean is None else cell.mean - entry.value
        off = diff is not None and reference.is_off(cell.mean, entry.value, cell.std)
        matches[(ref.row, ref.col)] = _Match(ref, entry, cell, diff, off)
    return matches


def _reference_only_entries(table: Table, reference: Reference) -> list[Entry]:
    """Published numbers of methods this table did not run, on one of its backbones."""
    queries = [r.query for r in table.refs]
    protocol, split = queries[0].protocol, queries[0].split
    if split != "test" or not any(q.kind in _COMPARABLE_KINDS for q in queries):
        return []
    run = {(q.method, squash_backbone(q.backbone)) for q in queries}
    datasets = {q.dataset for q in queries if q.over is None}
    sources = {q.source for q in queries if q.source}
    out = []
    for e in reference.candidates(protocol, {q.backbone for q in queries}):
        if (e.method, squash_backbone(e.block.backbone)) in run:
            continue
        if sources and e.block.source_dataset and e.block.source_dataset not in sources:
            continue
        # a mean is shown only where it averages exactly the table's datasets (less its source)
        if (e.over is None and e.dataset in datasets) or (e.over is not None and
                                                          set(e.over) == datasets - sources):
            out.append(e)
    return out


def _ref_row_label(e: Entry, table: Table) -> str:
    """``MaPLe (published)``, with the backbone where the table has several."""
    several = len({r.query.backbone for r in table.refs}) > 1
    return e.method + (f" [{e.block.backbone}]" if several else "") + PUBLISHED_SUFFIX


def _ref_record(table: Table, e: Entry, label: str, dataset: str) -> dict:
    """The CSV record of a published number that has no measured counterpart."""
    return {"table": table.title, "dataset": dataset, "method": label, "backbone": e.block.backbone,
            "shots": "" if e.shots is None else e.shots, "metric": e.kind, "mean": "", "std": "",
            "n_seeds": 0, "n_expected": 0, "missing_seeds": "", "incomplete": "",
            "published": e.value, "difference": "", "off_reference": "", "reference": e.block.label}


def _footnote(table: Table, reference: Reference, matches: Mapping[tuple[int, int], _Match],
              shown: Sequence[Entry]) -> str:
    """The sources used, the marking rule, caveats, and why each method not compared was not."""
    blocks = list(dict.fromkeys([m.entry.block for m in matches.values()] + [e.block for e in shown]))
    lines = []
    if blocks:
        cites = "; ".join(f"[{i}] {b.label}" for i, b in enumerate(blocks, start=1))
        lines.append(f"Published values (pub.) from {cites}. Δ = measured - published; {FLAG}: "
                     f"|Δ| > {reference.flag_points:g} point and > the seed std.")
        lines += [f"Caveat: {b.caveat}." for b in blocks if b.caveat]
    kinds = sorted({r.query.kind for r in table.refs} - set(_COMPARABLE_KINDS))
    if not any(r.query.kind in _COMPARABLE_KINDS for r in table.refs):
        return f"Not compared with published numbers: none are published for {', '.join(kinds)}."
    variants = list(dict.fromkeys((r.query.method, r.query.backbone, r.query.shots) for r in table.refs))
    compared = {(m.ref.query.method, m.ref.query.backbone, m.ref.query.shots) for m in matches.values()}
    reasons: dict[str, list[str]] = defaultdict(list)
    for method, backbone, shots in variants:
        if (method, backbone, shots) not in compared:
            q = next(r.query for r in table.refs if (r.query.method, r.query.backbone, r.query.shots)
                     == (method, backbone, shots))
            reasons[reference.unmatched_reason(q.protocol, q.split, method, backbone, shots,
                                               q.source)].append(f"{method} [{backbone}]")
    if reasons and not matches:
        lines.append("Not compared with published numbers: " + "; ".join(reasons) + ".")
    elif reasons:
        lines.append("Not compared: " + "; ".join(f"{', '.join(v)} ({k})" for k, v in reasons.items()) + ".")
    return " ".join(lines)


def _with_columns(table: Table, matches: Mapping[tuple[int, int], _Match], shown: Sequence[Entry]) -> Table:
    """Base-to-new: 'pub.' and 'Δ' columns after Base, New and HM."""
    metric_cols = sorted({r.col for r in table.refs if r.query.kind in BASE2NEW_KINDS})
    header = []
    for i, h in enumerate(table.header):
        header += [h] + ([f"{h} pub.", f"Δ {h}"] if i in metric_cols else [])

    def widen(row: list, r: int | None, values: Mapping[int, Entry] | None = None) -> list:
        out: list = []
        for i, c in enumerate(row):
            out.append(c)
            if i in metric_cols:
                m = matches.get((r, i)) if r is not None else None
                e = m.entry if m else (values or {}).get(i)
                out += [RefCell(mean=e.value if e else None),
                        RefCell(mean=m.diff if m else None, signed=True, flagged=bool(m and m.off))]
        return out

    kind_col = {r.query.kind: r.col for r in table.refs}
    row_dataset = {r.row: r.query.dataset for r in table.refs}
    extra: dict[str, list[Entry]] = defaultdict(list)
    for e in shown:
        extra["Average" if e.over is not None else e.dataset].append(e)
    rows: list[list] = []
    for r, row in enumerate(table.rows):
        rows.append(widen(row, r))
        last_of_block = r + 1 == len(table.rows) or row_dataset.get(r + 1) != row_dataset.get(r)
        if last_of_block and extra.get(row_dataset.get(r, "")):
            by_method: dict[tuple, dict[int, Entry]] = defaultdict(dict)
            for e in extra.pop(row_dataset[r]):
                by_method[(e.method, e.block.backbone)][kind_col[e.kind]] = e
            for cols in by_method.values():
                e0 = next(iter(cols.values()))
                base = ["", _ref_row_label(e0, table)] + [Cell(mean=None)] * (len(table.header) - 2)
                rows.append(widen(base, None, cols))
    return Table(table.title, table.caption, header, rows, [dict(r) for r in table.records],
                 dict(table.headline), table.headline_label, list(table.refs))


def _with_rows(table: Table, matches: Mapping[tuple[int, int], _Match], shown: Sequence[Entry]) -> Table:
    """Cross-dataset / DG / few-shot: a 'pub.' and a 'Δ' row under each compared method."""
    rows: list[list] = []
    for r, row in enumerate(table.rows):
        rows.append(list(row))
        found = {c: m for (rr, c), m in matches.items() if rr == r}
        if not found:
            continue
        label = str(row[0])
        rows.append([f"{label} pub."] + [RefCell(mean=found[c].entry.value if c in found else None)
                                         for c in range(1, len(row))])
        rows.append([f"{label} Δ"] + [RefCell(mean=found[c].diff if c in found else None, signed=True,
                                              flagged=c in found and found[c].off) for c in range(1, len(row))])
    col_of = {r.query.dataset: r.col for r in table.refs}
    mean_col = max(col_of.values(), default=0)
    by_method: dict[tuple, dict[int, Entry]] = defaultdict(dict)
    for e in shown:
        by_method[(e.method, e.block.backbone)][mean_col if e.over is not None else col_of[e.dataset]] = e
    for cols in by_method.values():
        e0 = next(iter(cols.values()))
        rows.append([_ref_row_label(e0, table)] + [RefCell(mean=cols[c].value if c in cols else None)
                                                   for c in range(1, len(table.header))])
    return Table(table.title, table.caption, list(table.header), rows, [dict(r) for r in table.records],
                 dict(table.headline), table.headline_label, list(table.refs))


def with_reference(tables: Sequence[Table], reference: Reference,
                   reference_rows: bool = False) -> tuple[list[Table], list[str]]:
    """The tables with published values and differences beside every matched cell.

    Base-to-new tables get 'pub.' and 'Δ' columns after Base, New and HM; the other tables a
    'pub.' and a 'Δ' row under each method compared. ``reference_rows`` adds rows for methods
    only the reference has (same protocol and one of the table's backbones). Every table's
    caption ends with the sources used, or with why nothing was compared; CSV records gain
    ``published``, ``difference``, ``off_reference`` and ``reference``. Tables without
    measured cells (the gradient table) are returned as they are. Returns the tables and the
    footnotes (for formats without captions).
    """
    out, footnotes = [], []
    for table in tables:
        if not table.refs:
            out.append(table)
            continue
        matches = _match_table(table, reference)
        shown = _reference_only_entries(table, reference) if reference_rows else []
        note = _footnote(table, reference, matches, shown)
        if matches or shown:
            columns = table.header[:2] == ["Dataset", "Method"]
            new = (_with_columns if columns else _with_rows)(table, matches, shown)
            for record in new.records:
                record.update(dict.fromkeys(_REFERENCE_FIELDS, ""))
            for m in matches.values():
                new.records[m.ref.record].update(
                    published=m.entry.value, difference="" if m.diff is None else round(m.diff, 6),
                    off_reference=int(m.off), reference=m.entry.block.label)
            mean_label = next((r.query.dataset for r in table.refs if r.query.over is not None), "")
            for e in shown:  # a mean is filed under the table's name for it ("Mean (targets)")
                new.records.append(_ref_record(table, e, _ref_row_label(e, table),
                                               mean_label if e.over is not None else e.dataset))
        else:
            new = Table(table.title, table.caption, list(table.header), [list(r) for r in table.rows],
                        [dict(r) for r in table.records], dict(table.headline), table.headline_label,
                        list(table.refs))
        new.caption = f"{table.caption} {note}".strip()
        footnotes.append(f"{table.title}: {note}")
        out.append(new)
    return out, footnotes
