"""Tune space files: every trial's config is validated before anything starts."""

from pathlib import Path

import pytest

from raytrain.config import ConfigError
from raytrain.tune.sweep import load_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_validate(path):
    space, base, trials = load_space(path)
    assert trials and space.primary in space.metrics


@pytest.mark.parametrize("profile", sorted((ROOT / "tune_spaces/profiles").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("path", sorted((ROOT / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_profiles_apply_to_every_space(path, profile):
    """A machine profile (scale + resources) composes with any space; CLI overrides still win."""
    space, base, trials = load_space(path, ["train.epochs=2"], [profile])
    _, embedded, embedded_trials = load_space(path)
    assert trials == embedded_trials and base.train.epochs == 2
    assert base.train.use_gpu and base.data.image_size == 224 and base.method == embedded.method
    assert base.teachers.dinov3.path is None  # never the embedded stand-in teacher (a ViT-B pretrained on the driver)
    gpus = base.train.num_workers * base.run.max_concurrent_trials
    assert gpus == 8, "a profile for one 8-GPU node uses its eight GPUs"
    assert base.train.batch_size % base.train.num_workers == 0


def test_profile_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match="profile file .*missing.yaml does not exist"):
        load_space(ROOT / "tune_spaces/order_sweep.yaml", [], [tmp_path / "missing.yaml"])
    (tmp_path / "bad.yaml").write_text("train: {use_gpus: true}\n")
    with pytest.raises(ConfigError, match="use_gpus"):
        load_space(ROOT / "tune_spaces/order_sweep.yaml", [], [tmp_path / "bad.yaml"])


def test_order_sweep_space_and_grid_override():
    space, base, trials = load_space(ROOT / "tune_spaces/order_sweep.yaml", ["grid.seed=[7]", "train.epochs=1"])
    assert [t["loss.order"] for t in trials] == [0, 1, 2, 3, 4, 5]
    assert all(t["seed"] == 7 for t in trials) and base.train.epochs == 1
    assert space.group_labels[0] == "0 (CLIP)" and space.group_labels[1] == "1 (RankCLIP)"


def test_bad_trial_is_rejected_naming_trial_and_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ngrid: {loss.order: [1, 12]}\ngroup: loss.order\nmetrics: [mean_r@1]\nprimary: mean_r@1\n")
    with pytest.raises(
        ConfigError, match=r"(?s)trial \{'loss.order': 12\}.*loss.order: Input should be less than or equal to 8"
    ):
        load_space(path)
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_space(ROOT / "tune_spaces/order_sweep.yaml", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="non-empty list"):
        load_space(ROOT / "tune_spaces/order_sweep.yaml", ["grid.seed=3"])
    path.write_text("name: s\ngrid: {seed: [0]}\ngroup: loss.order\nmetrics: [m]\nprimary: m\nextra: 1\n")
    with pytest.raises(ConfigError, match="extra"):
        load_space(path)
