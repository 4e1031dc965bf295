"""Results files, seed aggregation, log parsing, table formats and the efficiency plot.

Every tree here is generated in tmp_path; numbers are chosen so that the right statistic and
the tempting wrong one differ (e.g. HM of averaged B/N vs the average of per-seed HMs).
"""
from __future__ import annotations

import csv
import io
import json
import os

import pytest
from yacs.config import CfgNode as CN

import parse_results
import trainers  # noqa: F401  (registers the trainers: the tables order methods by their TABLE_ORDER)
from selftpt import collect, dassl_log, tables
from selftpt.plots import load_efficiency, plot_efficiency, validate_efficiency
from selftpt.results import (
    RESULTS_FILENAME,
    ResultsFileError,
    has_results,
    make_record,
    read_results,
    write_results,
)

# ----------------------------------------------------------------------------- helpers


def tiny_cfg(trainer="SelfTPT", dataset="Caltech101", sub="all", seed=1, shots=16,
             output_dir="out", lr=0.002, method_name="") -> CN:
    """A yacs config with the keys results.py reads (Dassl's names)."""
    cfg = CN()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.RESUME = ""
    cfg.SEED = seed
    cfg.DATASET = CN()
    cfg.DATASET.ROOT = "/data"
    cfg.DATASET.NAME = dataset
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = sub
    cfg.MODEL = CN()
    cfg.MODEL.BACKBONE = CN()
    cfg.MODEL.BACKBONE.NAME = "ViT-B/16"
    cfg.OPTIM = CN()
    cfg.OPTIM.LR = lr
    cfg.TEST = CN()
    cfg.TEST.SPLIT = "test"
    cfg.TRAINER = CN()
    cfg.TRAINER.NAME = trainer
    cfg.TRAINER.METHOD_NAME = method_name
    return cfg


def b2n_dir(root, sub, dataset, trainer, seed, shots=16, cfg="vit_b16"):
    test_or_train = "train_base" if sub == "base" else "test_new"
    return root / "base2new" / test_or_train / dataset / f"shots_{shots}" / trainer / cfg / f"seed{seed}"


def put_result(out_dir, acc, ece=None, **cfg_kw):
    cfg = tiny_cfg(output_dir=out_dir, **cfg_kw)
    metrics = {"accuracy": acc, "macro_f1": acc - 1.0, "ece": ece}
    return write_results(out_dir, make_record(cfg, metrics, num_images=100,
                                              extra={"tta_time_s": 1.5}))


