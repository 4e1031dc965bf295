"""CoOp's learnable text prompt (Zhou et al., IJCV 2022), shared by every prompt trainer.

One context ``ctx`` of M vectors is rendered around each class name in any of CoOp's three
layouts (the three learnable CPT views of Self-TPT use all of them):

- ``end``:    [SOS] ctx_1..ctx_M  CLASS . [EOS]
- ``middle``: [SOS] ctx_1..ctx_{M/2}  CLASS  ctx_{M/2+1}..ctx_M . [EOS]
- ``front``:  [SOS] CLASS  ctx_1..ctx_M . [EOS]

``ClassNamePrompts`` holds what every learnable text prompt shares (tokenizer, token embedding,
class names rendered into buffers); MaPLe's multi-modal prompts build on it too.

State-dict keys are CoOp's (``ctx``, ``token_prefix``, ``token_suffix``), so CoOp's released
prompts load directly; the two buffers depend on the class names and are rebuilt, never
loaded, when the class set changes.
"""
from __future__ import annotations

import torch
from torch import nn

from selftpt.clip_loader import Tokenizer, text_tokenizer, token_count, tokenize
from selftpt.errors import ConfigError

POSITIONS = ("end", "middle", "front")


def clean_classname(name: str) -> str:
    """CoOp writes class names with underscores in some datasets."""
    return name.replace("_", " ")


class ClassNamePrompts(nn.Module):
    """What every learnable text prompt shares: the frozen CLIP's tokenizer and token embedding,
    and the class names rendered as ``"<prompt_prefix> <class>."`` into the buffers around the
    learnable tokens (``token_prefix``: the start token; ``token_suffix``: what follows the
    ``n_ctx`` learnable positions). Subclasses set ``prompt_prefix``, ``n_ctx`` and ``ctx``
    (whose device the buffers follow), then call ``set_classnames``.

    Args:
        clip_model: the frozen CLIP model (OpenAI's or open_clip's, which carries its tokenizer).
        config_node: the config node the prompt's settings come from (e.g. ``TRAINER.COOP``), for messages.
    """

    prompt_prefix: str
    n_ctx: int
    ctx: nn.Parameter

    def __init__(self, clip_model: nn.Module, config_node: str = "") -> None:
        super().__init__()
        self.config_node = config_node
        self.dtype = clip_model.dtype
        self.context_length = int(clip_model.positional_embedding.shape[0])
        self.tokenizer: Tokenizer = text_tokenizer(clip_model)
        # Not registered as a submodule: CLIP's vocabulary stays out of this module's
        # state_dict and off its device; it is only needed to render class names.
        object.__setattr__(self, "_token_embedding", clip_model.token_embedding)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> CLIP token embeddings in the prompt's dtype, on the embedding's device."""
        weight = self._token_embedding.weight
        return self._token_embedding(tokens.to(weight.device)).type(self.dtype)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(n, context_length) token ids of ``texts`` with the model's tokenizer."""
        return tokenize(texts, self.context_length, self.tokenizer)

    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    def set_classnames(self, classnames: list[str]) -> None:
        """Re-render the prompt for another class set (the learnt tokens are kept)."""
        if len(classnames) == 0:
            raise ValueError("The class list is empty; a prompt needs at least one class name")
        names = [clean_classname(n) for n in classnames]
        name_lens = [token_count(n, self.tokenizer) for n in names]  # as CoOp (a "!" inside a name has token id 0)
        self.check_room(names, name_lens)
        self.classnames, self.name_lens = names, name_lens
        tokenized = self.tokenize([f"{self.prompt_prefix} {n}." for n in names])  # (n_cls, L)
        device = self.ctx.device
        with torch.no_grad():
            embedding = self.embed_tokens(tokenized).to(device)  # (n_cls, L, d)
        # Buffers as in CoOp; replaced (not loaded) whenever the class set changes.
        self.register_buffer("token_prefix", embedding[:, :1, :].clone())  # SOS
        # what follows the n_ctx learnable positions: [rest of the prefix] CLS . EOS pad
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx:, :].clone())
        self.register_buffer("tokenized_prompts", tokenized.to(device), persistent=False)  # (n_cls, L)

    def check_room(self, names: list[str], name_lens: list[int]) -> None:
        """Refuse a class set whose prompts do not fit the text encoder, naming the keys to change."""
        raise NotImplementedError


