"""What the user meets when something goes wrong: one line (exit 2), Ctrl-C (exit 130), and
nothing half-written that blocks the rerun.

Covers: malformed YAML config files, an output path under a file, a full disk, a truncated
checkpoint (``--model-dir`` and resume), Ctrl-C, the built-in benchmark's repair commands and
Fashion-MNIST messages, file modes under the user's umask, and temporary folders left by a
killed dataset generation.
"""
from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trainers  # noqa: F401  (registers the trainers)
from selftpt.launch import main
from tests.helpers import ctrl_c_as_in_a_terminal, tiny_opts

REPO = Path(__file__).resolve().parents[1]


def run_cli(args, capsys=None) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err if capsys else ""
    return code, err


def one_error_line(err: str) -> str:
    """The ``error:`` line train.py printed last: the only one, no traceback (above it there may
    be progress bars, which go to stderr)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


def coop_opts(root: Path, clip: Path, *more) -> list[str]:
    return tiny_opts(root, clip, "CoOp") + ["TRAINER.COOP.N_CTX", "4", *map(str, more)]


@pytest.fixture
def umask():
    """Set the process umask for a test; restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


# ----------------------------------------------------------------------------- 1. malformed YAML

@pytest.mark.parametrize("flag", ["--config-file", "--dataset-config-file"])
@pytest.mark.parametrize("text, where, problem", [
    ("OPTIM:\n  LR: 0.1\n   MAX_EPOCH: 2\n", "line 3, column 13", "mapping values are not allowed here"),
    ("OPTIM:\n\tLR: 0.1\n", "line 2, column 1", "cannot start any token"),
    ("OPTIM:\n  LR: [0.1\n  MAX_EPOCH: 2\n", "line 3, column 12", "expected ',' or ']'"),
])
def test_malformed_yaml_is_one_line_naming_file_line_and_column(tmp_path, capsys, flag, text, where, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = tmp_path / "out"
    code, err = run_cli([flag, bad, "--trainer", "CoOp", "--output-dir", out], capsys)
    line = one_error_line(err)
    assert code == 2 and str(bad) in line and where in line and problem in line
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("OPTIM:\n  LR: abc\n", "Type mismatch"),  # yacs: another type than the default's
    ("- OPTIM\n- LR\n", "holds a YAML list"),
])
def test_config_file_of_the_wrong_shape_is_one_line(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code, err = run_cli(["--config-file", bad, "--output-dir", tmp_path / "out"], capsys)
    line = one_error_line(err)
    assert code == 2 and str(bad) in line and message in line


# ----------------------------------------------------------------------------- 2. output path under a file

@pytest.mark.parametrize("below", ["run", "a/b", ""])
def test_output_dir_under_a_file_is_one_line(tmp_path, tiny_data_root, tiny_clip_path, capsys, below):
    blocker = tmp_path / "some_file"
    blocker.write_text("not a folder")
    out = blocker / below if below else blocker
    code, err = run_cli(["--output-dir", out, *tiny_opts(tiny_data_root, tiny_clip_path, "ZeroshotCLIP")], capsys)
    line = one_error_line(err)
    assert code == 2 and f"{blocker} is a file, not a folder" in line
    assert blocker.read_text() == "not a folder"


# ----------------------------------------------------------------------------- 3. full disk

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_writing_results_is_one_line_and_leaves_no_results(tmp_path, tiny_data_root, tiny_clip_path,
                                                                      capsys, monkeypatch):
    out = tmp_path / "zs"
    opts = tiny_opts(tiny_data_root, tiny_clip_path, "ZeroshotCLIP")
    monkeypatch.setattr(os, "fsync", _no_space)  # results.json is written, then fsync'ed: the disk is full
    code, err = run_cli(["--output-dir", out, *opts], capsys)
    line = one_error_line(err)
    assert code == 2 and "disk full" in line and str(out / "results.json") in line
    assert not (out / "results.json").exists() and not list(out.glob(".results.json*"))
    monkeypatch.undo()
    assert run_cli(["--output-dir", out, *opts])[0] == 0  # nothing left that blocks the rerun
    assert (out / "results.json").is_file()


@pytest.mark.parametrize("failure", ["oserror", "torch"])
def test_full_disk_writing_a_checkpoint_is_one_line_and_resumable(tmp_path, tiny_data_root, tiny_clip_path,
                                                                   capsys, monkeypatch, failure):
    import shutil

    import torch

    if failure == "torch" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    out = tmp_path / "coop"
    opts = coop_opts(tiny_data_root, tiny_clip_path)
    real_save = torch.save
    if failure == "oserror":
        fail = _no_space
    else:  # what torch.save really raises on a full disk: a RuntimeError of its zip writer, no errno
        def fail(obj, f, *args, **kwargs):
            real_save(obj, "/dev/full")
        real_usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1 << 20))
    monkeypatch.setattr(torch, "save", fail)
    code, err = run_cli(["--output-dir", out, *opts], capsys)
    line = one_error_line(err)
    assert code == 2 and str(out) in line
    assert ("disk full" if failure == "oserror" else "the disk is full") in line
    assert "rerun the same command" in line
    assert not (out / "results.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no torn checkpoint left
    monkeypatch.undo()
    assert run_cli(["--output-dir", out, *opts])[0] == 0
    assert (out / "prompt_learner" / "model.pth.tar-2").is_file()


# ----------------------------------------------------------------------------- 4. damaged checkpoints

class Crash(Exception):
    """A crash mid-run that train.py does not handle (stands for a kill)."""


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoint_in_model_dir_is_one_line(tmp_path, tiny_data_root, tiny_clip_path, capsys):
    trained = tmp_path / "trained"
    opts = coop_opts(tiny_data_root, tiny_clip_path)
    assert run_cli(["--output-dir", trained, "--seed", 1, *opts])[0] == 0
    victim = trained / "prompt_learner" / "model.pth.tar-2"
    _cut(victim)
    out = tmp_path / "eval"
    code, err = run_cli(["--output-dir", out, "--eval-only", "--model-dir", trained, "--load-epoch", 2, *opts],
                        capsys)
    line = one_error_line(err)
    assert code == 2 and str(victim) in line and "truncated or damaged" in line
    assert "re-run the training" in line
    assert not (out / "results.json").exists()


def test_truncated_checkpoint_met_on_resume_says_how_to_start_again(tmp_path, tiny_data_root, tiny_clip_path,
                                                                    capsys, monkeypatch):
    from trainers.coop import CoOp

    out = tmp_path / "cut"
    opts = coop_opts(tiny_data_root, tiny_clip_path, "OPTIM.MAX_EPOCH", 3)
    original = CoOp.after_epoch

    def crash_after_first_epoch(self):
        original(self)
        if self.epoch == 0:
            raise Crash

    monkeypatch.setattr(CoOp, "after_epoch", crash_after_first_epoch)
    with pytest.raises(Crash):
        run_cli(["--output-dir", out, "--seed", 2, *opts])
    monkeypatch.setattr(CoOp, "after_epoch", original)
    victim = out / "prompt_learner" / "model.pth.tar-1"
    _cut(victim)
    capsys.readouterr()
    code, err = run_cli(["--output-dir", out, "--seed", 2, *opts], capsys)
    line = one_error_line(err)
    assert code == 2 and str(victim) in line and "truncated or damaged" in line
    assert f"delete {out}" in line
    # the advice works: after deleting the folder the same command trains from scratch
    import shutil
    shutil.rmtree(out)
    assert run_cli(["--output-dir", out, "--seed", 2, *opts])[0] == 0


# ----------------------------------------------------------------------------- 5. Ctrl-C

def test_ctrl_c_is_one_line_exit_130_and_resumable(tmp_path, tiny_data_root, tiny_clip_path, capsys, monkeypatch):
    from trainers.coop import CoOp

    out = tmp_path / "cut"
    opts = coop_opts(tiny_data_root, tiny_clip_path, "OPTIM.MAX_EPOCH", 3)
    original = CoOp.after_epoch

    def ctrl_c_after_first_epoch(self):
        original(self)
        if self.epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(CoOp, "after_epoch", ctrl_c_after_first_epoch)
    stdout = sys.stdout
    try:
        code, err = run_cli(["--output-dir", out, "--seed", 2, *opts], capsys)
    except KeyboardInterrupt:  # not re-raised: pytest would take it for the user's Ctrl-C and stop
        pytest.fail("Ctrl-C escaped main() as a KeyboardInterrupt: a traceback in train.py")
    assert code == 130  # 128 + SIGINT, as a shell reports it
    lines = err.strip().splitlines()
    assert lines[-1].startswith("interrupted") and "rerun the same command" in lines[-1]
    assert "Traceback" not in err and sys.stdout is stdout  # the log tee is gone
    assert not (out / "results.json").exists()
    monkeypatch.setattr(CoOp, "after_epoch", original)
    assert run_cli(["--output-dir", out, "--seed", 2, *opts])[0] == 0
    assert "Previous epoch: 1" in (out / "log.txt").read_text()


def test_a_callers_own_stop_signal_still_propagates(tmp_path, tiny_data_root, tiny_clip_path, monkeypatch):
    """The sweep's workers stop a run with a KeyboardInterrupt subclass of their own (SIGTERM)
    and catch it around ``launch.main``: it must reach them, not become an exit code."""
    from trainers.coop import CoOp

    class Stopped(KeyboardInterrupt):
        pass

    def stop(self):
        raise Stopped

    monkeypatch.setattr(CoOp, "after_epoch", stop)
    with pytest.raises(Stopped):
        run_cli(["--output-dir", tmp_path / "o", *coop_opts(tiny_data_root, tiny_clip_path)])


def test_sigint_to_train_py_exits_130_without_traceback(tmp_path, tiny_data_root, tiny_clip_path):
    out = tmp_path / "run"
    argv = ["train.py", "--output-dir", str(out), "--seed", "1",
            *coop_opts(tiny_data_root, tiny_clip_path, "OPTIM.MAX_EPOCH", 500)]
    # train.py as `python train.py`, with the tests' TinyShapes dataset registered first
    code = ("import sys, runpy; import tests.helpers; sys.argv = " + repr(argv)
            + "; runpy.run_path('train.py', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        deadline = time.time() + 240
        while not (out / "prompt_learner" / "checkpoint").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "train.py ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted")
    assert not (out / "results.json").exists() and (out / "prompt_learner" / "checkpoint").is_file()


# ----------------------------------------------------------------------------- 6. benchmark messages

@pytest.fixture
def tiny_world(monkeypatch):
    """A 6-class benchmark world dataset (as tests/test_benchmark.py) and its dataset class."""
    from datasets.benchmark import BenchmarkDataset, _spec
    from selftpt.benchmark import catalog
    from tests.test_benchmark import TINY

    monkeypatch.setitem(catalog.DATASETS, TINY.name, TINY)

    class TinyWorldDataset(BenchmarkDataset):
        spec = _spec(TINY.name, "tinyworld")

    return TINY, TinyWorldDataset


def _bench_cfg(name: str, root: Path):
    from tests.test_benchmark import _cfg
    return _cfg(name, root, -1, "all")


def _suggested_command(message: str) -> list[str]:
    """The `python -m selftpt.benchmark.materialize ...` command quoted in a message, as argv."""
    quoted = [part for i, part in enumerate(message.split("`")) if i % 2 == 1]
    commands = [shlex.split(q) for q in quoted if "selftpt.benchmark.materialize" in q]
    assert commands, message
    command = commands[0]
    assert command[:3] == ["python", "-m", "selftpt.benchmark.materialize"]
    return command[3:]


@pytest.mark.parametrize("damage", ["image", "split"])
def test_benchmark_repair_command_in_the_message_really_regenerates(tiny_world, tmp_path, damage):
    from selftpt.benchmark import materialize as mat
    from selftpt.errors import DatasetError

    spec, dataset_class = tiny_world
    folder = mat.materialize(spec.name, tmp_path, verbose=False)
    if damage == "image":
        victim = sorted((folder / "images").rglob("test_0001.png"))[0]
        victim.unlink()
    else:
        victim = folder / mat.split_filename(spec.name)
        victim.write_text('{"train": [')
    with pytest.raises(DatasetError) as caught:
        dataset_class(_bench_cfg(spec.name, tmp_path))
    message = str(caught.value)
    assert str(victim) in message and "prepare_data.py" not in message
    assert mat.main(_suggested_command(message)) in (0, None)  # what the user runs (in-process: the test's catalog)
    assert victim.is_file()
    assert len(dataset_class(_bench_cfg(spec.name, tmp_path)).test) == len(spec.classes) * spec.n_test


def test_wrong_fashion_mnist_env_path_is_an_error_naming_it(tmp_path, monkeypatch):
    from selftpt.benchmark import fashion

    wrong = tmp_path / "no_such_folder"
    monkeypatch.setenv(fashion.ENV_VAR, str(wrong))
    with pytest.raises(fashion.FashionMNISTUnavailable) as caught:
        fashion.locate()  # a wrong path is reported, never silently replaced by Debian's copy
    message = str(caught.value)
    assert str(wrong) in message and "$SELFTPT_FASHION_MNIST is set" in message
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv(fashion.ENV_VAR, str(partial))
    with pytest.raises(fashion.FashionMNISTUnavailable) as caught:
        fashion.locate()
    assert str(partial) in str(caught.value) and "t10k-labels-idx1-ubyte" in str(caught.value)


def test_wrong_fashion_mnist_env_path_through_the_dataset_and_the_cli(tmp_path, monkeypatch, capsys):
    import datasets  # noqa: F401  (registers the datasets)
    from selftpt.benchmark import fashion
    from selftpt.benchmark import materialize as mat
    from selftpt.errors import DatasetError
    from selftpt.toolbox import build_dataset

    wrong = tmp_path / "no_such_folder"
    monkeypatch.setenv(fashion.ENV_VAR, str(wrong))
    with pytest.raises(DatasetError) as caught:
        build_dataset(_bench_cfg("FashionMNIST", tmp_path / "data"))
    assert f"$SELFTPT_FASHION_MNIST is set, but no such folder: {wrong}" in str(caught.value)
    assert mat.main(["--root", str(tmp_path / "data"), "--datasets", "FashionMNIST"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(wrong) in line


def test_fashion_mnist_not_found_names_the_package_and_the_variable(tmp_path, monkeypatch):
    from selftpt.benchmark import fashion

    monkeypatch.delenv(fashion.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "no_debian_copy")
    with pytest.raises(fashion.FashionMNISTUnavailable) as caught:
        fashion.locate(tmp_path / "cache")
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message and "$SELFTPT_FASHION_MNIST" in message
    assert "is not set" in message and str(tmp_path / "no_debian_copy") in message


# ----------------------------------------------------------------------------- 7. umask

def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    import torch

    from datasets.common import atomic_write_bytes
    from selftpt.engine.checkpoint import save_checkpoint
    from selftpt.feature_cache import FeatureCache

    umask(mask)
    atomic_write_bytes(b"x", str(tmp_path / "split.json"))
    saved = Path(save_checkpoint({"state_dict": {}, "epoch": 1}, str(tmp_path / "ckpt")))
    entry = FeatureCache(tmp_path / "cache").save({"k": 1}, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    for path in (tmp_path / "split.json", saved, saved.parent / "checkpoint", entry):
        assert _mode(path) == file_mode, path


def test_results_and_run_files_follow_the_umask(tmp_path, tiny_data_root, tiny_clip_path, umask):
    umask(0o002)
    out = tmp_path / "zs"
    assert run_cli(["--output-dir", out, *tiny_opts(tiny_data_root, tiny_clip_path, "ZeroshotCLIP")])[0] == 0
    assert _mode(out / "results.json") == 0o664 and _mode(out / "log.txt") == 0o664 and _mode(out) == 0o775


def test_generated_benchmark_follows_the_umask(tiny_world, tmp_path, umask):
    from selftpt.benchmark import materialize as mat

    spec, _ = tiny_world
    umask(0o002)
    folder = mat.materialize(spec.name, tmp_path, verbose=False)
    assert _mode(folder) == 0o775  # not mkdtemp's 0700, which the group could not read on a shared root
    assert _mode(folder / mat.META_FILE) == 0o664 and _mode(folder / "images") == 0o775


# ----------------------------------------------------------------------------- 8. killed generation

def test_temp_folder_of_a_killed_generation_is_removed_by_the_next(tiny_world, tmp_path):
    from selftpt.benchmark import materialize as mat

    spec, _ = tiny_world
    # a generation killed with SIGKILL while writing images (no cleanup code runs)
    code = ("import os, signal, sys\n"
            "from selftpt.benchmark import catalog, materialize as mat\n"
            "from tests.test_benchmark import TINY\n"
            "catalog.DATASETS[TINY.name] = TINY\n"
            "mat._write = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "mat.materialize(TINY.name, sys.argv[1], verbose=False)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{spec.dataset_dir}.tmp-")
    mat.materialize(spec.name, tmp_path, verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == [spec.dataset_dir]  # the killed one's .tmp- folder is gone


def test_temp_folders_of_live_processes_and_other_hosts_are_kept(tiny_world, tmp_path):
    from selftpt.benchmark import materialize as mat

    spec, _ = tiny_world
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        live = tmp_path / f".{spec.dataset_dir}.tmp-{mat._host()}-{sleeper.pid}-abc123"
        other_host = tmp_path / f".{spec.dataset_dir}.tmp-elsewhere-{2 ** 22 + 1}-abc123"
        old_format = tmp_path / f".{spec.dataset_dir}.tmp-abc123"  # no owner recorded: never guessed at
        for folder in (live, other_host, old_format):
            folder.mkdir()
        mat.materialize(spec.name, tmp_path, verbose=False)
        kept = [spec.dataset_dir, live.name, other_host.name, old_format.name]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert mat.remove_dead_temps(tmp_path, verbose=False) == [live]  # its process is gone now
