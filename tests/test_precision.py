"""The precision policy (selftpt/precision.py): fp32 master copies, loss scaling for autograd.grad,
explicit fp16/amp honoured on CPU, and every trainer in fp32, fp16 and amp giving finite results
close to fp32's."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import trainers  # noqa: F401  (registers the trainers)
from selftpt.clip_loader import load_clip
from selftpt.precision import AMP_DTYPE, GradientScale, autocast, make_grad_scaler, resolve_precision
from selftpt.prompt_learner import PromptLearner
from selftpt.toolbox import TRAINER_REGISTRY, build_trainer, set_random_seed
from tests.helpers import tiny_cfg


def test_adamw_on_an_fp16_tensor_is_what_the_master_copy_avoids():
    """The hazard itself: one AdamW step on an fp16 tensor with |g| ~ 1e-3 leaves no finite entry."""
    half = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.float16))
    half.grad = torch.full_like(half, 1e-3)
    torch.optim.AdamW([half], lr=5e-3).step()
    assert not torch.isfinite(half).any()


def test_prompt_context_is_an_fp32_master_copy_rendered_in_clips_dtype(tiny_clip_path):
    clip_model = load_clip(str(tiny_clip_path), precision="fp16")
    learner = PromptLearner(["red square", "blue circle"], clip_model, ctx_init="a photo of a")
    assert learner.ctx.dtype == torch.float32
    assert learner().dtype == torch.float16  # what enters CLIP's half text tower
    learner.ctx.grad = torch.full_like(learner.ctx, 1e-3)
    torch.optim.AdamW([learner.ctx], lr=5e-3).step()
    assert torch.isfinite(learner.ctx).all()


def test_explicit_fp16_and_amp_are_honoured_on_cpu_auto_is_fp32():
    for precision in ("fp16", "amp"):
        with pytest.warns(UserWarning) as caught:
            assert resolve_precision(precision, "cpu") == precision
        assert str(caught[0].message) == (f"PREC {precision} on cpu: honoured, but slow off a GPU "
                                          "(PREC auto runs fp32 here)")
        assert caught[0].filename == __file__  # names the caller's line, not precision.py's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        assert resolve_precision("auto", "cpu") == "fp32"
        assert resolve_precision("fp32", "cpu") == "fp32"
        assert resolve_precision("fp16", "cuda") == "fp16"
        assert resolve_precision("auto", "cuda") == "fp16"  # CoOp's default on a GPU
        assert resolve_precision("auto", "cuda", auto_cuda="amp") == "amp"
    with pytest.raises(ValueError, match=r"^Unknown precision 'bf16'; use one of fp16, fp32, amp, auto$"):
        resolve_precision("bf16", "cpu")


def test_autocast_and_the_loss_scaler_follow_the_precision():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(cpu, "amp"):
        assert (a @ b).dtype == AMP_DTYPE == torch.float16
    for precision in ("fp32", "fp16"):  # fp16 casts the model itself; autocast stays off
        with autocast(cpu, precision):
            assert (a @ b).dtype == torch.float32
    assert make_grad_scaler(cpu, "fp32") is None
    for precision in ("fp16", "amp"):
        scaler = make_grad_scaler(cpu, precision, init_scale=1000.0)
        assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == 1000.0
        assert make_grad_scaler(cpu, precision).get_scale() == 2.0 ** 16  # torch's default


def test_gradient_scale_rescues_gradients_that_underflow_in_fp16():
    x = torch.ones(8, requires_grad=True)

    def loss():  # d loss / dx = 1e-8 per element, flushed to zero in fp16's backward
        return ((x.half() * 1e-4).sum() * 1e-4).float()

    plain = torch.autograd.grad(loss(), [x])[0]
    assert plain.abs().max() == 0
    scaled = GradientScale(enabled=True).grad(loss(), [x])[0]
    assert scaled == pytest.approx(torch.full((8,), 1e-8), rel=0.05)


def test_gradient_scale_backs_off_when_the_scaled_gradient_overflows():
    x = torch.ones(4, requires_grad=True)
    scale = GradientScale(enabled=True, init_scale=2.0 ** 10)
    g = scale.grad((x.half() * 200.0).sum().float(), [x])[0]  # 200 * 1024 > fp16's max (65504)
    assert torch.equal(g, torch.full((4,), 200.0))
    assert scale.backoffs >= 2 and scale.scale <= 2.0 ** 8


def test_gradient_scale_keeps_the_graph_for_double_backward():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    g = GradientScale(enabled=True).grad((x.half() ** 3).sum().float(), [x], create_graph=True)[0]
    assert torch.allclose(g, 3 * x.detach() ** 2)
    (gg,) = torch.autograd.grad(g.sum(), [x])
    assert torch.allclose(gg, 6 * x.detach())


# ------------------------------------------------------------------------ the precision matrix
# Every trainer, a short training run (where it trains) and an evaluation, in each precision.
MATRIX = {
    "ZeroshotCLIP": [],
    "ZeroshotCLIP2": [],
    "CoOp": [],
    "CoCoOp": [],
    "TPT": ["TRAINER.TPT.N_VIEWS", "8"],
    "SelfTPT": ["TRAINER.SELFTPT.TTA_STEPS", "3"],
    "SelfTPT-v": ["TRAINER.SELFTPT.TTA_STEPS", "3", "TRAINER.SELFTPT.N_VIEWS", "8"],
}
# the deep-prompt trainers and C-TPT have their own precision matrices (test_maple.py, ...)
TEST_TIME = ("TPT", "MaPLeTPT", "PromptSRCTPT", "PromptAlign", "CTPT")


def _run(method, precision, root, clip_path, out):
    trainer_name = method.split("-")[0]
    node = TRAINER_REGISTRY.get(trainer_name).CFG_NODE
    cfg = tiny_cfg(root, clip_path, trainer_name,
                   ("OUTPUT_DIR", str(out), "OPTIM.MAX_EPOCH", "1", "SEED", "1",
                    f"TRAINER.{node}.PREC", precision, *MATRIX[method]))
    set_random_seed(1)
    with pytest.warns(UserWarning) if precision != "fp32" else contextlib.nullcontext():
        trainer = build_trainer(cfg)
    assert trainer.precision == precision
    model = getattr(trainer, "model", None) or trainer.clip_model  # zero-shot CLIP keeps CLIP itself
    patch_embedding = next(m.conv1 for m in model.modules() if hasattr(m, "conv1"))  # CLIP's image tower
    # fp16 keeps CLIP's half weights (CoOp); amp autocasts an fp32 CLIP (TPT)
    assert patch_embedding.weight.dtype == (torch.float16 if precision == "fp16" else torch.float32)
    if trainer.TRAINS:
        trainer.train()  # ends with the evaluation
    else:
        trainer.test()
    set_random_seed(2)  # the same views for every precision
    batch = next(iter(trainer.test_loader))
    images, _ = trainer.parse_batch_test(batch)
    with torch.no_grad():
        logits = trainer.model_inference(images).float()
    tuned = [p for name in trainer.get_model_names() for p in trainer._models[name].parameters()]
    return trainer, logits, tuned


@pytest.fixture(scope="module")
def fp32_runs(tiny_data_root, tiny_clip_path, tmp_path_factory):
    cache = {}

    def get(method):
        if method not in cache:
            cache[method] = _run(method, "fp32", tiny_data_root, tiny_clip_path,
                                 tmp_path_factory.mktemp(f"fp32-{method}"))
        return cache[method]
    return get


@pytest.mark.parametrize("precision", ["fp16", "amp"])
@pytest.mark.parametrize("method", list(MATRIX))
def test_every_trainer_runs_in_fp16_and_amp_close_to_fp32(method, precision, fp32_runs, tiny_data_root,
                                                          tiny_clip_path, tmp_path):
    ref_trainer, ref_logits, _ = fp32_runs(method)
    trainer, logits, tuned = _run(method, precision, tiny_data_root, tiny_clip_path, tmp_path / "run")
    assert torch.isfinite(logits).all()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in tuned)  # fp32 master copies
    with trainer.autocast():  # amp autocasts; fp16 casts the model itself
        assert torch.is_autocast_enabled("cpu") == (precision == "amp")
    metrics = trainer.test_result["metrics"]
    assert abs(metrics["accuracy"] - ref_trainer.test_result["metrics"]["accuracy"]) <= 10.0
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= 0.1 * scale
    if method.startswith("SelfTPT"):
        tta = trainer.result_extra["tta"]
        assert tta["cpt_loss_after"] < tta["cpt_loss_before"]  # stage 2 adapted, with finite steps
        assert tta["cpt_loss_after"] == pytest.approx(ref_trainer.result_extra["tta"]["cpt_loss_after"], rel=0.05)


def test_gradient_scale_counts_each_backoff_and_names_an_overflowing_loss():
    x = torch.ones(4, requires_grad=True)
    scale = GradientScale(enabled=True, init_scale=4.0)
    scale.grad((x.half() * 40000.0).sum().float(), [x])  # 40000 x 4 and x 2 overflow fp16, x 1 does not
    assert (scale.backoffs, scale.scale) == (2, 1.0)
    with pytest.raises(FloatingPointError, match="Non-finite gradient even without loss scaling.*PREC fp32"):
        scale.grad((x.half() * 70000.0).sum().float(), [x])  # beyond fp16 even at scale 1
    assert scale.scale == 1.0  # never below 1: the gradient is not shrunk below its true size


@pytest.mark.parametrize("method", ["CoOp", "CoCoOp", "SelfTPT", "MaPLe", "PromptSRC", *TEST_TIME])
def test_an_overflowing_fp16_step_is_skipped_and_the_loss_scale_backs_off(method, tiny_data_root, tiny_clip_path,
                                                                         tmp_path):
    """Every trainer's optimiser step goes through its GradScaler: at a loss scale that overflows
    fp16's gradients the step is skipped (nothing moves) and the scale is lowered."""
    node = TRAINER_REGISTRY.get(method).CFG_NODE
    few_views = [f"TRAINER.{node}.N_VIEWS", "8"] if method in TEST_TIME else []
    cfg = tiny_cfg(tiny_data_root, tiny_clip_path, method,
                   ("OUTPUT_DIR", str(tmp_path), "SEED", "1", f"TRAINER.{node}.PREC", "fp16", *few_views))
    with pytest.warns(UserWarning):
        trainer = build_trainer(cfg)
    # the trainers start below torch's 2^16 (see make_grad_scaler); TPT and its variants at TPT's original 1000
    assert trainer.scaler.get_scale() == (1000.0 if method in TEST_TIME else 2.0 ** 10)
    huge = 2.0 ** 100
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=huge)
    tuned = [p for name in trainer.get_model_names() for p in trainer._models[name].parameters() if p.requires_grad]
    before = [p.detach().clone() for p in tuned]
    if method in TEST_TIME:
        trainer.prepare_for_test()
        views = trainer.views(_first_test_image(trainer))
        trainer.tune_and_predict(views)
    else:
        batch = next(iter(trainer.train_loader_x))
        trainer.batch_idx, trainer.num_batches = 0, 99
        trainer.forward_backward(batch)
    assert all(torch.equal(p.detach(), b) for p, b in zip(tuned, before))
    assert trainer.scaler.get_scale() < huge


@pytest.mark.parametrize("method, on_cuda", [("CoOp", "fp16"), ("TPT", "amp"), ("MaPLeTPT", "fp16"),
                                             ("PromptSRCTPT", "amp"), ("CTPT", "amp")])
def test_auto_precision_on_cuda_is_each_trainers_own(method, on_cuda, tiny_data_root, tiny_clip_path, tmp_path):
    """PREC auto: fp32 here; on a GPU what each method's original runs (TPT and its descendants
    keep CLIP in fp32 under autocast; CoOp's family and MaPLe's fp16 CLIP)."""
    node = TRAINER_REGISTRY.get(method).CFG_NODE
    cfg = tiny_cfg(tiny_data_root, tiny_clip_path, method,
                   ("OUTPUT_DIR", str(tmp_path), f"TRAINER.{node}.PREC", "auto"))
    trainer = build_trainer(cfg)
    assert trainer.precision == "fp32"
    trainer.device = torch.device("cuda")  # only the choice of precision reads it: CLIP loads on the CPU
    trainer.load_clip_model()
    assert trainer.precision == on_cuda


def _first_test_image(trainer):
    from selftpt.toolbox import read_image
    return read_image(trainer.dm.dataset.test[0].impath)
