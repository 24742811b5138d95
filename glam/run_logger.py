"""A training run's MLflow record: params, tags, metric points, artifacts.

Process 0 opens (or, on resume, reopens) the MLflow run and writes to it; the other processes of
a multi-host run hold a `SilentTracker` with the same run id and write nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from glam import distributed
from glam.accounting import Counts, short_count
from glam.config import ConfigError
from glam.identity import config_hash
from glam.ledger import Entries
from glam.resolve import CONF_DIR, ResolvedConfig, to_container
from glam.tracking import SilentTracker, Tracker, redact, scrub

log = logging.getLogger("glam.run_logger")


def git_sha() -> str:
    """The code version: $GLAM_GIT_SHA, else the checkout's HEAD, else `glam-<version>` from
    the installed package's metadata."""
    if os.environ.get("GLAM_GIT_SHA"):
        return os.environ["GLAM_GIT_SHA"]
    checkout = CONF_DIR.parent
    if (checkout / ".git").exists():
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, text=True,
                                 capture_output=True, timeout=10)
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    try:
        return f"glam-{metadata.version('glam')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def run_name(cfg: ResolvedConfig, activated_params: int) -> str:
    """What tells a run from its neighbours first, so the MLflow UI's narrow name column shows
    it: family and experts (granularity, shared experts, bias balancing, upcycled), activated
    size, training tokens, data filter, seed. E.g. `moe-E8-1.2M-1.02Mtok-s0`,
    `moe-E8G4-S1-bias-up-1.2M-1.02Mtok-s0`, `dense-156K-3.07Mtok-pareto-s1`."""
    m = cfg.model
    family = "dense"
    if m.family == "moe":
        family = f"moe-E{m.n_experts}" + (f"G{m.granularity}" if m.granularity > 1 else "")
        family += f"-S{m.shared_experts}" if m.shared_experts else ""
        family += f"-{m.router.balance}" if m.router.balance != "aux" else ""
        family += "-up" if cfg.train.init_from else ""
    tokens = cfg.train.steps * cfg.train.batch_size * m.seq_len
    quality = getattr(cfg.data, "quality", None)
    selection = getattr(quality, "selection", None)
    arm = f"-{selection}" if selection not in (None, "none") else ""
    return (f"{family}-{short_count(activated_params)}-{short_count(tokens)}tok{arm}"
            f"-s{cfg.train.seed}")


RUN_FILE = "mlflow_run.json"


def previous_run_id(output_dir: Path, config_hash_: str) -> str | None:
    """The MLflow run an earlier attempt opened in `output_dir`, if any.

    Raises:
      ConfigError: that run was opened for another config.
    """
    path = output_dir / RUN_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s): a new MLflow run is opened", path, err)
        return None
    if saved["config_hash"] != config_hash_:
        raise ConfigError(f"{output_dir} holds MLflow run {saved['run_id']} of another config "
                          f"(config hash {saved['config_hash']}, now {config_hash_}); use a new "
                          "hydra.run.dir, or the config it was opened for.")
    return saved["run_id"]


