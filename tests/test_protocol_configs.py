"""The paper protocols' configs, as the sweeps resolve them (no training: config resolution only).

Every config is read the way a run reads it: the sweep's ``train_args`` for the run, merged by
``selftpt.launch.setup_cfg`` (Dassl defaults < project keys < dataset file < method file < opts).
The published settings are pinned so that an edit to a config or to configs/plans.yaml cannot
drift from them silently.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import trainers  # noqa: F401  (registers the trainers: a sweep plans from their TRAINS, DETERMINISTIC)
from selftpt import collect, tables
from selftpt.launch import build_parser, setup_cfg
from selftpt.results import make_record, write_results
from selftpt.sweep import (
    PROTOCOLS,
    PlanError,
    Run,
    Sweep,
    config_file,
    current_stems,
    default_datasets,
    load_plans,
    protocol_defaults,
    resolve_plan,
)
from selftpt.sweep import main as sweep_main

REPO = Path(__file__).resolve().parents[1]
PAPER_ELEVEN = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
SHOTS = (1, 2, 4, 8, 16)
# CoOp paper (COOP.md): epochs per shot count; ImageNet trains 50 epochs at every shot count.
COOP_FEWSHOT_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}


def paper_cfg(method_dir: str) -> str:
    """PAPER_CFG of scripts/<method_dir>/method.sh: what the scripts run when DATA is set."""
    text = (REPO / "scripts" / method_dir / "method.sh").read_text()
    return re.search(r"\bPAPER_CFG=(\S+)", text).group(1)


def paper_sweep(protocol: str, trainer: str, cfg: str, **kw) -> Sweep:
    """The sweep the scripts build with ``DATA`` set: the paper's datasets and shot counts."""
    source, targets = default_datasets(protocol, "/data")
    args = dict(data="/data", datasets=targets, seeds=[1], output=Path("/o"), source=source,
                shots=list(SHOTS) if protocol == "fewshot" else [16])
    args.update(kw)
    return Sweep(protocol=protocol, trainer=trainer, cfg=cfg, **args)


def merged(sweep: Sweep, run: Run):
    """The frozen config of ``run`` exactly as train.py builds it."""
    return setup_cfg(build_parser().parse_args(sweep.train_args(run)))


def config_arg(sweep: Sweep, run: Run) -> Path:
    args = sweep.train_args(run)
    return Path(args[args.index("--config-file") + 1])


def assert_coop_optimisation(cfg) -> None:
    """CoOp's published recipe: SGD lr 0.002, batch 32, cosine, 1 constant warm-up epoch at 1e-5."""
    assert cfg.OPTIM.NAME == "sgd" and cfg.OPTIM.LR == 0.002 and cfg.OPTIM.LR_SCHEDULER == "cosine"
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 32
    assert (cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR) == (1, "constant", 1e-5)
    assert cfg.MODEL.BACKBONE.NAME == "ViT-B/16" and tuple(cfg.INPUT.SIZE) == (224, 224)
    assert cfg.TRAINER.COOP.CSC is False and cfg.TRAINER.COOP.CLASS_TOKEN_POSITION == "end"


# --------------------------------------------------------------------------- CoOp base-to-new


def test_coop_base2new_follows_cocoop_paper_200_epochs_imagenet_50():
    sweep = paper_sweep("base2new", "CoOp", paper_cfg("coop"))
    chains = sweep.chains()
    assert sorted(train.dataset for train, _ in chains) == sorted(PAPER_ELEVEN)
    for train, test in chains:
        expected = "vit_b16_ep50_ctxv1" if train.dataset == "imagenet" else "vit_b16_ctxv1"
        cfg = merged(sweep, train)
        assert cfg.OPTIM.MAX_EPOCH == (50 if train.dataset == "imagenet" else 200), train.dataset
        assert cfg.TRAINER.COOP.CTX_INIT == "a photo of a" and cfg.TRAINER.COOP.N_CTX == 4
        assert_coop_optimisation(cfg)
        # the config is named in the arguments and in both folders; the test run evaluates with it
        assert config_arg(sweep, train) == config_arg(sweep, test) == config_file("CoOp", expected)
        assert train.output_dir == Path(f"/o/base2new/train_base/{train.dataset}/shots_16/CoOp/{expected}/seed1")
        assert test.output_dir == Path(f"/o/base2new/test_new/{train.dataset}/shots_16/CoOp/{expected}/seed1")
        assert test.model_dir == train.output_dir
        assert merged(sweep, test).OPTIM.MAX_EPOCH == cfg.OPTIM.MAX_EPOCH


