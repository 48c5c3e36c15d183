"""CyCLIP: CLIP + in-modal and cross-modal cyclic-consistency regularizers (METHODS.md §5)."""

from raytrain.losses.baselines import cyclip_loss
from raytrain.methods import register_method
from raytrain.methods.base import Method


@register_method("cyclip")
class CyCLIP(Method):
    def forward(self, batch, epoch: float):
        u, v, scale = self.embed(batch)
        c = self.cfg.baselines
        loss = cyclip_loss(u, v, scale, c.cyclip_in, c.cyclip_cross)
        return loss, {"logit_scale": scale.detach()}
