"""DCLIP (docs/methods.md#dclip) in two phases, each a registered method and a Ray
Train run; run_trial runs both as one trial (phase 1 is what `DCLIP.preceding_stage` declares).

    phase 1, dclip_meta:  L = L_clip(meta(regions, text tokens), w)        the meta-teacher trains
    phase 2, dclip:       L = L_clip(u, w) + λ_d · cos-distill(u → meta) + λ_a · cos-distill(f → f⁰)

w is the frozen text teacher's caption embedding (cached `text`): DCLIP's text encoder stays
frozen, so our student's text side is the text teacher, and the student image embedding
u = normalize(P f) is the student image tower's output f projected into the text teacher's
space. meta is the meta-teacher of raytrain.models.meta_teacher over the cached DINOv3 and YOLO
outputs (`dinov3_cls`, `yolo_crops/conf/area/valid`, or the `dinov3_multiscale` patch grid for
the No YOLO ablation) and the text teacher's tokens (`text_tokens`, `text_mask`); in phase 2 it
is frozen, loaded from the phase-1 checkpoint (`dclip.teacher_checkpoint`). f⁰ is a frozen copy
of the image tower as phase 2 starts (`dclip.init_checkpoint`, e.g. a CLIP run, or the seeded
init). Frozen parts sit under `teacher.` and are never saved; evaluation embeds images with the
student and captions with the text teacher, built on first use. The paper's "partially
fine-tunes its image encoder" names no layers: the whole image tower trains here.
"""

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raytrain.checkpoint import load
from raytrain.config import Section
from raytrain.dist import gather
from raytrain.losses.contrastive import clip_loss
from raytrain.losses.dclip import dclip_student_loss
from raytrain.methods import register_method
from raytrain.methods.base import Method
from raytrain.models.init import part_init
from raytrain.models.meta_teacher import MetaTeacher
from raytrain.teachers.dinov3 import describe
from raytrain.teachers.text import widths


class MetaTeacherConfig(Section):
    """DCLIP's meta-teacher (docs/methods.md#dclip-meta-teacher): the frozen text teacher's tokens and
    scored image regions through cross-attention, pooled by temperature-scaled attention. Where the
    paper leaves a choice open the default is ours and the switch is here. Phase 2 refuses a
    phase-1 checkpoint whose `dclip.meta` differs from its own."""

    regions: Literal["yolo", "grid"] = Field(
        "yolo", description="yolo: the cached, scored YOLO regions; grid: DINOv3's last patch grid (No YOLO)"
    )
    cross_attention: Literal["bidirectional", "text_to_regions", "average", "none"] = Field(
        "bidirectional", description="the paper's; text→regions alone; averages (No Bidir); regions alone (No CMA)"
    )
    heads: int = Field(8, ge=1, description="must divide the text teacher's width (paper: 8 ViT-B, 12 ViT-L)")
    clusters: int = Field(1, ge=1, description="learned aggregation queries, their pools averaged")
    temperature: float = Field(0.1, gt=0, description="τ of the aggregation's softmax over cosine similarities")
    region_weights: tuple[float, float, float] = Field(
        (1 / 3, 1 / 3, 1 / 3), description="region score weights of (YOLO confidence, box area, text similarity)"
    )


class DCLIPConfig(Section):
    """DCLIP's two phases: the meta-teacher (phase 1, method dclip_meta) and the student (phase 2,
    method dclip); both read the teacher cache, and the text side is the frozen text teacher."""

    meta: MetaTeacherConfig = MetaTeacherConfig()
    teacher_epochs: int = Field(5, ge=1, description="phase 1's epochs (the paper, ViT-B: 5 teacher, 2 student)")
    teacher_lr: float | None = Field(None, gt=0, description="phase 1's optim.lr; None: optim.lr")
    teacher_checkpoint: str | None = Field(None, description="a trained phase-1 checkpoint; None: train one first")
    init_checkpoint: str | None = Field(None, description="the student's phase-start weights (student.*); None: seeded")
    distill: bool = Field(True, description="off: the No Teacher row, plain fine-tuning without phase 1")
    distill_weight: float = Field(1.0, ge=0, description="λ_d")
    anchor_weight: float = Field(0.0, ge=0, description="λ_a of the anchor to the phase-start image encoder; 0: off")


