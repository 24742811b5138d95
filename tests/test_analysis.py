"""The analysis package: fits recover known laws, figures are written, MLflow runs load back."""

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from analysis import energy, figures, knowledge, quality, report
from glam.cli.analyze import main as analyze_main
from analysis.fit import fit_power_law, fit_routed_law, saturating_experts
from analysis.runs import export, load_histories, load_runs, read_table


def test_power_law_recovers_a_known_exponent():
    """Over 10 noisy tables (3 seeds x 6 sizes, one diverged run each) the 95% band holds the
    true exponent at least 8 times and the estimates centre on it."""
    covered, estimates = 0, []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        x = np.repeat(np.geomspace(1e6, 1e9, 6), 3)
        y = 20.0 * x ** -0.12 * np.exp(rng.normal(0, 0.01, len(x)))
        y[4] *= 3  # a diverged run: the robust loss keeps it from bending the fit
        law = fit_power_law(x, y, n_boot=200, seed=seed)
        covered += law.b_low <= -0.12 <= law.b_high
        estimates.append(law.b)
        lo, hi = law.band([1e7])
        assert lo[0] < law(1e7) < hi[0]
    assert covered >= 8
    assert np.median(estimates) == pytest.approx(-0.12, abs=0.002)


def test_routed_law_recovers_known_coefficients():
    rng = np.random.default_rng(1)
    n = np.repeat([1e6, 4e6, 1.6e7, 6.4e7], 5)
    e = np.tile([1, 4, 16, 64, 256], 4)
    a, b, c, d = -0.08, -0.05, 0.002, 2.0
    logn, loge = np.log(n), np.log(saturating_experts(e))
    loss = np.exp(a * logn + b * loge + c * logn * loge + d + rng.normal(0, 0.002, len(n)))
    law = fit_routed_law(n, e, loss)
    for name, true in zip("abcd", (a, b, c, d)):
        low, high = law.intervals[name]
        assert low <= true <= high, name
    assert saturating_experts(1.0) == pytest.approx(1.0)


@pytest.fixture
def run_table():
    rows = []
    for size, flops in (("s", 2e6), ("m", 8e6), ("l", 3.2e7), ("xl", 1.28e8)):
        for family, experts in (("dense", 0), ("moe", 8)):
            for seed in (0, 1):
                gain = 0.95 if family == "moe" else 1.0
                rows.append({
                    "run_id": f"{size}{family}{seed}", "run_name": f"{size}-{family}-{seed}",
                    "family": family, "model": size, "n_experts": experts, "seed": seed,
                    "activated_params": flops / 2, "forward_flops_per_token": flops * 1.05 ** (experts > 0),
                    "train_tokens": 1e6, "param.train.steps": "100",
                    "train_flops_total": 3e6 * flops, "val_loss": gain * 30 * flops ** -0.15 + 0.01 * seed,
                    "eval/nlg_avg/0shot": 5 * np.log10(flops) / gain, "eval/nlu_avg/0shot": 30 + seed,
                    "total_params": flops / 2 * (4 if experts else 1),
                    "knowledge/bits": flops / 40 * (1.5 if experts else 1.0) * (1 + 0.02 * seed),
                    "param.corpus.knowledge_bits": "2000000",
                    "moe/layer0/dropped_top1": 0.02 * (experts > 0),
                    "moe/layer0/dropped_top2": 0.1 * (experts > 0)})
    return pd.DataFrame(rows)


def _texts_overlap(fig) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty text boxes of `fig` that overlap on the canvas."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    hidden = set()  # tick labels of ticks outside the view, which are not drawn
    for ax in fig.axes:
        for axis, (low, high) in ((ax.xaxis, sorted(ax.get_xlim())),
                                  (ax.yaxis, sorted(ax.get_ylim()))):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - 1e-9 * abs(high - low) <= tick.get_loc() <= high * (1 + 1e-9):
                    hidden.update((id(tick.label1), id(tick.label2)))
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and id(t) not in hidden
             and (t.axes is None or t.axes.get_visible())]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
            if box_a.overlaps(box_b)]


