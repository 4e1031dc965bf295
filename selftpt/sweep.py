"""Protocol sweeps behind ``scripts/<method>/*.sh``: seeds x datasets (x shots) as train.py runs.

Protocols (output layout as CoOp/PromptSRC, so existing habits and parsers carry over):

- ``base2new``: train on the base classes of each dataset, test on base (the training run's
  own evaluation) and on new (a separate eval-only run that never reuses the training
  folder) — ``OUT/base2new/{train_base,test_new}/<ds>/shots_<K>/<Trainer>/<cfg>/seed<S>``.
  With ``--source``: train once on the source, then test base and new of each dataset.
- ``xd``: train once on the source, test on every target —
  ``OUT/xd/{train,test}/<ds>/shots_<K>/<Trainer>/<cfg>/seed<S>``.
- ``dg``: as ``xd``, with the source's shifted variants as targets (``OUT/dg/...``).
- ``fewshot``: train and test on each dataset for each shot count —
  ``OUT/fewshot/<ds>/shots_<K>/<Trainer>/<cfg>/seed<S>``.

``--cfg`` names one config (``configs/trainers/<Trainer>/<cfg>.yaml``, used by every run) or a
config plan of ``configs/plans.yaml`` (a config per dataset and shot count, as published
protocols prescribe); ``<cfg>`` in a folder is always the config that run used. A test run
uses the config of the run that trained its prompts.

A run whose folder holds ``results.json`` is skipped; a folder without it is resumed by
train.py; trainers that train nothing (ZeroshotCLIP, TPT) are evaluated directly. Runs of
one (dataset, seed) chain execute in order; chains run in parallel in ``--jobs`` worker
processes (each pinned to one of ``CUDA_VISIBLE_DEVICES`` when GPUs exist, else to its share
of the CPU cores), and each worker runs its runs in-process, importing torch and CLIP once.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import io
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from selftpt.results import RESULTS_FILENAME

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("base2new", "xd", "dg", "fewshot")
TRAINING_FREE = ("ZeroshotCLIP", "ZeroshotCLIP2", "TPT")  # evaluated directly, nothing to train
DETERMINISTIC = ("ZeroshotCLIP", "ZeroshotCLIP2")  # the same result for every seed: run once, unseeded

# The paper's datasets (CoOp config stems): (source, targets) per protocol.
PAPER_ELEVEN = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
PAPER_DEFAULTS = {
    "base2new": ("", PAPER_ELEVEN),
    "fewshot": ("", PAPER_ELEVEN),
    "xd": ("imagenet", PAPER_ELEVEN[1:]),
    "dg": ("imagenet", ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")),
}
# Protocol names of selftpt.benchmark.protocols for ours; few-shot uses base-to-new's datasets.
BENCHMARK_NAMES = {"base2new": "base2new", "fewshot": "base2new", "xd": "cross_dataset",
                   "dg": "domain_generalization"}


PLANS_FILE = REPO / "configs" / "plans.yaml"
_PLAN_KEYS = ("default", "datasets", "shots")


class PlanError(ValueError):
    """A config or plan that does not resolve; the message is one line for the user."""


@dataclass(frozen=True)
class ConfigPlan:
    """The trainer config (a stem under ``configs/trainers/<Trainer>/``) of each run of one protocol.

    One config for every run is the plan with only a default. A dataset entry wins over a shots
    entry: CoOp trains ImageNet 50 epochs whatever the shot count.
    """

    name: str  # what was asked for: a plan name or a config stem
    default: str
    datasets: Mapping[str, str] = field(default_factory=dict)
    shots: Mapping[int, str] = field(default_factory=dict)

    def stem(self, dataset: str, shots: int) -> str:
        """The config stem of a run that trains on ``dataset`` with ``shots`` shots per class."""
        return self.datasets.get(dataset) or self.shots.get(shots) or self.default

    @property
    def stems(self) -> list[str]:
        """Every config stem the plan can pick."""
        return sorted({self.default, *self.datasets.values(), *self.shots.values()})


def config_file(trainer: str, stem: str) -> Path:
    """``configs/trainers/<trainer>/<stem>.yaml``."""
    return REPO / "configs" / "trainers" / trainer / f"{stem}.yaml"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_plans(plans_file: Path = PLANS_FILE) -> dict:
    """``plans_file`` as ``{trainer: {plan: {protocol: entry}}}``; empty when the file is absent."""
    if not plans_file.is_file():
        return {}
    import yaml
    try:
        plans = yaml.safe_load(plans_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PlanError(f"{_shown(plans_file)} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(plans, dict) or not all(isinstance(v, dict) for v in plans.values()):
        raise PlanError(f"{_shown(plans_file)}: expected <Trainer>: <plan>: <protocol>: entries")
    return plans


def resolve_plan(trainer: str, name: str, protocol: str, plans_file: Path = PLANS_FILE) -> ConfigPlan:
    """The configs of a sweep's runs: ``name`` is a config stem of ``trainer`` (that config for
    every run) or a plan of ``plans_file`` (checked: every stem and dataset it names exists).

    A name that is both a stem and a plan is refused, so a name always means one thing.
    """
    plans = load_plans(plans_file).get(trainer) or {}
    where = _shown(plans_file)
    single = config_file(trainer, name).is_file()
    if single and name in plans:
        raise PlanError(f"{name!r} is both a config ({_shown(config_file(trainer, name))}) and a plan of "
                        f"{trainer} in {where}; rename one")
    if single:
        return ConfigPlan(name, name)
    if name not in plans:
        folder = config_file(trainer, name).parent
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise PlanError(f"no config {_shown(config_file(trainer, name))} and no plan {trainer}/{name} in {where} "
                        f"(known for {trainer}: configs {', '.join(known) or 'none'}; "
                        f"plans {', '.join(sorted(plans)) or 'none'})")
    what = f"plan {trainer}/{name} in {where}"
    entry = (plans[name] or {}).get(protocol)
    if not isinstance(entry, dict):
        raise PlanError(f"{what} has no entry for protocol {protocol} "
                        f"(it has: {', '.join(sorted(plans[name] or {})) or 'none'}); pass a config stem instead")
    unknown = sorted(set(entry) - set(_PLAN_KEYS))
    datasets, shots = entry.get("datasets") or {}, entry.get("shots") or {}
    if unknown or not isinstance(entry.get("default"), str) or not isinstance(datasets, dict) \
            or not isinstance(shots, dict) or not all(isinstance(k, int) for k in shots):
        raise PlanError(f"{what}, {protocol}: expected a 'default' stem and optional 'datasets' "
                        f"{{dataset: stem}} and 'shots' {{K: stem}}, got keys {', '.join(map(str, entry))}")
    plan = ConfigPlan(name, entry["default"], {str(k): str(v) for k, v in datasets.items()},
                      {int(k): str(v) for k, v in shots.items()})
    bad = [d for d in plan.datasets if not (REPO / "configs" / "datasets" / f"{d}.yaml").is_file()]
    if bad:
        raise PlanError(f"{what}, {protocol}: no dataset config configs/datasets/{bad[0]}.yaml")
    missing = [s for s in plan.stems if not config_file(trainer, s).is_file()]
    if missing:
        raise PlanError(f"{what}, {protocol}: no config {_shown(config_file(trainer, missing[0]))}")
    return plan


def default_datasets(protocol: str, data: str) -> tuple[str, list[str]]:
    """(source, targets) config stems: the paper's with a ``$DATA`` root, else the benchmark's."""
    if data:
        source, targets = PAPER_DEFAULTS[protocol]
        return source, list(targets)
    from selftpt.benchmark.protocols import CONFIG_STEMS, PROTOCOLS as BENCH
    bench = BENCH[BENCHMARK_NAMES[protocol]]
    return (CONFIG_STEMS[bench.source] if bench.source else ""), [CONFIG_STEMS[d] for d in bench.targets]


@dataclass
class Run:
    """One train.py invocation."""

    output_dir: Path
    dataset: str  # config stem, e.g. oxford_pets
    cfg: str  # trainer config stem this run uses (from the sweep's plan)
    opts: list[str] = field(default_factory=list)
    eval_only: bool = False
    model_dir: Path | None = None

    @property
    def finished(self) -> bool:
        return (self.output_dir / RESULTS_FILENAME).is_file()


@dataclass
class Sweep:
    """The settings shared by every run of one protocol sweep.

    Every run of a chain uses the config its plan picks for the chain's training dataset (the
    dataset itself; the source for xd, dg and base-to-new with a source) and shot count, so a
    test run always has its training run's config and folder name.
    """

    protocol: str
    trainer: str
    cfg: str  # a config stem of the trainer, or a plan of configs/plans.yaml
    data: str
    datasets: list[str]
    seeds: list[int]
    shots: list[int]
    output: Path
    source: str = ""
    backbone: str = ""
    extra_opts: list[str] = field(default_factory=list)
    prompts_from: str = ""  # "<Trainer>/<cfg or plan>": a training-free method starts from those prompts
    plan: ConfigPlan = field(init=False, repr=False)
    prompt_plan: ConfigPlan | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        """Resolve the configs (PlanError when a name does not resolve) before any run is built."""
        if self.prompts_from and (self.trains or self.prompts_from.count("/") != 1):
            raise SystemExit(f"error: --prompts-from {self.prompts_from!r} needs the form <Trainer>/<cfg> "
                             f"and a training-free trainer ({', '.join(TRAINING_FREE)}), not {self.trainer}")
        self.plan = resolve_plan(self.trainer, self.cfg, self.protocol)
        if self.prompts_from:
            self.prompt_plan = resolve_plan(*self.prompts_from.split("/"), self.protocol)

    @property
    def trains(self) -> bool:
        return self.trainer not in TRAINING_FREE

    def run_cfg(self, trained_on: str, shots: int) -> str:
        """The cfg folder of a run whose chain trains on ``trained_on``: the config it uses
        (``bench+CoOp-bench`` when started from CoOp/bench prompts, so TPT and TPT+CoOp never
        share a folder)."""
        stem = self.plan.stem(trained_on, shots)
        if self.prompt_plan is None:
            return stem
        return f"{stem}+{self.prompts_from.split('/')[0]}-{self.prompt_plan.stem(trained_on, shots)}"

    @property
    def method_name(self) -> str:
        """Display name for the tables: ``TPT+CoOp`` when started from CoOp's prompts."""
        return f"{self.trainer}+{self.prompts_from.split('/')[0]}" if self.prompts_from else ""

    def folder(self, *parts: str, dataset: str, shots: int, seed: int, cfg: str, trainer: str = "") -> Path:
        """``OUT/<protocol>/<parts>/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<S>`` (``unseeded`` below 0)."""
        return self.output.joinpath(self.protocol, *parts, dataset, f"shots_{shots}", trainer or self.trainer,
                                    cfg, f"seed{seed}" if seed >= 0 else "unseeded")

    def prompt_source(self, part: str, dataset: str, shots: int, seed: int) -> Path | None:
        """The training run of ``prompts_from`` whose prompts a training-free run starts from."""
        if self.prompt_plan is None:
            return None
        return self.folder(part, dataset=dataset, shots=shots, seed=seed, trainer=self.prompts_from.split("/")[0],
                           cfg=self.prompt_plan.stem(dataset, shots))

    def missing_prompt_sources(self) -> list[Path]:
        """``prompts_from`` runs that the chains need but that have not finished."""
        if not self.prompts_from:
            return []
        needed = {run.model_dir for chain in self.chains() for run in chain if run.model_dir is not None}
        return sorted(d for d in needed if not (d / RESULTS_FILENAME).is_file())

    def chains(self) -> list[list[Run]]:
        """Lists of runs; each list runs in order, lists run in parallel."""
        chains = []
        for seed in ([-1] if self.trainer in DETERMINISTIC else self.seeds):
            for shots in self.shots:
                chains += self._chains_for(seed, shots)
        return chains

    def _chains_for(self, seed: int, shots: int) -> list[list[Run]]:
        fewshot = ["DATASET.NUM_SHOTS", str(shots)]
        if self.protocol == "fewshot":
            return [[self._run("", d, d, shots, seed, fewshot, eval_only=not self.trains,
                               model_dir=self.prompt_source("", d, shots, seed))]
                    for d in self.datasets]
        if self.protocol == "base2new" and not self.source:
            chains = []
            for d in self.datasets:
                base = ["DATASET.SUBSAMPLE_CLASSES", "base"]
                new = ["DATASET.SUBSAMPLE_CLASSES", "new"]
                if self.trains:
                    train = self._run("train_base", d, d, shots, seed, fewshot + base)
                    test = self._run("test_new", d, d, shots, seed, fewshot + new, eval_only=True,
                                     model_dir=train.output_dir)
                    chains.append([train, test])
                else:
                    prompts = self.prompt_source("train_base", d, shots, seed)
                    chains.append([self._run(f"test_{sub}", d, d, shots, seed,
                                             fewshot + ["DATASET.SUBSAMPLE_CLASSES", sub], eval_only=True,
                                             model_dir=prompts)
                                   for sub in ("base", "new")])
            return chains
        # one source training, then eval-only on each target (xd, dg, base2new with --source)
        if not self.source:
            raise SystemExit(f"error: protocol {self.protocol} needs a source dataset (--source / SOURCE)")
        chain: list[Run] = []
        model_dir = self.prompt_source("train", self.source, shots, seed)
        if self.trains:
            train = self._run("train", self.source, self.source, shots, seed, fewshot)
            chain.append(train)
            model_dir = train.output_dir
        subsets = ("base", "new") if self.protocol == "base2new" else ("all",)
        for d in self.datasets:
            for sub in subsets:
                where = "test" if sub == "all" else f"test_{sub}"
                chain.append(self._run(where, d, self.source, shots, seed, ["DATASET.SUBSAMPLE_CLASSES", sub],
                                       eval_only=True, model_dir=model_dir))
        return [chain]

    def _run(self, part: str, dataset: str, trained_on: str, shots: int, seed: int, opts: list[str],
             eval_only: bool = False, model_dir: Path | None = None) -> Run:
        """A run on ``dataset`` under ``OUT/<protocol>/<part>`` with the config of its chain's
        training dataset ``trained_on``."""
        folder = self.folder(*([part] if part else []), dataset=dataset, shots=shots, seed=seed,
                             cfg=self.run_cfg(trained_on, shots))
        if self.method_name:  # a user's own TRAINER.METHOD_NAME in extra_opts comes later and wins
            opts = opts + ["TRAINER.METHOD_NAME", self.method_name]
        return Run(folder, dataset, self.plan.stem(trained_on, shots), opts + ["SEED", str(seed)], eval_only,
                   model_dir)

    def train_args(self, run: Run) -> list[str]:
        """``train.py``'s arguments for ``run`` (what a user would type after ``python train.py``)."""
        cmd = ["--trainer", self.trainer,
               "--dataset-config-file", str(REPO / "configs" / "datasets" / f"{run.dataset}.yaml"),
               "--config-file", str(config_file(self.trainer, run.cfg)),
               "--output-dir", str(run.output_dir)]
        if self.data:
            cmd += ["--root", self.data]
        if self.backbone:
            cmd += ["--backbone", self.backbone]
        if run.eval_only:
            cmd += ["--eval-only"]
            if run.model_dir is not None:
                cmd += ["--model-dir", str(run.model_dir)]
        return cmd + run.opts + self.extra_opts


