"""Bad configs fail at load time, with the offending field named, before any JAX work."""

import dataclasses
import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from glam.config import ConfigError
from glam.resolve import ResolvedConfig, load, load_raw, resolve
from glam.data import World


@pytest.mark.parametrize("override,field", [
    ("model.top_k=5", "model.top_k"),  # tiny_moe has 4 experts
    ("model.d_model=0", "model.d_model"),
    ("model.n_layers=-2", "model.n_layers"),
    ("model.attn_width=100", "model.attn_width"),
    ("model.d_model=33", "model.d_head"),  # 33 is not divisible by 2 heads, no d_head given
    ("model.router.capacity_factor=0", "model.router.capacity_factor"),
    ("model.router.group_size=48", "model.router.group_size"),  # 16 x 32 = 512 tokens
    ("model.router.jitter=1.5", "model.router.jitter"),
    # every batch shape the run uses: 3 x 32 = 96 training tokens divide by 48, the
    # evaluation's 64 x 32 = 2048 do not
    (("model.router.group_size=48", "train.batch_size=3"), "model.router.group_size"),
    ("+eval.tasks=[{name: 'trivia(qa)', kind: nlg, path: /etc/hostname}]", "eval.tasks[0].name"),
    ("+eval.tasks=[{name: nlg_avg, kind: nlg, path: /etc/hostname}]", "eval.tasks[0].name"),
    ("+eval.tasks=[{name: world_qa, kind: nlg, path: /etc/hostname}]", "eval.tasks[0].name"),
    ("+eval.tasks=[{name: '..', kind: nlg, path: /etc/hostname}]", "eval.tasks[0].name"),
    ("+eval.tasks=[{name: t, kind: nlg, path: /etc/hostname}, {name: t, kind: nlu, "
     "path: /etc/hostname}]", "eval.tasks[1].name"),
    ("study.name=../elsewhere", "study.name"),
    ("logger.tracking_uri=foo://bar", "logger.tracking_uri"),
    ("logger.tracking_uri=mlflow.db", "logger.tracking_uri"),
    ("+model.n_expertz=8", "model.n_expertz"),
    ("+train.stepz=8", "train.stepz"),
    # values that make training meaningless, for every optimizer and schedule
    ("schedule.learning_rate=inf", "schedule.learning_rate"),
    ("schedule.learning_rate=nan", "schedule.learning_rate"),
    ("schedule.learning_rate=-0.1", "schedule.learning_rate"),
    ("schedule.learning_rate=30", "schedule.learning_rate"),
    ("schedule.end_lr_fraction=nan", "schedule.end_lr_fraction"),
    ("optimizer.b1=1.0", "optimizer.b1"),
    ("optimizer.b2=-0.5", "optimizer.b2"),
    ("optimizer.b2=inf", "optimizer.b2"),
    ("optimizer.weight_decay=-0.01", "optimizer.weight_decay"),
    ("optimizer.weight_decay=inf", "optimizer.weight_decay"),
    ("optimizer.grad_clip_norm=inf", "optimizer.grad_clip_norm"),
    ("optimizer.decay_rate=0", "optimizer.decay_rate"),
    ("optimizer.beta2_cap=nan", "optimizer.beta2_cap"),
    ("optimizer.update_clipping=-1", "optimizer.update_clipping"),
    ("model.router.capacity_factor=inf", "model.router.capacity_factor"),
    ("model.router.aux_loss_weight=nan", "model.router.aux_loss_weight"),
    ("stability.spike_factor=inf", "stability.spike_factor"),
    ("data.qa_share=nan", "data.qa_share"),
    ("+eval.tasks=[{name: x, kind: nlu, path: /nonexistent.jsonl}]", r"eval.tasks[0].path"),
    ("model.moe_offset=2", "model.moe_offset"),
    ("model.vocab_size=100", "model.vocab_size"),  # fewer ids than the corpus's words
    ("data.n_attributes=9", "data.n_attributes"),
    ("data.qa_share=0.95", "data.qa_share"),
    ("eval.max_answer_tokens=32", "eval.max_answer_tokens"),
    ("+eval.tasks=[{name: x, kind: nlg, path: /nonexistent.jsonl}]", r"eval.tasks[0].path"),
    ("train.batch_size=0", "train.batch_size"),
    ("schedule.decay_fraction=0", "schedule.decay_fraction"),
    ("distributed.process_id=-1", "distributed.process_id"),
    ("distributed.coordinator_address=localhost", "distributed.coordinator_address"),
])
def test_semantic_errors_name_the_field(override, field):
    base = ["model=tiny_moe", "train.batch_size=16"]
    with pytest.raises(ConfigError, match=re.escape(field)):
        load(base + ([override] if isinstance(override, str) else list(override)), backend="cpu")


