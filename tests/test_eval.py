"""Evaluation: scoring, task files, few-shot prompts, the harness, the synthetic world."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.config import DataConfig
from glam.resolve import model_config
from glam.data import World, WorldCorpus
from glam.data.tokenizer import PAD
from glam.eval import Evaluator, Example, Task, read_jsonl, world_tasks
from glam.eval.scoring import exact_match, normalize_answer, token_f1
from glam.model import GLaM

SMALL_WORLD = DataConfig(n_entities=40, train_tokens=5000, val_tokens=2000)


@pytest.mark.parametrize("shares", [(0.3, 0.2), (0.0, 0.0), (0.9, 0.05)])
def test_world_stream_is_the_encoded_text_of_its_documents(shares):
    """The fast stream (cached ids of facts and QA lines) equals encoding each rendered document,
    with the same random draws: the slow, obviously correct form."""
    from glam.data.world import END

    cfg = dataclasses.replace(SMALL_WORLD, filler_share=shares[0], qa_share=shares[1])
    world = World(cfg)
    want: list[int] = []
    rng = np.random.default_rng([3, 1])
    while len(want) < 4000:
        want += world.tokenizer.encode(world.document(rng)) + world.tokenizer.encode(END)
    np.testing.assert_array_equal(world.stream(4000, np.random.default_rng([3, 1])), want[:4000])


def test_answer_normalisation_and_scores():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("an Apple, a pear") == "apple pear"
    assert exact_match("the Beatles.", ["Beatles", "The Fab Four"]) == 1.0
    assert exact_match("Beatle", ["Beatles"]) == 0.0
    assert token_f1("new york city", ["New York"]) == pytest.approx(0.8)
    assert token_f1("paris", ["london", "Paris France"]) == pytest.approx(2 / 3)
    assert token_f1("", ["x"]) == 0.0


def test_jsonl_tasks_triviaqa_and_multiple_choice(tmp_path):
    trivia = tmp_path / "trivia.jsonl"
    trivia.write_text(
        json.dumps({"Question": "Who wrote Hamlet?",
                    "Answer": {"Value": "Shakespeare", "Aliases": ["William Shakespeare"]}}) + "\n"
        + json.dumps({"question": "Capital of France?", "answers": ["Paris"], "id": "q2"}) + "\n")
    nlg = read_jsonl(trivia, "nlg")
    assert nlg[0].answers == ("Shakespeare", "William Shakespeare") and nlg[1].id == "q2"
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "The sky is", "options": ["blue", "green"], "label": 0})
                  + "\n" + json.dumps({"context": "Two plus two is", "choices": ["3", "4"],
                                       "answer": 1}) + "\n")
    nlu = read_jsonl(mc, "nlu")
    assert [e.label for e in nlu] == [0, 1] and nlu[1].options == ("3", "4")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "options": ["a"], "label": 3}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 1: label 3"):
        read_jsonl(bad, "nlu")
    with pytest.raises(FileNotFoundError, match="eval.tasks"):
        read_jsonl(tmp_path / "missing.jsonl", "nlg")


def test_demonstrations_never_leak_the_evaluated_example():
    examples = [Example(prompt=f"question {i}", answers=(f"answer{i}",)) for i in range(6)]
    task = Task("t", "nlg", examples)  # no train split: demonstrations from the others
    for i in range(6):
        for shots in (1, 3, 5):
            prompt = task.prompt(i, shots, seed=0)
            assert f"answer{i}" not in prompt
            assert prompt.count("q:") == shots + 1 and prompt.endswith(f"question {i} a:")
    assert task.prompt(2, 3, seed=0) == task.prompt(2, 3, seed=0)  # fixed seed
    assert task.prompt(0, 0, seed=0) == "q: question 0 a:"
    assert task.prompt(0, 1, seed=0).count("<eos>") == 1  # demonstrations end like documents


def test_world_is_deterministic_and_fingerprinted():
    a, b = WorldCorpus(SMALL_WORLD), WorldCorpus(SMALL_WORLD)
    assert a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.train_batch(3, 2, 8, 0), b.train_batch(3, 2, 8, 0))
    assert not np.array_equal(a.train_batch(3, 2, 8, 0), a.train_batch(3, 2, 8, 0, data_order=1))
    other = WorldCorpus(dataclasses.replace(SMALL_WORLD, seed=7))
    assert other.fingerprint != a.fingerprint
    world = a.world
    assert world.knowledge_bits == pytest.approx(40 * (6 + np.log2(100) + 6 + 5))
    assert len({p.name for p in world.people}) == 40  # names are unique
    text = a.tokenizer.decode(a.train)
    assert "<unk>" not in text and "q:" in text  # closed vocabulary, QA lines present
    bio_only = world.name(world.bio_only_people[0])
    assert f"q: where was {bio_only} born" not in text  # held-out people have no QA lines


def test_world_tasks_shapes():
    world = World(SMALL_WORLD)
    tasks = {t.name: t for t in world_tasks(world, max_examples=25, seed=0)}
    assert set(tasks) == {"world_qa", "world_qa_seen", "world_facts"}
    facts = tasks["world_facts"]
    assert facts.kind == "nlu" and len(facts.examples) == 25
    for ex in facts.examples:
        assert len(set(ex.options)) == 4 and 0 <= ex.label < 4
        person, attribute = map(int, ex.id.split(":"))
        assert ex.options[ex.label] == f"{world.value(person, attribute)} ."
    qa = tasks["world_qa"]
    held_out = {str(p) for p in world.bio_only_people}
    assert all(ex.id.split(":")[0] in held_out for ex in qa.examples)


def _evaluator(tasks, **kw):
    world = World(SMALL_WORLD)
    cfg = model_config(vocab_size=world.tokenizer.vocab_size, seq_len=32, d_model=32,
                       n_layers=2, n_heads=2, d_ff=64)
    graphdef, state = nnx.split(GLaM(cfg, rngs=nnx.Rngs(0)))
    ev = Evaluator(graphdef, world.tokenizer, tasks, seq_len=32, batch_size=4, shots=[0, 2],
                   max_answer_tokens=3, length_normalize=False, seed=0, **kw)
    return ev, state, world


def test_rank_classification_picks_the_planted_answer():
    """A scorer that likes one word ("often") only: the harness must pick it wherever the
    option sits, across padded batches, and report 100."""
    words = ["slowly", "often", "again"]
    examples = [Example(prompt="the river", options=tuple(np.roll(words, i)),
                        label=int(np.flatnonzero(np.roll(words, i) == "often")[0]))
                for i in range(7)]
    ev, state, world = _evaluator([Task("plant", "nlu", examples)])
    planted = world.tokenizer.index["often"]
    ev.score = jax.jit(lambda s, tokens, mask, target: (
        jnp.sum((tokens == planted) & target, axis=1) * 1.0, jnp.sum(target, axis=1)))
    result = ev(state)
    assert result.metrics["eval/plant/0shot"] == 100.0
    assert result.metrics["eval/nlu_avg/2shot"] == 100.0
    assert {p["prediction"] for p in result.predictions} == {"often"}


def test_generation_is_scored_by_exact_match():
    examples = [Example(prompt="where is the river ?", answers=("market",)),
                Example(prompt="where is the road ?", answers=("garden",))]
    ev, state, world = _evaluator([Task("gen", "nlg", examples)])
    answer = world.tokenizer.encode("market . q:")
    ev.generate = jax.jit(lambda s, t, m: jnp.broadcast_to(jnp.asarray(answer), (t.shape[0], 3)))
    result = ev(state)
    assert result.metrics["eval/gen/0shot"] == 50.0  # "market" right once, stop at "."
    assert result.metrics["eval/gen/0shot_f1"] == 50.0
    assert {p["prediction"] for p in result.predictions} == {"market"}


def test_greedy_decode_stops_early_without_changing_any_answer():
    """Against a plain loop of every step: each row's tokens up to its first stop id are equal,
    and the rest is the stop id, whether all rows stop early, some never do, or one stops at
    once; the next token depends on the whole window (as attention does)."""
    from glam.eval.harness import greedy_decode

    eos, pad, vocab, new = 2, 0, 11, 6

    def next_token(tokens, mask):  # a function of the visible window, eos for some windows
        return (jnp.sum(jnp.where(mask, tokens * (1 + jnp.arange(tokens.shape[1])), 0), 1)
                % vocab).astype(jnp.int32)

    def reference(tokens, mask):
        out = []
        for _ in range(new):
            nxt = next_token(tokens, mask)
            out.append(nxt)
            tokens = jnp.concatenate([tokens[:, 1:], nxt[:, None]], axis=1)
            mask = jnp.concatenate([mask[:, 1:], jnp.ones_like(mask[:, :1])], axis=1)
        out = np.stack(out, axis=1)
        stopped = np.cumsum(np.isin(out, [eos, pad]), axis=1)
        first = (stopped == 1) & np.isin(out, [eos, pad])
        return np.where((stopped > 0) & ~first, eos, out)

    for seed in range(6):
        tokens = jax.random.randint(jax.random.key(seed), (5, 9), 3, vocab)
        mask = jnp.arange(9)[None] >= jax.random.randint(jax.random.key(seed + 9), (5, 1), 0, 8)
        got = jax.jit(lambda t, m: greedy_decode(next_token, t, m, new, (eos, pad)))(tokens, mask)
        np.testing.assert_array_equal(got, reference(tokens, mask), err_msg=f"seed {seed}")


def test_harness_runs_a_real_model_on_world_tasks():
    world = World(SMALL_WORLD)
    ev, state, _ = _evaluator(world_tasks(world, max_examples=6, seed=0))
    result = ev(state)
    for shots in (0, 2):
        for key in ("world_qa", "world_qa_seen", "world_facts", "nlg_avg", "nlu_avg"):
            assert 0 <= result.metrics[f"eval/{key}/{shots}shot"] <= 100
    assert len(result.predictions) == 2 * 18


@pytest.mark.slow
@pytest.mark.parametrize("n_experts", [0, 4])
def test_left_padding_is_masked_out(n_experts):
    """Padding is not attended to and takes no expert capacity: the real tokens' logits do not
    depend on how much padding precedes them (capacity is tight here: factor 1)."""
    cfg = model_config(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                       n_experts=n_experts, router={"capacity_factor": 1.0, "capacity_multiple": 1})
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (1, 8), 3, 50)
    outputs = []
    for pad, pad_id in ((8, PAD), (8, 7), (24, PAD)):
        padded = jnp.concatenate([jnp.full((1, pad), pad_id), tokens], axis=1)
        mask = jnp.arange(pad + 8)[None] >= pad
        outputs.append(model(padded, mask=mask)[0][:, pad:])
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    np.testing.assert_allclose(outputs[0], outputs[2], atol=1e-5)
