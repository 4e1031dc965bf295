"""The real-Dassl path: CoOp through the CLI on Dassl 0.6.3 and what ``selftpt.toolbox`` fixes there.

Runs only where ``dassl`` is importable; the in-process runs need the toolbox to have picked
Dassl (``SELFTPT_BACKEND=dassl``, or ``auto`` with Dassl installed). How to set that up and
rerun the whole suite on Dassl: ``docs/real_dassl.md``.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

dassl = pytest.importorskip("dassl")

import torch  # noqa: E402

import selftpt.toolbox as toolbox  # noqa: E402
import trainers  # noqa: E402,F401  (registers the trainers)
from selftpt.launch import main  # noqa: E402
from tests.helpers import tiny_opts  # noqa: E402,F401  (also registers TinyShapes)

REPO = Path(__file__).resolve().parents[1]

on_dassl = pytest.mark.skipif(
    toolbox.BACKEND != "dassl", reason="toolbox is on the engine; rerun with SELFTPT_BACKEND=dassl"
)

# CoOp's own optimiser settings (configs/trainers/CoOp/*.yaml): one constant warm-up epoch.
WARMUP = ["OPTIM.WARMUP_EPOCH", "1", "OPTIM.WARMUP_TYPE", "constant", "OPTIM.WARMUP_CONS_LR", "1e-5"]


def coop_argv(out, data_root, clip_path, *flags):
    """train.py arguments: ``flags``, then CoOp on TinyShapes with warm-up as trailing opts."""
    opts = tiny_opts(data_root, clip_path, "CoOp") + ["TRAINER.COOP.N_CTX", "4", *WARMUP]
    return [str(a) for a in ["--output-dir", out, "--seed", 1, *flags, *opts]]


def results(folder):
    return json.loads((Path(folder) / "results.json").read_text())


def train_lines(folder):
    """The ``epoch [e/E] batch [b/B] ...`` lines of log.txt without their timings."""
    lines = [ln for ln in (Path(folder) / "log.txt").read_text().splitlines() if ln.startswith("epoch [")]
    return [re.sub(r" (time|data|eta) \S+( \(\S+\))?", "", ln) for ln in lines]


def subprocess_env(backend):
    env = dict(os.environ, SELFTPT_BACKEND=backend, PYTHONPATH=str(REPO))
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory, tiny_data_root, tiny_clip_path):
    out = tmp_path_factory.mktemp("dassl") / "coop_warmup"
    assert main(coop_argv(out, tiny_data_root, tiny_clip_path)) == 0
    return out


def test_backend_is_dassl_when_requested():
    if toolbox.BACKEND == "dassl":  # the trainers' base is Dassl's, with the engine's checkpoints
        assert issubclass(toolbox.TrainerX, dassl.engine.TrainerX)
        assert toolbox.DATASET_REGISTRY is dassl.data.datasets.DATASET_REGISTRY
        assert "CoOp" in dassl.engine.TRAINER_REGISTRY.registered_names()
    if os.environ.get("SELFTPT_BACKEND", "").strip().lower() == "dassl":
        assert toolbox.BACKEND == "dassl" and toolbox.USING_DASSL
        return
    # this process runs on another backend: ask a fresh interpreter (slow: imports torch)
    proc = subprocess.run([sys.executable, "-c", "import selftpt.toolbox as t; print(t.BACKEND)"],
                          cwd=REPO, env=subprocess_env("dassl"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "dassl"


@on_dassl
def test_coop_with_warmup_trains_and_evaluates_through_the_cli(warmup_run):
    # Dassl's own warm-up scheduler raises TypeError under torch >= 2.2; the toolbox's works.
    log = (warmup_run / "log.txt").read_text()
    assert "Toolbox backend: dassl" in log and "Finish training" in log and "* accuracy:" in log
    lrs = [float(ln.split(" lr ")[1].split()[0]) for ln in train_lines(warmup_run)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(0.01)  # warm-up, then cosine
    rec = results(warmup_run)
    assert rec["trainer"] == "CoOp" and rec["num_images"] == 24
    assert set(rec["metrics"]) >= {"accuracy", "macro_f1", "ece"}
    # Dassl's layout, and Dassl's own loader (torch.load weights_only) reads our checkpoints
    folder = warmup_run / "prompt_learner"
    assert (folder / "checkpoint").read_text().strip() == "model.pth.tar-2"
    checkpoint = dassl.utils.load_checkpoint(str(folder / "model.pth.tar-2"))
    assert checkpoint["epoch"] == 2 and set(checkpoint["state_dict"]) >= {"ctx"}
    assert "rng_state" in checkpoint  # what makes a resumed run continue the same random stream


@on_dassl
def test_same_seed_gives_the_same_run_on_both_backends(warmup_run, tmp_path, tiny_data_root, tiny_clip_path):
    """The engine implements Dassl's semantics: same seed, same losses, lrs and metrics.
    (No "engine" in this test's name: the Dassl suite is run with ``-k "not engine"``.)"""
    out = tmp_path / "engine"
    code = ("import sys, trainers, tests.helpers; from selftpt.launch import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *coop_argv(out, tiny_data_root, tiny_clip_path)],
                          cwd=REPO, env=subprocess_env("engine"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Toolbox backend: engine" in (out / "log.txt").read_text()
    assert train_lines(out) == train_lines(warmup_run)
    engine, real = results(out)["metrics"], results(warmup_run)["metrics"]
    assert engine.keys() == real.keys()
    for key in real:
        assert engine[key] == pytest.approx(real[key], abs=1e-6), key


@on_dassl
def test_eval_only_reads_a_checkpoint_that_pickles_its_scheduler(warmup_run, tmp_path, tiny_data_root,
                                                                 tiny_clip_path):
    """Dassl's warm-up schedulers put the successor scheduler object in ``state_dict()``, so
    checkpoints written by Dassl (e.g. CoOp's released weights) pickle it, and Dassl's own
    ``load_checkpoint`` (torch >= 2.6 ``weights_only`` default) refuses them."""
    checkpoint = torch.load(warmup_run / "prompt_learner" / "model.pth.tar-2", weights_only=False)
    optim = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    checkpoint["scheduler"] = {"successor": torch.optim.lr_scheduler.CosineAnnealingLR(optim, 2.0),
                               "warmup_epoch": 1, "cons_lr": 1e-5, "last_epoch": 2}
    checkpoint.pop("rng_state")
    model_dir = tmp_path / "dassl_made"
    (model_dir / "prompt_learner").mkdir(parents=True)
    torch.save(checkpoint, model_dir / "prompt_learner" / "model.pth.tar-2")
    with pytest.raises(Exception, match="[Ww]eights.only"):
        dassl.utils.load_checkpoint(str(model_dir / "prompt_learner" / "model.pth.tar-2"))
    out = tmp_path / "eval"
    argv = coop_argv(out, tiny_data_root, tiny_clip_path, "--eval-only", "--model-dir", model_dir,
                     "--load-epoch", 2)
    assert main(argv) == 0
    # ECE follows every confidence, so equal ECE means the loaded prompt is the trained one (the
    # tiny world's accuracy is at chance whatever the prompt)
    loaded, trained = results(out)["metrics"], results(warmup_run)["metrics"]
    assert loaded.keys() == trained.keys()
    for key in trained:
        assert loaded[key] == pytest.approx(trained[key], abs=1e-9), key


def test_broken_dassl_install_is_named():
    """A Dassl whose requirements are missing (here scikit-learn): ``SELFTPT_BACKEND=dassl``
    refuses with the missing module named (not a traceback from deep inside Dassl); ``auto``
    warns and uses the engine. One interpreter for both, as each start imports torch."""
    code = """if True:
        import os, sys, warnings
        sys.modules["sklearn"] = None  # as if scikit-learn were not installed
        try:
            import selftpt.toolbox
        except ImportError as exc:
            print("dassl:", exc)
        else:
            print("dassl: imported")
        sys.modules.pop("selftpt.toolbox", None)
        os.environ["SELFTPT_BACKEND"] = "auto"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import selftpt.toolbox as t
        print("auto:", t.BACKEND, "|", " ".join(str(w.message) for w in caught))
    """
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env("dassl"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    forced, auto = proc.stdout.strip().splitlines()[-2:]
    assert forced.startswith("dassl: SELFTPT_BACKEND=dassl but Dassl cannot be imported") and "sklearn" in forced
    assert auto.startswith("auto: engine |") and "Dassl is installed but cannot be imported" in auto
    assert "sklearn" in auto
