"""Default configuration (Dassl's ``dassl/config/defaults.py`` keys and defaults).

Dassl-trainer-specific nodes (``TRAINER.MCD``, ``TRAINER.FIXMATCH``, ...) are left out:
the engine does not implement those trainers.
"""
from __future__ import annotations

from yacs.config import CfgNode as CN

__all__ = ["get_cfg_default", "clean_cfg"]

_C = CN()
_C.VERSION = 1
_C.OUTPUT_DIR = "./output"  # log.txt, checkpoints, tensorboard
_C.RESUME = ""  # folder of a previous run to resume from
_C.SEED = -1  # negative: unseeded
_C.USE_CUDA = True
_C.VERBOSE = True

# ---------------------------------------------------------------- input
_C.INPUT = CN()
_C.INPUT.SIZE = (224, 224)
_C.INPUT.INTERPOLATION = "bilinear"
_C.INPUT.TRANSFORMS = ()
_C.INPUT.NO_TRANSFORM = False  # True: no transform at all (tfm is None)
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]  # ImageNet
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
_C.INPUT.CROP_PADDING = 4  # random_crop
_C.INPUT.RRCROP_SCALE = (0.08, 1.0)  # random_resized_crop
_C.INPUT.CUTOUT_N = 1
_C.INPUT.CUTOUT_LEN = 16
_C.INPUT.GN_MEAN = 0.0  # gaussian_noise
_C.INPUT.GN_STD = 0.15
_C.INPUT.RANDAUGMENT_N = 2
_C.INPUT.RANDAUGMENT_M = 10
_C.INPUT.COLORJITTER_B = 0.4  # brightness
_C.INPUT.COLORJITTER_C = 0.4  # contrast
_C.INPUT.COLORJITTER_S = 0.4  # saturation
_C.INPUT.COLORJITTER_H = 0.1  # hue
_C.INPUT.RGS_P = 0.2  # randomgrayscale probability
_C.INPUT.GB_P = 0.5  # gaussian_blur probability
_C.INPUT.GB_K = 21  # gaussian_blur kernel size (odd)

# ---------------------------------------------------------------- dataset
_C.DATASET = CN()
_C.DATASET.ROOT = ""
_C.DATASET.NAME = ""
_C.DATASET.SOURCE_DOMAINS = ()
_C.DATASET.TARGET_DOMAINS = ()
_C.DATASET.NUM_LABELED = -1  # semi-supervised learning
_C.DATASET.NUM_SHOTS = -1  # images per class; -1 = all
_C.DATASET.VAL_PERCENT = 0.1
_C.DATASET.STL10_FOLD = -1
_C.DATASET.CIFAR_C_TYPE = ""
_C.DATASET.CIFAR_C_LEVEL = 1
_C.DATASET.ALL_AS_UNLABELED = False

# ---------------------------------------------------------------- data loader
_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 4
_C.DATALOADER.K_TRANSFORMS = 1  # augment each train image K times
_C.DATALOADER.RETURN_IMG0 = False  # also return the un-augmented image
_C.DATALOADER.TRAIN_X = CN()
_C.DATALOADER.TRAIN_X.SAMPLER = "RandomSampler"
_C.DATALOADER.TRAIN_X.BATCH_SIZE = 32
_C.DATALOADER.TRAIN_X.N_DOMAIN = 0  # RandomDomainSampler; 0 or -1: all domains
_C.DATALOADER.TRAIN_X.N_INS = 16  # RandomClassSampler: instances per class
_C.DATALOADER.TRAIN_U = CN()
_C.DATALOADER.TRAIN_U.SAME_AS_X = True  # reuse the TRAIN_X settings
_C.DATALOADER.TRAIN_U.SAMPLER = "RandomSampler"
_C.DATALOADER.TRAIN_U.BATCH_SIZE = 32
_C.DATALOADER.TRAIN_U.N_DOMAIN = 0
_C.DATALOADER.TRAIN_U.N_INS = 16
_C.DATALOADER.TEST = CN()
_C.DATALOADER.TEST.SAMPLER = "SequentialSampler"
_C.DATALOADER.TEST.BATCH_SIZE = 32

