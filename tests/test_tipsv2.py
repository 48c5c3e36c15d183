"""TIPSv2 (docs/methods.md#tipsv2): the student's patch masking, the losses on
hand-computed cases, iBOT vs iBOT++, the EMA teacher (schedule, no gradients, checkpointed),
caption sampling, a few training steps, the config checks and a sweep on the embedded data."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from raytrain.config import ConfigError, make_config
from raytrain.losses.distill import ema_momentum, ibot_loss, patch_distill
from raytrain.methods import build_method
from raytrain.methods.tipsv2 import PrototypeHead, random_masks, run_steps, sample_captions
from raytrain.models.encoders import ImageTower, pool_tokens
from raytrain.train.engines import DDPEngine

TINY = [
    "method=tipsv2",
    "model.image.width=16",
    "model.image.heads=2",
    "model.image.patch=8",
    "model.text.width=16",
    "model.text.heads=2",
    "model.embed_dim=8",
    "data.image_size=32",
    "data.context_length=6",
    "teachers.dinov3.grid=2",
    "data.extra_captions=[caption_short]",
    "cache.use=true",
    "tipsv2.prototypes=16",
    "tipsv2.head_hidden=16",
    "tipsv2.head_bottleneck=8",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more threads only contend on a busy 2-core machine (50× slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(*overrides):
    torch.manual_seed(0)
    return build_method(make_config({}, TINY + list(overrides)), 30)


def batch(n=6):
    """A cache-fed batch: 32×32 images (a 4×4 student grid), the tiny DINOv3's outputs."""
    g = torch.Generator().manual_seed(0)
    return {
        "pixels": torch.randn(n, 3, 32, 32, generator=g),
        "tokens": torch.randint(4, 30, (n, 6), generator=g),
        "tokens_caption_short": torch.randint(4, 30, (n, 6), generator=g),
        "dinov3_cls": torch.randn(n, 64, generator=g),
        "dinov3_multiscale": torch.randn(n, 4, 4, 64, generator=g),
    }


# ----------------------------------------------------------------------------- student masking


def test_image_tower_mask_replaces_patches_and_no_mask_changes_nothing():
    torch.manual_seed(0)
    tower = ImageTower(16, 2, 2, 8, 32, 8)
    x = torch.randn(2, 3, 32, 32)
    f, tokens = tower(x)
    assert f.shape == (2, 8) and tokens.shape == (2, 16, 16)
    token = torch.nn.Parameter(torch.randn(16))
    for out in (tower(x, None, None), tower(x, torch.zeros(2, 16, dtype=torch.bool), token)):  # nothing masked
        assert torch.equal(out[0], f) and torch.equal(out[1], tokens)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 0] = True  # the top-left 8×8 patch
    masked = tower(x, mask, token)
    assert not torch.allclose(masked[1], tokens)
    y = x.clone()
    y[:, :, :8, :8] = 5.0  # a masked patch's pixels no longer reach the output
    again = tower(y, mask, token)
    assert torch.equal(again[0], masked[0]) and torch.equal(again[1], masked[1])
    masked[1].sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0  # the mask token learns
    with pytest.raises(ValueError, match="mask must be"):
        tower(x, mask)  # no token
    with pytest.raises(ValueError, match="mask must be"):
        tower(x, mask[:, :4], token)


