"""ZeroshotCLIP2: zero-shot CLIP with a prompt ensemble (CoOp's ZeroshotCLIP2, CLIP's 80 templates)."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import trainers  # noqa: F401  (registers the trainers)
from selftpt.clip_loader import tokenize
from selftpt.launch import main
from selftpt.sweep import Sweep
from selftpt.tables import method_ranker
from selftpt.templates import (
    ENSEMBLES,
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_SELECT,
    ensemble_templates,
    template_for,
)
from selftpt.toolbox import build_trainer
from tests.helpers import tiny_cfg, tiny_opts

REPO = Path(__file__).resolve().parents[1]

# sha256 of "\n".join(list) for the lists as published: CoOp's trainers/imagenet_templates.py
# (IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SELECT); TPT's data/imagnet_prompts.py holds the same 80.
SHA256_80 = "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af"
SHA256_SELECT = "6ef3883987d224b7949da69fe0b615af152e1560eaac4c5c38555e50c882d415"


def _sha(templates) -> str:
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()


def make(root, clip, trainer, out, *opts):
    return build_trainer(tiny_cfg(root, clip, trainer, ("OUTPUT_DIR", str(out / trainer), *opts)))


def test_template_lists_are_the_published_ones():
    assert len(IMAGENET_TEMPLATES) == 80 and _sha(IMAGENET_TEMPLATES) == SHA256_80
    assert len(IMAGENET_TEMPLATES_SELECT) == 7 and _sha(IMAGENET_TEMPLATES_SELECT) == SHA256_SELECT
    assert set(IMAGENET_TEMPLATES_SELECT) <= set(IMAGENET_TEMPLATES)


def test_coop_select_adds_the_dataset_template_except_on_imagenet():
    assert ensemble_templates("ImageNet") == list(IMAGENET_TEMPLATES_SELECT)
    # CoOp tests the name "ImageNet" exactly: the variants get "a photo of a {}." added
    assert ensemble_templates("ImageNetV2") == [*IMAGENET_TEMPLATES_SELECT, "a photo of a {}."]
    assert ensemble_templates("OxfordPets") == [*IMAGENET_TEMPLATES_SELECT, "a photo of a {}, a type of pet."]
    assert ensemble_templates("OxfordPets", "clip80") == list(IMAGENET_TEMPLATES)
    # sweep workers evaluate many datasets in one process: no call may grow a shared list
    ensemble_templates("OxfordPets").append("x {}")
    assert len(ensemble_templates("DescribableTextures")) == 8 and len(IMAGENET_TEMPLATES_SELECT) == 7


@pytest.mark.parametrize("ensemble, n_templates", [("coop_select", 8), ("clip80", 80)])
def test_class_features_are_the_renormalised_mean_of_per_template_features(
        tiny_data_root, tiny_clip_path, tmp_path, ensemble, n_templates):
    trainer = make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP2", tmp_path, "TRAINER.ZSCLIP.ENSEMBLE", ensemble)
    assert trainer.templates == ensemble_templates("TinyShapes", ensemble) and len(trainer.templates) == n_templates
    trainer.prepare_for_test()
    clip_model = trainer.clip_model
    with torch.no_grad():
        per_template = [F.normalize(clip_model.encode_text(tokenize([t.format(c) for c in trainer.classnames],
                                                                    clip_model.context_length)), dim=-1)
                        for t in trainer.templates]
        reference = F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)
    assert trainer.text_features.shape == (6, 64)
    torch.testing.assert_close(trainer.text_features, reference, rtol=0, atol=1e-5)
    # the ensemble is not any single template's features
    assert (trainer.text_features - per_template[0]).abs().max() > 1e-3


def test_a_one_template_ensemble_gives_zeroshot_clips_logits(tiny_data_root, tiny_clip_path, tmp_path):
    zs = make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP", tmp_path)
    zs2 = make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP2", tmp_path)
    zs2.templates = [template_for("TinyShapes")]
    zs.prepare_for_test()
    zs2.prepare_for_test()
    images, _ = zs.parse_batch_test(next(iter(zs.test_loader)))
    with torch.no_grad():
        expected, got = zs.model_inference(images), zs2.model_inference(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_train_py_evaluates_it_directly_and_records_the_ensemble(tiny_data_root, tiny_clip_path, tmp_path):
    out = tmp_path / "zs2"
    assert main([str(a) for a in ["--output-dir", out, *tiny_opts(tiny_data_root, tiny_clip_path, "ZeroshotCLIP2"),
                                  "TRAINER.ZSCLIP.ENSEMBLE", "clip80"]]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["trainer"] == "ZeroshotCLIP2" and rec["num_images"] == 24
    assert rec["extra"]["prompt_ensemble"] == "clip80" and rec["extra"]["num_templates"] == 80
    log = (out / "log.txt").read_text()
    assert "Prompt ensemble clip80 (n=80)" in log and "Finish training" not in log


def test_a_wrong_ensemble_is_one_line_before_any_work(tiny_data_root, tiny_clip_path, tmp_path, capsys,
                                                       monkeypatch):
    from trainers.zsclip import ZeroshotCLIP2

    def never(self, *args, **kwargs):
        raise AssertionError("data or model built despite a wrong TRAINER.ZSCLIP.ENSEMBLE")

    monkeypatch.setattr(ZeroshotCLIP2, "build_data_loader", never)
    monkeypatch.setattr(ZeroshotCLIP2, "build_model", never)
    out = tmp_path / "bad"
    code = main([str(a) for a in ["--output-dir", out, *tiny_opts(tiny_data_root, tiny_clip_path, "ZeroshotCLIP2"),
                                  "TRAINER.ZSCLIP.ENSEMBLE", "clip81"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == f"error: TRAINER.ZSCLIP.ENSEMBLE is 'clip81'; allowed: {', '.join(ENSEMBLES)}"
    assert not out.exists()  # refused before the output folder is made
    assert not (out / "results.json").exists()


def _evaluate(trainer, monkeypatch):
    """``trainer.test()``'s logits and the number of images its image encoder saw."""
    logits, seen = [], []
    process = trainer.evaluator.process
    monkeypatch.setattr(trainer.evaluator, "process", lambda mo, gt: (logits.append(mo.detach()), process(mo, gt)))
    encoder = trainer.image_encoder_for_cache()
    forward = type(encoder).forward
    monkeypatch.setattr(type(encoder), "forward", lambda self, x: seen.append(x.shape[0]) or forward(self, x))
    trainer.test()
    monkeypatch.undo()
    return torch.cat(logits), sum(seen)


