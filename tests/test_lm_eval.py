"""glam models in EleutherAI's lm-evaluation-harness, offline: the model class against the
model's own forward pass, the world's tasks scored the same by both harnesses, and glam-eval's
results in MLflow."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance
from mlflow.tracking import MlflowClient

from glam import export
from glam.cli.evaluate import main as eval_main
from glam.data.world import World
from glam.eval import Evaluator
from glam.eval.lm_harness import GlamLM
from glam.eval.lm_tasks import write
from glam.eval.tasks import world_tasks
from glam.generate import inference_config
from glam.resolve import load
from glam.trainer import run

pytestmark = pytest.mark.slow  # trains a model

OVERRIDES = ["model=tiny_moe", "model.router.dispatch=dropless", "train.steps=80",
             "train.batch_size=8", "train.progress=false", "checkpoint.every=0",
             "eval.shots=[0]", "eval.max_examples=60", "data.train_tokens=40000"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MoE (dropless routing: glam's harness and lm-eval route alike) trained on the
    world, exported; (run directory, resolved config, tracking uri, the written task folder)."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load([*OVERRIDES, f"logger.tracking_uri={uri}"], "cpu")
    run(cfg, tmp / "run")
    tasks = tmp / "tasks"
    write(World(cfg.data), tasks, cfg.eval.max_examples, cfg.eval.seed,
          cfg.eval.max_answer_tokens)
    return tmp / "run", cfg, uri, tasks


def _forward_logp(model, ids: list[int]) -> np.ndarray:
    """log p of ids[1:] given the ids before, from the model's own forward pass."""
    logits, _ = model(np.asarray([ids[:-1]], np.int32))
    logp = jax.nn.log_softmax(logits[0], axis=-1)
    return np.asarray(logp)[np.arange(len(ids) - 1), ids[1:]]


def test_loglikelihoods_equal_the_models_forward_pass(trained):
    folder, _, _, _ = trained
    lm = GlamLM(str(folder), batch_size=4)
    model = export.load(folder, transform=inference_config).model  # each token routed alone
    context, continuation = "q: where does", " a: the city ."
    ids = lm.tok_encode(context + continuation)
    n = len(lm.tok_encode(continuation))
    (got, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    want = _forward_logp(model, ids)[-n:]
    assert got == pytest.approx(float(want.sum()), abs=1e-4)
    text = "the city of a man was born in the year " * 2
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    whole = _forward_logp(model, [lm.eot_token_id, *lm.tok_encode(text)])
    assert rolling == pytest.approx(float(whole.sum()), abs=1e-3)
    # edges: nothing to score; more than the window; more new tokens than the window holds
    assert lm._loglikelihood_tokens([(None, ids, [])]) == [(0.0, True)]
    with pytest.raises(ValueError, match="longer than the model's window"):
        lm._loglikelihood_tokens([(None, ids[:1], ids * lm.window)])
    (answer,) = lm.generate_until([Instance("generate_until", {}, (
        context, {"until": [" ."], "max_gen_toks": 10 * lm.window}), 0)])
    assert isinstance(answer, str)


def _glam_scores(folder, cfg):
    """glam's own harness on the world's tasks, 0-shot: {metric: value}, predictions."""
    loaded = export.load(folder)
    graphdef, state = nnx.split(loaded.model)
    e = cfg.eval
    evaluator = Evaluator(graphdef, loaded.tokenizer,
                          world_tasks(World(cfg.data), e.max_examples, e.seed),
                          seq_len=cfg.model.seq_len, batch_size=e.batch_size, shots=[0],
                          max_answer_tokens=e.max_answer_tokens, length_normalize=False,
                          seed=e.seed)
    result = evaluator(state)
    return result.metrics, result.predictions


def test_the_worlds_tasks_score_the_same_in_both_harnesses(trained):
    """Same examples, same prompts, 0-shot: the same multiple-choice accuracy, example by
    example, and the same generation exact match."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder, cfg, _, tasks = trained
    ours, predictions = _glam_scores(folder, cfg)
    results = lm_eval.simple_evaluate(
        model=GlamLM(str(folder), batch_size=8), num_fewshot=0, log_samples=True,
        tasks=["glam_world_facts", "glam_world_qa_seen"],
        task_manager=TaskManager(include_path=str(tasks)))
    acc = results["results"]["glam_world_facts"]["acc,none"]
    assert 100 * acc == pytest.approx(ours["eval/world_facts/0shot"], abs=1e-9)
    right = {p["id"] for p in predictions if p["task"] == "world_facts" and p["correct"]}
    theirs = {s["doc"]["id"] for s in results["samples"]["glam_world_facts"] if s["acc"]}
    assert theirs == right and 5 <= len(right) <= 55  # the same examples right, not all or none
    em = results["results"]["glam_world_qa_seen"]["exact_match,strip"]
    assert 100 * em == pytest.approx(ours["eval/world_qa_seen/0shot"], abs=1e-9)


def test_glam_eval_logs_the_results_to_the_run(trained, capsys, tmp_path):
    folder, _, uri, tasks = trained
    eval_main([str(folder), "--tasks", "glam_world_facts,glam_world_qa", "--include_path",
               str(tasks), "--limit", "20", "--out", str(tmp_path)])  # the run's own store
    assert (tmp_path / "results_glam_world_facts_glam_world_qa.json").is_file()
    run_id = json.loads((folder / "model" / "config.json").read_text())["run_id"]
    client = MlflowClient(uri)
    logged = client.get_run(run_id).data.metrics
    assert 0 <= logged["lm_eval/glam_world_facts/acc"] <= 1
    assert "lm_eval/glam_world_qa/exact_match.strip" in logged
    (artifact,) = client.list_artifacts(run_id, "lm_eval")
    assert artifact.path.startswith("lm_eval/results_") and "logged 4 metrics" in \
        capsys.readouterr().out


def test_lm_evals_own_command_line_runs_a_glam_model(trained):
    """`python -m glam.eval.lm_harness` is the `lm_eval` command with `glam` registered."""
    import sys

    import waiting

    folder, _, _, tasks = trained
    done = waiting.run([sys.executable, "-m", "glam.eval.lm_harness", "--model", "glam",
                        "--model_args", f"path={folder}", "--batch_size", "8", "--tasks",
                        "glam_world_facts", "--include_path", str(tasks), "--limit", "10"], 600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "glam_world_facts" in done.stdout and "acc" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["--tasks", "no_such_task"], "--tasks: lm-eval knows no task no_such_task"),
    (["--tasks", "glam_world_facts", "--limit", "0"], "--limit must be at least 1"),
    (["--tasks", "glam_world_facts", "--tracking-uri", "sqlite:///{tmp}/other.db"],
     "--tracking-uri: no active MLflow run"),  # refused before evaluating
])
def test_glam_eval_refuses_bad_input_with_exit_2(trained, capsys, args, message, tmp_path):
    folder, _, uri, tasks = trained
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_:
        eval_main([str(folder), *args, "--include_path", str(tasks)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


def test_glam_eval_refuses_a_folder_without_an_export(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_main([str(tmp_path), "--tasks", "glam_world_facts", "--no-log"])
    assert exit_.value.code == 2 and "no exported model" in capsys.readouterr().err
