"""TPT and TPT+CoOp (trainers/tpt.py) on the tiny CLIP and TinyShapes, on CPU."""
from __future__ import annotations

import json
import math
import types

import pytest
import torch

import selftpt.trainer_base as trainer_base
import trainers  # noqa: F401  (registers the trainers)
import trainers.tpt as tpt_module
from selftpt.calibration import expected_calibration_error
from selftpt.errors import UserError
from selftpt.launch import build_parser, run
from selftpt.losses import marginal_entropy, select_confident
from selftpt.toolbox import build_trainer, build_transform, load_checkpoint, read_image
from selftpt.trainer_base import CheckpointError
from tests.helpers import ListLoader, exact_calibration_batch, tiny_cfg

TPT_CONFIG = "configs/trainers/TPT/vit_b16.yaml"


def make_trainer(root, clip_path, tmp_path, trainer="TPT", opts=()):
    cfg = tiny_cfg(root, clip_path, trainer, ("OUTPUT_DIR", str(tmp_path / trainer)) + tuple(opts))
    return build_trainer(cfg)


@pytest.fixture(scope="module")
def coop_dirs(tiny_data_root, tiny_clip_path, tmp_path_factory):
    """CoOp output dirs: a 4-token prompt trained for one epoch, and an untrained 16-token one."""
    out4 = tmp_path_factory.mktemp("coop4")
    coop = build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, "CoOp", (
        "OUTPUT_DIR", str(out4), "TRAINER.COOP.N_CTX", 4, "OPTIM.MAX_EPOCH", 1, "TEST.NO_TEST", True)))
    coop.train()
    out16 = tmp_path_factory.mktemp("coop16")
    coop16 = build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, "CoOp", (
        "OUTPUT_DIR", str(out16), "TRAINER.COOP.N_CTX", 16)))
    coop16.save_model(0, str(out16))  # -> prompt_learner/model.pth.tar-1
    return out4, out16


def views_of(trainer, index, seed=0):
    """The (V, 3, H, W) views of test image ``index``, drawn reproducibly."""
    torch.manual_seed(seed)
    return trainer.views(read_image(trainer.dm.dataset.test[index].impath))


# --------------------------------------------------------------------------- the procedure
def test_view_batch_has_64_views_with_the_clean_view_first(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)
    assert trainer.cfg.TRAINER.TPT.N_VIEWS == 64
    batch = next(iter(trainer.test_loader))
    assert batch["img"].shape == (1, 64, 3, 32, 32)  # one image per batch, 64 views
    # view 0 is exactly Dassl's plain test transform (resize shorter side + centre crop)
    plain = build_transform(trainer.cfg, is_train=False)
    expected = plain(read_image(batch["impath"][0]))
    assert torch.equal(batch["img"][0, 0], expected)
    assert not any(torch.equal(batch["img"][0, i], expected) for i in range(1, 64))


@pytest.mark.parametrize("batch_size", [2, 16])
def test_any_test_batch_size_becomes_one_image_per_batch(tiny_data_root, tiny_clip_path, tmp_path, batch_size):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("DATALOADER.TEST.BATCH_SIZE", batch_size))
    assert trainer.test_loader.batch_size == 1  # each item is already N_VIEWS images
    assert trainer.cfg.DATALOADER.TEST.BATCH_SIZE == batch_size  # the run's config keeps what was asked


def test_confident_selection_keeps_exactly_the_lowest_entropy_tenth():
    logits = torch.zeros(64, 5)
    logits[:, 0] = torch.linspace(0.0, 1.0, 64)  # all fairly uncertain, each a little different
    confident = [7, 19, 23, 40, 51, 62]  # int(64 * 0.1) = 6 views made sharp
    for rank, view in enumerate(confident):
        logits[view, rank % 5] = 6.0 + rank
    assert sorted(select_confident(logits, 0.1).tolist()) == confident


def test_marginal_entropy_equals_hand_computed_value():
    # softmax rows: (3/4, 1/4) and (1/2, 1/2); their mean is (5/8, 3/8)
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    expected = -(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8))
    assert marginal_entropy(logits).item() == pytest.approx(expected, rel=1e-6)


