"""DCLIP: the meta-teacher's parts (region scores, cross-attention modes, temperature-scaled
aggregation) on hand-computed cases, the student objective, phase 2's frozen parts, what each
ablation switch changes, and one real two-phase trial through run_trial on a tiny dataset."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL

from raytrain import checkpoint
from raytrain.config import ConfigError, make_config
from raytrain.losses.contrastive import clip_loss
from raytrain.losses.dclip import dclip_student_loss
from raytrain.methods import build_method
from raytrain.methods.dclip import DCLIP, meta_embedding
from raytrain.models.meta_teacher import MetaTeacher, temperature_pool

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_MODEL,
    "teachers.dinov3.image_size=16",
    "teachers.dinov3.grid=2",
    "cache.use=true",
    "cache.teachers=[dinov3,text,text_tokens,yolo]",
    "dclip.meta.heads=4",
]


def batch(n=6, k=3, length=5):
    """A cache-fed batch: tiny DINOv3 (64-d, 4 scales, grid 2), text teacher (384-d), k regions."""
    g = torch.Generator().manual_seed(1)
    return {
        "pixels": torch.randn(n, 3, 16, 16, generator=g),
        "tokens": torch.randint(4, 30, (n, 6), generator=g),
        "dinov3_cls": torch.randn(n, 64, generator=g),
        "dinov3_multiscale": torch.randn(n, 4, 4, 64, generator=g),
        "text": F.normalize(torch.randn(n, 384, generator=g), dim=-1),
        "text_tokens": torch.randn(n, length, 384, generator=g),
        "text_mask": (torch.arange(length) < torch.tensor([5, 1, 3, 5, 2, 4])[:n, None]).float(),
        "yolo_conf": torch.rand(n, k, generator=g),
        "yolo_area": torch.rand(n, k, generator=g),
        "yolo_valid": torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 1]])[:n, :k].float(),
        "yolo_crops": torch.randn(n, k, 64, generator=g),
    }


def config(*overrides):
    return make_config({}, TINY + list(overrides))


def build(*overrides):
    torch.manual_seed(0)
    return build_method(config(*overrides), 30)


def phase1_checkpoint(tmp_path) -> str:
    """A phase-1 checkpoint directory as the train loop writes it (weights + config)."""
    cfg = config("method=dclip_meta", "train.eval=false")
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "phase1", {"engine": {"model": build_method(cfg, 30).state_dict()}}, cfg)
    return str(tmp_path / "phase1")


def small_meta(mode="bidirectional", clusters=1, weights=(1 / 3, 1 / 3, 1 / 3)):
    cfg = config(
        f"dclip.meta.cross_attention={mode}",
        f"dclip.meta.clusters={clusters}",
        "dclip.meta.heads=2",
        f"dclip.meta.region_weights=[{','.join(map(str, weights))}]",
    ).dclip.meta
    torch.manual_seed(0)
    return MetaTeacher(cfg, image_dim=6, text_dim=8).eval()


def small_inputs(b=2, k=3, length=4):
    g = torch.Generator().manual_seed(2)
    return dict(
        image=torch.randn(b, 6, generator=g),
        regions=torch.randn(b, k, 6, generator=g),
        valid=torch.tensor([[True, False, True], [False, False, False]]),
        tokens=torch.randn(b, length, 8, generator=g),
        token_mask=torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]]),
        text=F.normalize(torch.randn(b, 8, generator=g), dim=-1),
        conf=torch.rand(b, k, generator=g),
        area=torch.rand(b, k, generator=g),
    )


# ---------------------------------------------------------------- meta-teacher parts


def test_temperature_pool_hand_computed():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True, False]])  # the third token is padding
    s = math.e / (1 + math.e)  # softmax([1, 0]): cosines 1 and 0 at τ = 1
    torch.testing.assert_close(
        temperature_pool(x, valid, torch.tensor([[3.0, 0.0]]), 1.0), torch.tensor([[s, 2 * (1 - s)]])
    )
    s2 = math.exp(2) / (1 + math.exp(2))  # τ = 0.5 doubles the logits
    torch.testing.assert_close(
        temperature_pool(x, valid, torch.tensor([[1.0, 0.0]]), 0.5), torch.tensor([[s2, 2 * (1 - s2)]])
    )
    # two clusters, their pools averaged: (s, 2(1−s)) and (1−s, 2s) → (½, 1)
    two = temperature_pool(x, valid, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 1.0)
    torch.testing.assert_close(two, torch.tensor([[0.5, 1.0]]))


def test_region_scores_hand_computed():
    meta = small_meta()
    r = torch.tensor([[[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0, 0, 0], [-2.0, 0, 0, 0, 0, 0, 0, 0]]])
    text = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]])  # cosines 1, 0, −1
    conf, area = torch.tensor([[0.9, 0.3, 0.6]]), torch.tensor([[0.3, 0.3, 0.3]])
    got = meta.scores(r, text, conf, area, torch.tensor([[True, True, True]]))
    torch.testing.assert_close(got, torch.tensor([[2.2 / 3, 0.2, 0.0]]))  # (0.6 − 0.7) / 3 < 0 is clamped
    assert meta.scores(r, text, conf, area, torch.tensor([[True, False, True]]))[0, 1] == 0  # invalid: 0


def test_scores_weight_the_region_embeddings():
    """Weights (1, 0, 0) with confidence 1 give every region weight 1: exactly the unscored
    model; another confidence changes the output."""
    meta, x = small_meta(weights=(1, 0, 0)), small_inputs()
    unscored = meta(**{**x, "conf": None, "area": None})
    torch.testing.assert_close(meta(**{**x, "conf": torch.ones(2, 3)}), unscored)
    assert not torch.allclose(meta(**{**x, "conf": torch.full((2, 3), 0.5)})[0], unscored[0])


@pytest.mark.parametrize("mode", ["bidirectional", "text_to_regions", "average", "none"])
def test_meta_teacher_shapes_and_masks(mode):
    meta, x = small_meta(mode, clusters=3), small_inputs()
    out = meta(**x)
    assert out.shape == (2, 8) and torch.isfinite(out).all() and torch.allclose(out.norm(dim=-1), torch.ones(2))
    # what the masks hide does not matter: invalid regions (all of sample 1's) and padded tokens
    hidden = dict(
        x,
        regions=torch.where(x["valid"][..., None], x["regions"], 100.0),
        tokens=torch.where(x["token_mask"][..., None] > 0, x["tokens"], -100.0),
    )
    torch.testing.assert_close(meta(**hidden), out)


def test_cross_attention_modes_have_the_parts_they_say():
    modes = ("bidirectional", "text_to_regions", "average", "none")
    parts = {m: {n.split(".")[0] for n, _ in small_meta(m).named_parameters()} for m in modes}
    assert parts["bidirectional"] == {"project", "text_to_regions", "regions_to_text", "queries", "log_scale"}
    assert parts["text_to_regions"] == parts["bidirectional"] - {"regions_to_text"}
    assert parts["average"] == parts["none"] == {"project", "queries", "log_scale"}


def test_cross_attention_modes_change_what_they_say():
    x = small_inputs()
    v, v_ok = torch.randn(2, 4, 8), torch.tensor([[True, True, False, True], [True, False, False, False]])
    t, t_ok = x["tokens"], x["token_mask"].bool()
    # text_to_regions: the regions do not attend, the text does; bidirectional: both do
    pooled, ok = small_meta("text_to_regions").attend(v, v_ok, t, t_ok)
    assert (
        torch.equal(pooled[:, :4], v)
        and not torch.allclose(pooled[:, 4:], t)
        and torch.equal(ok, torch.cat([v_ok, t_ok], 1))
    )
    assert not torch.allclose(small_meta("bidirectional").attend(v, v_ok, t, t_ok)[0][:, :4], v)
    # average (No Bidir): hand-computed masked means
    avg, _ = small_meta("average").attend(v, v_ok, t, t_ok)
    t_mean = torch.stack([t[0, :3].mean(0), t[1, 0]])
    v_mean = torch.stack([v[0, [0, 1, 3]].mean(0), v[1, 0]])
    torch.testing.assert_close(avg, torch.cat([(v + t_mean[:, None]) / 2, (t + v_mean[:, None]) / 2], 1))
    # none (No CMA): the regions alone; the text never reaches the output (unscored regions)
    meta = small_meta("none")
    assert torch.equal(meta.attend(v, v_ok, t, t_ok)[0], v)
    plain = dict(x, conf=None, area=None)
    torch.testing.assert_close(meta(**dict(plain, tokens=-x["tokens"], text=-x["text"])), meta(**plain))


def test_heads_must_divide_the_text_width():
    with pytest.raises(ValueError, match="dclip.meta.heads 3 does not divide the text teacher's width 8"):
        MetaTeacher(config("dclip.meta.heads=3").dclip.meta, 6, 8)


# ---------------------------------------------------------------- losses


def test_student_loss_hand_computed():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    clip = math.log(1 + math.exp(-1))  # scale 1, w = u: each row's CE is −log(e/(e+1))
    e = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # cosines to u: 1, 0 → distill ½
    f, f0 = torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([[1.0, -1.0], [3.0, 0.0]])  # cosines 0, 1 → anchor ½
    loss, parts = dclip_student_loss(u, u, 1.0)
    assert loss.item() == pytest.approx(clip, abs=1e-6) and set(parts) == {"clip"}
    loss, parts = dclip_student_loss(u, u, 1.0, e, 0.4, f, f0, 0.2)
    assert loss.item() == pytest.approx(clip + 0.4 * 0.5 + 0.2 * 0.5, abs=1e-6)
    assert parts["distill"].item() == pytest.approx(0.5) and parts["anchor"].item() == pytest.approx(0.5)
    e.requires_grad_(True)
    dclip_student_loss(u.clone().requires_grad_(True), u, 1.0, e, 1.0)[0].backward()
    assert e.grad is None  # the teacher is detached


def test_phase1_is_infonce_of_the_meta_teacher_against_the_text():
    method, b = build("method=dclip_meta", "train.eval=false"), batch()
    loss, logs = method(b, 1.0)
    want = clip_loss(meta_embedding(method.meta, b, "yolo"), b["text"], method.meta.logit_scale())
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and not hasattr(method, "student")
    loss.backward()
    assert all(p.grad is not None for p in method.meta.parameters())
    assert set(method.state_dict()) == {f"meta.{k}" for k in method.meta.state_dict()}


# ---------------------------------------------------------------- phase 2


def test_phase2_teachers_are_frozen_and_not_saved(tmp_path):
    path = phase1_checkpoint(tmp_path)
    method = build(
        f"dclip.teacher_checkpoint={path}", "dclip.anchor_weight=0.5", "dclip.distill_weight=2", "method=dclip"
    )
    saved, _ = checkpoint.load(path)
    for k, v in method.frozen_parts["meta"].state_dict().items():
        assert torch.equal(v, saved["engine"]["model"][f"meta.{k}"]), k  # loaded from phase 1
    b = batch()
    loss, logs = method(b, 1.0)
    assert logs["anchor"].item() == pytest.approx(0, abs=1e-6)  # the anchor is the phase-start encoder
    f = method.student.image(b["pixels"])[0]
    u = F.normalize(method.image_proj(f), dim=-1)
    want, _ = dclip_student_loss(
        u,
        b["text"],
        method.student.logit_scale(),
        meta_embedding(method.frozen_parts["meta"], b, "yolo"),
        2.0,
        f,
        method.frozen_parts["anchor"](b["pixels"])[0],
        0.5,
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in method.frozen_parts.parameters())
    assert all(p.grad is None for p in method.student.text.parameters())  # the text side is the text teacher
    assert all(p.grad is not None for p in [*method.student.image.parameters(), *method.image_proj.parameters()])
    assert not any(k.startswith(("teacher.", "text_teacher.")) for k in method.state_dict())
    torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1.0).step()
    assert method(b, 1.0)[1]["anchor"] > 1e-4  # the student moved, its anchor did not
    assert build(f"dclip.teacher_checkpoint={path}", "method=dclip").load_state_dict(method.state_dict())


def test_phase2_starts_from_a_given_checkpoint(tmp_path):
    cfg = config("method=clip")
    clip = build("method=clip")
    with torch.no_grad():
        clip.student.image.head.weight.add_(1.0)
    checkpoint.save(tmp_path / "clip", {"engine": {"model": clip.state_dict()}}, cfg)
    method = build(
        "method=dclip", "dclip.distill=false", "dclip.anchor_weight=1", f"dclip.init_checkpoint={tmp_path / 'clip'}"
    )
    for (n, a), b in zip(clip.student.state_dict().items(), method.student.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(method.frozen_parts["anchor"].head.weight, clip.student.image.head.weight)


def test_phase2_refuses_a_missing_or_mismatched_teacher(tmp_path):
    with pytest.raises(ValueError, match="dclip.teacher_checkpoint is not set"):
        build("method=dclip")
    with pytest.raises(FileNotFoundError, match="is not a raytrain checkpoint directory"):
        build("method=dclip", f"dclip.teacher_checkpoint={tmp_path / 'nothing'}")
    path = phase1_checkpoint(tmp_path)
    with pytest.raises(
        ValueError, match="dclip.meta.cross_attention: checkpoint has 'bidirectional', config wants 'none'"
    ):
        build("method=dclip", f"dclip.teacher_checkpoint={path}", "dclip.meta.cross_attention=none")


def test_requirements_are_checked():
    with pytest.raises(ConfigError, match="dclip reads yolo from the teacher cache: put yolo in cache.teachers"):
        config("method=dclip", "cache.teachers=[dinov3,text,text_tokens]")
    with pytest.raises(
        ConfigError, match="dclip reads dinov3, text, text_tokens, yolo from the teacher cache: set cache"
    ):
        config("method=dclip", "cache.use=false")
    config(
        "method=dclip", "cache.teachers=[dinov3,text,text_tokens]", "dclip.meta.regions=grid"
    )  # No YOLO needs no YOLO
    config("method=dclip", "cache.teachers=[text]", "dclip.distill=false")  # No Teacher: the text teacher alone
    with pytest.raises(ConfigError, match="dclip_meta .* has no evaluation"):
        config("method=dclip_meta")


# ---------------------------------------------------------------- ablation switches


def test_regions_switch_picks_the_inputs():
    b = batch()
    moved_yolo = dict(b, yolo_crops=b["yolo_crops"] + 1, yolo_conf=1 - b["yolo_conf"])
    moved_grid = dict(b, dinov3_multiscale=b["dinov3_multiscale"] + 1)
    for regions, same, changed in (("yolo", moved_grid, moved_yolo), ("grid", moved_yolo, moved_grid)):
        meta = build("method=dclip_meta", "train.eval=false", f"dclip.meta.regions={regions}").meta
        out = meta_embedding(meta, b, regions)
        torch.testing.assert_close(meta_embedding(meta, same, regions), out)
        assert not torch.allclose(meta_embedding(meta, changed, regions), out)


def test_no_teacher_is_plain_infonce_fine_tuning():
    method = build("method=dclip", "dclip.distill=false")
    b = batch()
    loss, logs = method(b, 1.0)
    assert (
        len(method.frozen_parts) == 0
        and DCLIP.preceding_stage(method.cfg) is None
        and set(logs) == {"clip", "logit_scale"}
    )
    plain = clip_loss(method.encode_images(b["pixels"]), b["text"], method.student.logit_scale())
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_ablation_rows_change_only_what_they_switch(tmp_path):
    """Every row of tune_spaces/dclip_ablations.yaml: phase 1 is declared unless No Teacher,
    and both phases start from the full model's weights except for the parts switched."""
    from raytrain.tune.sweep import load_space, trial_overrides

    space, base, _ = load_space(
        ROOT / "tune_spaces/dclip_ablations.yaml", ["grid.seed=[0]", "teachers.dinov3.path=null"]
    )
    rows = {}
    for variant in space.variants:
        cfg = trial_overrides({"variant": variant, "seed": 0}, space.variants, base)
        stage = DCLIP.preceding_stage(cfg)
        assert (stage is None) == (variant == "no_teacher")
        phase1 = None
        if stage is not None:
            stage_cfg, key = stage
            assert key == "dclip.teacher_checkpoint" and stage_cfg.method == "dclip_meta" and not stage_cfg.train.eval
            assert stage_cfg.train.epochs == cfg.dclip.teacher_epochs
            assert stage_cfg.override({"method": "dclip", "train.epochs": cfg.train.epochs, "train.eval": True}) == cfg
            torch.manual_seed(123)  # the caller's RNG state must not matter
            phase1 = build_method(stage_cfg, 50).state_dict()
            out = tmp_path / variant
            checkpoint.save(out, {"engine": {"model": phase1}}, stage_cfg)
            cfg = cfg.override({key: str(out)})
        torch.manual_seed(321)
        rows[variant] = phase1, build_method(cfg, 50).state_dict()
    for variant, (phase1, phase2) in rows.items():
        for full, other in zip(rows["full"], (phase1, phase2)):
            if other is not None:
                shared = set(full) & set(other)
                assert shared and [k for k in sorted(shared) if not torch.equal(full[k], other[k])] == [], variant


