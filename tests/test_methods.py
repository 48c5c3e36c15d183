"""Every registered method builds, trains a step on a cache-fed batch and keeps frozen
parts frozen and out of checkpoints; the families nest: an order-0 trial is exactly CLIP,
an order-R model starts as RankCLIP, and DINORANKCLIP starts as RankCLIP at its order."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL

from raytrain.config import make_config
from raytrain.methods import build_method, list_methods
from raytrain.train.optim import build_optimizer

TINY = [
    *TINY_MODEL,
    "teachers.dinov3.image_size=16",
    "teachers.dinov3.grid=2",
    "data.extra_captions=[caption_short]",
    "cache.use=true",
    "cache.teachers=[dinov3,text,text_tokens,yolo]",
]
# what a method needs beyond TINY to build alone: DCLIP's phase 2 distils a phase-1 checkpoint
# (tests/test_dclip.py covers that path) and its phase 1 has no evaluation
NEEDS = {"dclip": ["dclip.distill=false"], "dclip_meta": ["train.eval=false"]}


def batch(n=6):
    """What the cache-fed training stream delivers (tiny DINOv3: 64-d, 4 layers, grid 2)."""
    g = torch.Generator().manual_seed(0)
    return {
        "pixels": torch.randn(n, 3, 16, 16, generator=g),
        "tokens": torch.randint(4, 30, (n, 6), generator=g),
        "tokens_caption_short": torch.randint(4, 30, (n, 6), generator=g),
        "dinov3_cls": torch.randn(n, 64, generator=g),
        "dinov3_multiscale": torch.randn(n, 4, 4, 64, generator=g),
        "text": torch.nn.functional.normalize(torch.randn(n, 384, generator=g), dim=-1),
        "text_tokens": torch.randn(n, 16, 384, generator=g),  # teachers.text.max_tokens = 16
        "text_mask": (torch.arange(16) < torch.randint(1, 17, (n, 1), generator=g)).float(),
        # 3 YOLO regions per image; their crops' features are the tiny DINOv3's
        "yolo_boxes": torch.rand(n, 3, 4, generator=g),
        "yolo_conf": torch.rand(n, 3, generator=g),
        "yolo_area": torch.rand(n, 3, generator=g),
        "yolo_cls": torch.randint(0, 80, (n, 3), generator=g).float(),
        "yolo_valid": (torch.rand(n, 3, generator=g) < 0.6).float(),
        "yolo_crops": torch.randn(n, 3, 64, generator=g),
    }


def build(overrides):
    torch.manual_seed(0)
    return build_method(make_config({}, TINY + overrides), 30)


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("order", [0, 1, 3])
def test_every_method_trains_a_step(name, order):
    method = build([f"method={name}", f"loss.order={order}", *NEEDS.get(name, [])])
    loss, logs = method(batch(), 2.0)
    assert loss.ndim == 0 and torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in logs.values())
    loss.backward()
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}  # a student or heads alone
    assert trainable and [n for n, p in trainable.items() if p.grad is None] == []
    assert not any(k.startswith(("teacher.", "text_teacher.")) for k in method.state_dict())  # never checkpointed
    assert build([f"method={name}", f"loss.order={order}", *NEEDS.get(name, [])]).load_state_dict(method.state_dict())


def test_order_zero_trains_exactly_clip():
    clip, rank0 = build(["method=clip"]), build(["method=rankclip", "loss.order=0"])
    l1, _ = clip(batch(), 3.0)
    l2, _ = rank0(batch(), 3.0)
    l1.backward(), l2.backward()
    assert l1.item() == l2.item()
    for (n, a), (_, b) in zip(clip.named_parameters(), rank0.named_parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_higher_order_starts_as_rankclip():
    """λ_r = 0 at init, so order 4 equals order 1 in value."""
    one, four = build(["loss.order=1"]), build(["loss.order=4"])
    assert four(batch(), 3.0)[0].item() == pytest.approx(
        one(batch(), 3.0)[0].item(), rel=1e-6
    )  # float32 rounding of a ~20 loss


@pytest.mark.parametrize("name", ["rankclip", "dinorankclip"])
def test_transition_lr_scale_and_lambda_logs(name):
    """loss.transition_lr_scale puts the transition terms in their own optimizer groups at
    lr × scale (weight decay on their matrices only); λ_r are logged per ranked modality."""
    method = build([f"method={name}", "loss.order=3", "loss.transition_lr_scale=10", "optim.lr=1e-3"])
    groups = build_optimizer(method.cfg.optim, method, method.lr_scales()).param_groups
    trans = {id(p) for n, p in method.named_parameters() if "_transition." in n}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in method.parameters())
    for g in groups:
        inside = {id(p) in trans for p in g["params"]}
        assert len(inside) == 1  # a group is all transition or all other parameters
        assert g["lr"] == pytest.approx(1e-2 if inside == {True} else 1e-3)
        assert g["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    assert groups[0]["lr"] == pytest.approx(1e-3)  # engines log the first group's lr
    _, logs = method(batch(), 3.0)
    assert {f"{s}_lam{r}" for s in ("image", "text") for r in (2, 3)} <= set(logs)
    assert build([f"method={name}", "loss.order=1"]).lr_scales() == {}  # no transition, one lr


@pytest.mark.parametrize("order", [1, 3])
def test_dinorankclip_starts_as_rankclip(order):
    """Injection is the identity at init: without distillation, DINORANKCLIP's loss and
    student gradients equal RankCLIP's at the same order, both branches on."""
    # seed 1: the conflict gate's cosine factor is positive for some rows of this batch; on
    # some inits (seed 0 here) it is ≤ 0 for every row, the gate is exactly closed and alpha
    # gets no gradient until training turns the student towards the teacher feature
    rank = build(["method=rankclip", f"loss.order={order}", "seed=1"])
    dino = build(["method=dinorankclip", f"loss.order={order}", "dinorankclip.distill=false", "seed=1"])
    dino.student.load_state_dict(rank.student.state_dict())
    if order >= 2:
        dino.image_transition.load_state_dict(rank.image_transition.state_dict())
        dino.text_transition.load_state_dict(rank.text_transition.state_dict())
    lr, _ = rank(batch(), 3.0)
    ld, logs = dino(batch(), 3.0)
    lr.backward(), ld.backward()
    assert ld.item() == pytest.approx(lr.item(), rel=1e-6) and "image_gate" in logs and "text_gate" in logs
    for (n, a), (_, b) in zip(rank.student.named_parameters(), dino.student.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=n)
    assert dino.image_injection.gate.alpha.grad.abs().sum() > 0  # the branch can open


