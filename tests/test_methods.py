"""Every registered method builds, trains a step and keeps frozen parts frozen; the order
family nests: an order-0 trial is exactly CLIP."""

import pytest
import torch

from raytrain.config import make_config
from raytrain.methods import build_method, list_methods

TINY = ["model.image.width=16", "model.image.heads=2", "model.image.patch=8", "model.text.width=16",
        "model.text.heads=2", "model.embed_dim=8", "data.image_size=16", "data.context_length=6",
        "teachers.dinov3.image_size=16"]  # fmt: skip


def batch(n=6):
    g = torch.Generator().manual_seed(0)
    return {"pixels": torch.randn(n, 3, 16, 16, generator=g), "tokens": torch.randint(4, 30, (n, 6), generator=g)}


def build(overrides):
    torch.manual_seed(0)
    return build_method(make_config({}, TINY + overrides), 30)


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("order", [0, 1, 3])
def test_every_method_trains_a_step(name, order):
    method = build([f"method={name}", f"loss.order={order}"])
    loss, logs = method(batch(), 2.0)
    assert loss.ndim == 0 and torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in logs.values())
    loss.backward()
    assert all(p.grad is not None for p in method.student.parameters())


def test_order_zero_trains_exactly_clip():
    clip, rank0 = build(["method=clip"]), build(["method=rankclip", "loss.order=0"])
    l1, _ = clip(batch(), 3.0)
    l2, _ = rank0(batch(), 3.0)
    l1.backward(), l2.backward()
    assert l1.item() == l2.item()
    for (n, a), (_, b) in zip(clip.named_parameters(), rank0.named_parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_higher_order_starts_as_rankclip():
    """λ_r = 0 at init, so order 4 equals order 1 in value and in the student's gradients."""
    one, four = build(["loss.order=1"]), build(["loss.order=4"])
    l1, _ = one(batch(), 3.0)
    l4, _ = four(batch(), 3.0)
    assert l4.item() == pytest.approx(l1.item(), abs=1e-6)


def test_teacher_targets_leave_teacher_frozen():
    method = build(["loss.order=2", "loss.target=teacher"])
    loss, _ = method(batch(), 3.0)
    loss.backward()
    assert method.teacher is not None
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert loss.item() != build(["loss.order=2"])(batch(), 3.0)[0].item()  # different targets
