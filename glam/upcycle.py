"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): an MoE run that starts from a
finished dense run, every expert a copy of the dense FFN it replaces (`train.init_from`).

`read_source` reads the dense run's export (its model config and the training FLOPs it spent)
for resolution: `check_source` refuses a pair that cannot be upcycled, and `train.flops_budget`
counts the dense run's FLOPs. Before anything is compiled, `dense_weights` loads the weights
and refuses a dense run whose tokenizer is not the run's own (its embedding rows would mean
other tokens); `upcycled_state` then writes them into the fresh MoE train state. The optimizer
starts fresh, as does the schedule. The dense run must stay where it is while the MoE run may
resume (resolution reads it).

The router keeps its random initialisation, so the (at first identical) experts see different
tokens and drift apart. Every other weight is the dense model's, so the upcycled model computes
the dense model's function exactly while each token's placed gates sum to 1, which needs
K >= 2 (a top-1 gate is the router probability): with gates normalised before dropping
(`gate_norm=before`, GLaM's) when none of its assignments is dropped, with `gate_norm=after`
when one is placed. With dropless dispatch, or capacity for every assignment, the first loss is
the dense model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from glam.config import ConfigError, ModelConfig

# Dense FFN parameter -> the expert parameter holding one copy of it per expert.
EXPERT_COPIES = {"w_in": "wi", "w_gate": "wi_gate", "w_out": "wo"}
# Fields the two models must share for every non-FFN weight to carry over unchanged.
SHARED_SHAPE = ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "ffn_kind",
                "tie_embeddings", "rel_pos_buckets", "rel_pos_max_distance")


@dataclass(frozen=True)
class Source:
    """A finished dense run's export: its folder, model config, and the training FLOPs it spent
    (None for an export that does not record them)."""

    folder: Path
    model: ModelConfig
    train_flops: float | None


def read_source(init_from: str, tracking_uri: str | None = None) -> Source:
    """The export `init_from` names (`glam.export.resolve_source`: export folder, run directory
    or MLflow run id).

    Raises:
      ConfigError (`train.init_from`): nothing exported there, or the export is damaged.
    """
    from glam import export  # jax and flax: only for a run that upcycles

    try:
        folder = export.resolve_source(init_from, tracking_uri)
        model, _, _ = export.read_config(folder / "config.json")
        trained = json.loads((folder / "config.json").read_text()).get("trained") or {}
        flops = trained.get("train_flops") if isinstance(trained, dict) else "not a record"
        if flops is not None and not (isinstance(flops, (int, float)) and flops >= 0):
            raise export.ExportError(f"{folder / 'config.json'}: trained.train_flops is "
                                     f"{flops!r}, not a number of FLOPs; export the run again")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"train.init_from: {err}") from None
    return Source(folder, model, None if flops is None else float(flops))


def check_source(m: ModelConfig, source: ModelConfig, where: str) -> None:
    """Refuse to upcycle `source` (a dense model) into `m` (a resolved MoE model config) unless
    every dense weight has its place and the MoE layers can compute the dense function.

    Raises:
      ConfigError: names the field to change.
    """
    bad = [f"model.{name}: {getattr(m, name)} here, {getattr(source, name)} in the dense run"
           for name in SHARED_SHAPE if getattr(m, name) != getattr(source, name)]
    rules = [
        (source.family == "dense", "train.init_from",
         f"{where} is an MoE model; upcycling starts from a dense run"),
        (not bad, "train.init_from",
         f"{where} has another shape: " + "; ".join(bad) + ". Use the dense run's model preset "
         "with model.n_experts set"),
        (m.family == "moe", "model.n_experts", "0: upcycling makes an MoE model; set the experts"),
        (m.granularity == 1, "model.granularity",
         f"{m.granularity}: every expert is a copy of the whole dense FFN; use 1"),
        (m.shared_experts == 0, "model.shared_experts",
         f"{m.shared_experts}: a shared expert beside the copies would add a second dense FFN; "
         "use 0"),
        (m.expert_kind == source.ffn_kind, "model.expert_kind",
         f"{m.expert_kind}, but the dense FFN is {source.ffn_kind}; set "
         f"model.expert_kind={source.ffn_kind}"),
        (m.expert_hidden == source.d_ff, "model.expert_d_ff",
         f"{m.expert_hidden}, but each expert copies the dense FFN of width {source.d_ff}; "
         "leave it unset under plan.placement=glam"),
        (m.routed_top_k > 1, "model.top_k",
         "1: the one gate is the router probability (below 1, and the router's only gradient), "
         "so the upcycled layer would scale the dense FFN down; use top_k=2"),
    ]
    for ok, name, message in rules:
        if not ok:
            raise ConfigError(f"{name}: {message}.")