def test_teacher_targets_leave_teacher_frozen():
    method = build(["loss.order=2", "loss.target=teacher", "cache.use=false"])
    loss, _ = method(batch(), 3.0)
    loss.backward()
    assert method.teacher is not None
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    cached = build(["loss.order=2", "loss.target=teacher"])
    assert cached.teacher is None  # the cache supplies the teacher's outputs


def test_dinorankclip_live_teacher_and_eval_injection():
    method = build(
        [
            "method=dinorankclip",
            "loss.order=2",
            "cache.use=false",
            "dinorankclip.text_injection=false",
            "dinorankclip.eval_inject=true",
        ]
    )
    b = batch()
    del b["dinov3_cls"], b["dinov3_multiscale"]
    loss, _ = method(b, 2.0)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    with torch.no_grad():
        emb = method.encode_images(b["pixels"])
    assert emb.shape == (6, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(6))


@pytest.mark.parametrize("eval_inject", [False, True])
def test_dinorankclip_evaluates_both_inference_modes(eval_inject):
    """docs/methods.md#dinorankclip-inference-modes: training's evaluation scores the student alone and with the teacher
    injected; the configured mode is unprefixed. The teacher for injection is built on first
    use (evaluation images are not cached) and equals the one the cache was built with."""
    flags = [
        "dinorankclip.text_injection=false",
        "dinorankclip.gate=false",
        f"dinorankclip.eval_inject={str(eval_inject).lower()}",
    ]
    method = build(["method=dinorankclip", *flags])
    assert method.teacher is None  # training reads the cache
    with torch.no_grad():  # open the residual (zero-init alpha), so that injection changes the embedding
        method.image_injection.gate.alpha.fill_(1.0)
    views = method.evaluations()
    assert list(views) == ["", "student_" if eval_inject else "inject_"]
    pixels = batch()["pixels"]
    with torch.no_grad():
        student, injected = method.embed_images(pixels, False), method.embed_images(pixels, True)
        own, other = (f(pixels) for f, _ in views.values())
    assert not torch.allclose(student, injected)
    assert torch.equal(own, injected if eval_inject else student) and torch.equal(
        other, student if eval_inject else injected
    )
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    plain = build(["method=dinorankclip", "dinorankclip.image_injection=false", "dinorankclip.text_injection=false"])
    assert list(plain.evaluations()) == [""]  # nothing to inject: one mode


