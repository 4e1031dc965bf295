"""Config nodes this project adds on top of Dassl's defaults (CoOp's ``extend_cfg``).

Every trainer's sub-node is declared here, once, so that yacs accepts the keys of
``configs/trainers/<Trainer>/*.yaml``. Keys marked [ours] are documented defaults where the
Self-TPT paper is silent (see ``docs/method.md``); set them to the paper's values once known.
"""
from __future__ import annotations

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
    return cfg
