"""analysis.axes: the MoE design axes as run-table columns, their verdicts and figures."""

import pandas as pd

from analysis import axes
from analysis.figures import point_keys


def _table(rows):
    base = {"family": "moe", "size": "d16-L2-F64", "n_experts": 8, "activated_params": 16000, "total_params": 28000,
            "param.model.d_model": 16, "param.model.n_layers": 2, "param.model.d_ff": 64}
    return axes.with_axes(pd.DataFrame([{**base, **r} for r in rows]))


def test_runs_from_before_an_axis_take_glams_setting():
    t = _table([{"val_loss": 1.0}, {"val_loss": 1.1, "param.model.granularity": "4",
                                     "param.train.init_from": "runs/dense"}])
    assert list(t["granularity"]) == [1, 4] and list(t["shared_experts"]) == [0, 0]
    assert list(t["balance"]) == ["aux", "aux"] and list(t["upcycled"]) == [False, True]
    assert axes.varied(t) == ["granularity", "upcycled"]


def test_each_setting_is_judged_against_glams_at_the_same_point(tmp_path):
    rows = [{"param.model.granularity": g, "seed": s, "val_loss": loss, "knowledge/bits": bits}
            for g, s, loss, bits in [(1, 0, 0.90, 6600), (1, 1, 0.92, 6700), (8, 0, 0.99, 4735),
                                     (8, 1, 1.01, 4736), (2, 0, 0.91, 6000), (2, 1, 0.95, 6900)]]
    t = _table(rows)
    assert point_keys(t) == ["size", "granularity"]  # never pooled across G
    lines = axes.verdicts(t, ("val_loss", "knowledge/bits"), point_keys(t))
    assert len(lines) == 4
    g8_bits = next(line for line in lines if "granularity=8" in line and "bits" in line)
    assert "gain -1914" in g8_bits and "behind beyond 2x the spread" in g8_bits
    g2_loss = next(line for line in lines if "granularity=2" in line and "val_loss" in line)
    assert "within 2x the spread" in g2_loss
    written = axes.figure(t, tmp_path, point_keys(t))
    assert {p.name for p in written} == {"axis_granularity.png", "axis_granularity.pdf",
                                         "axis_granularity.csv"}
    assert (t["knowledge/bits_per_param"] == t["knowledge/bits"] / 28000).all()


def test_an_upcycled_run_is_compared_with_its_twin_of_other_tokens():
    """At equal total FLOPs the upcycled arm trains fewer tokens: the two are still one point."""
    rows = [{"param.train.init_from": src, "train_tokens": tokens, "seed": s, "val_loss": loss}
            for src, tokens, s, loss in [(None, 4.1e6, 0, 0.88), (None, 4.1e6, 1, 0.90),
                                         ("d/seed0", 2.3e6, 0, 0.99), ("d/seed1", 2.3e6, 1, 1.0)]]
    t = _table(rows)
    (line,) = axes.verdicts(t, ("val_loss",), point_keys(t))
    assert line.startswith("d16-L2-F64: upcycled=True vs False, val_loss gain -0.105")
