"""Linear CKA (centred kernel alignment), freeze-align's measure of how alike two
embedding spaces are; it ranks candidate image/text encoder pairs before any training."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Tensor:
    """CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F) on column-centred X `[..., n, d₁]`,
    Y `[..., n, d₂]` (rows are the same n samples; leading dims batch independent pairs).

    In [0, 1]; 1 for X = Y; unchanged by orthogonal transforms and isotropic scaling of
    either side (not by arbitrary invertible linear maps). Computed in float64; numpy arrays and
    tensors alike (a float tensor back either way)."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape[-2] != y.shape[-2]:
        raise ValueError(f"linear_cka needs the same samples on both sides: {x.shape[-2]} vs {y.shape[-2]} rows")
    x = x.double() - x.double().mean(-2, keepdim=True)
    y = y.double() - y.double().mean(-2, keepdim=True)
    cross = (y.transpose(-1, -2) @ x).square().sum((-2, -1))
    norm_x = (x.transpose(-1, -2) @ x).square().sum((-2, -1)).sqrt()
    norm_y = (y.transpose(-1, -2) @ y).square().sum((-2, -1)).sqrt()
    return cross / (norm_x * norm_y)