def test_pool_tokens_hand():
    tokens = torch.arange(16.0).view(1, 16, 1)  # a 4×4 grid, row-major
    assert pool_tokens(tokens, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_tokens(tokens, 4).flatten().tolist() == tokens.flatten().tolist()
    with pytest.raises(ValueError, match="square"):
        pool_tokens(torch.zeros(1, 6, 2), 2)


def test_random_masks_counts_probability_and_seed():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    exact = random_masks(50, 16, (0.25, 0.25), 1.0, g())
    assert exact.shape == (50, 16) and exact.dtype == torch.bool and (exact.sum(1) == 4).all()
    assert not random_masks(50, 16, (0.1, 0.5), 0.0, g()).any()
    m = random_masks(4000, 16, (0.1, 0.5), 0.5, g())
    counts = m.sum(1)
    assert set(counts.tolist()) <= set(range(0, 9))  # round(r·16), r ≤ 0.5
    assert (counts > 0).float().mean().item() == pytest.approx(0.5, abs=0.03)  # half the images
    assert m[counts > 0].float().mean(0).std() < 0.03  # positions uniform
    assert torch.equal(m, random_masks(4000, 16, (0.1, 0.5), 0.5, g()))


# ----------------------------------------------------------------------------- losses, hand-computed


def test_patch_distill_of_pooled_tokens_hand():
    # student 2×2 grid pooled to 1×1: mean([1,0],[1,0],[0,1],[0,1]) = [½, ½]; teacher [1, 0]:
    # cos = ½ / (√½ · 1) = 1/√2 → L = 1 − 1/√2
    student = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[3.0, 0.0]]])
    assert patch_distill(pool_tokens(student, 1), teacher).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)


def test_ibot_and_ibot_plus_plus_differ_exactly_by_the_visible_tokens():
    # B = 1, P = 3, K = 2, temperatures 1, center 0; token 2 masked.
    # token 0: teacher [½, ½], student [½, ½] → ℓ = ln 2
    # token 1: teacher [¾, ¼], student [½, ½] → ℓ = ln 2
    # token 2: teacher [¼, ¾], student [¾, ¼] → ℓ = −(¼ ln ¾ + ¾ ln ¼)
    ln3 = math.log(3)
    teacher = torch.tensor([[[0.0, 0.0], [ln3, 0.0], [0.0, ln3]]])
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [ln3, 0.0]]], requires_grad=True)
    mask = torch.tensor([[False, False, True]])
    kw = dict(student_temp=1.0, teacher_temp=1.0, center=torch.zeros(2), mask=mask)
    l2 = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    ibot, plus = ibot_loss(student, teacher, **kw), ibot_loss(student, teacher, plus_plus=True, **kw)
    assert ibot.item() == pytest.approx(l2, abs=1e-6)
    assert plus.item() == pytest.approx((2 * math.log(2) + l2) / 3, abs=1e-6)
    assert 3 * plus.item() - 1 * ibot.item() == pytest.approx(2 * math.log(2), abs=1e-6)  # P·L++ − M·L = Σ visible ℓ
    (grad_ibot,) = torch.autograd.grad(ibot, student)
    (grad_plus,) = torch.autograd.grad(plus, student)
    assert grad_ibot[0, :2].abs().sum() == 0 and grad_plus[0, :2].abs().sum() > 0  # only iBOT++ trains visible tokens
    torch.testing.assert_close(grad_plus[0, 2], grad_ibot[0, 2] / 3)  # the masked token's term, reweighted 1/M → 1/P


def test_prototype_head_is_cosine_to_prototypes():
    torch.manual_seed(1)
    head = PrototypeHead(16, 32, 8, 5)
    x = torch.randn(2, 3, 16)
    logits = head(x)
    want = F.normalize(head.mlp(x), dim=-1) @ F.normalize(head.prototypes, dim=-1).T
    assert logits.shape == (2, 3, 5) and torch.allclose(logits, want) and logits.abs().max() <= 1 + 1e-6


def test_method_loss_is_the_weighted_sum_of_its_terms():
    method = build("tipsv2.patch_weight=0.5", "tipsv2.ibot_weight=2.0")
    loss, logs = method(batch(), 1.0)
    assert logs["patch_distill"] > 0 and logs["ibot"] > 0
    assert loss.item() == pytest.approx(
        (logs["clip"] + 0.5 * logs["patch_distill"] + 2.0 * logs["ibot"]).item(), rel=1e-6
    )
    assert logs["teacher_temp"] == pytest.approx(0.04) and logs["ema_momentum"] == pytest.approx(0.996)
    only_clip = build("tipsv2.patch_weight=0", "tipsv2.ibot_weight=0")
    assert (
        only_clip.head is None
        and only_clip.project is None
        and not any(k.startswith("ema.") for k in only_clip.state_dict())
    )
    assert set(only_clip(batch(), 1.0)[1]) == {"clip", "logit_scale"}


