"""Published reference numbers: the shipped data file, its validation, matching, and the
``--reference`` view of the tables in every format.

The miniature output trees are written as tests/test_results.py writes them (results.json
files). Their numbers sit at known distances from the published ones: within 1 point, off by
more than 1 point and more than the seed std, off by more than 1 point but less than the std,
and on another backbone (never compared).
"""
from __future__ import annotations

import copy
import csv
import io
import re
from pathlib import Path

import pytest
import yaml

import parse_results
from selftpt import collect, tables
from selftpt.published import (
    BUILTIN_PATH,
    CellQuery,
    PublishedDataError,
    load_reference,
    parse_reference,
)
from selftpt.results import make_record, write_results
from tests.test_results import tiny_cfg

B2N_DATASETS = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101",
                "FGVCAircraft", "SUN397", "DescribableTextures", "EuroSAT", "UCF101"]


def put(out: Path, acc: float, backbone: str = "ViT-B/16", **cfg_kw) -> None:
    """One results.json, as a run on ``backbone`` would write it."""
    cfg = tiny_cfg(output_dir=out, **cfg_kw)
    cfg.MODEL.BACKBONE.NAME = backbone
    write_results(out, make_record(cfg, {"accuracy": acc}, num_images=100))


def rows_of(text_csv: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text_csv)))