def test_tuning_minimises_the_entropy_of_the_selected_views(tiny_data_root, tiny_clip_path, tmp_path,
                                                           monkeypatch):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.STEPS", 2))
    seen = {}

    def spy_select(logits, fraction):
        seen.setdefault("select", []).append((logits.clone(), fraction))
        seen["idx"] = select_confident(logits, fraction)
        return seen["idx"]

    def spy_loss(logits):
        seen.setdefault("loss_inputs", []).append(logits.detach().clone())
        return marginal_entropy(logits)

    monkeypatch.setattr(tpt_module, "select_confident", spy_select)
    monkeypatch.setattr(tpt_module, "marginal_entropy", spy_loss)
    trainer.prepare_for_test()
    trainer.tune_and_predict(views_of(trainer, 0))
    assert len(seen["select"]) == 1  # the views are chosen once, at the first step
    all_logits, fraction = seen["select"][0]
    assert all_logits.shape == (64, 6) and fraction == pytest.approx(0.1)
    assert len(seen["idx"]) == 6
    assert len(seen["loss_inputs"]) == 2  # STEPS 2
    assert torch.allclose(seen["loss_inputs"][0], all_logits[seen["idx"]])
    assert seen["loss_inputs"][1].shape == (6, 6)  # the same views at the second step


def test_prompt_and_optimiser_are_reset_between_images(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 16))
    trainer.prepare_for_test()
    image_a, image_b = views_of(trainer, 0, seed=1), views_of(trainer, 13, seed=2)
    init = trainer.model.prompt_learner.ctx.detach().clone()

    b_alone = trainer.tune_and_predict(image_b)
    tuned_ctx = trainer.model.prompt_learner.ctx.detach().clone()
    assert not torch.equal(tuned_ctx, init)  # tuning moved the prompt...
    with torch.no_grad():
        trainer.reset()
        zero_shot = trainer.model.logits(trainer.model.encode_image(image_b[:1]), trainer.model.text_features())
    assert not torch.allclose(b_alone, zero_shot)  # ...and the prediction
    trainer.tune_and_predict(image_a)
    assert trainer.optim.state  # AdamW moments exist after image A
    b_after_a = trainer.tune_and_predict(image_b)
    assert torch.allclose(b_after_a, b_alone, atol=1e-6, rtol=0)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), tuned_ctx)

    # The check is sensitive: keeping AdamW's moments from image A changes image B's result.
    def reset_prompt_only():
        with torch.no_grad():
            trainer.model.prompt_learner.ctx.copy_(trainer.ctx_init_state)

    trainer.reset = reset_prompt_only
    trainer.tune_and_predict(image_a)
    assert not torch.allclose(trainer.tune_and_predict(image_b), b_alone, atol=1e-6, rtol=0)


def test_tpt_coop_starts_every_image_from_the_loaded_context(tiny_data_root, tiny_clip_path, tmp_path,
                                                            coop_dirs):
    out4, _ = coop_dirs
    checkpoint = load_checkpoint(str(out4 / "prompt_learner" / "model.pth.tar-1"))
    ckpt_ctx = checkpoint["state_dict"]["ctx"]
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 8))
    trainer.load_model(str(out4), epoch=1)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), ckpt_ctx)

    starts = []
    encode_image = trainer.model.encode_image

    def spy_encode(images):  # called once per image, right after the reset
        starts.append(trainer.model.prompt_learner.ctx.detach().clone())
        return encode_image(images)

    trainer.model.encode_image = spy_encode
    trainer.test()
    assert len(starts) == len(trainer.dm.dataset.test)
    assert all(torch.equal(start, ckpt_ctx) for start in starts)
    assert not torch.equal(trainer.model.prompt_learner.ctx.detach(), ckpt_ctx)  # it was tuned
    assert "model.pth.tar-1" in trainer.result_extra["prompt_init"]


