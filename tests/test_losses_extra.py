"""Baseline and distillation losses against hand-computed values (docs/methods.md#cyclip, #alip,
#dinorankclip-distillation, #masked-image-objective)."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raytrain.losses.baselines import ALIPWeights, alip_loss, cyclip_loss, cyclip_regularizers, per_sample_clip_loss
from raytrain.losses.contrastive import clip_loss
from raytrain.losses.distill import (
    cosine_distill,
    ema_momentum,
    ema_update,
    ibot_loss,
    patch_distill,
    teacher_temp_schedule,
    update_center,
)

C = 1 / math.sqrt(2)


# ----------------------------------------------------------------------------- CyCLIP


def test_cyclip_regularizers_hand_2x2():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # normalized inside: v1 = [1, 0], v2 = [c, c], c = 1/√2
    # u uᵀ = I, v vᵀ = [[1, c], [c, 1]] → Σ diff² = 2c² = 1 → in = 1/B = 0.5
    # S = u vᵀ = [[1, c], [0, c]], S − Sᵀ = [[0, c], [−c, 0]] → Σ = 2c² = 1 → cross = 0.5
    in_modal, cross = cyclip_regularizers(u, v)
    assert in_modal.item() == pytest.approx(0.5, abs=1e-6)
    assert cross.item() == pytest.approx(0.5, abs=1e-6)


def test_cyclip_regularizers_zero_cases():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    in_modal, cross = cyclip_regularizers(x, 3 * x)  # u == v (after normalization)
    assert in_modal.item() == pytest.approx(0.0, abs=1e-6)
    assert cross.item() == pytest.approx(0.0, abs=1e-6)  # S = u uᵀ is symmetric
    # symmetric similarity with u ≠ v: u = I, v = [[.6, .8], [.8, .6]] → S = vᵀ = v symmetric
    u = torch.eye(2)
    v = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    in_modal, cross = cyclip_regularizers(u, v)
    assert cross.item() == pytest.approx(0.0, abs=1e-7)
    # v vᵀ = [[1, .96], [.96, 1]] vs I → in = 2 · .96² / 2
    assert in_modal.item() == pytest.approx(0.96**2, abs=1e-6)


def test_cyclip_regularizers_match_official_scaled_form():
    """CyCLIP's code: (scale·A − scale·B)².mean() / scale² · B; the scale cancels."""
    torch.manual_seed(1)
    u, v = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    s, b = 37.0, 6
    ref_in = (s * u @ u.T - s * v @ v.T).square().mean() / (s * s) * b
    ref_cross = (s * u @ v.T - s * v @ u.T).square().mean() / (s * s) * b
    in_modal, cross = cyclip_regularizers(u, v)
    assert in_modal.item() == pytest.approx(ref_in.item(), rel=1e-5)
    assert cross.item() == pytest.approx(ref_cross.item(), rel=1e-5)


def test_cyclip_loss_is_clip_plus_weighted_regs():
    torch.manual_seed(2)
    u, v = torch.randn(7, 5), torch.randn(7, 5)
    in_modal, cross = cyclip_regularizers(u, v)
    base = clip_loss(u, v, 20.0)
    assert cyclip_loss(u, v, 20.0).item() == pytest.approx((base + 0.25 * in_modal + 0.25 * cross).item(), rel=1e-6)
    got = cyclip_loss(u, v, 20.0, lambda_in=1.5, lambda_cross=0.1)
    assert got.item() == pytest.approx((base + 1.5 * in_modal + 0.1 * cross).item(), rel=1e-6)
    assert cyclip_loss(u, v, 20.0, 0.0, 0.0).item() == pytest.approx(base.item(), rel=1e-7)


