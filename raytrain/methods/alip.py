"""ALIP: raw and synthetic captions with adaptive sample and pair weights (METHODS.md §5).
The synthetic caption is another granularity of the embedded data (`baselines.alip_caption`,
which must be in `data.extra_captions`)."""

from raytrain.losses.baselines import ALIPWeights, alip_loss
from raytrain.methods import register_method
from raytrain.methods.base import Method
from raytrain.train.dist import gather


@register_method("alip")
class ALIP(Method):
    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        self.weights = ALIPWeights(momentum=cfg.baselines.alip_momentum)

    def forward(self, batch, epoch: float):
        u, v, scale = self.embed(batch)
        w = gather(self.student.encode_text(batch[f"tokens_{self.cfg.baselines.alip_caption}"]))
        loss = alip_loss(u, v, w, scale, self.weights)
        return loss, {"logit_scale": scale.detach(), "alip_m_a": self.weights.m_a.detach().mean()}