def test_coop_checkpoint_with_another_n_ctx_names_both_sizes(tiny_data_root, tiny_clip_path, tmp_path,
                                                            coop_dirs):
    _, out16 = coop_dirs
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)  # CTX_INIT "a photo of a": 4 tokens
    with pytest.raises(CheckpointError, match=r"16 context tokens.*builds 4.*CTX_INIT"):
        trainer.load_model(str(out16), epoch=1)
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path / "b",
                           opts=("TRAINER.TPT.CTX_INIT", "", "TRAINER.TPT.N_CTX", 8))
    with pytest.raises(CheckpointError, match=r"16 context tokens.*builds 8 \(N_CTX is 8\)"):
        trainer.load_model(str(out16), epoch=1)


def test_grad_checkpointing_gives_the_same_prediction(tiny_data_root, tiny_clip_path, tmp_path):
    plain = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 8))
    ckpt = make_trainer(tiny_data_root, tiny_clip_path, tmp_path / "c",
                        opts=("TRAINER.TPT.N_VIEWS", 8, "TRAINER.TPT.GRAD_CHECKPOINT", True))
    views = views_of(plain, 3)
    for trainer in (plain, ckpt):
        trainer.prepare_for_test()
    assert torch.allclose(plain.tune_and_predict(views), ckpt.tune_and_predict(views), atol=1e-5)


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
])
def test_out_of_memory_explains_the_limit_and_the_knobs(tiny_data_root, tiny_clip_path, tmp_path, error):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 4))

    def too_big(*args, **kwargs):
        raise error

    trainer.model.text_features = too_big
    trainer.prepare_for_test()
    with pytest.raises(UserError, match=r"6 classes on 4 views.*GRAD_CHECKPOINT True.*N_VIEWS"):
        trainer.tune_and_predict(views_of(trainer, 0))


def test_other_runtime_errors_are_not_disguised(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 4))
    trainer.model.text_features = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    trainer.prepare_for_test()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        trainer.tune_and_predict(views_of(trainer, 0))


# --------------------------------------------------------------------------- calibration
def test_ece_equals_a_hand_computed_value_with_15_bins():
    logits, labels, expected = exact_calibration_batch()
    conf, pred = logits.softmax(-1).max(-1)
    assert conf.tolist() == pytest.approx([0.25, 0.75, 0.75, 0.75, 0.5], abs=1e-7)
    by_hand = 100 * (1 / 5 * abs(1 - 0.25) + 3 / 5 * abs(2 / 3 - 0.75) + 1 / 5 * abs(0 - 0.5))
    assert expected == pytest.approx(by_hand)
    assert expected_calibration_error(conf, pred == labels, n_bins=15) == pytest.approx(expected)


@pytest.mark.parametrize("bins", [15, 1])
def test_tpt_evaluation_records_ece(bins, tiny_data_root, tiny_clip_path, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path,
                           opts=("TRAINER.TPT.N_VIEWS", 2, "TEST.ECE_BINS", bins))
    logits, labels, expected = exact_calibration_batch()
    if bins == 1:  # one bin: |accuracy - mean confidence| = |0.6 - (0.25 + 3 x 0.75 + 0.5) / 5| = 0
        expected = 0.0
    trainer.test_loader = ListLoader([{"img": torch.zeros(3, 2, 3, 32, 32), "label": labels[:3]},
                                      {"img": torch.zeros(2, 2, 3, 32, 32), "label": labels[3:]}])
    outputs = iter([logits[:3], logits[3:]])
    monkeypatch.setattr(trainer, "model_inference", lambda images: next(outputs))
    trainer.test()
    assert trainer.test_result["metrics"]["ece"] == pytest.approx(expected, abs=1e-4)  # percent
    assert trainer.test_result["metrics"]["accuracy"] == pytest.approx(60.0)


