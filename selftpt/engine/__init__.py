"""A Dassl-compatible engine: the subset of Dassl 0.6.3 that the project uses, with Dassl's
names, signatures and semantics (see ``selftpt/toolbox.py``, which picks real Dassl when it
is installed and this package otherwise)."""
from .checkpoint import (
    count_num_param,
    get_rng_state,
    init_network_weights,
    load_checkpoint,
    load_pretrained_weights,
    open_all_layers,
    open_specified_layers,
    resume_from_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .config import clean_cfg, get_cfg_default
from .data import (
    DATASET_REGISTRY,
    DataManager,
    DatasetBase,
    DatasetWrapper,
    Datum,
    MissingImageFileError,
    build_data_loader,
    build_dataset,
)
from .evaluation import EVALUATOR_REGISTRY, Classification, EvaluatorBase, build_evaluator
from .logger import Logger, setup_logger
from .meters import AverageMeter, MetricMeter
from .metrics import compute_accuracy
from .optim import (
    ConstantWarmupScheduler,
    LinearWarmupScheduler,
    build_lr_scheduler,
    build_optimizer,
)
from .registry import (
    Registry,
    RegistryKeyError,
    check_availability,
    get_most_similar_str_to_a_from_b,
)
from .samplers import RandomClassSampler, build_sampler
from .trainer import TRAINER_REGISTRY, SimpleTrainer, TrainerBase, TrainerX, build_trainer
from .transforms import INTERPOLATION_MODES, build_transform
from .utils import (
    check_isfile,
    collect_env_info,
    download_url,
    listdir_nohidden,
    mkdir_if_missing,
    read_image,
    read_json,
    set_random_seed,
    tolist_if_not,
    write_json,
)
