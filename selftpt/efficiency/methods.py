"""Which methods the benchmark measures and how each one's config is built.

A method is a display name of a registered trainer's ``REFERENCE_CONFIGS`` (``selftpt.trainer_facts``):
its trainer, its config file under ``configs/trainers/<Trainer>/`` and extra options. The
benchmark's own choices (default methods, the comparisons, the targets) are data in
``configs/efficiency.yaml``. Configs are built by ``selftpt.launch.setup_cfg``, as train.py
builds them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from selftpt import trainer_facts
from selftpt.errors import UserError
from selftpt.toolbox import DATASET_REGISTRY, TRAINER_REGISTRY

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SETTINGS_FILE = CONFIG_DIR / "efficiency.yaml"


@dataclass(frozen=True)
class MethodSpec:
    """How the benchmark builds a method.

    Args:
        trainer: ``TRAINER.NAME``.
        config: the method config file.
        opts: further ``KEY VALUE`` options.
        per_image: adapts per image (``PER_IMAGE``): batches larger than 1 are not applicable.
    """

    trainer: str
    config: Path
    opts: tuple[str, ...] = ()
    per_image: bool = False


@functools.cache
def load_settings(path: Path = SETTINGS_FILE) -> dict[str, Any]:
    """The benchmark settings (``configs/efficiency.yaml``)."""
    try:
        settings = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"efficiency settings {path} cannot be read ({' '.join(str(exc).split())})") from None
    if not isinstance(settings, dict):
        raise UserError(f"efficiency settings {path}: expected KEY: VALUE settings")
    return settings


def methods() -> dict[str, MethodSpec]:
    """Display name -> spec of every registered trainer's reference configs, in table order."""
    return {label: MethodSpec(trainer, CONFIG_DIR / "trainers" / trainer / f"{stem}.yaml", opts,
                              bool(trainer_facts.fact(trainer, "PER_IMAGE", False)))
            for label, (trainer, stem, opts) in trainer_facts.reference_configs().items()}


def method_spec(method: str) -> MethodSpec:
    """The spec of ``method``; a ``UserError`` naming the known ones when it is not registered."""
    known = methods()
    if method not in known:
        raise UserError(f"Unknown method(s) {[method]}; choose from {list(known)}")
    return known[method]


def method_cfg(job: dict, method: str, seed: int = 1, extra: Sequence[str] = ()) -> Any:
    """The frozen config of ``method`` for a job, built by ``launch.setup_cfg`` from train.py's
    flags: dataset file < method file < benchmark settings < the user's ``--opts`` < ``extra``."""
    from selftpt import launch

    spec = method_spec(method)
    r = job["resolution"]
    argv = ["--root", job["root"], "--trainer", spec.trainer, "--output-dir", job["scratch"], "--seed", str(seed),
            "--config-file", str(spec.config)]
    if job.get("dataset_config_file"):
        argv += ["--dataset-config-file", job["dataset_config_file"]]
    opts = ["MODEL.BACKBONE.NAME", job["backbone_name"], "MODEL.BACKBONE.PATH", job["backbone_path"],
            "INPUT.SIZE", f"({r}, {r})", *job.get("input_opts", ()), "DATASET.NAME", job["dataset"],
            "DATASET.SUBSAMPLE_CLASSES", job.get("subsample_classes", "all"),
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "1",
            "USE_CUDA", str(job["device"] == "cuda"), *spec.opts]
    if job.get("precision", "auto") != "auto":
        opts += [f"TRAINER.{TRAINER_REGISTRY.get(spec.trainer).CFG_NODE}.PREC", job["precision"]]
    if job.get("tta_steps") is not None:
        opts += [load_settings()["tta_steps_key"], str(job["tta_steps"])]
    return launch.setup_cfg(launch.build_parser().parse_args(argv + opts + list(job.get("opts", [])) + list(extra)))


def registration_modules() -> list[str]:
    """The modules that registered this process's trainers and datasets: a measuring
    subprocess imports them to see the same registries, whoever registered them (the library
    names none; ``__main__`` cannot be imported again by that name and is left out)."""
    modules = {registry.get(name).__module__ for registry in (TRAINER_REGISTRY, DATASET_REGISTRY)
               for name in registry.registered_names()}
    return sorted(modules - {"__main__"})