def test_evaluation_times_its_phases_and_writes_each_metric_as_a_scalar(tiny_data_root, tiny_clip_path, tmp_path,
                                                                        monkeypatch):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 2))
    logits, labels, _ = exact_calibration_batch()
    trainer.test_loader = ListLoader([{"img": torch.zeros(1, 2, 3, 32, 32), "label": labels[:1]}])  # one image
    monkeypatch.setattr(trainer, "model_inference", lambda images: logits[:1])
    clock = iter([100.0, 102.2504, 110.501012])  # started, prepared (after prepare_for_test), finished
    monkeypatch.setattr(trainer_base, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    scalars = []
    trainer._writer = types.SimpleNamespace(add_scalar=lambda *args: scalars.append(args))  # tensorboard's
    trainer.epoch = 7
    returned = trainer.test()  # what Dassl's best-val selection compares: the accuracy
    assert trainer.test_result["timing"] == {"prepare_seconds": 2.25, "eval_seconds": 8.251,
                                             "seconds_per_image": 8.25061}
    metrics = trainer.test_result["metrics"]
    assert {"accuracy", "ece"} <= set(metrics) and scalars == [(f"test/{k}", v, 7) for k, v in metrics.items()]
    assert list(metrics)[:2] == ["accuracy", "error_rate"] and returned == metrics["accuracy"] != metrics["error_rate"]


# --------------------------------------------------------------------------- end to end
def test_train_py_runs_tpt_coop_and_writes_time_and_ece(tiny_data_root, tiny_clip_path, tmp_path, coop_dirs):
    out4, _ = coop_dirs
    args = build_parser().parse_args([
        "--root", str(tiny_data_root), "--trainer", "TPT", "--config-file", TPT_CONFIG,
        "--output-dir", str(tmp_path / "run"), "--seed", "1",
        "--model-dir", str(out4), "--load-epoch", "1",
        "DATASET.NAME", "TinyShapes", "DATASET.SUBSAMPLE_CLASSES", "base", "INPUT.SIZE", "(32, 32)",
        "MODEL.BACKBONE.NAME", str(tiny_clip_path), "TRAINER.TPT.N_VIEWS", "8",
        "DATALOADER.NUM_WORKERS", "0", "USE_CUDA", "False",
    ])
    record = run(args)
    assert record["trainer"] == "TPT" and record["num_images"] == 12
    extra = record["extra"]
    assert extra["tpt_n_views"] == 8 and extra["tpt_selected_views"] == 1
    assert extra["precision"] == "fp32" and "model.pth.tar-1" in extra["prompt_init"]
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["extra"]["seconds_per_image"] == pytest.approx(extra["seconds_per_image"])


# --------------------------------------------------------------------------- mutation survivors
@pytest.mark.parametrize("error, expected", [
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"), True),
    (RuntimeError("posix_memalign failed: Cannot allocate memory"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),  # only RuntimeErrors are allocator failures
])
def test_out_of_memory_is_recognised_by_each_allocators_message(error, expected):
    assert tpt_module.is_out_of_memory(error) is expected


def test_load_model_without_a_directory_keeps_the_initial_prompt(tiny_data_root, tiny_clip_path, tmp_path):
    """No --model-dir: TPT tunes from CTX_INIT, whatever --load-epoch says (nothing is loaded)."""
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 4))
    before = trainer.model.prompt_learner.ctx.detach().clone()
    trainer.load_model("", epoch=3)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), before)
    assert torch.equal(trainer.ctx_init_state, before)


def test_load_epoch_picks_that_epochs_prompt_among_several(tiny_data_root, tiny_clip_path, tmp_path):
    out = tmp_path / "coop_two_epochs"
    coop = build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, "CoOp", (
        "OUTPUT_DIR", str(out), "TRAINER.COOP.N_CTX", 4)))
    coop.save_model(0, str(out))  # -> model.pth.tar-1
    first = coop.model.prompt_learner.ctx.detach().clone()
    epoch1 = (out / "prompt_learner" / "model.pth.tar-1").read_bytes()
    with torch.no_grad():
        coop.model.prompt_learner.ctx.add_(1.0)
    coop.save_model(1, str(out))  # -> model.pth.tar-2, the latest (it replaces tar-1: put it back)
    (out / "prompt_learner" / "model.pth.tar-1").write_bytes(epoch1)
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 4))
    trainer.load_model(str(out), epoch=1)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), first)
    assert torch.equal(trainer.ctx_init_state, first)
    assert trainer.prompt_init.endswith("model.pth.tar-1")


def test_a_wrong_size_checkpoint_names_the_ctx_init_words(tiny_data_root, tiny_clip_path, tmp_path, coop_dirs):
    _, out16 = coop_dirs
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)  # CTX_INIT "a photo of a"
    with pytest.raises(CheckpointError, match=r'builds 4 \(CTX_INIT "a photo of a" has 4 words\)'):
        trainer.load_model(str(out16), epoch=1)