def test_per_sample_clip_loss_mean_is_clip_loss():
    torch.manual_seed(3)
    u, v = torch.randn(9, 6), torch.randn(9, 6)
    per = per_sample_clip_loss(u, v, 14.0)
    assert per.shape == (9,)
    assert per.mean().item() == pytest.approx(clip_loss(u, v, 14.0).item(), rel=1e-6)
    # hand case (test_losses' 2×2): ℓ_0 = ½[CE(image 0 row) + CE(text 0 row)]
    u2, v2, s = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 1.0]]), 10.0
    c = 10 * C
    l0 = 0.5 * (-(10 - math.log(math.exp(10) + math.exp(c))) - (10 - math.log(math.exp(10) + 1)))
    assert per_sample_clip_loss(u2, v2, s)[0].item() == pytest.approx(l0, abs=1e-6)


# ----------------------------------------------------------------------------- ALIP


def _constant_cosine_batch(b=3, theta=0.3, phi=-0.5):
    """Image i = e_i; t_r,i = cosθ e_i + sinθ e_{i+b}; t_c,i = cosφ e_i + sinφ e_{i+b}.
    Per-sample cosines: a = cos(θ − φ), b = cosθ, c = cosφ, the same for every i."""
    eye = torch.eye(2 * b, dtype=torch.float64)
    v = eye[:b]
    tr = math.cos(theta) * eye[:b] + math.sin(theta) * eye[b:]
    tc = math.cos(phi) * eye[:b] + math.sin(phi) * eye[b:]
    return v, tr, tc, (math.cos(theta - phi), math.cos(theta), math.cos(phi))


def test_alip_unit_weights_when_means_equal_batch_cosines():
    v, tr, tc, (a, b, c) = _constant_cosine_batch()
    w = ALIPWeights()
    w.m_a.fill_(a), w.m_b.fill_(b), w.m_c.fill_(c)
    expected = clip_loss(v, tr, 10.0) + clip_loss(v, tc, 10.0)
    # EMA of a batch whose mean equals m leaves m unchanged → all weights exp(0) = 1
    got = alip_loss(v, tr, tc, 10.0, w, update=True)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert w.m_a.item() == pytest.approx(a, abs=1e-6) and w.m_b.item() == pytest.approx(b, abs=1e-6)
    # same caption twice (t_r = t_c = image): cosines all 1 = the initial means → 2 × CLIP
    w2 = ALIPWeights()
    x = torch.randn(4, 8, dtype=torch.float64)
    assert alip_loss(x, x, x, 10.0, w2).item() == pytest.approx(2 * clip_loss(x, x, 10.0).item(), rel=1e-6)


def test_alip_weights_ema_and_gate_math():
    w = ALIPWeights()  # m = 1, μ = 0.99, λ = 2; training mode → EMA updated first
    cos_a = torch.tensor([0.5, -0.1])
    cos_b = torch.tensor([0.2, 0.4])
    cos_c = torch.tensor([0.0, 0.6])
    w_s, w_r, w_c = w(cos_a, cos_b, cos_c)
    m_a, m_b, m_c = 0.99 + 0.01 * 0.2, 0.99 + 0.01 * 0.3, 0.99 + 0.01 * 0.3
    assert w.m_a.item() == pytest.approx(m_a, abs=1e-6)
    assert w.m_b.item() == pytest.approx(m_b, abs=1e-6)
    assert w.m_c.item() == pytest.approx(m_c, abs=1e-6)
    assert w_s.tolist() == pytest.approx([math.exp(2 * (0.5 - m_a)), math.exp(2 * (-0.1 - m_a))], rel=1e-5)
    assert w_r.tolist() == pytest.approx([math.exp(2 * (0.2 - m_b)), math.exp(2 * (0.4 - m_b))], rel=1e-5)
    assert w_c.tolist() == pytest.approx([math.exp(2 * (0.0 - m_c)), math.exp(2 * (0.6 - m_c))], rel=1e-5)
    # W_s is capped at 1, W_r / W_c are not
    w.eval()
    for m in (w.m_a, w.m_b, w.m_c):
        m.zero_()
    w_s, w_r, w_c = w(torch.tensor([0.5, -0.5]), torch.tensor([0.5, -0.5]), torch.tensor([1.0, 0.0]))
    assert w_s.tolist() == pytest.approx([1.0, math.exp(-1)], rel=1e-6)
    assert w_r.tolist() == pytest.approx([math.e, math.exp(-1)], rel=1e-6)
    assert w_c.tolist() == pytest.approx([math.exp(2), 1.0], rel=1e-6)
    assert w.m_a.item() == 0.0  # eval: no update
    # the official code's option: pair weights forced to 1 where the LCG is saturated
    g = ALIPWeights(gate_pairs_by_sample=True).eval()
    for m in (g.m_a, g.m_b, g.m_c):
        m.zero_()
    _, w_r, w_c = g(torch.tensor([0.5, -0.5]), torch.tensor([0.5, -0.5]), torch.tensor([1.0, 0.0]))
    assert w_r.tolist() == pytest.approx([1.0, math.exp(-1)], rel=1e-6)
    assert w_c.tolist() == pytest.approx([1.0, 1.0], rel=1e-6)


