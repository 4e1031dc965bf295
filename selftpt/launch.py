"""The CoOp-compatible command line (``train.py``): flags, config precedence, and a run.

Precedence, as in CoOp: Dassl defaults < project keys (``extend_cfg``) < dataset file <
method file < command-line flags < trailing ``KEY VALUE`` opts. Differences that fix
known traps: ``--seed 0`` is honoured; a finished output directory is never overwritten;
a resumed run's old log is rotated so that ``log.txt`` is always the newest; a trainer that
trains nothing (``TRAINS = False``) evaluates directly; user errors are one line, no traceback.

Exit codes of :func:`main`: 0 done; 2 a problem the message explains (``error: ...``, one line:
bad flags or config, a malformed YAML file, an output path under a file, a full disk, a
damaged checkpoint, missing data); 130 interrupted by Ctrl-C (the run folder stays resumable).
"""
from __future__ import annotations

import argparse
import difflib
import errno
import functools
import os
import os.path as osp
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from selftpt import dataset_catalog
from selftpt.cli import EXIT_USER_ERROR, user_errors  # noqa: F401  (EXIT_USER_ERROR: main's code, re-exported)
from selftpt.clip_loader import available_backbones, is_open_clip_name
from selftpt.config import extend_cfg, validate_cfg
from selftpt.engine.checkpoint import DamagedCheckpointError
from selftpt.errors import UserError
from selftpt.results import RESULTS_FILENAME, make_record, write_results
from selftpt.shards import PREDICTIONS_FILENAME, shard_payload, write_predictions
from selftpt.toolbox import (
    BACKEND,
    DATASET_REGISTRY,
    TRAINER_REGISTRY,
    build_trainer,
    collect_env_info,
    get_cfg_default,
    set_random_seed,
    setup_logger,
)
from selftpt.trainer_facts import registered_trainers

# 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C (and what the sweeps use)
EXIT_INTERRUPTED = 130
INTERRUPTED_MESSAGE = ("interrupted (no results written); rerun the same command to resume: training "
                       "continues from its last saved checkpoint")
# errno values that mean "no room left": the disk itself, or the user's quota on it
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@functools.cache
def _system_info() -> str:
    """Dassl's environment report (about a second of subprocess calls), once per process."""
    return collect_env_info()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train / evaluate CLIP prompt learners (CoOp-compatible flags)")
    p.add_argument("--root", type=str, default="", help="path to dataset root ($DATA)")
    p.add_argument("--output-dir", type=str, default="", help="output directory")
    p.add_argument("--resume", type=str, default="", help="checkpoint directory to resume from")
    p.add_argument("--seed", type=int, default=None, help="random seed (>= 0 fixes it; 0 included)")
    p.add_argument("--source-domains", type=str, nargs="+", help="source domains for DA/DG")
    p.add_argument("--target-domains", type=str, nargs="+", help="target domains for DA/DG")
    p.add_argument("--transforms", type=str, nargs="+", help="data augmentation methods")
    p.add_argument("--config-file", type=str, default="", help="path to the method config file")
    p.add_argument("--dataset-config-file", type=str, default="", help="path to the dataset config file")
    p.add_argument("--trainer", type=str, default="", help="name of trainer")
    p.add_argument("--backbone", type=str, default="", help="name of CNN backbone")
    p.add_argument("--head", type=str, default="", help="name of head")
    p.add_argument("--eval-only", action="store_true", help="evaluation only")
    p.add_argument("--model-dir", type=str, default="", help="load model from this directory for eval-only mode")
    p.add_argument("--load-epoch", type=int, help="load model weights at this epoch for evaluation")
    p.add_argument("--no-train", action="store_true", help="do not call trainer.train()")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="modify config options using the command-line")
    return p


