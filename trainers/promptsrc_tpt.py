"""PromptSRC+TPT: TPT's per-image prompt tuning started from trained PromptSRC prompts.

As TPT+CoOp starts TPT from a CoOp context, this starts it from a PromptSRC run:
``--model-dir <PromptSRC output dir> --load-epoch <E>`` loads ``VLPromptLearner/model.pth.tar-<E>``
(this project's or a released checkpoint), with the prompt architecture of TRAINER.PROMPTSRC
(the same keys as the training run's config). For every test image, exactly TPT's procedure
(``trainers/tpt.py``, settings from TRAINER.PROMPTSRC_TPT): 64 views, 10% most confident, one AdamW step
(lr 5e-3) on their marginal entropy, predict the clean view, then reset every tuned tensor and the
optimiser state.

What is tuned: every prompt tensor (TUNE "all", default): the text context, the deep text
tokens and the vision tokens, as MaPLe+TPT and PromptAlign tune all of MaPLe's prompts. The
views then pass the prompted image encoder at every step: the confident views are chosen once,
from a pass over all views without gradients, and each step back-propagates through those
views only (the same gradient as TPT's all-view forward, since views do not interact, with a
tenth of the activations). TUNE "text" keeps the vision prompts as loaded and is exactly TPT's
loop (the view features computed once, the text side of the prompts tuned).
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from selftpt.losses import select_confident
from selftpt.toolbox import TRAINER_REGISTRY
from selftpt.trainer_base import ClipTrainer
from trainers.promptsrc import MODEL_NAME, build_ivlp, check_ivlp_cfg
from trainers.tpt import TPT

TUNED = {"all": ("prompts.",), "text": ("prompts.prompt_learner.", "prompts.text_encoder.")}


@TRAINER_REGISTRY.register()
class PromptSRCTPT(TPT):
    """TPT on IVLP prompts loaded from a PromptSRC run, tuned per image."""

    CFG_NODE = "PROMPTSRC_TPT"  # TPT's settings; the prompt architecture comes from TRAINER.PROMPTSRC
    TABLE_ORDER = 57
    PROMPTED_NAME = "PromptSRC+TPT"  # the paper's row (parse_results.py --reference matches it)
    REFERENCE_CONFIGS = {"PromptSRC+TPT": ("vit_b16", ())}

    def check_cfg(self, cfg: Any) -> None:
        super().check_cfg(cfg)
        check_ivlp_cfg(cfg, type(self).__name__)

    def build_model(self) -> None:
        node = self.node
        print("Building IVLP CLIP")
        self.model = build_ivlp(self, grad_checkpoint=node.GRAD_CHECKPOINT)
        self.freeze_except(self.model, TUNED[node.TUNE])
        self.model.to(self.device)
        tuned = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = torch.optim.AdamW(tuned, lr=node.LR)  # TPT's optimiser (torch defaults)
        self.register_model(MODEL_NAME, self.model.prompts, self.optim, None)
        self.optim_state = copy.deepcopy(self.optim.state_dict())
        self.scaler = self.make_grad_scaler(init_scale=1000)
        self.prompt_init = "untrained IVLP prompts (no --model-dir)"
        self.capture_initial_prompt()

    def capture_initial_prompt(self) -> None:
        """Every tuned tensor as every image starts from it."""
        self.initial_prompts = {name: p.detach().clone() for name, p in self.model.named_parameters()
                                if p.requires_grad}

    def reset(self) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.initial_prompts:
                    p.copy_(self.initial_prompts[name])
        self.optim.load_state_dict(self.optim_state)

    def load_model(self, directory: str, epoch: int | None = None) -> None:
        """Load a PromptSRC checkpoint (``VLPromptLearner/``, this project's or a released one)."""
        ClipTrainer.load_model(self, directory, epoch)
        if directory:
            self.prompt_init = f"PromptSRC checkpoint {self._loaded_model['files'][MODEL_NAME]}"
            self.capture_initial_prompt()

    def prepare_for_test(self) -> None:
        super().prepare_for_test()
        self.result_extra["tpt_tuned"] = {"all": "every prompt tensor (text and vision)",
                                          "text": "the text prompts (context, deep text tokens)"}[self.node.TUNE]

    def _tune_and_predict(self, views: torch.Tensor) -> torch.Tensor:
        """TPT on one image; with TUNE "all" the vision prompts are tuned too, so the confident
        views are re-encoded at each step (with gradients) and the clean view after the last."""
        node = self.node
        if node.TUNE == "text":
            return super()._tune_and_predict(views)
        self.reset()
        model = self.model
        with torch.no_grad(), self.autocast():  # the selection, once, with the initial prompts
            logits = model.logits(model.encode_image(views), model.text_features())
            selected = select_confident(logits, node.SELECTION_P)
        with torch.enable_grad():  # test() runs under no_grad
            for _ in range(node.STEPS):
                with self.autocast():
                    text_features = model.text_features()
                    logits = model.logits(model.encode_image(views[selected]), text_features)
                    loss = self.tuning_loss(logits, text_features)
                self.step(loss, scaler=self.scaler)
        with torch.no_grad(), self.autocast():
            logits = model.logits(model.encode_image(views[:1]), model.text_features())
        return logits.float()