def test_alip_weights_detached():
    torch.manual_seed(4)
    v, tr, tc = (torch.randn(5, 6, requires_grad=True) for _ in range(3))
    w = ALIPWeights().eval()
    w.m_a.fill_(0.1), w.m_b.fill_(-0.2), w.m_c.fill_(0.05)
    loss = alip_loss(v, tr, tc, 12.0, w)
    grads = torch.autograd.grad(loss, (v, tr, tc))
    # the same loss with the weights as constants has the same gradient
    with torch.no_grad():
        vn, rn, cn = (F.normalize(x, dim=-1) for x in (v, tr, tc))
        w_s, w_r, w_c = w((rn * cn).sum(-1), (rn * vn).sum(-1), (cn * vn).sum(-1))
    assert not (w_s.requires_grad or w_r.requires_grad or w_c.requires_grad)
    ref = (w_s * w_r * per_sample_clip_loss(v, tr, 12.0)).mean() + (
        w_s * w_c * per_sample_clip_loss(v, tc, 12.0)
    ).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, r in zip(grads, torch.autograd.grad(ref, (v, tr, tc))):
        torch.testing.assert_close(g, r)


def test_alip_state_dict_round_trip():
    w = ALIPWeights()
    w(torch.tensor([0.3, 0.1]), torch.tensor([0.2]), torch.tensor([-0.4]))
    assert set(w.state_dict()) == {"m_a", "m_b", "m_c"}
    buf = io.BytesIO()
    torch.save(w.state_dict(), buf)
    buf.seek(0)
    w2 = ALIPWeights()
    w2.load_state_dict(torch.load(buf))
    for name in ("m_a", "m_b", "m_c"):
        assert getattr(w2, name).item() == getattr(w, name).item()
    assert w2.m_a.item() == pytest.approx(0.99 + 0.01 * 0.2, abs=1e-6)
    assert [n for n, _ in w.named_buffers()] == ["m_a", "m_b", "m_c"] and not list(w.parameters())


class _FrozenWeights(ALIPWeights):
    """Fixed non-unit weights: numerical differentiation cannot see through ALIP's detach,
    so the gradcheck holds the weights constant (the detach itself is tested above)."""

    def __init__(self, ws, wr, wc):
        super().__init__()
        self.w = (ws, wr, wc)

    def forward(self, cos_a, cos_b, cos_c, update=None):
        return self.w


