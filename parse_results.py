#!/usr/bin/env python
"""Tabulate runs over seeds (results.json files, and CoOp-family log.txt), optionally plot.

Examples:
    python parse_results.py output/base2new
    python parse_results.py output/xd --source ImageNet --format latex -o xd.tex
    python parse_results.py output/base2new --plot eff.png --efficiency efficiency.json
    python parse_results.py output/xd --source ImageNet --reference published --reference-rows
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selftpt import collect, tables
from selftpt.cli import user_errors
from selftpt.errors import UserError
from selftpt.plots import load_efficiency, plot_efficiency
from selftpt.published import BUILTIN_NAME, PublishedDataError, load_reference


def _seeds(values: list[str]) -> tuple[int, ...] | None:
    return None if values == ["all"] else tuple(int(v) for v in values)


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _register_trainers() -> None:
    """Register the trainers, whose ``TABLE_ORDER`` orders the rows (imports torch, so not before
    the arguments are checked). Where torch is not installed (tables of copied logs) rows are
    alphabetical."""
    try:
        import trainers  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name in ("trainers", "selftpt") or (err.name or "").startswith(("trainers.", "selftpt.")):
            raise
        print(f"note: trainers not registered ({err}); methods are listed alphabetically", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("roots", nargs="+", help="folders searched recursively for runs")
    p.add_argument("--seeds", nargs="+", default=["1", "2", "3"],
                   help="expected seeds; missing ones are flagged (default: 1 2 3; 'all' = "
                        "whatever was found)")
    p.add_argument("--format", choices=tables.FORMATS, default="terminal")
    p.add_argument("-o", "--output", help="write the tables here instead of stdout")
    p.add_argument("--std", choices=("population", "sample"), default="population",
                   help="std over seeds: population (ddof=0, as CoOp's parse_test_res.py) "
                        "or sample (ddof=1)")
    p.add_argument("--no-std", action="store_true", help="means only (paper style)")
    p.add_argument("--decimals", type=int, default=2)
    p.add_argument("--ece", action="store_true", help="add expected calibration error")
    p.add_argument("--source", help="source dataset of xd/dg tables: listed first, not averaged")
    p.add_argument("--methods", nargs="+", help="only these methods, in this order")
    p.add_argument("--grad-cos", action="store_true",
                   help="also print cos(grad L_cpt, grad L_ce) per epoch for methods that record it")
    p.add_argument("--list-runs", action="store_true", help="print every run found, then exit")
    p.add_argument("--reference", metavar="NAME_OR_YAML",
                   help=f"set published numbers beside the measured ones, with the difference: "
                        f"'{BUILTIN_NAME}' (the shipped selftpt/reference/published.yaml) or a YAML "
                        f"file of the same form; only cells of the same method, protocol, backbone, "
                        f"shots and dataset are compared")
    p.add_argument("--reference-rows", action="store_true",
                   help="with --reference: also show published methods that were not run")
    p.add_argument("--plot", metavar="PNG",
                   help="accuracy vs images/s plot (needs --efficiency); accuracy is the first "
                        "table's summary: base-to-new average HM, else the mean over datasets")
    p.add_argument("--efficiency", metavar="JSON", help="efficiency benchmark output")
    p.add_argument("--batch-size", help="which batch size's images/s to plot")
    return p


@user_errors
def main(argv: list[str] | None = None) -> int:
    """0 when tables were printed; 1 when nothing was found; 2 with one ``error:`` line for a
    user error (argparse's usage message for flags that do not fit together)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.plot) != bool(args.efficiency):
        parser.error("--plot and --efficiency go together")
    if args.reference_rows and not args.reference:
        parser.error("--reference-rows needs --reference")
    reference = None
    if args.reference:
        try:
            reference = load_reference(args.reference)
        except PublishedDataError as err:
            raise UserError(str(err)) from None
    try:
        seeds = _seeds(args.seeds)
    except ValueError:
        parser.error(f"--seeds takes integers or 'all', got {' '.join(args.seeds)}")
    _register_trainers()  # before collecting: folder names of registered trainers name methods
    try:
        found = collect.collect_runs(args.roots)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    if args.list_runs:
        for r in sorted(found.runs, key=lambda r: (r.key, r.seed)):
            print(f"{r.protocol or '-'}\t{r.method}\t{r.dataset}\t{r.subsample}\t{r.shots}\t"
                  f"seed{r.seed}\t{r.metrics.get('accuracy')}\t{r.origin}\t{r.source}")
    tabs, notes = tables.build_tables(found.runs, seeds=seeds, ddof=int(args.std == "sample"),
                                      ece=args.ece, source=args.source, methods=args.methods)
    notes = found.notes + notes
    if args.grad_cos:
        alignment = tables.gradient_alignment_table(found.runs, ddof=int(args.std == "sample"),
                                                     methods=args.methods)
        tabs += [alignment] if alignment else []
        if not alignment:
            notes.append("--grad-cos: no run recorded grad_cos_per_epoch (Self-TPT training runs do)")
    if args.list_runs:
        _print_notes(notes)
        return 0
    if not tabs:
        _print_notes(notes)
        print(f"Nothing found in {' '.join(args.roots)}: no results.json, and no log.txt with a "
              f"test result", file=sys.stderr)
        return 1
    if reference is not None:
        tabs, footnotes = tables.with_reference(tabs, reference, args.reference_rows)
        if args.format == "csv":  # CSV has no captions: the footnotes go with the notes
            notes += [f"reference: {f}" for f in footnotes]
    text = tables.render(tabs, args.format, args.decimals, show_std=not args.no_std)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()  # tables first, then the notes about them
    _print_notes(notes)
    if args.plot:
        head = tabs[0]
        accuracy = {m: c.mean for m, c in head.headline.items() if c.mean is not None}
        flagged = {m for m, c in head.headline.items() if c.flawed}
        try:
            path, plot_notes = plot_efficiency(accuracy, load_efficiency(args.efficiency),
                                               args.plot, args.batch_size,
                                               accuracy_label=head.headline_label, flagged=flagged)
        except ValueError as err:  # a malformed efficiency file
            raise UserError(str(err)) from None
        for note in plot_notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
