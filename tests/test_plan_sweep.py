"""Planning at fixed activated FLOPs, sweep composition, and real multiruns into MLflow."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from glam.config import CONF_DIR, ConfigError
from glam.count import load
from glam.plan import dense_counterpart, flops, plan, sweep_points

SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml") if p.stem != "base")


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
    rows = plan(["+sweep=expert_count"])
    assert sorted({r.n_experts for r in rows}) == [0, 2, 4, 8, 16, 32]
    dense = next(r for r in rows if r.family == "dense").forward_flops_per_token
    assert all(abs(r.forward_flops_per_token / dense - 1) <= 0.02 for r in rows)
    with pytest.raises(ConfigError, match=r"plan.tolerance: 10 sweep point\(s\)") as err:
        plan(["+sweep=expert_count", "plan.placement=glam"])  # experts as wide as the FFN
    assert "model.n_experts=32 train.seed=1" in str(err.value)


def test_a_series_without_its_dense_point_is_still_checked():
    with pytest.raises(ConfigError, match=r"plan.tolerance: 6 sweep point"):
        plan(["+sweep=expert_count", "plan.placement=glam", "model.n_experts=8,16,32"])


def test_a_fixed_override_replaces_the_swept_values():
    points = sweep_points(["+sweep=expert_count", "model.n_experts=64"])
    assert len(points) == 2 and all("model.n_experts=64" in p for p in points)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_composes(sweep):
    points = sweep_points([f"+sweep={sweep}"])
    assert len(points) >= 2
    for point in points:
        cfg = load(point)  # validates; paper-scale points are counted, never allocated
        assert cfg.study.name == sweep and cfg.logger.experiment == sweep


def test_comma_overrides_are_sweep_axes():
    assert len(sweep_points(["+sweep=smoke", "train.seed=0,1,2"])) == 6


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for launcher in ("joblib", "submitit_slurm"):
            cfg = compose("config", overrides=["+sweep=smoke", f"hydra/launcher={launcher}"],
                          return_hydra_config=True)
            assert launcher.split("_")[0] in cfg.hydra.launcher._target_.lower()


def _multirun(tmp_path, *overrides):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "glam.train", "-m", "+sweep=smoke", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_joblib_multirun_parent_children_and_rerun_skips(tmp_path):
    _multirun(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep_role") == "child"]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        for key in ("sweep", "sweep_point", "family", "n_experts", "activated_params",
                    "forward_flops_per_token", "seed", "config_hash"):
            assert key in tags, key
    assert sorted(c.data.tags["sweep_point"] for c in children) == [
        "model.n_experts=0", "model.n_experts=4"]
    saved = json.loads((tmp_path / "outputs/sweeps/smoke/mlflow_parent.json").read_text())
    assert saved["run_id"] == parent.info.run_id

    _multirun(tmp_path)  # the same sweep again: both points are skipped
    again = client.search_runs([exp.experiment_id])
    assert {r.info.run_id for r in again} == {r.info.run_id for r in runs}  # nothing new


def test_a_mismatched_sweep_is_refused_before_any_job(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "glam.train", "-m", "+sweep=expert_count", "plan.placement=glam"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "plan.tolerance" in proc.stderr and "model.n_experts=32" in proc.stderr
    assert not (tmp_path / "outputs" / "sweeps" / "expert_count").exists() or not list(
        (tmp_path / "outputs" / "sweeps" / "expert_count").glob("model.n_experts=*"))


def test_config_hash_ignores_logging_and_checkpointing_only():
    from omegaconf import OmegaConf

    from glam.sweep import config_hash

    def hash_of(*overrides):
        return config_hash(OmegaConf.to_container(OmegaConf.structured(load(list(overrides)))))

    base = hash_of()
    assert hash_of("logger.experiment=x", "checkpoint.every=7", "train.progress=false") == base
    assert hash_of("train.seed=3") != base and hash_of("model.n_experts=4") != base


def test_stale_checkpoints_of_an_edited_point_are_set_aside(tmp_path):
    from glam.train import set_aside_stale_checkpoints

    set_aside_stale_checkpoints(tmp_path, "aaa")
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    set_aside_stale_checkpoints(tmp_path, "aaa")  # same config: kept for resuming
    assert (tmp_path / "checkpoints" / "10").is_dir()
    set_aside_stale_checkpoints(tmp_path, "bbb")  # edited config: moved, not deleted
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "checkpoints.stale-aaa" / "10").is_dir()
    assert (tmp_path / "config_hash.txt").read_text().strip() == "bbb"
