"""Studies: placement at fixed activated FLOPs, expansion by Hydra's parser, the plan, skipping
finished points, and real multiruns into MLflow."""

import json
import os
import sys

import pytest
from mlflow.tracking import MlflowClient

import waiting
from glam.config import ConfigError
from glam.placement import dense_counterpart, flops
from glam.resolve import CONF_DIR, SWEEPS_DIR, load
from glam.study.plan import plan
from glam.study.points import expand

STUDIES = sorted(p.stem for p in (SWEEPS_DIR / "study").glob("*.yaml")
                 if not p.stem.endswith("base"))  # base, knowledge_base: shared parts


@pytest.mark.parametrize("model", ["ladder_xs", "ladder_s", "cpu_moe"])
@pytest.mark.parametrize("n_experts", [2, 4, 16, 64])
def test_matched_placement_equals_dense_flops(model, n_experts):
    cfg = load([f"model={model}", f"model.n_experts={n_experts}", "plan.placement=matched"])
    dense = flops(dense_counterpart(cfg.model))
    assert abs(flops(cfg.model) / dense - 1) <= cfg.plan.tolerance
    assert cfg.model.expert_d_ff != cfg.model.d_ff  # solved, not copied


def test_glam_placement_keeps_the_dense_width_and_costs_more():
    cfg = load(["model=ladder_s", "model.n_experts=8"])
    assert cfg.model.expert_hidden == cfg.model.d_ff
    assert flops(cfg.model) > flops(dense_counterpart(cfg.model))


def test_expert_count_series_is_flat_and_an_unmatched_one_is_refused():
    rows = plan(["+study=expert_count"])
    assert sorted({r.n_experts for r in rows}) == [0, 4, 16]
    dense = next(r for r in rows if r.family == "dense").forward_flops_per_token
    assert all(abs(r.forward_flops_per_token / dense - 1) <= 0.02 for r in rows)
    with pytest.raises(ConfigError, match=r"plan.tolerance: 4 study point\(s\)") as err:
        plan(["+study=expert_count", "plan.placement=glam"])  # experts as wide as the FFN
    assert "train.seed=1 model.n_experts=16" in str(err.value)  # seeds outermost


def test_a_series_without_its_dense_point_is_still_checked():
    with pytest.raises(ConfigError, match=r"plan.tolerance: 6 study point"):
        plan(["+study=expert_count", "plan.placement=glam", "model.n_experts=8,16,32"])


def test_a_fixed_override_replaces_the_swept_values():
    points = expand(["+study=expert_count", "model.n_experts=64"])
    assert len(points) == 2 and all("model.n_experts=64" in p for p in points)


def _stage_one(study: str, where) -> None:
    """Exports where a two-stage study's second stage looks for its first (upcycling's dense
    runs, `outputs/studies/upcycling_dense/seed<seed>` under `where`)."""
    if study != "upcycling":
        return
    import jax
    from flax import nnx

    from glam import export
    from glam.data.tokenizer import WordTokenizer
    from glam.model import GLaM

    for point in expand(["+study=upcycling_dense"]):
        cfg = load(point)
        model = GLaM(cfg.model, rngs=nnx.Rngs(0))
        params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        folder = where / "outputs/studies/upcycling_dense" / f"seed{cfg.train.seed}" / "model"
        words = [f"w{i}" for i in range(cfg.model.vocab_size - 3)]
        export.save(folder, params, cfg.model, WordTokenizer(words),
                    trained={"steps": cfg.train.steps, "tokens": 1, "train_flops": 2.0e11})


@pytest.mark.slow  # composes every point of every study
@pytest.mark.parametrize("study", STUDIES)
def test_every_study_composes(study, tmp_path, monkeypatch):
    points = expand([f"+study={study}"])
    assert len(points) >= 2
    if study == "upcycling":  # its upcycled arm reads the first stage's runs
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ConfigError, match="train.init_from: .*upcycling_dense/seed0"):
            load(points[0])
        _stage_one(study, tmp_path)
    for point in points:
        cfg = load(point)  # resolves; paper-scale points are counted, never allocated
        assert cfg.study.name == study and cfg.logger.experiment == study


