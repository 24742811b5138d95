"""A study in MLflow, as each of its jobs sees it: one parent run, each point a child run;
finished points skipped.

The launching process opens the parent run (`glam.cli.callbacks.StudyCallback`) and writes its
id to `<study dir>/mlflow_parent.json`. Each job reads the id from there (explicitly, not through
MLFLOW_RUN_ID), tags its run with the study point and its config hash (`glam.identity`), and
skips itself when a FINISHED run with the same hash exists, so running an interrupted study
again completes it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from glam.identity import config_hash
from glam.resolve import ResolvedConfig
from glam.run_logger import RUN_FILE
from glam import distributed, tracking

log = logging.getLogger("glam.study")
PARENT_FILE = "mlflow_parent.json"


def point_tags(study_name: str | None) -> dict | None:
    """For a job of a multirun: the MLflow tags of its child run (study, point, role, parent
    run id when a study opened one); None for a single run.

    Raises:
      ValueError: called outside a Hydra app (HydraConfig is not set).
    """
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    parent_file = Path(hc.sweep.dir) / PARENT_FILE
    parent = json.loads(parent_file.read_text())["run_id"] if parent_file.exists() else None
    point = hc.job.override_dirname or f"job{OmegaConf.select(hc, 'job.num', default=0)}"
    tags = {"study": study_name or Path(hc.sweep.dir).name, "study_point": point,
            "study_role": "child"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def finished_run(tracking_uri: str, experiment: str, hash_: str) -> str | None:
    """Id of a FINISHED run of `experiment` with config hash `hash_`, if any.

    Raises:
      mlflow.exceptions.MlflowException: the tracking store cannot be read.
    """
    client = tracking.client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.config_hash = '{hash_}' and "
                                            "attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def set_aside_stale_checkpoints(output_dir: Path, hash_: str) -> None:
    """A point's directory is named by its overrides, so an edited study reuses it: checkpoints
    of the old config are moved aside (not deleted) and the point starts afresh.

    Raises:
      OSError: the run directory cannot be written.
    """
    marker = output_dir / "config_hash.txt"
    old = marker.read_text().strip() if marker.exists() else hash_
    if old != hash_ and (output_dir / "checkpoints").exists():
        stale = output_dir / f"checkpoints.stale-{old}"
        (output_dir / "checkpoints").rename(stale)
        log.warning("the config of this point changed: old checkpoints moved to %s", stale)
    if old != hash_ and (output_dir / RUN_FILE).exists():  # the old config's MLflow run
        (output_dir / RUN_FILE).rename(output_dir / f"{RUN_FILE}.stale-{old}")
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(hash_ + "\n")


def skip_or_prepare(cfg: ResolvedConfig, output_dir: Path, tags: dict) -> str | None:
    """Before a study point trains: the id of a FINISHED run of the same point (re-tagged as a
    child of this study's parent), or None after setting aside checkpoints of an edited point.
    Process 0 alone talks to MLflow; every process gets the answer.

    Raises:
      mlflow.exceptions.MlflowException: the tracking store cannot be read (on every process).
    """
    hash_ = config_hash(cfg)
    lg = cfg.logger

    def decide() -> str:
        done = finished_run(lg.tracking_uri, lg.experiment, hash_)
        if done:
            client = tracking.client(lg.tracking_uri)
            for key, value in tags.items():
                client.set_tag(done, key, value)
        else:
            set_aside_stale_checkpoints(output_dir, hash_)
        return done or ""

    return distributed.on_primary(decide) or None
