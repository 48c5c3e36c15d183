"""The benchmark job runs and writes its tables (speed is measured there, never asserted)."""

import json

from raytrain.bench import run


def test_benchmark_writes_json_and_markdown(tmp_path):
    report = run("embedded", "cpu", steps=1, out=tmp_path)
    assert set(report["cases"]) >= {"clip", "rankclip_R3", "dinorankclip_R3_cached", "dinorankclip_R3_live"}
    assert all(c["step_s"] > 0 and c["tflops_per_step"] > 0 for c in report["cases"].values())
    assert "live_teacher/cached" in report["ratios"] and report["decode_rows_per_s_per_core"] > 0
    assert json.loads((tmp_path / "benchmark-embedded-cpu.json").read_text())["scale"] == "embedded"
    assert "| clip |" in (tmp_path / "benchmark-embedded-cpu.md").read_text()
