"""MaPLe+TPT: TPT's per-image prompt tuning (Shu et al., NeurIPS 2022) on a trained MaPLe model.

As TPT+CoOp starts TPT from a trained CoOp prompt, this starts it from trained MaPLe prompts:
``--model-dir`` (``PROMPTS_FROM=MaPLe/<cfg>`` in the sweeps) loads
``MultiModalPromptLearner/model.pth.tar-<epoch>`` of a MaPLe run (or the original code's
checkpoint). For every test image, independently: 64 views (clean view first), the 10% of views
with the lowest prediction entropy, one AdamW step (lr 5e-3, torch defaults) on the entropy of
their averaged prediction, then the clean view is predicted with the tuned prompts, and every
prompt parameter and the optimiser's moments are reset before the next image.

What is tuned is what the original code (PromptAlign's ``test_time_tuning`` with the alignment
off, which is how MaPLe+TPT is run there) tunes: every parameter of the prompt learner (the
context, the deeper language prompts and the coupling projections). Since the vision prompts
are projections of them, the views are re-encoded with gradients at every step (TPT on CoOp
keeps the image features fixed instead). Without ``--model-dir`` it starts from MaPLe's
initialisation (random deep prompts and projections): runnable, not meaningful.

The checkpoint's ``PROMPT_DEPTH`` must be this config's (the default, 3, is the depth of the
cross-dataset MaPLe that PromptAlign evaluates); another is refused in one line.
"""
from __future__ import annotations

import copy
import os.path as osp
import re

import torch

from selftpt.errors import UserError
from selftpt.losses import marginal_entropy, select_confident
from selftpt.maple_prompts import CHECKPOINT_NAME
from selftpt.toolbox import TRAINER_REGISTRY, load_checkpoint
from selftpt.trainer_base import CheckpointError, ClipTrainer
from trainers.maple import MaPLeModelMixin
from trainers.tpt import TPT

_DEEPER_TEXT_KEY = re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$")


@TRAINER_REGISTRY.register()
class MaPLeTPT(MaPLeModelMixin, TPT):
    """Per-image confident marginal-entropy tuning of every MaPLe prompt parameter."""

    CFG_NODE = "MAPLE_TPT"
    TABLE_ORDER = 52
    PROMPTED_NAME = "MaPLe+TPT"  # the paper's row (parse_results.py --reference matches it)
    REFERENCE_CONFIGS = {"MaPLe+TPT": ("vit_b16_c2_ep5_batch4_2ctx_cross_datasets", ())}
    AUTO_CUDA_PRECISION = "fp16"  # the original runs its fp16 CLIP under autocast

    # ----------------------------------------------------------------------------- model
    def build_model(self) -> None:
        node = self.node
        self.model = self.build_maple_model(grad_checkpoint=node.GRAD_CHECKPOINT)
        # TPT's optimiser: torch's AdamW with its defaults, on every prompt parameter.
        self.optim = torch.optim.AdamW(self.checkpoint_module.parameters(), lr=node.LR)
        self.register_model(CHECKPOINT_NAME, self.checkpoint_module, self.optim, None)
        self.optim_state = copy.deepcopy(self.optim.state_dict())
        self.scaler = self.make_grad_scaler(init_scale=1000)  # TPT's scale; None in fp32
        self.prompt_init = "MaPLe's initialisation (no --model-dir)"
        self.capture_initial_prompt()

    def capture_initial_prompt(self) -> None:
        """Remember every prompt parameter as the state each image starts from."""
        self.prompt_init_state = {name: p.detach().clone()
                                  for name, p in self.model.prompt_learner.named_parameters()}

    def reset(self) -> None:
        """All prompt parameters back to their initial state, optimiser moments cleared."""
        with torch.no_grad():
            for name, p in self.model.prompt_learner.named_parameters():
                p.copy_(self.prompt_init_state[name])
        self.optim.load_state_dict(self.optim_state)

    def load_model(self, directory: str, epoch: int | None = None) -> None:
        """Load trained MaPLe prompts (this project's or the original code's checkpoint)."""
        if not directory:
            ClipTrainer.load_model(self, directory, epoch)
            return
        path = self.check_maple_checkpoint(directory, epoch)
        ClipTrainer.load_model(self, directory, epoch)
        self.prompt_init = f"MaPLe checkpoint {path}"
        self.capture_initial_prompt()

    def check_maple_checkpoint(self, directory: str, epoch: int | None) -> str:
        """Refuse a MaPLe checkpoint of another prompt depth in one line; returns its path."""
        path = self._checkpoint_path(directory, CHECKPOINT_NAME, epoch)
        state = load_checkpoint(path)["state_dict"]
        deeper = [int(m.group(1)) for key in state if (m := _DEEPER_TEXT_KEY.match(key))]
        depth, own = (max(deeper) + 2 if deeper else 1), self.model.prompt_learner.depth
        if "prompt_learner.ctx" in state and depth != own:
            raise CheckpointError(
                f"Checkpoint {path} holds MaPLe prompts of depth {depth} but TRAINER.{self.CFG_NODE}.PROMPT_DEPTH "
                f"builds {own}; set TRAINER.{self.CFG_NODE}.PROMPT_DEPTH {depth}")
        return osp.abspath(path)

    # ------------------------------------------------------------------------ evaluation
    def prepare_for_test(self) -> None:
        super().prepare_for_test()  # TPT's record; every MaPLe prompt parameter is tuned
        self.result_extra["maple_prompt_depth"] = self.model.prompt_learner.depth

    def _tune_and_predict(self, views: torch.Tensor) -> torch.Tensor:
        self.reset()
        self.selected = None  # chosen at the first step, kept for the others (as TPT)
        with torch.enable_grad():  # test() runs under no_grad
            for _ in range(self.node.STEPS):
                with self.autocast():
                    loss = self.view_loss(views)
                self.step(loss, scaler=self.scaler)
        with torch.no_grad(), self.autocast():
            logits = self.model(views[:1])  # (1, n_cls): the clean view, tuned prompts in both towers
        return logits.float()

    def view_loss(self, views: torch.Tensor) -> torch.Tensor:
        """The loss of one tuning step, from the views themselves (TPT's ``tuning_loss`` takes
        fixed view logits; here the vision prompts are tuned too). The confident views are chosen
        at the first step from a forward of every view without gradients; each step's forward,
        with gradients through both towers, then runs on the chosen views only: views do not
        interact in the ViT, so this is the gradient of the original's all-view forward, at a
        fraction of its memory."""
        if self.selected is None:
            with torch.no_grad():
                self.choose_views(self.model(views))
        return self.loss_on_views(views)

    def choose_views(self, logits: torch.Tensor) -> None:
        """TPT's confident selection: the SELECTION_P lowest-entropy views (kept for every step)."""
        self.selected = select_confident(logits.detach(), self.node.SELECTION_P)

    def loss_on_views(self, views: torch.Tensor) -> torch.Tensor:
        """Marginal entropy of the chosen views' predictions."""
        return marginal_entropy(self.model(views[self.selected]))

    def _memory_error(self, views: torch.Tensor) -> UserError:
        node, key = self.node, f"TRAINER.{self.CFG_NODE}"
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return UserError(
            f"{type(self).__name__} ran out of memory on {self.device.type} tuning MaPLe prompts for "
            f"{self.model.prompt_learner.n_cls} classes on {views.shape[0]} views (both encoders keep their "
            f"activations for the backward pass); set {key}.GRAD_CHECKPOINT True (recomputes the text "
            f"transformer in backward) and/or lower {key}.N_VIEWS (now {node.N_VIEWS}), or use a device with "
            f"more memory"
        )