def test_ema_of_the_full_tower_starts_as_the_head_only_ema():
    """At initialization the EMA tower equals the student's, so both scopes give one loss."""
    head, full = build(), build("tipsv2.ema_scope=full")
    assert any(k.startswith("ema.image.") for k in full.state_dict()) and not any(
        k.startswith("ema.image.") for k in head.state_dict()
    )
    assert full(batch(), 1.0)[0].item() == pytest.approx(head(batch(), 1.0)[0].item(), rel=1e-5)


# ----------------------------------------------------------------------------- the EMA teacher


def _train_step(method, lr=0.05):
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=lr)
    loss, _ = method(batch(), 1.0)
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("scope", ["head", "full"])
def test_after_step_moves_the_ema_by_the_scheduled_momentum(scope):
    method = build(f"tipsv2.ema_scope={scope}", "tipsv2.ema_momentum=[0.5,1.0]", "tipsv2.ema_steps=4")
    sources = {"head": method.head, "image": method.student.image}
    assert list(method.ema.parameters()) == [] and not any(b.requires_grad for b in method.ema.buffers())
    trained = {id(p) for p in method.parameters() if p.requires_grad}
    assert not trained & {id(b) for b in method.ema.buffers()}  # the optimizer never sees the EMA
    for step, momentum in enumerate([0.5, 1 - 0.5 * (1 + math.cos(math.pi / 4)) / 2]):  # cosine 0.5 → 1 over 4 steps
        assert ema_momentum(step, 4, 0.5, 1.0) == pytest.approx(momentum)
        _train_step(method)
        assert all(b.grad is None for b in method.ema.buffers())
        before = {n: {k: v.clone() for k, v in m.named_buffers()} for n, m in method.ema.items()}
        student = {n: dict(sources[n].named_parameters()) for n in method.ema}
        assert any(
            not torch.equal(before["head"][k], student["head"][k]) for k in before["head"]
        )  # the head moved away
        method.after_step()
        for name, ema in method.ema.items():
            for k, v in ema.named_buffers():
                torch.testing.assert_close(v, momentum * before[name][k] + (1 - momentum) * student[name][k].detach())
        assert int(method.steps) == step + 1


def test_ema_state_is_saved_and_resumed():
    method = build()
    for _ in range(2):
        _train_step(method)
        method.after_step()
    state = method.state_dict()
    assert int(state["steps"]) == 2 and state["center"].abs().sum() > 0
    assert {k for k in state if k.startswith("ema.head.")} == {
        f"ema.head.{k}" for k, _ in method.head.named_parameters()
    }
    assert not any(k.startswith("teacher.") for k in state)
    fresh = build()
    assert not torch.equal(fresh.ema["head"].prototypes, method.ema["head"].prototypes)  # the trained EMA moved
    fresh.load_state_dict(state)
    for k, v in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # the schedules and draws continue where they were: the same loss on the next step
    assert fresh(batch(), 1.0)[0].item() == method(batch(), 1.0)[0].item()


# ----------------------------------------------------------------------------- caption sampling