def test_method_requirements_are_checked():
    from raytrain.config import ConfigError

    with pytest.raises(
        ConfigError,
        match="dinorankclip.text_injection reads text from the teacher cache: set cache.use=true and put text in",
    ):
        make_config({}, ["method=dinorankclip", "cache.use=false"])
    with pytest.raises(
        ConfigError,
        match="dinorankclip with cache.use=true reads dinov3 from the teacher cache: put dinov3 in cache.teachers",
    ):
        make_config({}, ["method=dinorankclip", "cache.use=true", "cache.teachers=[text]"])
    with pytest.raises(ConfigError, match="loss.target=teacher reads dinov3 from the teacher cache"):
        make_config({}, ["loss.target=teacher", "cache.use=true", "cache.teachers=[text]"])
    make_config({}, ["loss.target=teacher"])  # uncached: the live teacher
    make_config({}, ["loss.target=planted"])
    with pytest.raises(ConfigError, match="loss.target=text_teacher reads text from the teacher cache: set cache.use"):
        make_config({}, ["loss.target=text_teacher"])  # batches hold no caption text for a live teacher
    make_config({}, ["loss.target=text_teacher", "loss.order=0"])  # CLIP ranks nothing
    with pytest.raises(ConfigError, match="add it to data.extra_captions"):
        make_config({}, ["method=alip"])


def test_ablation_switches_keep_every_other_parts_initial_weights():
    """Each row of the ablation table starts from the full model's weights, but for what it
    switches: parts draw their init from their own streams (raytrain.models.init)."""
    from raytrain.tune.sweep import load_space, trial_overrides

    space, base, trials = load_space(
        Path(__file__).resolve().parents[1] / "tune_spaces/ablations.yaml",
        ["grid.seed=[0]", "teachers.dinov3.path=null"],
    )

    def weights(variant):
        cfg = trial_overrides({"variant": variant, "seed": 0}, space.variants, base)
        torch.manual_seed(123)  # the caller's RNG state must not matter either
        return build_method(cfg, 50).state_dict()

    full = weights("full")
    for variant in space.variants:
        other = weights(variant)
        shared = set(full) & set(other)
        assert shared and [k for k in sorted(shared) if not torch.equal(full[k], other[k])] == [], variant


def eval_pairs(n=10):
    g = torch.Generator().manual_seed(1)
    captions = [f"a {c} circle" for c in ("red", "blue", "green", "pink", "grey")] * (n // 5)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(4, 30, (n, 6), generator=g), captions


@pytest.mark.parametrize("target", ["rankclip", "teacher", "planted"])
def test_ranking_evaluation(target):
    """docs/evaluation.md#ranking-nll-and-the-transitions-share: the held-out NLL is
    deterministic (fixed targets, fixed planted draw), nests (order 3 at λ = 0 equals order 1)
    and each transition term's share is std(λ_r·T_r) / std(s), 0 at λ = 0."""
    cfg = ["loss.order=3", f"loss.target={target}", "loss.planted_gamma=2"]
    three, one = build(cfg), build([*cfg, "loss.order=1"])
    pixels, tokens, captions = eval_pairs()
    got = three.ranking_evaluation(pixels, tokens, captions)
    keys = {"rank_nll", "t2_share", "t3_share", "lam2_abs", "lam3_abs"} | (
        {"planted_nll"} if target == "planted" else set()
    )
    assert set(got) == keys and got == three.ranking_evaluation(pixels, tokens, captions)
    assert got["rank_nll"] == pytest.approx(one.ranking_evaluation(pixels, tokens, captions)["rank_nll"], rel=1e-5)
    assert got["t2_share"] == got["t3_share"] == got["lam2_abs"] == 0.0
    with torch.no_grad():
        three.image_transition.lam.copy_(torch.tensor([-2.0, 0.5]))
        three.text_transition.lam.copy_(torch.tensor([1.0, 0.0]))
    moved = three.ranking_evaluation(pixels, tokens, captions)
    assert moved["lam2_abs"] == pytest.approx(1.5) and moved["lam3_abs"] == pytest.approx(0.25)
    assert moved["t2_share"] > 0 and moved["t3_share"] > 0 and moved["rank_nll"] != got["rank_nll"]
    assert set(build(["loss.order=0"]).ranking_evaluation(pixels, tokens, captions)) == {"rank_nll"}


def test_text_teacher_targets_at_evaluation_come_from_the_live_text_teacher():
    """Evaluation captions are not cached: loss.target=text_teacher ranks them by the live text
    teacher's caption-caption similarities (its `text` output, which training reads cached)."""
    from raytrain.losses.targets import ranking_nll
    from raytrain.teachers import build_text

    method = build(["loss.target=text_teacher", "loss.order=1"])
    pixels, tokens, captions = eval_pairs()
    t = build_text(method.cfg.teachers.text).encode(captions)
    with torch.no_grad():
        u, v = method.encode_images(pixels), method.encode_texts(tokens, captions)
        want = ranking_nll(u, v, method.student.logit_scale(), 1, 16, True, t @ t.T)
    assert method.ranking_evaluation(pixels, tokens, captions)["rank_nll"] == pytest.approx(want.item(), rel=1e-5)
    assert method.text_teacher is not None and not any(k.startswith("text_teacher.") for k in method.state_dict())
