"""The typed config tree: YAML → dotted overrides, rejected early with the key named."""

import pytest

from raytrain.config import Config, ConfigError, load_config, make_config, parse_overrides
from raytrain.train.optim import lr_factor


def test_defaults_validate_and_override():
    cfg = make_config({}, ["loss.order=3", "optim.lr=1e-3", "model.image.width=48", "data.mean=[0.1,0.2,0.3]"])
    assert isinstance(cfg, Config)
    assert (cfg.loss.order, cfg.optim.lr, cfg.model.image.width, cfg.data.mean) == (3, 1e-3, 48, (0.1, 0.2, 0.3))
    assert cfg.override({"seed": 4}).seed == 4 and cfg.seed == 0  # a new config; the old one is untouched


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: {order: 2}\ntrain: {epochs: 3}\n")
    cfg = load_config(path, ["train.epochs=5"])
    assert (cfg.loss.order, cfg.train.epochs) == (2, 5)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lrr=1"], "optim.lrr"),  # unknown key, with a suggestion below
        (["los.order=1"], "los.order"),
        (["loss.order=-1"], "loss.order"),  # out of range
        (["loss.order=9"], "loss.order"),
        (["optim.lr=0"], "optim.lr"),
        (["train.batch_size=101", "train.num_workers=2"], "batch_size 101 is not divisible"),
        (["model.image.width=50", "model.image.heads=3"], "model.image"),
        (["method=nope"], "unknown method 'nope'"),
        (["loss.order.x=1"], "is a value, not a section"),
        (["nonsense"], "key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        make_config({}, overrides)
    assert needle in str(err.value)


def test_suggestion_and_nested_yaml_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        make_config({}, ["optim.lrr=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epoch: 3}\n")
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_parse_overrides_yaml_values():
    assert parse_overrides(["a=1", "b=[0, 1]", "c=null", "d=text"]) == {"a": 1, "b": [0, 1], "c": None, "d": "text"}


def test_lr_schedule_warmup_then_cosine():
    cfg = make_config({}, ["optim.warmup_steps=10"])
    assert lr_factor(cfg.optim, 0, 100) == pytest.approx(0.1)
    assert lr_factor(cfg.optim, 9, 100) == pytest.approx(1.0)
    assert lr_factor(cfg.optim, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cfg.optim, 55, 100) == pytest.approx(0.5)
    assert lr_factor(cfg.optim, 100, 100) == pytest.approx(0.0)
