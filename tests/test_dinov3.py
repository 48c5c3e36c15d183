"""The frozen DINOv3 teacher: shapes, token bookkeeping, frozenness, determinism, loading."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from raytrain.config import DINOv3Config
from raytrain.teachers import build_dinov3
from raytrain.teachers.dinov3 import IMAGENET_MEAN, IMAGENET_STD, DINOv3Teacher, default_layers


def cfg(**kw):
    """DINOv3Config's fields plus the (not yet added) `layers` / `grid`."""
    base = dict(size="tiny", path=None, image_size=32, layers=None, grid=None)
    return SimpleNamespace(**{**base, **kw})


def images(b=2, size=32, seed=0):
    """Images normalized the way the data pipeline does by default: (x - 0.5) / 0.5."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, size, size, generator=g) - 0.5) / 0.5


@pytest.fixture(scope="module")
def tiny():
    return build_dinov3(DINOv3Config(size="tiny"))


def test_tiny_shapes_and_defaults(tiny):
    out = tiny(images())
    assert (tiny.dim, tiny.num_layers, tiny.layers, tiny.grid) == (64, 4, (1, 2, 3, 4), 4)
    assert out.cls.shape == (2, 64)
    assert out.patches.shape == (2, (32 // 8) ** 2, 64)  # 16 patches: no CLS, no registers
    assert out.multiscale.shape == (2, 4, 16, 64)
    assert all(t.dtype == torch.float32 for t in (out.cls, out.patches, out.multiscale))
    # Another input resolution is resized to teacher.image_size first.
    assert tiny(images(size=48)).patches.shape == (2, 16, 64)


def test_default_layers():
    assert default_layers(12) == (3, 6, 9, 12)
    assert default_layers(24) == (6, 12, 18, 24)
    assert default_layers(4) == (1, 2, 3, 4)


def test_tokens_are_split_as_cls_registers_patches(tiny):
    x = images()
    out = tiny(x)
    raw = tiny.model(tiny.preprocess(x), output_hidden_states=True)
    assert raw.last_hidden_state.shape[1] == 1 + 4 + 16
    torch.testing.assert_close(out.cls, raw.last_hidden_state[:, 0])
    torch.testing.assert_close(out.patches, raw.last_hidden_state[:, 5:])
    # grid == patch grid (4x4): pooling is the identity, so the last scale is the patches.
    torch.testing.assert_close(out.multiscale[:, -1], out.patches)
    # Earlier scales: that block's tokens after the final LayerNorm.
    torch.testing.assert_close(out.multiscale[:, 1], tiny.model.norm(raw.hidden_states[2])[:, 5:])


def test_layers_and_grid_pool_the_patch_map():
    t = DINOv3Teacher(cfg(layers=(2, 4), grid=2))
    out = t(images())
    assert out.multiscale.shape == (2, 2, 4, 64)
    fmap = out.patches.reshape(2, 4, 4, 64)  # row-major patch grid
    torch.testing.assert_close(out.multiscale[:, 1, 0], fmap[:, :2, :2].mean((1, 2)))  # top-left cell
    torch.testing.assert_close(out.multiscale[:, 1, 3], fmap[:, 2:, 2:].mean((1, 2)))  # bottom-right
    with pytest.raises(ValueError, match="layers"):
        DINOv3Teacher(cfg(layers=(0, 5)))


def test_frozen_no_grad_and_stays_in_eval(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())
    student = torch.nn.Linear(64, 64)
    x = images()
    out = tiny(x)
    assert not (out.cls.requires_grad or out.patches.requires_grad or out.multiscale.requires_grad)
    loss = -F.cosine_similarity(student(out.patches), out.patches, dim=-1).mean() + student(out.cls).pow(2).mean()
    loss.backward()
    assert student.weight.grad is not None
    assert all(p.grad is None for p in tiny.parameters())
    # Eval (no RoPE coordinate augmentation) after .train(): outputs do not change.
    torch.testing.assert_close(tiny(x).patches, out.patches, rtol=0, atol=0)


def test_deterministic_and_sizes_differ(tiny):
    again = build_dinov3(DINOv3Config(size="tiny"))
    assert again.fingerprint() == tiny.fingerprint()
    x = images()
    torch.testing.assert_close(again(x).multiscale, tiny(x).multiscale, rtol=0, atol=0)
    small = build_dinov3(DINOv3Config(size="vits16"))
    assert small.fingerprint() != tiny.fingerprint()
    # Same size, other weights -> other fingerprint.
    with torch.no_grad():
        again.model.norm.bias.add_(1e-3)
    assert again.fingerprint() != tiny.fingerprint()


def test_vits16_shapes():
    t = build_dinov3(DINOv3Config(size="vits16", image_size=32))
    assert (t.dim, t.num_layers, t.layers, t.model.config.num_register_tokens) == (384, 12, (3, 6, 9, 12), 4)
    out = t(images(b=1))
    assert out.cls.shape == (1, 384)
    assert out.patches.shape == (1, (32 // 16) ** 2, 384)
    assert out.multiscale.shape == (1, 4, 16, 384)  # 2x2 patch grid pooled (replicated) to 4x4


def test_global_rng_untouched():
    torch.manual_seed(123)
    reference = torch.rand(8)
    torch.manual_seed(123)
    build_dinov3(DINOv3Config(size="tiny"))
    assert torch.equal(torch.rand(8), reference)


def test_from_pretrained_round_trip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    loaded = build_dinov3(DINOv3Config(size="vitl16", path=str(tmp_path)))  # path wins over size
    assert loaded.fingerprint() == tiny.fingerprint()
    x = images()
    a, b = tiny(x), loaded(x)
    for name in ("cls", "patches", "multiscale"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
    assert torch.allclose(loaded.model_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    # Normalization constants come from preprocessor_config.json when it is there.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    other = build_dinov3(DINOv3Config(path=str(tmp_path)))
    assert other.model_std.flatten().tolist() == [0.25] * 3
    assert not torch.allclose(other(x).cls, a.cls)


def test_bad_paths_name_the_path(tmp_path):
    missing = tmp_path / "no_such_teacher"
    with pytest.raises(FileNotFoundError, match="no_such_teacher"):
        build_dinov3(DINOv3Config(path=str(missing)))
    with pytest.raises(ValueError, match="DINOv3"):  # a directory without config.json
        build_dinov3(DINOv3Config(path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=str(tmp_path.name)):
        build_dinov3(DINOv3Config(path=str(tmp_path)))


def test_unnormalizes_the_data_pipeline_stats():
    raw = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    default = DINOv3Teacher(cfg())  # data stats (0.5, 0.5)
    custom = DINOv3Teacher(cfg(), data_mean=mean, data_std=std)
    ref = default((raw - 0.5) / 0.5).cls
    torch.testing.assert_close(custom((raw - m) / s).cls, ref)
    torch.testing.assert_close(default((raw - m) / s, mean, std).cls, ref)  # per-call override
    # And the model sees ImageNet-normalized pixels.
    imagenet = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(default.preprocess((raw - 0.5) / 0.5), imagenet)


def test_image_size_must_fit_the_patch():
    with pytest.raises(ValueError, match="multiple"):
        build_dinov3(DINOv3Config(size="tiny", image_size=36))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_cpu(tiny):
    x = images()
    ref = tiny(x)
    gpu = build_dinov3(DINOv3Config(size="tiny")).cuda()
    out = gpu(x.cuda())
    assert out.patches.dtype == torch.float32 and out.patches.is_cuda
    assert F.cosine_similarity(out.patches.cpu(), ref.patches, dim=-1).min() > 0.98
