"""DCLIP's meta-teacher (docs/methods.md#dclip-meta-teacher): image regions and the frozen
text teacher's tokens through cross-modal attention, pooled into one image embedding that lives
in the text teacher's space (width D).

    W                     one projection of DINOv3 CLS features into the text space (width D)
    V = [W g ; s_1 W r_1 ; … ; s_k W r_k]    the whole image g and the k regions r_i (DINOv3 CLS
                          of each crop), region i weighted by its score s_i; invalid regions masked
    T = [t_1 … t_L]       the caption's text-teacher tokens, padding masked
    bidirectional:        T' = T + MHA_t→r(T; V, V),   V' = V + MHA_r→t(V; T, T)
    e = 1/C Σ_c Σ_n softmax_n(cos(q_c, x_n) / τ) x_n   over the valid x ∈ [V'; T']
    output: e / ‖e‖

What the paper fixes: YOLO regions weighted "using a penalty based on YOLO's classification
confidence, bounding box area, and cosine similarity to the paired text description"; "two
separate fine-tuneable multi-head attention layers: one where the text attends to YOLO-derived
image regions, and another where the image regions attend to the corresponding text"; "all of
the embeddings are aggregated together with a temperature scaled attention to create a global
representation" ("Mean (1 cluster)" for ViT-B, 3 clusters for ViT-L); 8 heads for ViT-B.
What is ours (`dclip.meta.*` where it is a choice):
- the score s_i = max(0, region_scores(conf, area, cos(W r_i, text))) (raytrain.teachers.yolo;
  weights `region_weights`): the text similarity is taken in the projected space, the only one
  the region and the caption share; a penalty never flips a region, so it is clamped at 0.
  It scales the region's embedding, the paper's "weighted region embeddings";
- the whole image is always one more visual token, of weight 1: a caption then always has
  something to attend to, also when the detector found nothing;
- each attention layer is residual (no feed-forward: the paper names attention layers only);
- the aggregation pools both attended sets, V' and T': its "all of the embeddings" (it also
  says "over the attended patch embeddings"; pooling V' alone would leave the text→regions
  layer without any effect on the output). C learned queries `clusters`, temperature τ
  `temperature`, the C pools averaged;
- ablations (`cross_attention`): "text_to_regions" keeps the first layer only (V' = V);
  "average" replaces both layers by averages, V'_n = ½(V_n + mean T), T'_l = ½(T_l + mean V),
  the paper's No Bidir row ("a simple average of patch and text embeddings", aggregation kept);
  "none" pools V alone, no text (No CMA). The No YOLO row passes a patch grid as regions,
  unscored (`conf=None`).

The meta-teacher sees the caption it is paired with, so its InfoNCE is easier than the
student's: it is a distillation target, not a retrieval model (the paper: "using this teacher
directly would require paired image-text inputs at inference time").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.models.init import part_init
from raytrain.models.scale import log_scale_parameter, logit_scale


def temperature_pool(x: Tensor, valid: Tensor, queries: Tensor, temperature: float) -> Tensor:
    """e = 1/C Σ_c Σ_n a_cn x_n with a_cn = softmax over the valid n of cos(q_c, x_n) / τ.

    x [B, N, D], valid [B, N] bool (at least one per row), queries [C, D] → [B, D]."""
    logits = torch.einsum("cd,bnd->bcn", F.normalize(queries, dim=-1), F.normalize(x, dim=-1)) / temperature
    weights = logits.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
    return (weights @ x).mean(1)


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of x [B, N, D] over the valid [B, N] entries of each row → [B, D]."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


class MetaTeacher(nn.Module):
    """`cfg` is a MetaTeacherConfig; image_dim = the DINOv3 width, text_dim = the text teacher's.
    Also holds the learnable temperature of its InfoNCE (exp(t) = 1/τ, clamped), as the paper's
    teacher loss has one."""

    def __init__(
        self, cfg, image_dim: int, text_dim: int, init_temperature: float = 0.07, max_logit_scale: float = 100.0
    ):
        super().__init__()
        if text_dim % cfg.heads:
            raise ValueError(f"dclip.meta.heads {cfg.heads} does not divide the text teacher's width {text_dim}")
        self.mode, self.temperature, self.region_weights = (
            cfg.cross_attention,
            cfg.temperature,
            tuple(cfg.region_weights),
        )
        # each part from its own init stream (raytrain.models.init), nested in the caller's
        with part_init("project"):
            self.project = nn.Linear(image_dim, text_dim)
        self.text_to_regions = self.regions_to_text = None
        if self.mode in ("bidirectional", "text_to_regions"):
            with part_init("text_to_regions"):
                self.text_to_regions = nn.MultiheadAttention(text_dim, cfg.heads, batch_first=True)
        if self.mode == "bidirectional":
            with part_init("regions_to_text"):
                self.regions_to_text = nn.MultiheadAttention(text_dim, cfg.heads, batch_first=True)
        with part_init("queries"):
            self.queries = nn.Parameter(torch.randn(cfg.clusters, text_dim))
        self.log_scale = log_scale_parameter(init_temperature)
        self.max_logit_scale = max_logit_scale

    def logit_scale(self) -> Tensor:
        return logit_scale(self.log_scale, self.max_logit_scale)

    def scores(self, regions: Tensor, text: Tensor, conf: Tensor, area: Tensor, valid: Tensor) -> Tensor:
        """s_i = max(0, region_scores(conf, area, cos(regions_i, text))) [B, k]; 0 where invalid.
        regions [B, k, D] already projected, text [B, D]."""
        from raytrain.teachers.yolo import region_scores  # yolo.py imports ultralytics: only when scoring

        sim = F.cosine_similarity(regions, text.unsqueeze(1), dim=-1)
        return region_scores(conf, area, sim, self.region_weights, valid).clamp_min(0)

    def forward(
        self,
        image: Tensor,
        regions: Tensor,
        valid: Tensor,
        tokens: Tensor,
        token_mask: Tensor,
        text: Tensor,
        conf: Tensor | None = None,
        area: Tensor | None = None,
    ) -> Tensor:
        """image [B, d] the whole image's feature; regions [B, k, d] and valid [B, k]; tokens
        [B, L, D] and token_mask [B, L] (1 = a real token, at least one per row); text [B, D]
        the caption's embedding; conf, area [B, k] the detector's (None: regions unscored,
        weight 1). → L2-normalized [B, D]."""
        valid, token_mask = valid.bool(), token_mask.bool()
        r = self.project(regions)
        if conf is not None:
            r = r * self.scores(r, text, conf, area, valid).unsqueeze(-1)
        v = torch.cat([self.project(image).unsqueeze(1), r], 1)
        v_ok = torch.cat([valid.new_ones(valid.shape[0], 1), valid], 1)
        x, ok = self.attend(v, v_ok, tokens, token_mask)
        return F.normalize(temperature_pool(x, ok, self.queries, self.temperature), dim=-1)

    def attend(self, v: Tensor, v_ok: Tensor, t: Tensor, t_ok: Tensor) -> tuple[Tensor, Tensor]:
        """The tokens to pool and their validity, per `cross_attention`."""
        if self.mode == "none":
            return v, v_ok
        if self.mode == "average":
            v2, t2 = (v + masked_mean(t, t_ok).unsqueeze(1)) / 2, (t + masked_mean(v, v_ok).unsqueeze(1)) / 2
        else:
            t2 = t + self.text_to_regions(t, v, v, key_padding_mask=~v_ok, need_weights=False)[0]
            v2 = v
            if self.regions_to_text is not None:
                v2 = v + self.regions_to_text(v, t, t, key_padding_mask=~t_ok, need_weights=False)[0]
        return torch.cat([v2, t2], 1), torch.cat([v_ok, t_ok], 1)
