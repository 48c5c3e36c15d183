"""freeze-align's projectors (docs/methods.md#freeze-align): the only trained parts, between
a frozen image encoder's tokens and a frozen text encoder's tokens.

    token projector  P(x) = W x + W₂ GELU(W₁ x), x = Dropout(LayerNorm(token))
    image            u = normalize(P_cls(CLS) + mean_i P_local(patch_i))     P_local shared by all patches
    text             v = normalize(MLP(Σ_j m_j P_text(token_j) / Σ_j m_j))   m = the tokens' mask
    MLP              Linear → GELU → Linear (the paper's "2-layer MLP" global text projector)

with a learnable temperature: logit scale exp(t) = 1/τ, τ initialized at 0.07, clamped to at
most max_logit_scale. Each part draws its initial weights from its own stream
(raytrain.models.init), so switching one off (the paper's Table 1 rows) keeps the others'.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.models.init import part_init
from raytrain.models.scale import log_scale_parameter, logit_scale


class TokenProjector(nn.Module):
    """P(x) = W x + W₂ GELU(W₁ x) on LayerNorm + dropout of x (PACL's patch projector, the
    paper's [37]); `residual=False` keeps the linear branch alone. Any leading shape."""

    def __init__(self, dim: int, out: int, hidden: int, residual: bool = True, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, out)
        self.branch = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out)) if residual else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.norm(x))
        y = self.linear(x)
        return y if self.branch is None else y + self.branch(x)


class FreezeAlignProjectors(nn.Module):
    """Image side: shared local-token projector + CLS projector; text side: token projector,
    masked mean, MLP head; and the logit scale. `cfg` is a FreezeAlignConfig."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        cfg,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        seed: int = 0,
    ):
        super().__init__()
        embed, hidden = cfg.embed_dim, cfg.hidden or cfg.embed_dim

        def part(name, dim):
            with part_init(f"freeze_align.{name}", seed):
                return TokenProjector(dim, embed, hidden, cfg.residual, cfg.dropout)

        self.image_local = part("image_local", image_dim) if cfg.local_tokens else None
        self.image_cls = part("image_cls", image_dim) if cfg.cls_token else None
        self.text_tokens = part("text_tokens", text_dim)
        self.text_head = None
        if cfg.text_head:
            with part_init("freeze_align.text_head", seed):
                self.text_head = nn.Sequential(nn.Linear(embed, hidden), nn.GELU(), nn.Linear(hidden, embed))
        self.log_scale = log_scale_parameter(init_temperature)
        self.max_logit_scale = max_logit_scale

    def logit_scale(self) -> Tensor:
        """exp(t) = 1/τ, clamped to at most max_logit_scale."""
        return logit_scale(self.log_scale, self.max_logit_scale)

    def encode_image(self, cls: Tensor, tokens: Tensor) -> Tensor:
        """CLS [B, d_i] and local tokens [B, N, d_i] → L2-normalized [B, E]."""
        parts = []
        if self.image_cls is not None:
            parts.append(self.image_cls(cls))
        if self.image_local is not None:
            parts.append(self.image_local(tokens).mean(1))
        return F.normalize(sum(parts), dim=-1)

    def encode_text(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Token features [B, L, d_t] and mask [B, L] (1 = a real token) → L2-normalized [B, E]."""
        m = mask.to(tokens.dtype).unsqueeze(-1)
        pooled = (self.text_tokens(tokens) * m).sum(1) / m.sum(1).clamp_min(1)
        return F.normalize(pooled if self.text_head is None else self.text_head(pooled), dim=-1)
