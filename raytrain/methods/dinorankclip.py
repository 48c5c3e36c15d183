"""DINORANKCLIP (docs/methods.md#dinorankclip): the order-R ranking family plus a frozen DINOv3
teacher distilled into and injected into the dual-branch student.

    f = f_s + α ⊙ g ⊙ P(fusion(teacher multi-scale patches, student tokens))    image side
    t = t_s + α ⊙ g ⊙ P(text teacher embedding)                                 text side
    L = L_clip + w(e) · L_rank(R) + λ_d · [cos-distill(tokens → patches) + cos-distill(f_s → CLS)]

α starts at 0, so at initialization the model is exactly RankCLIP at the same order. Every
component is a `dinorankclip.*` switch (the ablations). Teacher outputs come from the teacher cache
(`dinov3_cls`, `dinov3_multiscale`, `text` columns) or, for the image side, the live teacher.
"""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raytrain.config import Section
from raytrain.dist import gather
from raytrain.losses.distill import cosine_distill
from raytrain.methods import register_method
from raytrain.methods.rankclip import RankCLIP
from raytrain.models.encoders import pool_tokens
from raytrain.models.fusion import ImageInjection, TextInjection
from raytrain.models.init import part_init
from raytrain.teachers.dinov3 import describe
from raytrain.teachers.text import widths


class DINORankCLIPConfig(Section):
    """DINORANKCLIP's distillation and injection; each switch is an ablation row. Injection is the
    identity at initialization (a zero-initialized scale)."""

    image_injection: bool = Field(True, description="teacher multi-scale patches → fusion → gated residual")
    text_injection: bool = Field(True, description="text teacher → projector → gated residual (reads the cache)")
    channel_attention: bool = Field(True, description="channel attention over the fused scales")
    spatial_attention: bool = Field(True, description="spatial attention over the fused scales")
    refiner: bool = Field(True, description="the self-attention refiner over fused tokens")
    gate: bool = Field(True, description="the conflict-aware gate; off: a plain zero-initialized residual")
    distill: bool = Field(True, description="student tokens → teacher patches, global → teacher CLS (cosine)")
    distill_weight: float = Field(1.0, ge=0, description="λ_d")
    eval_inject: bool = Field(False, description="evaluate with teacher features injected (else the student alone)")