def test_alip_gradcheck_float64():
    torch.manual_seed(5)
    v, tr, tc = (torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    ws = torch.tensor([1.0, 0.4, 0.8, 0.1], dtype=torch.float64)
    wr = torch.tensor([1.3, 0.7, 2.0, 0.5], dtype=torch.float64)
    wc = torch.tensor([0.9, 1.1, 0.2, 3.0], dtype=torch.float64)
    frozen = _FrozenWeights(ws, wr, wc)
    assert torch.autograd.gradcheck(lambda a, b, c, s: alip_loss(a, b, c, s, frozen), (v, tr, tc, scale))
    real = ALIPWeights(scale=0.0).double().eval()  # λ = 0 → all weights exactly 1, any input
    assert torch.autograd.gradcheck(lambda a, b, c, s: alip_loss(a, b, c, s, real), (v, tr, tc, scale))


# ----------------------------------------------------------------------------- distillation


def test_cosine_distill_values_and_teacher_detached():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    t = torch.tensor([[3.0, 0.0], [0.0, 1.0]], requires_grad=True)
    assert cosine_distill(s, t).item() == pytest.approx(0.0, abs=1e-7)  # identical directions
    assert cosine_distill(s, torch.tensor([[0.0, 1.0], [5.0, 0.0]])).item() == pytest.approx(1.0, abs=1e-7)
    assert cosine_distill(s, -t).item() == pytest.approx(2.0, abs=1e-7)
    # rows mean: one identical (0), one opposite (2) → 1
    assert cosine_distill(s, torch.tensor([[1.0, 0.0], [0.0, -1.0]])).item() == pytest.approx(1.0, abs=1e-7)
    cosine_distill(s, torch.tensor([[1.0, 1.0], [1.0, 0.0]]) * t).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError):
        cosine_distill(torch.randn(2, 3), torch.randn(2, 4))


def test_patch_distill_shapes_and_value():
    torch.manual_seed(7)
    s = torch.randn(2, 4, 6, requires_grad=True)
    t = torch.randn(2, 4, 6, requires_grad=True)
    loss = patch_distill(s, t)
    assert loss.shape == ()
    per_patch = 1 - F.cosine_similarity(s, t, dim=-1)  # [B, P]
    assert loss.item() == pytest.approx(per_patch.mean().item(), rel=1e-6)
    loss.backward()
    assert t.grad is None and s.grad.shape == (2, 4, 6)
    assert patch_distill(t, t).item() == pytest.approx(0.0, abs=1e-6)
    for bad in (torch.randn(2, 4, 7), torch.randn(2, 3, 6)):  # width / patch-count mismatch
        with pytest.raises(ValueError):
            patch_distill(s, bad)
    with pytest.raises(ValueError):  # not [B, P, d]
        patch_distill(torch.randn(8, 6), torch.randn(8, 6))


# ----------------------------------------------------------------------------- iBOT / iBOT++


def test_ibot_masked_only_vs_plus_plus_hand():
    # B = 1, P = 2, K = 2, both temperatures 1, center 0.
    # token 0: teacher [0, 0] → p = [½, ½]; student [0, 0] → CE = ln 2
    # token 1: teacher [ln 3, 0] → p = [¾, ¼]; student [ln 3, 0] → CE = H(¾, ¼)
    teacher = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]]])
    student = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]]])
    mask = torch.tensor([[False, True]])  # one masked token
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    kw = dict(student_temp=1.0, teacher_temp=1.0)
    center = torch.zeros(2)
    assert ibot_loss(student, teacher, center, mask, **kw).item() == pytest.approx(h, abs=1e-6)
    assert ibot_loss(student, teacher, center, mask, plus_plus=True, **kw).item() == pytest.approx(
        (math.log(2) + h) / 2, abs=1e-6
    )
    # centring by [ln 3, 0] makes token 1's teacher uniform: CE = −½ ln ¾ − ½ ln ¼
    centered = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    got = ibot_loss(student, teacher, torch.tensor([[[math.log(3), 0.0]]]), mask, **kw)
    assert got.item() == pytest.approx(centered, abs=1e-6)