def one(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


# ----------------------------------------------------------------------------- the data file


def test_shipped_file_validates_and_every_number_is_cited():
    ref = load_reference("published")
    assert ref.path == BUILTIN_PATH and BUILTIN_PATH.is_file()
    assert len(ref.entries) > 100
    for e in ref.entries:
        b = e.block
        assert b.source.citation and b.source.short and b.table and b.read_from, b.id
        assert b.backbone and b.protocol in ("base2new", "xd", "dg", "fewshot")
        assert 0.0 <= e.value <= 100.0
        assert b.cross_checked in (True, False, "partly")
    # independent re-checks of what parse_reference enforces
    seen = {}
    for e in ref.entries:
        key = e.identity() + (e.shots,)
        assert key not in seen, (e, seen.get(key))
        seen[key] = e
    by_cell = {(e.block.id, e.method, e.dataset, e.kind): e.value for e in ref.entries}
    hms = [(k, v) for k, v in by_cell.items() if k[3] == "hm"]
    checked = 0
    for (bid, method, dataset, _), hm in hms:
        b, n = by_cell.get((bid, method, dataset, "base")), by_cell.get((bid, method, dataset, "new"))
        if b is not None and n is not None:
            assert abs(2 * b * n / (b + n) - hm) <= 0.01 + 1e-9
            checked += 1
    assert checked >= 5  # CLIP, CoOp, CoCoOp, MaPLe, PromptSRC averages


def test_shipped_file_holds_the_self_tpt_numbers_and_keeps_backbones_apart():
    ref = load_reference()

    def value(method, protocol, dataset, kind="accuracy", backbone="ViT-B/16"):
        (e,) = [e for e in ref.entries if (e.method, e.block.protocol, e.dataset, e.kind, e.block.backbone)
                == (method, protocol, dataset, kind, backbone)]
        return e

    assert value("SelfTPT", "xd", "Mean").value == 67.72
    assert value("SelfTPT-v", "xd", "Mean").value == 67.85
    assert value("SelfTPT", "xd", "EuroSAT").value == 52.94
    assert value("SelfTPT-v", "base2new", "Average", "hm").value == 77.47
    assert value("SelfTPT-v", "dg", "Mean").value == 65.38
    assert "method.md" in value("SelfTPT", "xd", "Mean").block.read_from[0]
    # TPT's own tables: RN50 and ViT-B/16 numbers are separate entries, never merged
    assert value("TPT", "dg", "ImageNetA", backbone="RN50").value == 26.67
    assert value("TPT", "dg", "ImageNetA").value == 54.77
    # zero-shot methods carry no shots; prompt learners their 16
    assert value("ZeroshotCLIP", "base2new", "Average", "hm").shots is None
    assert value("CoOp", "base2new", "Average", "hm").shots == 16
    # values a source prints in contradiction with its own mean are left out, not guessed
    assert not [e for e in ref.entries if e.method == "TPT+CoCoOp" and e.block.backbone == "ViT-B/16"
                and e.dataset == "ImageNetSketch"]


def minimal_file() -> dict:
    """A small valid file, mutated by the validation tests."""
    return {
        "schema": 1,
        "policy": {"flag_points": 1.0, "rounding_tolerance": 0.01},
        "sources": {"p": {"citation": "A. Author. A paper. 2022", "short": "paper A"}},
        "blocks": [
            {"id": "b2n", "source": "p", "table": "Table 1", "protocol": "base2new",
             "backbone": "ViT-B/16", "shots": 16, "read_from": ["somewhere"], "cross_checked": False,
             "means": {"Average": ["Caltech101", "EuroSAT"]},
             "rows": [{"method": "CoOp", "as_published": "CoOp",
                       "values": {"Caltech101": {"base": 90.0, "new": 60.0, "hm": 72.0},
                                  "EuroSAT": {"base": 80.0, "new": 50.0},
                                  "Average": {"base": 85.0, "new": 55.0, "hm": 66.79}}}]},
            {"id": "xd", "source": "p", "table": "Table 2", "protocol": "xd", "source_dataset": "ImageNet",
             "backbone": "ViT-B/16", "shots": 16, "read_from": ["somewhere"], "cross_checked": True,
             "means": {"Mean": ["Caltech101", "EuroSAT"]},
             "rows": [{"method": "CoOp", "as_published": "CoOp",
                       "values": {"Caltech101": 90.0, "EuroSAT": 50.0, "Mean": 70.0}},
                      {"method": "ZeroshotCLIP", "as_published": "CLIP", "shots": None,
                       "values": {"Caltech101": 88.0, "EuroSAT": None}}]},
        ],
    }


def test_minimal_file_is_valid_and_null_marks_a_missing_value():
    ref = parse_reference(minimal_file(), Path("mini.yaml"))
    assert {(e.method, e.dataset) for e in ref.entries if e.block.id == "xd"} == \
        {("CoOp", "Caltech101"), ("CoOp", "EuroSAT"), ("CoOp", "Mean"), ("ZeroshotCLIP", "Caltech101")}


def _drop_source(d):
    d["blocks"][0]["source"] = "nobody"


def _no_read_from(d):
    d["blocks"][0]["read_from"] = []


def _not_a_percentage(d):
    d["blocks"][1]["rows"][0]["values"]["Caltech101"] = 101.0


def _duplicate(d):
    d["blocks"].append(copy.deepcopy(d["blocks"][1]) | {"id": "xd-again"})


def _zero_shot_duplicate(d):
    # a shots-null number collides with a 16-shot one of the same cell
    d["blocks"][1]["rows"][1]["method"] = "CoOp"
    d["blocks"][1]["rows"].pop(0)
    d["blocks"].append(copy.deepcopy(minimal_file()["blocks"][1]) | {"id": "xd-16"})


def _bad_hm(d):
    d["blocks"][0]["rows"][0]["values"]["Caltech101"]["hm"] = 72.5  # 2*90*60/150 = 72.00


def _bad_mean(d):
    d["blocks"][1]["rows"][0]["values"]["Mean"] = 70.5  # (90 + 50) / 2 = 70


def _unknown_dataset(d):
    d["blocks"][1]["rows"][0]["values"]["Flowers"] = 70.0


def _missing_policy(d):
    del d["policy"]


@pytest.mark.parametrize("mutate, message", [
    (_drop_source, "is not among the file's sources"),
    (_no_read_from, "read_from"),
    (_not_a_percentage, "not a percentage"),
    (_duplicate, "is also given by block"),
    (_zero_shot_duplicate, "is also given by block"),
    (_bad_hm, "is not 2BN/(B+N)"),
    (_bad_mean, "is not the average"),
    (_unknown_dataset, "unknown dataset 'Flowers'"),
    (_missing_policy, "policy"),
])
def test_validation_rejects_inconsistent_files(mutate, message):
    data = minimal_file()
    mutate(data)
    with pytest.raises(PublishedDataError, match=re.escape(message)):
        parse_reference(data, Path("mini.yaml"))


def test_validation_catches_the_typos_of_the_readmes():
    """The PromptAlign README prints TPT + CLIP IN-V2 64.35 and PromptAlign IN-Sketch 56.23;
    both contradict its own OOD averages, which is why the file holds 63.45 and 50.23."""
    data = yaml.safe_load(BUILTIN_PATH.read_text(encoding="utf-8"))
    (block,) = [b for b in data["blocks"] if b["id"] == "promptalign-dg"]
    (row,) = [r for r in block["rows"] if r["method"] == "TPT"]
    row["values"]["ImageNetV2"] = 64.35
    with pytest.raises(PublishedDataError, match="is not the average"):
        parse_reference(data, BUILTIN_PATH)


# ----------------------------------------------------------------------------- matching


def test_only_the_same_settings_are_compared():
    ref = load_reference()
    q = CellQuery("xd", "test", "CoOp", "ViT-B/16", 16, "Caltech101", "accuracy")
    assert ref.match(q).value == 93.70
    assert ref.match(q.__class__(**{**q.__dict__, "backbone": "RN50"})).value == 86.53
    for change in ({"backbone": "Bench-RN-T"}, {"backbone": "ViT-B/32"}, {"shots": 4}, {"split": "val"},
                   {"protocol": "base2new"}, {"method": "CoOp (SelfTPT trainer)"}, {"kind": "ece"},
                   {"source": "Caltech101"}):
        assert ref.match(q.__class__(**{**q.__dict__, **change})) is None, change
    assert ref.match(q.__class__(**{**q.__dict__, "backbone": "vit_b16"})).value == 93.70  # spelling
    # a zero-shot number matches a run of any shots; a mean only over exactly its datasets
    zs = CellQuery("dg", "test", "ZeroshotCLIP", "ViT-B/16", 16, "ImageNetA", "accuracy")
    assert ref.match(zs).value == 47.87
    ood = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
    mean = CellQuery("dg", "test", "CoOp", "ViT-B/16", 16, "Mean (targets)", "accuracy", ood, "ImageNet")
    assert ref.match(mean).value == 59.28
    assert ref.match(mean.__class__(**{**mean.__dict__, "over": ood[:3]})) is None
    assert ref.unmatched_reason("xd", "test", "SelfTPT", "Bench-RN-T", 16).startswith(
        "no published number matches backbone Bench-RN-T")
    assert ref.is_off(43.0, 46.39, 0.82) and not ref.is_off(40.42, 41.92, 3.27)
    assert not ref.is_off(93.6, 93.70, None)


# ----------------------------------------------------------------------------- tables


@pytest.fixture
def xd_tree(tmp_path):
    """ImageNet -> 3 targets. CoOp ViT-B/16: Caltech101 within 1 point of the paper (93.60 vs
    93.70), EuroSAT 3.39 below and beyond its std (0.82), DTD 1.50 below but within its std
    (3.27); SelfTPT on the benchmark backbone (never compared)."""
    coop = {"ImageNet": [71.0, 71.0, 71.0], "Caltech101": [93.2, 93.6, 94.0],
            "EuroSAT": [42.0, 43.0, 44.0], "DescribableTextures": [36.42, 40.42, 44.42]}
    for dataset, accs in coop.items():
        for seed, acc in enumerate(accs, start=1):
            put(tmp_path / "xd" / "test" / dataset / "CoOp" / f"seed{seed}", acc,
                trainer="CoOp", dataset=dataset, seed=seed)
            put(tmp_path / "xd" / "test" / dataset / "SelfTPT" / f"seed{seed}", 30.0 + seed,
                backbone="Bench-RN-T", trainer="SelfTPT", dataset=dataset, seed=seed)
    return tmp_path


def render_all(root, *extra) -> dict[str, str]:
    runs = collect.collect_runs([root]).runs
    tabs, _ = tables.build_tables(runs, source="ImageNet")
    tabs, _ = tables.with_reference(tabs, load_reference(), reference_rows="--rows" in extra)
    return {fmt: tables.render(tabs, fmt) for fmt in tables.FORMATS}


def test_xd_cells_get_published_value_and_difference_in_every_format(xd_tree):
    out = render_all(xd_tree)
    for fmt in ("terminal", "markdown"):
        text = out[fmt]
        assert "CoOp pub." in text and "CoOp Δ" in text and "SelfTPT pub." not in text
        assert "93.70" in text and "-0.10" in text  # within a point: not marked
        assert "-3.39†" in text  # beyond 1 point and the std
        assert "-1.50" in text and "-1.50†" not in text  # beyond 1 point, within the std
        assert "-0.10†" not in text
        flat = " ".join(text.split())  # the terminal caption is wrapped
        assert "CoCoOp paper (Zhou et al., CVPR 2022), Table 2" in flat
        assert "Not compared: SelfTPT [Bench-RN-T] (no published number matches backbone Bench-RN-T" in flat
        assert "63.88" not in text  # the table's mean covers 3 targets, the paper's 10
    latex = out["latex"]
    assert r"-3.39$^\dagger$" in latex and r"CoOp $\Delta$" in latex and "†" not in latex
    assert r"-1.50 " in latex and r"-1.50$^\dagger$" not in latex and "Δ" not in latex
    rows = rows_of(out["csv"])
    euro = one(rows, dataset="EuroSAT", method="CoOp", metric="accuracy")
    assert (float(euro["published"]), float(euro["difference"]), euro["off_reference"]) == \
        (46.39, pytest.approx(-3.39), "1")
    assert "CoCoOp paper" in euro["reference"]
    dtd = one(rows, dataset="DescribableTextures", method="CoOp", metric="accuracy")
    assert (float(dtd["difference"]), dtd["off_reference"]) == (pytest.approx(-1.5), "0")
    assert one(rows, dataset="Caltech101", method="CoOp", metric="accuracy")["off_reference"] == "0"
    bench = one(rows, dataset="Caltech101", method="SelfTPT", metric="accuracy")
    assert bench["published"] == bench["difference"] == bench["reference"] == ""
    assert one(rows, dataset="Mean (targets)", method="CoOp", metric="accuracy")["published"] == ""


def test_reference_only_rows_on_the_tables_backbones_only(xd_tree, tmp_path):
    out = render_all(xd_tree, "--rows")["terminal"]
    line = next(row for row in out.splitlines() if row.startswith("PromptAlign [ViT-B/16] (published)"))
    assert "94.01" in line and "47.86" in line and "66.92" not in line
    assert "[RN50]" not in out  # RN50 numbers are never set beside these runs
    assert "ZeroshotCLIP" not in out  # no ViT-B/16 zero-shot CLIP cross-dataset number is published
    runs = collect.collect_runs([xd_tree]).runs
    tabs, _ = tables.with_reference(tables.build_tables(runs)[0], load_reference(), reference_rows=True)
    rows = rows_of(tables.render(tabs, "csv"))  # without --source every dataset is a target
    assert one(rows, method="PromptAlign [ViT-B/16] (published)", dataset="EuroSAT")["published"] == "47.86"
    # a benchmark-only tree: no published row, no comparison, and the footnote says why
    bench = tmp_path / "bench"
    for seed in (1, 2, 3):
        put(bench / "xd" / "Caltech101" / f"seed{seed}", 40.0, backbone="Bench-RN-T",
            trainer="SelfTPT", dataset="Caltech101", seed=seed)
    text = render_all(bench, "--rows")
    assert "pub." not in text["terminal"] and "(published)" not in text["terminal"]
    assert "Not compared with published numbers: no published number matches backbone Bench-RN-T" \
        in " ".join(text["terminal"].split())
    assert "published" not in rows_of(text["csv"])[0]  # nothing compared: the CSV keeps its columns


def test_base2new_average_is_compared_only_over_the_papers_eleven_datasets(tmp_path):
    for dataset in B2N_DATASETS:
        for seed in (1, 2, 3):
            for sub, acc in (("base", 82.69 + 0.1 * (seed - 2)), ("new", 61.22 + 0.1 * (seed - 2))):
                part = "train_base" if sub == "base" else "test_new"
                put(tmp_path / "base2new" / part / dataset / "CoOp" / f"seed{seed}", acc,
                    trainer="CoOp", dataset=dataset, sub=sub, seed=seed)
                if dataset != "EuroSAT":  # CoCoOp misses a dataset: its average covers 10
                    put(tmp_path / "base2new" / part / dataset / "CoCoOp" / f"seed{seed}", acc,
                        trainer="CoCoOp", dataset=dataset, sub=sub, seed=seed)
                if dataset == "Caltech101":  # CoCoOp's Table 1 gives no zero-shot Caltech101 value
                    put(tmp_path / "base2new" / part / dataset / "ZeroshotCLIP" / f"seed{seed}", acc,
                        trainer="ZeroshotCLIP", dataset=dataset, sub=sub, seed=seed)
    runs = collect.collect_runs([tmp_path]).runs
    plain, _ = tables.build_tables(runs)
    before = tables.render(plain)
    tabs, footnotes = tables.with_reference(plain, load_reference())
    assert tables.render(plain) == before  # the input tables are left as they were
    (t,) = tabs
    assert t.header[2:5] == ["Base", "Base pub.", "Δ Base"] and t.header[-3:] == ["HM", "HM pub.", "Δ HM"]
    rows = rows_of(tables.render(tabs, "csv"))
    base = one(rows, dataset="Average", method="CoOp", metric="base")
    new = one(rows, dataset="Average", method="CoOp", metric="new")
    hm = one(rows, dataset="Average", method="CoOp", metric="hm")
    assert (float(base["difference"]), base["off_reference"]) == (pytest.approx(0.0, abs=1e-9), "0")
    assert (float(new["difference"]), new["off_reference"]) == (pytest.approx(-2.0), "1")
    assert float(hm["published"]) == 71.66 and hm["off_reference"] == "1"  # HM has no seed std
    assert one(rows, dataset="Average", method="CoCoOp", metric="hm")["published"] == ""
    assert one(rows, dataset="Caltech101", method="CoOp", metric="base")["published"] == ""
    for fmt in ("terminal", "markdown", "latex"):
        text = tables.render(tabs, fmt)
        assert "82.69" in text and "63.22" in text and "71.66" in text
        assert "-2.00" + (r"$^\dagger$" if fmt == "latex" else "†") in text
    assert "Table 1 (a)" in footnotes[0]
    shown, _ = tables.with_reference(plain, load_reference(), reference_rows=True)
    text = tables.render(shown)
    maple = next(line for line in text.splitlines() if "MaPLe (published)" in line)
    assert maple.split()[-2:] == ["—", "78.55"] and "82.28" in maple  # measured cells: not run
    assert "CoCoOp (published)" not in text  # CoCoOp was run (on fewer datasets)
    rows = rows_of(tables.render(shown, "csv"))
    assert one(rows, method="MaPLe (published)", metric="hm")["dataset"] == "Average"
    cocoop_dtd = one(rows, dataset="DescribableTextures", method="CoCoOp", metric="base")
    assert float(cocoop_dtd["published"]) == 77.01  # Table 1's per-dataset block
    assert one(rows, dataset="Caltech101", method="CoCoOp", metric="base")["published"] == ""
    assert "Table 1 (b)-(l)" in footnotes[0] and "Table 1 (a)" in footnotes[0]
    assert "ZeroshotCLIP [ViT-B/16] (no published number for the datasets or means" in footnotes[0]


# ----------------------------------------------------------------------------- CLI


def test_cli_flags(xd_tree, tmp_path, capsys):
    assert parse_results.main([str(xd_tree), "--source", "ImageNet"]) == 0
    plain = capsys.readouterr().out
    assert "pub." not in plain and "published" not in plain.lower()
    assert parse_results.main([str(xd_tree), "--source", "ImageNet", "--reference", "published",
                               "--reference-rows", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "| CoOp pub." in out and "-3.39†" in out and "| PromptAlign (published)" not in out
    assert "PromptAlign [ViT-B/16] (published)" in out
    assert parse_results.main([str(xd_tree), "--reference", "published", "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert "off_reference" in captured.out.splitlines()[0]
    assert "note: reference: xd:" in captured.err and "Bench-RN-T" in captured.err
    assert parse_results.main([str(xd_tree), "--reference", "published", "--ece"]) == 0
    assert "none are published for ece" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        parse_results.main([str(xd_tree), "--reference-rows"])
    assert "--reference-rows needs --reference" in capsys.readouterr().err
    assert parse_results.main([str(xd_tree), "--reference", str(tmp_path / "none.yaml")]) == 2
    assert "no published-results file" in capsys.readouterr().err
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump(minimal_file()))
    assert parse_results.main([str(xd_tree), "--reference", str(own)]) == 0
    assert "paper A" in capsys.readouterr().out
