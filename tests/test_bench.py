"""The benchmark job runs and writes its tables (speed is measured there, never asserted)."""

import json
import time

import pytest

from raytrain.bench import _consume, ingest, loss_cost, run


def test_benchmark_writes_json_and_markdown(tmp_path):
    report = run("embedded", "cpu", steps=1, out=tmp_path, skip=["ingest"], loss_batches=(16,))
    assert set(report["cases"]) >= {"clip", "rankclip_R3", "dinorankclip_R3_cached", "dinorankclip_R3_live"}
    assert all(c["step_s"] > 0 and c["tflops_per_step"] > 0 for c in report["cases"].values())
    assert "live_teacher/cached" in report["ratios"] and report["decode_rows_per_s_per_core"]["224px"] > 0
    assert report["threads"] == 1  # the CPU default: one thread, as a sweep trial's worker
    assert report["loss_cost"]["B16"]["R3_vs_R0"] > 0
    assert json.loads((tmp_path / "benchmark-embedded-cpu.json").read_text())["scale"] == "embedded"
    text = (tmp_path / "benchmark-embedded-cpu.md").read_text()
    assert "| clip |" in text and "Ranking objective" in text


def test_meta_device_counts_flops_only(tmp_path):
    report = run("paper", "meta", out=tmp_path, cases=["clip", "rankclip_R3"])
    assert set(report) >= {"cases", "ratios"} and not {"loss_cost", "ingest", "decode_rows_per_s_per_core"} & set(
        report
    )
    clip, rank = report["cases"]["clip"], report["cases"]["rankclip_R3"]
    assert "step_s" not in clip and 50 < clip["gflops_per_sample"] < rank["gflops_per_sample"] < 200


def test_loss_cost_measures_and_skips_what_would_not_fit():
    out = loss_cost("cpu", (8, 16), orders=(0, 3), repeats=1, max_case_s=1e-9)
    b8 = out["B8"]
    assert b8["R0"]["s"] > 0 and b8["R3"]["runs"] == 1 and b8["R3_vs_R0"] > 0 and b8["exp_pass_s"] > 0
    assert b8["R3"]["peak_bytes"] is None or b8["R3"]["peak_bytes"] > 0
    assert "projected from B8" in out["B16"]["R3"]["skipped"]  # any time is over a limit of 1e-9 s
    assert "R3_vs_R0" not in out["B16"]


def test_consume_times_first_batch_waits_and_steps():
    def slow(n, wait):
        for _ in range(n):
            time.sleep(wait)
            yield {"tokens": [0] * 4}

    stepped = []
    out = _consume([slow(3, 0.05), slow(2, 0.01)], lambda b: len(b["tokens"]), stepped.append)
    assert out["batches"] == len(stepped) == 5
    assert out["time_to_first_batch_s"] >= 0.05
    assert out["fetch_p99_s"] >= 0.04 and out["rows_per_s"] > 0 and 0 < out["data_wait_share"] <= 1
    assert out["epoch_start_s"] >= 0.01 and out["in_epoch_rows_per_s"] > out["rows_per_s"]


def test_consume_separates_epoch_starts():
    """A slow start of each epoch lowers rows/s but not the rows/s within epochs."""

    def epoch(start_wait):
        time.sleep(start_wait)
        yield from ({"tokens": [0] * 4} for _ in range(5))

    out = _consume([epoch(0.0), epoch(0.2), epoch(0.2)], lambda b: len(b["tokens"]))
    assert out["batches"] == 15 and 0.19 <= out["epoch_start_s"] < 0.3
    assert out["in_epoch_rows_per_s"] > 10 * out["rows_per_s"]


@pytest.mark.e2e
def test_ingest_compares_the_stream_with_a_dataloader_and_a_mock(ray_local):
    out = ingest(cpus=2, epochs=2, step_epochs=1, rows_224=32, overrides=["train.batch_size=16", "data.n_train=128"])
    for name in ("embedded", "224px"):
        stream = out["streams"][name]
        assert stream["ray_data_rows_per_s"] > 0 and stream["dataloader_rows_per_s"] > 0
        assert stream["ray_data"]["batches"] == stream["dataloader"]["batches"]  # the same rows, batched alike
    assert out["ray_data_vs_mock"] > 0 and out["time_to_first_batch_s"] > 0 and out["fetch_p99_s"] is not None
    assert out["step_pace"]["ray_data"]["batches"] == out["step_pace"]["mock"]["batches"] == 128 // 16