def test_ibot_default_temps_and_reductions():
    torch.manual_seed(8)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    c = torch.randn(5) * 0.1
    ce = -(F.softmax((t - c) / 0.04, -1) * F.log_softmax(s / 0.1, -1)).sum(-1)  # [2, 3]
    mask = torch.tensor([[True, False, False], [True, True, True]])
    per_image = (ce[0, 0] + ce[1].mean()) / 2  # iBOT: mean per image, then over images
    assert ibot_loss(s, t, c, mask).item() == pytest.approx(per_image.item(), rel=1e-5)
    assert ibot_loss(s, t, c, mask, per_image=False).item() == pytest.approx((ce[mask].sum() / 4).item(), rel=1e-5)
    assert ibot_loss(s, t, c, mask, plus_plus=True).item() == pytest.approx(ce.mean().item(), rel=1e-5)
    # an image with nothing masked contributes 0 (clamped count), not NaN
    none = torch.tensor([[False, False, False], [True, True, True]])
    assert ibot_loss(s, t, c, none).item() == pytest.approx((ce[1].mean() / 2).item(), rel=1e-5)


def test_ibot_teacher_detached():
    torch.manual_seed(9)
    s = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, requires_grad=True)
    c = torch.zeros(4, requires_grad=True)
    ibot_loss(s, t, c, torch.ones(2, 3, dtype=torch.bool), plus_plus=True).backward()
    assert t.grad is None and c.grad is None and s.grad is not None


def test_update_center_math():
    center = torch.zeros(1, 1, 2)
    teacher = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # mean over B, P = [2, 3]
    new = update_center(center, teacher)
    assert new.shape == (1, 1, 2)
    assert new.flatten().tolist() == pytest.approx([0.2, 0.3], abs=1e-7)  # 0.9·0 + 0.1·[2, 3]
    new2 = update_center(torch.tensor([1.0, 1.0]), teacher, momentum=0.5)
    assert new2.tolist() == pytest.approx([1.5, 2.0], abs=1e-7)
    assert center.flatten().tolist() == [0.0, 0.0]  # pure: input untouched


def test_ibot_gradcheck_float64():
    torch.manual_seed(10)
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    c = torch.randn(4, dtype=torch.float64) * 0.1
    mask = torch.tensor([[True, False, True], [False, False, True]])
    for pp in (False, True):
        assert torch.autograd.gradcheck(lambda x, pp=pp: ibot_loss(x, t, c, mask, 0.1, 0.04, plus_plus=pp), (s,))


# ----------------------------------------------------------------------------- schedules and EMA


def test_teacher_temp_schedule():
    assert teacher_temp_schedule(0, 10) == pytest.approx(0.04)
    assert teacher_temp_schedule(5, 10) == pytest.approx(0.055)
    assert teacher_temp_schedule(10, 10) == pytest.approx(0.07)
    assert teacher_temp_schedule(1000, 10) == pytest.approx(0.07)
    assert teacher_temp_schedule(0, 0) == pytest.approx(0.07)
    assert teacher_temp_schedule(2, 4, start=0.1, end=0.2) == pytest.approx(0.15)


def test_ema_update_momentum_endpoints():
    torch.manual_seed(11)
    src, tgt = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {k: v.clone() for k, v in tgt.state_dict().items()}
    ema_update(tgt, src, 1.0)  # keep
    for k, v in tgt.state_dict().items():
        assert torch.equal(v, before[k])
    ema_update(tgt, src, 0.5)
    for k, v in tgt.state_dict().items():
        torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * src.state_dict()[k])
    ema_update(tgt, src, 0.0)  # copy
    for k, v in tgt.state_dict().items():
        assert torch.equal(v, src.state_dict()[k])
    assert all(p.grad is None and p.grad_fn is None for p in tgt.parameters())
    with pytest.raises(ValueError):
        ema_update(tgt, nn.Linear(3, 2, bias=False), 0.9)


def test_ema_momentum_schedule():
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(100, 100) == pytest.approx(1.0)
    assert ema_momentum(50, 100) == pytest.approx(0.998)
    assert ema_momentum(500, 100) == pytest.approx(1.0)
    assert ema_momentum(0, 10, base=0.9, final=0.99) == pytest.approx(0.9)
