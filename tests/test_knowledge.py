"""Knowledge in bits (glam.eval.knowledge): the batched probe against a slow per-fact reference,
its two ends (all mass on the right value; uniform), the sample, and the world's exposures."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.config import DataConfig
from glam.data import World
from glam.eval.harness import make_score
from glam.config import ConfigError
from glam.eval.knowledge import (SPLITS, KnowledgeProbe, fact_prompt, prompt_templates,
                                 sample_facts, stored_bits, summarize)
from glam.model import GLaM
from glam.resolve import model_config

SMALL = DataConfig(n_entities=30, train_tokens=5000, val_tokens=2000)
LARGE = DataConfig(n_entities=3000, train_tokens=5000, val_tokens=2000, qa_entity_fraction=0.3)


def _probe(world, n_experts=0, max_facts=4096, batch_size=16):
    cfg = model_config(vocab_size=world.tokenizer.vocab_size, seq_len=32, d_model=32,
                       n_layers=2, n_heads=2, d_ff=64, n_experts=n_experts,
                       # one token a group, none dropped: rows independent of each other
                       router={"capacity_factor": 8.0, "group_size": 1})
    graphdef, state = nnx.split(GLaM(cfg, rngs=nnx.Rngs(0)))
    probe = KnowledgeProbe(make_score(graphdef), world, world.tokenizer, seq_len=32,
                           batch_size=batch_size, total_params=1000, activated_params=500,
                           max_facts=max_facts, seed=0)
    return probe, graphdef, state


@pytest.mark.parametrize("n_experts", [0, 4])
def test_batched_probe_equals_a_per_fact_reference(n_experts):
    """Each fact's log p(value), from padded batches of short windows, equals the model run on
    that fact alone, unpadded, the value's tokens read off its log-softmax one by one."""
    world = World(SMALL)
    probe, graphdef, state = _probe(world, n_experts, batch_size=16)
    got = probe.value_logp(state)
    logits = jax.jit(lambda st, row: nnx.merge(graphdef, st)(row)[0])  # one compile a length
    tok = world.tokenizer
    for i in range(0, len(got), 7):
        person_attr = divmod(i, len(world.attributes))
        split = probe.sample.split[i]
        person = (world.qa_people, world.bio_only_people)[split][
            person_attr[0] - (len(world.qa_people) if split else 0)]
        prompt = [tok.eos_id, *tok.encode(fact_prompt(world, person, person_attr[1],
                                                      prompt_templates(world)))]
        value = tok.encode(world.value(person, person_attr[1]))
        row = jnp.asarray([prompt + value])
        logp = jax.nn.log_softmax(logits(state, row)[0], axis=-1)
        want = sum(float(logp[len(prompt) - 1 + j, v]) for j, v in enumerate(value))
        assert got[i] == pytest.approx(want, abs=1e-4)


def test_the_two_ends_all_mass_on_the_value_and_uniform():
    """All mass on the right value stores the world's knowledge_bits; log p = -log V_a (uniform
    over the values) and anything worse store 0; both in a sampled (scaled) world too."""
    for cfg in (SMALL, LARGE):
        world = World(cfg)
        sample = sample_facts(world, world.tokenizer, 2400, seed=0)
        full = summarize(stored_bits(np.zeros(len(sample.max_bits)), sample.max_bits), sample,
                         1000, 250)
        assert full["knowledge/bits"] == pytest.approx(world.knowledge_bits)
        assert full["knowledge/fraction"] == pytest.approx(1.0)
        assert full["knowledge/bits_per_param"] == pytest.approx(world.knowledge_bits / 1000)
        assert full["knowledge/bits_per_activated_param"] == pytest.approx(
            world.knowledge_bits / 250)
        for split in SPLITS:
            assert full[f"knowledge/{split}/fraction"] == pytest.approx(1.0)
        uniform = -sample.max_bits * math.log(2)
        for logp in (uniform, uniform - 3.0):
            none = summarize(stored_bits(logp, sample.max_bits), sample, 1000, 250)
            assert none["knowledge/bits"] == 0.0 and none["knowledge/fraction"] == 0.0
        half = summarize(stored_bits(uniform / 2, sample.max_bits), sample, 1000, 250)
        assert half["knowledge/fraction"] == pytest.approx(0.5)


def test_the_probe_reaches_both_ends_through_its_batches():
    """The whole probe (batches, short last batch, scaling) with scorers standing in for a
    model: one that gives the value probability 1, and one uniform over the vocabulary."""
    world = World(SMALL)
    probe, _, state = _probe(world, batch_size=16)
    probe.score = jax.jit(lambda s, t, m, target: (jnp.zeros(t.shape[0]), jnp.sum(target, 1)))
    assert probe(state)["knowledge/bits"] == pytest.approx(world.knowledge_bits)
    v = world.tokenizer.vocab_size
    probe.score = jax.jit(lambda s, t, m, target: (-jnp.sum(target, 1) * jnp.log(v) * 1.0,
                                                   jnp.sum(target, 1)))
    assert probe(state)["knowledge/bits"] == 0.0


