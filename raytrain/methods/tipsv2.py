"""TIPSv2 (docs/methods.md#tipsv2): contrastive image-text training plus patch-level
distillation from the frozen DINOv3 teacher and the iBOT masked-image objective against an
EMA teacher, which iBOT++ extends to every patch token; captions are drawn per sample and step
across the data's granularities.

    L = L_clip(u, v_c) + λ_p · patch_distill(W · pool(tokens), DINOv3 patches)
                       + λ_m · iBOT(++)(h(tokens of the masked view), h_ema(teacher tokens of the full view))

u is the full view's global embedding and v_c the text embedding of the caption column c drawn
for the sample. h is a prototype head (K prototypes), h_ema its EMA: updated after every
optimizer step with a momentum going base → final on a cosine over the run; the teacher's
distributions are centred and sharpened with iBOT's temperature warmup. The paper's summary
names these parts without details: each open choice is a `tipsv2.*` switch (TIPSv2Config below),
among them the EMA of the head only, the teacher backbone being the student's own
(docs/methods.md#masked-image-objective), or of the whole image tower (iBOT); plain iBOT or
iBOT++. The patch distillation matches the full view's tokens, average-pooled to the teacher's
grid, to the teacher's last multi-scale map (cached `dinov3_multiscale`, or the live teacher),
as DINORANKCLIP does.
"""

import contextlib
import copy
import zlib
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from raytrain.config import Section
from raytrain.dist import gather
from raytrain.losses.contrastive import clip_loss
from raytrain.losses.distill import (
    ema_momentum,
    ema_update,
    ibot_loss,
    patch_distill,
    teacher_temp_schedule,
    update_center,
)
from raytrain.methods import register_method
from raytrain.methods.base import Method
from raytrain.models.encoders import pool_tokens
from raytrain.models.init import part_init
from raytrain.teachers.dinov3 import describe