# ---------------------------------------------------------------- both phases as one trial


def test_two_phases_run_as_one_trial(tmp_path, ray_local, monkeypatch):
    """A one-trial sweep of method=dclip: phase 1 (dclip_meta) then phase 2 as two Ray Train
    runs inside run_trial, on the embedded data with the teacher cache (an untrained YOLOv8);
    phase 2 distils phase 1's final checkpoint and is evaluated with the text teacher."""
    from raytrain.tune.sweep import run_sweep

    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    space = tmp_path / "space.yaml"
    space.write_text(
        "name: dclip_check\n"
        "config: {method: dclip, data: {n_train: 32, n_eval: 16},\n"
        "  teachers: {text: {max_tokens: 8}, yolo: {top_k: 2}},\n"
        "  cache: {use: true, teachers: [dinov3, text, text_tokens, yolo], batch_size: 32},\n"
        "  model: {image: {width: 16, heads: 2, patch: 8}, text: {width: 16, heads: 2}, embed_dim: 8},\n"
        "  dclip: {teacher_epochs: 2, meta: {heads: 4}},\n"
        "  train: {epochs: 1, batch_size: 16, report_every: 2, cpus_per_worker: 0.45},\n"
        "  run: {max_concurrent_trials: 1}}\n"
        "grid: {seed: [0]}\ngroup: seed\nmetrics: [mean_r@1, distill]\nprimary: mean_r@1\n"
    )
    report = run_sweep(space, [f"data.root={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}"])
    trials = pd.read_csv(Path(report).parent / "trials.csv")
    assert (trials["status"] == "TERMINATED").all(), trials["error"].tolist()
    assert 0 <= trials["mean_r@1"].iloc[0] <= 1 and trials["distill"].iloc[0] > 0
    runs = tmp_path / "runs" / Path(report).parent.name / "train_runs"
    phase1 = [d for d in runs.iterdir() if d.name.endswith("-dclip_meta")]
    main = [d for d in runs.iterdir() if d.is_dir() and not d.name.endswith("-dclip_meta")]
    assert len(phase1) == len(main) == 1
    teacher = json.loads(sorted(main[0].glob("checkpoint_*/config.json"))[-1].read_text())["config"]["dclip"][
        "teacher_checkpoint"
    ]
    assert Path(teacher).parent == phase1[0] and (Path(teacher) / "model.pt").is_file()
    phase1_config = json.loads((Path(teacher) / "config.json").read_text())["config"]
    assert phase1_config["method"] == "dclip_meta" and phase1_config["train"]["epochs"] == 2
    progress = pd.read_csv(next(Path(report).parent.glob("*/progress.csv")))  # Tune saw phase 2's reports alone
    assert {"distill", "mean_r@1"} <= set(progress.columns) and not any(
        c.startswith("dclip_meta") for c in progress.columns
    )
