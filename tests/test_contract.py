"""The contract every registered trainer keeps, checked for each one with no per-trainer code.

Parametrised over the trainers of ``trainers/`` found in the registry, so a new trainer is
covered as soon as it registers. In the tiny random-weight world (``tests/helpers.py``), each
trainer: builds; where it trains (``TRAINS``), one ``forward_backward`` moves its registered
models and leaves the frozen CLIP alone; its checkpoint, reloaded into a trainer built with
other random draws, gives the same logits; ``train.py`` leaves a valid ``results.json``; where
it uses the image-feature cache, cached and uncached logits are identical; and every bad value
of a key of its config node (``selftpt.config``'s rules) is refused by ``train.py`` with exit 2
and one line, before anything is written.

Also here: what the library reads from the trainers' descriptions (``selftpt.trainer_facts``:
table order, reference configs, nothing when no trainer is registered), and user values that
reach the library raising ``UserError`` (one line from ``train.py``).
"""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from selftpt.config import _rules
from selftpt.cpt import build_head
from selftpt.errors import UserError
from selftpt.launch import EXIT_USER_ERROR, main
from selftpt.losses import GradientEMA, ensemble_views
from selftpt.results import RESULTS_FILENAME, read_results
from selftpt.templates import ensemble_templates
from selftpt.toolbox import TRAINER_REGISTRY, build_trainer, set_random_seed
from selftpt.trainer_facts import reference_configs, table_rank
from selftpt.views import use_augmix
from tests.helpers import project_trainers, tiny_cfg, tiny_opts

TRAINERS = project_trainers()
# Values tried, in order, for a key of each type; the first that its rule refuses is used.
CANDIDATES = {str: ["not-a-choice"], list: ["['not-a-choice', 'not-a-choice']"],
              int: ["-1", "0", "1", "100000"], float: ["-1.0", "0.0", "1.0", "1.5", "1e9"]}


def test_the_project_registers_trainers_of_both_kinds():
    # guards the parametrisations below against an empty or one-sided list
    assert [name for name in TRAINERS if TRAINER_REGISTRY.get(name).TRAINS]
    assert [name for name in TRAINERS if not TRAINER_REGISTRY.get(name).TRAINS]


# ------------------------------------------------------------------------------ helpers
def build(root: Path, clip: Path, trainer: str, out: Path, seed: int, *opts: str) -> Any:
    """A trainer on TinyShapes; ``seed`` drives its random initial weights (cfg SEED stays 1)."""
    set_random_seed(seed)
    return build_trainer(tiny_cfg(root, clip, trainer, ("OUTPUT_DIR", str(out), "SEED", "1", *opts)))


def parameters(trainer: Any) -> dict[int, tuple[str, nn.Parameter]]:
    """Every parameter of every module the trainer holds, by identity: its registered models,
    the CLIP around them, heads."""
    found = {}
    for attribute, module in sorted(vars(trainer).items()):
        if isinstance(module, nn.Module):
            for name, param in module.named_parameters():
                found.setdefault(id(param), (f"{attribute}.{name}", param))
    return found


def one_step(trainer: Any) -> None:
    """One training step as Dassl's epoch loop makes it (no epoch end, so no LR step)."""
    trainer.set_model_mode("train")
    trainer.epoch, trainer.batch_idx, trainer.num_batches = 0, 0, 2
    trainer.forward_backward(next(iter(trainer.train_loader_x)))


def evaluation_logits(trainer: Any, images: torch.Tensor) -> torch.Tensor:
    """The evaluation's logits of ``images``: ``prepare_for_test`` (text features, adaptation),
    then ``model_inference`` without gradients, as ``test()`` runs them."""
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    with torch.no_grad():
        return trainer.model_inference(images)


def bad_value(key: str, default: Any) -> str:
    """A ``KEY VALUE`` string of the default's type that ``key``'s rule refuses."""
    rule = _rules()[key]
    for text in CANDIDATES.get(type(default), []):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if type(value) is type(default) and rule.problem(value) is not None:
            return text
    raise AssertionError(f"no candidate value of type {type(default).__name__} is refused by {key}'s rule {rule}")