@pytest.mark.parametrize("override,values", [
    ("train.seed=0,1,2", ["0", "1", "2"]),
    ("train.seed=range(3)", ["0", "1", "2"]),
    ("train.seed=range(0,4,2)", ["0", "2"]),
    ("train.seed=choice(5,7)", ["5", "7"]),
    ("model=glob(ladder_x*)", ["ladder_xs", "ladder_xxs"]),
])
def test_every_hydra_sweep_syntax_expands(override, values):
    key = override.split("=")[0]
    points = expand(["+study=smoke", override])
    assert len(points) == 2 * len(values)  # the study's own axis: n_experts 0, 4
    seen = sorted({o.split("=", 1)[1] for p in points for o in p if o.startswith(f"{key}=")})
    assert seen == sorted(values)


def test_a_list_value_is_one_point_not_an_axis():
    (point,) = expand(["model=tiny_moe", "eval.shots=[0,1]"])
    assert load(point).eval.shots == (0, 1)


def test_plan_lists_every_seed_of_a_range():
    rows = plan(["+study=expert_count", "train.seed=range(3)"])
    per_point = {}
    for r in rows:
        per_point.setdefault(r.n_experts, []).append(r.overrides)
    assert len(rows) == 9 and all(len(v) == 3 for v in per_point.values())
    assert all(any("train.seed=2" in o for o in v) for v in per_point.values())


def test_the_data_quality_study_plans_its_arms_and_prepares_each_corpus_once():
    """Filtered, unfiltered and 3x unfiltered arms x dense, MoE (one seed): the 3x arm plans
    three times the tokens; `glam-data prepare +study=data_quality` finds two corpora (the 3x
    arm reuses the unfiltered one) with different selections and folders."""
    from glam.cli.data import corpora

    rows = plan(["+study=data_quality"])
    tokens = {(next(o for o in r.overrides.split() if o.startswith("+quality_arm=")), r.family):
              r.train_tokens for r in rows}
    assert len(rows) == 6 and len(set(tokens)) == 6
    for family in ("dense", "moe"):
        base = tokens[("+quality_arm=filtered", family)]
        assert tokens[("+quality_arm=unfiltered", family)] == base
        assert tokens[("+quality_arm=unfiltered_3x", family)] == 3 * base
    filtered, unfiltered = corpora(["+study=data_quality"])
    assert (str(filtered.data.quality.selection), str(unfiltered.data.quality.selection)) == (
        "pareto", "none")
    assert filtered.data.prepared_dir == "data/data_quality/filtered"
    assert unfiltered.data.prepared_dir == "data/data_quality/unfiltered"
    assert corpora(["+study=expert_count"])[0].data.kind == "world"
    # a launcher's settings are not the data's: dropped, not refused
    assert len(corpora(["+study=data_quality", "hydra.launcher.n_jobs=4"])) == 2
    with pytest.raises(ConfigError, match="data.prepared_dir: 'data/one' would hold two"):
        corpora(["+study=data_quality", "data.prepared_dir=data/one"])


def test_glam_data_exits_2_on_bad_input_and_0_on_help():
    def run(*args):
        return waiting.run([sys.executable, "-m", "glam.cli.data", *args], 120)

    bad = run("prepare", "data=world_quality", "data.quality.alpha=0")
    assert bad.returncode == 2 and "data.quality.alpha: must be > 0" in bad.stderr
    assert run("prepare", "data=world_quality", "data.no_such_key=1").returncode == 2
    assert run("prepare", "--help").returncode == 0