def write_log(path, acc, trainer="CoOp", dataset="Caltech101", sub="all", seed=1,
              marker="Finish training", eval_only=False, with_config=True, val_acc=11.0):
    """A log shaped like Dassl's: arguments, config dump, training lines, evaluator block."""
    lines = []
    if with_config:
        lines += ["***************", "** Arguments **", "***************",
                  "backbone: ", f"eval_only: {eval_only}", f"seed: {seed}", f"trainer: {trainer}",
                  "************", "** Config **", "************",
                  str(tiny_cfg(trainer=trainer, dataset=dataset, sub=sub, seed=seed)),
                  "Collecting env info ...", "** System info **", "PyTorch version: 2.x"]
    lines += [f"Loading trainer: {trainer}"]
    if not eval_only:
        lines += ["epoch [1/2] batch [1/1] time 0.1 (0.1) data 0.0 (0.0) loss 1.0 (1.0) "
                  "lr 2.0000e-03 eta 0:00:01",
                  "Evaluate on the *val* set", "=> result", "* total: 50", "* correct: 5",
                  f"* accuracy: {val_acc}%", "* error: 89.0%"]
        if marker:
            lines += [marker, "Deploy the last-epoch model"]
    lines += ["Evaluate on the *test* set", "=> result", "* total: 1,549", "* correct: 1,000",
              f"* accuracy: {acc}%", f"* error: {100 - acc:.1f}%", "* macro_f1: 60.0%",
              "Elapsed: 0:00:05"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def cells_by(table, dataset, method, metric):
    """The tidy record of one cell."""
    rows = [r for r in table.records
            if r["dataset"] == dataset and r["method"] == method and r["metric"] == metric]
    assert len(rows) == 1, rows
    return rows[0]


# ----------------------------------------------------------------------------- results file


def test_record_fields_digest_and_roundtrip(tmp_path):
    rec = make_record(tiny_cfg(sub="new", seed=2, method_name="SelfTPT-v", output_dir=tmp_path),
                      {"accuracy": 93.25, "macro_f1": 90.0, "ece": 3.5, "top5": 99.0},
                      num_images=1549, extra={"cpt_loss": [2.0, 1.0]})
    assert rec["schema"] == 1 and rec["trainer"] == "SelfTPT" and rec["method"] == "SelfTPT-v"
    assert (rec["dataset"], rec["subsample_classes"], rec["seed"], rec["num_shots"]) == \
        ("Caltech101", "new", 2, 16)
    assert rec["metrics"]["error_rate"] == pytest.approx(6.75)
    assert rec["metrics"]["top5"] == 99.0 and rec["extra"]["cpt_loss"] == [2.0, 1.0]
    # volatile keys (output dir, data root, seed) do not change the digest; a setting does
    same = make_record(tiny_cfg(sub="new", seed=3, output_dir="elsewhere", method_name="SelfTPT-v"),
                       {"accuracy": 1.0}, 1)
    other = make_record(tiny_cfg(sub="new", lr=0.1, method_name="SelfTPT-v"), {"accuracy": 1.0}, 1)
    assert rec["config_digest"] == same["config_digest"] != other["config_digest"]
    assert make_record(tiny_cfg(), {"accuracy": 1.0}, 1)["method"] == "SelfTPT"  # the trainer

    path = write_results(tmp_path, rec)
    assert path == tmp_path / RESULTS_FILENAME and has_results(tmp_path)
    assert read_results(tmp_path) == rec == read_results(path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp file left


def test_record_from_project_config_when_engine_importable(tmp_path):
    toolbox = pytest.importorskip("selftpt.toolbox", reason="engine not importable yet")
    from selftpt.config import extend_cfg

    cfg = extend_cfg(toolbox.get_cfg_default())
    cfg.TRAINER.NAME, cfg.DATASET.NAME, cfg.SEED = "CoOp", "OxfordPets", 3
    rec = make_record(cfg, {"accuracy": 88.0}, num_images=10, output_dir=tmp_path)
    assert (rec["trainer"], rec["dataset"], rec["seed"], rec["subsample_classes"]) == \
        ("CoOp", "OxfordPets", 3, "all")


def test_write_refuses_to_overwrite_finished_results(tmp_path):
    put_result(tmp_path, 70.0)
    with pytest.raises(FileExistsError) as err:
        put_result(tmp_path, 99.0)
    assert str(tmp_path / RESULTS_FILENAME) in str(err.value) and "--output-dir" in str(err.value)
    assert read_results(tmp_path)["metrics"]["accuracy"] == 70.0  # first result intact


def test_invalid_record_is_never_written(tmp_path):
    rec = make_record(tiny_cfg(), {"accuracy": 50.0}, num_images=3)
    rec["metrics"]["accuracy"] = 150.0  # a fraction*100 bug, say
    with pytest.raises(ResultsFileError, match="percentage"):
        write_results(tmp_path, rec)
    assert not (tmp_path / RESULTS_FILENAME).exists()
    with pytest.raises(ResultsFileError, match="accuracy"):
        make_record(tiny_cfg(), {"acc": 50.0}, num_images=3)


def test_torn_json_is_detected_and_the_seed_counts_as_missing(tmp_path):
    for seed in (1, 2):
        put_result(b2n_dir(tmp_path, "new", "Caltech101", "SelfTPT", seed), 70.0 + seed,
                   sub="new", seed=seed)
    good = (b2n_dir(tmp_path, "new", "Caltech101", "SelfTPT", 1) / RESULTS_FILENAME).read_text()
    torn = b2n_dir(tmp_path, "new", "Caltech101", "SelfTPT", 3) / RESULTS_FILENAME
    torn.parent.mkdir(parents=True)
    torn.write_text(good[: len(good) // 2])
    with pytest.raises(ResultsFileError) as err:
        read_results(torn)
    assert str(torn) in str(err.value) and "not valid JSON" in str(err.value)

    found = collect.collect_runs([tmp_path])
    assert len(found.runs) == 2 and any(str(torn) in n for n in found.notes)
    tabs, _ = tables.build_tables(found.runs)
    new = cells_by(tabs[0], "Caltech101", "SelfTPT", "new")
    assert (new["n_seeds"], new["missing_seeds"], new["mean"]) == (2, "3", 71.5)


# ----------------------------------------------------------------------------- aggregation


@pytest.fixture
def b2n_tree(tmp_path):
    """Two methods, two datasets; CoOp's Caltech101 'new' lacks seed 3."""
    base = {"Caltech101": [90.0, 70.0, 80.0], "DescribableTextures": [60.0, 60.0, 60.0]}
    new = {"Caltech101": [60.0, 80.0, 70.0], "DescribableTextures": [50.0, 50.0, 50.0]}
    for dataset in base:
        for seed in (1, 2, 3):
            for sub, accs in (("base", base), ("new", new)):
                put_result(b2n_dir(tmp_path, sub, dataset, "SelfTPT", seed), accs[dataset][seed - 1],
                           ece=2.0 * seed, trainer="SelfTPT", dataset=dataset, sub=sub, seed=seed)
                if not (dataset == "Caltech101" and sub == "new" and seed == 3):
                    put_result(b2n_dir(tmp_path, sub, dataset, "CoOp", seed), 50.0 + seed,
                               trainer="CoOp", dataset=dataset, sub=sub, seed=seed)
    return tmp_path


def test_base2new_mean_std_and_hm_from_seed_averages(b2n_tree):
    tabs, notes = tables.build_tables(collect.collect_runs([b2n_tree]).runs)
    assert [t.title for t in tabs] == ["base2new"] and not notes
    t = tabs[0]
    b = cells_by(t, "Caltech101", "SelfTPT", "base")
    assert b["mean"] == pytest.approx(80.0)
    assert b["std"] == pytest.approx(8.164966, abs=1e-5)  # population: sqrt(200/3)
    # HM of means 2*80*70/150 = 74.667; the mean of per-seed HMs would be 73.778
    hm = cells_by(t, "Caltech101", "SelfTPT", "hm")
    assert hm["mean"] == pytest.approx(74.666667, abs=1e-5) and hm["incomplete"] == 0
    # Average over datasets: B = 70, N = 60, HM = 2*70*60/130 = 64.615 (not (74.667+54.545)/2)
    avg = {m: cells_by(t, "Average", "SelfTPT", m)["mean"] for m in ("base", "new", "hm")}
    assert avg == pytest.approx({"base": 70.0, "new": 60.0, "hm": 64.615385}, abs=1e-5)
    assert t.headline["SelfTPT"].mean == pytest.approx(64.615385, abs=1e-5)
    sample = tables.build_tables(collect.collect_runs([b2n_tree]).runs, ddof=1)[0][0]
    assert cells_by(sample, "Caltech101", "SelfTPT", "base")["std"] == pytest.approx(10.0)
    text = tables.render(tabs)
    assert "80.00 ± 8.16" in text and "74.67" in text and "64.62" in text
    assert "population std" in text  # the caption says which std
    # methods side by side: baseline row before ours inside each dataset block
    assert text.index("CoOp") < text.index("SelfTPT")


def test_missing_seeds_are_flagged_not_averaged_away(b2n_tree):
    tabs, _ = tables.build_tables(collect.collect_runs([b2n_tree]).runs)
    t = tabs[0]
    new = cells_by(t, "Caltech101", "CoOp", "new")
    assert (new["n_seeds"], new["n_expected"], new["missing_seeds"]) == (2, 3, "3")
    assert new["mean"] == pytest.approx(51.5)
    assert cells_by(t, "Caltech101", "CoOp", "hm")["incomplete"] == 1
    assert cells_by(t, "Average", "CoOp", "hm")["incomplete"] == 1
    assert cells_by(t, "Average", "SelfTPT", "hm")["incomplete"] == 0
    text = tables.render(tabs)
    assert "51.50 ± 0.50 (2/3)" in text
    # asking for a seed nobody ran marks every cell as partial
    four = tables.build_tables(collect.collect_runs([b2n_tree]).runs, seeds=(1, 2, 3, 4))[0][0]
    assert cells_by(four, "Caltech101", "SelfTPT", "base")["missing_seeds"] == "4"
    assert "(3/4)" in tables.render([four])


def test_extra_seeds_are_reported_and_left_out(tmp_path):
    for seed, acc in ((1, 10.0), (2, 20.0), (7, 90.0)):
        put_result(tmp_path / f"seed{seed}", acc, seed=seed)
    runs = collect.collect_runs([tmp_path]).runs
    tabs, notes = tables.build_tables(runs, seeds=(1, 2))
    assert cells_by(tabs[0], "Caltech101", "SelfTPT", "accuracy")["mean"] == 15.0
    assert any("[7]" in n for n in notes)
    every = tables.build_tables(runs, seeds=None)[0][0]
    assert cells_by(every, "Caltech101", "SelfTPT", "accuracy")["mean"] == pytest.approx(40.0)


def test_xd_table_excludes_the_source_from_the_mean(tmp_path):
    for dataset, acc in (("ImageNet", 70.0), ("Caltech101", 50.0), ("EuroSAT", 60.0)):
        for seed in (1, 2, 3):
            put_result(tmp_path / "xd" / dataset / f"seed{seed}", acc, dataset=dataset, seed=seed)
        # zero-shot CLIP is deterministic: one unseeded run (Dassl's SEED -1) is complete
        put_result(tmp_path / "xd" / dataset / "zs", acc - 5, trainer="ZeroshotCLIP",
                   dataset=dataset, seed=-1)
    tabs, _ = tables.build_tables(collect.collect_runs([tmp_path]).runs, source="imagenet")
    t = tabs[0]
    assert t.title == "xd" and t.header[1] == "ImageNet (source)"
    assert collect.canonical_dataset("shapeworld") == "ShapeWorld"  # the benchmark's source, by its stem
    assert cells_by(t, "Mean (targets)", "SelfTPT", "accuracy")["mean"] == pytest.approx(55.0)
    zs = cells_by(t, "Mean (targets)", "ZeroshotCLIP", "accuracy")
    assert zs["mean"] == pytest.approx(50.0) and zs["incomplete"] == 0
    assert [row[0] for row in t.rows] == ["ZeroshotCLIP", "SelfTPT"]  # baselines first


def test_a_sweeps_xd_runs_are_one_row_with_the_shots_the_model_was_trained_with(tmp_path):
    """The targets are evaluated on every image (NUM_SHOTS -1) of a model trained on 16 shots of
    the source; the sweep's folder (shots_16) says so, and the table keeps one row per method."""
    for seed in (1, 2, 3):
        put_result(tmp_path / "xd/train/ImageNet/shots_16/CoOp/bench" / f"seed{seed}", 70.0, dataset="ImageNet",
                   seed=seed, shots=16, trainer="CoOp")
        put_result(tmp_path / "xd/test/Caltech101/shots_16/CoOp/bench" / f"seed{seed}", 50.0, dataset="Caltech101",
                   seed=seed, shots=-1, trainer="CoOp")
    put_result(tmp_path / "elsewhere/seed1", 40.0, dataset="Caltech101", seed=1, shots=-1, trainer="ZeroshotCLIP")
    runs = collect.collect_runs([tmp_path]).runs
    assert {(r.method, r.dataset, r.shots) for r in runs} == {("CoOp", "ImageNet", 16), ("CoOp", "Caltech101", 16),
                                                             ("ZeroshotCLIP", "Caltech101", -1)}
    t = tables.build_tables([r for r in runs if r.method == "CoOp"], source="imagenet")[0][0]
    assert [row[0] for row in t.rows] == ["CoOp"]


def test_mixed_configs_in_one_group_are_reported(tmp_path):
    put_result(tmp_path / "seed1", 50.0, seed=1, lr=0.002)
    put_result(tmp_path / "seed2", 52.0, seed=2, lr=0.1)
    _, notes = tables.build_tables(collect.collect_runs([tmp_path]).runs, seeds=(1, 2))
    assert any("different configs" in n for n in notes)


# ----------------------------------------------------------------------------- Dassl logs


def test_both_end_markers_and_eval_only_logs(tmp_path):
    root = tmp_path / "fewshot"
    write_log(root / "seed1" / "log.txt", 70.0, seed=1, marker="Finish training")
    write_log(root / "seed2" / "log.txt", 72.0, seed=2, marker="Finished training")
    write_log(root / "seed3" / "log.txt", 74.0, seed=3, eval_only=True)
    # training that never finished: its only '* accuracy' is a validation score
    write_log(root / "seed4" / "log.txt", 99.0, seed=4, marker=None)
    parsed = dassl_log.parse_log(root / "seed2" / "log.txt")
    assert parsed.finished and parsed.num_images == 1549
    assert parsed.metrics == {"accuracy": 72.0, "error_rate": 28.0, "macro_f1": 60.0}
    unfinished = dassl_log.parse_log(root / "seed4" / "log.txt")
    assert not unfinished.finished and unfinished.metrics is None

    found = collect.collect_runs([root])
    assert sorted(r.seed for r in found.runs) == [1, 2, 3]
    assert any("did not finish" in n for n in found.notes)
    tabs, _ = tables.build_tables(found.runs)
    cell = cells_by(tabs[0], "Caltech101", "CoOp", "accuracy")
    assert tabs[0].title == "fewshot"
    assert cell["mean"] == pytest.approx(72.0) and cell["std"] == pytest.approx(1.632993, abs=1e-5)


def test_newest_log_is_read(tmp_path):
    run = tmp_path / "seed1"
    write_log(run / "log.txt", 60.0)
    write_log(run / "log.txt-2024-03-01-10-00-00", 65.0)
    write_log(run / "log.txt-2024-02-01-10-00-00", 50.0)
    os.utime(run / "log.txt", (4e9, 4e9))  # file times may lie after a copy; names do not
    assert dassl_log.newest_log(run).name == "log.txt-2024-03-01-10-00-00"
    (r,) = collect.collect_runs([tmp_path]).runs
    assert r.metrics["accuracy"] == 65.0


def test_log_without_config_falls_back_to_the_path(tmp_path):
    run = b2n_dir(tmp_path, "new", "oxford_pets", "MaPLe", 2, cfg="vit_b16_c2_ep5_batch4_2ctx")
    write_log(run / "log.txt", 77.7, eval_only=True, with_config=False)
    (r,) = collect.collect_runs([tmp_path]).runs
    assert (r.method, r.dataset, r.subsample, r.seed, r.shots, r.protocol) == \
        ("MaPLe", "OxfordPets", "new", 2, 16, "base2new")


def test_results_file_wins_over_log_in_the_same_run(tmp_path):
    run = tmp_path / "seed1"
    write_log(run / "log.txt", 10.0, trainer="SelfTPT")
    put_result(run, 80.0, seed=1)
    (r,) = collect.collect_runs([tmp_path]).runs
    assert r.origin == "results" and r.metrics["accuracy"] == 80.0


# ----------------------------------------------------------------------------- formats, CLI


def test_all_four_formats_contain_the_numbers(b2n_tree):
    tabs, _ = tables.build_tables(collect.collect_runs([b2n_tree]).runs, ece=True)
    term, md = tables.render(tabs, "terminal"), tables.render(tabs, "markdown")
    latex, text_csv = tables.render(tabs, "latex"), tables.render(tabs, "csv")
    for text in (term, md):
        assert "80.00 ± 8.16" in text and "74.67" in text and "ECE Base" in text
    assert md.startswith("### base2new") and "| Dataset" in md
    assert r"80.00 $\pm$ 8.16" in latex and r"\toprule" in latex and "74.67" in latex
    assert "(2/3)" in latex and "±" not in latex.split(r"\begin{tabular}")[1]
    rows = list(csv.DictReader(io.StringIO(text_csv)))
    hm = [r for r in rows if r["dataset"] == "Caltech101" and r["method"] == "SelfTPT"
          and r["metric"] == "hm"]
    assert float(hm[0]["mean"]) == pytest.approx(74.666667, abs=1e-5)
    ece = [r for r in rows if r["dataset"] == "Caltech101" and r["method"] == "SelfTPT"
           and r["metric"] == "ece_new"]
    assert float(ece[0]["mean"]) == pytest.approx(4.0)  # ECE 2, 4, 6 over seeds


def test_cli_prints_tables_and_reports_empty_roots(b2n_tree, tmp_path, capsys):
    assert parse_results.main([str(b2n_tree), "--format", "markdown", "--no-std",
                               "--methods", "SelfTPT", "CoOp"]) == 0
    out = capsys.readouterr().out
    assert "| Caltech101" in out and "80.00" in out and "± 8.16" not in out
    assert out.index("SelfTPT") < out.index("CoOp")  # the requested order
    empty = tmp_path / "empty"
    empty.mkdir()
    assert parse_results.main([str(empty)]) == 1
    assert "Nothing found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- plot


def efficiency_obj():
    return {"schema": 1, "device": "cpu", "backbone": "ViT-B/16", "precision": "fp32",
            "methods": {"SelfTPT": {"images_per_s": {"1": 140.0, "100": 900.0},
                                    "peak_mem_mb": 330.0, "one_time_s": 4.2},
                        "CoOp": {"images_per_s": {"1": 150.0}, "peak_mem_mb": 300.0,
                                 "one_time_s": None},
                        "TPT": {"images_per_s": {"1": 5.0}, "peak_mem_mb": 11000.0,
                                "one_time_s": 0.0}}}


def test_efficiency_schema_is_validated(tmp_path):
    assert validate_efficiency(efficiency_obj())["backbone"] == "ViT-B/16"
    bad = efficiency_obj()
    bad["methods"]["TPT"]["images_per_s"] = {"one": 5.0}
    with pytest.raises(ValueError, match="batch size key"):
        validate_efficiency(bad)
    bad = efficiency_obj()
    del bad["methods"]["CoOp"]["peak_mem_mb"]
    with pytest.raises(ValueError, match="peak_mem_mb"):
        validate_efficiency(bad)
    path = tmp_path / "eff.json"
    path.write_text(json.dumps(efficiency_obj())[:-5])
    with pytest.raises(ValueError, match=str(path)):
        load_efficiency(path)


def test_plot_png_is_written(b2n_tree, tmp_path, capsys):
    tabs, _ = tables.build_tables(collect.collect_runs([b2n_tree]).runs)
    acc = {m: c.mean for m, c in tabs[0].headline.items()}
    out, notes = plot_efficiency(acc, efficiency_obj(), tmp_path / "plots" / "eff.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert notes == ["TPT: in the efficiency JSON but has no results; not plotted"]
    with pytest.raises(ValueError, match="common batch sizes"):
        plot_efficiency(acc, efficiency_obj(), tmp_path / "x.png", batch_size=100)
    # through the CLI
    eff = tmp_path / "eff.json"
    eff.write_text(json.dumps(efficiency_obj()))
    png = tmp_path / "cli.png"
    assert parse_results.main([str(b2n_tree), "--plot", str(png), "--efficiency", str(eff)]) == 0
    assert png.stat().st_size > 5000


def test_gradient_alignment_per_epoch_from_results_files(tmp_path, capsys):
    curves = {("SelfTPT", 1): [0.1, 0.5], ("SelfTPT", 2): [0.3, 0.7], ("CoOp", 1): []}
    for (trainer, seed), curve in curves.items():
        out = b2n_dir(tmp_path, "base", "Caltech101", trainer, seed)
        cfg = tiny_cfg(trainer=trainer, sub="base", seed=seed, output_dir=out)
        write_results(out, make_record(cfg, {"accuracy": 50.0}, 10, extra={"grad_cos_per_epoch": curve}))
    table = tables.gradient_alignment_table(collect.collect_runs([tmp_path]).runs)
    (row,) = table.rows  # CoOp recorded no curve
    assert row[:2] == ["SelfTPT", "2"]
    assert [c.mean for c in row[2:]] == pytest.approx([0.2, 0.6])
    assert [c.std for c in row[2:]] == pytest.approx([0.1, 0.1])  # population std of two runs
    assert tables.gradient_alignment_table(collect.collect_runs([tmp_path]).runs, methods=["CoOp"]) is None
    assert parse_results.main([str(tmp_path), "--grad-cos", "--seeds", "1", "2"]) == 0
    assert "== Gradient alignment ==" in capsys.readouterr().out
    assert parse_results.main([str(tmp_path), "--grad-cos", "--seeds", "1", "2", "--format", "csv"]) == 0
    rows = [r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r["metric"] == "grad_cos"]
    assert [(r["epoch"], float(r["mean"])) for r in rows] == [("1", pytest.approx(0.2)), ("2", pytest.approx(0.6))]
