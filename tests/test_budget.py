"""`glam-plan --budget`: a training budget in FLOPs -> the compute-optimal dense and MoE configs
of a fitted ladder, written as presets and a study (analysis.budget, train.flops_budget)."""

import re
from pathlib import Path

import pandas as pd
import pytest

from analysis import budget
from analysis.loss_law import LossLaw, compute_optimal
from analysis.moe_law import GranularityLaw, JointLaw
from glam import accounting
from glam.config import ConfigError
from glam.placement import dense_counterpart
from glam.resolve import SWEEPS_DIR, load, load_raw
from glam.cli.plan import main as plan_main

# A ladder whose losses follow a known routed law exactly.
TRUTH = LossLaw(E=0.5, A=60.0, B=400.0, alpha=0.3, beta=0.28, gamma=0.05)
REPO = Path(__file__).resolve().parents[1]


def _ladder(flat_in_tokens: bool = False) -> pd.DataFrame:
    """24 runs on TRUTH, or (`flat_in_tokens`) on losses that do not move with the tokens."""
    rows = [{"activated_params": n, "train_tokens": d, "n_experts": e, "status": "FINISHED",
             "val_loss": float(TRUTH(n, 1e15 if flat_in_tokens else d, max(e, 1)))}
            for n in (3e4, 1e5, 3e5, 1e6) for d in (1e6, 3e6, 1e7) for e in (0, 8)]
    rows.append({**rows[0], "status": "FAILED", "val_loss": 99.0})  # left out
    return pd.DataFrame(rows)


@pytest.fixture
def quick_fit(monkeypatch):
    """glam-plan --budget fitting with 10 bootstrap refits rather than 100."""
    fit = budget.fit_ladder
    monkeypatch.setattr(budget, "fit_ladder", lambda table: fit(table, n_boot=10))
    monkeypatch.setattr(budget, "MOE_BOOT", 10)


def _within(value: float, band: tuple[float, float]) -> bool:
    """`value` in `band`, up to rounding: on a noiseless ladder the band is a point."""
    return band[0] * (1 - 1e-9) <= value <= band[1] * (1 + 1e-9)


def _steps_flops(cfg) -> float:
    return (accounting.count(cfg.model).train_flops_per_token * cfg.train.steps
            * cfg.train.batch_size * cfg.model.seq_len)


def test_a_flops_budget_sets_the_steps():
    cfg = load(["model=ladder_s", "train.flops_budget=2e12"], "cpu")
    per_step = _steps_flops(cfg) / cfg.train.steps
    assert cfg.train.steps == round(2e12 / per_step) and "train.steps" in cfg.derived.filled
    with pytest.raises(ConfigError, match="train.flops_budget"):
        load(["train.flops_budget=-1"], "cpu")
    with pytest.raises(ConfigError, match="train.flops_budget.*token_multiple"):
        load(["train.flops_budget=1e12", "train.token_multiple=3"], "cpu")


def test_the_proposals_are_the_analytic_optimum_sized_and_written_as_a_study(tmp_path):
    law = budget.fit_ladder(_ladder(), n_boot=10)
    assert law.n_points == 24 and law.gamma == pytest.approx(TRUTH.gamma, abs=0.005)
    base = load(["model=ladder_s", "data.n_entities=120"], "cpu").model  # the study's data
    flops = 3e13
    proposals = budget.propose(law, flops, base, [0, 8], "budget_3e13")
    assert [p.experts for p in proposals] == [0, 8]
    k = budget.flops_per_param_token(base)  # glam's count, not Chinchilla's 6
    assert 6 < k < 9  # attention and the embedding's output projection on top of 6
    for p in proposals:
        exact = compute_optimal(TRUTH, flops, experts=max(p.experts, 1), flops_per_param_token=k)
        assert p.allocation.params == pytest.approx(exact.params, rel=0.02)
        assert p.allocation.loss == pytest.approx(exact.loss, rel=0.002)
        assert _within(p.allocation.loss, p.allocation.loss_band)
    # more experts at the same budget: lower expected loss (gamma > 0)
    assert proposals[1].allocation.loss < proposals[0].allocation.loss

    raw = load_raw(["model=ladder_s"]).model
    study = budget.write_study(proposals, flops, {"data": {"n_entities": 120},
                                                   "train": {"batch_size": 16}},
                               tmp_path, "budget_3e13", raw)
    preset = (tmp_path / "model" / "budget_3e13_e8.yaml").read_text()
    # resolution fills vocabulary and routing on the backend the study runs on
    assert "vocab_size: null" in preset and "dispatch: auto" in preset
    assert study == tmp_path / "study" / "budget_3e13.yaml"
    for p in proposals:
        cfg = load([f"hydra.searchpath=[file://{SWEEPS_DIR},file://{tmp_path}]",
                    "+study=budget_3e13", f"model={p.name}"], "cpu")
        assert cfg.model.n_experts == p.experts and cfg.data.n_entities == 120
        # the sized model is the nearest of its family; the run spends the budget
        assert cfg.model.d_model == p.model.d_model and cfg.model.n_layers == p.model.n_layers
        dense = accounting.count(dense_counterpart(cfg.model))
        assert dense.activated_params == p.params
        assert abs(p.params / p.allocation.params - 1) < 0.2
        assert p.tokens == pytest.approx(flops / dense.train_flops_per_token)
        # what the law expects of the shape actually proposed (never below the optimum)
        assert p.loss == pytest.approx(float(law(p.params, p.tokens, max(p.experts, 1))))
        assert p.loss >= p.allocation.loss * (1 - 1e-9)
        assert _within(p.loss, p.loss_band)
        per_step = _steps_flops(cfg) / cfg.train.steps
        assert abs(_steps_flops(cfg) - flops) <= per_step / 2


