"""A method is one file: a new module, discovered by the registry, brings its own config section,
checks and loss, and runs by name, with no other file touched."""

import math
import sys

import pytest
import torch

import raytrain.methods as registry
from raytrain.config import ConfigError, make_config
from raytrain.methods import build_method, list_methods
from raytrain.train.engines.ddp import DDPEngine

TOY = '''
"""A toy method: CLIP's loss times a factor from its own section."""

from pydantic import Field

from raytrain.config import Section
from raytrain.losses.contrastive import clip_loss
from raytrain.methods import register_method
from raytrain.methods.base import Method


class ToyConfig(Section):
    factor: float = Field(2.0, gt=0, description="the loss multiplier")


@register_method("toy")
class Toy(Method):
    section, settings = "toy", ToyConfig

    @classmethod
    def check(cls, cfg):
        if cfg.toy.factor > 1 and cfg.loss.order:
            raise ValueError("toy.factor > 1 wants loss.order=0")

    def forward(self, batch, epoch):
        u, v, scale = self.embed(batch)
        loss = self.cfg.toy.factor * clip_loss(u, v, scale)
        return loss, {"clip": loss.detach()}
'''


@pytest.fixture
def toy_method(tmp_path):
    (tmp_path / "toy_method.py").write_text(TOY)
    registry.__path__.append(str(tmp_path))
    registry.discover()
    yield "toy"
    registry.__path__.remove(str(tmp_path))
    registry._METHODS.pop("toy", None)
    sys.modules.pop("raytrain.methods.toy_method", None)


def test_a_new_module_is_a_new_method(toy_method, tmp_path):
    assert "toy" in list_methods()
    small = ["data.image_size=16", "model.image.patch=8", "model.image.width=16", "model.image.heads=2"]
    small += ["model.text.width=16", "model.text.heads=2", "model.embed_dim=8", "optim.warmup_steps=0"]
    cfg = make_config({"method": "toy", "toy": {"factor": 0.5}}, small)
    assert cfg.toy.factor == 0.5
    with pytest.raises(ConfigError, match="toy.factor > 1 wants loss.order=0"):
        make_config({"method": "toy"})  # its own check, with the generic loss.order default 1
    with pytest.raises(ConfigError, match="unknown config key 'toy.factr'.*did you mean 'toy.factor'"):
        make_config({}, ["toy.factr=1"])

    from raytrain.tune.sweep import load_space  # a sweep of it validates like any other

    space = tmp_path / "toy.yaml"
    space.write_text("name: toy\nconfig: {method: toy, toy: {factor: 0.5}}\ngrid: {seed: [0, 1]}\n")
    space.write_text(space.read_text() + "group: seed\nmetrics: [loss]\nprimary: loss\nmode: min\n")
    _, base, trials = load_space(space)
    assert base.method == "toy" and len(trials) == 2

    torch.manual_seed(0)
    method = build_method(cfg, vocab_size=30)
    engine = DDPEngine(method, cfg, total_steps=5, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = {"pixels": torch.randn(8, 3, 16, 16, generator=g), "tokens": torch.randint(1, 30, (8, 6), generator=g)}
    losses = []
    for _ in range(5):
        loss, logs = engine(batch, 1.0)
        engine.step(loss)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
