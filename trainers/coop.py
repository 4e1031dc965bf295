"""CoOp: learning to prompt for vision-language models (Zhou et al., IJCV 2022)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from selftpt.prompt_learner import PromptLearner
from selftpt.prompted_clip import PromptedCLIP
from selftpt.toolbox import (
    TRAINER_REGISTRY,
    build_lr_scheduler,
    build_optimizer,
    compute_accuracy,
    load_pretrained_weights,
)
from selftpt.trainer_base import PromptedClipTrainer


def build_prompt_learner(node: Any, classnames: list[str], clip_model: torch.nn.Module) -> PromptLearner:
    """A ``PromptLearner`` from a ``TRAINER.<NAME>`` config node (N_CTX, CTX_INIT, CSC, position)."""
    return PromptLearner(
        classnames, clip_model, n_ctx=node.N_CTX, ctx_init=node.CTX_INIT,
        csc=node.get("CSC", False), class_token_position=node.get("CLASS_TOKEN_POSITION", "end"),
    )


@TRAINER_REGISTRY.register()
class CoOp(PromptedClipTrainer):
    """Learns a continuous text context with cross-entropy on labelled few-shot images."""

    CFG_NODE = "COOP"

    def build_model(self) -> None:
        cfg = self.cfg
        clip_model = self.load_clip_model()
        print("Building custom CLIP")
        self.model = PromptedCLIP(build_prompt_learner(self.node, self.classnames, clip_model), clip_model)
        self.freeze_except(self.model, ("prompt_learner",))
        if cfg.MODEL.INIT_WEIGHTS:
            load_pretrained_weights(self.model.prompt_learner, cfg.MODEL.INIT_WEIGHTS)
        self.model.to(self.device)
        self.optim = build_optimizer(self.model.prompt_learner, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", self.model.prompt_learner, self.optim, self.sched)
        self.scaler = self.make_grad_scaler()

    def forward_backward(self, batch: dict) -> dict[str, float]:
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels)
        self.step(loss, scaler=self.scaler)
        summary = {"loss": loss.item(), "acc": compute_accuracy(logits, labels)[0].item()}
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    # ------------------------------------------------------------------------ evaluation
    def prepare_for_test(self) -> None:
        """The prompt is fixed during evaluation: encode the class prompts once, not per batch."""
        with torch.no_grad(), self.autocast():
            chunks = torch.arange(self.model.prompt_learner.n_cls, device=self.device).split(256)
            self.eval_text_features = torch.cat([self.model.text_features(indices=c) for c in chunks])
