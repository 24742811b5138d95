"""Generation with a KV cache (glam.generate) against the model's own forward pass, sampling,
and the export it loads from (glam.export)."""

import numpy as np
import pytest
from flax import nnx

from glam import export
from glam.data.tokenizer import WordTokenizer
from glam.generate import decode_step, generate, inference_config, sample
from glam.model import GLaM
from glam.resolve import load

import jax
import jax.numpy as jnp


def _model(preset: str, seed: int = 0) -> GLaM:
    cfg = load([f"model={preset}", "model.vocab_size=512"], "cpu").model
    return GLaM(inference_config(cfg), rngs=nnx.Rngs(seed))


@pytest.mark.slow  # compiles the decode loop and a forward pass per length (~1 min)
@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_cached_decoding_equals_the_full_forward_pass(preset):
    """Every decode step's logits equal the last position of running the whole window again
    (dropless routing), and greedy generation equals the full-recompute greedy loop."""
    model = _model(preset)
    ids = np.random.default_rng(0).integers(3, 512, (2, 9)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids))[0])
    blocks = model.blocks
    shape = (2, 9, blocks[0].attn.wq.shape[1], blocks[0].attn.wq.shape[2])
    caches = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in blocks]
    for pos in range(9):
        logits, caches = decode_step(model, jnp.asarray(ids[:, pos]), jnp.asarray(pos), caches)
        np.testing.assert_allclose(np.asarray(logits), full[:, pos], rtol=1e-5, atol=1e-5)

    prompt = ids[:, :4]
    out = generate(model, prompt, 6, eos_id=-1)
    reference = prompt
    for _ in range(6):
        nxt = np.asarray(model(jnp.asarray(reference))[0])[:, -1].argmax(-1)
        reference = np.concatenate([reference, nxt[:, None].astype(np.int32)], axis=1)
    np.testing.assert_array_equal(out, reference)


def test_sampling_rules():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 50)), jnp.float32)
    greedy = np.asarray(sample(logits, jax.random.key(0), 0.0, 0, 1.0))
    assert (greedy == np.asarray(logits).argmax(-1)).all()
    for kwargs in ({"top_k": 1, "top_p": 1.0}, {"top_k": 0, "top_p": 1e-6}):
        picked = sample(logits, jax.random.key(3), 5.0, **kwargs)
        assert (np.asarray(picked) == greedy).all(), kwargs  # one token left: the likeliest
    draws = np.stack([np.asarray(sample(logits, jax.random.key(s), 1.0, 3, 1.0))
                      for s in range(200)])
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    assert all(set(draws[:, row]) <= set(top3[row]) for row in range(4))
    assert len({tuple(d) for d in draws}) > 1  # it does sample
    probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs, axis=-1)
    nucleus = np.stack([np.asarray(sample(logits, jax.random.key(s), 1.0, 0, 0.5))
                        for s in range(200)])
    for row in range(4):  # only tokens inside the 0.5 nucleus are drawn
        mass_before = np.cumsum(probs[row, order[row]]) - probs[row, order[row]]
        allowed = set(order[row][mass_before < 0.5])
        assert set(nucleus[:, row]) <= allowed


def test_a_tiny_temperature_samples_the_likeliest_token():
    """Logits divided by a temperature near 0 overflow; shifted first, they pick the argmax."""
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(8, 50)) * 10, jnp.float32)
    greedy = np.asarray(logits).argmax(-1)
    for top_p in (1.0, 0.9):
        picked = sample(logits, jax.random.key(0), 2e-38, 0, top_p)
        np.testing.assert_array_equal(np.asarray(picked), greedy)


def test_generation_stops_into_padding_and_refuses_bad_arguments():
    model = _model("tiny_moe")
    prompt = np.array([[5, 6, 7]], np.int32)
    free = generate(model, prompt, 5, eos_id=-1)[0]
    eos = int(free[3])  # call the first generated token the end of document
    out = generate(model, prompt, 5, eos_id=eos)[0]
    assert out[3] == eos and (out[4:] == 0).all()
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="new_tokens"):
        generate(model, prompt, -1)
    capacity = GLaM(load(["model=tiny_moe", "model.vocab_size=512"], "cpu").model,
                    rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="inference_config"):
        generate(capacity, prompt, 2)


def _shapes(closed) -> list[tuple[int, ...]]:
    """Shapes of every constant and intermediate of a closed jaxpr, sub-jaxprs included."""
    out = [np.shape(c) for c in closed.consts]

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            out.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                        out.extend(np.shape(c) for c in sub.consts)
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(closed.jaxpr)
    return out


