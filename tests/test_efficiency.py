"""The image-feature cache (selftpt/feature_cache.py) and the efficiency benchmark (CI-sized)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import trainers  # noqa: F401  (registers the trainers)
from selftpt.efficiency import main as benchmark_main
from selftpt.feature_cache import FeatureCache, feature_cache_key
from selftpt.plots import load_efficiency, plot_efficiency
from selftpt.toolbox import build_trainer
from tests.helpers import make_tiny_clip, tiny_cfg


@pytest.fixture(scope="module")
def other_clip_path(tmp_path_factory):
    """A tiny CLIP of the same architecture with other weights."""
    return make_tiny_clip(tmp_path_factory.mktemp("clip_b") / "tiny_clip_b.pt", seed=1)


def make(root, clip, trainer, cache, tmp_path, *opts):
    cfg = tiny_cfg(root, clip, trainer, ("OUTPUT_DIR", str(tmp_path / trainer), "SEED", "1",
                                         "TEST.FEATURE_CACHE", str(cache), "TRAINER.SELFTPT.TTA_STEPS", "1",
                                         *opts))
    torch.manual_seed(0)  # CoOp's random context, Self-TPT's head: the same in every build
    return build_trainer(cfg)


def evaluate(trainer, monkeypatch, split=None):
    """Run ``trainer.test`` and return (logits, labels, number of images the encoder saw)."""
    logits, labels, seen = [], [], []
    process = trainer.evaluator.process
    monkeypatch.setattr(trainer.evaluator, "process",
                        lambda mo, gt: (logits.append(mo.detach().cpu()), labels.append(gt.cpu()), process(mo, gt)))
    encoder = trainer.image_encoder_for_cache()
    forward = type(encoder).forward
    monkeypatch.setattr(type(encoder), "forward", lambda self, x: seen.append(x.shape[0]) or forward(self, x))
    trainer.test(split)
    monkeypatch.undo()
    return torch.cat(logits), torch.cat(labels), sum(seen)


def test_cached_logits_equal_uncached_and_each_image_is_encoded_once(tiny_data_root, tiny_clip_path, tmp_path,
                                                                     monkeypatch, capsys):
    cache = tmp_path / "cache"
    n_test = None
    encoded = 0
    for method in ("ZeroshotCLIP", "CoOp", "SelfTPT"):
        plain, plain_labels, n = evaluate(make(tiny_data_root, tiny_clip_path, method, "", tmp_path), monkeypatch)
        n_test = n
        cached, cached_labels, n_cached = evaluate(make(tiny_data_root, tiny_clip_path, method, cache, tmp_path),
                                                   monkeypatch)
        encoded += n_cached
        assert torch.equal(cached, plain), method  # identical, not merely close
        assert torch.equal(cached_labels, plain_labels), method  # label order kept
    assert encoded == n_test == 24  # three methods, one encoding pass
    assert len(list(cache.glob("*.pt"))) == 1
    out = capsys.readouterr().out
    assert out.count("not cached yet") == 1 and out.count("read from the cache") == 2
    assert out.count("Image features of the test split") == 3  # the split evaluated, named


def test_a_changed_key_misses(tiny_data_root, tiny_clip_path, other_clip_path, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    first, _, _ = evaluate(make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP", cache, tmp_path), monkeypatch)
    capsys.readouterr()
    changed = {
        "other weights": (other_clip_path, (), None),
        "other split": (tiny_clip_path, (), "val"),
        "other transform": (tiny_clip_path, ("INPUT.INTERPOLATION", "bilinear"), None),
        "other class subset": (tiny_clip_path, ("DATASET.SUBSAMPLE_CLASSES", "base"), None),
    }
    for what, (clip, opts, split) in changed.items():
        trainer = make(tiny_data_root, clip, "ZeroshotCLIP", cache, tmp_path, *opts)
        logits, _, n = evaluate(trainer, monkeypatch, split)
        out = capsys.readouterr().out
        assert "not cached yet" in out and "read from the cache" not in out, what
        assert n == len(logits), what  # every image encoded again
    assert len(list(cache.glob("*.pt"))) == 1 + len(changed)
    again, _, n = evaluate(make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP", cache, tmp_path), monkeypatch)
    assert n == 0 and torch.equal(again, first)


def test_key_covers_weights_in_place_edits_and_image_files(tiny_clip_path, tmp_path):
    from selftpt.clip_loader import load_clip
    from selftpt.toolbox import Datum

    encoder = load_clip(str(tiny_clip_path)).visual
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    source = [Datum(impath=str(image), label=0, classname="a")]
    key = lambda: feature_cache_key(encoder, "fp32", "cpu", "D", "all", "test", source, "T")  # noqa: E731
    before = key()
    assert key() == before
    with torch.no_grad():
        encoder.proj.mul_(1.5)  # an in-place change of the weights
    after = key()
    assert after["encoder_sha256"] != before["encoder_sha256"]
    image.write_bytes(b"yy")  # the same path, another file
    assert key()["images_sha256"] != after["images_sha256"]
    assert feature_cache_key(encoder, "fp16", "cpu", "D", "all", "test", source, "T") != key()


def test_a_torn_or_damaged_entry_is_detected_and_rebuilt(tiny_data_root, tiny_clip_path, tmp_path, monkeypatch,
                                                          capsys):
    cache = tmp_path / "cache"
    reference, _, _ = evaluate(make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP", cache, tmp_path), monkeypatch)
    (entry,) = cache.glob("*.pt")
    size = entry.stat().st_size
    for damage in ("truncate", "flip"):
        data = bytearray(entry.read_bytes())
        if damage == "truncate":  # an interrupted write of a non-atomic writer
            entry.write_bytes(bytes(data[: len(data) // 2]))
        else:  # a bit flipped inside the stored features
            torch_entry = torch.load(entry, weights_only=True)
            torch_entry["features"][3, 5] += 1.0
            torch.save(torch_entry, entry)
        capsys.readouterr()
        logits, _, n = evaluate(make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP", cache, tmp_path), monkeypatch)
        out = capsys.readouterr().out
        assert "is damaged" in out and "rebuilding it" in out, damage
        assert n == 24 and torch.equal(logits, reference), damage
        assert entry.stat().st_size == size  # rebuilt complete
        logits, _, n = evaluate(make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP", cache, tmp_path), monkeypatch)
        assert n == 0 and torch.equal(logits, reference)
    assert not list(cache.glob("*.tmp"))


def test_save_is_atomic(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    key = {"num_images": 2, "k": 1}
    cache.save(key, torch.ones(2, 3), torch.tensor([0, 1]))

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(key, torch.zeros(2, 3), torch.tensor([0, 1]))
    monkeypatch.undo()
    features, labels = cache.load(key)  # the old complete entry, untouched
    assert torch.equal(features, torch.ones(2, 3)) and not list(tmp_path.glob("*.tmp"))


def test_per_image_methods_do_not_use_the_cache(tiny_data_root, tiny_clip_path, tmp_path):
    tpt = make(tiny_data_root, tiny_clip_path, "TPT", tmp_path / "c", tmp_path)
    selftpt_v = make(tiny_data_root, tiny_clip_path, "SelfTPT", tmp_path / "c", tmp_path,
                     "TRAINER.SELFTPT.N_VIEWS", "4")
    assert tpt.image_encoder_for_cache() is None and selftpt_v.image_encoder_for_cache() is None


def test_benchmark_ci_configuration_writes_valid_json(tiny_clip_path, tmp_path, capsys):
    out = tmp_path / "eff"
    code = benchmark_main([
        "--backbone", str(tiny_clip_path), "--methods", "SelfTPT", "TPT", "--num-classes", "6",
        "--num-images", "3", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "1", "--tta-steps", "1",
        "--output-dir", str(out), "--quiet", "--opts", "TRAINER.TPT.N_VIEWS", "8"])
    printed = capsys.readouterr().out
    assert code == 0
    path = out / "efficiency_tiny-clip_6cls.json"
    obj = load_efficiency(path)  # validates schema 1
    assert set(obj["methods"]) == {"SelfTPT", "TPT"}
    assert set(obj["methods"]["SelfTPT"]["images_per_s"]) == {"1", "2"}
    assert set(obj["methods"]["TPT"]["images_per_s"]) == {"1"}  # per image: batch 2 not applicable
    # the one-time cost is Self-TPT's class-name adaptation; TPT has none
    assert obj["methods"]["SelfTPT"]["one_time_s"] > obj["methods"]["TPT"]["one_time_s"]
    assert obj["num_classes"] == 6 and obj["isolation"] == "one subprocess per method"
    assert "n/a (per image)" in printed and "Self-TPT >= 50x TPT" in printed
    assert json.loads(path.read_text())["targets"]
    png, _ = plot_efficiency({"SelfTPT": 70.0, "TPT": 65.0}, obj, tmp_path / "eff.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_timing_and_cache_sweep_in_process(tiny_clip_path, tmp_path, capsys):
    out = tmp_path / "eff"
    code = benchmark_main([
        "--backbone", str(tiny_clip_path), "--methods", "ZeroshotCLIP", "--num-classes", "4", "--num-images", "4",
        "--batch-sizes", "2", "--repeats", "1", "--tta-steps", "1", "--paired", "--cache-sweep", "--in-process",
        "--output-dir", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    obj = load_efficiency(out / "efficiency_tiny-clip_4cls.json")
    paired = obj["paired_throughput"]["batches"]["2"]
    assert paired["samples"] == 2
    sweep = obj["cache_sweep"]
    assert sweep["evaluations"] == 9 and sweep["num_images"] == 4
    assert {r["method"] for r in sweep["runs"]} == {"ZeroshotCLIP", "CoOp", "SelfTPT"}
    assert "paired in one process" in printed and "cache: 3 seeds x 3 prompt methods" in printed


def test_targets_are_data_and_their_thresholds_decide():
    from selftpt.efficiency.methods import load_settings
    from selftpt.efficiency.targets import evaluate_targets

    fast = {"images_per_s": {"1": 100.0}, "peak_mem_mb": 100.0, "one_time_s": 1.0}
    obj = {"backbone": "ViT-B/16", "num_classes": 1000, "device": "cpu",
           "methods": {"ZeroshotCLIP": dict(fast), "SelfTPT": dict(fast, peak_mem_mb=120.0),
                       "TPT": dict(fast, images_per_s={"1": 1.0})}}
    statuses = {t["target"]: t["status"] for t in evaluate_targets(obj)}
    assert statuses["Self-TPT >= 50x TPT's images/s at batch 1, >= 100 classes, ViT-B/16"] == "PASS"
    assert statuses["Self-TPT peak memory <= 1.1x zero-shot CLIP's"] == "FAIL"  # 1.2x
    assert statuses["cache: 3 seeds x 3 prompt methods <= 1.2x one image-encoding pass"] == "n/a"
    memory = next(t for t in load_settings()["targets"] if t["kind"] == "memory_ratio")
    (line,) = evaluate_targets(obj, [dict(memory, max_ratio=1.25, title="memory <= {max_ratio}x")])
    assert line["target"] == "memory <= 1.25x" and line["status"] == "PASS"


def test_benchmark_user_errors_are_one_line_with_exit_2(capsys):
    assert benchmark_main(["--opts", "OPTIM.LR"]) == 2
    assert capsys.readouterr().err == "error: --opts takes KEY VALUE pairs; got OPTIM.LR\n"
    assert benchmark_main(["--methods", "NoSuchMethod", "--backbone", "Bench-RN-T", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown method(s) ['NoSuchMethod']; choose from [") and "'SelfTPT'" in err


def test_measuring_subprocesses_register_what_this_process_registered():
    from selftpt.efficiency.methods import methods, registration_modules

    modules = registration_modules()
    assert {"trainers.selftpt", "trainers.tpt", "selftpt.efficiency.synthetic"} <= set(modules)
    assert methods()["TPT"].per_image and not methods()["SelfTPT"].per_image  # from the trainers' PER_IMAGE