def current_dataset_config(path: str) -> str:
    """``path``, or the file that replaced it when its stem was renamed (``imagenetv2.yaml`` ->
    ``imagenet_v2.yaml``), with one note: commands written for the old name keep working."""
    new = None if osp.isfile(path) else dataset_catalog.renamed_stem(Path(path).stem)
    if new is None or not osp.isfile(osp.join(osp.dirname(path), f"{new}.yaml")):
        return path
    current = osp.join(osp.dirname(path), f"{new}.yaml")
    print(f"note: {path} is now {current}; using it", file=sys.stderr)
    return current


def _merge_file(cfg: Any, path: str, what: str) -> None:
    """Merge a YAML config file; every problem with it is one ``UserError`` naming the file."""
    if not osp.isfile(path):
        raise UserError(f"{what} not found: {path}")
    _check_yaml(path, what)
    try:
        cfg.merge_from_file(path)
    except KeyError as exc:  # yacs: "Non-existent config key: X"
        raise UserError(f"{path}: {_key_error(cfg, exc)}") from None
    except (ValueError, AssertionError) as exc:  # yacs: "Type mismatch (...) for config key: X"
        raise UserError(f"{path}: {_one_line(exc)}") from None


def _check_yaml(path: str, what: str) -> None:
    """Parse ``path`` as yacs will (``yaml.safe_load``), to report a YAML mistake with the file,
    line and column: yacs parses the file's text as a string, so its own errors say only
    ``in "<unicode string>", line 3`` and come as a traceback."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{what} {path} is not valid YAML: {_one_line(problem)}{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} cannot be read ({_one_line(exc)})") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{what} {path} holds a YAML {type(data).__name__}, not KEY: VALUE settings "
                        "(e.g. 'OPTIM:' then '  LR: 0.002' on the next line)")


def _one_line(text: Any) -> str:
    """``str(text)`` on one line (train.py prints every error as a single line)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _config_keys(node: Any, prefix: str = "") -> list[str]:
    """Every full key of a yacs config, e.g. ``OPTIM.LR``."""
    keys = []
    for name, value in node.items():
        keys += _config_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"]
    return keys


def _key_error(cfg: Any, exc: Exception) -> str:
    """yacs's message; for an unknown key ("Non-existent [config] key: X") plus the closest known key."""
    message = str(exc.args[0] if exc.args else exc)
    match = re.search(r"Non-existent (?:config )?key: ([\w.]+)", message)
    if not match:
        return message
    close = difflib.get_close_matches(match.group(1), _config_keys(cfg), n=1, cutoff=0.6)
    return f"{message} ({f'did you mean {close[0]}?' if close else 'unknown config key; check its spelling'})"


def setup_cfg(args: argparse.Namespace) -> Any:
    """Build the frozen config with CoOp's precedence."""
    cfg = extend_cfg(get_cfg_default())
    if args.dataset_config_file:
        _merge_file(cfg, current_dataset_config(args.dataset_config_file), "Dataset config file")
    if args.config_file:
        _merge_file(cfg, args.config_file, "Config file")
    simple = {"root": "DATASET.ROOT", "output_dir": "OUTPUT_DIR", "resume": "RESUME",
              "trainer": "TRAINER.NAME", "backbone": "MODEL.BACKBONE.NAME", "head": "MODEL.HEAD.NAME"}
    for arg, key in simple.items():
        value = getattr(args, arg)
        if value:
            node, leaf = key.rsplit(".", 1) if "." in key else ("", key)
            target = cfg
            for part in filter(None, node.split(".")):
                target = target[part]
            target[leaf] = value
    if args.seed is not None:
        cfg.SEED = args.seed
    if args.source_domains:
        cfg.DATASET.SOURCE_DOMAINS = args.source_domains
    if args.target_domains:
        cfg.DATASET.TARGET_DOMAINS = args.target_domains
    if args.transforms:
        cfg.INPUT.TRANSFORMS = args.transforms
    opts = list(args.opts or [])
    if len(opts) % 2:
        raise UserError(f"Trailing options must be KEY VALUE pairs; got an odd list: {' '.join(opts)}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError, ValueError) as exc:
        raise UserError(f"Command-line option: {_key_error(cfg, exc)}") from None
    cfg.freeze()
    return cfg


def _check_name(kind: str, name: str, known: Sequence[str], key: str) -> None:
    if name in known:
        return
    if not name:
        raise UserError(f"No {kind} given; set {key} (available: {', '.join(sorted(known))})")
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"Unknown {kind} {name!r}{hint} (available: {', '.join(sorted(known))})")


