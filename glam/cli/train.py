"""`glam-train`: train one GLaM model (dense or MoE) and log it to MLflow.

    glam-train model=cpu_dense train.steps=200
    glam-train -m model=cpu_dense,cpu_moe          # Hydra multirun, one MLflow run each
    glam-train -m +study=expert_count              # a study (sweeps/study/expert_count.yaml)
    glam-train hydra.run.dir=outputs/my_run        # rerun the same line to resume it

The stages: compose (Hydra) -> `glam.resolve.raw` (section checks) -> join the other processes
(`glam.distributed`) -> `glam.resolve.resolve` (derived values, for this backend) -> a study
point may be skipped (`glam.study.runs`) -> `glam.trainer.Trainer`.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from glam.config import Config, ConfigError
from glam.interrupts import Interrupted
from glam.resolve import CONF_DIR, SWEEPS_DIR, raw, resolve

# JAX, MLflow and the trainer are imported where a run starts: `glam-train --help` needs none.

log = logging.getLogger("glam.train")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(dcfg: DictConfig) -> float:
    """Train one point; a configuration error prints its message alone and exits with 2, a stop
    signal exits with 128 + its number."""
    try:
        return _main(dcfg)
    except ConfigError as err:
        print(f"glam-train: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as stop:  # the MLflow run is KILLED, its healthy points published
        log.warning("%s; run the same command again to resume", stop)
        raise SystemExit(stop.exit_code) from None


def cli() -> None:
    """The `glam-train` command: `main`, except that `--help` is answered here at once (Hydra's
    own help loads every option of every config group first: seconds; `--hydra-help` is still
    Hydra's, and `--cfg job` prints the composed config)."""
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(usage())
        return
    main()


def usage() -> str:
    """This module's examples, the config groups with their options, and the studies."""
    groups = sorted(d for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra")
    lines = ["usage: glam-train [-m] [KEY=VALUE ...]", "", *__doc__.split("\n\n")[:2], "",
             "config groups (GROUP=OPTION), from " + str(CONF_DIR) + ":"]
    lines += [f"  {d.name}: {', '.join(sorted(p.stem for p in d.glob('*.yaml')))}"
              for d in groups]
    lines += ["  hydra/launcher: basic, joblib, submitit_local, submitit_slurm, "
              + ", ".join(sorted(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))),
              f"studies (+study=NAME), from {SWEEPS_DIR / 'study'}:",
              "  " + ", ".join(sorted(p.stem for p in (SWEEPS_DIR / "study").glob("*.yaml"))),
              "", "every field and its documentation: glam/config.py",
              "the composed config: glam-train --cfg job [KEY=VALUE ...]",
              "Hydra's own help and flags: glam-train --hydra-help"]
    return "\n".join(lines)


def _main(dcfg: DictConfig) -> float:
    from glam import distributed
    from glam.trainer import run
    from glam.study.runs import point_tags, skip_or_prepare
    from glam.tracking import check_reachable, scrub_password

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "no TPU" on every run
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    hc = HydraConfig.get()
    uri = str(OmegaConf.select(dcfg, "logger.tracking_uri", default=""))
    # Hydra has written the overrides and config (a password in the URI with them) already.
    scrub_password(uri, hc.output_subdir and Path(hc.runtime.output_dir) / hc.output_subdir,
                   Path(hc.sweep.dir) / "multirun.yaml")
    raw_cfg = raw(dcfg)
    if raw_cfg.faults.crash_jobs and hc.job.get("num") not in raw_cfg.faults.crash_jobs:
        raw_cfg.faults.crash_at_step = None  # a test's fault meant for other jobs
    # every check before joining the other processes, which comes before JAX starts
    cfg = resolve(raw_cfg, checked=True,
                  before_backend=lambda: distributed.initialize(raw_cfg.distributed))
    distributed.on_primary(lambda: check_reachable(cfg.logger.tracking_uri) or "")
    if not distributed.is_primary():
        logging.getLogger("glam").setLevel(logging.WARNING)  # process 0 reports progress
    output_dir = Path(hc.runtime.output_dir)
    distributed.agree(str(output_dir.resolve()),
                      "hydra.run.dir (set it to one shared path on every process)")
    tags = point_tags(cfg.study.name)
    if tags is not None:
        done = skip_or_prepare(cfg, output_dir, tags)
        if done:
            log.info("study point %s already finished (MLflow run %s): skipped",
                     tags["study_point"], done)
            return finished_val_loss(cfg.logger.tracking_uri, done)  # a search's objective
    final = run(cfg, output_dir, tags)
    if tags is None and distributed.is_primary():  # a study's end says it for all its points
        print(where_it_is(cfg, output_dir, final["run_id"]))
    return final["val_loss"]


def finished_val_loss(tracking_uri: str, run_id: str) -> float:
    """The final validation loss a finished run recorded (NaN if it has none): a relaunched
    search (Optuna) gets the objective of the trials it had already run."""
    from glam.tracking import client

    return float(client(tracking_uri).get_run(run_id).data.metrics.get("val_loss", math.nan))


def where_it_is(cfg: Config, output_dir: Path, run_id: str) -> str:
    """The lines a single run ends with: where its files and its MLflow run are, and how to
    open the UI on them."""
    from glam.tracking import client, experiment_url, redact, ui_command

    lg = cfg.logger
    experiment = client(lg.tracking_uri).get_run(run_id).info.experiment_id
    return (f"run directory:     {output_dir.resolve()}\n"
            f"MLflow experiment: {lg.experiment} ({redact(lg.tracking_uri)})\n"
            f"MLflow run id:     {run_id}\n"
            f"open the UI:       {ui_command(redact(lg.tracking_uri))}\n"
            f"                   {experiment_url(lg.tracking_uri, experiment)}")


if __name__ == "__main__":
    cli()
