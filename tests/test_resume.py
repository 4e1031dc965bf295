"""Checkpoints and resume: an interrupted run resumes to the same run, a checkpoint set split by
an interrupt resumes from its last complete epoch, the default config saves every epoch and keeps
only the latest, and eval-only runs load (and record) a trained model or refuse to run without one.
"""
from __future__ import annotations

import json
import os.path as osp
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import selftpt.engine.trainer as engine_trainer
import trainers  # noqa: F401  (registers the trainers)
from selftpt.launch import main
from selftpt.toolbox import TRAINER_REGISTRY, build_trainer, load_checkpoint
from tests.helpers import project_trainers, tiny_cfg, tiny_opts

TRAINING = project_trainers(trains=True)
TRAINING_FREE = project_trainers(trains=False)
# Fast settings per trainer on top of tests.helpers.tiny_opts. Self-TPT: batches of 4 images and
# CPT on 4 of the 6 classes, so that CPT samples classes (its generator is training state).
# PromptSRC: a GPA whose weights spread over the 3 epochs, so that its running sum is training state.
EXTRA_OPTS = {"CoOp": ["TRAINER.COOP.N_CTX", "4"], "CoCoOp": ["TRAINER.COCOOP.N_CTX", "4"],
              "PromptSRC": ["TRAINER.PROMPTSRC.GPA_MEAN", "1.0", "TRAINER.PROMPTSRC.GPA_STD", "1.0"],
              "SelfTPT": ["TRAINER.SELFTPT.TTA_STEPS", "3", "TRAINER.SELFTPT.CPT_MAX_CLASSES", "4",
                          "DATALOADER.TRAIN_X.BATCH_SIZE", "4"],
              "TPT": ["TRAINER.TPT.N_VIEWS", "4"]}


def opts_for(root: Path, clip: Path, trainer: str, *more: Any) -> list[str]:
    return tiny_opts(root, clip, trainer) + EXTRA_OPTS.get(trainer, []) + [str(x) for x in more]


def run_cli(*args: Any) -> int:
    return main([str(a) for a in args])


def interrupted(*args: Any) -> None:
    """Run train.py expecting it to stop without finishing (Ctrl-C raised inside it: it either
    propagates or becomes a non-zero exit)."""
    try:
        code = run_cli(*args)
    except KeyboardInterrupt:
        return
    assert code != 0, "the interrupted run finished"


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def model_folders(run: Path) -> list[str]:
    return sorted(p.parent.name for p in run.glob("*/checkpoint"))


def loss_lines(log: str, from_epoch: int) -> list[str]:
    """Training log lines of epoch >= ``from_epoch`` without their timings (losses, lr, cosines)."""
    lines = []
    for line in log.splitlines():
        match = re.match(r"epoch \[(\d+)/\d+\]", line)
        if match and int(match.group(1)) >= from_epoch:
            lines.append(re.sub(r" (time|data) \S+ \(\S+\)| eta \S+", "", line))
    return lines


def assert_same_final_models(full: Path, resumed: Path, epoch: int) -> None:
    names = model_folders(full)
    assert names and model_folders(resumed) == names
    for name in names:
        a = load_checkpoint(str(full / name / f"model.pth.tar-{epoch}"))["state_dict"]
        b = load_checkpoint(str(resumed / name / f"model.pth.tar-{epoch}"))["state_dict"]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after resuming"


def test_every_project_trainer_is_classified():
    # guards the parametrisations below against an empty or partial list
    assert {"CoOp", "CoCoOp", "SelfTPT"} <= set(TRAINING)
    assert {"ZeroshotCLIP", "ZeroshotCLIP2", "TPT"} <= set(TRAINING_FREE)