@register_method("dinorankclip")
class DINORankCLIP(RankCLIP):
    section, settings = "dinorankclip", DINORankCLIPConfig

    @classmethod
    def needs(cls, cfg) -> dict[str, str]:
        needs = super().needs(cfg)
        if cfg.cache.use:  # else the image side runs the live teacher
            needs["dinov3"] = "dinorankclip with cache.use=true"
        if cfg.dinorankclip.text_injection:
            needs["text"] = "dinorankclip.text_injection"
        return needs

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        opts, width, embed = cfg.dinorankclip, cfg.model.image.width, cfg.model.embed_dim
        dim, scales, grid = describe(cfg.teachers.dinov3)
        self.image_injection = self.text_injection = None
        if opts.image_injection:
            with part_init("image_injection", cfg.seed):
                self.image_injection = ImageInjection(
                    dim,
                    width,
                    embed,
                    scales,
                    grid,
                    use_channel=opts.channel_attention,
                    use_spatial=opts.spatial_attention,
                    use_refiner=opts.refiner,
                    use_gate=opts.gate,
                )
        if opts.text_injection:
            with part_init("text_injection", cfg.seed):
                self.text_injection = TextInjection(widths(cfg.teachers.text)[0], embed, use_gate=opts.gate)
        if opts.distill:  # projectors from the student into the teacher's space
            with part_init("distill", cfg.seed):
                self.distill_local, self.distill_global = nn.Linear(width, dim), nn.Linear(embed, dim)
        if not cfg.cache.use:
            self.dinov3()  # the live teacher, built now so the engine moves it with the method
        self.grid = grid

    @classmethod
    def exports_student(cls, cfg) -> bool:
        return not cfg.dinorankclip.eval_inject  # else evaluation injects the teacher too

    def teacher_outputs(self, batch):
        if "dinov3_multiscale" in batch:
            return batch["dinov3_cls"], batch["dinov3_multiscale"]
        out = self.teacher(batch["pixels"])
        return out.cls, out.multiscale

    def inject(self, batch):
        """(image emb, text emb, student tokens, teacher CLS, teacher multi-scale, logs),
        embeddings L2-normalized after injection."""
        f_s, tokens = self.student.image(batch["pixels"])
        t_s, _ = self.student.text(batch["tokens"])
        cls, multiscale = self.teacher_outputs(batch)
        logs = {}
        f, t = f_s, t_s
        if self.image_injection is not None:
            f, gate = self.image_injection(f_s, multiscale, tokens, return_gate=True)
            logs["image_gate"] = gate.mean().detach()
        if self.text_injection is not None and "text" in batch:
            t, gate = self.text_injection(t_s, batch["text"], return_gate=True)
            logs["text_gate"] = gate.mean().detach()
        return F.normalize(f, dim=-1), F.normalize(t, dim=-1), f_s, tokens, cls, multiscale, logs

    def forward(self, batch, epoch: float):
        u, v, f_s, tokens, cls, multiscale, logs = self.inject(batch)
        loss, more = self.objective(gather(u), gather(v), self.student.logit_scale(), batch, epoch)
        logs.update(more)
        if self.cfg.dinorankclip.distill:
            local = pool_tokens(tokens, self.grid)  # [B, g², width]
            distill = cosine_distill(self.distill_local(local), multiscale[:, -1]) + cosine_distill(
                self.distill_global(f_s), cls
            )
            logs["distill"] = distill.detach()
            loss = loss + self.cfg.dinorankclip.distill_weight * distill
        return loss, logs

    def teacher_cls(self, batch):
        return self.teacher_outputs(batch)[0]

    def encode_images(self, pixels):
        return self.embed_images(pixels, self.cfg.dinorankclip.eval_inject)

    def encode_texts(self, tokens, captions):
        return self.embed_texts(tokens, captions, self.cfg.dinorankclip.eval_inject)

    def evaluations(self):
        """Both inference modes (docs/methods.md#dinorankclip-inference-modes): the configured one
        unprefixed, the other as `inject_*` (teacher features injected) or `student_*` (alone)."""
        out = super().evaluations()
        if self.image_injection is not None or self.text_injection is not None:
            other = not self.cfg.dinorankclip.eval_inject
            out["inject_" if other else "student_"] = (
                lambda pixels: self.embed_images(pixels, other),
                lambda tokens, captions: self.embed_texts(tokens, captions, other),
            )
        return out

    def patch_evaluations(self):
        """As `evaluations`: the configured mode unprefixed, the other one prefixed."""
        out = {"": self.encode_patches}
        if self.image_injection is not None or self.text_injection is not None:
            other = not self.cfg.dinorankclip.eval_inject
            out["inject_" if other else "student_"] = lambda pixels: self.embed_patches(pixels, other)
        return out

    def encode_patches(self, pixels):
        return self.embed_patches(pixels, self.cfg.dinorankclip.eval_inject)

    def embed_patches(self, pixels, inject: bool):
        """The student's patch embeddings; None with the image teacher injected: the injection
        adds one global feature (the fused map pooled by the refiner, gated against the
        student's global embedding), so it defines no per-patch embedding to score."""
        if inject and self.image_injection is not None:
            return None
        return super().encode_patches(pixels)

    def embed_images(self, pixels, inject: bool):
        if not inject or self.image_injection is None:
            return super().encode_images(pixels)
        f_s, tokens = self.student.image(pixels)
        out = self.dinov3(pixels.device)(pixels)  # evaluation images are not cached
        return F.normalize(self.image_injection(f_s, out.multiscale, tokens), dim=-1)

    def embed_texts(self, tokens, captions, inject: bool):
        if not inject or self.text_injection is None:
            return super().encode_texts(tokens, captions)
        t_s, _ = self.student.text(tokens)
        with torch.no_grad():
            w = self.text_encoder(tokens.device).encode(list(captions)).to(tokens.device)
        return F.normalize(self.text_injection(t_s, w), dim=-1)
