"""CoOp: learning to prompt for vision-language models (Zhou et al., IJCV 2022)."""
from __future__ import annotations

from selftpt.prompted_clip import PromptedCLIP
from selftpt.toolbox import TRAINER_REGISTRY
from selftpt.trainer_base import PromptedClipTrainer


@TRAINER_REGISTRY.register()
class CoOp(PromptedClipTrainer):
    """Learns a continuous text context with cross-entropy on labelled few-shot images."""

    CFG_NODE = "COOP"
    TABLE_ORDER = 30
    # 4 tokens from "a photo of a", ImageNet's 50 epochs: CoOp as configs/plans.yaml trains it on
    # the paper's source dataset, with Self-TPT's prompt length.
    REFERENCE_CONFIGS = {"CoOp": ("vit_b16_ep50_ctxv1", ())}

    def build_model(self) -> None:
        clip_model = self.load_clip_model()
        print("Building custom CLIP")
        self.model = PromptedCLIP(self.build_prompt_learner(clip_model), clip_model)
        self.setup_prompt_training(self.model)
