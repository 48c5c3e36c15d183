"""The order-R ranking family on a plain student (docs/methods.md#rankclip-and-the-order-r-family):
CLIP + the ranking-consistency loss of order R. `loss.order` 0 = CLIP, 1 = RankCLIP, ≥ 2 = high-order PL."""

import zlib

import torch
import torch.nn.functional as F

from raytrain.dist import gather
from raytrain.losses.contrastive import clip_loss
from raytrain.losses.ranking import Transition, plackett_luce_loss, rank_targets, ranking_consistency_loss
from raytrain.losses.targets import (
    generator,
    planted_rankings,
    planted_transition,
    ranking_nll,
    ranks_as_scores,
    transition_shares,
)
from raytrain.methods import register_method
from raytrain.methods.base import Method
from raytrain.models.init import part_init

# the held-out ranking measures (`ranking_evaluation`): the same depth and, for the planted
# process, the same drawn rankings in every trial, whatever its loss.depth and seed
EVAL_DEPTH, EVAL_SEED = 16, 0
PLANTED = zlib.crc32(b"planted")  # the planted process's noise stream


def ramp(epoch: float, epochs: int) -> float:
    """RankCLIP's ranking weight w(e) = clamp(3(e−1)/(E−1), 0, 2), e counted from 1."""
    return min(max(3 * (epoch - 1) / max(epochs - 1, 1), 0.0), 2.0)


@register_method("rankclip")
class RankCLIP(Method):
    @classmethod
    def needs(cls, cfg) -> dict[str, str]:
        target, why = cfg.loss.target, f"loss.target={cfg.loss.target}"
        if cfg.loss.order < 1:
            return {}
        if target == "text_teacher":  # training batches hold tokens, not the text a live teacher reads
            return {"text": why}
        return {"dinov3": why} if target in ("teacher", "planted") and cfg.cache.use else {}  # else the live teacher

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
        if loss.target in ("teacher", "planted") and loss.order >= 1 and not cfg.cache.use:
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
        rank = ranking_consistency_loss(
            u,
            v,
            scale,
            cfg.order,
            cfg.depth,
            cfg.in_modal,
            self.reference(batch, epoch),
            self.image_transition,
            self.text_transition,
        )
        weight = cfg.weight * (ramp(epoch, self.cfg.train.epochs) if cfg.ramp else 1.0)
        logs.update(rank=rank.detach(), rank_weight=torch.tensor(weight))
        for side, trans in (("image", self.image_transition), ("text", self.text_transition)):
            if trans is not None:  # λ_r per ranked modality: are the transition terms used?
                logs.update({f"{side}_lam{r}": lam.detach() for r, lam in enumerate(trans.lam, start=2)})
        return contrastive + weight * rank, logs

    def reference(self, batch, epoch: float):
        """The target process's reference scores `[B, B]` over the global batch, whose
        `rank_targets` are every list's target (docs/methods.md#ranking-targets); None for
        RankCLIP's own targets. The planted process draws its noise from (seed, the step's
        fractional epoch): the same targets on every rank and after a resume."""
        cfg = self.cfg.loss
        if cfg.target == "rankclip":
            return None
        if cfg.target == "text_teacher":
            t = F.normalize(gather(batch["text"]), dim=-1)
            return t @ t.T
        if cfg.target == "planted":
            gen = generator(self.cfg.seed, PLANTED, round(epoch * 2**32))
            cls = gather(self.teacher_cls(batch))
            return ranks_as_scores(planted_rankings(cls, cfg.planted_gamma, cfg.planted_beta, gen, cfg.depth))
        c = F.normalize(gather(self.teacher_cls(batch)), dim=-1)
        return c @ c.T

    def teacher_cls(self, batch):
        """The DINOv3 CLS of the batch: cached, or computed by the live teacher."""
        return batch["dinov3_cls"] if "dinov3_cls" in batch else self.teacher(batch["pixels"]).cls

    @torch.no_grad()
    def ranking_evaluation(self, pixels, tokens, captions) -> dict[str, float]:
        """On held-out pairs (docs/evaluation.md#ranking-nll-and-the-transitions-share): `rank_nll`,
        the loss's lists' mean NLL per ranked position at depth EVAL_DEPTH under the trained
        order-R model, with targets from the configured process on these pairs (fixed for a
        fixed process: the teachers are frozen, the planted draw uses EVAL_SEED); per order r ≥ 2,
        `t<r>_share` = std(λ_r·T_r) / std(s) on the two cross-modal lists (mean) and `lam<r>_abs`
        = |λ_r| (mean over the two modalities); for the planted process, `planted_nll`: the
        process's own NLL of its rankings (the floor of rank_nll)."""
        cfg = self.cfg.loss
        u, v = self.encode_images(pixels), self.encode_texts(tokens, captions)
        scale = self.student.logit_scale()
        reference, out = None, {}
        if cfg.target == "text_teacher":
            t = self.text_encoder(pixels.device).encode(list(captions)).to(pixels.device)
            reference = t @ t.T
        elif cfg.target in ("teacher", "planted"):
            cls = self.dinov3(pixels.device)(pixels).cls
            c = F.normalize(cls, dim=-1)
            reference = c @ c.T
            if cfg.target == "planted":
                gamma, beta = cfg.planted_gamma, cfg.planted_beta
                rankings = planted_rankings(cls, gamma, beta, generator(EVAL_SEED, PLANTED), EVAL_DEPTH)
                floor = plackett_luce_loss(beta * reference, rankings, 2, EVAL_DEPTH, planted_transition(cls, gamma))
                reference, out["planted_nll"] = ranks_as_scores(rankings), floor.item()
        trans = (self.image_transition, self.text_transition)
        nll = ranking_nll(u, v, scale, cfg.order, EVAL_DEPTH, cfg.in_modal, reference, *trans)
        out["rank_nll"] = nll.item()
        if cfg.order >= 2:
            s = scale * u @ v.T
            lists = [(s, s.T, trans[1], v), (s.T, s, trans[0], u)]  # image rows rank texts, and back
            shares = torch.stack(
                [
                    transition_shares(
                        x, rank_targets(y if reference is None else reference), EVAL_DEPTH, t, e, cfg.order
                    )
                    for x, y, t, e in lists
                ]
            ).mean(0)
            for r, share in enumerate(shares, start=2):
                out[f"t{r}_share"] = share.item()
                out[f"lam{r}_abs"] = sum(abs(t.lam[r - 2].item()) for t in trans) / 2
        return out