class PrototypeHead(nn.Module):
    """iBOT's head: MLP (width → hidden → hidden → bottleneck, GELU), L2-normalized, then its
    cosine to K L2-normalized prototypes (DINO's weight-normalized last layer with the norm
    fixed at 1): tokens [..., width] → logits [..., K] in [−1, 1], scaled by the temperatures."""

    def __init__(self, width: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are buffers: no optimizer or gradient reaches them,
    state_dict saves them (an EMA teacher survives a resume), and DeepSpeed's bf16/fp16 cast,
    which casts parameters only, leaves them fp32 (in bf16 an EMA step (1 − μ)·Δ with
    μ ≈ 0.996 would mostly round away). Call it on float32 inputs."""
    out = copy.deepcopy(module)
    for m in out.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            delattr(m, name)
            m.register_buffer(name, p.detach().clone())
    return out


def random_masks(
    n: int, patches: int, ratio: tuple[float, float], probability: float, generator: torch.Generator
) -> Tensor:
    """[n, patches] bool, true = masked: each image is masked with `probability`, and then
    round(r · patches) of its patches, chosen uniformly, with r ~ U(ratio) per image."""
    low, high = ratio
    r = low + (high - low) * torch.rand(n, generator=generator)
    count = (r * patches).round() * (torch.rand(n, generator=generator) < probability)
    rank = torch.rand(n, patches, generator=generator).argsort(1).argsort(1)  # each patch's place in a random order
    return rank < count.unsqueeze(1)


def sample_captions(tokens: list[Tensor], weights, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One granularity per row: `tokens` holds G token tensors [B, L] of the same rows; returns
    (tokens [B, L], row b from tokens[choice_b]; choice [B]), choice i.i.d. with P(g) ∝ weights[g]."""
    n, device = tokens[0].shape[0], tokens[0].device
    choice = torch.multinomial(torch.as_tensor(weights, dtype=torch.float), n, replacement=True, generator=generator)
    return torch.stack(tokens)[choice.to(device), torch.arange(n, device=device)], choice


def run_steps(cfg) -> int:
    """The run's optimizer steps on the embedded data, counted as the training loop does."""
    steps = cfg.train.epochs * (cfg.data.n_train // cfg.train.batch_size)
    return max(1, min(steps, cfg.train.max_steps or steps))


def _gathered(module: nn.Module):
    """Under DeepSpeed ZeRO-3 the module's parameters are partitioned: gather them for reading."""
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    from deepspeed.runtime.zero import GatheredParameters

    return GatheredParameters(params)


class TIPSv2Config(Section):
    """TIPSv2's parts. Its paper names them (patch-level distillation, iBOT++, a modified EMA,
    caption sampling across granularities) without values: the defaults are iBOT's, and each
    choice it leaves open is a switch here."""

    captions: tuple[str, ...] = Field(
        ("caption", "caption_short"), min_length=1, description="caption columns drawn per sample and step"
    )
    caption_weights: tuple[float, ...] | None = Field(None, description="their draw weights; None: uniform (seeded)")
    patch_weight: float = Field(1.0, ge=0, description="λ_p: student patch tokens → DINOv3 patch tokens (0: off)")
    ibot_weight: float = Field(1.0, ge=0, description="λ_m: the masked-image objective (0: off)")
    ibot_plus_plus: bool = Field(True, description="iBOT++: visible tokens contribute too; off: plain iBOT")
    mask_ratio: tuple[float, float] = Field((0.1, 0.5), description="a masked image's ratio, drawn uniformly")
    mask_probability: float = Field(0.5, ge=0, le=1, description="share of images masked (random patches)")
    prototypes: int = Field(256, ge=2, description="K prototypes (iBOT: 8192; the embedded scenes have few concepts)")
    head_hidden: int = Field(256, ge=4, description="prototype head MLP width")
    head_bottleneck: int = Field(64, ge=4, description="its L2-normalized output, compared with the prototypes")
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: tuple[float, float] = Field((0.04, 0.07), description="warmed up linearly (iBOT)")
    teacher_temp_warmup: float = Field(0.3, ge=0, le=1, description="share of the EMA horizon the warmup takes")
    center_momentum: float = Field(0.9, ge=0, lt=1)
    ema_scope: Literal["head", "full"] = Field(
        "head", description="head: only the prototype head is an EMA (backbone shared); full: iBOT's tower EMA too"
    )
    ema_momentum: tuple[float, float] = Field((0.996, 1.0), description="base → final, cosine over ema_steps")
    ema_steps: int | None = Field(None, ge=1, description="the schedules' horizon in steps; None: the run's length")

    @model_validator(mode="after")
    def _ranges(self):
        w = self.caption_weights
        if w is not None and (len(w) != len(self.captions) or min(w) < 0 or sum(w) <= 0):
            raise ValueError(
                f"caption_weights {w} must be one non-negative weight per column of {self.captions}, not all 0"
            )
        if not 0 <= self.mask_ratio[0] <= self.mask_ratio[1] <= 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} must be (low, high) with 0 <= low <= high <= 1")
        if not 0 <= self.ema_momentum[0] <= self.ema_momentum[1] <= 1:
            raise ValueError(f"ema_momentum {self.ema_momentum} must be (base, final) with 0 <= base <= final <= 1")
        if min(self.teacher_temp) <= 0:
            raise ValueError(f"teacher_temp {self.teacher_temp} must be positive")
        return self


@register_method("tipsv2")
class TIPSv2(Method):
    section, settings = "tipsv2", TIPSv2Config

    @classmethod
    def check(cls, cfg) -> None:
        t = cfg.tipsv2
        if missing := [c for c in t.captions if c != cfg.data.caption_column and c not in cfg.data.extra_captions]:
            raise ValueError(f"tipsv2.captions reads {missing}: add them to data.extra_captions")
        if t.ibot_weight and t.ema_steps is None and cfg.data.path != "embedded":
            raise ValueError(
                "tipsv2.ema_steps: set the EMA/temperature horizon (≈ train.epochs × rows / train.batch_size) "
                "for data other than the embedded default"
            )

    @classmethod
    def needs(cls, cfg) -> dict[str, str]:
        return {"dinov3": "tipsv2.patch_weight"} if cfg.tipsv2.patch_weight and cfg.cache.use else {}

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        t, width = cfg.tipsv2, cfg.model.image.width
        self.caption_keys = ["tokens" if c == cfg.data.caption_column else f"tokens_{c}" for c in t.captions]
        self.caption_weights = t.caption_weights or (1.0,) * len(t.captions)
        self.project = None
        if t.patch_weight:
            dim, _, self.grid = describe(cfg.teachers.dinov3)
            with part_init("patch_projector", cfg.seed):
                self.project = nn.Linear(width, dim)
            if not cfg.cache.use:
                self.dinov3()  # the live teacher, built now so the engine moves it with the method
        self.head = self.mask_token = self.ema = None
        if t.ibot_weight:
            with part_init("ibot_head", cfg.seed):
                self.head = PrototypeHead(width, t.head_hidden, t.head_bottleneck, t.prototypes)
            self.mask_token = nn.Parameter(torch.zeros(width))  # iBOT's zero init
            self.ema = nn.ModuleDict({"head": frozen_copy(self.head)})  # the teacher starts as the student
            if t.ema_scope == "full":
                self.ema["image"] = frozen_copy(self.student.image)
            self.register_buffer("center", torch.zeros(t.prototypes))
            self.horizon = t.ema_steps or run_steps(cfg)
        # optimizer steps taken: the schedules' clock, saved and resumed with the weights
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.calls = 0  # forwards since the last step: micro-batches of one step draw apart

    def forward(self, batch, epoch: float):
        t, step = self.cfg.tipsv2, int(self.steps)
        pixels = batch["pixels"]
        tokens, _ = sample_captions(
            [batch[k] for k in self.caption_keys], self.caption_weights, self.generator(step, "captions")
        )
        f, patches = self.student.image(pixels)
        scale = self.student.logit_scale()
        loss = clip_loss(gather(F.normalize(f, dim=-1)), gather(self.student.encode_text(tokens)), scale)
        logs = {"clip": loss.detach(), "logit_scale": scale.detach()}
        if self.project is not None:
            target = (
                batch["dinov3_multiscale"][:, -1]
                if "dinov3_multiscale" in batch
                else self.teacher(pixels).multiscale[:, -1]
            )
            distill = patch_distill(self.project(pool_tokens(patches, self.grid)), target)
            logs["patch_distill"] = distill.detach()
            loss = loss + t.patch_weight * distill
        if self.head is not None:
            ibot, more = self.masked_image(pixels, patches, step)
            logs.update(more)
            loss = loss + t.ibot_weight * ibot
        self.calls += 1
        return loss, logs

    def masked_image(self, pixels: Tensor, patches: Tensor, step: int) -> tuple[Tensor, dict]:
        """iBOT(++) of the student's masked view against the EMA teacher's full view (for the
        "head" scope: the student's own full-view tokens, detached); updates the center."""
        t = self.cfg.tipsv2
        mask = random_masks(*patches.shape[:2], t.mask_ratio, t.mask_probability, self.generator(step, "masks"))
        mask = mask.to(pixels.device)
        _, masked = self.student.image(pixels, mask, self.mask_token)
        with torch.no_grad():
            full = self.ema["image"](pixels.float())[1] if "image" in self.ema else patches
            teacher = self.ema["head"](full.float())
        temp = teacher_temp_schedule(step, round(t.teacher_temp_warmup * self.horizon), *t.teacher_temp)
        loss = ibot_loss(
            self.head(masked), teacher, self.center, mask, t.student_temp, temp, plus_plus=t.ibot_plus_plus
        )
        if self.training:  # with the global batch's mean, as iBOT all-reduces it
            self.center.copy_(update_center(self.center, gather(teacher.mean((0, 1))[None]), t.center_momentum))
        momentum = ema_momentum(step, self.horizon, *t.ema_momentum)
        return loss, {
            "ibot": loss.detach(),
            "teacher_temp": temp,
            "ema_momentum": momentum,
            "mask_share": mask.float().mean(),
        }

    def after_step(self) -> None:
        """The EMA teacher follows the student with the scheduled momentum; the clock ticks."""
        if self.ema is not None:
            momentum = ema_momentum(int(self.steps), self.horizon, *self.cfg.tipsv2.ema_momentum)
            for name, ema in self.ema.items():
                source = self.head if name == "head" else self.student.image
                with _gathered(source):
                    ema_update(dict(ema.named_buffers()), source, momentum)
        self.steps.add_(1)
        self.calls = 0

    def generator(self, step: int, stream: str) -> torch.Generator:
        """A CPU generator of (seed, step, rank, forward within the step, stream): the same
        masks and captions after a resume, different ones on other ranks and streams."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        key = [self.cfg.seed, step, rank, self.calls, zlib.crc32(stream.encode())]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
