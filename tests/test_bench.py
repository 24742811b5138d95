"""The benchmark code runs and reports (tiny shapes; no timing is asserted)."""

import pytest

from glam.bench import moe_vs_dense, render


@pytest.mark.slow
def test_moe_vs_dense_rows_and_report():
    rows = moe_vs_dense(tokens=64, m=8, h=16, group=32, experts=[4])
    assert {r["dispatch"] for r in rows} == {"gather", "einsum", "dropless"}
    assert all(r["moe_ms"] > 0 and r["ratio"] > 0 for r in rows)
    step = {"model": "x", "seconds": 0.1, "tokens_per_s": 10.0, "flops_per_s": 1e9,
            "peak_rss_gib": 1.0}
    assert all(r["routing_ms"] > 0 and r["experts_ms"] > 0 for r in rows)
    text = render({"date": "2026-01-01", "machine": "m", "peak_f32": 1e11, "peak_bf16": 1e11,
                   "bandwidth": 1e10,
                   "ffn_shape": "tiny", "step_shape": "small", "dtype": "float32", "ffn": rows, "steps": {"dense": step, "moe": step},
                   "expert_parallel": {"one_device_s": 1.0, "eight_devices_s": 2.0,
                                       "overhead": 2.0}}, "make bench")
    assert "| 8 x 16 | 4 | gather |" in text and "MFU" in text and "2.00x" in text
