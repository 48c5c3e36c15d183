"""Linear CKA: hand-computed value, invariances (orthogonal maps, isotropic scaling),
CKA(X, X) = 1; and freeze-align's toy study end to end at small size."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raytrain.eval.cka import linear_cka
from raytrain.eval.cka_toy import run, toy_pairs

ROOT = Path(__file__).resolve().parents[1]


def test_hand_computed():
    # X = [[1],[0],[-1]] (centred), Y = [[1],[0],[0]] → centred Y = [[2/3],[-1/3],[-1/3]]
    # YᵀX = 2/3 + 1/3 = 1; XᵀX = 2; YᵀY = 4/9 + 1/9 + 1/9 = 2/3 → CKA = 1 / (2 · 2/3) = 0.75
    x, y = torch.tensor([[1.0], [0.0], [-1.0]]), torch.tensor([[1.0], [0.0], [0.0]])
    assert linear_cka(x, y).item() == pytest.approx(0.75)


def test_invariances_and_identity():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(50, 5, generator=g) @ torch.randn(5, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    base = linear_cka(x, y)
    assert linear_cka(x, x).item() == pytest.approx(1.0)
    assert linear_cka(x @ q, y).item() == pytest.approx(
        base.item(), rel=1e-6
    )  # orthogonal transform (x @ q in float32)
    assert linear_cka(3.7 * x, 0.2 * y).item() == pytest.approx(base.item(), rel=1e-6)  # isotropic scaling
    assert linear_cka(x + 5.0, y).item() == pytest.approx(base.item(), rel=1e-6)  # centring
    assert linear_cka(x, y).item() == pytest.approx(linear_cka(y, x).item())  # symmetric
    skew = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1]))
    assert linear_cka(x @ skew, y).item() != pytest.approx(base.item(), rel=1e-3)  # not any linear map
    batched = linear_cka(torch.stack([x, x @ q]), torch.stack([y, y]))
    assert batched.shape == (2,) and torch.allclose(batched, base.expand(2), rtol=1e-6)
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, y[:10])


def test_toy_study_small():
    a, b = toy_pairs(4, n=32, d=16, seed=0)
    assert a.shape == b.shape == (4, 32, 16)
    r = run(instances=64, steps=100, seed=0)
    assert len(r["cka"]) == len(r["min_clip_loss"]) == 64
    assert all(0 < c < 1 for c in r["cka"]) and all(x > 0 for x in r["min_clip_loss"])
    assert r == run(instances=64, steps=100, seed=0)  # deterministic by seed
    assert -1 <= r["pearson_cka_log_loss"] <= 1


def test_toy_study_job_writes_json_and_plot(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/cka_toy_study.py"),
            "--instances",
            "32",
            "--steps",
            "20",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Pearson r(CKA, log min CLIP loss)" in out.stdout
    assert len(json.loads((tmp_path / "cka_toy.json").read_text())["cka"]) == 32
    assert (tmp_path / "cka_vs_clip_loss.png").stat().st_size > 0


def test_select_encoders_ranks_pairs(tmp_path):
    """freeze-align's encoder selection on the embedded data: one row per pair, best first."""
    sys.path.insert(0, str(ROOT / "jobs"))
    from select_encoders import main

    out = tmp_path / "table.csv"
    args = [
        "--image",
        "tiny=tiny",
        "--image",
        "vits16=vits16",
        "--text",
        "minilm=default",
        "--n",
        "64",
        "--out",
        str(out),
        f"data.root={tmp_path / 'data'}",
        "data.n_train=64",
        "data.n_eval=16",
    ]
    assert main(args) == 0
    import pandas as pd

    table = pd.read_csv(out)
    assert list(table["image_encoder"].sort_values()) == ["tiny", "vits16"] and set(table["text_encoder"]) == {"minilm"}
    assert table["cka"].is_monotonic_decreasing and table["cka"].between(0, 1).all() and (table["pairs"] == 64).all()
    assert main(["--image", "nameonly"]) == 2


def test_numpy_arrays_and_tensors_give_the_same_cka():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(50, 6)), g.normal(size=(50, 4))
    assert float(linear_cka(x, y)) == pytest.approx(float(linear_cka(torch.from_numpy(x), torch.from_numpy(y))))
    assert float(linear_cka(x, x.astype(np.float32))) == pytest.approx(1.0)
