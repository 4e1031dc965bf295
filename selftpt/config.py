"""Config nodes this project adds on top of Dassl's defaults (CoOp's ``extend_cfg``).

Every trainer's sub-node is declared here, once, so that yacs accepts the keys of
``configs/trainers/<Trainer>/*.yaml``. Keys marked [ours] are documented defaults where the
Self-TPT paper is silent (see ``docs/method.md``); set them to the paper's values once known.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from yacs.config import CfgNode as CN


def _prompt_node(n_ctx: int, ctx_init: str) -> CN:
    node = CN()
    node.N_CTX = n_ctx
    node.CTX_INIT = ctx_init
    # "auto" = fp16 on CUDA (as CoOp), fp32 on CPU where fp16 is slow or unsupported
    node.PREC = "auto"
    return node


def extend_cfg(cfg: CN) -> CN:
    """Add the project's keys to a Dassl default config, in place; returns ``cfg``."""
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"  # all | base | new (CoOp's base-to-new split)
    cfg.DATASET.SKIP_CORRUPT_IMAGES = False  # skip unreadable images (counted in results)

    cfg.MODEL.BACKBONE.PATH = ""  # local CLIP file (TorchScript or state_dict); overrides download

    # Checkpoints: Dassl saves only the last epoch by default (CHECKPOINT_FREQ 0), so an
    # interrupted run restarted from scratch. Saving after every epoch costs little (prompts and
    # heads are KBs to MBs); older epoch files are deleted once the next complete set is written.
    cfg.TRAIN.CHECKPOINT_FREQ = 1  # epochs between checkpoints; <= 0: last epoch only (Dassl)
    # model.pth.tar-<epoch> files kept per model, newest first (the last epoch's, which eval-only
    # runs load with --load-epoch, is always among them); 0 = keep all (Dassl)
    cfg.TRAIN.KEEP_CHECKPOINTS = 1

    cfg.TRAINER.METHOD_NAME = ""  # display name in tables (e.g. "SelfTPT-v"); "" = TRAINER.NAME

    cfg.TRAINER.COOP = _prompt_node(16, "")
    cfg.TRAINER.COOP.CSC = False  # class-specific context
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "end"  # end | middle | front

    cfg.TRAINER.COCOOP = _prompt_node(16, "")

    cfg.TRAINER.ZSCLIP = CN()  # ZeroshotCLIP and ZeroshotCLIP2
    cfg.TRAINER.ZSCLIP.PREC = "auto"
    # ZeroshotCLIP2's templates (selftpt.templates.ENSEMBLES): coop_select (CoOp's 7 ImageNet
    # templates + the dataset's own, except on ImageNet) | clip80 (CLIP's 80 ImageNet templates)
    cfg.TRAINER.ZSCLIP.ENSEMBLE = "coop_select"

    # TPT (Shu et al., NeurIPS 2022): per-image entropy minimisation over augmented views.
    cfg.TRAINER.TPT = _prompt_node(4, "a photo of a")
    cfg.TRAINER.TPT.N_VIEWS = 64  # clean view + 63 augmented views
    cfg.TRAINER.TPT.SELECTION_P = 0.1  # keep this fraction of lowest-entropy views
    cfg.TRAINER.TPT.STEPS = 1
    cfg.TRAINER.TPT.LR = 5e-3
    cfg.TRAINER.TPT.AUGMIX = "auto"  # auto (off for ImageNet and its variants) | on | off
    cfg.TRAINER.TPT.GRAD_CHECKPOINT = False  # trade time for memory on large class sets

    # C-TPT (Yoon et al., ICLR 2024): TPT's per-image step plus LAMBDA x text feature dispersion
    # (hee-suk-yoon/C-TPT, scripts/test_tpt_ctpt_{fg,ds}.sh).
    c = cfg.TRAINER.CTPT = cfg.TRAINER.TPT.clone()  # TPT's settings, as C-TPT runs TPT's code
    c.LAMBDA = 50.0  # fine-grained sets; 20 for ImageNet and its shifts (with AugMix on)

    # PromptSRC (Khattak et al., ICCV 2023): independent deep vision-language prompts (IVLP)
    # regularised towards frozen CLIP (muzairkhattak/PromptSRC, vit_b16_c2_ep20_batch4_4+4ctx)
    p = cfg.TRAINER.PROMPTSRC = CN()
    p.N_CTX_TEXT = 4
    p.N_CTX_VISION = 4
    p.CTX_INIT = "a photo of a"
    p.PREC = "auto"  # fp16 on CUDA (the original's fp16), fp32 on CPU
    p.PROMPT_DEPTH_TEXT = 9  # layers with text prompts (layer 0: the context); >= 1
    p.PROMPT_DEPTH_VISION = 9  # layers with vision prompts; 0 = none
    p.TEXT_LOSS_WEIGHT = 25.0  # L1 of prompted vs frozen (template-averaged) text features
    p.IMAGE_LOSS_WEIGHT = 10.0  # L1 of prompted vs frozen image features
    p.GPA_MEAN = 15.0  # Gaussian prompt aggregation (GPA) weights over epochs 1..MAX_EPOCH
    p.GPA_STD = 1.0

    # PromptSRC+TPT: TPT's per-image step on the prompts of a trained PromptSRC (--model-dir); the
    # prompt architecture is read from TRAINER.PROMPTSRC (the training run's keys)
    q = cfg.TRAINER.PROMPTSRC_TPT = cfg.TRAINER.TPT.clone()
    del q["N_CTX"], q["CTX_INIT"]  # the context is TRAINER.PROMPTSRC's
    q.TUNE = "all"  # all: every prompt tensor, as MaPLe+TPT | text: context and deep text tokens [ours]

    # MaPLe (Khattak et al., CVPR 2023): coupled deep language/vision prompts
    # (muzairkhattak/multimodal-prompt-learning, vit_b16_c2_ep5_batch4_2ctx)
    m = cfg.TRAINER.MAPLE = _prompt_node(2, "a photo of a")  # 2 tokens ("a photo"), "of a" kept fixed
    m.PROMPT_DEPTH = 9  # prompted layers of each tower (1 = context and its projection only)
    # MaPLe+TPT: TPT's per-image step on every prompt parameter of a trained MaPLe (--model-dir)
    t = cfg.TRAINER.MAPLE_TPT = _prompt_node(2, "a photo of a")
    t.PROMPT_DEPTH = 3  # must be the loaded model's; 3 = the cross-dataset MaPLe PromptAlign evaluates
    t.N_VIEWS = 64
    t.SELECTION_P = 0.1
    t.STEPS = 1
    t.LR = 5e-3  # TPT's
    t.AUGMIX = "auto"  # as TRAINER.TPT.AUGMIX
    t.GRAD_CHECKPOINT = False
    # PromptAlign (Abdul Samadh et al., NeurIPS 2023): MaPLe+TPT + token-statistics alignment
    # (jameelhassan/PromptAlign, DG_PAlign_vit_b16_c2_ep5_batch4_2ctx_cross_datasets)
    a = cfg.TRAINER.PROMPTALIGN = t.clone()
    a.LR = 4e-2  # domain generalisation config; its fine-grained (cross-dataset) config uses 5e-4
    a.ALIGN = True  # the distribution alignment term (DISTR_ALIGN)
    a.TPT_LOSS = True  # the entropy term
    a.ALIGN_WEIGHT = 100.0  # DISTR_LOSS_W, divided by ALIGN_LAYER_TO - ALIGN_LAYER_FROM
    a.ALIGN_LAYER_FROM = 0  # aligned ViT layers: FROM..TO-2, as the released code's loop
    a.ALIGN_LAYER_TO = 3
    a.ALIGN_SELECTION_P = 0.1  # views whose token statistics are aligned (ALIGN_THRESHOLD)
    a.SOURCE_DATASET = ""  # registered name; "" = the loaded model's training dataset [ours]
    a.SOURCE_SPLIT = "train"  # train | val | test [ours]
    a.SOURCE_MAX_IMAGES = 0  # first N images of the split, 0 = all [ours]
    a.SOURCE_STATS = ""  # statistics file; "" = next to the loaded model [ours]

    # Self-TPT (Zhu et al., arXiv 2408.05775)
    s = cfg.TRAINER.SELFTPT = _prompt_node(4, "a photo of a")  # [ours]
    s.CLASS_TOKEN_POSITION = "end"  # view used for classification [ours]
    s.CLS_VIEW = "single"  # single: CLASS_TOKEN_POSITION only | mean: mean of the 3 layouts [ours]
    # CPT: contrastive prompt tuning on class names
    s.CPT_VIEWS = ["front", "middle", "end", "handcrafted"]  # [paper]
    s.HANDCRAFTED_TEMPLATE = ""  # "" = the dataset's template, e.g. "a photo of a {}." [ours]
    s.HEAD = "mlp"  # mlp | linear | none [ours]
    s.TEMPERATURE = 0.07  # tau of the supervised contrastive loss [ours]
    # Class names per CPT forward (bounded memory) [ours]. Stage 1 samples this many per batch
    # (the batch's classes included); stage 2 visits every class in each step, in chunks of it.
    s.CPT_MAX_CLASSES = 64
    s.GRAD_CHECKPOINT = False  # checkpoint the text transformer during CPT
    # Stage 1: L = L_ce + LAMBDA_CPT * L_cpt + LAMBDA_GM * L_gm
    s.USE_CPT = True
    s.USE_GM = True
    s.LAMBDA_CPT = 1.0  # [ours]
    s.LAMBDA_GM = 1.0  # [ours]
    s.GM_EMA = 0.9  # decay alpha of the EMA of the CE gradient [ours]
    # Without GM, measuring cos(grad L_cpt, grad L_ce) costs two extra backward passes: every
    # N batches (batch 0 of each epoch included), 0 = never. With GM it is free: every batch.
    s.GRAD_COS_FREQ = 10
    # Stage 2: test-time adaptation on the target class names
    s.TTA = True
    s.TTA_STEPS = 10  # [ours]
    s.TTA_LR = 5e-3  # [ours] (TPT's lr)
    s.TTA_OPTIM = "adamw"  # adamw | adam | sgd [ours]
    # Stage 3: inference; Self-TPT-v ensembles predictions over TPT's views
    s.N_VIEWS = 1  # 1 = Self-TPT; 64 = Self-TPT-v [paper]
    s.VIEW_AGGREGATION = "mean"  # mean of softmax | confident (TPT's selection) [ours]
    s.SELECTION_P = 0.1  # for VIEW_AGGREGATION confident
    s.AUGMIX = "auto"  # as TRAINER.TPT.AUGMIX

    cfg.TEST.ECE_BINS = 15  # expected calibration error bins
    cfg.TEST.FEATURE_CACHE = ""  # folder of cached test image features (selftpt/feature_cache.py); "" = off
    cfg.TEST.SHARD = ""  # "i/n": evaluate shard i of n and write its predictions (selftpt/shards.py); "" = all
    return cfg