class PromptLearner(ClassNamePrompts):
    """Learnable context vectors rendered around class names.

    Args:
        classnames: target class names (order = label order).
        clip_model: the frozen CLIP model whose token embedding is used.
        n_ctx: number of context vectors M; ignored when ``ctx_init`` is given.
        ctx_init: words to initialise the context from (e.g. "a photo of a"); "" = random.
        csc: class-specific context (one context per class) instead of a shared one.
        class_token_position: default layout for ``forward``.
        config_node: the config node the arguments come from (e.g. ``TRAINER.COOP``), for messages.
    """

    def __init__(self, classnames: list[str], clip_model: nn.Module, n_ctx: int = 16,
                 ctx_init: str = "", csc: bool = False, class_token_position: str = "end",
                 config_node: str = "") -> None:
        super().__init__(clip_model, config_node)
        if class_token_position not in POSITIONS:
            raise ConfigError(f"CLASS_TOKEN_POSITION must be one of {POSITIONS}, got {class_token_position!r}")
        ctx_dim = clip_model.ln_final.weight.shape[0]
        ctx_init = ctx_init.replace("_", " ").strip()
        if ctx_init and csc:
            # CoOp initialises one shared context from the words and never reads CSC then.
            print("Note: CSC is ignored with CTX_INIT (as in CoOp): the context is shared by all classes")
            csc = False
        if ctx_init:
            n_ctx = len(ctx_init.split(" "))
            with torch.no_grad():
                init = self.embed_tokens(self.tokenize([ctx_init]))[0, 1:1 + n_ctx]  # (n_ctx, d)
            self.prompt_prefix = ctx_init
        else:
            shape = (len(classnames), n_ctx, ctx_dim) if csc else (n_ctx, ctx_dim)
            init = torch.empty(shape)
            nn.init.normal_(init, std=0.02)
            self.prompt_prefix = " ".join(["X"] * n_ctx)
        # An fp32 master copy whatever CLIP's dtype (selftpt/precision.py); rendered in
        # CLIP's dtype by ``forward``.
        self.ctx = nn.Parameter(init.float().clone())  # (n_ctx, d) or (n_cls, n_ctx, d)
        self.n_ctx = n_ctx
        self.csc = csc
        self.class_token_position = class_token_position
        self.set_classnames(classnames)

    def set_classnames(self, classnames: list[str]) -> None:
        """Re-render the prompt for another class set (the context is kept)."""
        if self.csc and classnames and self.ctx.shape[0] != len(classnames):
            raise ConfigError(
                f"Class-specific context was learnt for {self.ctx.shape[0]} classes and cannot be "
                f"applied to {len(classnames)} other classes; use CSC False to transfer prompts"
            )
        super().set_classnames(classnames)

    def check_room(self, names: list[str], name_lens: list[int]) -> None:
        longest = max(range(len(names)), key=name_lens.__getitem__)
        need = 1 + self.n_ctx + name_lens[longest] + 2  # SOS, context, name, ".", EOT
        if need > self.context_length:
            key = f"{self.config_node}." if self.config_node else ""
            raise ConfigError(
                f"{key}N_CTX {self.n_ctx} is too long for the text encoder's {self.context_length} tokens: the "
                f"prompt of class {names[longest]!r} needs {need} (start, {self.n_ctx} context tokens, "
                f"{name_lens[longest]} for the name, '.', end); lower {key}N_CTX or shorten {key}CTX_INIT"
            )

    def forward(self, position: str | None = None, ctx: torch.Tensor | None = None,
                indices: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings (n, L, d) in one layout.

        Args:
            position: ``end``, ``middle`` or ``front``; default ``class_token_position``.
            ctx: a context to render instead of ``self.ctx`` (same shape), e.g. a copy being
                adapted at test time while the trained parameter stays untouched.
            indices: render only these classes (default: all, in label order).
        """
        position = position or self.class_token_position
        if position not in POSITIONS:
            raise ConfigError(f"Unknown class token position {position!r}; use one of {POSITIONS}")
        ctx = (self.ctx if ctx is None else ctx).type(self.dtype)
        if indices is None:
            indices = torch.arange(self.n_cls, device=self.token_prefix.device)
        prefix, suffix = self.token_prefix[indices], self.token_suffix[indices]  # (n, 1, d), (n, *, d)
        ctx = ctx[indices] if ctx.dim() == 3 else ctx.unsqueeze(0).expand(len(indices), -1, -1)
        if position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        half = self.n_ctx // 2
        rows = []
        for row, name_len in enumerate(self.name_lens[i] for i in indices.tolist()):
            class_i = suffix[row:row + 1, :name_len]  # (1, name_len, d)
            rest_i = suffix[row:row + 1, name_len:]  # (1, *, d): ". [EOS] pad"
            ctx_i = ctx[row:row + 1]  # (1, n_ctx, d)
            if position == "middle":
                parts = [prefix[row:row + 1], ctx_i[:, :half], class_i, ctx_i[:, half:], rest_i]
            else:
                parts = [prefix[row:row + 1], class_i, ctx_i, rest_i]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)
