"""Sweeps as a user meets them (selftpt/sweep.py, scripts/common.sh): finished runs made with
other settings, Ctrl-C, a killed worker, two sweeps over one output, relative paths, torn results.

Most tests run the real launcher (``selftpt.sweep.main``) in a subprocess whose train.py runs are
fakes: ``DRIVER`` replaces ``selftpt.launch.main`` in the sweep's worker processes (spawn imports
the parent's main script in each of them) with a function that builds the run's real config
(``launch.setup_cfg``), logs itself to a journal, sleeps or dies on request, and writes a real
``results.json`` whose accuracy is the config's ``OPTIM.MAX_EPOCH`` -- so a table shows which
settings it counts. No model is built: each sweep takes seconds, most of it importing torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import selftpt.sweep as sweeps  # names looked up in the tests, so that the ones that only drive a sweep
import trainers  # noqa: F401  (registers the trainers: a sweep plans from their TRAINS, DETERMINISTIC)
from selftpt import collect, tables
from selftpt.results import RESULTS_FILENAME, make_record, read_results, write_results
from selftpt.sweep import Sweep  # also run (and fail) on code that lacks the newer helpers
from tests.helpers import ctrl_c_as_in_a_terminal

REPO = Path(__file__).resolve().parents[1]
RUN = "base2new/{part}/shapeworld/shots_1/CoOp/bench/seed{seed}"  # a run folder under the output
BENCH_EPOCHS = 10  # OPTIM.MAX_EPOCH of configs/trainers/CoOp/bench.yaml
# One CoOp run on ShapeWorld: seed 1, 1 shot, the bench config.
ONE_RUN = dict(protocol="base2new", trainer="CoOp", cfg="bench", data="", datasets=["shapeworld"], seeds=[1], shots=[1])

DRIVER = '''
"""selftpt.sweep with fake train.py runs (tests/test_sweep.py)."""
import json, os, signal, sys, time, types
sys.path.insert(0, {repo!r})


def fake_main(argv):
    from selftpt import launch
    from selftpt.results import make_record, write_results
    cfg = launch.setup_cfg(launch.build_parser().parse_args(argv))
    launch.prepare_output_dir(cfg.OUTPUT_DIR)  # rotates the log of a resumed run, as train.py
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "log.txt"), "a") as log:
        log.write(f"pid {{os.getpid()}}\\n")
    with open(os.environ["FAKE_JOURNAL"], "a") as journal:
        journal.write(json.dumps({{"dir": cfg.OUTPUT_DIR, "pid": os.getpid(), "root": cfg.DATASET.ROOT}}) + "\\n")
    if os.environ.get("FAKE_DIE") and os.environ["FAKE_DIE"] in cfg.OUTPUT_DIR:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
    write_results(cfg.OUTPUT_DIR, make_record(cfg, {{"accuracy": float(cfg.OPTIM.MAX_EPOCH)}}, 10))
    return 0


if __name__ == "__main__":  # the sweep's command line: it registers the trainers the plan reads
    import trainers  # noqa: F401
    from selftpt.sweep import main
    sys.exit(main(sys.argv[1:]))
else:  # a sweep worker: fake runs, and none of the real datasets and trainers to register
    sys.modules["datasets"] = types.ModuleType("datasets")
    sys.modules["trainers"] = types.ModuleType("trainers")
    from selftpt import launch
    launch.main = fake_main
'''


@pytest.fixture
def world(tmp_path):
    """(driver script, output root, journal file) in a fresh folder."""
    driver = tmp_path / "fake_sweep.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    return driver, tmp_path / "out", tmp_path / "journal.jsonl"


def sweep_args(out: Path, *extra: str, seeds: str = "1", jobs: str = "1") -> list[str]:
    """selftpt.sweep arguments: CoOp base-to-new on ShapeWorld, 1 shot (2 runs per seed)."""
    args = ["base2new", "--trainer", "CoOp", "--cfg", "bench", "--datasets", "shapeworld", "--shots", "1",
            "--seeds", *seeds.split(), "--output", str(out), "--jobs", jobs]
    cut = extra.index("--") if "--" in extra else len(extra)
    return args + list(extra[:cut]) + list(extra[cut:])


def fake_env(journal: Path, **settings: str) -> dict:
    env = dict(os.environ, FAKE_JOURNAL=str(journal), PYTHONUNBUFFERED="1", **settings)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # never look for GPUs: the fakes use none
    return env


def run_sweep(world, *extra: str, seeds: str = "1", jobs: str = "1", timeout: float = 300, **settings: str):
    driver, out, journal = world
    return subprocess.run([sys.executable, str(driver), *sweep_args(out, *extra, seeds=seeds, jobs=jobs)],
                          cwd=REPO, env=fake_env(journal, **settings), capture_output=True, text=True,
                          timeout=timeout)


def start_sweep(world, *extra: str, seeds: str = "1", jobs: str = "1", **settings: str) -> subprocess.Popen:
    """A sweep in its own process group, as a terminal runs it (Ctrl-C reaches the whole group)."""
    driver, out, journal = world
    return subprocess.Popen([sys.executable, str(driver), *sweep_args(out, *extra, seeds=seeds, jobs=jobs)],
                            cwd=REPO, env=fake_env(journal, **settings), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)


def journal_of(world) -> list[dict]:
    path = world[2]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_runs(world, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(journal_of(world)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{n} runs did not start"
        time.sleep(0.2)


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def cells(out: Path, seeds=(1,)) -> dict[str, tuple]:
    """{base/new: (mean, seeds found)} of the base-to-new table over ``out``."""
    tabs, _ = tables.build_tables(collect.collect_runs([out]).runs, seeds=seeds)
    return {r["metric"]: (r["mean"], r["n_seeds"]) for r in tabs[0].records
            if r["dataset"] == "ShapeWorld" and r["metric"] in ("base", "new")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- changed settings


def test_changed_settings_are_named_and_never_reused_nor_overwritten_until_the_user_chooses(world):
    out = world[1]
    first = run_sweep(world, "--", "OPTIM.MAX_EPOCH", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    train, test = (out / RUN.format(part=p, seed=1) for p in ("train_base", "test_new"))
    stamps = {p: (p / RESULTS_FILENAME).stat().st_mtime_ns for p in (train, test)}

    # the same sweep without the option: every run was made with 1 epoch, the bench config says 10
    again = run_sweep(world)
    assert again.returncode == 3, again.stdout + again.stderr
    changed = [line for line in again.stderr.splitlines() if line.startswith("changed: ")]
    assert changed[0] == f"changed: {RUN.format(part='train_base', seed=1)}: OPTIM.MAX_EPOCH: 1 -> {BENCH_EPOCHS}"
    assert changed[1].startswith(f"changed: {RUN.format(part='test_new', seed=1)}: OPTIM.MAX_EPOCH: 1 -> 10")
    assert len(changed) == 2 and "--rerun-changed" in again.stderr and "--replace-changed" in again.stderr
    assert "skipped" not in again.stdout and len(journal_of(world)) == 2  # nothing reused, nothing run
    assert {p: (p / RESULTS_FILENAME).stat().st_mtime_ns for p in (train, test)} == stamps

    # --rerun-changed: new folders next to the old ones; the tables count the newest run of a seed
    rerun = run_sweep(world, "--rerun-changed")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"the old run stays in seed1): {RUN.format(part='train_base', seed=1)}-2" in rerun.stdout
    assert read_results(train.with_name("seed1-2"))["config"]["OPTIM"]["MAX_EPOCH"] == BENCH_EPOCHS
    assert read_results(test.with_name("seed1-2"))["config"]["OPTIM"]["MAX_EPOCH"] == BENCH_EPOCHS
    assert {p: (p / RESULTS_FILENAME).stat().st_mtime_ns for p in (train, test)} == stamps
    assert cells(out) == {"base": (10.0, 1), "new": (10.0, 1)}  # one seed, not two

    # back to 1 epoch, replacing: the newest run (seed1-2, 10 epochs) moves aside, out of the tables
    replace = run_sweep(world, "--replace-changed", "--", "OPTIM.MAX_EPOCH", "1")
    assert replace.returncode == 0, replace.stdout + replace.stderr
    aside = sorted(p.name for p in train.parent.iterdir() if p.name.startswith(".seed1-2.replaced-"))
    assert len(aside) == 1 and read_results(train.parent / aside[0])["metrics"]["accuracy"] == 10.0
    assert cells(out) == {"base": (1.0, 1), "new": (1.0, 1)}
    same = run_sweep(world, "--", "OPTIM.MAX_EPOCH", "1")  # the newest run has these settings: reused
    assert same.returncode == 0 and same.stdout.count("skipped (finished)") == 2, same.stdout + same.stderr


def _finished(sweep: Sweep, opts=()) -> None:
    """Write a results.json for every run of ``sweep`` as train.py would with ``opts`` added."""
    for chain in sweep.chains():
        for run in chain:
            run = dataclasses.replace(run, opts=run.opts + list(opts))
            cfg = sweeps.requested_config(sweep, run, run.output_dir, run.model_dir)
            write_results(run.output_dir, make_record(cfg, {"accuracy": float(cfg.OPTIM.MAX_EPOCH)}, 10))


def test_plan_compares_the_config_train_py_would_build_and_retrained_models_carry_their_tests(tmp_path):
    def sweep(*opts):
        return Sweep(**ONE_RUN, output=tmp_path, extra_opts=list(opts))

    _finished(sweep(), ["OPTIM.LR", "0.5"])
    assert [s.action for chain in sweeps.plan_sweep(sweep("OPTIM.LR", "0.5")) for s in chain] == ["skip", "skip"]
    (train, test), = sweeps.plan_sweep(sweep())
    assert (train.action, test.action) == ("changed", "changed")
    assert train.changes == ("OPTIM.LR: 0.5 -> 0.01",)
    assert test.changes == ("OPTIM.LR: 0.5 -> 0.01", f"model: {RUN.format(part='train_base', seed=1)} is trained again")

    (train, test), = sweeps.plan_sweep(sweep(), "rerun")
    assert (train.folder.name, test.folder.name, test.model_dir) == ("seed1-2", "seed1-2", train.folder)
    (train, test), = sweeps.plan_sweep(sweep(), "replace")
    assert (train.action, train.folder.name, test.action, test.model_dir) == ("replace", "seed1", "replace",
                                                                               train.folder)

    # an older results.json without the config: equal digests are reused, others are unknown settings
    for run in (train.run, test.run):
        record = read_results(run.output_dir)
        del record["config"]
        (run.output_dir / RESULTS_FILENAME).write_text(json.dumps(record))
    assert [s.action for chain in sweeps.plan_sweep(sweep("OPTIM.LR", "0.5")) for s in chain] == ["skip", "skip"]
    (train, _), = sweeps.plan_sweep(sweep())
    assert train.action == "changed" and train.changes[0].startswith("settings unknown")


def test_the_run_that_counts_is_the_newest_for_the_sweep_as_for_the_tables(tmp_path):
    base = Sweep(**ONE_RUN, output=tmp_path)
    _finished(base, ["OPTIM.MAX_EPOCH", "3"])
    seed1 = tmp_path / RUN.format(part="train_base", seed=1)
    newer = Sweep(**ONE_RUN, output=tmp_path)
    for chain in newer.chains():  # the same runs again, in seed1-2, written later
        for run in chain:
            run.output_dir = run.output_dir.with_name("seed1-2")
            run.model_dir = run.model_dir and run.model_dir.with_name("seed1-2")
            cfg = sweeps.requested_config(newer, run, run.output_dir, run.model_dir)
            write_results(run.output_dir, make_record(cfg, {"accuracy": float(cfg.OPTIM.MAX_EPOCH)}, 10))
    os.utime(seed1 / RESULTS_FILENAME, (1, 1))
    assert sweeps.current_dir(seed1) == seed1.with_name("seed1-2")
    assert cells(tmp_path) == {"base": (10.0, 1), "new": (10.0, 1)}
    assert [s.action for chain in sweeps.plan_sweep(newer) for s in chain] == ["skip", "skip"]
    os.utime(seed1.with_name("seed1-2") / RESULTS_FILENAME, (0, 0))  # now seed1 is the newer one
    assert sweeps.current_dir(seed1) == seed1 and cells(tmp_path)["base"] == (3.0, 1)


# --------------------------------------------------------------------------- Ctrl-C, dead workers


def test_ctrl_c_stops_every_worker_at_once_and_the_same_command_resumes(world):
    out = world[1]
    sweep = start_sweep(world, seeds="1 2 3", jobs="2", FAKE_SECONDS="300")
    try:
        wait_for_runs(world, 2, sweep)
        os.killpg(sweep.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        started = time.monotonic()
        stdout, stderr = sweep.communicate(timeout=60)
    finally:
        kill_group(sweep)
    assert time.monotonic() - started < 20
    assert sweep.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    last, = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    command = "python -m selftpt.sweep " + " ".join(sweep_args(out, seeds="1 2 3", jobs="2"))
    assert last == (f"interrupted: 0 of 6 runs finished (0 in this sweep), 2 stopped mid-run and resume from "
                    f"their last checkpoint; resume with: {command}")
    time.sleep(1)
    assert not any(alive(entry["pid"]) for entry in journal_of(world))  # the workers are gone
    assert not list(out.rglob(RESULTS_FILENAME)) and not list(out.rglob(".*.lock"))
    started_dirs = {Path(entry["dir"]) for entry in journal_of(world)}
    assert len(started_dirs) == 2 and all(d.is_dir() for d in started_dirs)  # resumable, not wiped

    resumed = run_sweep(world, seeds="1 2 3", jobs="2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("] resumed: ") == 2 and resumed.stdout.count("] ran: ") == 4
    assert len(list(out.rglob(RESULTS_FILENAME))) == 6


def test_a_killed_worker_fails_only_its_run_and_the_other_chains_go_on(world):
    out = world[1]
    result = run_sweep(world, seeds="1 2 3", jobs="2", FAKE_DIE="seed2")
    assert result.returncode == 1, result.stdout + result.stderr
    died = [line for line in result.stdout.splitlines() if "worker process died" in line]
    assert len(died) == 1 and died[0].endswith(
        f"FAILED: worker process died (killed by SIGKILL, e.g. out of memory): {RUN.format(part='train_base', seed=2)}")
    for seed in (1, 3):  # the other chains finished
        for part in ("train_base", "test_new"):
            assert (out / RUN.format(part=part, seed=seed) / RESULTS_FILENAME).is_file()
    assert not (out / RUN.format(part="test_new", seed=2)).exists()  # it needed the dead run
    assert "sweep incomplete: 1 failed, 1 not started" in result.stderr


# --------------------------------------------------------------------------- two sweeps at once


def test_a_second_sweep_leaves_held_runs_to_the_first_and_a_dead_holders_lock_is_taken_over(world):
    out = world[1]
    train = out / RUN.format(part="train_base", seed=1)
    first = start_sweep(world, FAKE_SECONDS="300")
    try:
        wait_for_runs(world, 1, first)
        second = run_sweep(world)
        assert second.returncode == 75, second.stdout + second.stderr
        assert f"[1/2] skipped (held by sweep pid {first.pid} (worker {journal_of(world)[0]['pid']}) on " \
            in second.stdout
        assert second.stdout.rstrip().endswith(RUN.format(part="train_base", seed=1))
        assert "1 held by another process, left to it, 1 not started" in second.stderr
        assert len(journal_of(world)) == 1  # the second sweep ran nothing
        assert not list(train.glob("log.txt-*"))  # nor rotated the first one's log
    finally:
        kill_group(first)  # killed outright: its lock file stays, naming a dead process

    assert (train.parent / ".seed1.lock").exists()
    third = run_sweep(world)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"[1/2] resumed: {RUN.format(part='train_base', seed=1)}" in third.stdout
    assert (train / RESULTS_FILENAME).is_file() and not (train.parent / ".seed1.lock").exists()


def test_run_lock_names_its_holder_and_is_free_once_the_holder_is_gone(tmp_path):
    folder = tmp_path / "seed1"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[2])\n"
        "from selftpt.sweep import RunLock\n"
        "assert RunLock(Path(sys.argv[1]), sweep_pid=7).acquire() is None\nprint('held', flush=True)\ntime.sleep(300)"),
        str(folder), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        lock = sweeps.RunLock(folder)
        assert lock.acquire().startswith(f"sweep pid 7 (worker {holder.pid}) on ")
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire() is None  # the kernel let go of the dead holder's lock
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert sweeps.RunLock(folder).acquire().startswith(f"sweep pid {os.getpid()} on ")
    lock.release()
    assert not lock.path.exists()


# --------------------------------------------------------------------------- torn results


def test_a_torn_results_file_is_torn_to_the_sweep_and_to_the_tables_and_its_run_is_redone(world):
    out = world[1]
    assert run_sweep(world, "--", "OPTIM.MAX_EPOCH", "1").returncode == 0
    torn = out / RUN.format(part="test_new", seed=1) / RESULTS_FILENAME
    text = torn.read_text()
    torn.write_text(text[: len(text) // 2])  # as a crash while it was copied leaves it
    notes = collect.collect_runs([out]).notes
    assert len(notes) == 1 and notes[0].startswith(f"{torn} is torn (not valid JSON")

    again = run_sweep(world, "--", "OPTIM.MAX_EPOCH", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    lines = again.stdout.splitlines()
    assert f"[1/2] skipped (finished): {RUN.format(part='train_base', seed=1)}" in lines
    redone, = [line for line in lines if line.startswith("[2/2]")]
    assert redone.startswith(f"[2/2] resumed (torn {RESULTS_FILENAME} moved to {RESULTS_FILENAME}.torn-")
    kept, = torn.parent.glob(f"{RESULTS_FILENAME}.torn-*")
    assert kept.read_text() == text[: len(text) // 2]  # set aside, not deleted
    assert read_results(torn)["metrics"]["accuracy"] == 1.0 and not collect.collect_runs([out]).notes


# --------------------------------------------------------------------------- scripts/common.sh


def test_script_paths_are_the_callers_and_changed_settings_stop_it_before_the_table(world, tmp_path):
    driver, _, journal = world
    wrapper = tmp_path / "python"  # PYTHON for the scripts: the sweep with fake runs, the rest as is
    wrapper.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -m ] && [ "$2" = selftpt.sweep ]; then shift 2; '
                       f'exec "{sys.executable}" "{driver}" "$@"; fi\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    name = f"rel-out-{uuid.uuid4().hex[:8]}"  # relative: the user's directory, not the repository's
    env = fake_env(journal, PYTHON=str(wrapper), OUTPUT=name, DATA="rel-data", CFG="bench",
                   DATASETS="shapeworld", SEEDS="1", SHOTS="1", JOBS="1")
    script = str(REPO / "scripts/coop/base2new.sh")
    try:
        first = subprocess.run(["bash", script, "OPTIM.MAX_EPOCH", "1"], cwd=caller, env=env,
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr
        assert not (REPO / name).exists()
        assert (caller / name / RUN.format(part="test_new", seed=1) / RESULTS_FILENAME).is_file()
        assert {entry["root"] for entry in journal_of(world)} == {str(caller / "rel-data")}
        assert first.stdout.splitlines()[0] == f"output: {caller / name}"  # said before anything runs
        assert "ShapeWorld" in first.stdout  # the closing table

        changed = subprocess.run(["bash", script], cwd=caller, env=env, capture_output=True, text=True,
                                 timeout=300)
        assert changed.returncode == 3, changed.stdout + changed.stderr
        assert "ShapeWorld" not in changed.stdout  # no table of runs made with other settings
        choose, = [line for line in changed.stderr.splitlines() if "CHANGED=rerun" in line]
        command = choose[choose.index("CHANGED=rerun"):]  # the settings given, paths made absolute
        assert command.endswith(f"bash {script}") and f" OUTPUT={caller / name} " in command
        assert f" DATA={caller / 'rel-data'} " in command and " SEEDS=1 " in command
    finally:
        if (REPO / name).exists():  # a relative OUTPUT taken from the repository, not the caller's folder
            import shutil
            shutil.rmtree(REPO / name)
    assert not (REPO / name).exists()
    bad = subprocess.run(["bash", script], cwd=caller, env=dict(env, CHANGED="yes"), capture_output=True, text=True)
    assert bad.returncode == 2 and "CHANGED=rerun or CHANGED=replace" in bad.stderr
