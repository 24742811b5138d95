"""MLflow logging for a training run: params, tags, buffered metrics, artifacts.

Metrics are buffered and written with `log_batch` (one sqlite transaction per flush instead of
one per point, ~80x faster).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from glam.config import ConfigError

log = logging.getLogger("glam.tracking")

# MLflow's HTTP client retries a failed request up to 7 times with doubling waits (minutes)
# before it reports; glam's writer retries on its own, so it asks for a quick answer instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

_MAX_PARAMS_PER_CALL = 100
_MAX_METRICS_PER_CALL = 1000
_MAX_PARAM_VALUE = 6000  # characters; MLflow refuses longer values


def redact(uri: str) -> str:
    """`uri` without the secret of its user-info part: the password (`http://user:***@host`),
    or a lone token (`https://***@host`)."""
    parts = urllib.parse.urlsplit(uri) if "://" in uri else None
    if parts is None or "@" not in parts.netloc:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    safe = f"{user}:***" if colon else "***"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{safe}@{host}"))


def scrub(text: str, uri: str) -> str:
    """`text` with every appearance of `uri`'s secret (`redact`) replaced by ***."""
    parts = urllib.parse.urlsplit(uri) if "://" in uri else None
    if parts is None or "@" not in parts.netloc:
        return text
    userinfo = parts.netloc.rpartition("@")[0]
    secret = userinfo.partition(":")[2] or userinfo
    return text.replace(uri, redact(uri)).replace(secret, "***") if secret else text


def scrub_password(uri: str, *paths: Path) -> None:
    """Replace the password of `uri` by *** in the files at `paths` (files, or folders of YAML
    files: what Hydra writes before glam runs); a URI without a password changes nothing."""
    if redact(uri) == uri:
        return
    files = [f for p in paths if p is not None and p.exists()
             for f in ([p] if p.is_file() else p.rglob("*.yaml"))]
    for file in files:
        text = file.read_text()
        clean = scrub(text, uri)
        if clean != text:  # replaced whole (parallel jobs may scrub the same multirun.yaml)
            tmp = file.with_name(f".{file.name}.{os.getpid()}")
            tmp.write_text(clean)
            tmp.replace(file)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Refuse, within `timeout` seconds, a tracking URI nothing answers at: an http(s) server
    whose /health does not respond, or a sqlite file in a folder that does not exist.

    Raises:
      ConfigError (`logger.tracking_uri`): with the URI (password hidden) and the fix.
    """
    scheme = uri.partition("://")[0]
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri)
        bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        request = urllib.request.Request(f"{bare.rstrip('/')}/health")
        if parts.username is not None:  # urllib does not take credentials from the URL
            token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode())
            request.add_header("Authorization", f"Basic {token.decode()}")
        try:
            urllib.request.urlopen(request, timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # the server answered (a 401 or 404 is still a server there)
        except (OSError, ValueError) as err:
            raise ConfigError(f"logger.tracking_uri: no MLflow server answers at {redact(uri)} "
                              f"within {timeout:.0f} s ({scrub(str(err), uri)}); start it, or fix "
                              "the URI.") from None
    elif scheme == "sqlite":
        folder = (Path.cwd() / uri[len("sqlite:///"):]).parent  # an absolute path replaces cwd
        if not folder.is_dir():
            raise ConfigError(f"logger.tracking_uri: {uri}: the folder {folder} does not exist; "
                              "create it or point the sqlite file elsewhere.")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient whose store is ready. A sqlite database is created or upgraded under an
    exclusive file lock (`<db>.lock`): several processes opening a new database at once would
    otherwise race in its schema migrations and can leave it unusable."""
    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri)
    lock_path = Path(tracking_uri[len("sqlite:///"):] + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            new = MlflowClient(tracking_uri)
            new.search_experiments(max_results=1)  # creates, upgrades or checks the schema
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return new


# MLflow 3 opens an experiment without this tag in its GenAI view (traces, evaluations); this
# value opens the model-training view (runs, charts).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of experiment `name`, created if missing (safe when parallel jobs race to create it),
    and marked as a model-training experiment (`EXPERIMENT_KIND`)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
        except MlflowException:
            pass  # another job created it
        exp = client.get_experiment_by_name(name)
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        try:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        except MlflowException as err:  # e.g. no permission to edit a shared experiment
            log.warning("experiment %s keeps its view (%s)", name, str(err).splitlines()[0])
    return exp.experiment_id


# MLflow errors that retrying cannot fix (a bad key, a run in the wrong state); anything else
# (connection refused, timeouts, 5xx, a locked database) is treated as an outage and retried.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
              "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def _permanent(err: Exception) -> bool:
    """An error that retrying cannot fix: MLflow refusing the write, or a local fault (a
    missing or unreadable artifact file, a bad value); network errors are not among them."""
    if isinstance(err, MlflowException):
        return err.error_code in _PERMANENT
    return isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, TypeError,
                            ValueError))


