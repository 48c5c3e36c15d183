"""CyCLIP: CLIP + in-modal and cross-modal cyclic-consistency regularizers (docs/methods.md#cyclip)."""

from pydantic import Field

from raytrain.config import Section
from raytrain.losses.baselines import cyclip_loss
from raytrain.methods import register_method
from raytrain.methods.base import Method


class CyCLIPConfig(Section):
    """CyCLIP's regularizer weights (its paper's λ₁ = λ₂ = 0.25)."""

    in_modal: float = Field(0.25, ge=0, description="λ₁: image-image vs text-text similarity consistency")
    cross_modal: float = Field(0.25, ge=0, description="λ₂: image→text vs text→image similarity consistency")


@register_method("cyclip")
class CyCLIP(Method):
    section, settings = "cyclip", CyCLIPConfig

    def forward(self, batch, epoch: float):
        u, v, scale = self.embed(batch)
        c = self.cfg.cyclip
        loss = cyclip_loss(u, v, scale, c.in_modal, c.cross_modal)
        return loss, {"logit_scale": scale.detach()}