def _start_worker(devices: "multiprocessing.Queue | None", threads: int) -> None:
    """Pin a sweep worker to one GPU (before CUDA starts) or to its share of the CPU cores."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()
    elif threads > 0:
        import torch
        torch.set_num_threads(threads)


def _run_chain(sweep: Sweep, chain: list[Run]) -> list[tuple[Run, str]]:
    """Run a chain inside this worker process, one ``train.py`` run after another.

    A worker imports torch and CLIP once for all its runs instead of once per run (~8 s each);
    ``launch.run`` seeds every run and restores the streams after it, so a run's result does
    not depend on what ran before it in the same process.
    """
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import datasets  # noqa: F401  (registers the datasets, as train.py does)
    import trainers  # noqa: F401  (registers the trainers)
    from selftpt import launch
    outcome = []
    for run in chain:
        if run.finished:
            outcome.append((run, "skipped (finished)"))
            continue
        state = "resumed" if run.output_dir.exists() else "ran"
        messages = io.StringIO()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), \
                contextlib.redirect_stderr(messages):
            try:
                code = launch.main(sweep.train_args(run))
            except SystemExit as exc:  # argparse's way of refusing arguments
                code = exc.code if isinstance(exc.code, int) else 2
            except Exception as exc:  # one failed run must not take the other chains down
                code = 1
                print(f"{type(exc).__name__}: {exc}", file=messages)
        if code != 0:
            last = (messages.getvalue().strip().splitlines() or ["(no message)"])[-1]
            outcome.append((run, f"FAILED: {last}"))
            break  # later runs of the chain need this one
        outcome.append((run, state))
    return outcome


def visible_devices() -> list[str]:
    """GPU ids to round-robin over: CUDA_VISIBLE_DEVICES, else every GPU torch sees, else none."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def execute(sweep: Sweep, jobs: int = 0) -> bool:
    """Run every chain in ``jobs`` worker processes; print one line per run; True if all succeeded.

    On GPUs each worker owns one device (round-robin over the visible ones); on CPU each gets
    an equal share of the cores as torch threads (small models scale better over processes
    than over threads).
    """
    chains = sweep.chains()
    devices = visible_devices()
    if jobs <= 0:  # auto: one worker per GPU, else one per CPU core
        jobs = len(devices) or os.cpu_count() or 1
    jobs = max(1, min(jobs, len(chains) or 1))
    total = sum(len(c) for c in chains)
    stems = sorted({run.cfg for chain in chains for run in chain})
    cfg = sweep.cfg if stems == [sweep.cfg] else f"{sweep.cfg} (configs {', '.join(stems)})"
    print(f"{sweep.protocol}: {sweep.trainer}/{cfg}, {total} runs in {len(chains)} chains, "
          f"{jobs} at a time{f' on GPUs {devices}' if devices else ' on CPU'}", flush=True)
    context = multiprocessing.get_context("spawn")  # no CUDA or thread state inherited from here
    queue = None
    if devices:
        queue = context.Queue()
        for i in range(jobs):
            queue.put(devices[i % len(devices)])
    threads = 0 if devices else max(1, (os.cpu_count() or 1) // jobs)
    ok = True
    done = 0
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                                     initargs=(queue, threads)) as pool:
        pending = {pool.submit(_run_chain, sweep, chain): chain for chain in chains}
        for future in futures.as_completed(pending):
            try:
                outcome = future.result()
            except futures.process.BrokenProcessPool as exc:  # a worker died (killed, out of memory)
                outcome = [(run, f"FAILED: worker process died ({exc})") for run in pending[future][:1]]
            for run, state in outcome:
                done += 1
                ok &= not state.startswith("FAILED")
                print(f"[{done}/{total}] {state}: {run.output_dir.relative_to(sweep.output)}", flush=True)
    return ok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a protocol sweep of train.py runs and skip finished ones.")
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument("--trainer", required=True)
    p.add_argument("--cfg", required=True,
                   help="a config plan of configs/plans.yaml (the config per dataset and shot count, e.g. "
                        "CoOp's paper) or a config stem under configs/trainers/<trainer>/ for every run")
    p.add_argument("--data", default="", help="dataset root ($DATA); empty = the built-in benchmark")
    p.add_argument("--datasets", nargs="+", help="dataset config stems [the protocol's, see default_datasets]")
    p.add_argument("--source", default=None,
                   help="source dataset stem (xd, dg; optional for base2new) [the protocol's]")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--shots", nargs="+", type=int, help="[16; fewshot: 1 2 4 8 16]")
    p.add_argument("--backbone", default="")
    p.add_argument("--output", default="output")
    p.add_argument("--prompts-from", default="",
                   help="<Trainer>/<cfg or plan> whose trained prompts a training-free method starts from, e.g. "
                        "CoOp/bench for TPT+CoOp (that sweep must have run in the same --output)")
    p.add_argument("--jobs", type=int, default=0,
                   help="worker processes; 0 = one per GPU, else one per CPU core [0]")
    p.epilog = "Extra KEY VALUE config options for train.py go after a '--'."
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.opts = opts
    source, targets = default_datasets(args.protocol, args.data)
    args.source = source if args.source is None else args.source
    args.datasets = args.datasets or targets
    args.shots = args.shots or ([1, 2, 4, 8, 16] if args.protocol == "fewshot" else [16])
    for stem in [*args.datasets, *([args.source] if args.source else [])]:
        if not (REPO / "configs" / "datasets" / f"{stem}.yaml").is_file():
            known = sorted(p.stem for p in (REPO / "configs" / "datasets").glob("*.yaml"))
            print(f"error: no dataset config configs/datasets/{stem}.yaml (known: {', '.join(known)})", file=sys.stderr)
            return 2
    try:
        sweep = Sweep(args.protocol, args.trainer, args.cfg, args.data, args.datasets, args.seeds, args.shots,
                      Path(args.output).resolve(), args.source, args.backbone, list(args.opts or []),
                      args.prompts_from)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = sweep.missing_prompt_sources()
    if missing:
        trainer = args.prompts_from.split("/")[0]
        print(f"error: {len(missing)} {args.prompts_from} run(s) that --prompts-from needs have not finished, "
              f"e.g. {missing[0]}; run that method's {args.protocol} sweep with the same output, seeds and "
              f"shots first (e.g. CFG={args.prompts_from.split('/')[1]} bash scripts/{trainer.lower()}/"
              f"{args.protocol}.sh)", file=sys.stderr)
        return 2
    return 0 if execute(sweep, args.jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