# ------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("trainer", TRAINING)
def test_interrupted_run_resumes_to_the_same_run(trainer, tmp_path, tiny_data_root, tiny_clip_path,
                                                 monkeypatch):
    # killed in the middle of epoch 2 of 3 (after epoch 1's checkpoint), then run again
    opts = opts_for(tiny_data_root, tiny_clip_path, trainer, "OPTIM.MAX_EPOCH", 3,
                    "TRAIN.CHECKPOINT_FREQ", 1, "TRAIN.PRINT_FREQ", 1)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli("--output-dir", full, "--seed", 3, *opts) == 0

    cls = TRAINER_REGISTRY.get(trainer)
    forward_backward = cls.forward_backward

    def killed_in_epoch_2(self, batch):
        if self.epoch == 1 and self.batch_idx == 2:
            raise KeyboardInterrupt
        return forward_backward(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(cls, "forward_backward", killed_in_epoch_2)
        interrupted("--output-dir", cut, "--seed", 3, *opts)
    assert not (cut / "results.json").exists()
    assert run_cli("--output-dir", cut, "--seed", 3, *opts) == 0

    log = (cut / "log.txt").read_text()
    assert "Previous epoch: 1" in log  # it resumed rather than restarted
    assert_same_final_models(full, cut, epoch=3)
    done, again = results(full), results(cut)
    assert again["metrics"] == done["metrics"]
    assert again["extra"].get("grad_cos_per_epoch") == done["extra"].get("grad_cos_per_epoch")
    if trainer == "SelfTPT":
        assert len(again["extra"]["grad_cos_per_epoch"]) == 3  # every epoch, not only the resumed ones
    # every loss (CE, CPT, GM), lr and gradient cosine of the resumed epochs
    assert loss_lines(log, 2) == loss_lines((full / "log.txt").read_text(), 2)
    assert again["model"]["resumed_from"] == {"directory": str(cut), "epoch": 1}
    assert done["model"]["resumed_from"] is None


@pytest.mark.parametrize("trainer", TRAINING)
def test_training_state_round_trips(trainer, tmp_path, tiny_data_root, tiny_clip_path):
    # in amp every trainer has a GradScaler; its scale is training state too
    extra = [f"TRAINER.{TRAINER_REGISTRY.get(trainer).CFG_NODE}.PREC", "amp"]
    make = lambda: build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, trainer,  # noqa: E731
                                          ("OUTPUT_DIR", str(tmp_path), *extra)))
    with pytest.warns(UserWarning):  # amp on CPU is honoured with a warning
        source = make()
    source.best_result = 42.0
    if source.scaler is not None:
        source.scaler.scale(torch.ones(()))  # the scale is created lazily, by the first use
        source.scaler.update(new_scale=123.0)
    if trainer == "SelfTPT":
        source.grad_ema.update(torch.randn_like(source.model.prompt_learner.ctx))
        torch.randperm(10, generator=source.cpt_generator)
        source.grad_scale.scale, source.grad_scale.backoffs = 64.0, 4
        source.epoch_grad_cos = [0.5]
    source.result_extra["recorded_in_training"] = [0.1, 0.2]  # e.g. Self-TPT's grad_cos_per_epoch
    state = source.training_state()

    with pytest.warns(UserWarning):
        target = make()
    assert not same(target.training_state(), state)  # the fresh trainer differs ...
    target.load_training_state(state)
    assert same(target.training_state(), state)  # ... until the state is loaded
    if source.scaler is not None:
        assert state["grad_scaler"]["scale"] == target.scaler.get_scale() == 123.0