# ------------------------------------------------------------------------------ validation
# The values each key accepts, checked by ``validate_cfg`` before any work starts (train.py,
# the sweeps) and again by every trainer's ``check_cfg``; one place for the allowed sets.
class Rule:
    """What a key accepts; ``problem(value)`` is None when it does, else what is wrong."""

    def problem(self, value: Any) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class OneOf(Rule):
    choices: tuple

    def problem(self, value: Any) -> str | None:
        return None if value in self.choices else f"allowed: {', '.join(map(str, self.choices))}"


@dataclass(frozen=True)
class Number(Rule):
    """A number in [low, high] (either bound open when its flag says so; None = unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def problem(self, value: Any) -> str | None:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (self.integer and not isinstance(value, int))):
            return f"must be {'an integer' if self.integer else 'a number'}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (too_low or too_high):
            return None
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
        high = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high}"
        return f"must be {' and '.join(filter(None, (low, high)))}"


@dataclass(frozen=True)
class Shots(Rule):
    """DATASET.NUM_SHOTS: -1 (every image, Dassl's default) or a positive number of shots."""

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and (value == -1 or value >= 1)
        return None if ok else "must be -1 (all images) or a positive number of shots"


@dataclass(frozen=True)
class SubsetOf(Rule):
    """A list of distinct-enough choices: at least ``minimum`` different ones."""

    choices: tuple
    minimum: int = 1

    def problem(self, value: Any) -> str | None:
        unknown = [str(v) for v in value if v not in self.choices]
        if unknown:
            return f"has unknown choice(s) {', '.join(unknown)}; allowed: {', '.join(self.choices)}"
        if len(set(value)) < self.minimum:
            return f"must list at least {self.minimum} different of: {', '.join(self.choices)}"
        return None


@dataclass(frozen=True)
class Template(Rule):
    """A prompt template with exactly one ``{}`` for the class name ("" = the dataset's own)."""

    def problem(self, value: Any) -> str | None:
        if value == "":
            return None
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            return f"is not a template ({exc}); write one {{}} where the class name goes"
        return None if fields == [""] else "must hold exactly one {} where the class name goes"


@dataclass(frozen=True)
class ShardSpec(Rule):
    """TEST.SHARD: "" or "i/n" with 1 <= i <= n."""

    def problem(self, value: Any) -> str | None:
        from selftpt.shards import Shard, ShardError
        try:
            Shard.parse(str(value))
        except ShardError:
            return 'must be "i/n" with 1 <= i <= n (e.g. "2/4"), or "" for the whole test set'
        return None


POSITIVE = Number(low=0, low_open=True)
NON_NEGATIVE = Number(low=0)
COUNT = Number(low=1, integer=True)
FRACTION = Number(low=0, high=1, low_open=True)  # (0, 1]


def _rules() -> dict[str, Rule]:
    from selftpt.cpt import ADAPTATION_OPTIMIZERS, HEADS, VIEWS
    from selftpt.engine.optim import AVAI_OPTIMS, AVAI_SCHEDS  # Dassl's lists, as the engine writes them
    from selftpt.engine.transforms import AVAI_CHOICES
    from selftpt.precision import PRECISIONS
    from selftpt.prompt_learner import POSITIONS
    from selftpt.templates import ENSEMBLES

    rules: dict[str, Rule] = {
        "DATASET.NUM_SHOTS": Shots(),
        "DATASET.SUBSAMPLE_CLASSES": OneOf(("all", "base", "new")),
        "INPUT.INTERPOLATION": OneOf(("bilinear", "bicubic", "nearest")),
        "INPUT.TRANSFORMS": SubsetOf(tuple(AVAI_CHOICES), minimum=0),  # Dassl's names
        "OPTIM.NAME": OneOf(tuple(AVAI_OPTIMS)),
        "OPTIM.LR_SCHEDULER": OneOf(tuple(AVAI_SCHEDS)),
        "OPTIM.LR": POSITIVE,
        "OPTIM.WEIGHT_DECAY": NON_NEGATIVE,
        "OPTIM.WARMUP_TYPE": OneOf(("constant", "linear")),
        "DATALOADER.TRAIN_X.BATCH_SIZE": COUNT,
        "DATALOADER.TEST.BATCH_SIZE": COUNT,
        "DATALOADER.NUM_WORKERS": Number(low=0, integer=True),
        "TEST.FINAL_MODEL": OneOf(("last_step", "best_val")),
        "TRAIN.CHECKPOINT_FREQ": Number(low=0, integer=True),
        "TRAIN.KEEP_CHECKPOINTS": Number(low=0, integer=True),
        "TEST.ECE_BINS": COUNT,
        "TEST.SHARD": ShardSpec(),
        "TRAINER.ZSCLIP.ENSEMBLE": OneOf(ENSEMBLES),
        "TRAINER.COOP.CLASS_TOKEN_POSITION": OneOf(POSITIONS),
        "TRAINER.TPT.N_VIEWS": COUNT,
        "TRAINER.TPT.SELECTION_P": FRACTION,
        "TRAINER.TPT.STEPS": Number(low=0, integer=True),
        "TRAINER.TPT.LR": POSITIVE,
        "TRAINER.TPT.AUGMIX": OneOf(("auto", "on", "off")),
        "TRAINER.CTPT.N_VIEWS": COUNT,
        "TRAINER.CTPT.SELECTION_P": FRACTION,
        "TRAINER.CTPT.STEPS": Number(low=0, integer=True),
        "TRAINER.CTPT.LR": POSITIVE,
        "TRAINER.CTPT.AUGMIX": OneOf(("auto", "on", "off")),
        "TRAINER.CTPT.LAMBDA": NON_NEGATIVE,
        "TRAINER.PROMPTSRC.N_CTX_TEXT": COUNT,
        "TRAINER.PROMPTSRC.N_CTX_VISION": COUNT,
        "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT": COUNT,
        "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION": Number(low=0, integer=True),
        "TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT": NON_NEGATIVE,
        "TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT": NON_NEGATIVE,
        "TRAINER.PROMPTSRC.GPA_MEAN": NON_NEGATIVE,
        "TRAINER.PROMPTSRC.GPA_STD": POSITIVE,
        "TRAINER.PROMPTSRC_TPT.N_VIEWS": COUNT,
        "TRAINER.PROMPTSRC_TPT.SELECTION_P": FRACTION,
        "TRAINER.PROMPTSRC_TPT.STEPS": Number(low=0, integer=True),
        "TRAINER.PROMPTSRC_TPT.LR": POSITIVE,
        "TRAINER.PROMPTSRC_TPT.AUGMIX": OneOf(("auto", "on", "off")),
        "TRAINER.PROMPTSRC_TPT.TUNE": OneOf(("all", "text")),
        "TRAINER.MAPLE.PROMPT_DEPTH": COUNT,
        **{f"TRAINER.{n}.{k}": rule for n in ("MAPLE_TPT", "PROMPTALIGN") for k, rule in (
            ("PROMPT_DEPTH", COUNT), ("N_VIEWS", COUNT), ("SELECTION_P", FRACTION),
            ("STEPS", Number(low=0, integer=True)), ("LR", POSITIVE), ("AUGMIX", OneOf(("auto", "on", "off"))))},
        "TRAINER.PROMPTALIGN.ALIGN_WEIGHT": NON_NEGATIVE,
        "TRAINER.PROMPTALIGN.ALIGN_LAYER_FROM": Number(low=0, integer=True),
        "TRAINER.PROMPTALIGN.ALIGN_LAYER_TO": Number(low=2, integer=True),
        "TRAINER.PROMPTALIGN.ALIGN_SELECTION_P": FRACTION,
        "TRAINER.PROMPTALIGN.SOURCE_SPLIT": OneOf(("train", "val", "test")),
        "TRAINER.PROMPTALIGN.SOURCE_MAX_IMAGES": Number(low=0, integer=True),
        "TRAINER.SELFTPT.CLASS_TOKEN_POSITION": OneOf(POSITIONS),
        "TRAINER.SELFTPT.CLS_VIEW": OneOf(("single", "mean")),
        "TRAINER.SELFTPT.CPT_VIEWS": SubsetOf(VIEWS, minimum=2),
        "TRAINER.SELFTPT.HEAD": OneOf(HEADS),
        "TRAINER.SELFTPT.HANDCRAFTED_TEMPLATE": Template(),
        "TRAINER.SELFTPT.TEMPERATURE": POSITIVE,
        "TRAINER.SELFTPT.CPT_MAX_CLASSES": Number(low=2, integer=True),
        "TRAINER.SELFTPT.LAMBDA_CPT": NON_NEGATIVE,
        "TRAINER.SELFTPT.LAMBDA_GM": NON_NEGATIVE,
        "TRAINER.SELFTPT.GM_EMA": Number(low=0, high=1, high_open=True),
        "TRAINER.SELFTPT.GRAD_COS_FREQ": Number(low=0, integer=True),
        "TRAINER.SELFTPT.TTA_STEPS": Number(low=0, integer=True),
        "TRAINER.SELFTPT.TTA_LR": POSITIVE,
        "TRAINER.SELFTPT.TTA_OPTIM": OneOf(tuple(ADAPTATION_OPTIMIZERS)),
        "TRAINER.SELFTPT.N_VIEWS": COUNT,
        "TRAINER.SELFTPT.VIEW_AGGREGATION": OneOf(("mean", "confident")),
        "TRAINER.SELFTPT.SELECTION_P": FRACTION,
        "TRAINER.SELFTPT.AUGMIX": OneOf(("auto", "on", "off")),
    }
    for node in ("COOP", "COCOOP", "TPT", "CTPT", "SELFTPT", "MAPLE", "MAPLE_TPT", "PROMPTALIGN"):
        rules[f"TRAINER.{node}.N_CTX"] = COUNT
    for node in ("COOP", "COCOOP", "ZSCLIP", "TPT", "CTPT", "PROMPTSRC", "PROMPTSRC_TPT", "SELFTPT", "MAPLE",
                 "MAPLE_TPT", "PROMPTALIGN"):
        rules[f"TRAINER.{node}.PREC"] = OneOf(PRECISIONS)
    return rules


def _lookup(cfg: CN, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate_cfg(cfg: CN, trains: bool = True) -> None:
    """Refuse a bad value of any key with one ``ConfigError`` line naming the key, the value
    and what is allowed, before any work starts.

    Args:
        cfg: the merged config.
        trains: the trainer trains (then ``OPTIM.MAX_EPOCH`` must be at least 1).
    """
    from selftpt.errors import ConfigError

    for key, rule in _rules().items():
        value = _lookup(cfg, key)
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{key} is {value!r}; {problem}")
    if trains and COUNT.problem(cfg.OPTIM.MAX_EPOCH):
        from selftpt.trainer_facts import registered_trainers
        free = ", ".join(name for name, cls in registered_trainers().items() if not cls.TRAINS)
        raise ConfigError(f"OPTIM.MAX_EPOCH is {cfg.OPTIM.MAX_EPOCH!r}; a trainer that trains needs at "
                          "least 1 epoch" + (f" (training-free trainers: {free})" if free else ""))
    a = cfg.TRAINER.PROMPTALIGN
    if not (a.ALIGN or a.TPT_LOSS):
        raise ConfigError("TRAINER.PROMPTALIGN.ALIGN and TRAINER.PROMPTALIGN.TPT_LOSS are both False; nothing "
                          "would be tuned, so set one True")
    if a.ALIGN and a.ALIGN_LAYER_TO < a.ALIGN_LAYER_FROM + 2:
        raise ConfigError(f"TRAINER.PROMPTALIGN.ALIGN_LAYER_TO is {a.ALIGN_LAYER_TO}; layers ALIGN_LAYER_FROM.."
                          f"ALIGN_LAYER_TO-2 are aligned (as the released code), so it must be >= "
                          f"ALIGN_LAYER_FROM + 2 = {a.ALIGN_LAYER_FROM + 2}")
    s = cfg.TRAINER.SELFTPT
    if s.USE_GM and not s.USE_CPT:
        raise ConfigError("TRAINER.SELFTPT.USE_GM is True but TRAINER.SELFTPT.USE_CPT is False; GM aligns the "
                          "CPT gradient, so set USE_CPT True or USE_GM False")
    if s.TTA and not s.USE_CPT:
        raise ConfigError("TRAINER.SELFTPT.TTA is True but TRAINER.SELFTPT.USE_CPT is False; test-time "
                          "adaptation minimises the CPT loss through the head trained with CPT, so set USE_CPT "
                          "True or TTA False")
