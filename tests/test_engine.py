"""Tests of the built-in Dassl-compatible engine (``selftpt.engine``), CPU only, tiny data."""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from selftpt.engine import (
    DATASET_REGISTRY,
    TRAINER_REGISTRY,
    Classification,
    DataManager,
    DatasetBase,
    Datum,
    Registry,
    TrainerX,
    build_data_loader,
    build_lr_scheduler,
    build_optimizer,
    build_trainer,
    build_transform,
    check_availability,
    compute_accuracy,
    get_cfg_default,
    load_checkpoint,
    read_image,
    set_random_seed,
    setup_logger,
)

N_CLASSES, N_PER_CLASS = 3, 4


# ---------------------------------------------------------------- tiny world
@DATASET_REGISTRY.register(force=True)
class EngineToyData(DatasetBase):
    """Folder-per-class PNGs under DATASET.ROOT; the same images serve as train and test."""

    def __init__(self, cfg):
        items = []
        for label, cname in enumerate(sorted(os.listdir(cfg.DATASET.ROOT))):
            folder = os.path.join(cfg.DATASET.ROOT, cname)
            for fname in sorted(os.listdir(folder)):
                items.append(Datum(impath=os.path.join(folder, fname), label=label,
                                   classname=cname))
        super().__init__(train_x=items, test=items)


@TRAINER_REGISTRY.register(force=True)
class EngineToyTrainer(TrainerX):
    """A linear classifier on flattened 8x8 images; stops early when ``stop_at_epoch`` hits."""

    stop_at_epoch = None

    def build_model(self):
        self.model = nn.Linear(3 * 8 * 8, self.num_classes)
        self.optim = build_optimizer(self.model, self.cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, self.cfg.OPTIM)
        self.register_model("linear", self.model, self.optim, self.sched)

    def before_epoch(self):
        if self.epoch == self.stop_at_epoch:
            raise KeyboardInterrupt("simulated interruption")

    def forward_backward(self, batch):
        img, label, _ = self.parse_batch_train(batch)
        output = self.model(img.flatten(1))
        loss = F.cross_entropy(output, label)
        self.model_backward_and_update(loss)
        if self.batch_idx + 1 == self.num_batches:
            self.update_lr()
        return {"loss": loss.item(), "acc": compute_accuracy(output, label)[0].item()}

    def model_inference(self, input):
        return self.model(input.flatten(1))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_images")
    rng = np.random.RandomState(0)
    for c in range(N_CLASSES):
        (root / f"class_{c}").mkdir()
        for i in range(N_PER_CLASS):
            pixels = rng.randint(0, 256, size=(8, 8, 3)).astype(np.uint8)
            pixels[..., c] = 255  # a class-coloured tint, so training can learn something
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def make_cfg(image_root, output_dir, **overrides):
    cfg = get_cfg_default()
    cfg.USE_CUDA = False
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.DATASET.ROOT = str(image_root)
    cfg.DATASET.NAME = "EngineToyData"
    cfg.TRAINER.NAME = "EngineToyTrainer"
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 4
    cfg.DATALOADER.TEST.BATCH_SIZE = 8
    cfg.INPUT.SIZE = (8, 8)
    cfg.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize")
    cfg.OPTIM.NAME = "sgd"
    cfg.OPTIM.LR = 0.1
    cfg.OPTIM.LR_SCHEDULER = "cosine"
    cfg.OPTIM.MAX_EPOCH = 4
    cfg.OPTIM.WARMUP_EPOCH = 1
    cfg.OPTIM.WARMUP_TYPE = "constant"
    cfg.TRAIN.PRINT_FREQ = 2
    cfg.TEST.NO_TEST = True
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


def run_training(cfg, seed=0, stop_at_epoch=None):
    set_random_seed(seed)
    trainer = build_trainer(cfg)
    trainer.stop_at_epoch = stop_at_epoch
    trainer.train()
    return trainer