def _needs(cfg, meta: bool) -> dict[str, str]:
    """What a DCLIP phase reads from the cache: the text embedding, and the meta-teacher's inputs."""
    needs = {"text": cfg.method}
    if meta:
        regions = ["yolo"] if cfg.dclip.meta.regions == "yolo" else []
        needs |= dict.fromkeys(["dinov3", "text_tokens", *regions], cfg.method)
    return needs


def build_meta_teacher(cfg) -> MetaTeacher:
    with part_init("meta_teacher", cfg.seed):
        return MetaTeacher(
            cfg.dclip.meta,
            describe(cfg.teachers.dinov3)[0],
            widths(cfg.teachers.text)[1],
            cfg.model.init_temperature,
            cfg.model.max_logit_scale,
        )


def meta_embedding(meta: MetaTeacher, batch: dict, regions: str) -> torch.Tensor:
    """The meta-teacher's embedding of a cache-fed batch; `regions` as dclip.meta.regions."""
    cls, tokens, mask, text = batch["dinov3_cls"], batch["text_tokens"], batch["text_mask"], batch["text"]
    if regions == "grid":  # No YOLO: every patch of the last scale's grid is a region, unscored
        patches = batch["dinov3_multiscale"][:, -1]
        every = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        return meta(cls, patches, every, tokens, mask, text)
    return meta(
        cls, batch["yolo_crops"], batch["yolo_valid"] > 0.5, tokens, mask, text, batch["yolo_conf"], batch["yolo_area"]
    )


