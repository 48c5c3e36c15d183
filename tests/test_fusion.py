"""raytrain.models.fusion: multi-scale fusion, channel/spatial attention, refiner, conflict gate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raytrain.losses.contrastive import clip_loss
from raytrain.models.encoders import ImageTower, TextTower
from raytrain.models.fusion import (
    ChannelAttention,
    ConflictGate,
    ImageInjection,
    MultiScaleFusion,
    Refiner,
    SpatialAttention,
    TextInjection,
)

B, D, W, E = 4, 24, 16, 12


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _inputs(b=B, layers=3, grid=4, p=16, d=D, w=W, e=E):
    return torch.randn(b, e), torch.randn(b, layers, grid * grid, d), torch.randn(b, p, w)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "layers,grid,p",
    [(1, 1, 1), (2, 2, 16), (3, 4, 16), (4, 4, 64), (4, 4, 4), (2, 3, 49), (4, 2, 36)],
)
@pytest.mark.parametrize("flags", [(True, True, True), (False, False, False), (True, False, True)])
def test_shapes(layers, grid, p, flags):
    f_s, ms, tok = _inputs(layers=layers, grid=grid, p=p)
    fusion = MultiScaleFusion(D, W, E, layers, grid, *flags)
    assert fusion.tokens(ms, tok).shape == (B, grid * grid, W)
    assert fusion(ms, tok).shape == (B, E)
    assert fusion(ms, None).shape == (B, E)  # teacher scales only
    assert fusion.resize_student(tok).shape == (B, grid * grid, W)
    inj = ImageInjection(D, W, E, layers, grid, *flags)
    f, g = inj(f_s, ms, tok, return_gate=True)
    assert f.shape == g.shape == (B, E)


def test_text_injection_shapes():
    t = TextInjection(384, E)
    out, g = t(torch.randn(B, E), torch.randn(B, 384), return_gate=True)
    assert out.shape == g.shape == (B, E)


def test_refiner_shapes_and_heads():
    r = Refiner(W, depth=2, heads=4, num_tokens=9)
    assert r(torch.randn(B, 9, W)).shape == (B, W)
    assert Refiner(96).pool.num_heads == 8  # default heads divide the width
    assert Refiner(W)(torch.randn(B, 5, W)).shape == (B, W)  # no positions: any token count
    with pytest.raises(ValueError, match="divisible"):
        Refiner(W, heads=3)
    with pytest.raises(ValueError, match="9 tokens"):
        r(torch.randn(B, 4, W))


# ---------------------------------------------------------------- channel / spatial attention


def test_channel_attention_constant_features():
    ca = ChannelAttention(8, reduction=4)
    nn.init.zeros_(ca.mlp[2].weight)
    nn.init.constant_(ca.mlp[2].bias, 0.3)  # MLP(anything) = 0.3 → a = σ(0.3 + 0.3)
    x = torch.full((2, 5, 8), 1.7)
    torch.testing.assert_close(ca(x), x * torch.sigmoid(torch.tensor(0.6)), rtol=0, atol=1e-7)


def test_channel_attention_matches_formula():
    ca = ChannelAttention(8, reduction=2)
    x = torch.randn(3, 6, 8)
    mlp = lambda v: ca.mlp[2](torch.relu(ca.mlp[0](v)))  # noqa: E731
    a = torch.sigmoid(mlp(x.mean(1)) + mlp(x.max(1).values))
    torch.testing.assert_close(ca(x), x * a[:, None, :])
    # constant over tokens: avg pool == max pool
    c = torch.randn(3, 1, 8).expand(3, 6, 8)
    torch.testing.assert_close(ca(c), c * torch.sigmoid(2 * mlp(c[:, 0]))[:, None, :])


def test_spatial_attention_constant_features():
    sa = SpatialAttention(7)
    nn.init.zeros_(sa.conv.weight)
    nn.init.constant_(sa.conv.bias, -0.5)
    x = torch.full((2, 16, 5), 3.0)
    torch.testing.assert_close(sa(x), x * torch.sigmoid(torch.tensor(-0.5)), rtol=0, atol=1e-7)


def test_spatial_attention_grid_layout():
    """A delta kernel on the max channel: m[i] = σ(max_c F[i]) token by token, on a non-square
    grid; mean channel with a delta gives σ(mean_c F[i])."""
    sa = SpatialAttention(3)
    x = torch.randn(2, 6, 5)
    with torch.no_grad():
        sa.conv.weight.zero_()
        sa.conv.bias.zero_()
        sa.conv.weight[0, 1, 1, 1] = 1.0
    torch.testing.assert_close(sa(x, (2, 3)), x * torch.sigmoid(x.amax(-1, keepdim=True)))
    with torch.no_grad():
        sa.conv.weight.zero_()
        sa.conv.weight[0, 0, 1, 1] = 1.0
    torch.testing.assert_close(sa.weights(x, (3, 2)), torch.sigmoid(x.mean(-1)))
    # a shifted delta picks the right-hand neighbour on the row-major grid (zero padding)
    with torch.no_grad():
        sa.conv.weight.zero_()
        sa.conv.weight[0, 0, 1, 2] = 1.0
    m = x.mean(-1).view(2, 2, 3)
    expect = torch.cat([m[:, :, 1:], torch.zeros(2, 2, 1)], -1).reshape(2, 6)
    torch.testing.assert_close(sa.weights(x, (2, 3)), torch.sigmoid(expect))
    with pytest.raises(ValueError, match="square"):
        sa(torch.randn(2, 6, 5))
    with pytest.raises(ValueError, match="odd"):
        SpatialAttention(4)


# ---------------------------------------------------------------- fusion internals and switches


def test_resize_student_block_average():
    fusion = MultiScaleFusion(D, 1, E, 1, 2)
    tok = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid, row-major values 0..15
    out = fusion.resize_student(tok).view(2, 2)
    torch.testing.assert_close(out, torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_all_switches_off_is_weighted_merge_then_mean_pool():
    layers, grid = 3, 2
    fusion = MultiScaleFusion(D, W, E, layers, grid, use_channel=False, use_spatial=False, use_refiner=False)
    _, ms, tok = _inputs(layers=layers, grid=grid, p=16)
    with torch.no_grad():
        fusion.merge_logits.copy_(torch.tensor([0.5, -1.0, 2.0, 0.1]))
    w = torch.softmax(fusion.merge_logits.detach(), 0)
    maps = [fusion.scale_proj[i](ms[:, i]) for i in range(layers)] + [fusion.resize_student(tok)]
    merged = sum(w[k] * maps[k] for k in range(layers + 1))
    torch.testing.assert_close(fusion.tokens(ms, tok), merged)
    torch.testing.assert_close(fusion(ms, tok), fusion.proj(merged.mean(1)))
    # teacher only: softmax over the L teacher logits
    wt = torch.softmax(fusion.merge_logits.detach()[:layers], 0)
    torch.testing.assert_close(fusion.tokens(ms, None), sum(wt[k] * maps[k] for k in range(layers)))
    assert isinstance(fusion.channel, nn.Identity) and fusion.spatial is None and fusion.refiner is None


def test_merge_weights_uniform_at_init():
    fusion = MultiScaleFusion(D, W, E, 4, 2)
    torch.testing.assert_close(fusion.merge_weights(), torch.full((5,), 0.2))
    torch.testing.assert_close(fusion.merge_weights(False), torch.full((4,), 0.25))


def test_each_switch_is_identity_when_off():
    _, ms, tok = _inputs(layers=2, grid=2)
    base = MultiScaleFusion(D, W, E, 2, 2, use_channel=False, use_spatial=False, use_refiner=False)
    only_ch = MultiScaleFusion(D, W, E, 2, 2, use_channel=True, use_spatial=False, use_refiner=False)
    only_sp = MultiScaleFusion(D, W, E, 2, 2, use_channel=False, use_spatial=True, use_refiner=False)
    only_ch.load_state_dict(base.state_dict(), strict=False)
    only_sp.load_state_dict(base.state_dict(), strict=False)
    merged = base.tokens(ms, tok)
    torch.testing.assert_close(only_ch.tokens(ms, tok), only_ch.channel(merged))
    torch.testing.assert_close(only_sp.tokens(ms, tok), only_sp.spatial(merged, (2, 2)))
    with_ref = MultiScaleFusion(D, W, E, 2, 2, use_channel=False, use_spatial=False, use_refiner=True)
    with_ref.load_state_dict(base.state_dict(), strict=False)
    torch.testing.assert_close(with_ref(ms, tok), with_ref.proj(with_ref.refiner(merged)))


def test_gate_off_is_plain_residual():
    gate = ConflictGate(E, use_gate=False)
    f_s, f_t = torch.randn(B, E), torch.randn(B, E)
    assert torch.equal(gate(f_s, f_t), f_s)  # still identity at init
    with torch.no_grad():
        gate.alpha.fill_(1.0)
    out, g = gate(f_s, f_t, return_gate=True)
    assert torch.equal(g, torch.ones_like(g))
    torch.testing.assert_close(out, f_s + gate.proj(f_t))


# ---------------------------------------------------------------- conflict gate


def test_gate_init_value_and_cosine_clamp():
    gate = ConflictGate(E, project=False, gate_bias=-4.0)
    f_s = torch.randn(B, E)
    # aligned: cos = 1, zero last layer → g = σ(−4) everywhere
    _, g = gate(f_s, 2.0 * f_s, return_gate=True)
    torch.testing.assert_close(g, torch.full_like(g, torch.sigmoid(torch.tensor(-4.0)).item()))
    with torch.no_grad():
        gate.alpha.fill_(1.0)
        nn.init.normal_(gate.mlp[-1].weight)  # open MLP: only the cosine can close the gate
    # anti-aligned: cos = −1 → clamp 0 → g == 0 and f == f_s even with alpha = 1
    out, g = gate(f_s, -3.0 * f_s, return_gate=True)
    assert torch.equal(g, torch.zeros_like(g))
    assert torch.equal(out, f_s)
    # orthogonal: cos = 0 → closed too
    f_t = torch.randn(B, E)
    f_t = f_t - (f_t * f_s).sum(-1, keepdim=True) / f_s.pow(2).sum(-1, keepdim=True) * f_s
    _, g = gate(f_s, f_t, return_gate=True)
    assert g.abs().max() < 1e-6
    # mixed batch: only the anti-aligned sample is closed
    mixed = torch.stack([f_s[0], -f_s[1], f_s[2], -f_s[3]])
    _, g = gate(f_s, mixed, return_gate=True)
    assert (g[[1, 3]] == 0).all() and (g[[0, 2]] > 0).all()


def test_gate_formula():
    gate = ConflictGate(E, hidden=7)
    with torch.no_grad():
        gate.alpha.normal_()
        nn.init.normal_(gate.mlp[-1].weight, std=0.3)
    f_s, f_t = torch.randn(B, E), torch.randn(B, E)
    p = gate.proj(f_t)
    g = torch.sigmoid(gate.mlp(torch.cat([f_s, p, f_s * p], -1))) * F.cosine_similarity(f_s, p, -1).clamp(0, 1)[:, None]
    out, got = gate(f_s, f_t, return_gate=True)
    torch.testing.assert_close(got, g)
    torch.testing.assert_close(out, f_s + gate.alpha * g * p)


def test_identity_at_init_exact():
    f_s, ms, tok = _inputs()
    for flags in [(True, True, True), (False, False, False)]:
        for use_gate in (True, False):
            inj = ImageInjection(D, W, E, 3, 4, *flags, use_gate=use_gate)
            assert torch.equal(inj(f_s, ms, tok), f_s)
            assert torch.equal(inj(f_s, ms, None), f_s)
    for use_gate in (True, False):
        txt = TextInjection(32, E, use_gate=use_gate)
        t_s = torch.randn(B, E)
        assert torch.equal(txt(t_s, torch.randn(B, 32)), t_s)


class _LinearStudent(nn.Module):
    """Tiny student: Linear image encoder → (f_s, local tokens), Linear text encoder, logit scale."""

    def __init__(self, d_img=20, d_txt=10, p=16):
        super().__init__()
        self.p = p
        self.img = nn.Linear(d_img, E)
        self.tok = nn.Linear(d_img, p * W)
        self.txt = nn.Linear(d_txt, E)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x, y):
        return self.img(x), self.tok(x).view(x.shape[0], self.p, W), self.txt(y)


class _TowerStudent(nn.Module):
    """The real encoders at a tiny size."""

    def __init__(self):
        super().__init__()
        self.image = ImageTower(W, 1, 2, 4, 16, E)  # 4x4 = 16 patch tokens
        self.text = TextTower(W, 1, 2, 50, 8, E, 0)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x, y):
        f_s, tok = self.image(x)
        return f_s, tok, self.text(y)[0]


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["linear", "towers"])
@pytest.mark.parametrize("flags", [(True, True, True), (False, False, False)])
def test_identical_infonce_gradients_at_init(kind, flags):
    n = 6
    if kind == "linear":
        student, x, y = _LinearStudent(), torch.randn(n, 20), torch.randn(n, 10)
    else:
        student, x, y = _TowerStudent(), torch.randn(n, 3, 16, 16), torch.randint(1, 50, (n, 8))
    img = ImageInjection(D, W, E, 3, 4, *flags)
    txt = TextInjection(32, E)
    ms, temb = torch.randn(n, 3, 16, D), torch.randn(n, 32)

    # (a) the student alone
    f_s, _, t_s = student(x, y)
    loss_a = clip_loss(f_s, t_s, student.log_scale.exp())
    loss_a.backward()
    grads_a = _grads(student)
    student.zero_grad(set_to_none=True)

    # (b) with both injections
    f_s, tok, t_s = student(x, y)
    f, t = img(f_s, ms, tok), txt(t_s, temb)
    loss_b = clip_loss(f, t, student.log_scale.exp())
    loss_b.backward()
    grads_b = _grads(student)

    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, ga in grads_a.items():
        gb = grads_b[name]
        if ga is None:  # a student output the loss does not use alone (local tokens):
            assert gb is None or torch.equal(gb, torch.zeros_like(gb)), name  # exact zeros through the branch
        else:
            assert torch.equal(ga, gb), name
    # the branch can open: alpha gets a non-zero gradient, and nothing else in the branch
    # does at init (it is all multiplied by alpha = 0)
    for inj in (img, txt):
        assert inj.gate.alpha.grad is not None and inj.gate.alpha.grad.abs().sum() > 0
        for name, p in inj.named_parameters():
            if name != "gate.alpha" and p.grad is not None:
                assert p.grad.abs().sum() == 0, name


def test_one_step_on_alpha_opens_the_branch():
    f_s, ms, tok = _inputs()
    t_s, temb = torch.randn(B, E), torch.randn(B, 32)
    img, txt = ImageInjection(D, W, E, 3, 4), TextInjection(32, E)
    opt = torch.optim.SGD([img.gate.alpha, txt.gate.alpha], lr=1.0)
    clip_loss(img(f_s, ms, tok), txt(t_s, temb), 10.0).backward()
    opt.step()
    assert img.gate.alpha.abs().sum() > 0 and txt.gate.alpha.abs().sum() > 0
    with torch.no_grad():
        assert not torch.equal(img(f_s, ms, tok), f_s)
        assert not torch.equal(txt(t_s, temb), t_s)


def test_open_branch_trains_every_parameter():
    f_s, ms, tok = _inputs()
    tok.requires_grad_(True)
    img = ImageInjection(D, W, E, 3, 4)
    with torch.no_grad():
        img.gate.alpha.fill_(1.0)
        nn.init.normal_(img.gate.mlp[-1].weight, std=0.1)
        f_s = img.teacher_feature(ms, tok) + 0.1 * f_s  # agreeing student: the gate is open
    f_s.requires_grad_(True)
    img(f_s, ms, tok).pow(2).sum().backward()
    for name, p in img.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert tok.grad is not None and tok.grad.abs().sum() > 0  # student tokens are not detached


def test_teacher_inputs_are_detached():
    f_s, ms, tok = _inputs()
    ms.requires_grad_(True)
    temb = torch.randn(B, 32, requires_grad=True)
    img, txt = ImageInjection(D, W, E, 3, 4), TextInjection(32, E)
    with torch.no_grad():
        img.gate.alpha.fill_(1.0)
        txt.gate.alpha.fill_(1.0)
    f_s = f_s.requires_grad_(True)
    (img(f_s, ms, tok).sum() + txt(f_s, temb).sum()).backward()
    assert ms.grad is None and temb.grad is None
    assert f_s.grad is not None


# ---------------------------------------------------------------- validation


def test_shape_errors():
    f_s, ms, tok = _inputs(layers=3, grid=4, p=16)
    fusion = MultiScaleFusion(D, W, E, 3, 4)
    with pytest.raises(ValueError, match="L, grid"):
        fusion(ms[:, :2], tok)  # wrong number of scales
    with pytest.raises(ValueError, match="L, grid"):
        fusion(ms[:, :, :9], tok)  # wrong grid
    with pytest.raises(ValueError, match="L, grid"):
        fusion(ms[..., :5], tok)  # wrong teacher dim
    with pytest.raises(ValueError, match="L, grid"):
        fusion(ms[0], tok)  # missing batch
    with pytest.raises(ValueError, match="square"):
        fusion(ms, tok[:, :15])
    with pytest.raises(ValueError, match="student tokens"):
        fusion(ms, tok[..., :5])
    with pytest.raises(ValueError, match="batch"):
        fusion(ms, tok[:2])
    inj = ImageInjection(D, W, E, 3, 4)
    with pytest.raises(ValueError, match="f_s"):
        inj(f_s[:, :5], ms, tok)
    with pytest.raises(ValueError, match="batch"):
        inj(f_s[:2], ms, tok)
    with pytest.raises(ValueError, match="text-teacher"):
        TextInjection(32, E)(torch.randn(B, E), torch.randn(B, 31))
    with pytest.raises(ValueError, match="ChannelAttention"):
        ChannelAttention(8)(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="positive"):
        MultiScaleFusion(D, W, E, 0, 4)
    with pytest.raises(ValueError, match="positive"):
        ConflictGate(0)
