"""What every method shares and declares.

Shared: the student (if it has one), a batch's globally gathered embeddings, the frozen teachers
built on first use. Declared, as class attributes and class methods that the config and the
sweep read before anything is built: the method's own config section (`section`, validated by
`settings`), its consistency checks, the teacher outputs it reads from the cache, and a run that
must come first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.dist import gather
from raytrain.models.encoders import Student
from raytrain.models.init import part_init
from raytrain.teachers import build_dinov3, build_text


class Method(nn.Module):
    """forward(batch, epoch) → (loss, logs). `epoch` is fractional (1.5 = halfway through
    the second epoch), for schedules such as RankCLIP's ranking-weight ramp."""

    name = "base"
    # its own config section, cfg.<section>, validated by `settings` (a raytrain.config.Section);
    # subclasses inherit it unless they declare their own
    section: ClassVar[str | None] = None
    settings: ClassVar[type | None] = None
    # frozen parts are rebuilt from config, never saved: a ViT-L would add 1.2 GB per checkpoint
    frozen = ("teacher.", "text_teacher.", "frozen_parts.")
    # False: the method trains heads over frozen encoders only (freeze-align) and overrides
    # embed/encode_*; no `student` is built
    has_student = True

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ValueError, naming the keys, when `cfg`'s sections do not go together for it."""

    @classmethod
    def needs(cls, cfg) -> dict[str, str]:
        """Teacher outputs (cache.teachers names) that `cfg` reads from the teacher cache, each with
        the config key that asks for it; the config refuses them uncached."""
        return {}

    @classmethod
    def preceding_stage(cls, cfg):
        """A Ray Train run to do before this one: (its config, the key that receives its final
        checkpoint's path), or None. The sweep runs it first, in the same trial."""
        return None

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.teacher = self.text_teacher = None  # built by dinov3() / text_encoder() when needed
        if self.has_student:
            with part_init("student", cfg.seed):  # see raytrain.models.init: ablations keep its init
                self.student = Student(cfg.model, vocab_size, cfg.data.image_size, cfg.data.context_length, pad_id)
        self._register_state_dict_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen)

    def dinov3(self, device=None) -> nn.Module:
        """The frozen DINOv3 teacher of teachers.dinov3, built on first use (seeded: every rank
        builds the same one), on `device` when given."""
        if self.teacher is None:
            self.teacher = build_dinov3(self.cfg.teachers.dinov3, self.cfg.data.mean, self.cfg.data.std)
        return self.teacher if device is None else self.teacher.to(device)

    def text_encoder(self, device=None) -> nn.Module:
        """The frozen text teacher of teachers.text, built on first use, on `device` when given."""
        if self.text_teacher is None:
            self.text_teacher = build_text(self.cfg.teachers.text)
        return self.text_teacher if device is None else self.text_teacher.to(device)

    @classmethod
    def exports_student(cls, cfg) -> bool:
        """Whether evaluation embeds with the student alone, so that `raytrain export` (which
        writes only the student) carries the trained model."""
        return cls.has_student and cls.encode_images is Method.encode_images and cls.encode_texts is Method.encode_texts

    def lr_scales(self) -> dict[str, float]:
        """Parameter-name prefix → multiplier of optim.lr, for the optimizer's groups."""
        return {}

    def after_step(self) -> None:
        """Called by the engine after every optimizer step (EMA teachers update here)."""

    def evaluations(self) -> dict[str, tuple]:
        """Metric-name prefix → (encode_images, encode_texts) that training's evaluation
        scores; "" is the method's own pair, the one `raytrain eval` and export use."""
        return {"": (self.encode_images, self.encode_texts)}

    def patch_evaluations(self) -> dict[str, Callable[[Tensor], Tensor | None]]:
        """Metric-name prefix (of `evaluations`) → that inference mode's encode_patches, scored
        as zero-shot segmentation with the same prefix's text encoder (`seg_miou`)."""
        return {"": self.encode_patches}

    def ranking_evaluation(self, pixels: Tensor, tokens: Tensor, captions: list[str]) -> dict[str, float]:
        """Held-out measures of a ranking loss on the evaluation pairs (image i with caption i),
        metric name → value; {} for a method without one (the order-R family's: rank_nll, ...)."""
        return {}

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Evaluation embeddings of images (the student alone unless a method injects)."""
        return self.student.encode_image(pixels)

    def encode_patches(self, pixels: Tensor) -> Tensor | None:
        """L2-normalized patch embeddings [B, h, w, E] in the space of encode_images and
        encode_texts (the student's patch tokens through its image head), or None for a
        method without patch tokens in that space."""
        if not self.has_student:
            return None
        return F.normalize(self.student.patch_embeddings(pixels), dim=-1)

    def encode_texts(self, tokens: Tensor, captions: list[str]) -> Tensor:
        return self.student.encode_text(tokens)

    def embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Global-batch (image, text) embeddings, gradients to this rank's rows, and the scale."""
        u = self.student.encode_image(batch["pixels"])
        v = self.student.encode_text(batch["tokens"])
        return gather(u), gather(v), self.student.logit_scale()


def _drop_frozen(module, state, prefix, local_metadata):
    for key in [k for k in state if k[len(prefix) :].startswith(Method.frozen)]:
        del state[key]


def _ignore_missing_frozen(module, keys):
    keys.missing_keys[:] = [k for k in keys.missing_keys if not k.startswith(Method.frozen)]
