"""TPT: test-time prompt tuning (Shu et al., NeurIPS 2022), and TPT+CoOp.

For every test image, independently: 64 views (the clean resize + centre-crop view first,
then random resized crops + flips, with AugMix for non-ImageNet datasets), keep the 10% of
views whose prediction has the lowest entropy, take one AdamW step (lr 5e-3, torch defaults)
on the entropy of their averaged prediction, predict the clean view with the tuned prompt,
and reset the prompt and the optimiser state before the next image (azshue/TPT,
``tpt_classification.py``, ``test_time_tuning``).

TPT+CoOp is the same trainer started from a trained CoOp prompt: ``--model-dir`` (and
``--load-epoch``) load ``prompt_learner/model.pth.tar-<epoch>``, whose context must have as
many tokens as this config's prompt (TPT: CTX_INIT "a photo of a" = 4 tokens).

Precision as TPT: on CUDA the CLIP weights stay fp32 and the forward passes run under
autocast, with a ``GradScaler(init_scale=1000)`` kept across images (PREC ``auto`` = ``amp``);
PREC ``fp16`` uses the same scaler; the tuned context is an fp32 master copy in every
precision (``selftpt/precision.py``). On CPU ``auto`` is fp32.
"""
from __future__ import annotations

import copy
import time

import torch

from selftpt.errors import UserError
from selftpt.losses import marginal_entropy, select_confident
from selftpt.prompted_clip import PromptedCLIP
from selftpt.toolbox import TRAINER_REGISTRY, load_checkpoint
from selftpt.trainer_base import CheckpointError, ClipTrainer
from selftpt.views import TestTimeViews, use_augmix


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA OOM and for the CPU allocator's "can't allocate memory" error."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "Cannot allocate memory" in text)