def check_cfg_names(cfg: Any) -> None:
    """Refuse unknown trainer and dataset names before anything is built or written."""
    _check_name("trainer", cfg.TRAINER.NAME, TRAINER_REGISTRY.registered_names(), "--trainer")
    _check_name("dataset", cfg.DATASET.NAME, DATASET_REGISTRY.registered_names(),
                "DATASET.NAME via --dataset-config-file")
    backbone = cfg.MODEL.BACKBONE.NAME
    if is_open_clip_name(backbone):  # name, package, text tower and INPUT preprocessing, in one line each
        from selftpt.open_clip_backend import check_backbone_cfg
        check_backbone_cfg(cfg)
    elif not cfg.MODEL.BACKBONE.PATH and not osp.isfile(backbone):
        _check_name("backbone", backbone, available_backbones(), "--backbone or MODEL.BACKBONE.NAME")


def check_eval_only(args: argparse.Namespace, cfg: Any) -> None:
    """Refuse ``--eval-only`` without ``--model-dir`` for a trainer that trains: it would
    evaluate an untrained prompt (Self-TPT: and a random CPT head) under the method's name.
    Training-free trainers (``TRAINS = False``) evaluate without trained weights."""
    if not args.eval_only or args.model_dir:
        return
    if TRAINER_REGISTRY.get(cfg.TRAINER.NAME).TRAINS:
        free = [name for name, cls in registered_trainers().items() if not cls.TRAINS]
        raise UserError(
            f"--eval-only needs --model-dir for {cfg.TRAINER.NAME}: give the output directory of its "
            f"training run (and --load-epoch <its MAX_EPOCH>); without one it would evaluate untrained "
            f"weights. Only training-free trainers ({', '.join(free)}) evaluate without a model"
        )


def prepare_output_dir(output_dir: str) -> None:
    """Refuse a finished run; create the folder (one-line errors when it cannot be); rotate an
    interrupted run's log so log.txt is the newest."""
    for finished in (RESULTS_FILENAME, PREDICTIONS_FILENAME):
        if osp.isfile(osp.join(output_dir, finished)):
            raise UserError(
                f"{output_dir} already holds a finished run ({finished}); choose another "
                "--output-dir or delete that folder to run again"
            )
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        blocker = _file_in_the_way(output_dir)
        if blocker:
            raise UserError(f"output folder {output_dir}: {blocker} is a file, not a folder; choose another "
                            "--output-dir (or move that file away)") from None
        if exc.errno in _DISK_FULL:
            raise UserError(_disk_full_message(output_dir, exc)) from None
        raise UserError(f"cannot create the output folder {output_dir} ({exc.strerror or exc}); "
                        "choose another --output-dir") from None
    log = osp.join(output_dir, "log.txt")
    if osp.isfile(log):
        stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.localtime(osp.getmtime(log)))
        os.replace(log, f"{log}-{stamp}")


def _file_in_the_way(path: str) -> str:
    """The first of ``path`` and its parents that exists but is not a folder ("" if none)."""
    path = osp.abspath(path)
    while True:
        if osp.lexists(path) and not osp.isdir(path):
            return path
        parent = osp.dirname(path)
        if parent == path:
            return ""
        path = parent


