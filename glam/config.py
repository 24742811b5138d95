"""Typed configuration: the schema Hydra composes into, and the checks it cannot express.

Hydra merges the YAML tree in `conf/` into these dataclasses, so an unknown key or a wrong type
fails at composition with the offending key named. `to_config` then runs the semantic checks
(positive sizes, `top_k <= n_experts`, consistent attention width, ...) and returns plain
dataclasses. All of this happens before any JAX work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

FFN_KINDS = ("geglu", "gelu")
DTYPES = ("float32", "bfloat16")
SECOND_EXPERT_POLICIES = ("all", "random", "sampling")
GATE_NORMS = ("before", "after")
DISPATCHES = ("gather", "einsum")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class RouterConfig:
    """How tokens are routed to experts (GShard top-k gating); see `glam.model.routing`."""

    capacity_factor: float = 1.25
    capacity_multiple: int = 4
    group_size: Optional[int] = None
    second_expert_policy: str = "all"
    gate_norm: str = "before"
    jitter: float = 0.0
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    dispatch: str = "gather"


@dataclass
class ModelConfig:
    """Shape of a GLaM decoder. `n_experts = 0` is the dense model."""

    name: str = "model"
    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_head: Optional[int] = None
    attn_width: Optional[int] = None
    d_ff: int = 256
    ffn_kind: str = "geglu"
    n_experts: int = 0
    expert_d_ff: Optional[int] = None
    top_k: int = 2
    moe_every: int = 2
    moe_offset: int = 0
    tie_embeddings: bool = True
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 128
    dtype: str = "float32"
    router: RouterConfig = field(default_factory=RouterConfig)

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def attention_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def expert_hidden(self) -> int:
        return self.expert_d_ff if self.expert_d_ff is not None else self.d_ff

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer % self.moe_every == self.moe_offset

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

    @property
    def family(self) -> str:
        return "moe" if self.moe_layers else "dense"


@dataclass
class DataConfig:
    """The seeded synthetic corpus (`glam.data.markov`): an order-`order` Markov source."""

    kind: str = "markov"
    vocab_size: int = 256
    order: int = 2
    branching: int = 4
    concentration: float = 0.5
    train_tokens: int = 2_000_000
    val_tokens: int = 65_536
    seed: int = 1234


@dataclass
class OptimizerConfig:
    """`adamw`, or `adafactor` with GLaM's settings (beta1 0, decay 1 - t^-0.8 capped at
    `beta2_cap`, update clipping, factored second moments). Peak rate: `schedule.learning_rate`."""

    name: str = "adamw"
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.01
    grad_clip_norm: Optional[float] = 1.0
    decay_rate: float = 0.8
    beta2_cap: float = 0.99
    update_clipping: Optional[float] = 1.0
    factored: bool = True
    min_dim_size_to_factor: int = 128
    multiply_by_parameter_scale: bool = True


@dataclass
class ScheduleConfig:
    """Learning rate over steps. `glam`: constant for `constant_steps`, then inverse square root;
    `cosine`: linear warmup then cosine decay to end_lr_fraction; `wsd`: warmup, stable, then
    linear decay over the last `decay_fraction` of training."""

    name: str = "cosine"
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    constant_steps: int = 10_000
    decay_fraction: float = 0.2
    end_lr_fraction: float = 0.1


@dataclass
class TrainConfig:
    """`resume`: `auto` continues from the newest checkpoint in the run directory (if any);
    `never` refuses to start over a run directory that already holds checkpoints."""

    steps: int = 300
    batch_size: int = 16
    seed: int = 0
    log_every: int = 10
    eval_batches: int = 8
    progress: bool = True
    resume: str = "auto"


@dataclass
class CheckpointConfig:
    """Orbax checkpoints under `<run dir>/checkpoints`, every `every` steps (0: none)."""

    every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclass
class StabilityConfig:
    """GLaM's practice: skip non-finite updates; after `max_consecutive_skips` skipped steps in a
    row, or a loss above `spike_factor` x its mean over the last `spike_window` steps, roll back to
    the last checkpoint and continue on a new data order; give up after `max_rollbacks`."""

    max_consecutive_skips: int = 5
    spike_factor: float = 3.0
    spike_window: int = 50
    max_rollbacks: int = 3


@dataclass
class FaultConfig:
    """Fault injection for testing the stability paths; all off by default. A non-finite step
    multiplies the loss by NaN, a spike step by `spike_scale`; `crash_at_step` raises as a killed
    job would. Faults fire on the first data order only unless `repeat_after_rollback`."""

    nonfinite_steps: list[int] = field(default_factory=list)
    spike_steps: list[int] = field(default_factory=list)
    spike_scale: float = 100.0
    crash_at_step: Optional[int] = None
    repeat_after_rollback: bool = False


@dataclass
class LoggerConfig:
    """MLflow tracking. `tracking_uri` defaults to MLFLOW_TRACKING_URI, else ./mlflow.db."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "glam"
    run_name: Optional[str] = None
    flush_every: int = 50


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can extend it (`defaults: [base_config, ...]`)."""
    ConfigStore.instance().store(name="base_config", node=Config)


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def _one_of(value: str, choices: tuple[str, ...], field_name: str) -> None:
    _check(value in choices, field_name, f"got {value!r}; choose one of {', '.join(choices)}.")


def _positive(obj, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            _check(value > 0, f"{prefix}.{name}", f"must be positive, got {value}.")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    _positive(m, prefix, ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_head",
                          "attn_width", "d_ff", "expert_d_ff", "top_k", "moe_every",
                          "rel_pos_buckets", "rel_pos_max_distance"))
    _check(m.n_experts >= 0, f"{prefix}.n_experts", f"must be >= 0 (0 = dense), got {m.n_experts}.")
    _one_of(m.ffn_kind, FFN_KINDS, f"{prefix}.ffn_kind")
    _one_of(m.dtype, DTYPES, f"{prefix}.dtype")
    if m.d_head is None:
        _check(m.d_model % m.n_heads == 0, f"{prefix}.d_head",
               f"not set and d_model={m.d_model} is not divisible by n_heads={m.n_heads}; "
               "set model.d_head explicitly.")
    if m.attn_width is not None:
        _check(m.attn_width == m.attention_width, f"{prefix}.attn_width",
               f"{m.attn_width} != n_heads * d_head = {m.n_heads} * {m.head_dim} = "
               f"{m.attention_width}; fix n_heads, d_head or attn_width.")
    if m.n_experts > 0:
        _check(m.top_k <= m.n_experts, f"{prefix}.top_k",
               f"top_k={m.top_k} > n_experts={m.n_experts}; an MoE layer cannot pick more "
               "experts than it has (for E=1 set model.top_k=1).")
        _check(0 <= m.moe_offset < m.moe_every, f"{prefix}.moe_offset",
               f"must be in [0, moe_every={m.moe_every}), got {m.moe_offset}.")
    _check(m.rel_pos_max_distance > m.rel_pos_buckets // 2, f"{prefix}.rel_pos_max_distance",
           f"must exceed rel_pos_buckets // 2 = {m.rel_pos_buckets // 2}.")
    r, rp = m.router, f"{prefix}.router"
    _check(r.capacity_factor > 0, f"{rp}.capacity_factor", f"must be positive, got {r.capacity_factor}.")
    _positive(r, rp, ("capacity_multiple", "group_size"))
    _one_of(r.second_expert_policy, SECOND_EXPERT_POLICIES, f"{rp}.second_expert_policy")
    _one_of(r.gate_norm, GATE_NORMS, f"{rp}.gate_norm")
    _one_of(r.dispatch, DISPATCHES, f"{rp}.dispatch")
    for name in ("jitter", "aux_loss_weight", "z_loss_weight"):
        _check(getattr(r, name) >= 0, f"{rp}.{name}", f"must be >= 0, got {getattr(r, name)}.")


def validate(cfg: Config) -> None:
    """Semantic checks across the whole config; raises ConfigError naming the field."""
    validate_model(cfg.model)
    d, t, o = cfg.data, cfg.train, cfg.optimizer
    _one_of(d.kind, ("markov",), "data.kind")
    _positive(d, "data", ("vocab_size", "order", "branching", "train_tokens", "val_tokens"))
    _check(d.vocab_size <= cfg.model.vocab_size, "data.vocab_size",
           f"the corpus has {d.vocab_size} token ids but model.vocab_size={cfg.model.vocab_size}; "
           "raise model.vocab_size or lower data.vocab_size.")
    _check(d.branching <= d.vocab_size, "data.branching", "must be <= data.vocab_size.")
    _positive(t, "train", ("steps", "batch_size", "log_every", "eval_batches"))
    _one_of(t.resume, ("auto", "never"), "train.resume")
    c, st = cfg.checkpoint, cfg.stability
    _check(c.every >= 0, "checkpoint.every", "must be >= 0 (0 disables checkpoints).")
    _positive(c, "checkpoint", ("keep",))
    _positive(st, "stability", ("max_consecutive_skips", "spike_window"))
    _check(st.spike_factor > 1, "stability.spike_factor", "must be > 1.")
    _check(st.max_rollbacks >= 0, "stability.max_rollbacks", "must be >= 0.")
    window = cfg.model.seq_len + 1
    _check(d.train_tokens >= t.batch_size * window, "data.train_tokens",
           f"must hold at least one batch ({t.batch_size} x {window} tokens).")
    _check(d.val_tokens >= t.batch_size * window, "data.val_tokens",
           f"must hold at least one batch ({t.batch_size} x {window} tokens).")
    group = cfg.model.router.group_size
    if cfg.model.moe_layers and group is not None:
        tokens = t.batch_size * cfg.model.seq_len
        _check(tokens % group == 0, "model.router.group_size",
               f"{group} does not divide the {tokens} tokens of a batch "
               f"(train.batch_size x model.seq_len); pick a divisor of {tokens}.")
    _one_of(o.name, ("adamw", "adafactor"), "optimizer.name")
    _check(0 < o.beta2_cap <= 1, "optimizer.beta2_cap", "must be in (0, 1].")
    _positive(o, "optimizer", ("grad_clip_norm", "update_clipping", "min_dim_size_to_factor"))
    s = cfg.schedule
    _one_of(s.name, ("glam", "cosine", "wsd"), "schedule.name")
    _check(s.learning_rate > 0, "schedule.learning_rate", "must be positive.")
    for name in ("warmup_steps", "constant_steps"):
        _check(getattr(s, name) >= 0, f"schedule.{name}", "must be >= 0.")
    _check(0 < s.decay_fraction <= 1, "schedule.decay_fraction", "must be in (0, 1].")
    _check(0 <= s.end_lr_fraction <= 1, "schedule.end_lr_fraction", "must be in [0, 1].")
    _positive(cfg.logger, "logger", ("flush_every",))


def to_config(cfg: DictConfig | Config) -> Config:
    """Resolve a composed DictConfig into a validated `Config`."""
    if isinstance(cfg, DictConfig):
        schema = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        cfg = OmegaConf.to_object(schema)
    validate(cfg)
    return cfg


def model_config(**overrides) -> ModelConfig:
    """A validated ModelConfig from keyword overrides (router fields as a dict under `router`)."""
    router = RouterConfig(**overrides.pop("router", {}))
    m = ModelConfig(router=router, **overrides)
    validate_model(m)
    return m