class TrackingError(RuntimeError):
    """MLflow refused the run's records, or stayed unreachable past `logger.outage_timeout_s`."""


class Tracker:
    """One MLflow run. Use as a context manager: the run ends FINISHED, or FAILED on error
    (KILLED on KeyboardInterrupt), always, even when the last writes fail.

    With `run_id`, an existing run is continued (a resumed training run): it is set RUNNING
    again, its params are left as they are, and metric points at steps it already holds are not
    written twice. A run that was deleted is restored; one the store does not have (purged, or
    another store) is replaced by a new run. Either way `recovered` says what happened.

    Writes (metric batches, tags, artifacts) go to a background thread in order, so training
    never waits on the tracking store: during an outage they are kept and retried with backoff,
    and published on recovery; only after `outage_timeout_s` seconds of failures, or an error
    retrying cannot fix, does the run fail (`TrackingError` at the next flush or at the end).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None,
                 params: Mapping[str, Any], tags: Mapping[str, str], run_id: str | None = None,
                 outage_timeout_s: float = 600.0):
        self.client = client(tracking_uri)
        self.tracking_uri = tracking_uri
        self.outage_timeout_s = outage_timeout_s
        self._buffer: list[Metric] = []
        self._logged_until: dict[str, int] = {}
        self.recovered: str | None = None
        if run_id is not None:
            try:
                stage = self.client.get_run(run_id).info.lifecycle_stage
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # an outage is not a missing run: never open a second one for it
                stage = None
            if stage == "deleted":
                self.client.restore_run(run_id)
                self.recovered = f"MLflow run {run_id} had been deleted: restored"
            elif stage is None:
                self.recovered = (f"MLflow run {run_id} is not in {redact(tracking_uri)}: "
                                  "continuing in a new run")
                run_id = None
            if self.recovered:
                log.warning("%s", self.recovered)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            for key in self.client.get_run(run_id).data.metrics:
                history = self.client.get_metric_history(run_id, key)
                self._logged_until[key] = max(m.step for m in history)
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        else:
            exp_id = experiment_id(self.client, experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            items = [Param(k, str(v)[:_MAX_PARAM_VALUE]) for k, v in flatten(params).items()]
            for i in range(0, len(items), _MAX_PARAMS_PER_CALL):
                self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_CALL])
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self._queue: queue.Queue = queue.Queue()
        self._error: TrackingError | None = None
        self._tickets = 0  # metric batches handed to the writer
        self.confirmed = 0  # the last of them stored (batches are written in order)
        self._writer = threading.Thread(target=self._write_forever, name="mlflow-writer",
                                        daemon=True)
        self._writer.start()

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Buffer points of `step` (skipping keys the run already holds at this step)."""
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if step > self._logged_until.get(k, -1):  # each step once, whatever republishes it
                self._buffer.append(Metric(k, float(v), now, step))
                self._logged_until[k] = step

    def set_tag(self, key: str, value: str) -> None:
        self._queue.put((self.client.set_tag, (self.run_id, key, value), 0))

    def flush(self) -> int:
        """Hand the buffered points to the writer (returns at once); returns the ticket of the
        last batch handed over: they are stored once `confirmed` reaches it.

        Raises:
          TrackingError: an earlier write failed for good.
        """
        if self._error is not None:
            raise self._error
        for i in range(0, len(self._buffer), _MAX_METRICS_PER_CALL):
            self._tickets += 1
            batch = self._buffer[i : i + _MAX_METRICS_PER_CALL]
            self._queue.put((self._log_metrics, (batch,), self._tickets))
        self._buffer.clear()
        return self._tickets

    def _log_metrics(self, batch: list[Metric]) -> None:
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path) -> None:
        self._queue.put((self.client.log_artifact, (self.run_id, str(path)), 0))

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        """Attach every file under `folder` as `artifact_path/...`."""
        self._queue.put((self.client.log_artifacts, (self.run_id, str(folder), artifact_path), 0))

    def register_model(self, name: str, artifact_path: str) -> None:
        """A new version of registered model `name` (created if missing) whose source is this
        run's `artifact_path`, after the writes before it; none when this run already has a
        version of `name` (a relaunched or resumed run registers once)."""
        self._queue.put((self._register, (name, artifact_path), 0))

    def _register(self, name: str, artifact_path: str) -> None:
        """Best effort: a registry that refuses the model (permissions, a registry that wants
        an MLmodel file) leaves a warning, not a failed run; the artifact is there either way."""
        try:
            try:
                self.client.create_registered_model(name)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            if self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'"):
                log.info("model %s already has a version from run %s", name, self.run_id)
                return
            self.client.create_model_version(name, f"runs:/{self.run_id}/{artifact_path}",
                                             run_id=self.run_id)
        except MlflowException as err:
            log.warning("model %s not registered (%s); its files are the run's %s/ artifact",
                        name, str(err).splitlines()[0], artifact_path)

    def log_dataset(self, name: str, digest: str, source: str, profile: str,
                    context: str = "training") -> None:
        """Record a dataset as the run's input (the UI's Datasets column): `digest` is its
        fingerprint (MLflow keeps 36 characters), `profile` a JSON summary."""
        dataset = Dataset(name, digest[:36], "local", json.dumps({"uri": source}),
                          profile=profile)
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        self._queue.put((self.client.log_inputs, (self.run_id, inputs), 0))

    def _write_forever(self) -> None:
        while (item := self._queue.get()) is not None:
            call, args, ticket = item
            if self._error is None and self._with_retries(call, args) and ticket:
                self.confirmed = ticket  # after a lasting failure, later writes are dropped

    def _with_retries(self, call, args) -> bool:
        """Call until it succeeds (True), or until a permanent error or the outage timeout
        (False, with `_error` set)."""
        first_failure, delay, warned = None, 1.0, False
        while True:
            try:
                call(*args)
                if warned:
                    log.warning("MLflow reachable again: the held-back records are published")
                return True
            except Exception as err:
                now = time.monotonic()
                first_failure = first_failure or now
                if _permanent(err) or now - first_failure > self.outage_timeout_s:
                    self._error = TrackingError(
                        f"MLflow at {redact(self.tracking_uri)} refused a write of run "
                        f"{self.run_id}" + ("" if _permanent(err) else
                                            f" for {now - first_failure:.0f} s "
                                            "(logger.outage_timeout_s)")
                        + f": {scrub(str(err), self.tracking_uri)}")
                    log.error("%s", self._error)
                    return False
                if not warned:
                    log.warning("MLflow unreachable (%s); training goes on, its records are "
                                "kept and retried",
                                scrub(str(err), self.tracking_uri).splitlines()[0][:200])
                    warned = True
                time.sleep(delay)
                delay = min(2 * delay, 30.0)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Publish everything held back, then terminate the run whatever happened: a write that
        # failed for good marks it FAILED (and is raised unless another error is on its way).
        status = "FINISHED"
        if exc_type is not None:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.flush()
        except TrackingError:
            pass
        self._queue.put(None)
        # A stop signal leaves a scheduler's grace period (often 30 s) to finish in; what
        # is not written by then is in the last checkpoint's record.
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self._writer.join(timeout=20 if interrupted else None)
        if self._error is not None:
            status = "FAILED" if status == "FINISHED" else status
        self._error, error = None, self._error
        if exc is not None and status == "FAILED":  # what failed, beside the status in the UI
            self._with_retries(self.client.set_tag,
                               (self.run_id, "error", f"{exc_type.__name__}: {exc}"[:2000]))
        self._with_retries(self.client.set_terminated, (self.run_id, status))
        if error is not None and exc_type is None:
            raise error
        if error is not None:
            log.warning("%s", error)  # the error already on its way wins


class SilentTracker:
    """Stands in for the Tracker on processes other than 0 of a multi-host run, which compute
    everything process 0 does but write nothing to MLflow."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    confirmed = 0

    def set_tag(self, key: str, value: str) -> None:
        pass

    def flush(self) -> int:
        return 0

    def log_artifact(self, path: str | Path) -> None:
        pass

    def log_dataset(self, *args, **kwargs) -> None:
        pass

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        pass

    def register_model(self, name: str, artifact_path: str) -> None:
        pass

    def __enter__(self) -> "SilentTracker":
        return self

    def __exit__(self, *exc) -> None:
        pass


def ui_command(tracking_uri: str) -> str:
    """How to see this tracking store: the command that opens the MLflow UI on a local store,
    or the server's address."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {redact(tracking_uri)} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's page in the MLflow UI (a local `mlflow ui` on its default port, or the
    tracking server), in the model-training view: MLflow 3 opens its GenAI view unless the URL
    (or the user's last choice) says `workflowType=machine_learning`."""
    base = (redact(tracking_uri).rstrip("/") if tracking_uri.startswith(("http://", "https://"))
            else "http://127.0.0.1:5000")
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"

