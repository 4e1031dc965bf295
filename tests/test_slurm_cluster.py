"""Sweeps through a real SLURM cluster (``LAUNCHER=slurm``): Debian's slurm-wlm and munge as a
one-node cluster on this machine, started by ``tests/slurm/start.sh``. Skipped, with the reason,
where the cluster cannot be started (not root, no apt)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_scripts import REPO, script_env

pytest.importorskip("submitit")

RUN = "base2new/{part}/shapeworld/shots_{shots}/CoOp/bench/seed1"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One benchmark data folder for the module: generating it is most of a short sweep's time."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def slurm_cluster():
    if shutil.which("bash") is None:
        pytest.skip("slurm: no bash")
    started = subprocess.run(["bash", "tests/slurm/start.sh"], cwd=REPO, capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.skip((started.stdout + started.stderr).strip().splitlines()[-1] if (started.stdout + started.stderr)
                    .strip() else "slurm: tests/slurm/start.sh failed")


def slurm_env(tmp_path, data: Path, out: str = "out", **settings):
    settings = {"DATASETS": "shapeworld", "SEEDS": "1", "SHOTS": "1", "LAUNCHER": "slurm", "SUBMIT_CPUS": "1",
                "SUBMIT_TIME": "20", **settings}
    env = script_env(tmp_path, **settings)
    env.update(OUTPUT=str(tmp_path / out), SELFTPT_DATA=str(data))
    return env


def coop(env, *opts, timeout=900):
    return subprocess.run(["bash", "scripts/coop/base2new.sh", *opts], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_sweep_runs_as_slurm_jobs_skips_on_resubmission_and_matches_a_local_run(slurm_cluster, data_root, tmp_path):
    env = slurm_env(tmp_path, data_root)
    first = coop(env, "OPTIM.MAX_EPOCH", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"slurm: submitted array \d+ \(1 jobs\)", first.stdout)
    assert re.search(r"ran: base2new/train_base/shapeworld/\S+ \(job \d+(_\d+)?\)", first.stdout)
    assert "ShapeWorld" in first.stdout and "HM" in first.stdout  # the table, once the jobs ended
    logs = list((tmp_path / "out/base2new/slurm").rglob("*_log.out"))
    assert logs, "each job's log is under the output tree"
    results = {part: json.loads((tmp_path / "out" / RUN.format(part=part, shots=1) / "results.json").read_text())
               for part in ("train_base", "test_new")}
    stamp = (tmp_path / "out" / RUN.format(part="train_base", shots=1) / "results.json").stat().st_mtime_ns

    again = coop(env, "OPTIM.MAX_EPOCH", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skipped (finished)") == 2 and "slurm: 0 jobs" in again.stdout
    assert "submitted" not in again.stdout
    assert (tmp_path / "out" / RUN.format(part="train_base", shots=1) / "results.json").stat().st_mtime_ns == stamp

    local_env = slurm_env(tmp_path, data_root, out="local", LAUNCHER="local", TABLE="0")
    assert coop(local_env, "OPTIM.MAX_EPOCH", "1").returncode == 0  # the same sweep on this machine
    for part, rec in results.items():
        here = json.loads((tmp_path / "local" / RUN.format(part=part, shots=1) / "results.json").read_text())
        assert here["metrics"] == rec["metrics"], part


def test_dry_run_names_the_jobs_and_submits_nothing(slurm_cluster, data_root, tmp_path):
    env = slurm_env(tmp_path, data_root, DRY_RUN="1")
    dry = coop(env, "OPTIM.MAX_EPOCH", "1")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "slurm: 1 jobs" in dry.stdout and "job 0: base2new/train_base/shapeworld" in dry.stdout
    assert "submitted" not in dry.stdout and not (tmp_path / "out/base2new/train_base").exists()


def test_a_cancelled_job_is_reported_and_resubmission_resumes_from_its_checkpoint(slurm_cluster, data_root, tmp_path):
    env = slurm_env(tmp_path, data_root, TABLE="0", SHOTS="16")  # 16 steps an epoch: time to cancel mid-run
    opts = ("OPTIM.MAX_EPOCH", "20")
    sweep = subprocess.Popen(["bash", "scripts/coop/base2new.sh", *opts], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = tmp_path / "out" / RUN.format(part="train_base", shots=16)
    deadline = time.monotonic() + 600
    while not (run / "prompt_learner").is_dir() or not any((run / "prompt_learner").glob("model.pth.tar-*")):
        assert sweep.poll() is None and time.monotonic() < deadline, "no checkpoint before the job ended"
        time.sleep(0.2)
    subprocess.run(["scancel", "--user", "root"], check=True)
    out, err = sweep.communicate(timeout=300)
    assert not (run / "results.json").is_file(), "the job finished before scancel reached it"
    assert sweep.returncode == 1, out + err
    failed = re.search(r"job (\S+) failed .*; log: (\S+)", err)
    assert failed, err
    assert Path(failed.group(2)).is_file()
    assert "sweep incomplete: 2 failed" in err

    again = coop(env, *opts)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"resumed: base2new/train_base/\S+ \(job \d+(_\d+)?\)", again.stdout)
    record = json.loads((run / "results.json").read_text())
    assert record["model"]["resumed_from"]["epoch"] >= 1


def test_sharded_tpt_as_array_tasks_equals_an_unsharded_local_run(slurm_cluster, data_root, tmp_path):
    tpt = ["bash", "scripts/tpt/base2new.sh", "TRAINER.TPT.N_VIEWS", "2", "TEST.SPLIT", "val"]
    # 2 CPUs per job = the local worker's 2 torch threads: the same float sums on both sides
    env = slurm_env(tmp_path, data_root, SHARDS="2", SUBMIT_CPUS="2", TABLE="0")
    sharded = subprocess.run(tpt, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    assert re.search(r"slurm: submitted array \d+ \(2 jobs\)", sharded.stdout)  # one task per shard index
    assert sharded.stdout.count("merged 2 shards") == 2
    local_env = slurm_env(tmp_path, data_root, out="local", LAUNCHER="local", JOBS="1", TABLE="0")
    assert subprocess.run(tpt, cwd=REPO, env=local_env, capture_output=True, text=True, timeout=900).returncode == 0
    for part in ("test_base", "test_new"):
        run = f"base2new/{part}/shapeworld/shots_1/TPT/bench/seed1/results.json"
        merged, whole = (json.loads((tmp_path / out / run).read_text()) for out in ("out", "local"))
        assert merged["metrics"] == whole["metrics"] and merged["extra"]["shards"]["count"] == 2, part