def test_the_sample_covers_a_small_world_and_splits_a_large_one():
    small = World(SMALL)
    s = sample_facts(small, small.tokenizer, 4096, seed=0)
    assert len(s.prompts) == len(small.people) * len(small.attributes)
    assert np.all(s.scale == 1.0)
    large = World(LARGE)
    s = sample_facts(large, large.tokenizer, 2000, seed=0)
    n_attr = len(large.attributes)
    per_split = [np.sum(s.split == i) // n_attr for i in range(len(SPLITS))]
    assert 2000 - 2 * n_attr <= len(s.prompts) <= 2000 + n_attr
    assert per_split[0] / sum(per_split) == pytest.approx(0.3, abs=0.01)
    assert np.allclose(s.scale, [len(large.qa_people) / per_split[0],
                                 len(large.bio_only_people) / per_split[1]])
    with pytest.raises(ValueError, match="knowledge_facts"):
        sample_facts(large, large.tokenizer, 2, seed=0)


@pytest.mark.parametrize("popularity", [0.0, 1.0])
def test_exposures_match_a_count_of_the_documents(popularity):
    """`World.exposures` (expected statements of each fact in a number of tokens) against
    counting them in drawn documents: biographies state each of a person's facts once, a QA
    line one fact. Zipf popularity makes the head far more exposed than the tail."""
    cfg = dataclasses.replace(SMALL, popularity=popularity, n_entities=50)
    world = World(cfg)
    rng = np.random.default_rng(5)
    counts = np.zeros((len(world.people), len(world.attributes)))
    tokens = 0
    for _ in range(20000):
        replay = np.random.default_rng()
        replay.bit_generator.state = rng.bit_generator.state
        tokens += len(world.document_ids(rng)) + 1
        u = replay.random()  # the document's draws again, to see whose facts it states
        if u < cfg.filler_share:
            continue
        if u < cfg.filler_share + cfg.qa_share:
            counts[world.qa_people[world.draw_person(replay, qa_only=True)],
                   int(replay.integers(len(world.attributes)))] += 1
        else:
            counts[world.draw_person(replay)] += 1
    want = world.exposures(tokens)
    assert counts.sum() == pytest.approx(want.sum(), rel=0.03)
    head = np.argsort(-want.sum(1))[:10]
    assert counts[head].sum() == pytest.approx(want[head].sum(), rel=0.06)
    if popularity:
        assert want.sum(1).max() > 10 * want.sum(1).min()


def test_popularity_zero_keeps_the_uniform_streams():
    """A uniform world draws exactly as before popularity existed (rng.integers per person)."""
    world = World(SMALL)
    rng = np.random.default_rng(0)
    assert [world.draw_person(rng) for _ in range(5)] == \
        np.random.default_rng(0).integers(len(world.people), size=5).tolist()


@pytest.mark.parametrize("k", [2, 3, 4])
def test_no_prompt_is_continued_by_another_attributes_sentence(k):
    """A prompt another attribute's training sentence also begins with ("<e> was born in", shared
    with "<e> was born in the year <v>") caps what a perfect model can score: each attribute's
    prompt is one the training text uses and no other attribute's sentence continues."""
    cfg = dataclasses.replace(SMALL, templates_per_attribute=k, n_attributes=6)
    world = World(cfg)
    heads = prompt_templates(world)
    sentences = [[world.fact(0, a, t) for t in range(k)] for a in range(len(world.attributes))]
    for a, head in enumerate(heads):
        prompt = fact_prompt(world, 0, a, heads)
        assert any(s.startswith(prompt + " ") for s in sentences[a])  # used in training
        assert not any(s.startswith(prompt + " ") for b, ss in enumerate(sentences) if b != a
                       for s in ss), (prompt, world.attributes[a][0])
    assert heads[0] == "{e} comes from"
    with pytest.raises(ConfigError, match="data.templates_per_attribute"):
        prompt_templates(World(dataclasses.replace(SMALL, templates_per_attribute=1)))


def test_a_world_the_probe_cannot_ask_is_refused_before_any_run(tmp_path):
    """One template per fact: the birth city's only sentence begins like the birth year's. The
    trainer refuses it with the field named, before an MLflow run exists."""
    from glam.resolve import load
    from glam.trainer import run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load(["model=tiny_dense", "data.templates_per_attribute=1", "data.train_tokens=20000",
                f"logger.tracking_uri={uri}"])
    with pytest.raises(ConfigError, match="data.templates_per_attribute"):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "mlflow.db").exists()
