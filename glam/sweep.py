"""Sweeps in MLflow: one parent run per study, each point a child run; finished points skipped.

`SweepCallback` (a Hydra callback, enabled by the sweep configs) runs in the launching process
before any job starts: it refuses a FLOP-matched study whose points break the tolerance, creates
the MLflow database and experiment once (parallel jobs racing to create the sqlite schema is a
known failure), and creates or reopens the study's parent run, whose id it writes to
`<sweep dir>/mlflow_parent.json`. Each job reads the id from there (explicitly, not through
MLFLOW_RUN_ID), tags its run with the sweep point and a hash of its config, and skips itself when
a FINISHED run with the same hash already exists, so running an interrupted sweep again
completes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from glam.tracking import experiment_id

log = logging.getLogger("glam.sweep")
PARENT_FILE = "mlflow_parent.json"


# Fields that do not change what a run computes: left out of the hash. (The device layout is
# among them: a point trained on one mesh or several hosts is the same point.)
_NOT_RESULTS = {"logger": None, "checkpoint": None, "study": None, "mesh": None,
                "distributed": None,
                "train": ("progress", "resume", "log_every"), "eval": ("batch_size",),
                "plan": ("tolerance",)}


def config_hash(resolved: dict) -> str:
    """Identity of a training point: the resolved config without the fields that only say where
    and how it is logged or checkpointed. Code changes are not in it: after a fix that changes
    results, rerun a study into a new experiment (logger.experiment) or delete its runs."""
    core = {}
    for section, value in resolved.items():
        dropped = _NOT_RESULTS.get(section, ())
        if dropped is None:
            continue
        core[section] = ({k: v for k, v in value.items() if k not in dropped}
                         if isinstance(value, dict) else value)
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Hydra turns a callback's exceptions into warnings; a refused sweep must stop here.
        try:
            self._start(config)
        except Exception as err:
            log.error("sweep refused: %s", err)
            raise SystemExit(f"glam sweep refused before launch: {err}") from err

    def _start(self, config: DictConfig) -> None:
        from glam.plan import plan

        study = config.study.name or "sweep"
        if config.study.match_flops:
            plan(list(config.hydra.overrides.task))  # raises ConfigError naming bad points
        client = MlflowClient(config.logger.tracking_uri)
        exp_id = experiment_id(client, config.logger.experiment)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parent_file = sweep_dir / PARENT_FILE
        identity = {"study": study, "tracking_uri": config.logger.tracking_uri,
                    "experiment_id": exp_id}
        saved = json.loads(parent_file.read_text()) if parent_file.exists() else {}
        parent = saved.get("run_id") if {k: saved.get(k) for k in identity} == identity else None
        if parent is not None and _run_exists(client, parent):
            client.update_run(parent, status="RUNNING")
            log.info("reopened MLflow parent run %s of study %s", parent, study)
        else:
            run = client.create_run(exp_id, run_name=study,
                                    tags={"sweep": study, "sweep_role": "parent",
                                          "sweep_dir": str(sweep_dir.resolve())})
            parent = run.info.run_id
            client.log_param(parent, "overrides", " ".join(config.hydra.overrides.task))
            parent_file.write_text(json.dumps({"run_id": parent, **identity}))
            log.info("MLflow parent run %s for study %s", parent, study)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        # Only reached when every job returned: a failed job leaves the parent RUNNING, and
        # running the study again completes it.
        parent_file = Path(config.hydra.sweep.dir) / PARENT_FILE
        if parent_file.exists():
            client = MlflowClient(config.logger.tracking_uri)
            client.set_terminated(json.loads(parent_file.read_text())["run_id"], "FINISHED")


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST) or a different store
        return False


def adopt(tracking_uri: str, run_id: str, tags: dict) -> None:
    """Re-tag a finished run skipped by this invocation as a child of its parent."""
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def sweep_context(cfg_study_name: str | None) -> dict | None:
    """For a job of a multirun: its parent run id and sweep tags; None for a single run."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    parent_file = Path(hc.sweep.dir) / PARENT_FILE
    parent = json.loads(parent_file.read_text())["run_id"] if parent_file.exists() else None
    point = hc.job.override_dirname or f"job{OmegaConf.select(hc, 'job.num', default=0)}"
    tags = {"sweep": cfg_study_name or Path(hc.sweep.dir).name, "sweep_point": point,
            "sweep_role": "child"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    return {"parent": parent, "tags": tags}


def finished_run(tracking_uri: str, experiment: str, hash_: str) -> str | None:
    """Id of a FINISHED run of `experiment` with this config hash, if any."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.config_hash = '{hash_}' and "
                                            "attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None
