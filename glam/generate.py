"""Text generation from a trained model with a key-value cache: greedy, temperature, top-k and
top-p (nucleus) sampling, for dense and MoE models.

Each new token is one decode step: its query attends to the cached keys and values of every
earlier position (the same relative-position buckets as training), and each MoE layer routes it
alone, dropless (every token gets its top-k experts: inference has no capacity to overflow). A
decode step therefore equals running the whole window again with dropless routing; the test
checks that against the model's own forward pass. A model trained with capacity-factor routing
dropped some assignments in training; at generation none is dropped.

The cache holds prompt + new tokens, at most `max_length` (MAX_LENGTH by default): memory grows
linearly in that length, as each step computes the position bias of its own query row only.

Letters: B prompts, L cache length (prompt + new tokens), N heads, D head width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glam.config import ModelConfig
from glam.model import GLaM
from glam.model.layers import Attention, distance_buckets, project

MAX_LENGTH = 8192  # default bound on prompt + new tokens (the cache's length L)


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` routed as generation routes: dropless, each token its own group."""
    return dataclasses.replace(cfg, router=dataclasses.replace(
        cfg.router, dispatch="dropless", group_size=1, jitter=0.0))


def step_position_bias(attn: Attention, pos: jax.Array, length: int) -> jax.Array:
    """The relative position bias [N, 1, L] float32 of the query at position `pos` (int scalar)
    against keys 0..L-1: the row `pos` of training's [L, L] table, without building the table
    (keys after `pos` get the distance-0 bucket; the caller masks them)."""
    table = jnp.asarray(distance_buckets(attn.num_buckets, attn.max_distance))
    distance = jnp.clip(pos - jnp.arange(length), 0, attn.max_distance)
    return jnp.transpose(attn.rel_bias[...][table[distance]])[:, None, :]


def _cached_attention(attn: Attention, x: jax.Array, cache: tuple, pos: jax.Array):
    """x [B, 1, M] at position `pos`; cache (k, v) [B, L, N, D] -> (out [B, 1, M], cache)."""
    dt = x.dtype
    k_cache, v_cache = cache
    length, d = k_cache.shape[1], attn.wq.shape[-1]
    q, k, v = (project(x, w[...].astype(dt)) for w in (attn.wq, attn.wk, attn.wv))
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), pos, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), pos, axis=1)
    scores = jnp.einsum("btnd,bund->bntu", q, k_cache).astype(jnp.float32) * d**-0.5
    scores = scores + step_position_bias(attn, pos, length)[None]
    allowed = jnp.arange(length) <= pos
    scores = jnp.where(allowed[None, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bntu,bund->btnd", probs, v_cache.astype(dt))
    return project(out, attn.wo[...].astype(dt), contract=2), (k_cache, v_cache)


def decode_step(model: GLaM, token: jax.Array, pos: jax.Array, caches: list):
    """One token per prompt through every block: token [B] int at position `pos` -> (logits
    [B, V] float32, updated caches). `model` must be built from `inference_config`."""
    x = model.embed[...][token][:, None].astype(model.dtype)
    new = []
    for block, cache in zip(model.blocks, caches):
        h, cache = _cached_attention(block.attn, block.attn_norm(x), cache, pos)
        x = x + h
        y = block.ffn_norm(x)
        x = x + (block.ffn(y)[0] if block.is_moe else block.ffn(y))
        new.append(cache)
    return model.head(x)[:, 0], new


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int,
           top_p: float) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]: argmax when temperature is 0; otherwise a draw
    from softmax(logits / temperature) restricted to the `top_k` most likely tokens (0: all)
    and to the smallest set whose probability reaches `top_p` (1: all; Holtzman et al. 2020)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Shifted so that the likeliest is 0: a tiny temperature sends the rest to -inf, never NaN.
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the likelier ones
        drop_sorted = before >= top_p  # the most likely token is always kept
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(len(order))[:, None], order].set(
            drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(nnx.jit, static_argnames=("new_tokens", "temperature", "top_k", "top_p"))
def _generate(model, prompt, key, new_tokens, temperature, top_k, top_p, eos):
    b, p = prompt.shape
    length = p + new_tokens
    blocks = model.blocks
    shape = (b, length, blocks[0].attn.wq.shape[1], blocks[0].attn.wq.shape[2])
    caches = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype)) for _ in blocks]
    out = jnp.concatenate([prompt, jnp.zeros((b, new_tokens), jnp.int32)], axis=1)

    def step(pos, carry):
        out, caches, done, key = carry
        logits, caches = decode_step(model, out[:, pos], pos, caches)
        key, draw = jax.random.split(key)
        token = sample(logits, draw, temperature, top_k, top_p)
        token = jnp.where(done, 0, token)  # after <eos>: padding
        writing = pos + 1 >= p  # inside the prompt the next token is given
        out = jnp.where(writing, jax.lax.dynamic_update_slice_in_dim(out, token[:, None],
                                                                      pos + 1, axis=1), out)
        done = done | (writing & (token == eos))
        return out, caches, done, key

    done = jnp.zeros((b,), bool)
    out, *_ = jax.lax.fori_loop(0, length - 1, step, (out, caches, done, key))
    return out


