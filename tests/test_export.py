"""Export round trip: a checkpoint's student, exported, loads and embeds in a process where
Ray and DeepSpeed cannot be imported, with the same embeddings as the trained student."""

import io
import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from raytrain import checkpoint
from raytrain.cli import main
from raytrain.config import make_config
from raytrain.data.pipeline import prepare
from raytrain.data.transforms import normalize
from raytrain.methods import build_method

TINY = [
    "model.image.width=16",
    "model.image.heads=2",
    "model.image.patch=8",
    "model.text.width=16",
    "model.text.heads=2",
    "model.embed_dim=8",
    "data.image_size=16",
    "data.context_length=8",
    "data.n_train=16",
    "data.n_eval=16",
    "loss.order=2",
]


def test_export_round_trip_without_ray(tmp_path):
    cfg = make_config({}, TINY + [f"data.root={tmp_path / 'data'}"])
    src = prepare(cfg.data)
    tok = src.tokenizer(cfg.data)
    torch.manual_seed(0)
    method = build_method(cfg, tok.vocab_size, tok.pad_id)
    from dataclasses import asdict

    ckpt = checkpoint.save(tmp_path / "ckpt", {"engine": {"model": method.state_dict()}}, cfg, {"source": asdict(src)})
    assert main(["export", str(ckpt), "--out", str(tmp_path / "student")]) == 0

    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    (tmp_path / "img.png").write_bytes(buf.getvalue())
    with torch.no_grad():
        want_img = method.student.encode_image(torch.from_numpy(normalize(img[None], cfg.data.mean, cfg.data.std)))
        want_txt = method.student.encode_text(torch.from_numpy(tok(["a small red circle"], 8)))
    script = f"""
import sys, json
sys.modules["ray"] = None; sys.modules["deepspeed"] = None   # importing either now fails
from raytrain.export import ExportedStudent
m = ExportedStudent.load({str(tmp_path / "student")!r})
print(json.dumps({{"img": m.embed_images([open({str(tmp_path / "img.png")!r}, "rb").read()]).tolist(),
                  "txt": m.embed_texts(["a small red circle"]).tolist()}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["img"], want_img.numpy(), atol=1e-6)
    np.testing.assert_allclose(got["txt"], want_txt.numpy(), atol=1e-6)
    assert (tmp_path / "student" / "model.safetensors").stat().st_size > 0


def test_export_refuses_methods_not_evaluated_by_their_student_alone(tmp_path, capsys):
    from dataclasses import asdict

    from raytrain.methods import list_methods, method_class

    base = make_config({}, TINY + [f"data.root={tmp_path / 'data'}"])
    alone = {name for name in list_methods() if method_class(name).exports_student(base)}
    assert alone == set(list_methods()) - {"dclip", "dclip_meta", "freeze_align"}
    assert not method_class("dinorankclip").exports_student(base.override(["dinorankclip.eval_inject=true"]))

    cfg = base.override(["method=dinorankclip", "dinorankclip.eval_inject=true", "dinorankclip.text_injection=false"])
    src = prepare(cfg.data)
    method = build_method(cfg, src.tokenizer(cfg.data).vocab_size)
    ckpt = checkpoint.save(tmp_path / "ckpt", {"engine": {"model": method.state_dict()}}, cfg, {"source": asdict(src)})
    assert main(["export", str(ckpt), "--out", str(tmp_path / "student")]) == 2
    assert "does not evaluate with its student alone" in capsys.readouterr().err
    assert not (tmp_path / "student").exists()
