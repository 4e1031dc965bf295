"""Every bad config value is refused in one line naming key, value and what is allowed, before
any work starts (no output folder, no data, no model)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import trainers  # noqa: F401  (registers the trainers)
from selftpt.config import extend_cfg, validate_cfg
from selftpt.errors import ConfigError, UserError
from selftpt.launch import build_parser, main, setup_cfg
from selftpt.toolbox import TRAINER_REGISTRY, build_trainer, get_cfg_default
from tests.helpers import tiny_cfg, tiny_opts

BAD = [
    ("SelfTPT", "DATASET.NUM_SHOTS", "-3", "must be -1 (all images) or a positive number of shots"),
    ("SelfTPT", "DATASET.SUBSAMPLE_CLASSES", "half", "allowed: all, base, new"),
    ("CoOp", "INPUT.TRANSFORMS", "['random_flip', 'random_fip']", "unknown choice(s) random_fip; allowed: random_flip"),
    ("SelfTPT", "TRAINER.SELFTPT.VIEW_AGGREGATION", "foo", "allowed: mean, confident"),
    ("SelfTPT", "TRAINER.SELFTPT.HEAD", "mlp2", "allowed: mlp, linear, none"),
    ("SelfTPT", "TRAINER.SELFTPT.CPT_VIEWS", "['end', 'end']", "at least 2 different of"),
    ("SelfTPT", "TRAINER.SELFTPT.CPT_VIEWS", "['end', 'sideways']", "unknown choice(s) sideways; allowed: end"),
    ("SelfTPT", "TRAINER.SELFTPT.GM_EMA", "1.0", "must be >= 0 and < 1"),
    ("SelfTPT", "TRAINER.SELFTPT.TTA_OPTIM", "lbfgs", "allowed: adamw, adam, sgd"),
    ("SelfTPT", "TRAINER.SELFTPT.CLASS_TOKEN_POSITION", "left", "allowed: end, middle, front"),
    ("SelfTPT", "TRAINER.SELFTPT.CPT_MAX_CLASSES", "1", "must be >= 2"),
    ("SelfTPT", "TRAINER.SELFTPT.TEMPERATURE", "0.0", "must be > 0"),
    ("SelfTPT", "OPTIM.MAX_EPOCH", "0", "needs at least 1 epoch"),
    ("CoOp", "OPTIM.NAME", "adagrad", "allowed: adam, amsgrad, sgd, rmsprop, radam, adamw"),
    ("CoOp", "OPTIM.LR_SCHEDULER", "linear", "allowed: single_step, multi_step, cosine"),
    ("CoOp", "OPTIM.LR", "-0.1", "must be > 0"),
    ("CoOp", "TRAINER.COOP.CLASS_TOKEN_POSITION", "start", "allowed: end, middle, front"),
    ("CoOp", "TRAINER.COOP.PREC", "bf16", "allowed: fp16, fp32, amp, auto"),
    ("CoOp", "TRAINER.COOP.N_CTX", "0", "must be >= 1"),
    ("TPT", "TRAINER.TPT.SELECTION_P", "1.5", "must be > 0 and <= 1"),
    ("TPT", "TRAINER.TPT.AUGMIX", "yes", "allowed: auto, on, off"),
    ("ZeroshotCLIP", "TRAINER.ZSCLIP.ENSEMBLE", "clip81", "allowed: coop_select, clip80"),
]


@pytest.mark.parametrize("trainer, key, value, allowed", BAD, ids=[f"{k}={v}" for _, k, v, _ in BAD])
def test_a_bad_value_is_one_line_before_any_work(trainer, key, value, allowed, tmp_path, capsys,
                                                 tiny_data_root, tiny_clip_path):
    out = tmp_path / "run"
    code = main(["--output-dir", str(out), *tiny_opts(tiny_data_root, tiny_clip_path, trainer), key, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {key} is ") and allowed in err[0]
    assert not out.exists()  # refused before the output folder, the data or the model


def test_gm_without_cpt_is_refused_with_both_keys_named(tmp_path, capsys, tiny_data_root, tiny_clip_path):
    """(TTA without CPT is refused as well: stage 2 needs the CPT head trained in stage 1.)"""
    code = main(["--output-dir", str(tmp_path / "run"), *tiny_opts(tiny_data_root, tiny_clip_path, "SelfTPT"),
                 "TRAINER.SELFTPT.USE_CPT", "False"])
    err = capsys.readouterr().err
    assert code == 2 and "USE_GM is True but TRAINER.SELFTPT.USE_CPT is False" in err


def test_training_free_trainers_need_no_epochs():
    cfg = extend_cfg(get_cfg_default())
    cfg.OPTIM.MAX_EPOCH = 0
    validate_cfg(cfg, trains=False)  # ZeroshotCLIP, TPT: nothing to train
    with pytest.raises(ConfigError, match="OPTIM.MAX_EPOCH is 0"):
        validate_cfg(cfg, trains=True)


def test_a_trainer_built_directly_checks_its_config_by_whether_it_trains(tiny_data_root, tiny_clip_path, tmp_path):
    """Dassl's check_cfg hook, for code that builds a trainer without train.py."""
    def build(trainer):
        return build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, trainer,
                                      ("OUTPUT_DIR", str(tmp_path / trainer), "OPTIM.MAX_EPOCH", "0")))
    assert build("ZeroshotCLIP").max_epoch == 0
    with pytest.raises(ConfigError, match="OPTIM.MAX_EPOCH is 0"):
        build("CoOp")


def test_an_input_size_the_backbone_was_not_trained_at_is_refused_with_the_fix(tiny_data_root, tiny_clip_path,
                                                                               tmp_path):
    cfg = tiny_cfg(tiny_data_root, tiny_clip_path, "CoOp", ("OUTPUT_DIR", str(tmp_path), "INPUT.SIZE", "(64, 64)"))
    with pytest.raises(UserError, match=re.escape(f"INPUT.SIZE is (64, 64) but backbone {tiny_clip_path} expects "
                                                  "(32, 32); set INPUT.SIZE [32, 32]")):
        build_trainer(cfg)


def test_the_shipped_defaults_and_every_config_file_are_valid():
    repo = Path(__file__).resolve().parents[1]
    validate_cfg(extend_cfg(get_cfg_default()))
    files = sorted((repo / "configs" / "trainers").glob("*/*.yaml"))
    assert len(files) >= 20
    for path in files:
        cfg = setup_cfg(build_parser().parse_args(["--trainer", path.parent.name, "--config-file", str(path)]))
        validate_cfg(cfg, trains=TRAINER_REGISTRY.get(path.parent.name).TRAINS)