# ---------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.INIT_WEIGHTS = ""  # path to weights for initialisation
_C.MODEL.BACKBONE = CN()
_C.MODEL.BACKBONE.NAME = ""
_C.MODEL.BACKBONE.PRETRAINED = True
_C.MODEL.HEAD = CN()
_C.MODEL.HEAD.NAME = ""
_C.MODEL.HEAD.HIDDEN_LAYERS = ()
_C.MODEL.HEAD.ACTIVATION = "relu"
_C.MODEL.HEAD.BN = True
_C.MODEL.HEAD.DROPOUT = 0.0

# ---------------------------------------------------------------- optimisation
_C.OPTIM = CN()
_C.OPTIM.NAME = "adam"
_C.OPTIM.LR = 0.0003
_C.OPTIM.WEIGHT_DECAY = 5e-4
_C.OPTIM.MOMENTUM = 0.9
_C.OPTIM.SGD_DAMPNING = 0
_C.OPTIM.SGD_NESTEROV = False
_C.OPTIM.RMSPROP_ALPHA = 0.99
_C.OPTIM.ADAM_BETA1 = 0.9  # also for adamw/amsgrad/radam
_C.OPTIM.ADAM_BETA2 = 0.999
_C.OPTIM.STAGED_LR = False  # NEW_LAYERS get LR, the others LR * BASE_LR_MULT
_C.OPTIM.NEW_LAYERS = ()
_C.OPTIM.BASE_LR_MULT = 0.1
_C.OPTIM.LR_SCHEDULER = "single_step"
_C.OPTIM.STEPSIZE = (-1,)  # -1 or 0: step size = MAX_EPOCH
_C.OPTIM.GAMMA = 0.1
_C.OPTIM.MAX_EPOCH = 10
_C.OPTIM.WARMUP_EPOCH = -1  # > 0 enables warm-up
_C.OPTIM.WARMUP_TYPE = "linear"  # linear | constant
_C.OPTIM.WARMUP_CONS_LR = 1e-5  # lr during a constant warm-up
_C.OPTIM.WARMUP_MIN_LR = 1e-5  # start lr of a linear warm-up
_C.OPTIM.WARMUP_RECOUNT = True  # successor restarts its epoch count after warm-up

# ---------------------------------------------------------------- train
_C.TRAIN = CN()
_C.TRAIN.CHECKPOINT_FREQ = 0  # epochs between checkpoints; <= 0: last epoch only
_C.TRAIN.PRINT_FREQ = 10  # batches between log lines
_C.TRAIN.COUNT_ITER = "train_x"  # train_x | train_u | smaller_one

# ---------------------------------------------------------------- test
_C.TEST = CN()
_C.TEST.EVALUATOR = "Classification"
_C.TEST.PER_CLASS_RESULT = False
_C.TEST.COMPUTE_CMAT = False  # save the confusion matrix to OUTPUT_DIR/cmat.pt
_C.TEST.NO_TEST = False
_C.TEST.SPLIT = "test"  # test | val
_C.TEST.FINAL_MODEL = "last_step"  # last_step | best_val

# ---------------------------------------------------------------- trainer
_C.TRAINER = CN()
_C.TRAINER.NAME = ""


def get_cfg_default() -> CN:
    """Return a fresh (mutable) copy of the default config."""
    return _C.clone()


def clean_cfg(cfg: CN, trainer: str) -> None:
    """Remove the ``cfg.TRAINER`` sub-nodes of trainers other than ``trainer``.

    Args:
        cfg: the config to edit in place (must not be frozen).
        trainer: the trainer name, e.g. ``"CoOp"``; its node is ``TRAINER.<NAME upper>``.
    """
    keep = {"NAME", trainer.upper()}
    for key in list(cfg.TRAINER.keys()):
        if key not in keep:
            del cfg.TRAINER[key]
