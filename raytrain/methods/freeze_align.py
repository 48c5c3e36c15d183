"""freeze-align (docs/methods.md#freeze-align): a frozen image encoder (the DINOv3 teacher)
and a frozen text encoder (the text teacher) aligned by training projectors alone, with the CLIP
loss and a learnable temperature (raytrain.models.projectors). There is no student.

Training reads the encoders' outputs from the teacher cache: `dinov3_cls` [d] and
`dinov3_multiscale` [scales, g², d], `text_tokens` [L, d_t] + `text_mask` [L]. The local tokens
are the last scale: the patch tokens of the last of teachers.dinov3.layers (the final block by
default) after the final LayerNorm, i.e. the paper's last-layer patch tokens (CLS and registers
excluded), average-pooled to teachers.dinov3.grid² regions: the cache holds no full-resolution
patches, and it is the scale whose features the paper projects. With grid = the patch side
(image_size / patch: 4 for the tiny teacher at 32 px, the default) the regions are the patches
themselves; with a coarser grid the shared projector sees region means (its LayerNorm and GELU
branch are not linear, so that is an approximation). Evaluation runs both encoders live on the
images and captions (built on first use, never saved) through the same projectors, with the
same outputs: the CLS and that last scale, the first teachers.text.max_tokens tokens.
"""

import torch.nn.functional as F
from pydantic import Field, model_validator

from raytrain.config import Section
from raytrain.dist import gather
from raytrain.methods import register_method
from raytrain.methods.clip import CLIP
from raytrain.models.projectors import FreezeAlignProjectors
from raytrain.teachers.dinov3 import describe
from raytrain.teachers.text import widths


class FreezeAlignConfig(Section):
    """freeze-align's projectors: token projector P(x) = W x + W₂ GELU(W₁ x) after LayerNorm and
    dropout. The paper's joint width is its encoders' (1024); the default is the tiny embedded
    teacher's 64. The temperature is model.init_temperature under model.max_logit_scale."""

    embed_dim: int = Field(64, ge=4, description="joint embedding width")
    hidden: int | None = Field(None, ge=4, description="non-linear branch and text MLP width; None: embed_dim")
    residual: bool = Field(True, description="the non-linear branch; off: linear token projectors (ablation)")
    dropout: float = Field(0.1, ge=0, lt=1, description="before each token projector")
    local_tokens: bool = Field(True, description="the shared projector on the patch tokens (mean-pooled)")
    cls_token: bool = Field(True, description="the separate CLS projector (summed with the local one)")
    text_head: bool = Field(True, description="the 2-layer MLP after the pooled text tokens")

    @model_validator(mode="after")
    def _some_image_projector(self):
        if not (self.local_tokens or self.cls_token):
            raise ValueError("local_tokens and cls_token are both off: the image embedding needs at least one")
        return self


@register_method("freeze_align")
class FreezeAlign(CLIP):  # CLIP's forward: clip_loss(*self.embed(batch))
    has_student = False
    section, settings = "freeze_align", FreezeAlignConfig

    @classmethod
    def needs(cls, cfg) -> dict[str, str]:  # it trains on the encoders' cached outputs only
        return {"dinov3": "freeze_align", "text_tokens": "freeze_align"}

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        self.projectors = FreezeAlignProjectors(
            describe(cfg.teachers.dinov3)[0],
            widths(cfg.teachers.text)[1],
            cfg.freeze_align,
            cfg.model.init_temperature,
            cfg.model.max_logit_scale,
            cfg.seed,
        )

    def embed(self, batch):
        u = self.projectors.encode_image(batch["dinov3_cls"], batch["dinov3_multiscale"][:, -1])
        v = self.projectors.encode_text(batch["text_tokens"], batch["text_mask"])
        return gather(u), gather(v), self.projectors.logit_scale()

    def encode_images(self, pixels):
        out = self.dinov3(pixels.device)(pixels)  # the live encoder: evaluation images are not cached
        return self.projectors.encode_image(out.cls, out.multiscale[:, -1])

    def encode_patches(self, pixels):
        """The frozen DINOv3's patch tokens through the shared local projector P_local
        (normalized) [B, h, w, E]: the paper's patch-level alignment, each patch as the image
        embedding sees it before the mean. Full resolution (the final-norm last-layer patches)
        when the projector's scale is the last block, else that scale's grid² region means, as
        trained. None without local tokens (freeze_align.local_tokens=false)."""
        if self.projectors.image_local is None:
            return None
        t = self.dinov3(pixels.device)
        out = t(pixels)
        last = t.layers[-1] == t.num_layers
        tokens, side = (out.patches, t.side) if last else (out.multiscale[:, -1], t.grid)
        return F.normalize(self.projectors.image_local(tokens), dim=-1).unflatten(1, (side, side))

    def encode_texts(self, tokens, captions):
        feats, mask = self.text_encoder(tokens.device).encode_tokens(list(captions), self.cfg.teachers.text.max_tokens)
        return self.projectors.encode_text(feats.to(tokens.device), mask.to(tokens.device))
