"""The CoOp-compatible command line (``train.py``): flags, config precedence, and a run.

Precedence, as in CoOp: Dassl defaults < project keys (``extend_cfg``) < dataset file <
method file < command-line flags < trailing ``KEY VALUE`` opts. Differences that fix
known traps: ``--seed 0`` is honoured; a finished output directory is never overwritten;
a resumed run's old log is rotated so that ``log.txt`` is always the newest; a trainer that
trains nothing (ZeroshotCLIP) evaluates directly; user errors are one line, no traceback.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import os
import os.path as osp
import re
import sys
import time
from typing import Any, Sequence

import torch

from selftpt.clip_loader import available_backbones
from selftpt.config import extend_cfg, validate_cfg
from selftpt.errors import UserError
from selftpt.results import RESULTS_FILENAME, make_record, write_results
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


def _merge_file(cfg: Any, path: str, what: str) -> None:
    if not osp.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        cfg.merge_from_file(path)
    except KeyError as exc:  # yacs: "Non-existent config key: X"
        raise UserError(f"{path}: {_key_error(cfg, exc)}") from None


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
        _merge_file(cfg, args.dataset_config_file, "Dataset config file")
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
    if not cfg.MODEL.BACKBONE.PATH and not osp.isfile(backbone):
        _check_name("backbone", backbone, available_backbones(), "--backbone or MODEL.BACKBONE.NAME")


def check_eval_only(args: argparse.Namespace, cfg: Any) -> None:
    """Refuse ``--eval-only`` without ``--model-dir`` for a trainer that trains: it would
    evaluate an untrained prompt (Self-TPT: and a random CPT head) under the method's name.
    Training-free trainers (``TRAINS = False``) evaluate without trained weights."""
    if not args.eval_only or args.model_dir:
        return
    if getattr(TRAINER_REGISTRY.get(cfg.TRAINER.NAME), "TRAINS", True):
        free = sorted(n for n in TRAINER_REGISTRY.registered_names()
                      if not getattr(TRAINER_REGISTRY.get(n), "TRAINS", True))
        raise UserError(
            f"--eval-only needs --model-dir for {cfg.TRAINER.NAME}: give the output directory of its "
            f"training run (and --load-epoch <its MAX_EPOCH>); without one it would evaluate untrained "
            f"weights. Only training-free trainers ({', '.join(free)}) evaluate without a model"
        )


def prepare_output_dir(output_dir: str) -> None:
    """Refuse a finished run; rotate an interrupted run's log so log.txt is the newest."""
    finished = osp.join(output_dir, RESULTS_FILENAME)
    if osp.isfile(finished):
        raise UserError(
            f"{output_dir} already holds a finished run ({RESULTS_FILENAME}); choose another "
            "--output-dir or delete that folder to run again"
        )
    log = osp.join(output_dir, "log.txt")
    if osp.isfile(log):
        stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.localtime(osp.getmtime(log)))
        os.replace(log, f"{log}-{stamp}")


def run(args: argparse.Namespace) -> dict:
    """Run one job as CoOp's ``main`` does; returns the record written to results.json."""
    cfg = setup_cfg(args)
    check_cfg_names(cfg)
    check_eval_only(args, cfg)
    validate_cfg(cfg, trains=TRAINER_REGISTRY.get(cfg.TRAINER.NAME).TRAINS)
    prepare_output_dir(cfg.OUTPUT_DIR)
    if cfg.SEED >= 0:
        print(f"Setting fixed seed: {cfg.SEED}")
        set_random_seed(cfg.SEED)
    stdout, stderr = sys.stdout, sys.stderr
    setup_logger(cfg.OUTPUT_DIR)  # tees stdout into OUTPUT_DIR/log.txt
    try:
        return _run_logged(cfg, args)
    finally:  # restore the streams so that runs made in one process do not nest their logs
        for stream in {sys.stdout, sys.stderr} - {stdout, stderr}:
            getattr(stream, "close", lambda: None)()
        sys.stdout, sys.stderr = stdout, stderr


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
                                **getattr(trainer, "result_extra", {})},
                         model=trainer.model_record())
    path = write_results(cfg.OUTPUT_DIR, record)
    print(f"Results written to {path}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
