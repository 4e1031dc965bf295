"""The SelfTPT trainer: co-training, class-name adaptation, single-pass inference, -v views."""
import json
from pathlib import Path

import pytest
import torch

import trainers  # noqa: F401  (registers the trainers)
from selftpt.launch import main
from selftpt.toolbox import build_trainer, set_random_seed
from tests.helpers import tiny_cfg
from tests.learnable_world import learnable_opts


def results(folder):
    return json.loads((Path(folder) / "results.json").read_text())


@pytest.fixture(scope="module")
def selftpt_run(tmp_path_factory, learnable_data_root, learnable_clip_path):
    """A 2-epoch train.py run in the learnable world (12 classes), where the trained prompt's
    accuracy is far from chance, so that reloading it can be checked on real predictions."""
    out = tmp_path_factory.mktemp("selftpt") / "run"
    opts = learnable_opts(learnable_data_root, learnable_clip_path, "SelfTPT") + [
        "OPTIM.MAX_EPOCH", "2", "TRAINER.SELFTPT.TTA_STEPS", "5"]
    assert main(["--output-dir", str(out), "--seed", "1", *opts]) == 0
    return out, opts


def test_training_records_gradient_alignment_and_adaptation(selftpt_run):
    out, _ = selftpt_run
    rec = results(out)
    assert len(rec["extra"]["grad_cos_per_epoch"]) == 2
    assert all(-1.0 <= c <= 1.0 for c in rec["extra"]["grad_cos_per_epoch"])
    tta = rec["extra"]["tta"]
    assert tta["n_classes"] == 12 and tta["cpt_loss_after"] < tta["cpt_loss_before"]
    assert (out / "prompt_learner" / "model.pth.tar-2").is_file()
    assert (out / "cpt_head" / "model.pth.tar-2").is_file()
    assert "Test-time adaptation on 12 class names: CPT loss" in (out / "log.txt").read_text()


def test_eval_only_reproduces_the_adapted_result(selftpt_run, tmp_path):
    out, opts = selftpt_run
    assert main(["--output-dir", str(tmp_path / "e"), "--seed", "1", "--eval-only", "--model-dir", str(out),
                 "--load-epoch", "2", *opts]) == 0
    trained, evaluated = results(out), results(tmp_path / "e")
    # Far from chance (8.3%) and from zero-shot (43%): equal accuracies are equal predictions
    # of a prompt that learnt something, not one class predicted for every image.
    assert trained["metrics"]["accuracy"] >= 60.0
    assert evaluated["metrics"]["accuracy"] == trained["metrics"]["accuracy"]
    assert evaluated["metrics"]["ece"] == pytest.approx(trained["metrics"]["ece"], abs=1e-9)
    assert evaluated["extra"]["tta"]["cpt_loss_after"] == pytest.approx(trained["extra"]["tta"]["cpt_loss_after"])


def test_checkpoint_with_other_head_or_n_ctx_names_both_shapes(selftpt_run, tmp_path, capsys):
    out, opts = selftpt_run
    code = main(["--output-dir", str(tmp_path / "e"), "--eval-only", "--model-dir", str(out), "--load-epoch", "2",
                 *opts, "TRAINER.SELFTPT.CTX_INIT", "a photo of", "TRAINER.SELFTPT.N_CTX", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "(4, 64)" in err and "(3, 64)" in err


@pytest.fixture
def trained_trainer(tiny_data_root, tiny_clip_path, tmp_path):
    cfg = tiny_cfg(tiny_data_root, tiny_clip_path, "SelfTPT",
                   ("OUTPUT_DIR", str(tmp_path / "t"), "OPTIM.MAX_EPOCH", "1", "SEED", "1"))
    trainer = build_trainer(cfg)
    trainer.train()
    return trainer


def test_adaptation_lowers_cpt_loss_and_reads_no_test_image(trained_trainer, monkeypatch):
    trainer = trained_trainer
    trained_ctx = trainer.model.prompt_learner.ctx.detach().clone()
    reads = []
    dataset = trainer.test_loader.dataset
    original = type(dataset).__getitem__
    monkeypatch.setattr(type(dataset), "__getitem__", lambda self, i: reads.append(i) or original(self, i))
    trainer.prepare_for_test()
    assert reads == []  # adaptation uses class names only
    tta = trainer.result_extra["tta"]
    assert tta["cpt_loss_after"] < tta["cpt_loss_before"]
    # the trained prompt itself is untouched: every target set starts from it
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), trained_ctx)
    with torch.no_grad():
        plain = trainer.class_text_features()
    assert not torch.allclose(plain, trainer.eval_text_features)


