"""infra/gpu_check.sh --dry-run: the GPU acceptance script end to end on a CPU machine, every
stage in a tiny CPU form or its command validated, its JSON and Markdown written."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["env", "cuda_tests", "bench_eager", "bench_compiled", "teacher", "sweep"]


def test_dry_run_writes_every_stage(tmp_path):
    run = subprocess.run(
        ["bash", "infra/gpu_check.sh", "--dry-run", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = summary["stages"]
    assert summary["mode"] == "dry" and list(stages) == STAGES
    failed = {k: (s["status"], s["reason"], s["log_tail"]) for k, s in stages.items() if s["status"] != "ok"}
    assert summary["ok"] and not failed, failed  # this machine has Ray: the sweep's config is validated
    assert stages["env"]["results"]["cuda"] is False
    bench = stages["bench_eager"]["results"]
    assert bench["cases"] and bench["loss_cost"]["B32"]["R3_vs_R0"] > 0
    assert "would run:" in "\n".join(stages["bench_compiled"]["log_tail"] + stages["sweep"]["log_tail"])
    assert stages["teacher"]["results"]["teacher"]["build_vs_model"] > 0
    assert all(s["seconds"] > 0 and s["command"] for s in stages.values())
    text = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in text for name in STAGES) and "Teacher cache" in text