def test_budget_names_never_round_two_budgets_together():
    assert budget.budget_tag(3e12) == "budget_3e12"
    assert budget.budget_tag(2.5e13) == "budget_2p5e13" != budget.budget_tag(3e13)


def test_the_cli_writes_the_study_and_prints_its_command(tmp_path, capsys, quick_fit):
    table = tmp_path / "ladder.csv"
    _ladder().to_csv(table, index=False)
    plan_main(["--budget", "3e13", "--ladder", str(table), "--out", str(tmp_path / "next"),
               "model=ladder_s"])
    out, err = capsys.readouterr()
    assert "fitted on 24 runs" in out and "budget_3e13_e8" in out
    assert "N^0.300 [0.3, 0.3]" in out and "warning" not in err  # within the ladder
    assert f"glam-train -m --config-dir {tmp_path / 'next'} +study=budget_3e13" in out
    assert (tmp_path / "next" / "model" / "budget_3e13_dense.yaml").is_file()

    # without model=, the proposals are sized in the family of the ladder's largest rung
    _ladder().assign(**{"param.model.name": "ladder_xs"}).to_csv(table, index=False)
    plan_main(["--budget", "3e13", "--ladder", str(table), "--out", str(tmp_path / "own")])
    import yaml

    preset = yaml.safe_load((tmp_path / "own" / "model" / "budget_3e13_dense.yaml").read_text())
    assert preset["d_model"] // preset["n_heads"] == 16  # ladder_xs: 32 / 2 (cpu_moe: 32)