@pytest.mark.parametrize("override,key", [
    ("model.ffn_kind=swiglu", "ffn_kind"),
    ("model.dtype=float16", "dtype"),
    ("model.router.second_expert_policy=best", "second_expert_policy"),
    ("model.router.dispatch=magic", "dispatch"),
    ("train.resume=sometimes", "resume"),
    ("optimizer.name=sgd", "name"),
    ("schedule.name=linear", "name"),
    ("distributed.init=maybe", "init"),
    ("plan.placement=wide", "placement"),
    ("data.kind=books", "kind"),
    ("+eval.tasks=[{name: x, kind: mcq, path: x.jsonl}]", "kind"),
])
def test_a_choice_outside_its_enum_fails_at_composition_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        load(["model=tiny_moe", override])
    cause = str(err.value.__cause__ or err.value)
    assert key in cause and "expected one of" in cause


def test_unknown_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="n_expert"):
        load(["model.n_expert=8"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        load(["model.d_model=wide"])
    assert isinstance(err.value.__cause__, ValidationError)
    assert "d_model" in str(err.value.__cause__)


def test_unknown_preset_is_refused():
    with pytest.raises(Exception, match="nonexistent"):
        load(["model=nonexistent"])


def test_good_config_loads_and_derives():
    cfg = load(["model=cpu_moe"])
    assert cfg.model.family == "moe" and cfg.model.moe_layers == (0, 2)
    assert cfg.model.vocab_size == World(cfg.data).tokenizer.vocab_size  # derived, not typed
    assert cfg.model.head_dim == cfg.model.d_model // cfg.model.n_heads


def test_resolution_fills_and_labels_every_derived_value_and_freezes():
    raw_cfg = load_raw(["model=cpu_moe", "plan.placement=matched"])
    assert raw_cfg.model.vocab_size is None and raw_cfg.model.router.dispatch == "auto"
    cfg = resolve(raw_cfg, backend="cpu")
    assert isinstance(cfg, ResolvedConfig) and not isinstance(raw_cfg, ResolvedConfig)
    assert set(cfg.derived.filled) == {"model.vocab_size", "model.expert_d_ff",
                                       "model.router.dispatch", "model.router.group_size"}
    m = cfg.model
    assert m.router.dispatch == "gather" and m.router.group_size == m.seq_len
    assert m.expert_d_ff not in (None, m.d_ff)  # solved for equal FLOPs
    assert raw_cfg.model.vocab_size is None  # the raw config is left as it was
    assert resolve(raw_cfg, backend="tpu").model.router.dispatch == "dropless"
    for assign in (lambda: setattr(cfg.model, "d_model", 8),
                   lambda: setattr(cfg.model.router, "dispatch", "einsum"),
                   lambda: setattr(cfg.train, "steps", 1)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            assign()


@pytest.mark.parametrize("fields", [
    {}, {"n_entities": 1000, "n_attributes": 6}, {"n_entities": 7, "n_attributes": 1},
    {"n_entities": 20000, "templates_per_attribute": 2},
])
def test_vocabulary_size_is_derived_without_building_the_world(fields):
    from glam.config import DataConfig
    from glam.data.world import world_vocab_size

    cfg = DataConfig(**fields)
    assert world_vocab_size(cfg) == World(cfg).tokenizer.vocab_size


def test_loading_a_config_builds_no_corpus(monkeypatch):
    import glam.data.world as world

    def refuse(*args, **kwargs):
        raise AssertionError("a corpus was built")

    monkeypatch.setattr(world.World, "__init__", refuse)
    assert load(["model=paper/glam_64b_64e"], backend="cpu").model.vocab_size > 0


def test_every_field_has_a_one_line_doc():
    from glam.config import Config, Section

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc") and "\n" not in f.metadata["doc"], prefix + f.name
            kind = getattr(cls, "__annotations__", {}).get(f.name)
            sub = next((c for c in Section.__subclasses__() if c.__name__ == kind), None)
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")

    walk(Config)


def test_an_unreachable_tracking_server_is_refused_within_seconds(free_port):
    import time

    from glam.tracking import check_reachable

    port = free_port()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"logger.tracking_uri: no MLflow server answers at "
                                          rf"http://u:\*\*\*@127.0.0.1:{port}"):
        check_reachable(f"http://u:secret@127.0.0.1:{port}", timeout=3)
    assert time.monotonic() - start < 10
    with pytest.raises(ConfigError, match="does not exist"):
        check_reachable("sqlite:////nonexistent/folder/mlflow.db")


def test_the_tracker_terminates_its_run_even_when_the_last_flush_fails(tmp_path):
    from mlflow.tracking import MlflowClient

    from glam.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(Exception):
        with Tracker(uri, "e", "r", {}, {}) as tracker:
            tracker.log_metrics(0, {"eval/trivia(qa)/0shot": 1.0})  # MLflow refuses this key
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FAILED"


def test_an_empty_sweep_is_refused():
    from glam.study.plan import plan

    with pytest.raises(ConfigError, match="select no point"):
        plan(["+study=smoke", "train.seed=range(0,0)"])


def test_credentials_in_a_tracking_uri_are_never_logged():
    from glam.tracking import redact

    assert redact("http://user:pw@host:5000") == "http://user:***@host:5000"
    assert redact("postgresql+psycopg2://u:p%40ss@db/mlflow") == "postgresql+psycopg2://u:***@db/mlflow"
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


@pytest.mark.parametrize("cli,argv", [
    ("glam.cli.count", ["+model.n_expertz=3"]),
    ("glam.cli.count", ["model.top_k=9"]),
    ("glam.cli.plan", ["model.top_k=9"]),
    ("glam.cli.plan", ["+study=smoke", "train.seed=range(0,0)"]),
    ("glam.cli.bench", ["--experts", "1,8"]),
])
def test_every_cli_refuses_bad_input_with_the_message_alone(cli, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(cli).main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err


def test_a_server_that_needs_credentials_is_reachable_with_them():
    """urllib does not take credentials from a URL: they go in a header, and a server that
    answers at all (even 401) is there."""
    import http.server
    import threading

    from glam.tracking import check_reachable

    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200 if self.headers.get("Authorization") else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        check_reachable(f"http://ann:s3cret@127.0.0.1:{port}", timeout=5)
        check_reachable(f"http://127.0.0.1:{port}", timeout=5)  # 401: a server is there
    finally:
        server.shutdown()
    assert seen[0].startswith("Basic ") and seen[1] is None


def test_a_stop_signal_after_the_last_check_still_stops():
    import os
    import signal

    from glam.interrupts import Interrupted, StopOnSignal

    with pytest.raises(Interrupted) as stop:
        with StopOnSignal():
            os.kill(os.getpid(), signal.SIGTERM)
    assert stop.value.exit_code == 128 + signal.SIGTERM
