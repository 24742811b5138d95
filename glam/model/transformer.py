"""The GLaM decoder: pre-norm Transformer whose FFN is an MoE layer every `moe_every` layers."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from glam.config import ModelConfig
from glam.model.layers import Attention, FeedForward, RMSNorm, declare, param, project
from glam.model.moe import MoEFeedForward


@struct.dataclass
class MoEOutputs:
    """Router losses summed over MoE layers, and each MoE layer's routing statistics."""

    aux_loss: jax.Array
    z_loss: jax.Array
    layer_stats: dict  # {layer index: routing stats}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = MoEFeedForward(cfg, rngs=rngs) if self.is_moe else FeedForward(
            cfg.d_model, cfg.d_ff, cfg.ffn_kind, rngs=rngs)

    def __call__(self, x: jax.Array, key: Optional[jax.Array], mask: Optional[jax.Array],
                 segment_ids: Optional[jax.Array] = None):
        x = x + self.attn(self.attn_norm(x), mask, segment_ids)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, routing = self.ffn(h, key, mask)
            return x + y, routing
        return x + self.ffn(h), None


class GLaM(nnx.Module):
    """tokens [B, T] int -> (logits [B, T, V] float32, MoEOutputs)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.d_model = cfg.d_model
        self.embed = declare(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model)),
                             ("vocab", "embed"))
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model)
        self.tie_embeddings = cfg.tie_embeddings
        if not cfg.tie_embeddings:
            self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model,
                                 ("embed", "vocab"))

    def __call__(self, tokens: jax.Array, key: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None):
        """`key` drives router jitter and second-expert sampling; None routes deterministically.
        `mask` [B, T] marks real tokens when sequences are padded (evaluation); `segment_ids`
        [B, T] int keeps attention within each packed document."""
        x = self.embed[...][tokens].astype(self.dtype)
        aux, z, stats = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), {}
        for i, block in enumerate(self.blocks):
            layer_key = None if key is None else jax.random.fold_in(key, i)
            x, routing = block(x, layer_key, mask, segment_ids)
            if routing is not None:
                aux, z = aux + routing.aux_loss, z + routing.z_loss
                stats[i] = routing.stats
        return self.head(x), MoEOutputs(aux_loss=aux, z_loss=z, layer_stats=stats)

    def head(self, x: jax.Array) -> jax.Array:
        """The last blocks' output [..., M] -> logits [..., V] float32 (final norm, then the
        output projection)."""
        x = self.final_norm(x)
        if self.tie_embeddings:
            # Shared input/output embedding: rescale so initial logits have unit variance (T5).
            logits = project(x, self.embed[...].astype(x.dtype).T) * self.d_model**-0.5
        else:
            logits = project(x, self.unembed[...].astype(x.dtype))
        return logits.astype(jnp.float32)


def param_count(model: nnx.Module) -> int:
    """Number of parameters of a (possibly abstract, from nnx.eval_shape) model."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
