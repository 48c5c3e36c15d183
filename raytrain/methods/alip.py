"""ALIP: raw and synthetic captions with adaptive sample and pair weights (docs/methods.md#alip).
The synthetic caption is another granularity of the embedded data (`alip.caption`, which must
be in `data.extra_captions`)."""

from pydantic import Field

from raytrain.config import Section
from raytrain.dist import gather
from raytrain.losses.baselines import ALIPWeights, alip_loss
from raytrain.methods import register_method
from raytrain.methods.base import Method


class ALIPConfig(Section):
    """ALIP's synthetic caption and the momentum of its adaptive weights."""

    momentum: float = Field(0.99, ge=0, lt=1, description="EMA momentum of the consistency statistics")
    caption: str = Field("caption_short", description="the synthetic caption's column (in data.extra_captions)")
    gate_pairs_by_sample: bool = Field(False, description="the official code's pair weights forced to 1 by sample")


@register_method("alip")
class ALIP(Method):
    section, settings = "alip", ALIPConfig

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.alip.caption not in cfg.data.extra_captions:
            raise ValueError(f"alip reads its synthetic caption {cfg.alip.caption!r}: add it to data.extra_captions")

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        self.weights = ALIPWeights(momentum=cfg.alip.momentum, gate_pairs_by_sample=cfg.alip.gate_pairs_by_sample)

    def forward(self, batch, epoch: float):
        u, v, scale = self.embed(batch)
        w = gather(self.student.encode_text(batch[f"tokens_{self.cfg.alip.caption}"]))
        loss = alip_loss(u, v, w, scale, self.weights)
        return loss, {"logit_scale": scale.detach(), "alip_m_a": self.weights.m_a.detach().mean()}
