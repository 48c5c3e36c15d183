"""What every method shares: the student (if it has one), and a batch's globally gathered embeddings."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.models.init import part_init
from raytrain.train.dist import gather


class Method(nn.Module):
    """forward(batch, epoch) → (loss, logs). `epoch` is fractional (1.5 = halfway through
    the second epoch), for schedules such as RankCLIP's ranking-weight ramp."""

    name = "base"
    # frozen teachers are rebuilt from config, never saved: a ViT-L would add 1.2 GB per checkpoint
    frozen = ("teacher.", "text_teacher.")
    # False: the method trains heads over frozen encoders only (freeze-align) and overrides
    # embed/encode_*; no `student` is built
    has_student = True

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        if self.has_student:
            with part_init("student", cfg.seed):  # see raytrain.models.init: ablations keep its init
                self.student = cfg.model.build(vocab_size, cfg.data.image_size, cfg.data.context_length, pad_id)
        self._register_state_dict_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen)

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