def test_coop_cross_dataset_trains_imagenet_50_epochs_and_tests_with_that_config():
    for protocol in ("xd", "dg"):
        sweep = paper_sweep(protocol, "CoOp", paper_cfg("coop"))
        (train, *tests), = sweep.chains()
        assert train.dataset == "imagenet" and merged(sweep, train).OPTIM.MAX_EPOCH == 50
        assert {config_arg(sweep, r) for r in [train, *tests]} == {config_file("CoOp", "vit_b16_ep50_ctxv1")}
        assert all(t.output_dir.parent.name == "vit_b16_ep50_ctxv1" for t in tests)


# --------------------------------------------------------------------------- CoOp few-shot


def test_coop_fewshot_follows_the_coop_paper_per_shot_count():
    sweep = paper_sweep("fewshot", "CoOp", paper_cfg("coop"))
    runs = [run for chain in sweep.chains() for run in chain]
    seen = {(run.dataset, int(run.opts[run.opts.index("DATASET.NUM_SHOTS") + 1])) for run in runs}
    assert seen == {(d, k) for d in PAPER_ELEVEN for k in SHOTS}
    for run in runs:
        shots = int(run.opts[run.opts.index("DATASET.NUM_SHOTS") + 1])
        cfg = merged(sweep, run)
        epochs = 50 if run.dataset == "imagenet" else COOP_FEWSHOT_EPOCHS[shots]
        assert (cfg.DATASET.NUM_SHOTS, cfg.OPTIM.MAX_EPOCH) == (shots, epochs), (run.dataset, shots)
        assert cfg.TRAINER.COOP.N_CTX == 16 and cfg.TRAINER.COOP.CTX_INIT == ""
        assert_coop_optimisation(cfg)
        stem = config_arg(sweep, run).stem
        assert stem == {50: "vit_b16_ep50", 100: "vit_b16_ep100", 200: "vit_b16"}[epochs]
        assert run.output_dir == Path(f"/o/fewshot/{run.dataset}/shots_{shots}/CoOp/{stem}/seed1")


def test_an_explicit_config_applies_to_every_run():
    sweep = paper_sweep("fewshot", "CoOp", "vit_b16_ep50_ctxv1")
    runs = [run for chain in sweep.chains() for run in chain]
    assert {config_arg(sweep, r) for r in runs} == {config_file("CoOp", "vit_b16_ep50_ctxv1")}
    assert {r.output_dir.parent.name for r in runs} == {"vit_b16_ep50_ctxv1"}


# --------------------------------------------------------------------------- TPT+CoOp


def test_tpt_plus_coop_finds_coop_runs_through_a_plan_or_a_config():
    coop = paper_sweep("base2new", "CoOp", "paper", datasets=["imagenet", "caltech101"])
    coop_dirs = {train.dataset: train.output_dir for train, _ in coop.chains()}
    tpt = paper_sweep("base2new", "TPT", paper_cfg("tpt"), prompts_from="CoOp/paper",
                      datasets=["imagenet", "caltech101"])
    for base, new in tpt.chains():
        assert base.model_dir == new.model_dir == coop_dirs[base.dataset]
        coop_stem = coop_dirs[base.dataset].parent.name
        assert base.output_dir.parent.name == f"vit_b16+CoOp-{coop_stem}"
        assert config_arg(tpt, base) == config_file("TPT", "vit_b16")
    # the README's way: CoOp run with CFG=vit_b16_ep50_ctxv1, TPT with PROMPTS_FROM=CoOp/vit_b16_ep50_ctxv1
    coop = paper_sweep("base2new", "CoOp", "vit_b16_ep50_ctxv1", datasets=["caltech101"])
    tpt = paper_sweep("base2new", "TPT", "vit_b16", prompts_from="CoOp/vit_b16_ep50_ctxv1", datasets=["caltech101"])
    ((train, _),), ((base, _),) = coop.chains(), tpt.chains()
    assert base.model_dir == train.output_dir and base.output_dir.parent.name == "vit_b16+CoOp-vit_b16_ep50_ctxv1"


# --------------------------------------------------------------------------- errors