def check_arguments(prompt: np.ndarray, new_tokens: int, vocab: int, *, temperature: float,
                    top_k: int, top_p: float, max_length: int) -> None:
    """Refuse what `generate` cannot do, before anything compiles; arguments as there.

    Raises:
      ValueError: names the argument (and its glam-generate flag) and the fix.
    """
    def whole(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, P] token ids with P >= 1, got shape {prompt.shape}")
    if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab):
        raise ValueError(f"prompt: token ids {prompt.min()}..{prompt.max()} outside the "
                         f"embedding's 0..{vocab - 1}; encode with the model's own tokenizer")
    if not whole(new_tokens) or new_tokens < 0:
        raise ValueError(f"new_tokens (--max-new-tokens) must be a whole number >= 0, got "
                         f"{new_tokens!r}")
    if not whole(max_length) or max_length < 1:
        raise ValueError(f"max_length (--max-length) must be a whole number >= 1, got "
                         f"{max_length!r}")
    length = prompt.shape[1] + new_tokens
    if length > max_length:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + new_tokens ({new_tokens}) = "
                         f"{length} exceeds max_length={max_length} (--max-length): ask for at "
                         f"most {max(max_length - prompt.shape[1], 0)} new tokens, or raise "
                         "max_length (the cache grows linearly with it)")
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature (--temperature) must be a finite number >= 0 (0: greedy), "
                         f"got {temperature!r}")
    if 0 < temperature < np.finfo(np.float32).tiny:  # would divide by a float32 zero
        raise ValueError(f"temperature (--temperature) {temperature!r} is below float32's "
                         "smallest normal number; use 0 for greedy decoding")
    if not whole(top_k) or not 0 <= top_k <= vocab:
        raise ValueError(f"top_k (--top-k) must be a whole number in [0, {vocab}] (0: no limit; "
                         f"the vocabulary has {vocab} tokens), got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p (--top-p) must be in (0, 1] (1: no limit), got {top_p!r}")


def generate(model: GLaM, prompt: np.ndarray, new_tokens: int, *, seed: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int = 2, max_length: int = MAX_LENGTH) -> np.ndarray:
    """Continue each prompt by `new_tokens` tokens with the KV cache.

    Args:
      model: a GLaM built from `inference_config` (dropless routing, group size 1).
      prompt: [B, P] int token ids in [0, V) (P >= 1; equal lengths: left-pad is not supported).
      new_tokens: tokens to add (>= 0); after a row emits `eos_id` it continues with padding.
      seed: of the sampling draws (unused when temperature is 0).
      temperature: 0 for greedy decoding; > 0 (finite) samples.
      top_k: keep only the k most likely tokens (0: no limit; at most V).
      top_p: in (0, 1]: keep the smallest set of tokens whose probability reaches top_p (1: no
        limit).
      max_length: the most tokens P + new_tokens may come to (the cache holds
        2 * layers * B * (P + new_tokens) * N * D values).

    Returns:
      [B, P + new_tokens] int32: the prompts and their continuations.

    Raises:
      ValueError: a bad argument (see `check_arguments`), or a model whose routing may drop
        tokens.
    """
    prompt = np.asarray(prompt)
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    check_arguments(prompt, new_tokens, model.embed.shape[0], temperature=temperature,
                    top_k=top_k, top_p=top_p, max_length=max_length)
    moe = [b.ffn for b in model.blocks if b.is_moe]
    if moe and (moe[0].cfg.router.dispatch != "dropless" or moe[0].cfg.router.group_size != 1):
        raise ValueError("build the model from glam.generate.inference_config(cfg): generation "
                         "routes each token alone and dropless")
    prompt = prompt.astype(np.int32)
    if new_tokens == 0:
        return prompt
    return np.asarray(_generate(model, jnp.asarray(prompt), jax.random.key(seed), int(new_tokens),
                                float(temperature), int(top_k), float(top_p), eos_id))
