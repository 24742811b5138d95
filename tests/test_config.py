"""Bad configs fail at load time, with the offending field named, before any JAX work."""

import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from glam.config import ConfigError
from glam.count import load
from glam.data import World


@pytest.mark.parametrize("override,field", [
    ("model.top_k=5", "model.top_k"),  # tiny_moe has 4 experts
    ("model.d_model=0", "model.d_model"),
    ("model.n_layers=-2", "model.n_layers"),
    ("model.attn_width=100", "model.attn_width"),
    ("model.d_model=33", "model.d_head"),  # 33 is not divisible by 2 heads, no d_head given
    ("model.ffn_kind=swiglu", "model.ffn_kind"),
    ("model.dtype=float16", "model.dtype"),
    ("model.router.second_expert_policy=best", "model.router.second_expert_policy"),
    ("model.router.dispatch=magic", "model.router.dispatch"),
    ("model.router.capacity_factor=0", "model.router.capacity_factor"),
    ("model.router.group_size=48", "model.router.group_size"),  # 16 x 32 = 512 tokens
    ("model.moe_offset=2", "model.moe_offset"),
    ("model.vocab_size=100", "model.vocab_size"),  # fewer ids than the corpus's words
    ("data.n_attributes=9", "data.n_attributes"),
    ("data.qa_share=0.95", "data.qa_share"),
    ("eval.max_answer_tokens=32", "eval.max_answer_tokens"),
    ("+eval.tasks=[{name: x, kind: nlg, path: /nonexistent.jsonl}]", r"eval.tasks[0].path"),
    ("train.resume=sometimes", "train.resume"),
    ("train.batch_size=0", "train.batch_size"),
    ("optimizer.name=sgd", "optimizer.name"),
    ("schedule.name=linear", "schedule.name"),
    ("schedule.decay_fraction=0", "schedule.decay_fraction"),
    ("distributed.init=maybe", "distributed.init"),
    ("distributed.process_id=-1", "distributed.process_id"),
    ("distributed.coordinator_address=localhost", "distributed.coordinator_address"),
])
def test_semantic_errors_name_the_field(override, field):
    base = ["model=tiny_moe", "train.batch_size=16"]
    with pytest.raises(ConfigError, match=re.escape(field)):
        load(base + [override])


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
