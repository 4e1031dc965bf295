"""scripts/<method>/<protocol>.sh end to end on the built-in benchmark (CI-sized), and sweeps."""
import json
import os
import subprocess
from pathlib import Path

import pytest

import trainers  # noqa: F401  (registers the trainers: a sweep plans from their TRAINS, DETERMINISTIC)
from selftpt.sweep import PlanError, Sweep, default_datasets

REPO = Path(__file__).resolve().parents[1]


def sweep(protocol="base2new", trainer="SelfTPT", **kw):
    args = dict(cfg="bench", data="", datasets=["shapeworld"], seeds=[1], shots=[2], output=Path("/o"))
    args.update(kw)
    return Sweep(protocol=protocol, trainer=trainer, **args)


def test_base2new_never_reuses_the_training_folder_for_new_classes():
    (train, test), = sweep().chains()
    assert "train_base" in train.output_dir.parts and "test_new" in test.output_dir.parts
    assert test.eval_only and test.model_dir == train.output_dir
    assert ["DATASET.SUBSAMPLE_CLASSES", "new"] == test.opts[2:4]
    assert str(train.output_dir).endswith("base2new/train_base/shapeworld/shots_2/SelfTPT/bench/seed1")


def test_training_free_methods_are_evaluated_on_base_and_new():
    (base, new), = sweep(trainer="TPT").chains()
    assert base.eval_only and new.eval_only and base.model_dir is None
    assert "test_base" in base.output_dir.parts and "test_new" in new.output_dir.parts


def test_tpt_plus_coop_starts_each_test_from_the_matching_coop_run(tmp_path):
    tpt = sweep(trainer="TPT", prompts_from="CoOp/bench", seeds=[2], output=tmp_path)
    (base, new), = tpt.chains()
    coop = tmp_path / "base2new/train_base/shapeworld/shots_2/CoOp/bench/seed2"
    assert base.model_dir == new.model_dir == coop
    assert base.output_dir.parent.name == "bench+CoOp-bench"  # never plain TPT's folder
    assert base.opts[-4:] == ["TRAINER.METHOD_NAME", "TPT+CoOp", "SEED", "2"]
    assert tpt.missing_prompt_sources() == [coop]
    coop.mkdir(parents=True)
    (coop / "results.json").write_text("{}")
    assert tpt.missing_prompt_sources() == []
    (run,), = sweep("xd", trainer="TPT", prompts_from="CoOp/bench", source="shapeworld",
                    datasets=["moreshapes"]).chains()
    assert run.model_dir == Path("/o/xd/train/shapeworld/shots_2/CoOp/bench/seed1")
    with pytest.raises(PlanError, match="training-free"):
        sweep(trainer="CoOp", prompts_from="CoOp/bench")


@pytest.mark.parametrize("trainer, name", [("MaPLeTPT", "MaPLe+TPT"), ("PromptAlign", "PromptAlign"),
                                           ("PromptSRCTPT", "PromptSRC+TPT")])
def test_runs_from_another_methods_prompts_are_named_as_the_papers_row(trainer, name):
    source = "PromptSRC" if trainer == "PromptSRCTPT" else "MaPLe"
    (base, _), = sweep(trainer=trainer, prompts_from=f"{source}/bench").chains()
    assert base.opts[-4:] == ["TRAINER.METHOD_NAME", name, "SEED", "1"]
    (base, _), = sweep(trainer=trainer).chains()  # from no trained prompts: not the paper's row
    assert "TRAINER.METHOD_NAME" not in base.opts


def test_cross_dataset_trains_once_per_seed_then_tests_every_target():
    source, targets = default_datasets("xd", "")
    chains = sweep("xd", datasets=targets, source=source, seeds=[1, 2]).chains()
    assert len(chains) == 2 and all(len(c) == 1 + len(targets) for c in chains)
    train, *tests = chains[0]
    assert not train.eval_only and all(t.model_dir == train.output_dir for t in tests)
    assert default_datasets("dg", "/data") == ("imagenet", ["imagenet_v2", "imagenet_sketch", "imagenet_a",
                                                            "imagenet_r"])


def script_env(tmp_path, **settings):
    """Environment for scripts/*: DATA unset (the built-in benchmark, generated under SELFTPT_DATA)."""
    env = dict(os.environ, SELFTPT_DATA=str(tmp_path / "data"), OUTPUT=str(tmp_path / "out"),
               PYTHON=os.environ.get("PYTHON", "python"), **settings)
    env.pop("DATA", None)
    env["PATH"] = f"{Path(os.sys.executable).parent}:{env['PATH']}"
    return env


def base_and_new(out, trainer, shots=1):
    """(base, new) results of one seed-1 base-to-new run on ShapeWorld."""
    return tuple(json.loads((out / f"base2new/{part}/shapeworld/shots_{shots}/{trainer}/bench/seed1/results.json")
                            .read_text()) for part in ("train_base", "test_new"))


