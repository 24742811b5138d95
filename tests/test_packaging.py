"""A non-editable install works: the wheel ships conf/ and the studies, and runs outside a
checkout (the git SHA then falls back to the package version)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import waiting

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "mlflow.db", "build",
                                "dist", "*.egg-info", "__pycache__", ".pytest_cache", "docs")


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains_from_another_directory(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=IGNORE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("glam-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The dependencies come from this environment's site-packages (a plain path entry: its
    # .pth files, among them the editable install of the checkout, are not processed).
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], capture_output=True, text=True, check=True).stdout
    Path(site.strip(), "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GLAM_GIT_SHA")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"

    def run(*cmd):
        out = waiting.run(cmd, 600, cwd=work, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    where = run(str(python), "-c", "import glam.resolve as r; print(r.__file__, r.CONF_DIR)")
    assert str(REPO) not in where and "site-packages" in where
    counts = json.loads(run(str(venv / "bin" / "glam-count"), "model=tiny_moe"))
    assert counts["family"] == "moe" and counts["total_params"] > 0
    assert "total estimated time" in run(str(venv / "bin" / "glam-plan"), "+study=smoke")
    for cli in ("glam-train", "glam-count", "glam-plan", "glam-bench", "glam-analyze",
                "glam-data", "glam-generate"):  # every command says what it takes
        assert "usage" in run(str(venv / "bin" / cli), "--help").lower(), cli
    said = run(str(venv / "bin" / "glam-train"), "model=tiny_moe", "train.steps=5",
        "train.batch_size=4", "checkpoint.every=0", "train.eval_batches=1",
        "data.train_tokens=5000", "data.val_tokens=2000", "eval.max_examples=4",
        "eval.shots=[0]", "train.progress=false", "hydra.run.dir=run")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run_,) = client.search_runs([client.get_experiment_by_name("glam").experiment_id])
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["git_sha"] == "glam-0.1.0"
    # a single run ends by saying where it is
    assert f"run directory:     {work / 'run'}" in said
    assert "step 5/5 (100%): loss" in said  # the progress line, with the bar off
    assert f"MLflow run id:     {run_.info.run_id}" in said
    assert f"mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}" in said
    assert (work / "run" / "final_metrics.json").is_file()


@pytest.mark.slow
def test_the_install_extras_resolve(tmp_path):
    """`pip install '.[gpu]'`, '.[tpu]' and '.[search]' resolve against the index at the pinned
    JAX (one resolution of the three together: they are installed side by side too)."""
    report = tmp_path / "report.json"
    out = waiting.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                       "--ignore-installed", "--no-build-isolation", "--report", str(report),
                       f"{REPO}[gpu,tpu,search]"], 600)
    assert out.returncode == 0, out.stderr[-3000:]
    names = {item["metadata"]["name"].lower(): item["metadata"]["version"]
             for item in json.loads(report.read_text())["install"]}
    for extra, expected in [("gpu", {"jax-cuda12-plugin", "jax-cuda12-pjrt"}),
                            ("tpu", {"libtpu"}), ("search", {"hydra-optuna-sweeper", "optuna"})]:
        assert expected <= set(names), (extra, sorted(names))
    assert names.get("jax", "0.10.2") == "0.10.2"
