"""What every method shares: the student, and the embeddings of a batch gathered globally."""

from __future__ import annotations

from torch import Tensor, nn

from raytrain.train.dist import gather


class Method(nn.Module):
    """forward(batch, epoch) → (loss, logs). `epoch` is fractional (1.5 = halfway through
    the second epoch), for schedules such as RankCLIP's ranking-weight ramp."""

    name = "base"

    def __init__(self, cfg, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.student = cfg.model.build(vocab_size, cfg.data.image_size, cfg.data.context_length, pad_id)

    def embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Global-batch (image, text) embeddings, gradients to this rank's rows, and the scale."""
        u = self.student.encode_image(batch["pixels"])
        v = self.student.encode_text(batch["tokens"])
        return gather(u), gather(v), self.student.logit_scale()