def _check_readable(fig, name):
    """Every visible data axis labels its ticks, no text overlaps another, legends sit outside
    the panels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    for ax in axes:
        for which, labels in (("x", ax.get_xticklabels()), ("y", ax.get_yticklabels())):
            shown = [t.get_text() for t in labels if t.get_visible() and t.get_text()]
            assert shown, f"{name}: panel {ax.get_ylabel()!r} has no {which} tick labels"
    assert not _texts_overlap(fig), f"{name}: overlapping text {_texts_overlap(fig)[:3]}"
    legends = fig.legends + [ax.get_legend() for ax in axes if ax.get_legend()]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), f"{name}: legend on a panel"


@pytest.fixture
def drawn(monkeypatch):
    """The figures each figure function saves, by name, checked before they are closed."""
    from analysis import quality

    seen = {}
    original = figures._save

    def save(fig, data, out, name, fits=None):
        _check_readable(fig, name)
        seen[name] = data
        return original(fig, data, out, name, fits)

    monkeypatch.setattr(figures, "_save", save)
    monkeypatch.setattr(quality, "_save", save)
    monkeypatch.setattr(knowledge, "_save", save)
    return seen


@pytest.mark.slow
def test_figures_are_written_and_readable(run_table, tmp_path, drawn):
    table = run_table.assign(**{"param.plan.placement": "matched"})
    moe16 = table[table["family"] == "moe"].assign(n_experts=16, val_loss=lambda t: t["val_loss"] * 0.98,
                                                    run_id=lambda t: t["run_id"] + "e16")
    table = pd.concat([table, moe16], ignore_index=True)
    written = figures.compute_vs_accuracy(table, tmp_path)
    written += figures.expert_count(table, tmp_path)
    histories = pd.DataFrame([(r, "lm_loss", s, 5.0 / (s + 1)) for r in table["run_id"]
                              for s in range(30)], columns=["run_id", "key", "step", "value"])
    written += figures.data_efficiency(table, histories, tmp_path)
    loads = {f"m-moe-{s}": {f"layer{i}": list(np.linspace(0.5, 1.5, 64)) for i in (0, 2)}
             for s in range(12)}
    written += figures.routing_health(loads, table, tmp_path)
    for name in ("compute_vs_accuracy", "expert_count", "data_efficiency", "routing_health"):
        for suffix in ("pdf", "png", "csv"):
            path = tmp_path / f"{name}.{suffix}"
            assert path in written and path.stat().st_size > 1000 or suffix == "csv"
    fits = (tmp_path / "compute_vs_accuracy_fits.json").read_text()
    # each expert count is its own series, never pooled with another
    assert "val_loss|Dense" in fits and "val_loss|MoE, E=8" in fits and "MoE, E=16" in fits
    assert set(drawn["compute_vs_accuracy"]["count"]) == {2}  # the seeds of one point only
    # loss against training FLOPs: tokens x 3 x the run's activated forward FLOPs per token
    curves = drawn["data_efficiency"]
    per_token = set(np.round(curves["train_flops"] / curves["tokens"]))
    assert per_token == set(3 * table["forward_flops_per_token"])
    from PIL import Image

    with Image.open(tmp_path / "expert_count.png") as image:
        assert round(image.info["dpi"][0]) == 300


@pytest.mark.slow
def test_a_narrow_range_and_a_panel_of_zeros_still_read(run_table, tmp_path, drawn):
    """Sizes within one decade of FLOPs get labelled ticks; an all-zero NLG panel gets a 0..1
    axis, not -0.04..0.04."""
    table = run_table[~run_table["model"].isin(["l", "xl"])].assign(
        **{"eval/nlg_avg/0shot": 0.0})
    limits = {}
    original = figures._save

    def keep_limits(fig, *args, **kwargs):
        limits.update({ax.get_ylabel(): ax.get_ylim() for ax in fig.axes})
        return original(fig, *args, **kwargs)

    figures._save = keep_limits
    try:
        figures.compute_vs_accuracy(table, tmp_path)  # (the readability checks run first)
    finally:
        figures._save = original
    assert limits["NLG avg., 0-shot (EM %)"] == (0, 1)
    import matplotlib.pyplot as plt

    assert not plt.get_fignums()  # every figure closed after saving


def _quality_study():
    """Runs of a data-quality study, 2 seeds: filtered beats unfiltered by 4 NLG and 1 NLU
    points, 3x unfiltered beats filtered on NLU only; curves of 3 (6 for 3x) evaluations."""
    rows, histories = [], []
    for family in ("dense", "moe"):
        for arm, selection, multiple, nlg, nlu, loss in (
                ("filtered", "pareto", 1.0, 10.0, 40.0, 2.0),
                ("unfiltered", "none", 1.0, 6.0, 39.0, 2.2),
                ("unfiltered 3x", "none", 3.0, 8.0, 45.0, 1.8)):
            for seed in (0, 1):
                run = f"{family}-{arm}-{seed}"
                final = {"val_loss_clean": loss + 0.01 * seed,
                         "eval/nlg_avg/0shot": nlg + 0.2 * seed,
                         "eval/nlu_avg/0shot": nlu + 0.2 * seed}
                rows.append({"run_id": run, "run_name": run, "family": family,
                             "param.data.quality.selection": selection,
                             "param.train.token_multiple": str(multiple),
                             "param.train.batch_size": "16", "param.model.seq_len": "64",
                             "param.train.steps": str(int(300 * multiple)), **final})
                steps = [100 * (i + 1) for i in range(int(3 * multiple))]
                histories += [(run, key, step, value * step / steps[-1])
                              for key, value in final.items() for step in steps]
    return pd.DataFrame(rows), pd.DataFrame(histories, columns=["run_id", "key", "step", "value"])


def test_the_data_quality_figure_and_verdicts(tmp_path, drawn):
    table, histories = _quality_study()
    assert list(quality.arms(table).unique()) == ["filtered", "unfiltered", "unfiltered 3x"]
    written = quality.figure(table, histories, tmp_path)
    assert {p.name for p in written} == {"data_quality.pdf", "data_quality.png",
                                         "data_quality.csv"}
    data = pd.read_csv(tmp_path / "data_quality.csv")
    assert data["tokens"].max() == 900 * 16 * 64 and set(data["count"]) == {2}
    lines = quality.verdicts(table)
    dense = [line for line in lines if line.startswith("Dense")]
    assert "NLG average, 0-shot 10.1 vs 6.1" in dense[0] and ": better" in dense[0]
    assert "vs unfiltered 3x" in dense[1] and "NLU average, 0-shot 40.1 vs 45.1" in dense[1]
    assert dense[1].endswith("worse")
    assert "larger on NLG, as in the paper" in dense[2]


def test_the_token_multiple_at_which_unfiltered_data_matches_filtered():
    """Read off the 3x arm's seed-mean curve, interpolated between evaluations: NLU reaches the
    filtered 40.1 between its evaluations at 800 and 900 steps (of 300 at 1x), NLG never does."""
    table, histories = _quality_study()
    lines = quality.matching_multiples(table, histories)
    dense = next(line for line in lines if line.startswith("Dense"))
    assert "NLU average, 0-shot 40.1 at 2.67x" in dense
    assert "NLG average, 0-shot 10.1 at > 3x" in dense
    assert "Clean held-out loss 2 at <= 1x" in dense


def test_data_quality_verdicts_with_missing_values_and_settings():
    """Runs without the quality settings get no arm (not 'filtered'); a run without a token
    multiple trained on x1; NaN metrics neither crash nor give a verdict; one seed says so."""
    table, _ = _quality_study()
    table = table[table["run_id"].str.endswith("0")].copy()  # one seed
    table.loc[table.index[0], "param.data.quality.selection"] = np.nan
    table.loc[table.index[1], "param.train.token_multiple"] = np.nan
    assert quality.arms(table).iloc[0] is None and quality.arms(table).iloc[1] == "unfiltered"
    table["eval/nlg_avg/0shot"] = np.nan
    lines = quality.verdicts(table)
    assert lines and not any("nan" in line or "NLG" in line for line in lines)
    assert all("one seed: no spread" in line for line in lines)
    assert not quality.is_study(table[table["family"] == "dense"].iloc[:1])


def test_table_export_roundtrip_and_energy(run_table, tmp_path):
    for suffix in ("csv", "parquet"):
        path = export(run_table, tmp_path / f"runs.{suffix}")
        back = read_table(path)
        assert len(back) == len(run_table) and set(run_table.columns) <= set(back.columns)
    cost = energy.run_energy(run_table, "cpu")
    assert (cost["energy_kwh"] > 0).all()
    paper = energy.paper_table("tpu_v4").set_index("model")
    # GLaM Table 1: 64B/64E needs about half of GPT-3's FLOPs per token at inference.
    ratio = paper.loc["glam_64b_64e", "inference_GFLOPs_per_token"] / paper.loc[
        "gpt3_175b", "inference_GFLOPs_per_token"]
    assert 0.5 < ratio < 0.6


@pytest.mark.slow
def test_cli_offline_from_a_table(run_table, tmp_path, capsys):
    path = export(run_table, tmp_path / "runs.csv")
    analyze_main(["--table", str(path), "--out", str(tmp_path / "figs")])
    assert (tmp_path / "figs" / "compute_vs_accuracy.png").exists()
    assert "a" in json.loads((tmp_path / "figs" / "routed_law_fit.json").read_text())
    assert "device-hours" in capsys.readouterr().out


def test_load_runs_from_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("study")
    parent = client.create_run(exp, tags={"study_role": "parent"}).info.run_id
    for i, family in enumerate(("dense", "moe")):
        run = client.create_run(exp, run_name=family, tags={
            "mlflow.parentRunId": parent, "family": family, "n_experts": str(8 * i),
            "activated_params": "1000", "forward_flops_per_token": "5000", "seed": "0"})
        rid = run.info.run_id
        client.log_param(rid, "model.d_model", "32")
        client.log_batch(rid, metrics=[Metric("val_loss", 3.0 - s * 0.1 - i, 0, s) for s in range(3)])
        client.set_terminated(rid)
    table = load_runs(uri, parent_run_id=parent)
    assert sorted(table["family"]) == ["dense", "moe"]
    assert set(table["param.model.d_model"]) == {"32"}
    row = table.set_index("family").loc["moe"]
    assert row["val_loss"] == pytest.approx(1.8) and row["best_val_loss"] == pytest.approx(1.8)
    assert row["n_experts"] == 8
    hist = load_histories(uri, list(table["run_id"]), ["val_loss"])
    assert len(hist) == 6


def test_the_summary_says_where_the_run_time_went():
    from analysis.summary import time_split

    table = pd.DataFrame({"run_seconds": [10.0, 30.0], "train_seconds": [5.0, 23.0],
                          "compile_seconds": [3.0, 5.0]})
    assert time_split(table) == ("Run time: 40 s inside 2 runs: 70% training steps, 20% "
                                 "compilation, 10% evaluation, checkpoints and logging")
    table["setup_seconds"] = [6.0, 4.0]  # before each MLflow run
    assert time_split(table) == ("Run time: 40 s inside 2 runs: 70% training steps, 20% "
                                 "compilation, 10% evaluation, checkpoints and logging; set-up "
                                 "before the runs (corpus, tasks, initial state) 10 s more, 56% "
                                 "training with it")
    assert time_split(table.drop(columns="run_seconds")) is None


def test_runs_of_different_lengths_are_different_points_never_seeds(run_table, tmp_path, drawn):
    """A ladder trains each size for several token counts: the summary keeps them apart and
    the per-token-compute figure compares the runs of the largest count only."""
    from analysis.summary import dense_vs_moe, headline, points

    short = run_table.assign(train_tokens=2.5e5, val_loss=run_table["val_loss"] + 1.0,
                             run_id=run_table["run_id"] + "-short")
    ladder = pd.concat([run_table, short], ignore_index=True)
    rows = points(ladder)
    assert len(rows) == 16 and set(rows["seeds"]) == {2}  # 4 sizes x 2 lengths x 2 families
    assert dense_vs_moe(ladder).index.nlevels == 2  # (size, training tokens)
    figures.compute_vs_accuracy(ladder, tmp_path)
    plotted = drawn["compute_vs_accuracy"]
    loss = plotted[plotted["metric"] == "val_loss"]
    assert set(loss["count"]) == {2} and loss["mean"].max() < ladder["val_loss"].max() - 0.5
    # the headline gain is the same per point whichever lengths the ladder has
    assert headline(ladder)["headline/val_loss_gain/moe_E8"] == pytest.approx(
        headline(run_table)["headline/val_loss_gain/moe_E8"])


def test_fits_are_drawn_only_through_4_points_within_the_seed_spread(run_table, tmp_path):
    """A law through 3 sizes is not fitted; one whose points lie further from it than their
    seed std is fitted, reported with its error, and not drawn; the x column says its unit."""
    three = run_table[run_table["model"] != "xl"]
    figures.compute_vs_accuracy(three, tmp_path)
    assert not (tmp_path / "compute_vs_accuracy_fits.json").exists()
    data = pd.read_csv(tmp_path / "compute_vs_accuracy.csv")
    assert "activated_mflops_per_token" in data and "gflops" not in data
    assert data["activated_mflops_per_token"].max() < 200  # MFLOPs, as the name says
    bent = run_table.assign(**{"eval/nlu_avg/0shot": run_table["model"].map(
        {"s": 30.0, "m": 60.0, "l": 35.0, "xl": 70.0}) + run_table["seed"]})
    figures.compute_vs_accuracy(bent, tmp_path)
    fits = json.loads((tmp_path / "compute_vs_accuracy_fits.json").read_text())
    nlu = fits["eval/nlu_avg/0shot|Dense"]
    assert not nlu["drawn"] and nlu["rms_error"] > 5 and "seed std" in nlu["not_drawn_because"]
    assert fits["val_loss|Dense"]["drawn"]


def test_a_single_seed_study_never_says_seed_std(run_table, tmp_path, monkeypatch):
    titles = {}
    original = figures._save

    def keep(fig, data, out, name, fits=None):
        titles[name] = fig.get_suptitle()
        return original(fig, data, out, name, fits)

    monkeypatch.setattr(figures, "_save", keep)
    one = run_table[run_table["seed"] == 0]
    figures.compute_vs_accuracy(one, tmp_path)
    figures.expert_count(one, tmp_path)
    assert all("seed std" not in t and "one seed" in t for t in titles.values())
    fits = json.loads((tmp_path / "compute_vs_accuracy_fits.json").read_text())
    assert not any(f["drawn"] for f in fits.values())  # no spread: nothing to judge a fit by
    figures.compute_vs_accuracy(run_table, tmp_path)
    assert "(error bars: seed std)" in titles["compute_vs_accuracy"]


@pytest.mark.slow
def test_knowledge_capacity_figure_and_panels(run_table, tmp_path, drawn):
    from analysis.knowledge import knowledge_capacity

    written = knowledge_capacity(run_table, tmp_path)
    assert tmp_path / "knowledge_capacity.png" in written
    stats = drawn["knowledge_capacity"]
    assert set(stats["series"]) == {"Dense", "MoE, E=8"} and set(stats["seeds"]) == {2}
    dense = stats[stats["series"] == "Dense"]
    assert np.allclose(dense["bits_per_param"], 2 / 40 * 1.01)
    figures.compute_vs_accuracy(run_table, tmp_path)
    assert "knowledge/bits" in set(drawn["compute_vs_accuracy"]["metric"])
    with pytest.raises(ValueError, match="knowledge/bits"):
        knowledge_capacity(run_table.drop(columns="knowledge/bits"), tmp_path)


def test_verdicts_weigh_each_gap_against_the_seed_spread():
    from analysis.knowledge import verdicts

    rows = []
    for e, bits in ((0, 100.0), (4, 130.0), (16, 160.0), (64, 150.0)):
        for seed, noise in enumerate((-2.0, 2.0)):
            rows.append({"model": "s", "n_experts": e, "seed": seed,
                         "knowledge/bits": bits + noise, "val_loss": 1.0 - bits / 1000})
    lines = verdicts(pd.DataFrame(rows), ("knowledge/bits", "val_loss", "absent"))
    text = "\n".join(lines)
    assert "s: E=16 vs dense, knowledge/bits gain +60 (spread 4): MoE ahead beyond 2x" in text
    assert "E=16 vs dense, val_loss gain +0.06" in text  # lower loss counts as a gain
    assert "16->64 worse by 10" in text and "best at E=16" in text
    assert "absent" not in text
    one = pd.DataFrame(rows).query("seed == 0")
    assert "one seed: no spread" in "\n".join(verdicts(one, ("knowledge/bits",)))


def test_a_missing_value_never_becomes_a_verdict_or_a_fitted_point():
    """A seed without the metric (an older run) is left out of the gain and its spread: the
    spread is never NaN, and a point with no value does not count towards a fit's 4 points."""
    from analysis.fit import honest_fit
    from analysis.knowledge import verdicts

    rows = [{"model": "s", "n_experts": e, "seed": s, "knowledge/bits": v}
            for e, vals in ((0, (100.0, float("nan"))), (8, (200.0, 204.0)))
            for s, v in enumerate(vals)]
    text = "\n".join(verdicts(pd.DataFrame(rows), ("knowledge/bits",)))
    assert "nan" not in text and "MoE ahead beyond 2x" in text
    stats = pd.DataFrame({"x": [1.0, 2.0, 4.0, 8.0], "mean": [1.0, 2.0, 4.0, float("nan")],
                          "std": [0.1] * 4, "count": [2, 2, 2, 0]})
    assert honest_fit([1, 1, 2, 2, 4, 4], [1, 1, 2, 2, 4, 4], stats, "m") is None


