"""The learnable temperature of every contrastive head: t = log(1/τ) as a parameter, the logit
scale exp(t) clamped to a maximum (CLIP's 100), so a run cannot sharpen its softmax without end."""

import math

import torch
from torch import Tensor, nn


def log_scale_parameter(init_temperature: float) -> nn.Parameter:
    """t at init: log(1/τ)."""
    return nn.Parameter(torch.tensor(math.log(1 / init_temperature)))


def logit_scale(log_scale: Tensor, max_logit_scale: float) -> Tensor:
    """exp(t) = 1/τ, at most max_logit_scale."""
    return log_scale.clamp(max=math.log(max_logit_scale)).exp()
