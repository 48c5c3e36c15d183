"""freeze-align (papers/002_*.txt, METHODS.md §6): a frozen image encoder (the DINOv3 teacher)
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

import json
from pathlib import Path

import torch.nn.functional as F

from raytrain.methods import register_method
from raytrain.methods.clip import CLIP
from raytrain.models.projectors import FreezeAlignProjectors
from raytrain.teachers.dinov3 import describe
from raytrain.train.dist import gather


def token_width(cfg) -> int:
    """Width of the text teacher's token features (its transformer's hidden size), read from
    the model directory without loading the weights; `cfg` is a TextTeacherConfig."""
    from raytrain.teachers.text import shipped_model_dir

    config = (Path(cfg.path).expanduser() if cfg.path else shipped_model_dir()) / "config.json"
    try:
        return int(json.loads(config.read_text())["hidden_size"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"teachers.text.path: cannot read hidden_size from {config} ({e})") from None


@register_method("freeze_align")
class FreezeAlign(CLIP):  # CLIP's forward: clip_loss(*self.embed(batch))
    has_student = False

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        self.projectors = FreezeAlignProjectors(
            describe(cfg.teachers.dinov3)[0],
            token_width(cfg.teachers.text),
            cfg.freeze_align,
            cfg.model.init_temperature,
            cfg.model.max_logit_scale,
            cfg.seed,
        )
        self.teacher = self.text_teacher = None  # the live encoders, for evaluation only

    def embed(self, batch):
        u = self.projectors.encode_image(batch["dinov3_cls"], batch["dinov3_multiscale"][:, -1])
        v = self.projectors.encode_text(batch["text_tokens"], batch["text_mask"])
        return gather(u), gather(v), self.projectors.logit_scale()

    def encode_images(self, pixels):
        if self.teacher is None:
            self.teacher = self.cfg.teachers.dinov3.build(self.cfg.data.mean, self.cfg.data.std).to(pixels.device)
        out = self.teacher(pixels)
        return self.projectors.encode_image(out.cls, out.multiscale[:, -1])

    def encode_patches(self, pixels):
        """The frozen DINOv3's patch tokens through the shared local projector P_local
        (normalized) [B, h, w, E]: the paper's patch-level alignment, each patch as the image
        embedding sees it before the mean. Full resolution (the final-norm last-layer patches)
        when the projector's scale is the last block, else that scale's grid² region means, as
        trained. None without local tokens (freeze_align.local_tokens=false)."""
        if self.projectors.image_local is None:
            return None
        if self.teacher is None:
            self.teacher = self.cfg.teachers.dinov3.build(self.cfg.data.mean, self.cfg.data.std).to(pixels.device)
        out, t = self.teacher(pixels), self.teacher
        last = t.layers[-1] == t.num_layers
        tokens, side = (out.patches, t.side) if last else (out.multiscale[:, -1], t.grid)
        return F.normalize(self.projectors.image_local(tokens), dim=-1).unflatten(1, (side, side))

    def encode_texts(self, tokens, captions):
        if self.text_teacher is None:
            self.text_teacher = self.cfg.teachers.text.build().to(tokens.device)
        feats, mask = self.text_teacher.encode_tokens(list(captions), self.cfg.teachers.text.max_tokens)
        return self.projectors.encode_text(feats.to(tokens.device), mask.to(tokens.device))
