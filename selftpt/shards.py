"""Sharded evaluation: one test set split across processes, merged into one run.

A per-image method (TPT, TPT+CoOp, Self-TPT-v) tunes or augments every test image, so one
evaluation of ImageNet is hours of one GPU. ``TEST.SHARD "i/n"`` makes an evaluation cover only
shard i of n and write its per-image logits to ``predictions.pt`` instead of ``results.json``;
:func:`merge_shards` then combines the n shards into the run's ``results.json`` and ``log.txt``
lines. The sweep runs the shards as workers (``--shards N``, ``SHARDS=N``) or SLURM array tasks
and merges them itself; by hand::

    python train.py ... --output-dir RUN/shards/1of4 TEST.SHARD 1/4     # ... up to 4/4
    python -m selftpt.shards RUN                                          # RUN/results.json

A training run's own evaluation is sharded the same way once its training has finished: train
with ``TEST.NO_TEST True`` in RUN, then give each shard ``--resume RUN``; it resumes after the
last epoch (models, RNG states and what training recorded, e.g. Self-TPT's gradient cosines) and
evaluates its slice, so the merged ``results.json`` is the one the unbroken run writes. A shard
refuses to start on unfinished training (it would train a model of its own)::

    python train.py ... --output-dir RUN TEST.NO_TEST True
    python train.py ... --output-dir RUN/shards/1of4 --resume RUN TEST.SHARD 1/4   # ... up to 4/4

A shard is a contiguous slice of the test split cut at batch boundaries, so every image is
computed in the same batch as in an unsharded run, with the same views (``views.item_seed``):
its logits are bit-identical, and so are the merged accuracy, macro-F1 and ECE (on the same kind
of device and, on CPU, the same number of torch threads: another thread count sums floats in
another order, which moves logits by rounding only). The merge
refuses, in one line, a missing shard, shards of two different counts, shards made with
different settings and slices that do not tile the test split; it never averages what it has.

Layout: ``RUN/shards/<i>of<n>/{log.txt, predictions.pt}``, then ``RUN/{results.json, log.txt}``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from selftpt.errors import UserError
from selftpt.fsmode import atomic_write
from selftpt.results import RESULTS_FILENAME, VOLATILE_CFG_KEYS, config_digest, make_record, write_results

if TYPE_CHECKING:  # torch is imported where it is used: the sweep plans without it
    from torch.utils.data import DataLoader

PREDICTIONS_FILENAME = "predictions.pt"
SHARDS_DIR = "shards"
_SPEC = re.compile(r"(\d+)/(\d+)")
_FOLDER = re.compile(r"(\d+)of(\d+)")


def is_shard_folder(path: str | os.PathLike) -> bool:
    """``RUN/shards/<i>of<n>``: one shard of a run, a slice of its test set (the run's result once merged)."""
    path = Path(path)
    return path.parent.name == SHARDS_DIR and _FOLDER.fullmatch(path.name) is not None


class ShardError(UserError, ValueError):
    """A shard setting or a set of shards that cannot be used (one line, naming the fix)."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard | None:
        """``"i/n"`` -> Shard(i, n); ``""`` -> None (no sharding); anything else: ShardError."""
        if text == "":
            return None
        match = _SPEC.fullmatch(str(text).strip())
        if match is None or not 1 <= int(match[1]) <= int(match[2]):
            raise ShardError(f"TEST.SHARD is {text!r}; write i/n with 1 <= i <= n (e.g. 2/4), or \"\" for the "
                             "whole test set")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def folder_name(self) -> str:
        """``<i>of<n>``: the shard's run folder under ``RUN/shards/``."""
        return f"{self.index}of{self.count}"

    def items(self, n_items: int, batch_size: int) -> range:
        """The item indices of this shard: contiguous, cut at multiples of ``batch_size``; the
        first ``n_batches % count`` shards take one batch more (as ``numpy.array_split``)."""
        n_batches = -(-n_items // batch_size)
        per, extra = divmod(n_batches, self.count)
        first = (self.index - 1) * per + min(self.index - 1, extra)
        last = first + per + (1 if self.index <= extra else 0)
        return range(min(first * batch_size, n_items), min(last * batch_size, n_items))


def shard_loader(loader: DataLoader, shard: Shard) -> tuple[DataLoader, range]:
    """``loader`` restricted to ``shard``'s items, in order, with the same batches as unsharded;
    the dataset keeps its indices (``views.item_seed`` draws an item's views from its index)."""
    from torch.utils.data import DataLoader

    items = shard.items(len(loader.dataset), loader.batch_size)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=items, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=False,
                      worker_init_fn=loader.worker_init_fn), items


def shard_folder(run_dir: str | os.PathLike, shard: Shard) -> Path:
    """Where shard ``shard`` of the run in ``run_dir`` runs."""
    return Path(run_dir) / SHARDS_DIR / shard.folder_name


def write_predictions(output_dir: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Publish a shard's ``predictions.pt`` atomically (its presence marks the shard finished)."""
    import torch

    path = Path(output_dir) / PREDICTIONS_FILENAME
    with atomic_write(path, "wb", fsync=True) as handle:
        torch.save(payload, handle)
    return path


def shard_payload(cfg: Any, record: dict[str, Any], result: dict[str, Any], lab2cname: dict) -> dict[str, Any]:
    """What a finished shard leaves for the merge: its per-image logits and labels, the slice
    they cover, its would-be results record and config, and a digest of its settings without
    ``TEST.SHARD`` (equal for every shard of one run).

    Args:
        cfg: the shard run's config.
        record: the record an unsharded run would write (``results.make_record``).
        result: the trainer's ``test_result`` (``predictions``: logits, labels, items, num_items).
        lab2cname: label -> class name (for ``TEST.PER_CLASS_RESULT``).
    """
    predictions = result["predictions"]
    return {"shard": cfg.TEST.SHARD, "items": list(predictions["items"]), "num_items": predictions["num_items"],
            "logits": predictions["logits"], "labels": predictions["labels"], "record": record,
            "config_yaml": cfg.dump(), "lab2cname": dict(lab2cname),
            "settings_digest": shard_settings_digest(cfg)}


def shard_settings_digest(cfg: Any) -> str:
    """The config digest without ``TEST.SHARD``: equal for every shard of one run and for the
    run's unsharded config."""
    return config_digest(cfg, VOLATILE_CFG_KEYS + ("TEST.SHARD",))


def read_shard_settings(folder: str | os.PathLike) -> str | None:
    """The settings digest of the finished shard in ``folder`` (None when unreadable)."""
    try:
        return _read(Path(folder) / PREDICTIONS_FILENAME).get("settings_digest")
    except ShardError:
        return None


def finished_shard(output_dir: str | os.PathLike) -> bool:
    """The folder holds a finished shard."""
    return (Path(output_dir) / PREDICTIONS_FILENAME).is_file()


def _read(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file: name it
        raise ShardError(f"{path} cannot be read ({type(exc).__name__}: {exc}); delete its shard folder and run "
                         "that shard again") from None


def collect_shards(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The finished shards of the run in ``run_dir``, in order, checked to be one complete set.

    Raises:
        ShardError: no shards; folders of two shard counts; a missing shard; a file that is not
            the shard its folder names; shards made with different settings; slices that do not
            tile the test split exactly once.
    """
    root = Path(run_dir) / SHARDS_DIR
    folders = {}
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        match = _FOLDER.fullmatch(entry.name)
        if match and entry.is_dir():
            folders[Shard(int(match[1]), int(match[2]))] = entry
    if not folders:
        raise ShardError(f"{root} holds no shard folders (<i>of<n>); run the shards first (TEST.SHARD i/n)")
    counts = sorted({shard.count for shard in folders})
    if len(counts) > 1:
        raise ShardError(f"{root} holds shards of {' and '.join(map(str, counts))} parts; delete the folders of "
                         "the count you no longer use")
    count = counts[0]
    missing = [f"{i}of{count}" for i in range(1, count + 1)
               if Shard(i, count) not in folders or not finished_shard(folders[Shard(i, count)])]
    if missing:
        raise ShardError(f"{root}: shard(s) {', '.join(missing)} of {count} have not finished; run them "
                         "(the sweep resumes them) before merging")
    shards = []
    for i in range(1, count + 1):
        path = folders[Shard(i, count)] / PREDICTIONS_FILENAME
        payload = _read(path)
        if payload.get("shard") != str(Shard(i, count)):
            raise ShardError(f"{path} holds shard {payload.get('shard')}, not {i}/{count}; it was moved from "
                             "another folder: delete it and run that shard again")
        shards.append(payload)
    if len({p["settings_digest"] for p in shards}) > 1:
        odd = next(i for i, p in enumerate(shards, 1) if p["settings_digest"] != shards[0]["settings_digest"])
        raise ShardError(f"{root}: shard {odd}/{count} was made with other settings than shard 1/{count}; delete "
                         "the shard folders made with the old settings and run them again")
    expected = 0
    total = shards[0]["num_items"]
    for i, p in enumerate(shards, 1):
        start, stop = p["items"]
        if start != expected or p["num_items"] != total:
            raise ShardError(f"{root}: shard {i}/{count} covers items {start}-{stop} of {p['num_items']}, but "
                             f"{expected}- of {total} come next; its test set differs, run it again")
        expected = stop
    if expected != total:
        raise ShardError(f"{root}: the {count} shards cover {expected} of {total} test items; run them again")
    return shards


def merge_shards(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Combine the finished shards of ``run_dir`` into its ``results.json`` and ``log.txt``
    lines, with the metrics an unsharded run computes; returns the record written."""
    import torch
    from yacs.config import CfgNode

    from selftpt.calibration import expected_calibration_error
    from selftpt.toolbox import build_evaluator  # the backend (Dassl or the engine)

    run_dir = Path(run_dir)
    if (run_dir / RESULTS_FILENAME).is_file():
        raise ShardError(f"{run_dir} already holds a finished run ({RESULTS_FILENAME}): its shards were merged")
    shards = collect_shards(run_dir)
    cfg = CfgNode.load_cfg(shards[0]["config_yaml"])
    cfg.defrost()
    cfg.TEST.SHARD = ""
    cfg.OUTPUT_DIR = str(run_dir)
    cfg.RESUME = ""  # a training run's shards resumed its finished training from run_dir itself
    cfg.freeze()
    logits = torch.cat([p["logits"] for p in shards])
    labels = torch.cat([p["labels"] for p in shards])
    lines = io.StringIO()
    with contextlib.redirect_stdout(lines):
        print(f"Merged {len(shards)} shards of {run_dir} ({SHARDS_DIR}/*of{len(shards)})")
        evaluator = build_evaluator(cfg, lab2cname=shards[0]["lab2cname"])
        evaluator.process(logits, labels)
        metrics = dict(evaluator.evaluate())
        conf, pred = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        metrics["ece"] = expected_calibration_error(conf, pred == labels, n_bins=cfg.TEST.ECE_BINS)
        print(f"* ece: {metrics['ece']:.1f}%")
    first = shards[0]["record"]
    timing = {key: round(sum(p["record"]["extra"]["timing"][key] for p in shards), 3)
              for key in ("prepare_seconds", "eval_seconds")}
    timing["seconds_per_image"] = round(timing["eval_seconds"] / max(len(labels), 1), 5)
    extra = {**first["extra"], "timing": timing,
             "skipped_images": sorted(s for p in shards for s in p["record"]["extra"].get("skipped_images", [])),
             "shards": {"count": len(shards), "seconds": [p["record"]["extra"]["timing"]["eval_seconds"]
                                                         for p in shards]}}
    record = make_record(cfg, metrics, len(labels), extra=extra, model=first.get("model"))
    write_results(run_dir, record)
    with open(run_dir / "log.txt", "a", encoding="utf-8") as log:
        log.write(lines.getvalue())
    sys.stdout.write(lines.getvalue())
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m selftpt.shards RUN [RUN ...]``: merge each run's finished shards."""
    from selftpt.cli import user_errors

    parser = argparse.ArgumentParser(description="Merge the finished shards (RUN/shards/<i>of<n>) of sharded "
                                                 "evaluations into RUN/results.json.")
    parser.add_argument("runs", nargs="+", help="run folders whose shards/ to merge")
    args = parser.parse_args(argv)

    @user_errors
    def merge_all() -> int:
        for run in args.runs:
            merge_shards(run)
        return 0

    return merge_all()


if __name__ == "__main__":
    sys.exit(main())
