"""CoOp: learning to prompt for vision-language models (Zhou et al., IJCV 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selftpt.prompted_clip import PromptedCLIP
from selftpt.text_encoder import encode_in_chunks
from selftpt.toolbox import TRAINER_REGISTRY, compute_accuracy
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

    def forward_backward(self, batch: dict) -> dict[str, float]:
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels)
        self.step(loss, scaler=self.scaler)
        summary = {"loss": loss.item(), "acc": compute_accuracy(logits, labels)[0].item()}
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    # ------------------------------------------------------------------------ evaluation
    def prepare_for_test(self) -> None:
        """The prompt is fixed during evaluation: encode the class prompts once, not per batch."""
        with torch.no_grad(), self.autocast():
            classes = torch.arange(self.model.prompt_learner.n_cls, device=self.device)
            self.eval_text_features = encode_in_chunks(lambda c: self.model.text_features(indices=c), classes)