def same(a: Any, b: Any) -> bool:
    """Deep equality of nested dicts/lists/tuples holding tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_checkpoint_set_split_by_an_interrupt_resumes_from_its_last_complete_epoch(
        tmp_path, tiny_data_root, tiny_clip_path, monkeypatch, capsys):
    # Self-TPT saves prompt_learner then cpt_head; killed between the two saves of epoch 2
    opts = opts_for(tiny_data_root, tiny_clip_path, "SelfTPT", "OPTIM.MAX_EPOCH", 3, "TRAIN.CHECKPOINT_FREQ", 1)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli("--output-dir", full, "--seed", 4, *opts) == 0

    save_checkpoint = engine_trainer.save_checkpoint

    def killed_before_the_head_of_epoch_2(state, save_dir, *args, **kwargs):
        if state["epoch"] == 2 and osp.basename(save_dir) == "cpt_head":
            raise KeyboardInterrupt
        return save_checkpoint(state, save_dir, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine_trainer, "save_checkpoint", killed_before_the_head_of_epoch_2)
        interrupted("--output-dir", cut, "--seed", 4, *opts)
    assert (cut / "prompt_learner" / "checkpoint").read_text().strip() == "model.pth.tar-2"
    assert (cut / "cpt_head" / "checkpoint").read_text().strip() == "model.pth.tar-1"
    assert (cut / "prompt_learner" / "model.pth.tar-1").is_file()  # kept: epoch 2's set is incomplete

    capsys.readouterr()
    assert run_cli("--output-dir", cut, "--seed", 4, *opts) == 0
    out = capsys.readouterr().out
    assert ("Checkpoints are from different epochs (prompt_learner at epoch 2, cpt_head at epoch 1; the run "
            "was stopped while saving): resuming from epoch 1, the last epoch saved for every model") in out
    assert_same_final_models(full, cut, epoch=3)
    assert results(cut)["metrics"] == results(full)["metrics"]
    assert results(cut)["extra"]["grad_cos_per_epoch"] == results(full)["extra"]["grad_cos_per_epoch"]


def test_checkpoint_set_without_a_common_epoch_is_a_one_line_error(tmp_path, tiny_data_root, tiny_clip_path,
                                                                    capsys):
    opts = opts_for(tiny_data_root, tiny_clip_path, "SelfTPT", "OPTIM.MAX_EPOCH", 3)
    run = tmp_path / "run"
    assert run_cli("--output-dir", run, "--seed", 4, *opts, "OPTIM.MAX_EPOCH", 2) == 0
    (run / "results.json").unlink()
    head = run / "cpt_head"
    (head / "model.pth.tar-2").rename(head / "model.pth.tar-1")  # as if epoch 2 never reached the head
    (head / "checkpoint").write_text("model.pth.tar-1\n")
    capsys.readouterr()
    assert run_cli("--output-dir", run, "--seed", 4, *opts) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: The checkpoints under") and "no epoch is saved for every model" in err[-1]


# ------------------------------------------------------------------ default checkpointing
def test_default_config_saves_every_epoch_keeps_the_latest_and_resumes(tmp_path, tiny_data_root,
                                                                        tiny_clip_path, monkeypatch):
    # the shipped configs leave TRAIN.CHECKPOINT_FREQ at its default
    opts = opts_for(tiny_data_root, tiny_clip_path, "CoOp", "OPTIM.MAX_EPOCH", 3)
    run = tmp_path / "run"
    forward_backward = TRAINER_REGISTRY.get("CoOp").forward_backward

    def killed_in_epoch_3(self, batch):
        if self.epoch == 2 and self.batch_idx == 1:
            raise KeyboardInterrupt
        return forward_backward(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(TRAINER_REGISTRY.get("CoOp"), "forward_backward", killed_in_epoch_3)
        interrupted("--output-dir", run, "--seed", 5, *opts)
    folder = run / "prompt_learner"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint", "model.pth.tar-2"]  # epoch 1's pruned

    assert run_cli("--output-dir", run, "--seed", 5, *opts) == 0
    assert "Previous epoch: 2" in (run / "log.txt").read_text()
    # CoOp's names: the last epoch's file, which --load-epoch <MAX_EPOCH> loads, and the pointer
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint", "model.pth.tar-3"]
    assert (folder / "checkpoint").read_text() == "model.pth.tar-3\n"
    checkpoint = load_checkpoint(str(folder / "model.pth.tar-3"))
    assert checkpoint["epoch"] == 3 and "ctx" in checkpoint["state_dict"]  # what CoOp reads

    evaluated = tmp_path / "eval"
    assert run_cli("--output-dir", evaluated, "--seed", 5, "--eval-only", "--model-dir", run,
                   "--load-epoch", 3, *opts) == 0
    assert results(evaluated)["metrics"]["accuracy"] == results(run)["metrics"]["accuracy"]


def test_keep_checkpoints_zero_keeps_every_epoch(tmp_path, tiny_data_root, tiny_clip_path):
    run = tmp_path / "run"
    opts = opts_for(tiny_data_root, tiny_clip_path, "CoOp", "OPTIM.MAX_EPOCH", 3, "TRAIN.KEEP_CHECKPOINTS", 0)
    assert run_cli("--output-dir", run, "--seed", 5, *opts) == 0
    assert sorted(p.name for p in (run / "prompt_learner").iterdir()) == [
        "checkpoint", "model.pth.tar-1", "model.pth.tar-2", "model.pth.tar-3"]


# --------------------------------------------------------------------------- eval-only
@pytest.mark.parametrize("trainer", TRAINING)
def test_eval_only_without_a_model_is_refused(trainer, tmp_path, tiny_data_root, tiny_clip_path, capsys):
    out = tmp_path / "eval"
    code = run_cli("--output-dir", out, "--eval-only", *opts_for(tiny_data_root, tiny_clip_path, trainer))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: --eval-only needs --model-dir for {trainer}")
    assert not out.exists()  # refused before anything was built or written


@pytest.mark.parametrize("trainer", TRAINING_FREE)
def test_training_free_eval_only_records_that_no_model_was_loaded(trainer, tmp_path, tiny_data_root,
                                                                   tiny_clip_path):
    out = tmp_path / "eval"
    assert run_cli("--output-dir", out, "--eval-only", *opts_for(tiny_data_root, tiny_clip_path, trainer)) == 0
    model = results(out)["model"]
    assert model["source"] == "none" and "files" not in model


def test_zero_shot_clip_given_a_model_dir_says_it_is_not_used(tmp_path, tiny_data_root, tiny_clip_path, capsys):
    out = tmp_path / "eval"
    assert run_cli("--output-dir", out, "--eval-only", "--model-dir", tmp_path / "some_run",
                   *opts_for(tiny_data_root, tiny_clip_path, "ZeroshotCLIP")) == 0
    note = f"Note: ZeroshotCLIP has no trained weights; --model-dir {tmp_path / 'some_run'} is not used"
    assert note in capsys.readouterr().out.splitlines()
    assert results(out)["model"]["source"] == "none"  # recorded as what it is, not as a checkpoint


def test_results_record_which_model_was_evaluated(tmp_path, tiny_data_root, tiny_clip_path):
    trained = tmp_path / "coop"
    opts = opts_for(tiny_data_root, tiny_clip_path, "CoOp")
    assert run_cli("--output-dir", trained, "--seed", 1, *opts) == 0
    checkpoint = str(trained / "prompt_learner" / "model.pth.tar-2")
    assert results(trained)["model"] == {"source": "trained", "directory": str(trained), "epoch": 2,
                                         "files": {"prompt_learner": checkpoint}, "resumed_from": None}

    evaluated = tmp_path / "eval"
    assert run_cli("--output-dir", evaluated, "--eval-only", "--model-dir", trained, "--load-epoch", 2, *opts) == 0
    loaded = {"source": "checkpoint", "directory": str(trained), "epoch": 2, "files": {"prompt_learner": checkpoint}}
    assert results(evaluated)["model"] == loaded

    # TEST.FINAL_MODEL best_val: the best epoch's checkpoint, reloaded after training, is what was evaluated
    best = tmp_path / "best"
    assert run_cli("--output-dir", best, "--seed", 1, *opts, "TEST.FINAL_MODEL", "best_val") == 0
    record = results(best)["model"]
    assert record["source"] == "trained" and record["epoch"] in (1, 2)
    assert record["files"] == {"prompt_learner": str(best / "prompt_learner" / "model-best.pth.tar")}

    # TPT+CoOp: a training-free method that starts from a loaded prompt records it as well
    tpt = tmp_path / "tpt"
    assert run_cli("--output-dir", tpt, "--eval-only", "--model-dir", trained, "--load-epoch", 2,
                   *opts_for(tiny_data_root, tiny_clip_path, "TPT", "TRAINER.TPT.N_CTX", 4,
                             "TRAINER.TPT.CTX_INIT", '""')) == 0
    assert results(tpt)["model"] == loaded


def test_checkpoint_file_is_the_asked_epoch_else_the_best_else_the_pointers(tmp_path):
    """``--model-dir`` resolution as CoOp's ``load_model``: ``--load-epoch E`` takes
    model.pth.tar-E, otherwise model-best.pth.tar when TEST.FINAL_MODEL best_val saved one,
    otherwise the file named by the ``checkpoint`` pointer (the latest epoch)."""
    from selftpt.trainer_base import CheckpointError, ClipTrainer

    folder = tmp_path / "prompt_learner"
    find = ClipTrainer._checkpoint_path
    with pytest.raises(CheckpointError, match=re.escape(f"No checkpoint at {folder / 'model.pth.tar-2'}"
                                                        " (the folder has no checkpoints)")):
        find(str(tmp_path), "prompt_learner", 2)  # not even the folder
    folder.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"No checkpoint at {folder / 'model-best.pth.tar'} "
                                                        "(the folder has no checkpoints); check --model-dir")):
        find(str(tmp_path), "prompt_learner", None)
    for name in ("model.pth.tar-1", "model.pth.tar-2"):
        (folder / name).write_bytes(b"")
    (folder / "checkpoint").write_text("model.pth.tar-2\n")
    assert find(str(tmp_path), "prompt_learner", None) == str(folder / "model.pth.tar-2")
    assert find(str(tmp_path), "prompt_learner", 1) == str(folder / "model.pth.tar-1")
    (folder / "model-best.pth.tar").write_bytes(b"")
    assert find(str(tmp_path), "prompt_learner", None) == str(folder / "model-best.pth.tar")
    assert find(str(tmp_path), "prompt_learner", 2) == str(folder / "model.pth.tar-2")
    with pytest.raises(CheckpointError, match=re.escape(
            f"No checkpoint at {folder / 'model.pth.tar-3'} (found: checkpoint, model-best.pth.tar, "
            "model.pth.tar-1, model.pth.tar-2); check --model-dir and --load-epoch")):
        find(str(tmp_path), "prompt_learner", 3)


def test_training_state_keys_a_checkpoint_lacks_keep_their_fresh_values():
    """Checkpoints written before a key existed (or by a run in another precision) still load."""
    from types import SimpleNamespace

    from selftpt.trainer_base import ClipTrainer

    fresh = SimpleNamespace(best_result=-1.0, result_extra={"kept": 1})  # no GradScaler attribute at all
    ClipTrainer.load_training_state(fresh, {"grad_scaler": {"scale": 8.0}})
    assert fresh.best_result == -1.0 and fresh.result_extra == {"kept": 1}
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    fp16 = SimpleNamespace(best_result=-1.0, result_extra={}, scaler=scaler)
    ClipTrainer.load_training_state(fp16, {"best_result": 0.5})  # saved without a scaler state
    ClipTrainer.load_training_state(fp16, {"grad_scaler": {}})  # saved by a disabled scaler
    assert fp16.best_result == 0.5 and scaler.get_scale() == 4.0


def test_eval_only_without_a_model_dir_prints_dassls_note(capsys):
    from types import SimpleNamespace

    from selftpt.trainer_base import ClipTrainer

    ClipTrainer.load_model(SimpleNamespace(), "")
    assert capsys.readouterr().out == "Note that load_model() is skipped as no pretrained model is given\n"


def test_a_checkpoint_that_does_not_fit_the_model_is_named_with_the_tensor(tmp_path, tiny_data_root, tiny_clip_path):
    """--model-dir from another config: a tensor of another shape names both shapes, a missing
    one names the keys; the class-name buffers of another class set are not loaded (kept)."""
    from selftpt.toolbox import save_checkpoint
    from selftpt.trainer_base import CheckpointError

    trainer = build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, "CoOp", ("OUTPUT_DIR", str(tmp_path / "run"))))
    learner = trainer._models["prompt_learner"]
    own = {key: value.clone() for key, value in learner.state_dict().items()}
    ctx_shape = tuple(own["ctx"].shape)

    def load(state: dict, folder: str) -> None:
        save_checkpoint({"state_dict": state, "epoch": 1}, str(tmp_path / folder / "prompt_learner"))
        trainer.load_model(str(tmp_path / folder), epoch=1)

    other_class_set = {**own, "ctx": own["ctx"] + 1, "token_prefix": own["token_prefix"][:1] * 0 + 7}
    load(other_class_set, "fits")
    assert torch.equal(learner.ctx, own["ctx"] + 1) and torch.equal(learner.token_prefix, own["token_prefix"])
    longer = (ctx_shape[0] + 2, *ctx_shape[1:])
    with pytest.raises(CheckpointError, match=re.escape(
            f"holds prompt_learner.ctx of shape {longer} but the model built from this config expects "
            f"{ctx_shape} (check N_CTX, CTX_INIT, CSC, HEAD and the backbone)")):
        load({**own, "ctx": torch.zeros(longer)}, "longer")
    path = tmp_path / "lacking" / "prompt_learner" / "model.pth.tar-1"
    with pytest.raises(CheckpointError, match=re.escape(f"Checkpoint {path} lacks ['ctx'] needed by prompt_learner")):
        load({key: value for key, value in own.items() if key != "ctx"}, "lacking")


@pytest.mark.parametrize("trainer_name", ["CoOp", "TPT"])
def test_init_weights_start_the_prompt_from_a_file(trainer_name, tmp_path, tiny_data_root, tiny_clip_path):
    """MODEL.INIT_WEIGHTS (Dassl's key): the prompt learner starts from the checkpoint's tensors
    that fit it; the others are left out."""
    from selftpt.toolbox import save_checkpoint

    def build(*opts: str):
        return build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, trainer_name,
                                      ("OUTPUT_DIR", str(tmp_path / "run"), *opts)))

    fresh = build().model.prompt_learner.ctx.detach().clone()
    start = torch.linspace(-1, 1, fresh.numel()).reshape(fresh.shape)
    save_checkpoint({"state_dict": {"ctx": start, "not_in_the_learner": torch.zeros(3)}, "epoch": 1},
                    str(tmp_path / "init"))
    learner = build("MODEL.INIT_WEIGHTS", str(tmp_path / "init" / "model.pth.tar-1")).model.prompt_learner
    assert not torch.equal(start, fresh) and torch.equal(learner.ctx.detach(), start)
