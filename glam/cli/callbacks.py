"""The Hydra callbacks of glam-train's multiruns (enabled by conf/config.yaml and
sweeps/study/base.yaml), run in the launching process around the jobs.

`MultirunCheck` refuses an empty multirun before launch. `StudyCallback` checks a study's points
(`glam.study.plan`, the FLOP match), creates the MLflow database and experiment once (parallel
jobs racing to create the sqlite schema is a known failure) and creates or reopens the study's
parent run, whose id it writes to `<study dir>/mlflow_parent.json` for the jobs
(`glam.study.runs.point_tags`). At the end it reports the study (`analysis.summary`) on the
terminal and the parent run; a study stopped by a failure ends its parent FAILED.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from glam import tracking
from glam.config import ConfigError
from glam.study.plan import plan
from glam.study.points import expand
from glam.study.runs import PARENT_FILE
from glam.study.search import check_failure_rate
from glam.tracking import check_reachable, experiment_id, redact, scrub

log = logging.getLogger("glam.study")


class MultirunCheck(Callback):
    """Refuses, before any job starts, a multirun whose overrides select no point (an empty
    `range(0,0)` would otherwise launch nothing and exit 0). conf/config.yaml enables it for
    every multirun; a study replaces it with `StudyCallback`, which does more."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Hydra turns a callback's exceptions into warnings; a refused multirun must stop here.
        try:
            check_failure_rate(OmegaConf.select(config, "hydra.sweeper.max_failure_rate",
                                                default=0.0))
            self._start(config)
        except Exception as err:
            log.error("multirun refused: %s", err)
            print(f"glam-train: refused before launch: {err}", file=sys.stderr)
            raise SystemExit(2) from err

    def _start(self, config: DictConfig) -> None:
        if not expand(list(config.hydra.overrides.task)):
            raise ConfigError("the overrides select no point (an empty sweep such as "
                              "range(0,0)); give at least one value to every swept key.")


class StudyCallback(MultirunCheck):
    """Checks a study and opens its MLflow parent run before the first job; closes it after."""

    def _start(self, config: DictConfig) -> None:
        study = config.study.name or "study"
        check_reachable(config.logger.tracking_uri)
        # ConfigError: no point, a bad point, or a broken FLOP match (study.match_flops)
        plan(list(config.hydra.overrides.task))
        client = tracking.client(config.logger.tracking_uri)
        exp_id = experiment_id(client, config.logger.experiment)
        study_dir = Path(config.hydra.sweep.dir)
        study_dir.mkdir(parents=True, exist_ok=True)
        parent_file = study_dir / PARENT_FILE
        identity = {"study": study, "tracking_uri": redact(config.logger.tracking_uri),
                    "experiment_id": exp_id}
        saved = json.loads(parent_file.read_text()) if parent_file.exists() else {}
        parent = saved.get("run_id") if {k: saved.get(k) for k in identity} == identity else None
        if parent is not None and _run_exists(client, parent):
            client.update_run(parent, status="RUNNING")
            log.info("reopened MLflow parent run %s of study %s", parent, study)
        else:
            run = client.create_run(exp_id, run_name=study,
                                    tags={"study": study, "study_role": "parent",
                                          "study_dir": str(study_dir.resolve())})
            parent = run.info.run_id
            client.log_param(parent, "overrides", scrub(" ".join(config.hydra.overrides.task),
                                                        config.logger.tracking_uri))
            parent_file.write_text(json.dumps({"run_id": parent, **identity}))
            log.info("MLflow parent run %s for study %s", parent, study)
        # Hydra skips on_multirun_end when the sweep raises (a failed point, a search past its
        # failure budget): the parent then ends FAILED at exit, never left RUNNING. Running the
        # study again reopens it and completes the points that did not finish.
        self._open = (config.logger.tracking_uri, parent)
        atexit.register(self._end_failed)

    def _end_failed(self) -> None:
        if getattr(self, "_open", None):
            uri, parent = self._open
            self._open = None
            client = tracking.client(uri)
            _tag_failed_points(client, parent)
            client.set_terminated(parent, "FAILED")
            print(f"glam-train: the study did not finish; its MLflow parent run {parent} is "
                  "FAILED. Run the same command again to complete it.", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._open = None
        parent_file = Path(config.hydra.sweep.dir) / PARENT_FILE
        if parent_file.exists():
            client = tracking.client(config.logger.tracking_uri)
            parent = json.loads(parent_file.read_text())["run_id"]
            try:
                report(client, config.logger.tracking_uri, config.study.name or "study", parent)
                _tag_failed_points(client, parent)
            finally:
                client.set_terminated(parent, "FINISHED")


def _tag_failed_points(client: MlflowClient, parent: str) -> None:
    """Tags the parent with its FAILED children's count (`failed_points`, 0 when none) and
    warns with each one's point and error: a search may finish with failed trials within its
    budget (`glam.study.search`)."""
    experiment = client.get_run(parent).info.experiment_id
    failed = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}' "
                                              "and attributes.status = 'FAILED'")
    client.set_tag(parent, "failed_points", str(len(failed)))
    for run in failed:
        log.warning("study point %s failed (MLflow run %s): %s",
                    run.data.tags.get("study_point", "?"), run.info.run_id,
                    run.data.tags.get("error", "no error recorded"))


def report(client: MlflowClient, tracking_uri: str, study: str, parent: str) -> None:
    """A finished study's summary: on its parent run, the per-point table (artifact
    `study_points.json`) and the headline comparison as metrics; on the terminal, the table and
    the commands that analyse and show it. A summary that fails is logged, never fatal: the
    points are all in MLflow already."""
    try:
        from analysis.runs import load_runs
        from analysis.summary import headline, points, print_summary

        table = load_runs(tracking_uri, parent_run_id=parent)
        if not table.empty:
            client.log_table(parent, points(table), "study_points.json")
            for key, value in headline(table).items():
                client.log_metric(parent, key, value)
            print(f"\nstudy {study}: {len(table)} finished runs (MLflow parent run {parent})")
            print_summary(table)
    except Exception as err:  # noqa: BLE001 - the summary is a convenience
        log.warning("no summary of study %s: %s", study, err)
    experiment = client.get_run(parent).info.experiment_id
    print(f"analyse it:  glam-analyze --study {study}   (figures in outputs/analysis/{study}/)\n"
          f"open the UI: {tracking.ui_command(redact(tracking_uri))}\n"
          f"             {tracking.experiment_url(tracking_uri, experiment)}")


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST) or a different store
        return False