def test_caption_sampling_distribution_rows_and_determinism():
    n = 20000
    a, b = torch.zeros(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.long)
    tokens, choice = sample_captions([a, b], (3.0, 1.0), torch.Generator().manual_seed(0))
    assert tokens.shape == (n, 3) and torch.equal(tokens[:, 0], choice)  # row i comes from granularity choice_i
    assert (choice == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    again, _ = sample_captions([a, b], (3.0, 1.0), torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
    assert (sample_captions([a, b], (0.0, 1.0), torch.Generator().manual_seed(0))[1] == 1).all()


def test_method_draws_are_reproducible_per_step():
    method = build("tipsv2.caption_weights=[1,1]")

    def draw(step):
        return sample_captions(
            [batch()["tokens"], batch()["tokens_caption_short"]], (1, 1), method.generator(step, "captions")
        )[1]

    assert torch.equal(draw(3), draw(3)) and not all(torch.equal(draw(3), draw(s)) for s in range(4, 8))
    # both granularities reach the loss: its value depends on which caption was drawn
    loss = lambda *o: build(*o)(batch(), 1.0)[1]["clip"].item()  # noqa: E731
    assert loss("tipsv2.captions=[caption]") != loss("tipsv2.captions=[caption_short]")


# ----------------------------------------------------------------------------- training and config


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    cfg = make_config({}, TINY + ["optim.lr=3e-3", "optim.warmup_steps=0", "tipsv2.ema_steps=12"])
    torch.manual_seed(0)
    method = build_method(cfg, 30)
    engine = DDPEngine(method, cfg, 12, torch.device("cpu"))  # calls after_step like a real run
    ema0 = method.ema["head"].prototypes.clone()
    losses = []
    for _ in range(12):
        loss, logs = engine(batch(8), 1.0)
        engine.step(loss)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) < sum(losses[:3]), losses
    assert int(method.steps) == 12 and not torch.equal(method.ema["head"].prototypes, ema0)
    assert logs["teacher_temp"] > 0.04  # warming up towards 0.07


def test_config_checks_name_the_key():
    with pytest.raises(
        ConfigError, match=r"tipsv2.captions reads \['caption_short'\]: add them to data.extra_captions"
    ):
        make_config({}, ["method=tipsv2"])
    ok = ["method=tipsv2", "data.extra_captions=[caption_short]"]
    with pytest.raises(
        ConfigError, match="tipsv2.patch_weight reads dinov3 from the teacher cache: put dinov3 in cache.teachers"
    ):
        make_config({}, ok + ["cache.use=true", "cache.teachers=[text]"])
    with pytest.raises(ConfigError, match="tipsv2.ema_steps"):
        make_config({}, ok + ["data.path=/data/laion"])
    make_config({}, ok + ["data.path=/data/laion", "tipsv2.ema_steps=1000"])
    with pytest.raises(ConfigError, match="tipsv2: .*caption_weights"):
        make_config({}, ok + ["tipsv2.caption_weights=[1]"])
    with pytest.raises(ConfigError, match="tipsv2: .*mask_ratio"):
        make_config({}, ok + ["tipsv2.mask_ratio=[0.5,0.1]"])
    with pytest.raises(ConfigError, match="tipsv2.ema_scope"):
        make_config({}, ok + ["tipsv2.ema_scope=backbone"])


def test_run_steps_counts_like_the_training_loop():
    cfg = make_config({}, TINY + ["data.n_train=100", "train.batch_size=16", "train.epochs=3"])
    assert run_steps(cfg) == 18 and run_steps(cfg.override({"train.max_steps": 5})) == 5
    assert build("data.n_train=100", "train.batch_size=16", "train.epochs=3").horizon == 18
    assert build("tipsv2.ema_steps=7").horizon == 7


def test_sweep_on_the_embedded_data(tmp_path, ray_local):
    """A one-trial space through the sweep code on the embedded default (generated under
    tmp_path), with the live DINOv3 teacher and the evaluation suite (~45 s on an idle 2-core machine,
    mostly startup)."""
    from raytrain.tune.sweep import run_sweep

    space = tmp_path / "tipsv2.yaml"
    space.write_text(
        "name: tipsv2_smoke\n"
        "config: {method: tipsv2, data: {n_train: 64, n_eval: 16, extra_captions: [caption_short], num_cpus: 0.1},"
        " train: {epochs: 1, batch_size: 16, report_every: 4, cpus_per_worker: 0.45},"
        " run: {max_concurrent_trials: 1}}\n"
        "grid: {tipsv2.ibot_plus_plus: [true]}\ngroup: tipsv2.ibot_plus_plus\n"
        "metrics: [loss, clip, ibot, patch_distill, mean_r@1]\nprimary: mean_r@1\n"
    )
    overrides = [t for t in TINY[1:] if not t.startswith(("data.extra_captions", "cache.", "teachers."))]
    report = run_sweep(
        space,
        overrides + ["cache.use=false", f"data.root={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}"],
    )
    trials = pd.read_csv(Path(report).parent / "trials.csv")
    assert len(trials) == 1 and (trials["status"] == "TERMINATED").all(), trials["error"].tolist()
    for column in ("loss", "clip", "ibot", "patch_distill", "mean_r@1"):
        assert trials[column].map(math.isfinite).all(), column
