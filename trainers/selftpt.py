"""Self-TPT: efficient test-time prompt tuning (Zhu et al., arXiv 2408.05775).

Stage 1 (``forward_backward``): co-train a CoOp prompt on labelled source images with
cross-entropy, the contrastive prompt task on class names (CPT) and gradient matching (GM).
Stage 2 (``prepare_for_test``): adapt a copy of the prompt on the *target class names* with
CPT only, once per class set, before any test image is read.
Stage 3 (``model_inference``): one CLIP image pass per image against text features computed
once; Self-TPT-v (``N_VIEWS`` 64) ensembles the predictions of TPT's views instead.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from selftpt.cpt import ADAPTATION_OPTIMIZERS, ContrastivePromptTask, class_chunks, sample_classes
from selftpt.errors import UserError
from selftpt.losses import GradientEMA, ensemble_views, gradient_matching_loss
from selftpt.precision import GradientScale
from selftpt.prompt_learner import POSITIONS
from selftpt.prompted_clip import PromptedCLIP
from selftpt.templates import template_for
from selftpt.text_encoder import encode_in_chunks
from selftpt.toolbox import (
    TRAINER_REGISTRY,
    build_lr_scheduler,
    build_optimizer,
    compute_accuracy,
)
from selftpt.trainer_base import PromptedClipTrainer
from selftpt.views import TestTimeViews


def differentiable_attention(needed: bool) -> contextlib.AbstractContextManager:
    """The math attention kernel where a gradient must itself be differentiated (GM): the
    fused kernels implement no double backward. Elsewhere the default (faster) kernels."""
    return sdpa_kernel(SDPBackend.MATH) if needed else contextlib.nullcontext()



@TRAINER_REGISTRY.register()
class SelfTPT(PromptedClipTrainer):
    """CoOp prompt + CPT + GM in training; class-name adaptation and single-pass inference."""

    CFG_NODE = "SELFTPT"
    TABLE_ORDER = 60
    REFERENCE_CONFIGS = {"SelfTPT": ("vit_b16_c4_ep10", ()),  # N_VIEWS 1: one image pass
                         "SelfTPT-v": ("vit_b16_c4_ep10_v", ())}  # N_VIEWS 64, METHOD_NAME SelfTPT-v

    # ------------------------------------------------------------------------------ build
    def custom_test_transform(self) -> TestTimeViews | None:
        node = self.cfg.TRAINER.SELFTPT
        return TestTimeViews.from_cfg(self.cfg, node.N_VIEWS, node.AUGMIX) if node.N_VIEWS > 1 else None

    def build_model(self) -> None:
        cfg, node = self.cfg, self.node
        clip_model = self.load_clip_model()
        print("Building Self-TPT (CoOp prompt + CPT head)")
        learner = self.build_prompt_learner(clip_model)
        self.model = PromptedCLIP(learner, clip_model, grad_checkpoint=node.GRAD_CHECKPOINT)
        template = node.HANDCRAFTED_TEMPLATE or template_for(cfg.DATASET.NAME)
        self.cpt = ContrastivePromptTask(self.model, list(node.CPT_VIEWS), node.HEAD, node.TEMPERATURE, template)
        self.setup_prompt_training(self.model)
        self.cpt.to(self.device)
        # Two registered models so that prompt_learner/ checkpoints stay CoOp's format.
        if any(p.requires_grad for p in self.cpt.head.parameters()):
            self.head_optim = build_optimizer(self.cpt.head, cfg.OPTIM)
            self.head_sched = build_lr_scheduler(self.head_optim, cfg.OPTIM)
            self.register_model("cpt_head", self.cpt.head, self.head_optim, self.head_sched)
        self.grad_ema = GradientEMA(node.GM_EMA)
        self.grad_scale = GradientScale(self.precision in ("fp16", "amp"))
        self.cpt_generator = torch.Generator().manual_seed(max(cfg.SEED, 0))
        self.epoch_grad_cos: list[float] = []
        self.result_extra["grad_cos_per_epoch"] = []

    # --------------------------------------------------------------------------- stage 1
    def class_text_features(self, ctx: torch.Tensor | None = None,
                            indices: torch.Tensor | None = None) -> torch.Tensor:
        """(n, D) normalised classification text features (one layout, or the mean of three)."""
        if self.node.CLS_VIEW == "single":
            return self.model.text_features(self.node.CLASS_TOKEN_POSITION, ctx=ctx, indices=indices)
        feats = torch.stack([self.model.text_features(p, ctx=ctx, indices=indices) for p in POSITIONS])
        return F.normalize(feats.mean(dim=0), dim=-1)

    def forward_backward(self, batch: dict) -> dict[str, float]:
        node = self.node
        images, labels = self.parse_batch_train(batch)
        ctx = self.model.prompt_learner.ctx
        with self.autocast():
            with torch.no_grad():  # the image encoder is frozen
                image_features = self.model.encode_image(images)
            logits = self.model.logits(image_features, self.class_text_features())
            loss_ce = F.cross_entropy(logits.float(), labels)
            loss = loss_ce
            summary = {"loss_ce": loss_ce.item(), "acc": compute_accuracy(logits, labels)[0].item()}
            if node.USE_CPT:
                indices = sample_classes(labels, self.num_classes, node.CPT_MAX_CLASSES, self.cpt_generator)
                with differentiable_attention(node.USE_GM):
                    loss_cpt = self.cpt.loss(self.model, indices)
                loss = loss + node.LAMBDA_CPT * loss_cpt
                summary["loss_cpt"] = loss_cpt.item()
                measure = node.USE_GM or (node.GRAD_COS_FREQ > 0 and self.batch_idx % node.GRAD_COS_FREQ == 0)
                if measure:
                    loss = loss + self.gradient_alignment(loss_ce, loss_cpt, ctx, summary)
        self.step(loss, scaler=self.scaler)
        summary["loss"] = loss.item()
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    def gradient_alignment(self, loss_ce: torch.Tensor, loss_cpt: torch.Tensor, ctx: torch.Tensor,
                           summary: dict[str, float]) -> torch.Tensor:
        """Record cos(grad L_cpt, grad L_ce) and return ``LAMBDA_GM * L_gm`` (0 without GM).

        Both gradients are taken with loss scaling in fp16/amp (``GradientScale``), so they
        neither flush to zero nor overflow; the CPT gradient keeps its graph (double backward)
        when GM trains on it.
        """
        node = self.node
        grad_ce = self.grad_scale.grad(loss_ce, [ctx], retain_graph=True)[0]
        with differentiable_attention(node.USE_GM):
            grad_cpt = self.grad_scale.grad(loss_cpt, [ctx], retain_graph=True, create_graph=node.USE_GM)[0]
        cos = F.cosine_similarity(grad_cpt.detach().flatten().float(), grad_ce.flatten().float(), dim=0)
        self.epoch_grad_cos.append(cos.item())
        summary["grad_cos"] = cos.item()
        if not node.USE_GM:
            return torch.zeros((), device=ctx.device)
        loss_gm = gradient_matching_loss(grad_cpt, self.grad_ema.update(grad_ce))
        summary["loss_gm"] = loss_gm.item()
        return node.LAMBDA_GM * loss_gm

    def after_epoch(self) -> None:
        if self.epoch_grad_cos:
            mean_cos = sum(self.epoch_grad_cos) / len(self.epoch_grad_cos)
            print(f"epoch [{self.epoch + 1}/{self.max_epoch}] cos(grad L_cpt, grad L_ce) = {mean_cos:.4f}")
            self.result_extra["grad_cos_per_epoch"].append(round(mean_cos, 6))
            self.write_scalar("train/grad_cos", mean_cos, self.epoch)
            self.epoch_grad_cos = []
        super().after_epoch()

    def training_state(self) -> dict:
        """Stage-1 state outside the registered models, so that a resumed run is the same run:
        the EMA of the CE gradient that GM matches, the CPT class sampler's generator, the
        gradient loss scale, and the gradient cosines of the current epoch (those of finished
        epochs are in ``result_extra``, saved by the base class)."""
        state = super().training_state()
        ema = self.grad_ema.value
        state["selftpt"] = {
            "grad_ema": None if ema is None else ema.detach().cpu(),
            "cpt_generator": self.cpt_generator.get_state(),
            "grad_scale": {"scale": self.grad_scale.scale, "backoffs": self.grad_scale.backoffs},
            "epoch_grad_cos": list(self.epoch_grad_cos),
        }
        return state

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        own = state.get("selftpt")
        if own is None:
            return
        ema = own["grad_ema"]
        self.grad_ema.value = None if ema is None else ema.to(self.device)
        self.cpt_generator.set_state(own["cpt_generator"].cpu())
        self.grad_scale.scale = own["grad_scale"]["scale"]
        self.grad_scale.backoffs = own["grad_scale"]["backoffs"]
        self.epoch_grad_cos = list(own["epoch_grad_cos"])

    # ------------------------------------------------------------------------ stage 2, 3
    def cpt_pass(self, chunks: list[torch.Tensor], ctx: torch.Tensor,
                 with_grad: bool = True) -> tuple[float, torch.Tensor | None]:
        """The CPT loss of the whole class set and its gradient w.r.t. ``ctx``, one chunk at a time.

        The loss of the set is the class-weighted mean of the chunks' losses, so the gradient
        is accumulated over the chunks (memory bounded by ``CPT_MAX_CLASSES``) and every class
        contributes, however many there are.
        """
        n_cls = sum(len(c) for c in chunks)
        total, grad = 0.0, (torch.zeros_like(ctx) if with_grad else None)
        for chunk in chunks:
            weight = len(chunk) / n_cls
            with torch.set_grad_enabled(with_grad), self.autocast():
                loss = self.cpt.loss(self.model, chunk, ctx=ctx) * weight
            if with_grad:
                # Only the context moves; autograd.grad leaves the frozen head's .grad alone.
                grad += self.grad_scale.grad(loss, [ctx])[0]
            total += loss.item()
        return total, grad

    def adapt_to_class_names(self, ctx0: torch.Tensor) -> torch.Tensor:
        """Stage 2: a copy of the prompt tuned with CPT on the current class names only.

        One step is one pass over every class: the classes are shuffled into chunks of at
        most ``CPT_MAX_CLASSES`` (a new partition each step, so each class meets other
        negatives), the gradient is accumulated over the chunks, then the optimiser steps once.
        """
        node = self.node
        n_cls = self.model.prompt_learner.n_cls
        if n_cls < 2:
            raise UserError(
                f"Self-TPT's test-time adaptation contrasts class names and needs at least two; the "
                f"target set has {n_cls}. Set TRAINER.SELFTPT.TTA False to evaluate without it"
            )
        generator = torch.Generator().manual_seed(max(self.cfg.SEED, 0))
        ctx = ctx0.detach().float().clone().requires_grad_(True)  # fp32 master copy
        optim = ADAPTATION_OPTIMIZERS[node.TTA_OPTIM]([ctx], lr=node.TTA_LR)
        self.cpt.eval()
        first_chunks = class_chunks(n_cls, node.CPT_MAX_CLASSES, generator)
        covered: set[int] = set()
        loss_before = None
        start = time.perf_counter()
        for step in tqdm(range(node.TTA_STEPS), desc="adapt on class names", dynamic_ncols=True):
            chunks = first_chunks if step == 0 else class_chunks(n_cls, node.CPT_MAX_CLASSES, generator)
            loss, ctx.grad = self.cpt_pass(chunks, ctx)
            loss_before = loss if loss_before is None else loss_before
            covered.update(torch.cat(chunks).tolist())
            optim.step()
        seconds = time.perf_counter() - start
        if loss_before is None:  # TTA_STEPS 0
            loss_before = self.cpt_pass(first_chunks, ctx, with_grad=False)[0]
        loss_after = self.cpt_pass(first_chunks, ctx, with_grad=False)[0]
        print(f"Test-time adaptation on {n_cls} class names: CPT loss {loss_before:.4f} -> "
              f"{loss_after:.4f} in {seconds:.2f}s ({node.TTA_STEPS} passes over all classes, "
              f"{len(first_chunks)} chunk(s) of <= {max(2, node.CPT_MAX_CLASSES)})")
        self.result_extra["tta"] = {
            "n_classes": n_cls, "steps": node.TTA_STEPS, "passes": node.TTA_STEPS,
            "chunks_per_pass": len(first_chunks), "classes_covered": len(covered), "seconds": seconds,
            "cpt_loss_before": loss_before, "cpt_loss_after": loss_after,
            "loss_scale_backoffs": self.grad_scale.backoffs,
        }
        return ctx.detach()

    def prepare_for_test(self) -> None:
        """Adapt (unless TTA is off) and cache the class text features for inference."""
        self.cpt.refresh_class_set(self.model)
        ctx = self.model.prompt_learner.ctx.detach()
        if self.node.TTA:
            ctx = self.adapt_to_class_names(ctx)
        start = time.perf_counter()
        with torch.no_grad(), self.autocast():
            classes = torch.arange(self.model.prompt_learner.n_cls, device=ctx.device)
            self.eval_text_features = encode_in_chunks(lambda c: self.class_text_features(ctx, c), classes)
        self.result_extra["text_features_seconds"] = time.perf_counter() - start

    def image_encoder_for_cache(self) -> torch.nn.Module | None:
        """Self-TPT's image side is one fixed encoder pass; Self-TPT-v's random views are not."""
        return super().image_encoder_for_cache() if self.node.N_VIEWS <= 1 else None

    def model_inference(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4:  # Self-TPT: one pass per image
            return super().model_inference(images)
        with self.autocast():
            batch, n_views = images.shape[:2]  # Self-TPT-v: (B, V, 3, H, W)
            feats = self.model.encode_image(images.flatten(0, 1))
            logits = self.model.logits(feats, self.eval_text_features).view(batch, n_views, -1)
        return ensemble_views(logits, self.node.VIEW_AGGREGATION, self.node.SELECTION_P)