def test_unknown_plan_or_config_is_one_line_before_any_work(tmp_path, capsys):
    code = sweep_main(["base2new", "--trainer", "CoOp", "--cfg", "papr", "--data", str(tmp_path),
                       "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: no config configs/trainers/CoOp/papr.yaml and no plan CoOp/papr") and "paper" in err
    code = sweep_main(["fewshot", "--trainer", "TPT", "--cfg", "vit_b16", "--data", str(tmp_path),
                       "--prompts-from", "CoOp/papr", "--output", str(tmp_path / "out")])
    assert code == 2 and "no plan CoOp/papr" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_script_with_an_unknown_cfg_exits_2(tmp_path):
    env = dict(os.environ, DATA=str(tmp_path), CFG="papr", OUTPUT=str(tmp_path / "out"), TABLE="0",
               PYTHON=sys.executable)
    out = subprocess.run(["bash", "scripts/coop/fewshot.sh"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: no config") and not (tmp_path / "out").exists()


def write_plans(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plans.yaml"
    path.write_text(text)
    return path


def test_broken_plans_are_refused(tmp_path):
    cases = {
        "CoOp: {p: {fewshot: {default: vit_b16_ep7}}}": "no config configs/trainers/CoOp/vit_b16_ep7.yaml",
        "CoOp: {p: {fewshot: {default: vit_b16, datasets: {imagenett: vit_b16}}}}": "configs/datasets/imagenett",
        "CoOp: {p: {fewshot: {default: vit_b16, shot: {1: vit_b16}}}}": "got keys default, shot",
        "CoOp: {p: {base2new: {default: vit_b16}}}": "no entry for protocol fewshot (it has: base2new)",
        "CoOp: {vit_b16: {fewshot: {default: vit_b16}}}": "is both a config",
    }
    for text, message in cases.items():
        name = "vit_b16" if "vit_b16: {fewshot" in text else "p"
        with pytest.raises(PlanError, match=re.escape(message)):
            resolve_plan("CoOp", name, "fewshot", write_plans(tmp_path, text))


def test_every_shipped_plan_resolves_for_every_protocol_it_lists():
    plans = load_plans()
    assert "paper" in plans["CoOp"]
    for trainer, by_name in plans.items():
        for name, by_protocol in by_name.items():
            for protocol in by_protocol:
                assert resolve_plan(trainer, name, protocol).stems


def test_every_methods_paper_setting_resolves_for_every_protocol_script_it_has():
    """DATA set: each scripts/<method>/<protocol>.sh runs its PAPER_CFG (a plan or one config)."""
    for method in sorted(p.parent for p in (REPO / "scripts").glob("*/method.sh")):
        trainer = re.search(r"\bTRAINER=(\S+)", (method / "method.sh").read_text()).group(1)
        for script in method.glob("*.sh"):
            if script.stem in PROTOCOLS:
                assert resolve_plan(trainer, paper_cfg(method.name), script.stem).stems, script


# --------------------------------------------------------------------------- tables


def test_a_plan_sweep_is_one_method_row_in_the_tables(tmp_path):
    """Runs of one plan sit under different <cfg> folders; the tables still show one CoOp row
    (per shot count in the few-shot table), with no mixed-config warning."""
    acc = iter(range(40, 100))
    for protocol, datasets in (("base2new", ["imagenet", "caltech101"]), ("fewshot", ["imagenet", "dtd"])):
        sweep = paper_sweep(protocol, "CoOp", "paper", datasets=datasets, seeds=[1, 2], output=tmp_path,
                            shots=[1, 16] if protocol == "fewshot" else [16])
        for chain in sweep.chains():
            for run in chain:
                write_results(run.output_dir, make_record(merged(sweep, run), {"accuracy": float(next(acc))}, 10))
    stems = {p.parent.parent.name for p in tmp_path.rglob("results.json")}
    assert stems == {"vit_b16_ctxv1", "vit_b16_ep50_ctxv1", "vit_b16_ep50", "vit_b16"}
    tabs, notes = tables.build_tables(collect.collect_runs([tmp_path]).runs, seeds=(1, 2))
    assert not notes
    by_title = {t.title: t for t in tabs}
    assert set(by_title) == {"base2new", "fewshot"}
    assert list(by_title["base2new"].headline) == ["CoOp"]
    assert sorted(by_title["fewshot"].headline) == ["CoOp (1-shot)", "CoOp (16-shot)"]
    seed_cells = [r for t in tabs for r in t.records
                  if r["metric"] in ("base", "new", "accuracy") and r["dataset"] not in ("Average", "Mean")]
    assert len(seed_cells) == 2 * 2 + 2 * 2 and all(r["n_seeds"] == 2 for r in seed_cells)


# --------------------------------------------------------------------------- other methods, pinned


@pytest.mark.parametrize("method_dir, trainer, stem, node, epochs, n_ctx, lr, batch", [
    ("selftpt", "SelfTPT", "vit_b16_c4_ep10", "SELFTPT", 10, 4, 0.002, 32),
    ("cocoop", "CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1", "COCOOP", 10, 4, 0.002, 1),
])
def test_paper_configs_of_the_trained_methods_are_pinned(method_dir, trainer, stem, node, epochs, n_ctx, lr, batch):
    assert paper_cfg(method_dir) == stem
    for protocol in ("base2new", "fewshot", "xd", "dg"):
        sweep = paper_sweep(protocol, trainer, stem, shots=[16])
        for run in {r.output_dir: r for chain in sweep.chains() for r in chain}.values():
            cfg = merged(sweep, run)
            assert config_arg(sweep, run) == config_file(trainer, stem)
            assert (cfg.OPTIM.MAX_EPOCH, cfg.OPTIM.LR, cfg.DATALOADER.TRAIN_X.BATCH_SIZE) == (epochs, lr, batch)
            assert (cfg.TRAINER[node].N_CTX, cfg.TRAINER[node].CTX_INIT) == (n_ctx, "a photo of a")
            assert cfg.OPTIM.NAME == "sgd" and cfg.MODEL.BACKBONE.NAME == "ViT-B/16"


def test_tpt_paper_config_is_pinned():
    assert paper_cfg("tpt") == "vit_b16"
    sweep = paper_sweep("base2new", "TPT", "vit_b16")
    for base, new in sweep.chains():
        cfg = merged(sweep, base)
        assert config_arg(sweep, base) == config_arg(sweep, new) == config_file("TPT", "vit_b16")
        tpt = cfg.TRAINER.TPT
        assert (tpt.N_CTX, tpt.CTX_INIT, tpt.N_VIEWS, tpt.SELECTION_P, tpt.STEPS, tpt.LR) == \
            (4, "a photo of a", 64, 0.1, 1, 0.005)
        assert cfg.DATALOADER.TEST.BATCH_SIZE == 1 and cfg.MODEL.BACKBONE.NAME == "ViT-B/16"


# --------------------------------------------------------------------------- the protocol registry


def test_paper_defaults_of_every_protocol():
    assert PROTOCOLS == ("base2new", "xd", "dg", "fewshot")
    assert default_datasets("base2new", "/data") == default_datasets("fewshot", "/data") == ("", list(PAPER_ELEVEN))
    assert default_datasets("xd", "/data") == ("imagenet", list(PAPER_ELEVEN[1:]))
    assert [protocol_defaults(p, "/data").shots for p in PROTOCOLS] == [(16,), (16,), (16,), (1, 2, 4, 8, 16)]
    assert {protocol_defaults(p, d).backbone for p in PROTOCOLS for d in ("", "/data")} == {"Bench-RN-S", "ViT-B/16"}


def test_protocol_names_aliases_and_table_order():
    from selftpt.protocols import folder_names, get_protocol

    # folder names of CoOp-family layouts and this project's older benchmark names
    assert folder_names() == {"base2new": "base2new", "base2novel": "base2new", "xd": "xd", "cross_dataset": "xd",
                              "crossdataset": "xd", "dg": "dg", "domain_generalization": "dg",
                              "fewshot": "fewshot", "few_shot": "fewshot"}
    assert get_protocol("Cross_Dataset").name == "xd"
    with pytest.raises(KeyError, match="unknown protocol 'b2n'"):
        get_protocol("b2n")
    assert collect._PROTOCOL_DIRS == folder_names()
    assert tables._PROTOCOL_ORDER == (*PROTOCOLS, "")


def test_a_new_protocol_is_one_class(monkeypatch):
    """A registered class is all the sweep needs: its defaults, shots and chains."""
    from selftpt import protocols

    monkeypatch.setattr(protocols, "PROTOCOLS", dict(protocols.PROTOCOLS))

    @protocols.register
    class TrainOnly(protocols.Protocol):
        name = "trainonly"
        target_role = "base2new"
        shots = (2,)

        def chains(self, sweep, seed, shots):
            return [[sweep.make_run("", d, d, shots, seed, ["DATASET.NUM_SHOTS", str(shots)])] for d in sweep.datasets]

    defaults = protocols.get_protocol("trainonly").defaults("benchmark")
    assert defaults.shots == (2,) and defaults.targets == ("shapeworld", "moreshapes", "shapepatterns", "fashion_mnist")
    sweep = Sweep(protocol="trainonly", trainer="CoOp", cfg="bench", data="", datasets=["shapeworld"], seeds=[1],
                  shots=[2], output=Path("/o"))
    (run,), = sweep.chains()
    assert run.output_dir == Path("/o/trainonly/shapeworld/shots_2/CoOp/bench/seed1") and not run.eval_only


def test_renamed_dataset_stem_is_accepted_with_a_note(tmp_path, capsys):
    assert current_stems(["imagenetv2", "imagenet_sketch"]) == ["imagenet_v2", "imagenet_sketch"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset config imagenetv2 is now imagenet_v2" in err
    # the sweep takes it (the run stops later, at the unknown config, before any work)
    assert sweep_main(["dg", "--trainer", "CoOp", "--cfg", "nope", "--data", str(tmp_path),
                       "--datasets", "imagenetv2", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is now imagenet_v2" in err and "no dataset config" not in err and "nope" in err
