"""Zero-shot classification with prompt-template ensembles (docs/evaluation.md#zero-shot-classification)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a rendering of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
)
SINGLE = ("This is a photo of a {}",)

_TEXT_CHUNK = 1024
_ROW_CHUNK = 4096


@torch.no_grad()
def class_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor], classes: Sequence[str], templates: Sequence[str] = TEMPLATES
) -> torch.Tensor:
    """Class embeddings [C, d] from a template ensemble.

    With e_{c,t} = encode_text(templates[t].format(classes[c])) and n(x) = x / ‖x‖:
        w_c = n( (1/T) Σ_t n(e_{c,t}) )
    Prompts are encoded in chunks of 1024; templates use "{}" for the class name.
    """
    if not classes or not templates:
        raise ValueError(f"classes and templates must be non-empty, got {len(classes)} and {len(templates)}")
    prompts = [t.format(c) for c in classes for t in templates]
    emb = torch.cat([encode_text(prompts[i : i + _TEXT_CHUNK]) for i in range(0, len(prompts), _TEXT_CHUNK)])
    emb = F.normalize(emb.float(), dim=-1).view(len(classes), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


@torch.no_grad()
def zeroshot_accuracy(
    image_emb: torch.Tensor, class_emb: torch.Tensor, labels, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-K accuracy of cosine-similarity classification.

    Score s_{i,c} = cos(image_i, class_c); image i is correct at K when its true class y_i
    ranks within the top min(K, C), where rank = #{c: s_c > s_y} + #{c < y: s_c = s_y}
    (ties broken by class index, as in retrieval_metrics). Keys "top{K}" for K in ks.
    """
    img = F.normalize(torch.as_tensor(image_emb).float(), dim=-1)
    cls = F.normalize(torch.as_tensor(class_emb).float().to(img.device), dim=-1)
    y = torch.as_tensor(labels, dtype=torch.long, device=img.device).view(-1)
    if img.ndim != 2 or cls.ndim != 2 or img.shape[1] != cls.shape[1]:
        raise ValueError(f"image_emb {tuple(img.shape)} and class_emb {tuple(cls.shape)} must be [n, d] and [C, d]")
    if len(y) != len(img):
        raise ValueError(f"labels has {len(y)} entries for {len(img)} images")
    if len(y) == 0:
        raise ValueError("image_emb is empty")
    n_cls = len(cls)
    if y.min() < 0 or y.max() >= n_cls:
        raise ValueError(f"labels must lie in [0, {n_cls}), got range [{y.min().item()}, {y.max().item()}]")
    idx = torch.arange(n_cls, device=img.device)
    rank = []
    for a in range(0, len(img), _ROW_CHUNK):
        s, t = img[a : a + _ROW_CHUNK] @ cls.T, y[a : a + _ROW_CHUNK, None]
        true = s.gather(1, t)
        rank.append((s > true).sum(1) + ((s == true) & (idx < t)).sum(1))  # 0-based rank
    rank = torch.cat(rank)
    return {f"top{k}": (rank < min(k, n_cls)).float().mean().item() for k in ks}