def load_part(module: nn.Module, path: str, prefix: str, cfg, key: str, section: str | None = None) -> None:
    """Load a raytrain checkpoint directory's `prefix` weights (local or s3://) into `module`.
    `key` names the setting in errors; `section`, a dotted config section that must be the
    same in the checkpoint's config (what the weights' architecture was built from)."""
    try:
        state, meta = load(path, cfg.data.s3)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key} {path!r}: {e}") from None
    weights = {k[len(prefix) :]: v for k, v in state["engine"]["model"].items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{key} {path!r} holds no {prefix}* weights")
    if section:
        wanted, got = cfg, meta["config"]
        for part in section.split("."):
            wanted, got = getattr(wanted, part), got.get(part, {})
        wanted = wanted.model_dump(mode="json")
        diff = [f"{section}.{k}: checkpoint has {got.get(k)!r}, config wants {v!r}" for k, v in wanted.items()]
        diff = [d for (k, v), d in zip(wanted.items(), diff) if got.get(k) != v]
        if diff:
            raise ValueError(f"{key} {path!r} was trained with another {section}:\n  " + "\n  ".join(diff))
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{key} {path!r} does not fit this config: {e}") from None


@register_method("dclip_meta")
class DCLIPMeta(Method):
    """Phase 1: the meta-teacher alone trains, with symmetric InfoNCE against the frozen text
    embedding and its own learnable temperature. No student; no evaluation (config-checked)."""

    has_student = False
    section, settings = "dclip", DCLIPConfig

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.train.eval:
            raise ValueError(
                "dclip_meta (DCLIP's phase 1) has no evaluation: its meta-teacher needs each image's caption "
                "and cached regions; set train.eval=false"
            )

    @classmethod
    def needs(cls, cfg) -> dict[str, str]:
        return _needs(cfg, meta=True)

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        self.meta = build_meta_teacher(cfg)

    def forward(self, batch, epoch: float):
        e = meta_embedding(self.meta, batch, self.cfg.dclip.meta.regions)
        scale = self.meta.logit_scale()
        loss = clip_loss(gather(e), gather(batch["text"]), scale)
        return loss, {"clip": loss.detach(), "logit_scale": scale.detach()}


@register_method("dclip")
class DCLIP(Method):
    """Phase 2: the student image encoder; the text side and the meta-teacher are frozen."""

    section, settings = "dclip", DCLIPConfig

    @classmethod
    def needs(cls, cfg) -> dict[str, str]:
        return _needs(cfg, meta=cfg.dclip.distill)  # phase 1, which runs first, reads the same

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        d = cfg.dclip
        if d.init_checkpoint:
            load_part(self.student, d.init_checkpoint, "student.", cfg, "dclip.init_checkpoint")
        self.student.text.requires_grad_(False)  # unused: the text side is the frozen text teacher
        with part_init("image_proj", cfg.seed):
            self.image_proj = nn.Linear(cfg.model.embed_dim, widths(cfg.teachers.text)[0], bias=False)
        self.frozen_parts = nn.ModuleDict()  # rebuilt from config and checkpoints, never saved
        if d.distill:
            if not d.teacher_checkpoint:
                raise ValueError(
                    "dclip.teacher_checkpoint is not set: phase 2 distils a trained meta-teacher. Run DCLIP as a "
                    "sweep trial (jobs/dclip.py trains phase 1 first), name a phase-1 checkpoint, or set "
                    "dclip.distill=false"
                )
            self.frozen_parts["meta"] = build_meta_teacher(cfg)
            load_part(
                self.frozen_parts["meta"], d.teacher_checkpoint, "meta.", cfg, "dclip.teacher_checkpoint", "dclip.meta"
            )
        if d.anchor_weight > 0:
            self.frozen_parts["anchor"] = copy.deepcopy(self.student.image)  # the phase-start encoder
        self.frozen_parts.requires_grad_(False)

    @classmethod
    def preceding_stage(cls, cfg):
        """The run to do before this one (raytrain.tune.sweep.run_trial): (its config, the key
        that receives its final checkpoint's path), or None. Phase 1 unless distillation is off
        (No Teacher) or dclip.teacher_checkpoint already names a trained meta-teacher."""
        d = cfg.dclip
        if not d.distill or d.teacher_checkpoint:
            return None
        phase1 = {
            "method": "dclip_meta",
            "train.epochs": d.teacher_epochs,
            "optim.lr": d.teacher_lr or cfg.optim.lr,
            "train.eval": False,
            "train.keep_by": None,
        }
        return cfg.override(phase1), "dclip.teacher_checkpoint"

    def forward(self, batch, epoch: float):
        d = self.cfg.dclip
        f, _ = self.student.image(batch["pixels"])
        u = F.normalize(self.image_proj(f), dim=-1)
        target = anchor = None
        with torch.no_grad():
            if "meta" in self.frozen_parts:
                target = gather(meta_embedding(self.frozen_parts["meta"], batch, d.meta.regions))
            if "anchor" in self.frozen_parts:
                anchor = gather(self.frozen_parts["anchor"](batch["pixels"])[0])
        scale = self.student.logit_scale()
        features = gather(f) if anchor is not None else None
        loss, logs = dclip_student_loss(
            gather(u), gather(batch["text"]), scale, target, d.distill_weight, features, anchor, d.anchor_weight
        )
        logs["logit_scale"] = scale.detach()
        return loss, logs

    def encode_images(self, pixels):
        return F.normalize(self.image_proj(self.student.image(pixels)[0]), dim=-1)

    def encode_patches(self, pixels):
        """The student's patch embeddings through the same projection into the text teacher's space."""
        return F.normalize(self.image_proj(self.student.patch_embeddings(pixels)), dim=-1)

    def encode_texts(self, tokens, captions):
        return self.text_encoder(tokens.device).encode(list(captions)).to(tokens.device)