@pytest.mark.parametrize("args,message", [
    # the committed expert-count study: one size, one token count
    (["--ladder", str(REPO / "docs/results/study_expert_count/runs.csv")],
     "one value of parameter counts"),
    # the committed compute-vs-accuracy study: three sizes, one token count
    (["--ladder", str(REPO / "docs/results/study_compute_vs_accuracy/runs.csv")],
     "one value of token counts"),
    (["--ladder", "no/such/runs.csv"], "no run table at no/such/runs.csv"),
    ([], "--budget needs --ladder"),
])
def test_a_ladder_that_cannot_answer_is_refused_with_the_reason(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        plan_main(["--budget", "1e13", *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_the_committed_cpu_ladder_gives_a_plan(tmp_path, capsys):
    """docs/results/study_ladder (18 CPU runs): the law fits, and both proposals spend the
    budget at glam's own FLOP count."""
    ladder = REPO / "docs/results/study_ladder/runs.csv"
    law = budget.fit_ladder(pd.read_csv(ladder), n_boot=20)
    assert law.n_points == 18 and law.alpha > 0 and law.beta > 0 and law.gamma > 0
    plan_main(["--budget", "3e12", "--ladder", str(ladder), "--out", str(tmp_path),
               "+study=study_ladder"])
    assert "budget_3e12_dense" in capsys.readouterr().out
    for preset in ("budget_3e12_dense", "budget_3e12_e8"):
        cfg = load([f"hydra.searchpath=[file://{SWEEPS_DIR},file://{tmp_path}]",
                    "+study=budget_3e12", f"model={preset}"], "cpu")
        per_step = _steps_flops(cfg) / cfg.train.steps
        assert abs(_steps_flops(cfg) - 3e12) <= per_step / 2


def _plan(tmp_path, *args) -> int:
    """glam-plan on `<tmp_path>/ladder.csv` (`_ladder()` unless already written): exit code."""
    table = tmp_path / "ladder.csv"
    if not table.exists():
        _ladder().to_csv(table, index=False)
    try:
        plan_main(["--ladder", str(table), "model=ladder_s", *args])
    except SystemExit as stop:
        return stop.code
    return 0


def test_a_ladder_that_leaves_an_exponent_undetermined_is_refused(tmp_path, capsys, quick_fit):
    """Losses flat in the tokens: no beta, so no optimum; refused, nothing written."""
    _ladder(flat_in_tokens=True).to_csv(tmp_path / "ladder.csv", index=False)
    code = _plan(tmp_path, "--budget", "3e13", "--out", str(tmp_path / "next"))
    err = capsys.readouterr().err
    assert code == 2 and "--ladder" in err and "beta" in err and "token counts" in err
    assert "Traceback" not in err and not (tmp_path / "next").exists()


@pytest.mark.parametrize("flops", ["1e30", "10"])
def test_a_budget_the_model_family_cannot_reach_is_refused(flops, tmp_path, capsys, quick_fit):
    """An optimum far beyond the sizes of the family (1..96 layers) or below its smallest
    shape: refused with the budgets that family can serve, nothing written."""
    code = _plan(tmp_path, "--budget", flops, "--out", str(tmp_path / "next"))
    err = capsys.readouterr().err
    assert code == 2 and f"--budget {float(flops):.3g}" in err
    assert "give a budget of" in err and "model=" in err and not (tmp_path / "next").exists()


def test_a_budget_far_beyond_the_ladder_is_warned_about(tmp_path, capsys, quick_fit):
    """The ladder's runs reach ~7e13 FLOPs: 3e16 is planned, with the distance printed."""
    code = _plan(tmp_path, "--budget", "3e16", "--out", str(tmp_path / "far"))
    captured = capsys.readouterr()
    assert code == 0 and "beyond_ladder" in captured.out
    assert "warning: budget_3e16_dense extrapolates" in captured.err
    assert re.search(r"budget [0-9.]+x", captured.err)
    law = budget.fit_ladder(_ladder())
    base = load(["model=ladder_s"], "cpu").model
    near, far = (budget.propose(law, f, base, [0], "t")[0] for f in (3e13, 3e16))
    assert max(near.beyond.values()) < budget.EXTRAPOLATION_WARN < far.beyond["budget"]


@pytest.mark.parametrize("case", ["file", "under_a_file", "unwritable"])
def test_out_is_checked_before_fitting(case, tmp_path, capsys, monkeypatch):
    """An --out that cannot take the study is refused at once (exit 2), not after the fit."""
    (tmp_path / "taken").write_text("")
    out = {"file": tmp_path / "taken", "under_a_file": tmp_path / "taken" / "next",
           "unwritable": Path("/proc/glam_plan_out")}[case]
    if case == "unwritable" and not Path("/proc").is_dir():
        pytest.skip("no /proc to stand for a folder nobody may write")

    def no_fit(table):
        raise AssertionError("fitted before checking --out")

    monkeypatch.setattr(budget, "fit_ladder", no_fit)
    code = _plan(tmp_path, "--budget", "3e13", "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out}" in err and "Traceback" not in err


# A ladder over expert counts whose losses follow a joint law (analysis.moe_law) with an
# interior optimum at 3e13 FLOPs: more experts lower the parameter term (gamma) and raise the
# token term (omega).
JOINT = JointLaw(a=60.0, b=400.0, c=0.5, alpha=0.3, beta=0.28, gamma=0.03, delta=0.0, zeta=0.0,
                 omega=0.25)
GRANULAR = GranularityLaw(a=60.0, b=400.0, c=0.5, g=30.0, alpha=0.3, beta=0.28, gamma=0.6)


def _moe_ladder(law, column: str, values) -> pd.DataFrame:
    """Runs of `law` over 4 sizes x 3 token counts x `values` of `column` (n_experts, or
    granularity at 8 experts)."""
    return pd.DataFrame([
        {"activated_params": n, "train_tokens": d, "status": "FINISHED", "n_experts": 8,
         "granularity": 1, column: v, "val_loss": float(law(n, d, max(v, 1)))}
        for n in (3e4, 1e5, 3e5, 1e6) for d in (1e6, 3e6, 1e7) for v in values])


def test_the_candidates_are_powers_of_two_within_the_ladder():
    assert budget.candidates([1, 8]) == [1, 2, 4, 8]
    assert budget.candidates([1, 3, 16]) == [1, 2, 3, 4, 8, 16]


@pytest.mark.parametrize("column,values,form,preset", [
    ("n_experts", (0, 2, 8, 16), "joint", "budget_3e13_best_e4"),
    ("granularity", (1, 2, 4), "granularity", "budget_3e13_best_e8_g4"),
])
def test_a_ladder_over_experts_or_granularity_proposes_the_value_of_lowest_loss(
        column, values, form, preset, tmp_path, capsys, quick_fit):
    """The form the runs were drawn from fits better held out; the candidate of lowest loss at
    the budget's optimum under it (E = 4, which the ladder did not train; G = 4) is sized,
    written and loads with its expert count and granularity."""
    law = JOINT if column == "n_experts" else GRANULAR
    _moe_ladder(law, column, values).to_csv(tmp_path / "ladder.csv", index=False)
    code = _plan(tmp_path, "--budget", "3e13", "--out", str(tmp_path / "next"))
    out = capsys.readouterr().out
    assert code == 0 and f"fits better: {form}" in out, out
    base = load(["model=ladder_s"], "cpu").model
    k = budget.flops_per_param_token(base)
    losses = {x: compute_optimal(law.at(x), 3e13, flops_per_param_token=k).loss
              for x in budget.candidates([max(v, 1) for v in values])}
    best = min(losses, key=losses.get)
    assert best == 4 and f"lowest: {'E' if column == 'n_experts' else 'G'} = 4 ({preset})" in out
    cfg = load([f"hydra.searchpath=[file://{SWEEPS_DIR},file://{tmp_path / 'next'}]",
                "+study=budget_3e13", f"model={preset}"], "cpu")
    assert (cfg.model.n_experts, cfg.model.granularity) == ((4, 1) if column == "n_experts"
                                                            else (8, 4))