def test_feature_cache_is_shared_with_zeroshot_clip(tiny_data_root, tiny_clip_path, tmp_path, monkeypatch):
    cache = ("TEST.FEATURE_CACHE", str(tmp_path / "cache"))
    plain, n_plain = _evaluate(make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP2", tmp_path / "a"), monkeypatch)
    _, n_zs = _evaluate(make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP", tmp_path / "b", *cache), monkeypatch)
    cached, n_cached = _evaluate(make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP2", tmp_path / "c", *cache),
                                 monkeypatch)
    assert n_plain == n_zs == 24 and n_cached == 0  # ZeroshotCLIP's entry serves ZeroshotCLIP2
    assert torch.equal(cached, plain)


def test_sweeps_run_it_once_unseeded_per_dataset_without_training():
    def sweep(protocol, **kw):
        return Sweep(protocol=protocol, trainer="ZeroshotCLIP2", cfg="bench", data="", seeds=[1, 2, 3], shots=[16],
                     output=Path("/o"), **kw)

    chains = sweep("base2new", datasets=["shapeworld", "moreshapes"]).chains()
    assert len(chains) == 2  # one chain per dataset, not per seed
    for chain, dataset in zip(chains, ["shapeworld", "moreshapes"]):
        assert [r.output_dir.relative_to("/o").parts for r in chain] == [
            ("base2new", part, dataset, "shots_16", "ZeroshotCLIP2", "bench", "unseeded")
            for part in ("test_base", "test_new")]
        assert all(r.eval_only and r.model_dir is None and r.opts[-2:] == ["SEED", "-1"] for r in chain)
    (chain,) = sweep("xd", datasets=["moreshapes", "fashion_mnist"], source="shapeworld").chains()
    # no training run on the source: only the targets, evaluated directly
    assert [r.output_dir.relative_to("/o").parts[:3] for r in chain] == [
        ("xd", "test", "moreshapes"), ("xd", "test", "fashion_mnist")]
    assert all(r.eval_only and r.output_dir.name == "unseeded" for r in chain)


@pytest.mark.parametrize("protocol", ["base2new", "xd", "dg", "fewshot"])
def test_scripts_drive_the_trainer(protocol):
    out = subprocess.run(["bash", f"scripts/zsclip2/{protocol}.sh", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and f"the {protocol} protocol for ZeroshotCLIP2" in out.stdout


def test_tables_list_it_right_after_zeroshot_clip():
    methods = ["SelfTPT", "CoOp", "ZeroshotCLIP2", "ZeroshotCLIP"]
    assert sorted(methods, key=method_ranker([])) == ["ZeroshotCLIP", "ZeroshotCLIP2", "CoOp", "SelfTPT"]


@pytest.mark.parametrize("trainer_name", ["ZeroshotCLIP", "ZeroshotCLIP2"])
def test_zero_shot_prompts_use_the_datasets_own_template(trainer_name, tiny_data_root, tiny_clip_path, tmp_path,
                                                         monkeypatch):
    import selftpt.templates as templates
    monkeypatch.setitem(templates.CUSTOM_TEMPLATES, "TinyShapes", "a drawing of a {}.")
    trainer = make(tiny_data_root, tiny_clip_path, trainer_name, tmp_path)
    if trainer_name == "ZeroshotCLIP":
        assert trainer.template == "a drawing of a {}."
    else:  # coop_select: CoOp's seven templates plus the dataset's own
        assert trainer.templates == [*IMAGENET_TEMPLATES_SELECT, "a drawing of a {}."]


def test_each_image_feature_is_normalised_on_its_own(tiny_data_root, tiny_clip_path, tmp_path):
    """One L2-normalised feature per image, whatever else is in the batch (cache and logits rely on it)."""
    trainer = make(tiny_data_root, tiny_clip_path, "ZeroshotCLIP", tmp_path)
    images, _ = trainer.parse_batch_test(next(iter(trainer.test_loader)))
    images = images[:3]
    with torch.no_grad():
        together = trainer.encode_images(images)
        alone = torch.cat([trainer.encode_images(images[i:i + 1]) for i in range(3)])
        raw = trainer.clip_model.encode_image(images)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together, raw / raw.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)