# ---------------------------------------------------------------- registry
def test_registry_register_get_and_did_you_mean():
    reg = Registry("TRAINER")

    @reg.register()
    class CoOp:
        pass

    reg.register(type("ZeroshotCLIP", (), {}))
    assert reg.get("CoOp") is CoOp
    assert reg.registered_names() == ["CoOp", "ZeroshotCLIP"]
    with pytest.raises(KeyError):
        reg.register(CoOp)
    reg.register(CoOp, force=True)

    with pytest.raises(KeyError) as err:
        reg.get("CoOq")
    message = str(err.value)
    assert message == "Unknown trainer 'CoOq'; did you mean 'CoOp'? Available: CoOp, ZeroshotCLIP"
    assert "\n" not in message

    with pytest.raises(ValueError, match=r"^Unknown trainer 'CoOq'; did you mean 'CoOp'\?"):
        check_availability("CoOq", ["CoOp", "ZeroshotCLIP"], kind="trainer")
    check_availability("CoOp", ["CoOp"])  # no error
    with pytest.raises(ValueError, match="none is registered"):
        check_availability("X", [])


def test_build_trainer_unknown_name(image_root, tmp_path):
    cfg = make_cfg(image_root, tmp_path, **{"TRAINER.NAME": "EngineToyTrainr"})
    with pytest.raises(ValueError, match="did you mean 'EngineToyTrainer'"):
        build_trainer(cfg)


# ---------------------------------------------------------------- data
def _fake_datums(tmp_path, n_classes=5, n_per_class=10):
    items = []
    for c in range(n_classes):
        for i in range(n_per_class):
            path = tmp_path / f"{c}_{i}.jpg"
            path.touch()
            items.append(Datum(impath=str(path), label=c, classname=f"c{c}"))
    return items