def test_token_multiple_scales_the_steps_and_says_so():
    cfg = load(["model=tiny_dense", "train.steps=100", "train.token_multiple=2.5"])
    assert cfg.train.steps == 250 and "train.steps" in cfg.derived.filled
    with pytest.raises(ConfigError, match="train.token_multiple: must be positive"):
        load(["train.token_multiple=0"])


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for launcher in ("joblib", "submitit_slurm"):
            cfg = compose("config", overrides=["+study=smoke", f"hydra/launcher={launcher}"],
                          return_hydra_config=True)
            assert launcher.split("_")[0] in cfg.hydra.launcher._target_.lower()


def _multirun(tmp_path, *overrides, code=0):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "glam.cli.train", "-m", "+study=smoke", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2", "model.n_experts=choice(0,4)", *overrides]
    proc = waiting.run(cmd, 600, cwd=tmp_path, env=env)
    assert (proc.returncode == 0) == (code == 0), proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.multiprocess
def test_joblib_multirun_parent_children_and_rerun_skips(tmp_path):
    """A point that fails leaves its child run FAILED with its error and the parent FAILED
    (never RUNNING); the same command again completes the study; a third run skips it all."""
    failed = _multirun(tmp_path, "faults.crash_at_step=2", "faults.crash_jobs=[1]", code=1)
    assert "its MLflow parent run" in failed.stderr and "is FAILED" in failed.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    first = {r.data.tags["study_role"]: r for r in client.search_runs(
        [exp.experiment_id], "attributes.status != 'FINISHED'")}
    assert set(first) == {"parent", "child"}  # one point finished, the other failed
    assert first["parent"].info.status == first["child"].info.status == "FAILED"
    assert first["parent"].data.tags["failed_points"] == "1"
    assert first["child"].data.tags["error"] == "SimulatedCrash: faults.crash_at_step=2"

    said = _multirun(tmp_path).stdout
    runs = client.search_runs([exp.experiment_id])
    assert first["child"].info.run_id in {r.info.run_id for r in runs}  # resumed, not replaced
    (parent,) = [r for r in runs if r.data.tags.get("study_role") == "parent"]
    # the study ends with its summary: on the terminal and on its parent run
    assert "study smoke: 2 finished runs" in said and "glam-analyze --study smoke" in said
    assert "mlflow ui --backend-store-uri" in said
    metrics = parent.data.metrics
    assert {"headline/val_loss/dense", "headline/val_loss/moe_E4",
            "headline/val_loss_gain/moe_E4"} <= set(metrics)
    assert metrics["headline/val_loss_gain/moe_E4"] == pytest.approx(
        metrics["headline/val_loss/dense"] - metrics["headline/val_loss/moe_E4"])
    assert "study_points.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = [r for r in runs if r.data.tags.get("study_role") == "child"]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert parent.data.tags["failed_points"] == "0"
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        for key in ("study", "study_point", "family", "n_experts", "activated_params",
                    "forward_flops_per_token", "seed", "config_hash"):
            assert key in tags, key
    # the points Hydra launched are those expand() lists, Hydra sweep syntax included
    expanded = expand(["+study=smoke", "model.n_experts=choice(0,4)"])
    assert sorted(c.data.tags["study_point"] for c in children) == sorted(
        next(o for o in p if o.startswith("model.n_experts=")) for p in expanded)
    for child in children:
        assert child.data.params["model.router.dispatch"] == "gather"  # resolved, not auto
        assert child.data.params["derived.drops_tokens"] == str(
            child.data.tags["family"] == "moe")
    saved = json.loads((tmp_path / "outputs/studies/smoke/mlflow_parent.json").read_text())
    assert saved["run_id"] == parent.info.run_id

    _multirun(tmp_path)  # the same study again: both points are skipped
    again = client.search_runs([exp.experiment_id])
    assert {r.info.run_id for r in again} == {r.info.run_id for r in runs}  # nothing new