def _copy(target: dict, dense: dict, path: str) -> dict:
    """`target` (a pure dict of the MoE model's weights) with every dense weight in its place:
    the same path, or an MoE layer's experts (`EXPERT_COPIES`, one copy per expert). Router
    weights and biases keep their values.

    Raises:
      ValueError: a weight of either model has no counterpart, or shapes differ.
    """
    out = {}
    for key, value in target.items():
        name = f"{path}{key}"
        if isinstance(value, dict):
            out[key] = _copy(value, dense.get(key, {}), f"{name}.")
        elif key in dense and dense[key].shape == value.shape:
            out[key] = dense[key]
        elif key in EXPERT_COPIES and EXPERT_COPIES[key] in dense:
            out[key] = dense[EXPERT_COPIES[key]][None].repeat(value.shape[0], axis=0)
            if out[key].shape != value.shape:
                raise ValueError(f"{name}: the dense FFN gives {out[key].shape}, the experts "
                                 f"need {value.shape}")
        elif key in ("router", "bias"):
            out[key] = value
        else:
            raise ValueError(f"{name}: no dense weight of shape {value.shape} to start from")
    used = {EXPERT_COPIES.get(k, k) for k in target}
    left = [f"{path}{k}" for k in dense if k not in used]
    if left:
        raise ValueError(f"dense weights with no place in the MoE model: {', '.join(left)}")
    return out


def _same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids: the same word list, or the same
    SentencePiece model."""
    words = [getattr(t, "vocab", None) for t in (a, b)]
    pieces = [getattr(t, "model_bytes", None) for t in (a, b)]
    return type(a) is type(b) and words[0] == words[1] and pieces[0] == pieces[1]


def dense_weights(cfg, tokenizer) -> dict | None:
    """The weights (a pure dict of host arrays) of the dense run `cfg.train.init_from` names
    (`cfg`: the resolved config), to start the MoE run from; None when the run does not
    upcycle. Also read when resuming: a checkpoint then replaces them, but one set aside as
    damaged may send the run back to step 0.

    Raises:
      ConfigError (`train.init_from`): the export is gone, damaged, or trained on another
        tokenizer than `tokenizer`, the run's own.
    """
    if cfg.train.init_from is None:
        return None
    import jax
    import numpy as np
    from flax import nnx

    from glam import export
    from glam.model import WEIGHTS

    source = read_source(cfg.train.init_from, cfg.logger.tracking_uri).folder
    try:
        loaded = export.load(source)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"train.init_from: {err}") from None
    if not _same_tokenizer(loaded.tokenizer, tokenizer):
        raise ConfigError(f"train.init_from: {cfg.train.init_from} was trained on another "
                          "tokenizer or vocabulary than this run's data, so its embedding rows "
                          "would stand for other tokens; upcycle a dense run of the same data "
                          "config (data.*, its seed included).")
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded.model, WEIGHTS)))


def upcycled_state(state, graphdef, sharding, dense: dict | None):
    """The train state `state` (nnx.state((model, optimizer)) of a fresh MoE model) with the
    `dense_weights` written in, laid out as `sharding`; `state` itself when `dense` is None.

    Raises:
      ValueError: the two models' weights do not correspond (see `_copy`).
    """
    if dense is None:
        return state
    import jax
    import numpy as np
    from flax import nnx

    from glam.model import WEIGHTS

    model, optimizer = nnx.merge(graphdef, state)
    weights = nnx.state(model, WEIGHTS)
    fresh = jax.tree.map(np.asarray, nnx.to_pure_dict(weights))
    nnx.replace_by_pure_dict(weights, _copy(fresh, dense, ""))
    nnx.update(model, weights)
    return jax.device_put(nnx.state((model, optimizer)), sharding)
