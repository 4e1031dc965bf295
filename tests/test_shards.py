"""Sharded evaluation (selftpt/shards.py): shards of a test set merged into the run an unsharded
evaluation gives, and every incomplete or mixed set of shards refused."""
from __future__ import annotations

import json

import pytest
import torch

import trainers  # noqa: F401  (registers the trainers)
from selftpt.collect import collect_runs
from selftpt.config import validate_cfg
from selftpt.errors import ConfigError, UserError
from selftpt.launch import build_parser, main, run
from selftpt.shards import PREDICTIONS_FILENAME, Shard, ShardError, merge_shards, shard_folder
from tests.helpers import project_cfg, tiny_opts


# --------------------------------------------------------------------------- slices
@pytest.mark.parametrize("n_items, batch_size, count", [(12, 1, 3), (12, 4, 2), (13, 4, 3), (100, 8, 5),
                                                        (7, 2, 4), (5, 5, 1)])
def test_shards_tile_the_test_set_at_batch_boundaries(n_items, batch_size, count):
    slices = [Shard(i, count).items(n_items, batch_size) for i in range(1, count + 1)]
    assert [i for s in slices for i in s] == list(range(n_items))
    assert all(s.start % batch_size == 0 for s in slices)
    batches = [-(-len(s) // batch_size) for s in slices]
    assert max(batches) - min(batches) <= 1 and batches == sorted(batches, reverse=True)


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", "-1/2", "1/2/3"])
def test_a_bad_shard_setting_is_one_line_before_any_work(text):
    with pytest.raises(ShardError, match="TEST.SHARD"):
        Shard.parse(text)
    if text != "1":  # yacs reads a bare 1 as an integer and refuses it for a text key itself
        with pytest.raises(ConfigError, match=r'^TEST.SHARD is .*must be "i/n" with 1 <= i <= n'):
            validate_cfg(project_cfg(["TEST.SHARD", text]), trains=False)


def test_shard_parse_round_trips():
    assert Shard.parse("") is None
    assert Shard.parse("2/4") == Shard(2, 4) and str(Shard(2, 4)) == "2/4" and Shard(2, 4).folder_name == "2of4"


# --------------------------------------------------------------------------- runs
def _args(root, clip, output_dir, trainer, config, *opts):
    return build_parser().parse_args([
        "--root", str(root), "--trainer", trainer, "--config-file", config, "--output-dir", str(output_dir),
        "--seed", "1", "DATASET.NAME", "TinyShapes", "INPUT.SIZE", "(32, 32)", "MODEL.BACKBONE.NAME", str(clip),
        "DATALOADER.NUM_WORKERS", "0", "USE_CUDA", "False", *opts])


def _run_sharded(root, clip, run_dir, count, trainer, config, *opts):
    for i in range(1, count + 1):
        run(_args(root, clip, shard_folder(run_dir, Shard(i, count)), trainer, config, *opts,
                  "TEST.SHARD", f"{i}/{count}"))
    return merge_shards(run_dir)


TPT = ("TPT", "configs/trainers/TPT/vit_b16.yaml", "TRAINER.TPT.N_VIEWS", "6")
# 24 test images in batches of 5: shards of 3 batches (15 images) and 2 (9 images)
ZSCLIP = ("ZeroshotCLIP", "configs/trainers/ZeroshotCLIP/vit_b16.yaml", "DATALOADER.TEST.BATCH_SIZE", "5")


@pytest.mark.parametrize("method, count", [(TPT, 3), (ZSCLIP, 2)], ids=["TPT-3-shards", "ZeroshotCLIP-2-shards"])
def test_merged_shards_equal_the_unsharded_run(tiny_data_root, tiny_clip_path, tmp_path, method, count):
    whole = run(_args(tiny_data_root, tiny_clip_path, tmp_path / "whole", *method))
    merged = _run_sharded(tiny_data_root, tiny_clip_path, tmp_path / "sharded", count, *method)
    assert merged["metrics"] == whole["metrics"]  # accuracy, macro-F1 and ECE to the last bit
    assert merged["num_images"] == whole["num_images"] == 24
    assert merged["config_digest"] == whole["config_digest"]  # the same settings as an unsharded run
    on_disk = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert on_disk["metrics"] == whole["metrics"] and on_disk["extra"]["shards"]["count"] == count
    assert on_disk["config"]["TEST"]["SHARD"] == ""
    log = (tmp_path / "sharded" / "log.txt").read_text()
    assert f"* accuracy: {whole['metrics']['accuracy']:.1f}%" in log and "* ece:" in log
    assert not (tmp_path / "sharded" / "shards" / f"1of{count}" / "results.json").exists()


def test_tpt_shard_logits_equal_the_unsharded_runs_image_by_image(tiny_data_root, tiny_clip_path, tmp_path):
    """TPT's views come from each image's own seed: a shard that starts mid-set tunes on the views
    the unsharded run drew for those images."""
    run(_args(tiny_data_root, tiny_clip_path, tmp_path / "one" / "shards" / "1of1", *TPT, "TEST.SHARD", "1/1"))
    run(_args(tiny_data_root, tiny_clip_path, tmp_path / "two" / "shards" / "2of2", *TPT, "TEST.SHARD", "2/2"))
    whole = torch.load(tmp_path / "one" / "shards" / "1of1" / PREDICTIONS_FILENAME, weights_only=False)
    second = torch.load(tmp_path / "two" / "shards" / "2of2" / PREDICTIONS_FILENAME, weights_only=False)
    start, stop = second["items"]
    assert (start, stop) == (12, 24)
    assert torch.equal(second["logits"], whole["logits"][start:stop])


# Self-TPT-v: trained, then every test image classified from its 4 views after stage-2 adaptation
SELFTPT_V = ["TRAINER.SELFTPT.N_VIEWS", "4", "TRAINER.SELFTPT.TTA_STEPS", "2", "DATALOADER.TEST.BATCH_SIZE", "5"]


def _train_py(*args):
    return main([str(a) for a in args])


def test_a_training_runs_own_evaluation_sharded_after_training_is_the_unbroken_run(tiny_data_root, tiny_clip_path,
                                                                                  tmp_path):
    opts = ["--seed", "1", *tiny_opts(tiny_data_root, tiny_clip_path, "SelfTPT"), *SELFTPT_V]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert _train_py("--output-dir", whole, *opts) == 0
    assert _train_py("--output-dir", sharded, *opts, "TEST.NO_TEST", "True") == 0
    assert not (sharded / "results.json").exists()
    for i in range(1, 4):
        assert _train_py("--output-dir", shard_folder(sharded, Shard(i, 3)), "--resume", sharded, *opts,
                         "TEST.SHARD", f"{i}/3") == 0
    merged = merge_shards(sharded)
    unbroken = json.loads((whole / "results.json").read_text())
    assert merged["metrics"] == unbroken["metrics"] and merged["num_images"] == 24
    assert merged["config_digest"] == unbroken["config_digest"] and merged["config"]["RESUME"] == ""
    # what training recorded comes back with the resumed model
    assert len(merged["extra"]["grad_cos_per_epoch"]) == 2
    assert merged["extra"]["grad_cos_per_epoch"] == unbroken["extra"]["grad_cos_per_epoch"]
    assert merged["model"]["source"] == "trained" and merged["model"]["resumed_from"]["directory"] == str(sharded)


def test_a_shard_of_a_training_run_refuses_unfinished_training_and_best_val(tiny_data_root, tiny_clip_path,
                                                                              tmp_path, capsys):
    opts = ["--seed", "1", *tiny_opts(tiny_data_root, tiny_clip_path, "CoOp")]
    started = tmp_path / "started"
    assert _train_py("--output-dir", started, *opts, "OPTIM.MAX_EPOCH", "1", "TEST.NO_TEST", "True") == 0
    shard = shard_folder(started, Shard(1, 2))
    assert _train_py("--output-dir", shard, "--resume", started, *opts, "TEST.SHARD", "1/2") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: TEST.SHARD 1/2 evaluates a trained model, but {started} holds 1 of 2 epochs: train it "
                   "first (the same command without TEST.SHARD, with TEST.NO_TEST True), then run each shard "
                   "with --resume pointing at that folder")
    assert _train_py("--output-dir", tmp_path / "fresh", *opts, "TEST.SHARD", "1/2") == 2  # nothing to resume
    assert "holds 0 of 2 epochs" in capsys.readouterr().err
    assert _train_py("--output-dir", shard, "--resume", started, *opts, "OPTIM.MAX_EPOCH", "1",
                     "TEST.FINAL_MODEL", "best_val", "TEST.SHARD", "1/2") == 2
    assert "with TEST.FINAL_MODEL best_val: shard the evaluation of the best model" in capsys.readouterr().err
    assert not list(tmp_path.rglob("predictions.pt")) and not list(tmp_path.rglob("results.json"))


@pytest.fixture(scope="module")
def four_shards(tiny_data_root, tiny_clip_path, tmp_path_factory):
    """A zero-shot run's 4 finished shards (not merged)."""
    run_dir = tmp_path_factory.mktemp("zs4")
    for i in range(1, 5):
        run(_args(tiny_data_root, tiny_clip_path, shard_folder(run_dir, Shard(i, 4)), *ZSCLIP[:2],
                  "DATALOADER.TEST.BATCH_SIZE", "3", "TEST.SHARD", f"{i}/4"))
    return run_dir


def _copy(source, target):
    import shutil
    shutil.copytree(source, target)
    return target


def test_unmerged_shards_are_no_run_in_the_tables_and_a_merged_run_is_one(four_shards, tmp_path):
    """Each shard's log holds the accuracy of its slice of the test set: until the merge the seed
    is missing (with a note), then the merged results.json is the run."""
    run_dir = _copy(four_shards, tmp_path / "out" / "seed1")
    found = collect_runs([tmp_path / "out"])
    assert found.runs == [] and len(found.notes) == 1
    note = found.notes[0]
    assert note.startswith(f"{run_dir}: 4 shard(s) not merged yet") and note.endswith("seed counted as missing")
    merge_shards(run_dir)
    found = collect_runs([tmp_path / "out"])
    assert [run.source for run in found.runs] == [run_dir / "results.json"] and found.notes == []


def test_a_missing_shard_is_refused(four_shards, tmp_path):
    run_dir = _copy(four_shards, tmp_path / "run")
    (run_dir / "shards" / "3of4" / PREDICTIONS_FILENAME).unlink()
    with pytest.raises(ShardError, match=r"shard\(s\) 3of4 of 4 have not finished"):
        merge_shards(run_dir)
    assert not (run_dir / "results.json").exists()


def test_shards_of_two_counts_are_refused(four_shards, tmp_path):
    run_dir = _copy(four_shards, tmp_path / "run")
    _copy(run_dir / "shards" / "1of4", run_dir / "shards" / "1of2")
    with pytest.raises(ShardError, match="shards of 2 and 4 parts"):
        merge_shards(run_dir)


def test_a_duplicated_shard_is_refused(four_shards, tmp_path):
    """Shard 2's predictions copied over shard 3's: same items twice, one slice never."""
    run_dir = _copy(four_shards, tmp_path / "run")
    shards = run_dir / "shards"
    (shards / "3of4" / PREDICTIONS_FILENAME).write_bytes((shards / "2of4" / PREDICTIONS_FILENAME).read_bytes())
    with pytest.raises(ShardError, match="holds shard 2/4, not 3/4"):
        merge_shards(run_dir)
    payload = torch.load(shards / "2of4" / PREDICTIONS_FILENAME, weights_only=False)
    payload["shard"] = "3/4"  # relabelled as well: the slice still gives it away
    torch.save(payload, shards / "3of4" / PREDICTIONS_FILENAME)
    with pytest.raises(ShardError, match="shard 3/4 covers items 6-12 of 24, but 12- of 24 come next"):
        merge_shards(run_dir)


def test_shards_made_with_other_settings_are_refused(four_shards, tiny_data_root, tiny_clip_path, tmp_path):
    run_dir = _copy(four_shards, tmp_path / "run")
    import shutil
    shutil.rmtree(run_dir / "shards" / "4of4")
    run(_args(tiny_data_root, tiny_clip_path, shard_folder(run_dir, Shard(4, 4)), *ZSCLIP[:2],
              "DATALOADER.TEST.BATCH_SIZE", "3", "TEST.SHARD", "4/4", "TEST.ECE_BINS", "10"))
    with pytest.raises(ShardError, match="shard 4/4 was made with other settings than shard 1/4"):
        merge_shards(run_dir)


def test_merging_twice_and_running_a_finished_shard_again_are_refused(four_shards, tiny_data_root, tiny_clip_path,
                                                                        tmp_path):
    run_dir = _copy(four_shards, tmp_path / "run")
    merge_shards(run_dir)
    with pytest.raises(ShardError, match="already holds a finished run"):
        merge_shards(run_dir)
    with pytest.raises(UserError, match=f"already holds a finished run \\({PREDICTIONS_FILENAME}\\)"):
        run(_args(tiny_data_root, tiny_clip_path, shard_folder(run_dir, Shard(1, 4)), *ZSCLIP[:2],
                  "DATALOADER.TEST.BATCH_SIZE", "3", "TEST.SHARD", "1/4"))


def test_more_shards_than_batches_is_one_line(tiny_data_root, tiny_clip_path, tmp_path):
    with pytest.raises(ShardError, match=r"only 5 batch\(es\) of 5, so shard 6 would be empty; use at most 5"):
        run(_args(tiny_data_root, tiny_clip_path, tmp_path / "run", *ZSCLIP, "TEST.SHARD", "6/6"))


# --------------------------------------------------------------------------- sweeps
TPT_SWEEP = ["bash", "scripts/tpt/base2new.sh", "TRAINER.TPT.N_VIEWS", "2", "TEST.SPLIT", "val"]
TPT_RUN = "base2new/{part}/shapeworld/shots_1/TPT/bench/seed1"


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    """One benchmark data folder for the module (generating it is most of a short sweep's time)."""
    return tmp_path_factory.mktemp("data")


def _sweep(tmp_path, data, out, command=TPT_SWEEP, **settings):
    import subprocess

    from tests.test_scripts import REPO, script_env
    # JOBS=1: one worker with every core, sharded or not (on CPU the thread count changes the
    # order of float sums, so runs with other thread counts agree only to rounding)
    env = script_env(tmp_path, DATASETS="shapeworld", SEEDS="1", SHOTS="1", TABLE="0", JOBS="1", **settings)
    env.update(SELFTPT_DATA=str(data), OUTPUT=str(tmp_path / out))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _metrics(root, run=TPT_RUN, parts=("test_base", "test_new")):
    return {part: json.loads((root / run.format(part=part) / "results.json").read_text())["metrics"]
            for part in parts}


def test_a_sharded_sweep_merges_into_the_unsharded_results_and_resumes_from_its_shards(tmp_path, bench_data):
    _sweep(tmp_path, bench_data, "whole")
    first = _sweep(tmp_path, bench_data, "sharded", SHARDS="3")
    assert first.count("merged 3 shards") == 2 and first.count("] ran: ") == 6  # 2 evaluations x 3 shards
    assert _metrics(tmp_path / "sharded") == _metrics(tmp_path / "whole")

    again = _sweep(tmp_path, bench_data, "sharded", SHARDS="3")
    assert again.count("skipped (finished)") == 2 and "merged" not in again and "ran" not in again

    new_run = tmp_path / "sharded" / TPT_RUN.format(part="test_new")
    (new_run / "results.json").unlink()  # as if the merge had not happened: its shards are reused
    merged_again = _sweep(tmp_path, bench_data, "sharded", SHARDS="3")
    assert merged_again.count("merged 3 shards") == 1 and "] ran: " not in merged_again

    (new_run / "results.json").unlink()  # now 2 shards: the 3 finished ones are set aside, kept on disk
    two = _sweep(tmp_path, bench_data, "sharded", SHARDS="2")
    assert two.count("set aside") == 3 and two.count("] ran: ") == 2 and two.count("merged 2 shards") == 1
    assert len(list((new_run / "shards").glob(".*of3.stale-*"))) == 3
    assert _metrics(tmp_path / "sharded") == _metrics(tmp_path / "whole")


SELFTPT_V_SWEEP = ["bash", "scripts/selftpt/base2new.sh", "OPTIM.MAX_EPOCH", "1", "TRAINER.SELFTPT.N_VIEWS", "2",
                   "TRAINER.SELFTPT.TTA_STEPS", "1", "TEST.SPLIT", "val"]
SELFTPT_V_RUN = "base2new/{part}/shapeworld/shots_1/SelfTPT/bench_v/seed1"


def test_a_sharded_sweep_shards_the_training_runs_own_evaluation_too(tmp_path, bench_data):
    """Self-TPT-v on base-to-new: the training run's base-class evaluation and the new-class run
    are both sharded, and both equal the unsharded sweep's."""
    _sweep(tmp_path, bench_data, "whole", SELFTPT_V_SWEEP, CFG="bench_v")
    first = _sweep(tmp_path, bench_data, "sharded", SELFTPT_V_SWEEP, CFG="bench_v", SHARDS="2")
    assert first.count("merged 2 shards") == 2 and first.count("] ran: ") == 5  # training + 2 x 2 shards
    train_base = tmp_path / "sharded" / SELFTPT_V_RUN.format(part="train_base")
    assert sorted(p.name for p in (train_base / "shards").iterdir()) == ["1of2", "2of2"]
    parts = ("train_base", "test_new")
    assert _metrics(tmp_path / "sharded", SELFTPT_V_RUN, parts) == _metrics(tmp_path / "whole", SELFTPT_V_RUN, parts)
    again = _sweep(tmp_path, bench_data, "sharded", SELFTPT_V_SWEEP, CFG="bench_v", SHARDS="2")
    assert again.count("skipped (finished)") == 2 and "merged" not in again and "ran" not in again


def test_a_sharded_sweep_does_not_shard_a_training_run_whose_training_failed(tmp_path, bench_data):
    """Training fails (its initial weights do not exist): the sweep says so in one line and
    starts none of its shards (each would refuse the unfinished training) nor a merge."""
    import subprocess

    from tests.test_scripts import REPO, script_env
    env = script_env(tmp_path, DATASETS="shapeworld", SEEDS="1", SHOTS="1", TABLE="0", JOBS="1", CFG="bench_v",
                     SHARDS="2")
    env["SELFTPT_DATA"] = str(bench_data)
    done = subprocess.run([*SELFTPT_V_SWEEP, "MODEL.INIT_WEIGHTS", str(tmp_path / "missing.pth")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode != 0
    train_base = SELFTPT_V_RUN.format(part="train_base")
    assert f"not started (its training did not finish): {train_base}" in done.stderr
    assert not (tmp_path / "out" / train_base / "shards").exists()
    assert "merge FAILED" not in done.stderr and "shards/" not in done.stdout + done.stderr