def _disk_full_message(path: str, exc: OSError) -> str:
    """One line for ENOSPC / EDQUOT: what was being written and how to go on (the writes are
    atomic, so nothing torn is left: the rerun resumes)."""
    return (f"disk full while writing {path} ({exc.strerror or 'no space left'}): free space on that disk "
            f"(or choose an --output-dir on another one) and rerun the same command (no {RESULTS_FILENAME} "
            "was written; training resumes from its last complete checkpoint)")


def _full_disk_path(cfg: Any, exc: OSError) -> str:
    """The file a disk-full error was writing; when Python did not record it (a failed
    ``write`` knows no name), the fullest of the folders this run writes to."""
    if exc.filename:
        return os.fsdecode(exc.filename)
    folders = [cfg.OUTPUT_DIR, cfg.DATASET.ROOT, cfg.TEST.FEATURE_CACHE]
    folders = [osp.abspath(osp.expanduser(str(f))) for f in folders if f and osp.isdir(osp.expanduser(str(f)))]
    return min(folders, key=lambda f: shutil.disk_usage(f).free, default=cfg.OUTPUT_DIR)


def _torch_write_failure(exc: RuntimeError, output_dir: str) -> str | None:
    """The one-line message for ``torch.save`` failing to write a checkpoint, else None.

    On a full disk ``torch.save`` raises no ``OSError`` but a ``RuntimeError`` from its zip
    writer (``PytorchStreamWriter failed writing file ...`` or ``[enforce fail at
    inline_container.cc:...] . unexpected pos ...``), without errno; the free space says why.
    """
    message = str(exc)
    if "PytorchStreamReader" in message or not ("PytorchStreamWriter" in message or "inline_container" in message):
        return None
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = -1
    if 0 <= free < 256 * 2 ** 20:
        what = f"the disk is full ({free / 2 ** 20:.0f} MiB free): free space on it"
    else:
        what = (f"{free / 2 ** 30:.1f} GiB are free there, " if free >= 0 else "") + "so check the disk and your quota"
    return (f"writing a checkpoint under {output_dir} failed (torch: {_one_line(message.splitlines()[0])}); "
            f"{what}, then rerun the same command: the run resumes from its last complete checkpoint")


def _damaged_checkpoint_message(exc: DamagedCheckpointError, args: argparse.Namespace, cfg: Any) -> str:
    """A damaged checkpoint, with the fix for where it came from: ``--model-dir`` (a trained
    model to evaluate: train it again) or this run's own folder (resuming: start afresh;
    deleting only the file would leave the ``checkpoint`` pointer naming it)."""
    path = osp.abspath(exc.path)
    head = f"checkpoint {exc.path} is truncated or damaged and cannot be loaded ({exc.reason})"

    def under(folder: str) -> bool:
        return bool(folder) and path.startswith(osp.abspath(folder) + os.sep)

    if under(args.model_dir):
        return (f"{head}; re-run the training that wrote {args.model_dir} (or give --model-dir / --load-epoch "
                "of a complete checkpoint)")
    resumed = cfg.RESUME or cfg.OUTPUT_DIR
    if under(resumed):
        return (f"{head}; delete {resumed} (the interrupted run it belongs to) and rerun the same command "
                "to train again from scratch")
    return str(exc)


def run(args: argparse.Namespace) -> dict:
    """Run one job as CoOp's ``main`` does; returns the record written to results.json.

    Raises:
        UserError: one line for the user; besides the checks before anything is written, a
            full disk, a damaged checkpoint and a failed checkpoint write become one too.
        KeyboardInterrupt: Ctrl-C, with the run folder left resumable (no results.json).
    """
    cfg = setup_cfg(args)
    check_cfg_names(cfg)
    check_eval_only(args, cfg)
    validate_cfg(cfg, trains=TRAINER_REGISTRY.get(cfg.TRAINER.NAME).TRAINS)
    prepare_output_dir(cfg.OUTPUT_DIR)
    if cfg.SEED >= 0:
        print(f"Setting fixed seed: {cfg.SEED}")
        set_random_seed(cfg.SEED)
    stdout, stderr = sys.stdout, sys.stderr
    try:
        setup_logger(cfg.OUTPUT_DIR)  # tees stdout into OUTPUT_DIR/log.txt
        try:
            return _run_logged(cfg, args)
        finally:  # restore the streams so that runs made in one process do not nest their logs
            _restore_streams(stdout, stderr)
    except DamagedCheckpointError as exc:
        raise UserError(_damaged_checkpoint_message(exc, args, cfg)) from None
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise UserError(_disk_full_message(_full_disk_path(cfg, exc), exc)) from None
    except RuntimeError as exc:
        message = _torch_write_failure(exc, cfg.OUTPUT_DIR)
        if message is None:
            raise
        raise UserError(message) from None


