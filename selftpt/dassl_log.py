"""Reading the ``log.txt`` that Dassl-based code (CoOp, CoCoOp, MaPLe, PromptSRC, ...) writes.

Runs made by this project also leave ``results.json`` (``selftpt.results``); this module is for
runs that only have a log. It fixes what ``parse_test_res.py`` users trip over (anchors §6,
row 9):

- both end-of-training markers count: ``Finish training`` (Dassl >= 0.6.1) and
  ``Finished training`` (older Dassl, MaPLe/PromptSRC's parser);
- eval-only logs (``--eval-only``, no marker) are read too, without ``--test-log``;
- a re-run in the same directory writes ``log.txt-<timestamp>``; the newest log is read.

A training log with no end marker is an unfinished run: its ``* accuracy`` lines come from
validation, so it yields no result rather than a wrong one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

LOG_NAME = "log.txt"
END_MARKERS = ("Finish training", "Finished training")
_STAMPED = re.compile(r"^log\.txt-(\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2})$")
_METRIC_LINE = re.compile(r"^\* ([A-Za-z_][\w ]*): ([-+\d.,eE]+)(%?)\s*$")
_KEY_LINE = re.compile(r"^([A-Za-z_][\w]*):(?: (.*))?$")
# Evaluator line names -> results-file metric names.
_METRIC_NAMES = {"error": "error_rate"}


@dataclass
class ParsedLog:
    """What one Dassl log says about its run."""

    path: Path
    config: dict[str, str] = field(default_factory=dict)  # dotted key -> printed value
    args: dict[str, str] = field(default_factory=dict)  # argparse namespace as printed
    finished: bool = False  # an end-of-training marker was seen
    eval_only: bool = False
    metrics: dict[str, float] | None = None  # the final evaluator block, None if no result
    num_images: int | None = None


def log_files(run_dir: str | Path) -> list[Path]:
    """The Dassl logs of a run directory, oldest first.

    Dassl names the first log ``log.txt`` and every later one ``log.txt-YYYY-MM-DD-HH-MM-SS``
    (it only stamps a name when ``log.txt`` exists), so the order follows from the names alone
    and survives copies that reset file times.
    """
    run_dir = Path(run_dir)
    stamped = sorted(
        (m.group(1), p) for p in run_dir.glob("log.txt-*") if (m := _STAMPED.match(p.name))
    )
    first = [run_dir / LOG_NAME] if (run_dir / LOG_NAME).is_file() else []
    return first + [p for _, p in stamped if p.is_file()]


def newest_log(run_dir: str | Path) -> Path | None:
    """The newest Dassl log of ``run_dir``, or ``None``."""
    logs = log_files(run_dir)
    return logs[-1] if logs else None


def _banner_blocks(lines: list[str]) -> dict[str, list[str]]:
    # Dassl prints "** Arguments **" and "** Config **" between rows of stars.
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        text = line.strip()
        if text in ("** Arguments **", "** Config **"):
            current = blocks.setdefault(text.strip("* "), [])
            continue
        if current is None or (text and set(text) == {"*"}):
            continue
        if text.startswith("Collecting env info") or text == "** System info **":
            break
        current.append(line)
    return blocks


def _parse_nested(block: list[str]) -> dict[str, str]:
    # yacs prints nodes as "KEY:" and leaves as "KEY: value", two spaces per level.
    values: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in block:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        match = _KEY_LINE.match(line.strip(" \n"))
        if not match:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match.group(1)])
        if match.group(2) is None:
            stack.append((indent, match.group(1)))
        else:
            values[key] = match.group(2).strip()
    return values


def _evaluator_blocks(lines: list[str]) -> list[tuple[int, dict[str, str]]]:
    """(line index, {name: raw value}) for every ``=> result`` block."""
    found = []
    for i, line in enumerate(lines):
        if line.strip() != "=> result":
            continue
        block: dict[str, str] = {}
        for follow in lines[i + 1 :]:
            match = _METRIC_LINE.match(follow.strip())
            if not match:
                break
            block[match.group(1).strip()] = match.group(2)
        if block:
            found.append((i, block))
    return found


def parse_log(path: str | Path) -> ParsedLog:
    """Parse one Dassl log: arguments, config, end marker and the final test result."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    blocks = _banner_blocks(lines)
    parsed = ParsedLog(
        path=path,
        config=_parse_nested(blocks.get("Config", [])),
        args=_parse_nested(blocks.get("Arguments", [])),
    )
    marker_at = max((i for i, line in enumerate(lines) if line.strip() in END_MARKERS), default=-1)
    parsed.finished = marker_at >= 0
    trained = any(line.startswith("epoch [") for line in lines)
    # Without an Arguments block, a log with no training lines is taken as eval-only.
    parsed.eval_only = parsed.args.get("eval_only", str(not trained)) == "True"
    if not parsed.finished and not parsed.eval_only:
        return parsed  # unfinished training: any result so far is a validation score
    results = [b for i, b in _evaluator_blocks(lines) if i > marker_at]
    if not results:
        return parsed
    raw = results[-1]  # as parse_test_res.py: the last block after the marker wins
    metrics: dict[str, float] = {}
    for name, value in raw.items():
        number = float(value.replace(",", ""))
        if name == "total":
            parsed.num_images = int(number)
        elif name != "correct":
            metrics[_METRIC_NAMES.get(name, name)] = number
    parsed.metrics = metrics if "accuracy" in metrics else None
    return parsed