def test_selftpt_base2new_script_runs_skips_and_prints_the_table(tmp_path):
    env = script_env(tmp_path, DATASETS="shapeworld", SEEDS="1", SHOTS="1")
    cmd = ["bash", "scripts/selftpt/base2new.sh", "OPTIM.MAX_EPOCH", "1", "TRAINER.SELFTPT.TTA_STEPS", "2"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[1/2] ran" in first.stdout and "[2/2] ran" in first.stdout
    assert "ShapeWorld" in first.stdout and "HM" in first.stdout  # the closing table
    base_rec, new_rec = base_and_new(tmp_path / "out", "SelfTPT")
    assert base_rec["subsample_classes"] == "base" and new_rec["subsample_classes"] == "new"
    chance = 100 / 32  # ShapeWorld: 32 classes in each half
    assert base_rec["metrics"]["accuracy"] > 2 * chance and new_rec["metrics"]["accuracy"] > 2 * chance
    run = tmp_path / "out/base2new/train_base/shapeworld/shots_1/SelfTPT/bench/seed1"
    stamp = (run / "results.json").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("skipped (finished)") == 2
    assert (run / "results.json").stat().st_mtime_ns == stamp  # nothing finished is rewritten


def test_coop_then_tpt_plus_coop_on_the_benchmark(tmp_path):
    # the CI-sized base-to-new run of CoOp, then TPT started from its prompts (2 views, 1 step)
    env = script_env(tmp_path, DATASETS="shapeworld", SEEDS="1", SHOTS="1", TABLE="0")
    coop = subprocess.run(["bash", "scripts/coop/base2new.sh", "OPTIM.MAX_EPOCH", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert coop.returncode == 0, coop.stdout + coop.stderr
    base_rec, new_rec = base_and_new(tmp_path / "out", "CoOp")
    chance = 100 / 32
    assert base_rec["metrics"]["accuracy"] > 2 * chance and new_rec["metrics"]["accuracy"] > 2 * chance
    env.update(PROMPTS_FROM="CoOp/bench", TABLE="1")
    tpt = subprocess.run(["bash", "scripts/tpt/base2new.sh", "DATASET.NUM_SHOTS", "1", "TRAINER.TPT.N_VIEWS", "2",
                          "TEST.SPLIT", "val"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert tpt.returncode == 0, tpt.stdout + tpt.stderr
    assert "TPT+CoOp" in tpt.stdout  # its own row in the closing table
    rec = json.loads(next((tmp_path / "out/base2new/test_base").rglob("TPT/*/seed1/results.json")).read_text())
    assert rec["method"] == "TPT+CoOp"


@pytest.mark.parametrize("trainer, then", [("MaPLe", "PromptAlign"), ("PromptSRC", "PromptSRCTPT")])
def test_deep_prompt_methods_run_on_the_benchmarks_vit(tmp_path, trainer, then):
    # the deep-prompt bench configs name Bench-ViT-S: the CI-sized base-to-new run of MaPLe or
    # PromptSRC, then its test-time variant from those prompts (2 views, 1 step, on the val split)
    env = script_env(tmp_path, DATASETS="shapeworld", SEEDS="1", SHOTS="1", TABLE="0")
    script = {"MaPLe": "maple", "PromptSRC": "promptsrc"}[trainer]
    first = subprocess.run(["bash", f"scripts/{script}/base2new.sh", "OPTIM.MAX_EPOCH", "1"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    base_rec, new_rec = base_and_new(tmp_path / "out", trainer)
    assert base_rec["backbone"] == new_rec["backbone"] == "Bench-ViT-S"
    chance = 100 / 32
    assert base_rec["metrics"]["accuracy"] > 2 * chance and new_rec["metrics"]["accuracy"] > 2 * chance
    env.update(PROMPTS_FROM=f"{trainer}/bench")
    then_script, views = {"PromptAlign": ("promptalign", "TRAINER.PROMPTALIGN.N_VIEWS"),
                          "PromptSRCTPT": ("promptsrc_tpt", "TRAINER.PROMPTSRC_TPT.N_VIEWS")}[then]
    second = subprocess.run(["bash", f"scripts/{then_script}/base2new.sh", "DATASET.NUM_SHOTS", "1", views, "2",
                             "TEST.SPLIT", "val"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    rec = json.loads(next((tmp_path / "out/base2new/test_base").rglob(f"{then}/*/seed1/results.json")).read_text())
    assert rec["backbone"] == "Bench-ViT-S" and rec["metrics"]["accuracy"] > 2 * chance


def test_script_help_and_unknown_dataset():
    out = subprocess.run(["bash", "scripts/coop/xd.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "SEEDS" in out.stdout and "xd" in out.stdout
    env = dict(os.environ, DATASETS="shapewrld", PYTHON=os.environ.get("PYTHON", "python"))
    env["PATH"] = f"{Path(os.sys.executable).parent}:{env['PATH']}"
    bad = subprocess.run(["bash", "scripts/coop/base2new.sh"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "configs/datasets/shapewrld.yaml" in bad.stderr


def test_zero_shot_clip_runs_once_unseeded():
    chains = sweep(trainer="ZeroshotCLIP", seeds=[1, 2, 3]).chains()
    assert len(chains) == 1 and all(r.output_dir.name == "unseeded" and r.opts[-2:] == ["SEED", "-1"]
                                     for r in chains[0])


def test_failed_run_is_reported_in_one_line_and_the_sweep_fails(tmp_path, capsys):
    from selftpt.sweep import main as sweep_main
    code = sweep_main(["base2new", "--trainer", "CoOp", "--cfg", "bench", "--datasets", "shapeworld",
                       "--seeds", "1", "--output", str(tmp_path), "--jobs", "1", "--", "OPTIM.LRR", "0.1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "[1/2] FAILED: error: Command-line option: Non-existent key: OPTIM.LRR (did you mean OPTIM.LR?)" in out
    assert "[2/2]" not in out  # the chain stops: its test run needs the training run
    assert not list(tmp_path.rglob("results.json"))


def offline_without_fashion_mnist(env, tmp_path):
    """``env`` as on a fresh machine without Debian's Fashion-MNIST and without internet: the
    package's folder is an empty one, and every download goes to a closed local port."""
    env.pop("SELFTPT_FASHION_MNIST", None)
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    (tmp_path / "no_package").mkdir(exist_ok=True)
    env["SELFTPT_FASHION_MNIST_SYSTEM_DIR"] = str(tmp_path / "no_package")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"
    return env


def test_main_job_without_fashion_mnist_leaves_it_out_with_one_note(tmp_path):
    env = offline_without_fashion_mnist(script_env(tmp_path, DRY_RUN="1", SEEDS="1", METHODS="zsclip coop"),
                                        tmp_path)
    env.pop("DATASETS", None)
    job = subprocess.run(["bash", "scripts/main.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert job.returncode == 0, job.stdout + job.stderr
    notes = [line for line in job.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: FashionMNIST left out of the default datasets")
    assert "apt-get install dataset-fashion-mnist" in notes[0]
    assert "fashion_mnist" not in job.stdout and "FAILED" not in job.stdout
    for dataset in ("shapeworld", "moreshapes", "shapepatterns"):
        assert f"train_base/{dataset}/shots_16/CoOp/bench/seed1" in job.stdout
        assert f"test_new/{dataset}/shots_16/ZeroshotCLIP/bench/unseeded" in job.stdout
    # named explicitly, it is an error saying how to get the files, before anything is planned
    env["DATASETS"] = "shapeworld fashion_mnist"
    named = subprocess.run(["bash", "scripts/main.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert named.returncode == 2 and "===" not in named.stdout
    errors = [line for line in named.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "FashionMNIST (fashion_mnist) cannot be generated" in errors[0]
    assert "apt-get install dataset-fashion-mnist" in errors[0] and "$SELFTPT_FASHION_MNIST" in errors[0]


def _fail_download(*args, **kwargs):
    raise RuntimeError("offline (test)")


@pytest.mark.parametrize("protocol", ["base2new", "xd"])
def test_sweep_defaults_leave_out_a_missing_fashion_mnist(tmp_path, monkeypatch, capsys, protocol):
    import torchvision

    from selftpt.benchmark import fashion
    from selftpt.sweep import main as sweep_main

    monkeypatch.delenv(fashion.ENV_VAR, raising=False)
    monkeypatch.setenv(fashion.SYSTEM_DIR_ENV, str(tmp_path / "no_package"))
    monkeypatch.setenv("SELFTPT_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", _fail_download)
    args = [protocol, "--trainer", "CoOp", "--cfg", "bench", "--seeds", "1", "--output", str(tmp_path / "out"),
            "--dry-run"]
    assert sweep_main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("note: FashionMNIST left out of the default datasets") == 1
    assert "offline (test)" in captured.err
    assert "fashion_mnist" not in captured.out and "moreshapes" in captured.out
    assert sweep_main([*args, "--datasets", "moreshapes", "fashion_mnist"]) == 2  # named: an error
    err = capsys.readouterr().err
    assert "error: FashionMNIST (fashion_mnist) cannot be generated" in err and "apt-get install" in err
    # with the files there (here: a folder holding the four names), the defaults are unchanged
    package = tmp_path / "package"
    package.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (package / stem).write_bytes(b"")
    monkeypatch.setenv(fashion.SYSTEM_DIR_ENV, str(package))
    assert sweep_main(args) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err and "fashion_mnist" in captured.out
    # a wrong $SELFTPT_FASHION_MNIST is the user's choice: an error naming it, never a quiet skip
    monkeypatch.setenv(fashion.ENV_VAR, str(tmp_path / "wrong"))
    assert sweep_main(args) == 2
    assert f"$SELFTPT_FASHION_MNIST is set, but no such folder: {tmp_path / 'wrong'}" in capsys.readouterr().err
