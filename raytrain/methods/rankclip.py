"""The order-R ranking family on a plain student (docs/methods.md#rankclip-and-the-order-r-family):
CLIP + the ranking-consistency loss of order R. `loss.order` 0 = CLIP, 1 = RankCLIP, ≥ 2 = high-order PL."""

import torch
import torch.nn.functional as F

from raytrain.dist import gather
from raytrain.losses.contrastive import clip_loss
from raytrain.losses.ranking import Transition, ranking_consistency_loss
from raytrain.methods import register_method
from raytrain.methods.base import Method
from raytrain.models.init import part_init


def ramp(epoch: float, epochs: int) -> float:
    """RankCLIP's ranking weight w(e) = clamp(3(e−1)/(E−1), 0, 2), e counted from 1."""
    return min(max(3 * (epoch - 1) / max(epochs - 1, 1), 0.0), 2.0)


@register_method("rankclip")
class RankCLIP(Method):
    @classmethod
    def needs(cls, cfg) -> dict[str, str]:
        by_teacher = cfg.loss.target == "teacher" and cfg.loss.order >= 1
        return {"dinov3": "loss.target=teacher"} if by_teacher and cfg.cache.use else {}  # else the live teacher

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        loss = cfg.loss
        if loss.order >= 2:  # one transition per ranked modality
            args = (
                cfg.model.embed_dim,
                loss.transition_dim,
                loss.order,
                loss.detach_transition_emb,
                loss.pairwise,
                loss.tuplewise,
            )
            with part_init("image_transition", cfg.seed):
                self.image_transition = Transition(*args)
            with part_init("text_transition", cfg.seed):
                self.text_transition = Transition(*args)
        else:
            self.image_transition = self.text_transition = None
        if loss.target == "teacher" and loss.order >= 1 and not cfg.cache.use:
            self.dinov3()  # targets from the live teacher: built now, so the engine moves it with the method

    def lr_scales(self) -> dict[str, float]:
        scale = self.cfg.loss.transition_lr_scale
        return {"image_transition.": scale, "text_transition.": scale} if self.image_transition is not None else {}

    def forward(self, batch, epoch: float):
        u, v, scale = self.embed(batch)
        return self.objective(u, v, scale, batch, epoch)

    def objective(self, u, v, scale, batch, epoch: float):
        """L_clip + w(e) · L_rank(R) on global-batch embeddings; (loss, logs)."""
        contrastive = clip_loss(u, v, scale)
        logs = {"clip": contrastive.detach(), "logit_scale": scale.detach()}
        cfg = self.cfg.loss
        if cfg.order == 0:
            return contrastive, logs
        reference = None
        if cfg.target == "teacher":
            c = F.normalize(gather(self.teacher_cls(batch)), dim=-1)
            reference = c @ c.T
        rank = ranking_consistency_loss(
            u, v, scale, cfg.order, cfg.depth, cfg.in_modal, reference, self.image_transition, self.text_transition
        )
        weight = cfg.weight * (ramp(epoch, self.cfg.train.epochs) if cfg.ramp else 1.0)
        logs.update(rank=rank.detach(), rank_weight=torch.tensor(weight))
        for side, trans in (("image", self.image_transition), ("text", self.text_transition)):
            if trans is not None:  # λ_r per ranked modality: are the transition terms used?
                logs.update({f"{side}_lam{r}": lam.detach() for r, lam in enumerate(trans.lam, start=2)})
        return contrastive + weight * rank, logs

    def teacher_cls(self, batch):
        """The DINOv3 CLS of the batch: cached, or computed by the live teacher."""
        return batch["dinov3_cls"] if "dinov3_cls" in batch else self.teacher(batch["pixels"]).cls