@pytest.mark.slow
def test_a_mismatched_study_is_refused_before_any_job(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "glam.cli.train", "-m", "+study=expert_count", "plan.placement=glam"]
    proc = waiting.run(cmd, 300, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "plan.tolerance" in proc.stderr and "model.n_experts=16" in proc.stderr
    assert not (tmp_path / "outputs" / "studies" / "expert_count").exists() or not list(
        (tmp_path / "outputs" / "studies" / "expert_count").glob("model.n_experts=*"))


def test_an_accepted_range_study_passes_the_launch_check():
    """The callback's FLOP check expands `range` as Hydra does (it once refused this)."""
    from hydra import compose, initialize_config_dir

    from glam.cli.callbacks import StudyCallback

    overrides = ["+study=expert_count", "train.seed=range(0,2)"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        rows = plan(overrides)
        cfg = compose("config", overrides=["+study=expert_count"], return_hydra_config=True)
    assert len(rows) == 6
    assert cfg.hydra.callbacks.glam_multirun._target_ == f"{StudyCallback.__module__}.StudyCallback"


def test_config_hash_ignores_logging_and_checkpointing_only():
    from glam.identity import config_hash

    def hash_of(*overrides):
        return config_hash(load(list(overrides), backend="cpu"))

    base = hash_of()
    assert hash_of("logger.experiment=x", "checkpoint.every=7", "train.progress=false") == base
    assert hash_of("train.seed=3") != base and hash_of("model.n_experts=4") != base
    assert hash_of("mesh=cpu8", "eval.batch_size=32") == base  # layout: the same point


def test_a_cpu_finished_point_is_not_skipped_where_the_dispatch_differs(tmp_path):
    """A point finished on CPU (capacity-dropping gather) is done for a CPU job, but not for a
    GPU job, which resolves `auto` to dropless and routes tokens differently."""
    from glam.identity import config_hash
    from glam.study.runs import skip_or_prepare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    point = ["model=tiny_moe", f"logger.tracking_uri={uri}", "logger.experiment=s"]
    on_cpu, on_gpu = load(point, backend="cpu"), load(point, backend="gpu")
    assert on_cpu.model.router.dispatch == "gather" and on_gpu.model.router.dispatch == "dropless"
    assert on_cpu.derived.drops_tokens and not on_gpu.derived.drops_tokens
    client = MlflowClient(uri)
    exp = client.create_experiment("s")
    done = client.create_run(exp, tags={"config_hash": config_hash(on_cpu)}).info.run_id
    client.set_terminated(done, "FINISHED")
    tags = {"study": "s", "study_point": "p", "study_role": "child"}
    assert skip_or_prepare(on_cpu, tmp_path / "cpu", tags) == done
    assert skip_or_prepare(on_gpu, tmp_path / "gpu", tags) is None


def test_stale_checkpoints_of_an_edited_point_are_set_aside(tmp_path):
    from glam.study.runs import set_aside_stale_checkpoints

    set_aside_stale_checkpoints(tmp_path, "aaa")
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    set_aside_stale_checkpoints(tmp_path, "aaa")  # same config: kept for resuming
    assert (tmp_path / "checkpoints" / "10").is_dir()
    set_aside_stale_checkpoints(tmp_path, "bbb")  # edited config: moved, not deleted
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "checkpoints.stale-aaa" / "10").is_dir()
    assert (tmp_path / "config_hash.txt").read_text().strip() == "bbb"


@pytest.mark.slow
def test_an_empty_multirun_is_refused_before_launch(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for study in ([], ["+study=smoke"]):
        cmd = [sys.executable, "-m", "glam.cli.train", "-m", *study, "train.seed=range(0,0)"]
        proc = waiting.run(cmd, 300, cwd=tmp_path, env=env)
        assert proc.returncode == 2 and "select no point" in proc.stderr, proc.stderr[-2000:]


def test_probe_costs_add_up_to_a_run():
    """The estimate counts set-up (imports are once per launcher process), the first step (warm when the cache holds its programs),
    the other steps, the evaluations every `eval.every` plus the final one (the first compiles)
    and a checkpoint at step 0, every `checkpoint.every` steps and at the end."""
    from glam.study.probe import Costs

    c = Costs(setup_cold_s=4, setup_warm_s=2, first_step_cold_s=10,
              first_step_warm_s=1, step_s=0.1, eval_cold_s=5, eval_cached_s=3, eval_warm_s=2,
              checkpoint_s=0.5)
    assert c.run_seconds(100, 0, 0, cache_warm=False) == pytest.approx(4 + 10 + 9.9 + 5)
    # evaluations at 25, 50, 75 and the final one; checkpoints at 0, 40, 80, 100
    assert c.run_seconds(100, 25, 40, cache_warm=True) == pytest.approx(
        2 + 1 + 9.9 + 3 + 3 * 2 + 4 * 0.5)


def test_a_shape_key_ignores_seed_and_intervals_but_not_shape_steps_or_sharing():
    """Steps count: the learning-rate schedule is compiled into the training step."""
    from glam.study.probe import shape_key

    base = ["model=tiny_moe"]
    key = shape_key(load(base), jobs=1)
    assert key == shape_key(load([*base, "train.seed=3", "eval.every=2", "checkpoint.every=5"]),
                            jobs=1)
    assert key != shape_key(load([*base, "model.d_model=64"]), jobs=1)
    assert key != shape_key(load([*base, "train.steps=7"]), jobs=1)
    assert key != shape_key(load([*base, "eval.max_answer_tokens=3"]), jobs=1)
    assert key != shape_key(load(base), jobs=2)


def test_two_corpora_of_one_vocabulary_share_their_programs_but_not_their_costs():
    from glam.study.probe import program_key, shape_key

    filtered, unfiltered = (load(["+study=data_quality", f"+quality_arm={arm}"])
                            for arm in ("filtered", "unfiltered"))
    assert program_key(filtered) == program_key(unfiltered)
    assert shape_key(filtered, 2) != shape_key(unfiltered, 2)
    longer = load(["+study=data_quality", "+quality_arm=unfiltered_3x"])
    assert program_key(longer) != program_key(unfiltered)  # its schedule is compiled in


def test_runs_are_scheduled_in_order_and_the_last_ones_speed_up_alone():
    from glam.study.probe import schedule

    assert schedule([3.0, 1.0], 1, 2.0) == ([3.0, 1.0], 4.0)
    assert schedule([4.0, 2.0, 2.0], 2, 1.0) == ([4.0, 2.0, 2.0], 4.0)  # list scheduling
    # Both start; at t = 2 the second ends, the first has 2 s of shared work left: alone, 1 s.
    assert schedule([4.0, 2.0], 2, 2.0) == ([3.0, 2.0], 3.0)
    walls, total = schedule([5.0, 1.0, 1.0, 1.0], 2, 1.5)
    assert walls[1:] == [1.0, 1.0, 1.0] and total == walls[0] and 4.0 < walls[0] < 5.0


def test_a_damaged_or_outdated_calibration_file_counts_as_missing(tmp_path):
    from glam.study.probe import _read

    cache = tmp_path / "calibration.json"
    cache.write_text('{"a": {"setup_cold_s": 1')  # cut short
    assert _read(cache) == {}
    cache.write_text('{"a": {"import_s": 1, "setup_s": 2}}')  # fields of an older version
    assert _read(cache) == {}


@pytest.mark.slow
def test_plan_probe_measures_each_shape_once_and_reuses_the_cache(tmp_path):
    """`glam-plan --probe` over two seeds of one tiny shape probes it once (in a child process),
    estimates both runs from it (the second with a warm compilation cache) and reads the cache
    the next time; a point that cannot run keeps its FLOPs-only estimate and says why."""
    def run(*args):
        return waiting.run([sys.executable, "-m", "glam.cli.plan", "--json", "--probe", *args],
                           600, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(CONF_DIR.parent)})

    args = ["model=tiny_moe", "train.steps=20", "eval.max_examples=4", "train.seed=0,1",
            f"train.compilation_cache_dir={tmp_path}/jax"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert "probing 1 shape(s)" in first.stderr
    rows = json.loads(first.stdout)
    assert [r["estimate"] for r in rows] == ["probe", "probe"]
    assert rows[0]["est_seconds"] > rows[1]["est_seconds"] > 0  # the second loads its programs
    costs = next(iter(json.loads((tmp_path / "outputs/plan/calibration.json").read_text())
                      .values()))
    assert all(v >= 0 for v in costs.values()) and costs["step_s"] > 0
    again = run(*args)
    assert "probing" not in again.stderr and json.loads(again.stdout) == rows
    unprepared = run("model=tiny_dense", "data=pydocs", f"data.prepared_dir={tmp_path}/none")
    assert unprepared.returncode == 0, unprepared.stderr
    assert "no probe for" in unprepared.stderr
    assert json.loads(unprepared.stdout)[0]["estimate"] == "flops"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_optuna_search_is_a_study_and_survives_a_failed_trial(tmp_path):
    """Hydra's Optuna sweeper (the `search` extra): each trial is a child run of the study's
    parent; an interval whose end is invalid, or a failure budget outside [0, 1], is refused
    before any trial, naming the field. A trial that crashes is a FAILED child run with its
    error and the search goes on to its trial count; past `max_failure_rate` the search stops
    and its parent run is FAILED, never RUNNING."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    base = [sys.executable, "-m", "glam.cli.train", "-m", "+study=search_lr_capacity",
            "train.steps=6", "train.batch_size=4", "data.train_tokens=20000",
            "data.val_tokens=2048", "eval.max_examples=4", "faults.crash_at_step=3"]

    def search(*overrides, timeout=600):
        return waiting.run([*base, *overrides], timeout, cwd=tmp_path, env=env)

    for bad, field in [("schedule.learning_rate=interval(-0.01,0.01)", "schedule.learning_rate"),
                       ("hydra.sweeper.max_failure_rate=1.5", "hydra.sweeper.max_failure_rate")]:
        refused = search(bad, "hydra.sweeper.n_trials=2", timeout=300)
        assert refused.returncode != 0 and field in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr
    assert not list((tmp_path / "outputs" / "studies").glob("search_lr_capacity/*/"))

    # 4 trials in batches of 2, the second crashing at step 3; 0.25 of 4 may fail
    proc = search("hydra.sweeper.n_trials=4", "faults.crash_jobs=[1]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("search_lr_capacity").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("study_role") == "parent"]
    trials = [r for r in runs if r.data.tags.get("study_role") == "child"]
    assert len(trials) == 4 and parent.info.status == "FINISHED"
    assert sorted(t.info.status for t in trials) == ["FAILED"] + ["FINISHED"] * 3
    assert parent.data.tags["failed_points"] == "1"
    (crashed,) = [t for t in trials if t.info.status == "FAILED"]
    assert "SimulatedCrash" in crashed.data.tags["error"]
    rates = {float(t.data.params["schedule.learning_rate"]) for t in trials}
    assert len(rates) == 4 and all(3e-4 <= r <= 3e-2 for r in rates)
    assert "Best value" in proc.stdout + proc.stderr
    assert "1 of 4 trials failed" in proc.stdout + proc.stderr

    # no failure allowed: the first batch's crash stops the search, its parent FAILED
    stopped = search("hydra.sweeper.n_trials=4", "faults.crash_jobs=[0]",
                     "hydra.sweeper.max_failure_rate=0", "study.name=search_stops")
    assert stopped.returncode != 0
    exp = client.get_experiment_by_name("search_stops").experiment_id
    runs = client.search_runs([exp])
    (parent,) = [r for r in runs if r.data.tags.get("study_role") == "parent"]
    assert parent.info.status == "FAILED" and len(runs) == 3  # one batch of two trials ran