def _restore_streams(stdout: Any, stderr: Any) -> None:
    """Put the console streams back, then close the log tee. In this order: closing flushes
    ``log.txt``, which fails on a full disk, and the error must not leave the closed tee as
    ``sys.stdout``."""
    teed = {sys.stdout, sys.stderr} - {stdout, stderr}
    sys.stdout, sys.stderr = stdout, stderr
    for stream in teed:
        getattr(stream, "close", lambda: None)()


def _run_logged(cfg: Any, args: argparse.Namespace) -> dict:
    if torch.cuda.is_available() and cfg.USE_CUDA:
        torch.backends.cudnn.benchmark = True
    print("** Arguments **")
    for key in sorted(vars(args)):
        print(f"{key}: {getattr(args, key)}")
    print("************")
    print("** Config **")
    print(cfg)
    print("** System info **")
    print(_system_info())
    print(f"Toolbox backend: {BACKEND}")

    trainer = build_trainer(cfg)
    if args.eval_only or not trainer.TRAINS:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        trainer.test()
    elif not args.no_train:
        trainer.train()
    else:
        return {}
    if getattr(trainer, "test_result", None) is None:
        return {}  # TEST.NO_TEST: nothing was evaluated
    result = trainer.test_result
    record = make_record(cfg, result["metrics"], result["num_images"],
                         extra={"split_evaluated": result["split"], "timing": result.get("timing", {}),
                                "skipped_images": result.get("skipped_images", []),
                                **trainer.result_extra},
                         model=trainer.model_record())
    if cfg.TEST.SHARD:  # a shard's result is its predictions; the merge writes the run's results.json
        path = write_predictions(cfg.OUTPUT_DIR, shard_payload(cfg, record, result, trainer.lab2cname))
        print(f"Shard {cfg.TEST.SHARD} predictions written to {path}; merge the shards with: python -m "
              f"selftpt.shards {osp.dirname(osp.dirname(osp.abspath(cfg.OUTPUT_DIR)))}")
        return record
    try:
        path = write_results(cfg.OUTPUT_DIR, record)
    except FileExistsError as exc:  # another process finished the same run meanwhile
        raise UserError(str(exc)) from None
    except OSError as exc:  # a failed write names no file: name results.json (it is not left behind)
        if exc.errno not in _DISK_FULL:
            raise
        raise UserError(_disk_full_message(osp.join(cfg.OUTPUT_DIR, RESULTS_FILENAME), exc)) from None
    print(f"Results written to {path}")
    return record


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """``train.py``: run, and turn what the user must fix into one line and an exit code.

    Returns 0, ``EXIT_USER_ERROR`` (2: ``error: ...`` on stderr) or ``EXIT_INTERRUPTED``
    (130: Ctrl-C, a plain ``KeyboardInterrupt``; the run folder resumes on the same command), so
    that an in-process caller tells an interruption from a failure by the code. A subclass of
    ``KeyboardInterrupt`` (the sweep workers' SIGTERM stop) propagates unchanged.
    """
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt as exc:
        if type(exc) is not KeyboardInterrupt:
            # a subclass is a caller's own stop signal (the sweep worker's _Stopped, raised by
            # its SIGTERM handler): that caller handles it, so it must reach it unchanged
            raise
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