def _count_image_passes(trainer, monkeypatch):
    encoder = trainer.model.image_encoder
    seen = []
    original = type(encoder).forward
    monkeypatch.setattr(type(encoder), "forward", lambda self, x: seen.append(x.shape[0]) or original(self, x))
    trainer.test()
    return seen


def test_selftpt_inference_is_one_image_pass_per_image(trained_trainer, monkeypatch):
    seen = _count_image_passes(trained_trainer, monkeypatch)
    n_images = len(trained_trainer.test_loader.dataset)
    assert sum(seen) == n_images and len(seen) == len(trained_trainer.test_loader)


def test_selftpt_v_ensembles_64_views(tiny_data_root, tiny_clip_path, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_data_root, tiny_clip_path, "SelfTPT",
                   ("OUTPUT_DIR", str(tmp_path / "v"), "TRAINER.SELFTPT.N_VIEWS", "64",
                    "TRAINER.SELFTPT.TTA_STEPS", "2", "DATALOADER.TEST.BATCH_SIZE", "4", "SEED", "1"))
    trainer = build_trainer(cfg)
    batch = next(iter(trainer.test_loader))
    assert batch["img"].shape == (4, 64, 3, 32, 32)
    seen = _count_image_passes(trainer, monkeypatch)
    assert sum(seen) == 64 * len(trainer.test_loader.dataset)  # the ensemble itself: test_objectives.py


def test_gm_gradient_reaches_the_context(tiny_data_root, tiny_clip_path, tmp_path):
    cfg = tiny_cfg(tiny_data_root, tiny_clip_path, "SelfTPT",
                   ("OUTPUT_DIR", str(tmp_path / "g"), "TRAINER.SELFTPT.LAMBDA_CPT", "0.0", "SEED", "1"))
    trainer = build_trainer(cfg)
    ctx = trainer.model.prompt_learner.ctx
    batch = next(iter(trainer.train_loader_x))
    trainer.batch_idx, trainer.num_batches = 0, 99
    # With only CE: the gradient is the CE gradient. With GM on top, it must differ.
    images, labels = trainer.parse_batch_train(batch)
    logits = trainer.model.logits(trainer.model.encode_image(images), trainer.class_text_features())
    grad_ce = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels), ctx)[0]
    before = ctx.detach().clone()
    trainer.forward_backward(batch)
    assert ctx.grad is not None
    assert not torch.allclose(ctx.grad, grad_ce, atol=1e-7)  # L_gm contributed to the context gradient
    assert not torch.equal(ctx.detach(), before)


def test_a_single_target_class_is_refused_with_a_clear_message(trained_trainer):
    from selftpt.errors import UserError
    trained_trainer.model.prompt_learner.set_classnames(["red square"])
    with pytest.raises(UserError, match="at least two"):
        trained_trainer.prepare_for_test()


def _spy_cpt_classes(trainer, monkeypatch):
    """Record the classes of every CPT loss the trainer computes."""
    seen = []
    original = trainer.cpt.loss
    monkeypatch.setattr(trainer.cpt, "loss", lambda model, idx, ctx=None: seen.append(idx.tolist()) or
                        original(model, idx, ctx=ctx))
    return seen


def test_every_step_of_stage_two_visits_every_class_in_chunks(tiny_data_root, tiny_clip_path, tmp_path,
                                                              monkeypatch):
    cfg = tiny_cfg(tiny_data_root, tiny_clip_path, "SelfTPT",
                   ("OUTPUT_DIR", str(tmp_path / "t"), "SEED", "1", "TRAINER.SELFTPT.CPT_MAX_CLASSES", "2",
                    "TRAINER.SELFTPT.TTA_STEPS", "2"))
    trainer = build_trainer(cfg)
    seen = _spy_cpt_classes(trainer, monkeypatch)
    trainer.prepare_for_test()
    with_grad = seen[:6]  # two steps of three chunks each; then the no-grad "after" pass
    for step in (with_grad[:3], with_grad[3:]):
        assert sorted(c for chunk in step for c in chunk) == list(range(6))
        assert all(len(chunk) == 2 for chunk in step)
    assert with_grad[:3] != with_grad[3:]  # a new partition each step: other negatives
    tta = trainer.result_extra["tta"]
    assert (tta["passes"], tta["chunks_per_pass"], tta["classes_covered"]) == (2, 3, 6)


