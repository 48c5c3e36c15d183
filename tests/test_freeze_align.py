"""freeze-align: the paper's projectors (shapes, the residual branch, how local and global
parts combine), its CLIP loss on a hand-computed case, frozen encoders that are neither trained
nor saved, training on a fixed batch, and one real trial of tune_spaces/freeze_align.yaml."""

import math
from pathlib import Path

import pytest
import torch

from raytrain.config import ConfigError, make_config
from raytrain.losses.contrastive import clip_loss
from raytrain.methods import build_method
from raytrain.methods.freeze_align import FreezeAlignConfig
from raytrain.models.projectors import FreezeAlignProjectors, TokenProjector
from raytrain.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "method=freeze_align",
    "cache.use=true",
    "cache.teachers=[dinov3,text_tokens]",
    "data.image_size=16",
    "teachers.dinov3.image_size=16",
    "teachers.dinov3.grid=2",
    "teachers.text.max_tokens=8",
    "freeze_align.embed_dim=16",
]


def batch(n=8, seed=0):
    """What the cache delivers: tiny DINOv3 (64-d, 4 scales, grid 2) and MiniLM tokens (384-d)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "pixels": torch.randn(n, 3, 16, 16, generator=g),
        "tokens": torch.zeros(n, 6, dtype=torch.long),
        "dinov3_cls": torch.randn(n, 64, generator=g),
        "dinov3_multiscale": torch.randn(n, 4, 4, 64, generator=g),
        "text_tokens": torch.randn(n, 8, 384, generator=g),
        "text_mask": (torch.arange(8) < torch.randint(1, 9, (n, 1), generator=g)).float(),
    }


def build(*overrides):
    torch.manual_seed(0)
    return build_method(make_config({}, TINY + list(overrides)), 30)


def test_projector_shapes_and_parts():
    p = TokenProjector(12, 6, hidden=10)
    assert p(torch.randn(3, 5, 12)).shape == (3, 5, 6) and p(torch.randn(3, 12)).shape == (3, 6)
    assert p.branch[0].out_features == 10 and p.branch[2].in_features == 10
    proj = FreezeAlignProjectors(64, 384, FreezeAlignConfig(embed_dim=16, hidden=32))
    u = proj.encode_image(torch.randn(4, 64), torch.randn(4, 9, 64))
    v = proj.encode_text(torch.randn(4, 7, 384), torch.ones(4, 7))
    assert u.shape == v.shape == (4, 16)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(4)), torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))
    assert proj.text_head[0].out_features == 32 and proj.logit_scale().item() == pytest.approx(1 / 0.07)
    only_cls = FreezeAlignProjectors(64, 384, FreezeAlignConfig(local_tokens=False, text_head=False))
    assert only_cls.image_local is None and only_cls.text_head is None and only_cls.image_cls is not None
    with pytest.raises(ValueError, match="local_tokens and cls_token are both off"):
        FreezeAlignConfig(local_tokens=False, cls_token=False)


def test_residual_branch_at_init():
    """P(x) = W x̂ + W₂ GELU(W₁ x̂): switching the branch off leaves W's initial weights as
    they were (its own stream) and the output the linear branch alone."""
    x = torch.randn(5, 3, 64)
    on = FreezeAlignProjectors(64, 384, FreezeAlignConfig(), seed=3).eval()
    off = FreezeAlignProjectors(64, 384, FreezeAlignConfig(residual=False), seed=3).eval()
    assert off.image_local.branch is None and off.image_local.norm.weight.shape == (64,)
    for name in ("image_local", "image_cls", "text_tokens"):
        a, b = getattr(on, name), getattr(off, name)
        assert torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias), name
    with torch.no_grad():
        normed = torch.nn.functional.layer_norm(x, (64,))
        torch.testing.assert_close(off.image_local(x), off.image_local.linear(normed))
        branch = on.image_local(x) - off.image_local(x)
        torch.testing.assert_close(branch, on.image_local.branch(normed))
    assert branch.abs().mean() > 1e-2  # the non-linear branch is live from the start


def _set(linear, weight):
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        linear.bias.zero_()


def test_clip_loss_on_hand_computed_embeddings():
    """Two pairs, linear token projectors, τ = 1. LayerNorm maps a 2-d token (p, q), p ≠ q, to
    ±(1, −1). Image: u = normalize(P_cls(CLS) + mean P_local(patches)); with W_cls = e₁e₁ᵀ and
    W_local = I, pair 1 has CLS (3, 1) and patches (1, 3), (2, 0): u₁ = e₁ + mean(−e₁+e₂, e₁−e₂) = e₁;
    pair 2 has CLS (2, 0) and patches (0, 2) twice: u₂ = normalize(e₁ − e₁ + e₂) = e₂ (a sum of the
    patches instead of the mean would give (−1, 2)). Text: masked mean of P_text (the padding
    tokens would cancel the real one), then Linear-GELU-Linear with identities: t₁ ∝ (g(1), g(−1)),
    t₂ ∝ (g(−1), g(1)), g(x) = x Φ(x). So S = [[a, b], [b, a]] / ‖(a, b)‖ with a = g(1),
    b = g(−1), and every row and column of the CLIP loss is log(1 + exp(−(a − b) / ‖(a, b)‖))."""
    cfg = FreezeAlignConfig(embed_dim=4, residual=False, dropout=0.0)
    proj = FreezeAlignProjectors(2, 2, cfg).eval()
    e = [[1, 0], [0, 1], [0, 0], [0, 0]]
    _set(proj.image_cls.linear, [[1, 0], [0, 0], [0, 0], [0, 0]])
    _set(proj.image_local.linear, e)
    _set(proj.text_tokens.linear, e)
    for layer in (proj.text_head[0], proj.text_head[2]):
        _set(layer, torch.eye(4).tolist())
    with torch.no_grad():
        proj.log_scale.zero_()
    cls = torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    patches = torch.tensor([[[1.0, 3.0], [2.0, 0.0]], [[0.0, 2.0], [0.0, 2.0]]])
    tokens = torch.tensor([[[3.0, 1.0], [-50.0, 50.0]], [[0.0, 2.0], [9.0, -9.0]]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    with torch.no_grad():
        u, t = proj.encode_image(cls, patches), proj.encode_text(tokens, mask)
        loss = clip_loss(u, t, proj.logit_scale())
    torch.testing.assert_close(u, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    a, b = 0.5 * (1 + math.erf(1 / math.sqrt(2))), -0.5 * (1 + math.erf(-1 / math.sqrt(2)))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-(a - b) / math.hypot(a, b))), abs=1e-5)  # 0.2708


def test_forward_is_clip_on_cached_cls_and_last_scale():
    method = build().eval()
    b = batch()
    loss, logs = method(b, 1.0)
    p = method.projectors
    u = p.encode_image(b["dinov3_cls"], b["dinov3_multiscale"][:, -1])
    want = clip_loss(u, p.encode_text(b["text_tokens"], b["text_mask"]), p.logit_scale())
    assert loss.item() == pytest.approx(want.item()) and logs["logit_scale"].item() == pytest.approx(1 / 0.07)
    b["dinov3_multiscale"][:, :-1] = 0  # only the last scale is read
    assert method(b, 1.0)[0].item() == pytest.approx(loss.item())


def test_frozen_encoders_get_no_gradients_and_are_not_saved():
    method = build()
    assert not hasattr(method, "student") and method.teacher is None and method.text_teacher is None
    method(batch(), 1.0)[0].backward()
    captions = ["a red circle", "a small striped blue square left of a large solid green star"]
    pixels, tokens = batch(2)["pixels"], torch.zeros(2, 6, dtype=torch.long)
    method.eval()  # as the training loop evaluates
    with torch.no_grad():
        images, texts = method.encode_images(pixels), method.encode_texts(tokens, captions)
    assert images.shape == texts.shape == (2, 16)
    method.train()
    assert not method.teacher.training and not method.text_teacher.training  # frozen: eval mode always
    method.zero_grad()
    (
        method.encode_images(pixels) @ method.encode_texts(tokens, captions).T
    ).sum().backward()  # through the live encoders
    assert method.projectors.image_cls.linear.weight.grad.abs().sum() > 0
    assert method.projectors.text_tokens.linear.weight.grad.abs().sum() > 0
    for encoder in (method.teacher, method.text_teacher):  # built by evaluation, live
        assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    # evaluation runs the outputs the cache holds (CLS, last scale; the first max_tokens tokens)
    # through the same projectors
    out = method.teacher(pixels)
    feats, mask = method.text_teacher.encode_tokens(captions, 8)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(images, method.projectors.encode_image(out.cls, out.multiscale[:, -1]))
        torch.testing.assert_close(texts, method.projectors.encode_text(feats, mask))
    state = method.state_dict()
    assert state and all(k.startswith("projectors.") for k in state)
    fresh = build()
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    method = build("optim.lr=1e-2", "optim.weight_decay=0")
    optimizer = build_optimizer(method.cfg.optim, method)
    b, losses = batch(16), []
    for _ in range(15):
        loss, _ = method(b, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_config_needs_the_cached_encoders():
    with pytest.raises(
        ConfigError, match="freeze_align reads dinov3, text_tokens from the teacher cache: set cache.use=true"
    ):
        make_config({}, ["method=freeze_align"])
    with pytest.raises(ConfigError, match="text_tokens in cache.teachers"):
        make_config({}, ["method=freeze_align", "cache.use=true", "cache.teachers=[dinov3,text]"])
    with pytest.raises(ConfigError, match="freeze_align.*both off"):
        make_config({}, TINY + ["freeze_align.local_tokens=false", "freeze_align.cls_token=false"])


def test_space_trains_through_the_sweep(tmp_path, ray_local):
    """One real trial of the shipped space on a tiny embedded dataset: the cache is built
    (DINOv3 + text tokens), the projectors train from it and evaluation runs both encoders live."""
    import pandas as pd

    from raytrain.tune.sweep import run_sweep

    report = run_sweep(
        ROOT / "tune_spaces/freeze_align.yaml",
        [
            "grid.variant=[full]",
            "grid.seed=[0]",
            f"data.root={tmp_path / 'data'}",
            "data.n_train=64",
            "data.n_eval=16",
            "teachers.dinov3.path=null",
            "train.epochs=1",
            "train.batch_size=16",
            "train.report_every=4",
            "optim.warmup_steps=2",
            "run.max_concurrent_trials=1",
            f"run.storage_path={tmp_path / 'runs'}",
        ],
    )
    trials = pd.read_csv(Path(report).parent / "trials.csv")
    assert len(trials) == 1 and (trials["status"] == "TERMINATED").all(), trials["error"].tolist()
    for metric in ("mean_r@1", "zs_top1", "binding"):
        assert 0 <= trials[metric].iloc[0] <= 1, metric