def test_fewshot_sampling_seeded(tmp_path):
    items = _fake_datums(tmp_path)
    ds = DatasetBase(train_x=items, test=items)

    def sample(seed, **kw):
        set_random_seed(seed)
        return [d.impath for d in ds.generate_fewshot_dataset(items, num_shots=2, **kw)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    # exactly random.sample per class, in label order, from the global `random`
    random.seed(1)
    expected = []
    for c in range(5):
        expected += [d.impath for d in random.sample(items[c * 10:(c + 1) * 10], 2)]
    assert sample(1) == expected

    small = items[:3]  # one class, three items
    assert len(ds.generate_fewshot_dataset(small, num_shots=5)) == 3
    set_random_seed(0)
    repeated = ds.generate_fewshot_dataset(small, num_shots=5, repeat=True)
    random.seed(0)
    assert [d.impath for d in repeated] == [d.impath for d in random.choices(small, k=5)]
    assert ds.generate_fewshot_dataset(items, num_shots=-1) is items
    train, val = ds.generate_fewshot_dataset(items, items, num_shots=1)
    assert len(train) == len(val) == 5


def test_datasetbase_properties_and_datum(tmp_path):
    items = _fake_datums(tmp_path, n_classes=3, n_per_class=2)
    ds = DatasetBase(train_x=items, test=items)
    assert ds.num_classes == 3
    assert ds.classnames == ["c0", "c1", "c2"] and ds.lab2cname[1] == "c1"
    assert set(ds.split_dataset_by_label(items)) == {0, 1, 2}
    with pytest.warns(UserWarning), pytest.raises(AssertionError, match="missing.jpg"):
        Datum(impath=str(tmp_path / "missing.jpg"))


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(str(tmp_path / "nope.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match="bad.png"):
        read_image(str(bad))
    good = tmp_path / "good.png"
    Image.new("L", (5, 4)).save(good)
    assert read_image(str(good)).mode == "RGB"


def test_data_manager_loaders(image_root, tmp_path, capsys):
    cfg = make_cfg(image_root, tmp_path)
    dm = DataManager(cfg)
    out = capsys.readouterr().out
    assert "Loading dataset: EngineToyData" in out and "# train_x" in out
    assert dm.num_classes == N_CLASSES and dm.val_loader is None
    assert dm.train_loader_x.drop_last and not dm.test_loader.drop_last
    batch = next(iter(dm.test_loader))
    assert batch["img"].shape == (8, 3, 8, 8)
    assert set(batch) == {"img", "label", "domain", "impath", "index"}
    # fewer items than the batch size: drop_last is off so the loader is not empty
    loader = build_data_loader(cfg, "RandomSampler", dm.dataset.train_x[:2], batch_size=4,
                               tfm=build_transform(cfg, is_train=True), is_train=True)
    assert len(loader) == 1 and not loader.drop_last


def test_empty_split_error_names_split(image_root, tmp_path):
    @DATASET_REGISTRY.register(force=True)
    class EngineToyNoTest(EngineToyData):
        def __init__(self, cfg):
            super().__init__(cfg)
            self._test = []

    cfg = make_cfg(image_root, tmp_path, **{"DATASET.NAME": "EngineToyNoTest"})
    with pytest.raises(ValueError, match="the test split is empty"):
        DataManager(cfg)


# ---------------------------------------------------------------- transforms
def test_transform_shapes_and_test_pipeline(tmp_path):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (8, 8)
    cfg.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize", "colorjitter",
                            "randomgrayscale", "gaussian_blur")
    cfg.INPUT.GB_K = 3
    img = Image.new("RGB", (12, 10), (10, 200, 30))
    assert build_transform(cfg, is_train=True)(img).shape == (3, 8, 8)

    cfg.INPUT.TRANSFORMS = ("random_crop", "normalize")
    assert build_transform(cfg, is_train=True)(Image.new("RGB", (8, 8))).shape == (3, 8, 8)

    cfg.INPUT.SIZE = (8, 6)
    tfm = build_transform(cfg, is_train=False)
    kinds = [type(t) for t in tfm.transforms]
    assert kinds == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert tfm.transforms[0].size == 8  # max(SIZE): shorter edge, aspect ratio kept
    assert tuple(tfm.transforms[1].size) == (8, 6)
    assert tfm(img).shape == (3, 8, 6)

    cfg.INPUT.TRANSFORMS = ("random_flipp",)
    with pytest.raises(ValueError, match="did you mean 'random_flip'"):
        build_transform(cfg, is_train=True)
    cfg.INPUT.NO_TRANSFORM = True
    assert build_transform(cfg) is None


# ---------------------------------------------------------------- optimisation
def _lr_sequence(epochs=5, **optim):
    cfg = get_cfg_default()
    settings = dict(NAME="sgd", LR=0.002, LR_SCHEDULER="cosine", MAX_EPOCH=5, WARMUP_EPOCH=1,
                    WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5)
    settings.update(optim)
    for k, v in settings.items():
        setattr(cfg.OPTIM, k, v)
    opt = build_optimizer(nn.Linear(2, 2), cfg.OPTIM)
    sched = build_lr_scheduler(opt, cfg.OPTIM)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, sched


def test_warmup_cosine_lr_sequence():
    lrs, sched = _lr_sequence()
    expected = [1e-5] + [0.001 * (1 + math.cos(math.pi * t / 5)) for t in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-9)

    # WARMUP_RECOUNT=False: Dassl sets the successor's last_epoch to WARMUP_EPOCH; the
    # chained cosine then continues from the base lr it holds at the hand-over.
    lrs, _ = _lr_sequence(WARMUP_RECOUNT=False)
    c = lambda t: 1 + math.cos(math.pi * t / 5)  # noqa: E731
    assert lrs == pytest.approx([1e-5, 0.002, 0.002 * c(2) / c(1), 0.002 * c(3) / c(1),
                                 0.002 * c(4) / c(1)], rel=1e-9)

    lrs, _ = _lr_sequence(WARMUP_EPOCH=2, WARMUP_TYPE="linear", WARMUP_MIN_LR=1e-4)
    assert lrs[:3] == pytest.approx([1e-4, 0.001, 0.002])

    state = sched.state_dict()
    assert isinstance(state["successor"], dict)  # no pickled scheduler objects


def test_single_step_and_optimizers():
    lrs, _ = _lr_sequence(epochs=4, LR_SCHEDULER="single_step", STEPSIZE=(2,), GAMMA=0.5,
                          WARMUP_EPOCH=-1)
    assert lrs == pytest.approx([0.002, 0.002, 0.001, 0.001])
    cfg = get_cfg_default()
    for name in ["sgd", "adam", "adamw", "amsgrad", "rmsprop", "radam"]:
        cfg.OPTIM.NAME = name
        assert build_optimizer(nn.Linear(2, 2), cfg.OPTIM).param_groups[0]["lr"] == cfg.OPTIM.LR
    cfg.OPTIM.NAME = "sgdd"
    with pytest.raises(ValueError, match="did you mean 'sgd'"):
        build_optimizer(nn.Linear(2, 2), cfg.OPTIM)


# ---------------------------------------------------------------- metrics and evaluator
def test_compute_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    target = torch.tensor([1, 0, 0, 1])
    top1, top2 = compute_accuracy((logits, None), target, topk=(1, 2))
    assert top1.item() == pytest.approx(50.0) and top2.item() == pytest.approx(75.0)


def test_classification_evaluator(capsys):
    cfg = get_cfg_default()
    cfg.TEST.PER_CLASS_RESULT = True
    ev = Classification(cfg, lab2cname={0: "a", 1: "b", 2: "c"})
    gt = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    ev.process(F.one_hot(pred[:3], 3).float(), gt[:3])  # two batches
    ev.process(F.one_hot(pred[3:], 3).float(), gt[3:])
    res = ev.evaluate()
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    f1 = 100 * (0.5 + 0.8 + 2 / 3) / 3
    assert list(res) == ["accuracy", "error_rate", "macro_f1", "perclass_accuracy"]
    assert res["accuracy"] == pytest.approx(400 / 6)
    assert res["error_rate"] == pytest.approx(100 - 400 / 6)
    assert res["macro_f1"] == pytest.approx(f1)
    assert res["perclass_accuracy"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    out = capsys.readouterr().out
    assert ("=> result\n* total: 6\n* correct: 4\n* accuracy: 66.7%\n* error: 33.3%\n"
            f"* macro_f1: {f1:.1f}%\n") in out
    ev.reset()
    ev.process(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert ev.evaluate()["accuracy"] == 100.0


# ---------------------------------------------------------------- trainer
def test_training_logs_and_checkpoints(image_root, tmp_path, capsys):
    out_dir = tmp_path / "run"
    cfg = make_cfg(image_root, out_dir, **{"OPTIM.MAX_EPOCH": 3, "TRAIN.CHECKPOINT_FREQ": 2,
                                           "TEST.NO_TEST": False})
    trainer = run_training(cfg)
    out = capsys.readouterr().out

    line = re.compile(r"^epoch \[(\d+)/3\] batch \[(\d+)/3\] time \d+\.\d{3} \(\d+\.\d{3}\) "
                      r"data \d+\.\d{3} \(\d+\.\d{3}\) loss \d+\.\d{4} \(\d+\.\d{4}\) "
                      r"acc \d+\.\d{4} \(\d+\.\d{4}\) lr \d\.\d{4}e-\d\d eta \d+:\d\d:\d\d$")
    progress = [m.groups() for m in map(line.match, out.splitlines()) if m]
    assert progress == [(str(e), "2") for e in (1, 2, 3)]  # 12 images / batch 4; PRINT_FREQ 2
    lines = out.splitlines()
    i = lines.index("Finish training")
    assert lines[i + 1] == "Deploy the last-epoch model"
    assert lines[i + 2] == "Evaluate on the *test* set"
    assert "* total: 12" in out and re.search(r"^Elapsed: \d+:\d\d:\d\d$", out, re.M)
    assert "lr 1.0000e-05" in out  # constant warm-up epoch

    ckpt_dir = out_dir / "linear"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "checkpoint", "model.pth.tar-2", "model.pth.tar-3"]
    assert (ckpt_dir / "checkpoint").read_text() == "model.pth.tar-3\n"
    ckpt = load_checkpoint(str(ckpt_dir / "model.pth.tar-3"))
    assert {"state_dict", "epoch", "optimizer", "scheduler", "val_result", "rng_state"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["val_result"] is None

    # eval-only loading with val_result None must not crash (Dassl issue #56)
    with torch.no_grad():
        trainer.model.weight.zero_()
    trainer.load_model(str(out_dir), epoch=3)
    assert torch.equal(trainer.model.weight, ckpt["state_dict"]["weight"])
    assert "val_result=None" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        trainer.load_model(str(out_dir), epoch=1)


def test_resume_matches_uninterrupted_run(image_root, tmp_path):
    overrides = {"TRAIN.CHECKPOINT_FREQ": 1, "OPTIM.LR": 0.002}  # small: no saturation
    full = run_training(make_cfg(image_root, tmp_path / "full", **overrides))

    part_dir = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_training(make_cfg(image_root, part_dir, **overrides), stop_at_epoch=2)
    assert (part_dir / "linear" / "checkpoint").read_text() == "model.pth.tar-2\n"
    shutil.copytree(part_dir, tmp_path / "part_no_rng")

    resumed = run_training(make_cfg(image_root, part_dir, **overrides))
    assert resumed.start_epoch == 2
    assert torch.equal(resumed.model.weight, full.model.weight)
    assert resumed.get_current_lr() == full.get_current_lr()

    # control: without the saved RNG states the resumed run draws other batches
    ckpt_path = tmp_path / "part_no_rng" / "linear" / "model.pth.tar-2"
    ckpt = torch.load(ckpt_path, weights_only=False)
    del ckpt["rng_state"]
    torch.save(ckpt, ckpt_path)
    other = run_training(make_cfg(image_root, tmp_path / "part_no_rng", **overrides), seed=123)
    assert not torch.equal(other.model.weight, full.model.weight)


def test_model_backward_rejects_non_finite(image_root, tmp_path):
    trainer = build_trainer(make_cfg(image_root, tmp_path))
    with pytest.raises(FloatingPointError):
        trainer.model_backward(torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(KeyError, match="registered"):
        trainer.get_model_names("nope")


# ---------------------------------------------------------------- config and logger
def test_cfg_defaults():
    cfg = get_cfg_default()
    assert cfg is not get_cfg_default()
    assert (cfg.SEED, cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.LR_SCHEDULER) == (-1, "adam", 3e-4,
                                                                               "single_step")
    assert (cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_RECOUNT) == (
        -1, "linear", True)
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 32 and cfg.DATALOADER.TEST.SAMPLER == "SequentialSampler"
    assert cfg.TEST.FINAL_MODEL == "last_step" and cfg.TRAIN.PRINT_FREQ == 10
    assert cfg.INPUT.SIZE == (224, 224) and cfg.INPUT.INTERPOLATION == "bilinear"


def test_setup_logger_tees_and_never_overwrites(tmp_path):
    old_out, old_err = sys.stdout, sys.stderr
    try:
        first = setup_logger(str(tmp_path))
        print("hello log")
        sys.stderr.write("10%\r50%\r100%\n")
        second = setup_logger(str(tmp_path))
        print("second run")
    finally:
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "close") and stream not in (old_out, old_err):
                stream.close()
        sys.stdout, sys.stderr = old_out, old_err
    assert first == str(tmp_path / "log.txt")
    assert re.fullmatch(r"log\.txt-\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d", os.path.basename(second))
    assert (tmp_path / "log.txt").read_text() == "hello log\n100%\n"
    assert open(second).read() == "second run\n"
