"""CLIP: symmetric InfoNCE on the global batch (docs/methods.md#clip)."""

from raytrain.losses.contrastive import clip_loss
from raytrain.methods import register_method
from raytrain.methods.base import Method


@register_method("clip")
class CLIP(Method):
    def forward(self, batch, epoch: float):
        u, v, scale = self.embed(batch)
        loss = clip_loss(u, v, scale)
        return loss, {"clip": loss.detach(), "logit_scale": scale.detach()}
