"""train.py end to end on TinyShapes: CoOp-compatible flags, results, resume and bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import trainers  # noqa: F401  (registers the trainers)
from selftpt.launch import build_parser, main, setup_cfg
from tests.helpers import tiny_opts

REPO = Path(__file__).resolve().parents[1]


def run_cli(args, capsys=None):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err if capsys else ""
    return code, err


def results(folder):
    return json.loads((Path(folder) / "results.json").read_text())


@pytest.fixture
def coop_run(tmp_path, tiny_data_root, tiny_clip_path):
    out = tmp_path / "coop"
    opts = tiny_opts(tiny_data_root, tiny_clip_path, "CoOp") + ["TRAINER.COOP.N_CTX", "4"]
    assert run_cli(["--output-dir", out, "--seed", 1, *opts])[0] == 0
    return out, opts


def test_coop_trains_writes_checkpoints_and_results(coop_run):
    out, _ = coop_run
    assert (out / "prompt_learner" / "model.pth.tar-2").is_file()
    assert (out / "prompt_learner" / "checkpoint").read_text().strip() == "model.pth.tar-2"
    rec = results(out)
    assert rec["trainer"] == "CoOp" and rec["seed"] == 1 and rec["dataset"] == "TinyShapes"
    assert set(rec["metrics"]) >= {"accuracy", "macro_f1", "ece"} and rec["extra"]["split_evaluated"] == "test"
    log = (out / "log.txt").read_text()
    assert "Finish training" in log and "Evaluate on the *test* set" in log and "* accuracy:" in log
    losses = [float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if line.startswith("epoch [")]
    assert losses[-1] < losses[0]  # the prompt learns


def test_runs_in_one_process_do_not_leak_into_each_other(coop_run, tmp_path):
    # sweep workers run many train.py runs in one process: a rerun after another seed's run
    # must give exactly the first run's result (seeding, streams and caches are per run)
    out, opts = coop_run
    assert run_cli(["--output-dir", tmp_path / "seed2", "--seed", 2, *opts])[0] == 0
    assert run_cli(["--output-dir", tmp_path / "again", "--seed", 1, *opts])[0] == 0
    first, again = results(out)["metrics"], results(tmp_path / "again")["metrics"]
    assert again == first
    assert (out / "log.txt").read_text().count("Finish training") == 1  # later runs never wrote into it


def test_eval_only_reproduces_the_training_run(coop_run, tmp_path):
    out, opts = coop_run
    code, _ = run_cli(["--output-dir", tmp_path / "eval", "--seed", 1, "--eval-only",
                       "--model-dir", out, "--load-epoch", 2, *opts])
    assert code == 0
    trained, evaluated = results(out)["metrics"], results(tmp_path / "eval")["metrics"]
    assert evaluated["accuracy"] == trained["accuracy"]
    assert evaluated["ece"] == pytest.approx(trained["ece"], abs=1e-9)  # same logits


def test_finished_output_dir_is_never_overwritten(coop_run, capsys):
    out, opts = coop_run
    before = (out / "results.json").read_bytes()
    code, err = run_cli(["--output-dir", out, "--seed", 1, *opts], capsys)
    assert code == 2 and "already holds a finished run" in err
    assert (out / "results.json").read_bytes() == before


def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_data_root, tiny_clip_path, monkeypatch):
    from trainers.coop import CoOp
    opts = tiny_opts(tiny_data_root, tiny_clip_path, "CoOp") + [
        "TRAINER.COOP.N_CTX", "4", "TRAIN.CHECKPOINT_FREQ", "1", "OPTIM.MAX_EPOCH", "3"]
    assert run_cli(["--output-dir", tmp_path / "full", "--seed", 2, *opts])[0] == 0

    original = CoOp.after_epoch

    def crash_after_first_epoch(self):
        original(self)
        if self.epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(CoOp, "after_epoch", crash_after_first_epoch)
    assert run_cli(["--output-dir", tmp_path / "cut", "--seed", 2, *opts])[0] == 130  # Ctrl-C: exit 130
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(CoOp, "after_epoch", original)
    assert run_cli(["--output-dir", tmp_path / "cut", "--seed", 2, *opts])[0] == 0
    assert results(tmp_path / "cut")["metrics"] == results(tmp_path / "full")["metrics"]
    # the interrupted run's log is kept aside; log.txt is the run that finished
    assert any(p.name.startswith("log.txt-") for p in (tmp_path / "cut").iterdir())
    assert "Results written" in (tmp_path / "cut" / "log.txt").read_text()


def test_zeroshot_clip_evaluates_without_training(tmp_path, tiny_data_root, tiny_clip_path):
    out = tmp_path / "zs"
    assert run_cli(["--output-dir", out, *tiny_opts(tiny_data_root, tiny_clip_path, "ZeroshotCLIP")])[0] == 0
    rec = results(out)
    assert rec["trainer"] == "ZeroshotCLIP" and rec["num_images"] == 24
    timing = rec["extra"]["timing"]  # one-time text features, then the loop over 24 images
    assert timing["seconds_per_image"] == pytest.approx(timing["eval_seconds"] / 24, rel=0.05, abs=1e-4)
    assert "ms per image" in (out / "log.txt").read_text()


def test_seed_zero_is_honoured():
    args = build_parser().parse_args(["--seed", "0"])
    assert setup_cfg(args).SEED == 0


@pytest.mark.parametrize("override, message", [
    (["TRAINER.NAME", "CoOq"], "Unknown trainer 'CoOq'; did you mean 'CoOp'?"),
    (["DATASET.NAME", "TinyShape"], "Unknown dataset 'TinyShape'; did you mean 'TinyShapes'?"),
    (["MODEL.BACKBONE.NAME", "ViT-B/61"], "did you mean 'ViT-B/16'?"),
    (["OPTIM.LRR", "0.1"], "OPTIM.LRR"),
])
def test_bad_names_give_one_line_errors(tmp_path, tiny_data_root, tiny_clip_path, capsys, override, message):
    out = tmp_path / "bad"
    code, err = run_cli(["--output-dir", out, *tiny_opts(tiny_data_root, tiny_clip_path), *override], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_a_renamed_dataset_config_still_loads_with_one_note(capsys):
    args = build_parser().parse_args(["--dataset-config-file", "configs/datasets/imagenetv2.yaml"])
    cfg = setup_cfg(args)
    assert cfg.DATASET.NAME == "ImageNetV2"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "configs/datasets/imagenetv2.yaml is now configs/datasets/imagenet_v2.yaml" in err
    with pytest.raises(Exception, match="not found"):  # a name that never existed is still refused
        setup_cfg(build_parser().parse_args(["--dataset-config-file", "configs/datasets/imagenetv3.yaml"]))


def test_bad_key_in_config_file_names_key_and_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("OPTIM:\n  LRR: 0.1\n")
    code, err = run_cli(["--config-file", bad], capsys)
    assert code == 2 and str(bad) in err and "OPTIM.LRR" in err


def test_missing_checkpoint_names_the_path(coop_run, tmp_path, capsys):
    out, opts = coop_run
    code, err = run_cli(["--output-dir", tmp_path / "e", "--eval-only", "--model-dir", out,
                         "--load-epoch", 7, *opts], capsys)
    assert code == 2 and str(out / "prompt_learner" / "model.pth.tar-7") in err and "model.pth.tar-2" in err


def test_checkpoint_with_other_n_ctx_names_both_shapes(coop_run, tmp_path, capsys):
    out, opts = coop_run
    code, err = run_cli(["--output-dir", tmp_path / "e", "--eval-only", "--model-dir", out,
                         "--load-epoch", 2, *opts, "TRAINER.COOP.N_CTX", "8"], capsys)
    assert code == 2 and "(4, 64)" in err and "(8, 64)" in err


def test_fp16_on_cpu_is_honoured_with_a_warning(tmp_path, tiny_data_root, tiny_clip_path):
    out = tmp_path / "fp16"
    opts = tiny_opts(tiny_data_root, tiny_clip_path, "ZeroshotCLIP") + ["TRAINER.ZSCLIP.PREC", "fp16"]
    with pytest.warns(UserWarning, match="PREC fp16 on cpu: honoured"):
        assert run_cli(["--output-dir", out, *opts])[0] == 0
    assert "precision: fp16" in (out / "log.txt").read_text()


def test_train_py_entry_point_reports_user_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--trainer", "CoOq", "--output-dir", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: Unknown trainer 'CoOq'; did you mean 'CoOp'?")
    assert "Traceback" not in proc.stderr


def _corrupt_one_test_image(root):
    victim = sorted((root / "tiny_shapes").rglob("test_0.png"))[0]
    original = victim.read_bytes()
    victim.write_bytes(b"not a png")
    return victim, original


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, tiny_data_root, tiny_clip_path, capsys):
    victim, original = _corrupt_one_test_image(tiny_data_root)
    try:
        opts = tiny_opts(tiny_data_root, tiny_clip_path, "ZeroshotCLIP")
        code, err = run_cli(["--output-dir", tmp_path / "strict", *opts], capsys)
        last = err.strip().splitlines()[-1]  # above it: the progress bar of the evaluation
        assert code == 2 and last.startswith("error: TinyShapes: unreadable image")
        assert str(victim) in last and "SKIP_CORRUPT_IMAGES" in last and "Traceback" not in err
        code, _ = run_cli(["--output-dir", tmp_path / "skip", *opts, "DATASET.SKIP_CORRUPT_IMAGES", "True"])
        assert code == 0
        rec = results(tmp_path / "skip")
        assert rec["extra"]["skipped_images"] == [str(victim)] and rec["num_images"] == 23
    finally:
        victim.write_bytes(original)