def node_keys(trainer: str) -> list[str]:
    """The keys of the trainer's config node that ``validate_cfg`` checks."""
    prefix = f"TRAINER.{TRAINER_REGISTRY.get(trainer).CFG_NODE}."
    return [key for key in _rules() if key.startswith(prefix)]


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("trainer", TRAINERS)
def test_training_step_and_checkpoint_round_trip(trainer, tmp_path, tiny_data_root, tiny_clip_path):
    first = build(tiny_data_root, tiny_clip_path, trainer, tmp_path / "a", seed=1)
    if first.TRAINS:
        tuned = {id(p) for name in first.get_model_names() for p in first._models[name].parameters()}
        before = {key: param.detach().clone() for key, (_, param) in parameters(first).items()}
        one_step(first)
        for name in first.get_model_names():
            assert any(not torch.equal(p.detach(), before[id(p)]) for p in first._models[name].parameters()), \
                f"one step left the registered model {name} unchanged"
        moved = [label for key, (label, param) in parameters(first).items()
                 if key not in tuned and not torch.equal(param.detach(), before[key])]
        assert not moved, f"frozen parameters changed: {moved[:5]}"
    first.save_model(0, str(tmp_path / "checkpoint"))  # model.pth.tar-1 of each registered model
    second = build(tiny_data_root, tiny_clip_path, trainer, tmp_path / "b", seed=2)
    second.load_model(str(tmp_path / "checkpoint"), epoch=1)
    images, _ = first.parse_batch_test(next(iter(first.test_loader)))
    assert torch.equal(evaluation_logits(second, images), evaluation_logits(first, images))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_train_py_leaves_a_valid_results_file(trainer, tmp_path, tiny_data_root, tiny_clip_path):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), "--seed", "1", *tiny_opts(tiny_data_root, tiny_clip_path, trainer),
                 "OPTIM.MAX_EPOCH", "1"]) == 0
    record = read_results(out / RESULTS_FILENAME)  # validates the schema
    assert (record["trainer"], record["method"], record["dataset"]) == (trainer, trainer, "TinyShapes")
    assert record["num_images"] == 24 and 0 <= record["metrics"]["accuracy"] <= 100
    assert record["model"]["source"] == ("trained" if TRAINER_REGISTRY.get(trainer).TRAINS else "none")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_feature_cache_gives_the_same_logits(trainer, tmp_path, tiny_data_root, tiny_clip_path):
    cached = build(tiny_data_root, tiny_clip_path, trainer, tmp_path / "run", 1,
                   "TEST.FEATURE_CACHE", str(tmp_path / "cache"))
    if cached.image_encoder_for_cache() is None:
        pytest.skip(f"{trainer} does not use the feature cache")
    cached.set_model_mode("eval")
    cached.prepare_for_test()
    with torch.no_grad():
        plain = [(cached.model_inference(images), labels)
                 for images, labels in map(cached.parse_batch_test, cached.test_loader)]
        for _ in ("filling the cache", "reading it"):
            logits = list(cached.eval_logits("test", cached.test_loader))
            assert len(logits) == len(plain)
            for (got, got_labels), (want, want_labels) in zip(logits, plain):
                assert torch.equal(got, want) and torch.equal(got_labels, want_labels)
    assert list((tmp_path / "cache").iterdir())  # the cache was used, not bypassed


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_bad_value_of_its_node_is_one_line_before_any_work(trainer, tmp_path, capsys, tiny_data_root,
                                                                  tiny_clip_path):
    keys = node_keys(trainer)
    assert keys, f"validate_cfg checks no key of {trainer}'s node"
    defaults = tiny_cfg(tiny_data_root, tiny_clip_path, trainer)
    for key in keys:
        out = tmp_path / key
        value = bad_value(key, functools.reduce(lambda node, part: node[part], key.split("."), defaults))
        code = main(["--output-dir", str(out), *tiny_opts(tiny_data_root, tiny_clip_path, trainer), key, value])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == EXIT_USER_ERROR and len(err) == 1, (key, value, err)
        assert err[0].startswith(f"error: {key} is "), (key, value, err)
        assert not out.exists(), key  # refused before the output folder, the data or the model


# --------------------------------------------------------------- reading the descriptions
def test_table_rows_follow_their_trainers_and_unknown_ones_come_last():
    made_by = {"SelfTPT-v": "SelfTPT", "TPT+CoOp": "TPT", "ZeroshotCLIP2-80": "ZeroshotCLIP2", "KgCoOp": "KgCoOp",
               "Alpha": ""}
    rows = [*TRAINERS, *made_by]
    ranked = sorted(reversed(rows), key=lambda m: table_rank(m, made_by.get(m, m)))
    order = [TRAINER_REGISTRY.get(name).TABLE_ORDER for name in TRAINERS]
    assert order == sorted(order)  # project_trainers lists them in table order
    for method, trainer in made_by.items():
        if trainer in TRAINERS:  # right after its trainer's own row (and its other variants)
            assert ranked.index(trainer) < ranked.index(method) < len(TRAINERS) + 3
    assert ranked[-2:] == ["Alpha", "KgCoOp"]  # unregistered: after every known row, alphabetically


def test_the_library_reads_no_trainer_when_none_is_registered():
    # parse_results.py over someone's logs without this project's trainers: alphabetical rows,
    # no trainer folder names but the foreign ones, and torch is never imported for it
    code = ("import sys; from selftpt import collect, tables, trainer_facts as f; "
            "assert f.registered_trainers() == {}; "
            "rank = tables.method_ranker([]); "
            "assert sorted(['TPT', 'CoOp', 'SelfTPT-v'], key=rank) == ['CoOp', 'SelfTPT-v', 'TPT']; "
            "assert collect.known_trainers() == set(collect.FOREIGN_TRAINERS); "
            "assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_reference_configs_name_config_files_that_exist():
    repo = Path(__file__).resolve().parents[1]
    configs = reference_configs()
    assert set(TRAINERS) <= {trainer for trainer, _, _ in configs.values()}
    for label, (trainer, stem, opts) in configs.items():
        assert (repo / "configs" / "trainers" / trainer / f"{stem}.yaml").is_file(), label
        assert len(opts) % 2 == 0, label  # KEY VALUE pairs


# -------------------------------------------------- user values refused deep in the library
@pytest.mark.parametrize("call", [
    lambda: ensemble_views(torch.zeros(1, 2, 3), "median"),
    lambda: GradientEMA(1.0),
    lambda: build_head("deep", 8),
    lambda: use_augmix("maybe", "TinyShapes"),
    lambda: ensemble_templates("TinyShapes", "clip81"),
], ids=["view-aggregation", "gm-ema", "cpt-head", "augmix", "ensemble"])
def test_a_bad_user_value_reaching_the_library_is_a_user_error(call):
    # a UserError is one line from train.py (no traceback); still a ValueError for other callers
    with pytest.raises(UserError) as caught:
        call()
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)