def test_a_decode_step_builds_its_own_position_bias_row_not_the_length_squared_table():
    """Memory linear in the cache length L: no constant or intermediate of a decode step holds
    L * L values (the [L, L] bucket table); the bias of a step is [N, 1, L], the row `pos` of
    training's table."""
    model = _model("tiny_dense")
    length, heads, width = 1024, model.blocks[0].attn.wq.shape[1], model.blocks[0].attn.wq.shape[2]
    caches = [(jnp.zeros((1, length, heads, width)),) * 2 for _ in model.blocks]
    closed = jax.make_jaxpr(lambda tok, pos, c: decode_step(model, tok, pos, c))(
        jnp.zeros((1,), jnp.int32), jnp.asarray(5), caches)
    largest = max(int(np.prod(s)) for s in _shapes(closed))
    assert largest < length * length // 8, largest

    from glam.generate import step_position_bias
    from glam.model.layers import relative_position_buckets

    attn = model.blocks[0].attn
    attn.rel_bias[...] = jnp.asarray(np.random.default_rng(0).normal(size=attn.rel_bias.shape),
                                     jnp.float32)
    full = np.asarray(attn.rel_bias[...])[relative_position_buckets(length, attn.num_buckets,
                                                                     attn.max_distance)]
    for pos in (0, 7, 100, 1023):
        row = np.asarray(step_position_bias(attn, jnp.asarray(pos), length))
        assert row.shape == (heads, 1, length)
        np.testing.assert_array_equal(row[:, 0, : pos + 1], full[pos, : pos + 1].T)


def test_generation_refuses_what_it_cannot_honour_before_compiling():
    """Each refusal names the argument; a length past max_length is refused, not compiled."""
    model = _model("tiny_dense")
    prompt = np.array([[5, 6, 7]], np.int32)
    refused = {"temperature": [{"temperature": float("nan")}, {"temperature": float("inf")},
                               {"temperature": -0.5}, {"temperature": 1e-45}],
               "top_k": [{"top_k": -1}, {"top_k": 2.5}, {"top_k": 513}],
               "top_p": [{"top_p": float("nan")}, {"top_p": 1.5}, {"top_p": -0.1}],
               "max_length": [{"new_tokens": 8190}, {"new_tokens": 8, "max_length": 10},
                              {"new_tokens": 1, "max_length": 0}],
               "new_tokens": [{"new_tokens": -3}, {"new_tokens": 2.0}]}
    for name, cases in refused.items():
        for kwargs in cases:
            kwargs = {"new_tokens": 2, **kwargs}
            with pytest.raises(ValueError, match=name):
                generate(model, prompt, kwargs.pop("new_tokens"), **kwargs)
    for ids in ([[5, 512]], [[-1, 5]]):  # outside the 512-row embedding: never clamped
        with pytest.raises(ValueError, match="outside the embedding"):
            generate(model, np.array(ids), 2)
    np.testing.assert_array_equal(generate(model, prompt, 0), prompt)
    assert generate(model, prompt, 2, max_length=5).shape == (1, 5)


def test_an_export_loads_back_to_the_same_model(tmp_path):
    cfg = load(["model=tiny_moe", "model.vocab_size=512"], "cpu").model
    model = GLaM(cfg, rngs=nnx.Rngs(7))
    words = WordTokenizer([f"w{i}" for i in range(509)])
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    export.save(tmp_path / "model", params, cfg, words, run_id="abc")
    loaded = export.load(tmp_path)  # a run directory: its model/
    assert loaded.config == cfg and loaded.run_id == "abc"
    assert loaded.tokenizer.vocab == words.vocab
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 16)))
    np.testing.assert_array_equal(np.asarray(loaded.model(ids)[0]), np.asarray(model(ids)[0]))
    with pytest.raises(FileNotFoundError, match="no exported model"):
        export.load(tmp_path / "nothing")


def test_a_sentencepiece_model_exports_and_generates(tmp_path, capsys):
    """Text runs export their SentencePiece model; glam-generate encodes and decodes with it."""
    from glam.data.tokenizer import SentencePieceTokenizer
    from glam.cli.generate import main as generate_main

    words = ["alpha", "beta", "gamma", "delta", "model", "expert", "token", "layer"]
    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(words, 8)) for _ in range(400)]
    sp = SentencePieceTokenizer.train(iter(sentences), vocab_size=24, model_type="unigram",
                                      byte_fallback=False, character_coverage=1.0, seed=0)
    import dataclasses

    cfg = dataclasses.replace(load(["model=tiny_dense"], "cpu").model, vocab_size=sp.vocab_size)
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    export.save(tmp_path / "model", jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                cfg, sp)
    assert (tmp_path / "model" / "tokenizer.model").read_bytes() == sp.model_bytes
    generate_main([str(tmp_path), "--prompt", "alpha beta", "--max-new-tokens", "4"])
    said = capsys.readouterr().out
    assert said.startswith("alpha beta >>> ")