@TRAINER_REGISTRY.register()
class TPT(ClipTrainer):
    """Per-image test-time prompt tuning by confident marginal-entropy minimisation."""

    CFG_NODE = "TPT"
    TRAINS = False  # nothing is trained beforehand: train.py evaluates directly
    PER_IMAGE = True  # tunes a prompt on each test image
    TABLE_ORDER = 50
    REFERENCE_CONFIGS = {"TPT": ("vit_b16", ())}
    AUTO_CUDA_PRECISION = "amp"  # TPT keeps CLIP in fp32 and uses autocast

    # ------------------------------------------------------------------------------ data
    def custom_test_transform(self) -> TestTimeViews:
        node = self.node
        self.views = TestTimeViews.from_cfg(self.cfg, node.N_VIEWS, node.AUGMIX)
        augmix = use_augmix(node.AUGMIX, self.cfg.DATASET.NAME)
        print(f"{type(self).__name__} views: {node.N_VIEWS} per image (clean view first), "
              f"AugMix {'on' if augmix else 'off'}")
        return self.views

    def build_data_loader(self) -> None:
        """Dassl's data manager with TPT's multi-view test transform, one image per batch."""
        cfg = self.cfg
        if cfg.DATALOADER.TEST.BATCH_SIZE != 1:
            # Each item is already N_VIEWS images; batching images would only multiply memory.
            print(f"TPT adapts one image at a time: test batch size "
                  f"{cfg.DATALOADER.TEST.BATCH_SIZE} -> 1")
            cfg = cfg.clone()
            cfg.defrost()
            cfg.DATALOADER.TEST.BATCH_SIZE = 1
            cfg.freeze()
        super().build_data_loader(cfg)

    # ----------------------------------------------------------------------------- model
    def build_model(self) -> None:
        node = self.node
        clip_model = self.load_clip_model()
        print("Building custom CLIP")
        learner = self.build_prompt_learner(clip_model)
        self.model = PromptedCLIP(learner, clip_model, grad_checkpoint=node.GRAD_CHECKPOINT)
        self.freeze_except(self.model, ("prompt_learner",))
        self.load_init_weights(self.model.prompt_learner)
        self.model.to(self.device)
        # TPT's optimiser: torch's AdamW with its defaults (weight decay 0.01), not Dassl's.
        self.optim = torch.optim.AdamW(self.model.prompt_learner.parameters(), lr=node.LR)
        self.register_model("prompt_learner", self.model.prompt_learner, self.optim, None)
        # Captured once, reloaded before every image (TPT's ``optim_state``): moments reset.
        self.optim_state = copy.deepcopy(self.optim.state_dict())
        self.scaler = self.make_grad_scaler(init_scale=1000)  # TPT's scale; None in fp32
        self.prompt_init = f'CTX_INIT "{node.CTX_INIT}"' if node.CTX_INIT else f"random ({node.N_CTX} tokens)"
        self.capture_initial_prompt()

    def capture_initial_prompt(self) -> None:
        """Remember the current context as the state every image starts from."""
        self.ctx_init_state = self.model.prompt_learner.ctx.detach().clone()

    def reset(self) -> None:
        """Prompt back to its initial state and optimiser moments cleared (before each image)."""
        with torch.no_grad():
            self.model.prompt_learner.ctx.copy_(self.ctx_init_state)
        self.optim.load_state_dict(self.optim_state)

    def load_model(self, directory: str, epoch: int | None = None) -> None:
        """Load a CoOp prompt (TPT+CoOp); its context must have this prompt's token count."""
        if not directory:
            super().load_model(directory, epoch)
            return
        path = self._checkpoint_path(directory, "prompt_learner", epoch)
        ctx = load_checkpoint(path)["state_dict"].get("ctx")
        own = self.model.prompt_learner.ctx
        if ctx is not None and ctx.dim() == own.dim() and ctx.shape[-2] != own.shape[-2]:
            node = self.node
            how = (f'CTX_INIT "{node.CTX_INIT}" has {own.shape[-2]} words' if node.CTX_INIT
                   else f"N_CTX is {own.shape[-2]}")
            raise CheckpointError(
                f"Checkpoint {path} holds a prompt of {ctx.shape[-2]} context tokens (N_CTX "
                f"{ctx.shape[-2]}) but TRAINER.{self.CFG_NODE} builds {own.shape[-2]} ({how}); TPT tunes the "
                f"loaded context as it is, so set TRAINER.{self.CFG_NODE}.N_CTX {ctx.shape[-2]} and "
                f'TRAINER.{self.CFG_NODE}.CTX_INIT "" (or load a CoOp prompt trained with {own.shape[-2]} tokens)'
            )
        super().load_model(directory, epoch)
        self.prompt_init = f"CoOp checkpoint {path}"
        self.capture_initial_prompt()

    # ------------------------------------------------------------------------ evaluation
    def prepare_for_test(self) -> None:
        self.n_timed, self.seconds_total, self.last_seconds = 0, 0.0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        node = self.node
        n_keep = max(1, int(node.N_VIEWS * node.SELECTION_P))
        self.result_extra = {
            "tpt_n_views": node.N_VIEWS,
            "tpt_selected_views": n_keep,
            "tpt_steps": node.STEPS,
            "tpt_lr": node.LR,
            "tpt_augmix": use_augmix(node.AUGMIX, self.cfg.DATASET.NAME),
            "prompt_init": self.prompt_init,
            "precision": self.precision,
        }
        print(f"{type(self).__name__}: {node.STEPS} AdamW step(s) of lr {node.LR} per image on the {n_keep} most "
              f"confident of {node.N_VIEWS} views; prompt from {self.prompt_init}")

    def model_inference(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, H, W) views of B images (clean view first) -> (B, n_cls) logits."""
        if images.dim() == 4:  # plain images without views: adapt on the image alone
            images = images.unsqueeze(1)
        return torch.cat([self.tune_and_predict(views) for views in images])

    def tune_and_predict(self, views: torch.Tensor) -> torch.Tensor:
        """TPT on one image: reset, tune on confident views, predict the clean view (1, n_cls)."""
        start = time.perf_counter()
        try:
            logits = self._tune_and_predict(views)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise self._memory_error(views) from exc
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._record_time(time.perf_counter() - start)
        return logits

    def _tune_and_predict(self, views: torch.Tensor) -> torch.Tensor:
        node = self.node
        self.reset()
        model = self.model
        # The image encoder is frozen: view features are fixed while the prompt is tuned.
        with torch.no_grad(), self.autocast():
            image_features = model.encode_image(views)  # (V, D)
        selected = None
        with torch.enable_grad():  # test() runs under no_grad
            for _ in range(node.STEPS):
                with self.autocast():
                    text_features = model.text_features()  # (n_cls, D)
                    logits = model.logits(image_features, text_features)  # (V, n_cls)
                    if selected is None:  # chosen once, at the first step (as TPT)
                        selected = select_confident(logits.detach(), node.SELECTION_P)
                    loss = self.tuning_loss(logits[selected], text_features)
                self.step(loss, scaler=self.scaler)
        with torch.no_grad(), self.autocast():
            logits = model.logits(image_features[:1], model.text_features())  # (1, n_cls)
        return logits.float()

    def tuning_loss(self, logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The per-image objective on the selected views' logits and the class text features:
        TPT's marginal entropy (subclasses add terms, e.g. C-TPT's text feature dispersion)."""
        return marginal_entropy(logits)

    def _memory_error(self, views: torch.Tensor) -> UserError:
        node = self.node
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return UserError(
            f"TPT ran out of memory on {self.device.type} tuning a prompt for "
            f"{self.model.prompt_learner.n_cls} classes on {views.shape[0]} views: the text "
            f"encoder keeps the activations of every class prompt for the backward pass "
            f"(TPT's authors needed > 16 GB of GPU memory for 1000 classes). Set "
            f"TRAINER.{self.CFG_NODE}.GRAD_CHECKPOINT True (recomputes the text transformer in backward: "
            f"far less memory, somewhat slower), and/or lower TRAINER.{self.CFG_NODE}.N_VIEWS (now "
            f"{node.N_VIEWS}, e.g. 32), or run on a device with more memory"
        )

    def progress_postfix(self) -> dict[str, str]:
        """Shown beside the running accuracy in the evaluation progress bar."""
        return {"s/img": f"{self.last_seconds:.2f}"} if getattr(self, "n_timed", 0) else {}

    def _record_time(self, seconds: float) -> None:
        """Per-image time into ``result_extra`` (the results file's "extra"), kept current."""
        self.n_timed += 1
        self.seconds_total += seconds
        self.last_seconds = seconds
        if self.n_timed == 1:
            self.seconds_first = seconds
        extra = self.result_extra
        # adaptation + prediction of one image, excluding data loading (TPT's "Time" includes it)
        extra["seconds_per_image"] = self.seconds_total / self.n_timed
        extra["adaptation_seconds_total"] = self.seconds_total
        extra["images_per_second"] = self.n_timed / self.seconds_total if self.seconds_total > 0 else None
        if self.n_timed > 1:  # without the first image's warm-up (allocations, cuDNN autotuning)
            extra["seconds_per_image_after_first"] = (self.seconds_total - self.seconds_first) / (self.n_timed - 1)
        if self.device.type == "cuda":
            extra["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
