"""Analytic parameter and FLOP counts of a GLaM model config, with no allocation.

FLOPs are 2 x multiply-adds of every matmul one token passes through in a forward pass at
sequence length T: attention projections (q, k, v, o), attention scores and the weighted sum of
values (over all T keys, as the dense kernel computes them, masked or not), dense FFNs, the
router (M x E x G, growing with the routed experts), the K x G routed and the shared experts
of each MoE layer, and the output projection. Norms, softmax
and the position bias are not matmuls and are left out. Training FLOPs = 3 x forward
(forward + backward with respect to activations and weights).

These are *activated* FLOPs, the paper's x-axis: an MoE layer counts its K chosen experts, not
the capacity padding its buffers actually compute (E * C >= K * S slots), nor the K-way combine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from glam.config import ModelConfig


@dataclass(frozen=True)
class Counts:
    total_params: int
    activated_params: int
    embedding_params: int
    non_embedding_params: int
    expert_params: int  # routed and shared experts of every MoE layer
    activated_non_embedding_params: int
    forward_flops_per_token: int
    forward_flops_per_token_no_embedding: int
    train_flops_per_token: int
    seq_len: int
    n_moe_layers: int

    def as_dict(self) -> dict:
        return asdict(self)


def count(cfg: ModelConfig, seq_len: int | None = None) -> Counts:
    """Counts for `cfg`; FLOPs at `seq_len` (default: the model's training length)."""
    t = seq_len or cfg.seq_len
    m, a, f, h, e, v = (cfg.d_model, cfg.attention_width, cfg.d_ff, cfg.expert_hidden,
                        cfg.routed_experts, cfg.vocab_size)
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.n_layers - n_moe

    attn = 4 * m * a + cfg.rel_pos_buckets * cfg.n_heads
    norms = 2 * m
    dense_ffn = (3 if cfg.ffn_kind == "geglu" else 2) * m * f
    matrices = 3 if cfg.expert_kind == "geglu" else 2
    expert = matrices * m * h
    shared_ffn = matrices * m * cfg.shared_hidden  # each shared expert as wide as a G = 1 expert
    router = m * e
    embedding = v * m * (1 if cfg.tie_embeddings else 2)

    shared = cfg.n_layers * (attn + norms) + n_dense * dense_ffn + n_moe * router + m
    total_ne = shared + n_moe * (e * expert + shared_ffn)
    activated_ne = shared + n_moe * (cfg.routed_top_k * expert + shared_ffn)

    layer_flops = 2 * (4 * m * a) + 2 * 2 * t * a
    flops_ne = (cfg.n_layers * layer_flops + n_dense * 2 * dense_ffn
                + n_moe * 2 * (router + cfg.routed_top_k * expert + shared_ffn))
    flops = flops_ne + 2 * m * v
    return Counts(
        total_params=total_ne + embedding,
        activated_params=activated_ne + embedding,
        embedding_params=embedding,
        non_embedding_params=total_ne,
        expert_params=n_moe * (e * expert + shared_ffn),
        activated_non_embedding_params=activated_ne,
        forward_flops_per_token=flops,
        forward_flops_per_token_no_embedding=flops_ne,
        train_flops_per_token=3 * flops,
        seq_len=t,
        n_moe_layers=n_moe,
    )


def short_count(n: float) -> str:
    """A count as people write it: 12345 -> '12.3K', 1.5e9 -> '1.5B'."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"