class RunLogger:
    """The MLflow run of one training run. Use as a context manager: the run ends FINISHED, or
    FAILED (KILLED on Ctrl-C) on error."""

    def __init__(self, cfg: ResolvedConfig, counts: Counts, data_facts: dict, fingerprint: str,
                 output_dir: Path, extra_tags: dict | None = None, run_id: str | None = None):
        """Open the run on process 0; every process learns its id. Exactly one MLflow run per
        run directory: `run_id` (a checkpoint's run) is reopened; without it, the run an earlier
        attempt opened here (`mlflow_run.json`, written as soon as a run is opened) is reopened,
        so an interruption before the first checkpoint opens no second run.

        Raises:
          ConfigError: the run directory's run belongs to another config (config hash).
          mlflow.exceptions.MlflowException: the store failed (on every process).

        Args:
          data_facts: corpus facts logged as `corpus.*` params (vocabulary, knowledge bits).
          fingerprint: the data fingerprint (tag `data_fingerprint`).
          extra_tags: the study point's tags (`glam.study.runs.point_tags`).
        """
        self.output_dir, self.counts = output_dir, counts
        self.primary = distributed.is_primary()
        m, lg, c = cfg.model, cfg.logger, counts
        resolved = to_container(cfg)
        resolved["logger"]["tracking_uri"] = redact(lg.tracking_uri)  # never log a password
        self.config_path = output_dir / "config.yaml"
        if self.primary:  # (Hydra writes .hydra/ on every process)
            from omegaconf import OmegaConf

            self.config_path.write_text(OmegaConf.to_yaml(resolved))
        params = {**resolved, "counts": c.as_dict(), "corpus": data_facts}
        tags = {"model": m.name, "family": m.family, "n_experts": m.n_experts, "top_k": m.top_k,
                "granularity": m.granularity, "shared_experts": m.shared_experts,
                "total_params": c.total_params, "activated_params": c.activated_params,
                "forward_flops_per_token": c.forward_flops_per_token, "seed": cfg.train.seed,
                "dispatch": m.router.dispatch, "git_sha": (sha := git_sha()),
                # MLflow's own source fields (the run page's Source and Git commit)
                "mlflow.source.git.commit": sha, "mlflow.source.type": "LOCAL",
                "mlflow.source.name": scrub(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                                            lg.tracking_uri)[:500],
                "data_fingerprint": fingerprint, "config_hash": config_hash(cfg),
                "output_dir": str(output_dir), **(extra_tags or {})}
        name = lg.run_name or run_name(cfg, c.activated_params)
        opened: list[Tracker] = []

        def open_run() -> str:
            previous = run_id or previous_run_id(output_dir, tags["config_hash"])
            tracker = Tracker(lg.tracking_uri, lg.experiment, name, params, tags, run_id=previous,
                              outage_timeout_s=lg.outage_timeout_s)
            opened.append(tracker)
            tmp = output_dir / f".{RUN_FILE}.tmp"
            tmp.write_text(json.dumps({"run_id": tracker.run_id,
                                       "config_hash": tags["config_hash"]}))
            tmp.replace(output_dir / RUN_FILE)  # whole or not at all
            if tracker.recovered:
                tracker.set_tag("recovered", tracker.recovered)
            return tracker.run_id

        shared_id = distributed.on_primary(open_run)
        self.tracker = opened[0] if opened else SilentTracker(shared_id)
        self.run_id = self.tracker.run_id
        d = cfg.data
        source = (f"generated world, seed {d.seed}" if d.kind == "world"
                  else str(d.prepared_dir or d.kind))
        self.tracker.log_dataset(f"{d.kind}-train", fingerprint, source,
                                 json.dumps({"kind": str(d.kind), **data_facts}, default=str))

    def publish(self, entries: Entries) -> int:
        """Hand metric points (step, {name: value}) to the writer; returns its ticket (stored
        once `confirmed` reaches it)."""
        for step, metrics in entries:
            self.tracker.log_metrics(step, metrics)
        return self.tracker.flush()

    @property
    def confirmed(self) -> int:
        """The writer's last stored ticket."""
        return self.tracker.confirmed

    def set_tag(self, key: str, value: str) -> None:
        """Set a run tag now (rollbacks are recorded this way)."""
        self.tracker.set_tag(key, value)

    def attach(self, paths: list[Path]) -> None:
        """Process 0: attach existing files to the run as they are (the prepared data's
        manifest and tokenizer)."""
        if self.primary:
            for path in paths:
                self.tracker.log_artifact(path)

    def export_model(self, params: dict, cfg: ResolvedConfig, tokenizer) -> None:
        """Process 0: write the trained model (`glam.export`) into `<run dir>/model/` and
        attach it as the run's `model/` artifact; optionally register it
        (`logger.register_model`)."""
        if not self.primary:
            return
        from glam import export

        t = cfg.train
        tokens = t.steps * t.batch_size * cfg.model.seq_len
        trained = {"steps": t.steps, "tokens": tokens,
                   "train_flops": float(tokens * self.counts.train_flops_per_token)}
        folder = export.save(self.output_dir / export.FOLDER, params, cfg.model, tokenizer,
                             self.run_id, trained)
        self.tracker.log_artifacts(folder, export.FOLDER)
        if cfg.logger.register_model:
            self.tracker.register_model(cfg.logger.register_model, export.FOLDER)

    def write_artifacts(self, files: dict[str, object], predictions: list[dict]) -> None:
        """Process 0: write `files` as JSON and `predictions` as JSONL into the run directory,
        and attach them and the resolved config to the MLflow run."""
        if not self.primary:
            return
        paths = [self.config_path]
        for name, content in files.items():
            paths.append(self.output_dir / name)
            paths[-1].write_text(json.dumps(content, indent=1))
        paths.append(self.output_dir / "eval_predictions.jsonl")
        paths[-1].write_text("".join(json.dumps(p) + "\n" for p in predictions))
        for path in paths:
            self.tracker.log_artifact(path)

    def __enter__(self) -> "RunLogger":
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.tracker.__exit__(*exc)
