"""C-TPT: calibrated test-time prompt tuning via text feature dispersion (Yoon et al., ICLR 2024).

TPT (``trainers/tpt.py``) with one more term in its per-image objective: for every test image,
64 views, the 10% most confident, and one AdamW step (lr 5e-3) on

    L = marginal entropy of the selected views - LAMBDA x ATFD(class text features)

where ATFD, the average text feature dispersion, is the mean L2 distance of the normalised class
text features from their centroid (``selftpt.losses.text_feature_dispersion``): raising it
spreads the class prompts apart, which the paper ties to lower calibration error. The prompt and
the optimiser are reset before every image, as in TPT. As hee-suk-yoon/C-TPT
(``tpt_classification.py``, ``run_type tpt_ctpt``), the dispersion is taken from the same text
features the step's logits use, and it enters the same single step.

Published settings (the repository's scripts, CLIP ViT-B/16, "a photo of a"): LAMBDA 50 on the
fine-grained datasets (``configs/trainers/CTPT/vit_b16.yaml``), LAMBDA 20 with AugMix on for
ImageNet and its natural shifts (``vit_b16_ds.yaml``; the original's ``--I_augmix``).

C-TPT+CoOp starts, like TPT+CoOp, from a CoOp prompt: ``--model-dir`` (``PROMPTS_FROM=CoOp/<cfg>``).
"""
from __future__ import annotations

import torch

from selftpt.losses import marginal_entropy, text_feature_dispersion
from selftpt.toolbox import TRAINER_REGISTRY
from trainers.tpt import TPT


@TRAINER_REGISTRY.register()
class CTPT(TPT):
    """TPT whose per-image step also maximises the dispersion of the class text features."""

    CFG_NODE = "CTPT"
    TABLE_ORDER = 55  # right after TPT
    REFERENCE_CONFIGS = {"C-TPT": ("vit_b16", ())}

    def tuning_loss(self, logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """TPT's marginal entropy minus LAMBDA x ATFD (the dispersion is maximised)."""
        dispersion = text_feature_dispersion(text_features)
        self.last_dispersion = float(dispersion.detach())
        return marginal_entropy(logits) - self.node.LAMBDA * dispersion

    def prepare_for_test(self) -> None:
        super().prepare_for_test()
        self.result_extra["ctpt_lambda"] = float(self.node.LAMBDA)
        print(f"C-TPT: minus {self.node.LAMBDA} x text feature dispersion in each step")