def test_plain_images_are_tuned_on_alone_and_the_progress_bar_shows_seconds(tiny_data_root, tiny_clip_path,
                                                                              tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 4))
    assert trainer.progress_postfix() == {}  # before any evaluation
    trainer.prepare_for_test()
    assert trainer.progress_postfix() == {}  # no image timed yet
    images = torch.stack([views_of(trainer, i)[0] for i in (0, 5)])  # (2, 3, H, W): no views
    logits = trainer.model_inference(images)
    assert logits.shape == (2, 6)
    for i in range(2):  # each image tuned on itself as its only view
        torch.testing.assert_close(logits[i:i + 1], trainer.tune_and_predict(images[i:i + 1]), rtol=0, atol=1e-6)
    assert trainer.progress_postfix() == {"s/img": f"{trainer.last_seconds:.2f}"}


def test_time_per_image_averages_over_the_images_timed(tiny_data_root, tiny_clip_path, tmp_path, monkeypatch):
    """Three images taking 1, 2 and 3 s (a fake clock): the results file's timing fields."""
    import types
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 2))
    trainer.prepare_for_test()
    clock = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.0])  # start and end of each image
    monkeypatch.setattr(tpt_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    after_first = []
    for i in range(3):
        trainer.tune_and_predict(views_of(trainer, i))
        after_first.append(trainer.result_extra.get("seconds_per_image_after_first"))
    assert after_first == [None, pytest.approx(2.0), pytest.approx(2.5)]  # from the second image on
    extra = trainer.result_extra
    assert "peak_memory_mb" not in extra  # CUDA only
    assert extra["adaptation_seconds_total"] == pytest.approx(6.0)
    assert extra["seconds_per_image"] == pytest.approx(2.0)
    assert extra["images_per_second"] == pytest.approx(0.5)
    assert extra["seconds_per_image_after_first"] == pytest.approx(2.5)
    assert trainer.progress_postfix() == {"s/img": "3.00"}


@pytest.mark.parametrize("seconds, per_second", [(0.0, None), (0.5, 2.0)])
def test_images_per_second_of_an_instant_or_subsecond_image(seconds, per_second, tiny_data_root, tiny_clip_path,
                                                            tmp_path, monkeypatch):
    """A clock too coarse to see the image (0 s) gives no rate rather than a division by zero."""
    import types
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("TRAINER.TPT.N_VIEWS", 2))
    trainer.prepare_for_test()
    clock = iter([3.0, 3.0 + seconds])
    monkeypatch.setattr(tpt_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    trainer.tune_and_predict(views_of(trainer, 0))
    assert trainer.result_extra["images_per_second"] == (None if per_second is None else pytest.approx(per_second))


@pytest.mark.parametrize("dataset, augmix, ctx_init, n_ctx, prompt_init", [
    ("TinyShapes", True, "a photo of a", 4, 'CTX_INIT "a photo of a"'),
    ("ImageNet", False, "", 3, "random (3 tokens)"),
])
def test_the_results_record_tpts_settings(dataset, augmix, ctx_init, n_ctx, prompt_init, tiny_data_root,
                                          tiny_clip_path, tmp_path):
    """AUGMIX auto: on except on ImageNet (TPT's choice), as recorded in the results' extra."""
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=(
        "TRAINER.TPT.N_VIEWS", 16, "TRAINER.TPT.STEPS", 2, "TRAINER.TPT.LR", 0.01,
        "TRAINER.TPT.CTX_INIT", ctx_init, "TRAINER.TPT.N_CTX", n_ctx))
    trainer.cfg.defrost()
    trainer.cfg.DATASET.NAME = dataset  # only the name, as the evaluation reads it
    trainer.cfg.freeze()
    trainer.prepare_for_test()
    extra = trainer.result_extra
    assert (extra["tpt_n_views"], extra["tpt_selected_views"], extra["tpt_steps"]) == (16, 1, 2)
    assert extra["tpt_lr"] == pytest.approx(0.01) and extra["tpt_augmix"] is augmix
    assert extra["prompt_init"] == prompt_init  # without --model-dir
