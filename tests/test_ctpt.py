"""C-TPT (trainers/ctpt.py): TPT's per-image step on marginal entropy - LAMBDA x text feature
dispersion (ATFD), on the tiny CLIP and TinyShapes, on CPU."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import yaml

import trainers  # noqa: F401  (registers the trainers)
from selftpt.losses import marginal_entropy, select_confident, text_feature_dispersion
from selftpt.toolbox import build_trainer, set_random_seed
from tests.helpers import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
N_VIEWS = 16


def make_trainer(root, clip_path, tmp_path, kind="CTPT", *opts):
    node = "CTPT" if kind == "CTPT" else "TPT"
    torch.manual_seed(0)
    cfg = tiny_cfg(root, clip_path, kind, ("OUTPUT_DIR", str(tmp_path / kind), "SEED", "1",
                                           f"TRAINER.{node}.N_VIEWS", str(N_VIEWS), *opts))
    trainer = build_trainer(cfg)
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    return trainer


def views_of(trainer, index=0):
    """The (V, 3, H, W) views of one test image, from the trainer's own loader."""
    batches = iter(trainer.test_loader)
    for _ in range(index):
        next(batches)
    images, _ = trainer.parse_batch_test(next(batches))
    return images[0]


def dispersion_of(trainer) -> float:
    with torch.no_grad():
        return float(text_feature_dispersion(trainer.model.text_features()))


# ------------------------------------------------------------------------------ the loss
def test_dispersion_equals_hand_computed_value():
    # centroid of (1, 0), (0, 1), (-1, 0) is (0, 1/3): distances sqrt(10)/3, 2/3, sqrt(10)/3
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    expected = (2 * math.sqrt(10) / 3 + 2 / 3) / 3
    assert text_feature_dispersion(features).item() == pytest.approx(expected, rel=1e-6)
    assert text_feature_dispersion(features[:1]).item() == 0.0  # one class: no dispersion
    assert text_feature_dispersion(features.half()).dtype == torch.float32


def test_one_step_applies_the_gradient_of_entropy_minus_lambda_dispersion(tiny_data_root, tiny_clip_path,
                                                                          tmp_path, monkeypatch):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, "CTPT", "TRAINER.CTPT.LAMBDA", "7.5")
    views = views_of(trainer)
    model, ctx = trainer.model, trainer.model.prompt_learner.ctx
    # the documented objective, rebuilt here from the model's modules at the initial context
    with torch.no_grad():
        image_features = model.encode_image(views)
    text = model.text_features()
    logits = model.logits(image_features, text)
    selected = select_confident(logits.detach(), 0.1)
    assert len(selected) == 1  # int(16 * 0.1)
    loss = marginal_entropy(logits[selected]) - 7.5 * text_feature_dispersion(text)
    (expected,) = torch.autograd.grad(loss, [ctx])
    seen = []
    original = trainer.optim.step
    monkeypatch.setattr(trainer.optim, "step", lambda *a, **k: (seen.append(ctx.grad.clone()), original(*a, **k)))
    with torch.enable_grad():
        trainer._tune_and_predict(views)
    assert len(seen) == 1
    assert torch.allclose(seen[0], expected, rtol=1e-4, atol=1e-7)
    assert trainer.last_dispersion == pytest.approx(float(text_feature_dispersion(text.detach())), rel=1e-6)


def test_the_dispersion_term_raises_dispersion_after_a_step(tiny_data_root, tiny_clip_path, tmp_path):
    after = {}
    for lam in ("0.0", "50.0"):
        trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path / lam, "CTPT", "TRAINER.CTPT.LAMBDA", lam)
        before = dispersion_of(trainer)
        with torch.enable_grad():
            trainer._tune_and_predict(views_of(trainer))
        after[lam] = dispersion_of(trainer)  # the tuned prompt stays until the next image's reset
    assert after["50.0"] > before
    assert after["50.0"] > after["0.0"]


def test_lambda_zero_is_tpt(tiny_data_root, tiny_clip_path, tmp_path):
    ctpt = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, "CTPT", "TRAINER.CTPT.LAMBDA", "0.0")
    tpt = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TPT")
    views = views_of(ctpt)
    with torch.no_grad():
        assert torch.equal(ctpt.model_inference(views[None]), tpt.model_inference(views[None]))


def test_each_image_starts_from_the_initial_prompt(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)
    first, second = views_of(trainer, 0), views_of(trainer, 1)
    with torch.no_grad():
        alone = trainer.model_inference(second[None])
        trainer.model_inference(first[None])
        assert not torch.equal(trainer.model.prompt_learner.ctx, trainer.ctx_init_state)  # tuned on `first`
        assert torch.equal(trainer.model_inference(second[None]), alone)


# ----------------------------------------------------------------------------- settings
def test_paper_configs_hold_the_published_settings():
    fine = yaml.safe_load((REPO / "configs/trainers/CTPT/vit_b16.yaml").read_text())["TRAINER"]["CTPT"]
    shift = yaml.safe_load((REPO / "configs/trainers/CTPT/vit_b16_ds.yaml").read_text())["TRAINER"]["CTPT"]
    for node in (fine, shift):
        assert (node["N_VIEWS"], node["SELECTION_P"], node["STEPS"], node["LR"]) == (64, 0.1, 1, 0.005)
        assert node["CTX_INIT"] == "a photo of a"
    assert (fine["LAMBDA"], fine["AUGMIX"]) == (50.0, "auto")
    assert (shift["LAMBDA"], shift["AUGMIX"]) == (20.0, "on")
    bench = yaml.safe_load((REPO / "configs/trainers/CTPT/bench.yaml").read_text())
    assert bench["MODEL"]["BACKBONE"]["NAME"] == "Bench-RN-S" and bench["INPUT"]["SIZE"] == "(64, 64)"


def test_results_record_lambda(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, "CTPT", "TRAINER.CTPT.LAMBDA", "20.0")
    assert trainer.result_extra["ctpt_lambda"] == 20.0


# ------------------------------------------------------------------------------ precision
def _run(precision, root, clip_path, out):
    cfg = tiny_cfg(root, clip_path, "CTPT", ("OUTPUT_DIR", str(out), "SEED", "1", "TRAINER.CTPT.N_VIEWS", "8",
                                             "TRAINER.CTPT.PREC", precision))
    set_random_seed(1)
    with pytest.warns(UserWarning) if precision != "fp32" else contextlib.nullcontext():
        trainer = build_trainer(cfg)
    assert trainer.precision == precision
    trainer.test()
    set_random_seed(2)
    images, _ = trainer.parse_batch_test(next(iter(trainer.test_loader)))
    with torch.no_grad():
        logits = trainer.model_inference(images).float()
    return trainer, logits


def test_fp32_fp16_and_amp_give_finite_results_close_to_fp32(tiny_data_root, tiny_clip_path, tmp_path):
    ref_trainer, ref_logits = _run("fp32", tiny_data_root, tiny_clip_path, tmp_path / "fp32")
    for precision in ("fp16", "amp"):
        trainer, logits = _run(precision, tiny_data_root, tiny_clip_path, tmp_path / precision)
        assert torch.isfinite(logits).all(), precision
        ctx = trainer.model.prompt_learner.ctx
        assert ctx.dtype == torch.float32 and torch.isfinite(ctx).all()
        assert (logits - ref_logits).abs().max() <= 0.1 * ref_logits.abs().max(), precision
        accuracy = trainer.test_result["metrics"]["accuracy"]
        assert abs(accuracy - ref_trainer.test_result["metrics"]["accuracy"]) <= 10.0, precision
