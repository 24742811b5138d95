"""Checkpoints, exact resume, and the paper's stability practice under injected faults."""

import json
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from glam.config import ConfigError
from glam.resolve import load
from glam.stability import TrainingDiverged
from glam.trainer import run
from glam.trainer import SimulatedCrash

pytestmark = pytest.mark.slow  # every test here trains a model

BASE = ["model=tiny_moe", "train.steps=30", "train.batch_size=4", "train.log_every=5",
        "train.progress=false", "train.eval_batches=1", "checkpoint.every=10",
        "schedule.warmup_steps=5", "data.train_tokens=20000", "data.val_tokens=2048"]


def _run(tmp_path, name, *overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load([*BASE, f"logger.tracking_uri={uri}", *overrides])
    return run(cfg, tmp_path / name), MlflowClient(uri)


def _history(client, run_id, key="lm_loss"):
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"duplicated steps in {key}"
    return steps, [p.value for p in points]


def _trivia(tmp_path) -> str:
    """A TriviaQA-form task about the Python docs (evaluated with the run's SentencePiece)."""
    path = tmp_path / "trivia.jsonl"
    rows = [{"Question": f"What does the keyword {k} do in Python?",
             "Answer": {"Value": v, "Aliases": [v.upper()]}}
            for k, v in (("return", "leaves a function"), ("yield", "makes a generator"),
                         ("pass", "nothing"), ("del", "deletes a name"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"eval.tasks=[{{name: trivia, kind: nlg, path: {path}}}]"


def _resume_case(data: str, tmp_path, pydocs: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, metric keys compared) of the resume test on `data`."""
    common = ["eval.every=10", "eval.max_examples=8", "faults.nonfinite_steps=[12]"]
    keys = ["lm_loss", "aux_loss", "skipped_steps", "val_loss"]
    if data == "text":
        common += [*pydocs, "data.segment_ids=true", _trivia(tmp_path)]
        keys += ["val_loss/reference", "val_loss/docstrings", "data/tokens/reference",
                 "eval/trivia/0shot"]
    else:
        keys += ["eval/world_facts/0shot"]
    return common, keys


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of each corpus, trained once for every crash point:
    get(data, pydocs) -> (final result, final metrics, {key: history})."""
    done = {}

    def get(data: str, pydocs: list[str]):
        if data not in done:
            tmp_path = tmp_path_factory.mktemp(f"straight-{data}")
            common, keys = _resume_case(data, tmp_path, pydocs)
            final, client = _run(tmp_path, "straight", *common)
            done[data] = (final, client.get_run(final["run_id"]).data.metrics,
                          {k: _history(client, final["run_id"], k) for k in keys})
        return done[data]

    return get


# One worker per corpus (make test runs pytest-xdist with --dist loadgroup), so the
# uninterrupted run is trained once for both crash points.
@pytest.mark.parametrize("data", [pytest.param(d, marks=pytest.mark.xdist_group(f"straight-{d}"))
                                  for d in ("world", "text")])
@pytest.mark.parametrize("crash_at", [17, 20])  # between checkpoints; right after one
def test_resume_reproduces_the_uninterrupted_run(tmp_path, crash_at, data, request, straight):
    """Also on prepared text, where the grain iterator's state is in the checkpoint."""
    pydocs = request.getfixturevalue("pydocs") if data == "text" else []
    common, keys = _resume_case(data, tmp_path, pydocs)
    reference, metrics, histories = straight(data, pydocs)
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, "crashed", *common, f"faults.crash_at_step={crash_at}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("glam")
    (crashed,) = client.search_runs([exp.experiment_id])
    assert crashed.info.status == "FAILED"

    resumed, _ = _run(tmp_path, "crashed", *common)  # same run directory, resume=auto
    assert resumed["run_id"] == crashed.info.run_id  # the MLflow run continues
    assert len(client.search_runs([exp.experiment_id])) == 1  # no new run
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"
    assert client.get_run(resumed["run_id"]).data.metrics.keys() == metrics.keys()
    for key in keys:
        steps, values = _history(client, resumed["run_id"], key)
        assert steps == histories[key][0], key
        np.testing.assert_array_equal(values, histories[key][1])  # bit-identical on CPU
    assert histories["lm_loss"][0] == [s for s in range(30) if s != 12]
    assert resumed["skipped_steps"] == reference["skipped_steps"] == 1


def test_resume_never_refuses_existing_checkpoints(tmp_path):
    _run(tmp_path, "r", "train.steps=10")
    with pytest.raises(ConfigError, match="train.resume"):
        _run(tmp_path, "r", "train.steps=10", "train.resume=never")


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory):
    """A folder holding run directory `r` of 10 steps and its MLflow database."""
    tmp_path = tmp_path_factory.mktemp("ten_steps")
    _run(tmp_path, "r", "train.steps=10")
    return tmp_path


@pytest.mark.parametrize("override,message", [
    ("model.d_model=48", r"model\.d_model: checkpoint 32, config 48"),
    ("train.seed=5", r"train\.seed: checkpoint 0, config 5"),
    ("data.n_entities=30", r"data_fingerprint: checkpoint"),
    ("schedule.learning_rate=0.1", r"schedule\.learning_rate"),
])
@pytest.mark.xdist_group("ten_steps")  # one worker: the 10-step run is trained once
def test_checkpoint_of_another_config_is_refused(tmp_path, override, message, ten_steps):
    shutil.copytree(ten_steps, tmp_path, dirs_exist_ok=True)
    with pytest.raises(ConfigError, match=message):
        _run(tmp_path, "r", "train.steps=10", override)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The lm_loss history of the BASE run, trained without interruption."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    final, client = _run(tmp_path, "r")
    return _history(client, final["run_id"])


def _truncate_data(step_dir):
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _garbage_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text("{not json")


def _missing_record(step_dir):
    shutil.rmtree(step_dir / "record")


@pytest.mark.parametrize("damage", [_truncate_data, _garbage_metadata, _missing_record])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, damage,
                                                                               uninterrupted):
    """GLaM's practice: restart from the last healthy checkpoint. The damaged step is moved
    aside (never deleted), the run is tagged, and the resumed run still equals an
    uninterrupted one."""
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, "r", "faults.crash_at_step=25")  # checkpoints 0, 10, 20
    damage(tmp_path / "r" / "checkpoints" / "20")
    final, client = _run(tmp_path, "r")
    assert (tmp_path / "r" / "checkpoints.damaged" / "20").is_dir()
    run_ = client.get_run(final["run_id"])
    assert "checkpoint 20 unreadable" in run_.data.tags["checkpoint_set_aside_1"]
    assert _history(client, final["run_id"]) == uninterrupted


def test_nonfinite_steps_are_skipped(tmp_path):
    final, client = _run(tmp_path, "r", "faults.nonfinite_steps=[7,8,9]")
    assert final["skipped_steps"] == 3 and final["rollbacks"] == 0
    steps, losses = _history(client, final["run_id"])
    assert 7 not in steps and 6 in steps and 10 in steps and np.all(np.isfinite(losses))
    _, skipped = _history(client, final["run_id"], "skipped")
    assert sum(skipped) == 3


@pytest.mark.parametrize("fault,reason", [
    ("faults.spike_steps=[24]", "loss spike at step 24"),
    ("faults.nonfinite_steps=[21,22,23,24,25]", "5 consecutive non-finite steps"),
])
def test_rollback_then_recover(tmp_path, fault, reason):
    final, client = _run(tmp_path, "r", fault)
    assert final["rollbacks"] == 1
    run_ = client.get_run(final["run_id"])
    assert run_.info.status == "FINISHED"
    assert reason in run_.data.tags["rollback_1"] and "to step 20" in run_.data.tags["rollback_1"]
    steps, losses = _history(client, final["run_id"])
    assert steps == list(range(30))  # each step logged once, from the recovered trajectory
    assert max(losses) < 10
    rollbacks = json.loads((tmp_path / "r" / "rollbacks.json").read_text())
    assert rollbacks[0]["at_step"] >= 24 and reason in rollbacks[0]["reason"]


def test_give_up_after_max_rollbacks(tmp_path):
    with pytest.raises(TrainingDiverged, match="gave up after 2 rollbacks"):
        _run(tmp_path, "r", "faults.spike_steps=[24]", "faults.repeat_after_rollback=true",
             "stability.max_rollbacks=2")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run_,) = client.search_runs([client.get_experiment_by_name("glam").experiment_id])
    assert run_.info.status == "FAILED" and "rollback_2" in run_.data.tags
    _history(client, run_.info.run_id)  # no duplicated steps after two rollbacks


@pytest.mark.parametrize("overrides,healthy", [
    # no checkpoint to roll back to: every healthy step before the failure
    (["checkpoint.every=0", "faults.nonfinite_steps=[25,26,27,28,29]"], 25),
    # gave up after rollbacks: the steps since the last checkpoint too
    (["stability.max_rollbacks=0", "faults.nonfinite_steps=[23,24,25,26,27]"], 23),
    # any exception
    (["faults.crash_at_step=18"], 18),
])
def test_a_failed_run_keeps_every_healthy_point(tmp_path, overrides, healthy):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load([*BASE, f"logger.tracking_uri={uri}", *overrides])
    with pytest.raises((TrainingDiverged, SimulatedCrash)):
        run(cfg, tmp_path / "run")
    client = MlflowClient(uri)
    (failed,) = client.search_runs([client.get_experiment_by_name("glam").experiment_id])
    assert failed.info.status == "FAILED"
    steps, _ = _history(client, failed.info.run_id)
    assert steps == list(range(healthy))