@pytest.mark.parametrize("use_gm, measured", [(False, 1), (True, 6)])
def test_gradient_cosine_is_cheap_without_gm_and_free_with_it(use_gm, measured, tiny_data_root, tiny_clip_path,
                                                              tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_data_root, tiny_clip_path, "SelfTPT",
                   ("OUTPUT_DIR", str(tmp_path / "t"), "SEED", "1", "OPTIM.MAX_EPOCH", "1",
                    "TRAINER.SELFTPT.USE_GM", str(use_gm), "TEST.NO_TEST", "True"))
    trainer = build_trainer(cfg)
    calls = []
    original = trainer.gradient_alignment
    monkeypatch.setattr(trainer, "gradient_alignment", lambda *a: calls.append(trainer.batch_idx) or original(*a))
    trainer.train()
    assert trainer.num_batches == 6 and len(calls) == measured and calls[0] == 0
    assert len(trainer.result_extra["grad_cos_per_epoch"]) == 1  # still one value per epoch


def test_gradient_checkpointing_supports_gradient_matching_exactly(tiny_data_root, tiny_clip_path, tmp_path):
    contexts = []
    for checkpointing in ("False", "True"):
        cfg = tiny_cfg(tiny_data_root, tiny_clip_path, "SelfTPT",
                       ("OUTPUT_DIR", str(tmp_path / checkpointing), "SEED", "1", "OPTIM.MAX_EPOCH", "1",
                        "TEST.NO_TEST", "True", "TRAINER.SELFTPT.GRAD_CHECKPOINT", checkpointing))
        set_random_seed(1)
        trainer = build_trainer(cfg)
        assert trainer.node.USE_GM and trainer.model.text_encoder.grad_checkpoint == (checkpointing == "True")
        trainer.train()  # GM's double backward through recomputed blocks
        contexts.append(trainer.model.prompt_learner.ctx.detach())
    assert torch.allclose(contexts[0], contexts[1], atol=1e-6)


def test_training_state_before_any_step_round_trips_without_a_gradient_ema(tiny_data_root, tiny_clip_path,
                                                                           tmp_path):
    """Resuming from a state saved before the first step (no CE gradient averaged yet)."""
    make = lambda sub: build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, "SelfTPT",  # noqa: E731
                                              ("OUTPUT_DIR", str(tmp_path / sub), "SEED", "1")))
    fresh, other = make("a"), make("b")
    other.grad_ema.value = torch.ones_like(other.model.prompt_learner.ctx)
    other.load_training_state(fresh.training_state())
    assert other.grad_ema.value is None


@pytest.mark.parametrize("n_views, cacheable", [(1, True), (2, False)])
def test_only_single_view_selftpt_reuses_cached_image_features(n_views, cacheable, tiny_data_root, tiny_clip_path,
                                                                tmp_path):
    """Self-TPT's image side is one fixed encoder pass; any random views (N_VIEWS > 1) are not."""
    trainer = build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, "SelfTPT", (
        "OUTPUT_DIR", str(tmp_path), "TRAINER.SELFTPT.N_VIEWS", n_views)))
    assert (trainer.image_encoder_for_cache() is not None) is cacheable
    images = next(iter(trainer.test_loader))["img"]
    if n_views == 1:  # plain Self-TPT: the standard test transform, one image each
        assert images.dim() == 4
    else:  # Self-TPT-v: the clean view and n_views - 1 augmented ones per image
        assert images.dim() == 5 and images.shape[1] == n_views


def test_two_target_classes_are_enough_for_the_adaptation(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, "SelfTPT", (
        "OUTPUT_DIR", str(tmp_path), "TRAINER.SELFTPT.TTA_STEPS", 1)))
    trainer.model.prompt_learner.set_classnames(["red square", "green circle"])
    trainer.prepare_for_test()
    assert trainer.result_extra["tta"]["n_classes"] == 2
    assert trainer.eval_text_features.shape[0] == 2