def test_law_forms_are_compared_when_the_runs_vary_the_expert_count(run_table, tmp_path, capsys,
                                                                     monkeypatch):
    """A ladder over N, D and E: each form's held-out error printed, and its coefficients,
    intervals, error and the chosen form in law_comparison.json beside routed_law_fit.json; a
    study of one token count: each form skipped with the reason, nothing raised."""
    from analysis.loss_law import LossLaw

    monkeypatch.setattr(report, "LAW_BOOT", 5)
    truth = LossLaw(E=1.5, A=300.0, B=900.0, alpha=0.3, beta=0.28, gamma=0.07)
    ladder = pd.DataFrame([
        {"run_id": f"{n}-{d}-{e}", "family": "moe" if e > 1 else "dense", "n_experts": e,
         "model": str(n), "seed": 0, "activated_params": n, "train_tokens": d,
         "forward_flops_per_token": 2 * n, "val_loss": float(truth(n, d, max(e, 1)))}
        for n in (1e6, 1e7, 1e8) for d in (1e8, 1e9, 1e10) for e in (0, 8)])
    written = report.analyze(ladder, tmp_path / "ladder", [], 0, None)
    assert {p.name for p in written} == {"routed_law_fit.json", "law_comparison.json"}
    (found,) = json.loads((tmp_path / "ladder" / "law_comparison.json").read_text())["comparisons"]
    assert found["axis"] == "experts" and found["n_runs"] == 18
    assert found["chosen"] == "chinchilla"  # the runs' own form; joint no better held out
    joint = found["forms"]["joint"]
    assert joint["held_out_rmse_log_loss"] < 1e-3 and joint["law"]["n_boot"] == 5
    assert set(joint["law"]["intervals_95"]) >= {"alpha", "gamma", "delta", "zeta", "omega"}
    out = capsys.readouterr().out
    assert "Law forms over experts (18 runs" in out and "<- fits better" in out

    written = report.law_comparison(run_table, tmp_path / "one_length")
    out = capsys.readouterr().out
    for form in ("chinchilla", "joint"):
        assert f"{form}: skipped: the runs have one value of token counts" in out
    assert "fits better: none" in out
    assert json.loads(written[0].read_text())["comparisons"][0]["chosen"] is None
