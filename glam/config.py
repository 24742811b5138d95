"""Typed configuration: the schema Hydra composes into, and the checks it cannot express.

Hydra merges the YAML tree in `conf/` into these dataclasses, so an unknown key or a wrong type
fails at composition with the offending key named. `to_config` then runs the semantic checks
(positive sizes, `top_k <= n_experts`, consistent attention width, ...) and returns plain
dataclasses. All of this happens before any JAX work.
"""

from __future__ import annotations

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
DISPATCHES = ("auto", "gather", "einsum", "dropless")


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
    dispatch: str = "auto"


@dataclass
class ModelConfig:
    """Shape of a GLaM decoder. `n_experts = 0` is the dense model."""

    name: str = "model"
    vocab_size: Optional[int] = None  # None: the data's tokenizer vocabulary
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
    """The seeded synthetic world (`glam.data.world`): people with facts, QA lines, filler."""

    kind: str = "world"
    n_entities: int = 400
    n_attributes: int = 4
    templates_per_attribute: int = 3
    filler_share: float = 0.1
    qa_share: float = 0.2
    qa_entity_fraction: float = 0.5
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

    steps: int = 600
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
class TaskFileConfig:
    """A user task in JSONL (schema in glam/eval/tasks.py); demonstrations come from
    `train_path`, or from the other examples of `path` when it is unset."""

    name: str = "task"
    kind: str = "nlg"
    path: str = ""
    train_path: Optional[str] = None


@dataclass
class EvalConfig:
    """Few-shot evaluation, every `every` steps (0: only at the end) and at the end."""

    every: int = 0
    shots: list[int] = field(default_factory=lambda: [0, 1, 3])
    builtin: bool = True
    tasks: list[TaskFileConfig] = field(default_factory=list)
    max_examples: int = 200
    max_answer_tokens: int = 4
    length_normalize: bool = False
    batch_size: int = 64
    seed: int = 0


@dataclass
class LoggerConfig:
    """MLflow tracking. `tracking_uri` defaults to MLFLOW_TRACKING_URI, else ./mlflow.db."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "glam"
    run_name: Optional[str] = None
    flush_every: int = 50


@dataclass
class MeshConfig:
    """Device mesh axis sizes (`glam.mesh`); -1 fills the remaining devices. `fsdp` also shards
    parameters and optimizer state over `data` (their embed dimension)."""

    data: int = -1
    expert: int = 1
    model: int = 1
    fsdp: bool = False


@dataclass
class DistributedConfig:
    """Multi-host JAX (`glam.distributed`). `init`: `auto` starts jax.distributed when
    `num_processes` > 1 or a multi-process launch is detected (srun, mpirun, a TPU slice that
    sets TPU_WORKER_HOSTNAMES, Hydra's submitit_local with several tasks);
    `always` starts it and lets JAX detect the rest; `never` runs one process. The fields
    default to $GLAM_COORDINATOR_ADDRESS, $GLAM_NUM_PROCESSES and $GLAM_PROCESS_ID
    (conf/config.yaml); unset ones are detected from the cluster."""

    init: str = "auto"
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[list[int]] = None


@dataclass
class PlanConfig:
    """How an MoE model is placed against its dense counterpart (`glam.plan`): `glam` keeps the
    dense FFN width for the experts; `matched` solves the expert width for equal activated
    forward FLOPs per token, within `tolerance`."""

    placement: str = "glam"
    tolerance: float = 0.02


@dataclass
class StudyConfig:
    """Set by the sweep configs (`+sweep=...`): the study's name (its MLflow parent run and
    experiment) and whether its points must share activated FLOPs (checked before launch)."""

    name: Optional[str] = None
    match_flops: bool = False


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
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


def validate_distributed(d: DistributedConfig) -> None:
    _one_of(d.init, ("auto", "always", "never"), "distributed.init")
    _positive(d, "distributed", ("num_processes",))
    if d.process_id is not None:
        n = d.num_processes
        _check(d.process_id >= 0 and (n is None or d.process_id < n), "distributed.process_id",
               f"must be in [0, num_processes) = [0, {n}), got {d.process_id}.")
    address = d.coordinator_address
    if address is not None:
        host, _, port = address.rpartition(":")
        _check(bool(host) and port.isdigit(), "distributed.coordinator_address",
               f"{address!r} is not host:port (e.g. 10.0.0.1:1234, the address of process 0).")


def validate(cfg: Config) -> None:
    """Semantic checks across the whole config; raises ConfigError naming the field.
    Fills `model.vocab_size` from the data's tokenizer when it is None."""
    d, t, o = cfg.data, cfg.train, cfg.optimizer
    _one_of(d.kind, ("world",), "data.kind")
    _positive(d, "data", ("n_entities", "n_attributes", "templates_per_attribute",
                          "train_tokens", "val_tokens"))
    from glam.data.world import ATTRIBUTES  # the catalogue bounds two fields (lazy: no cycle)

    _check(d.n_attributes <= len(ATTRIBUTES), "data.n_attributes",
           f"at most {len(ATTRIBUTES)} (the attribute catalogue), got {d.n_attributes}.")
    _check(d.templates_per_attribute <= 4, "data.templates_per_attribute", "at most 4.")
    for name in ("filler_share", "qa_share", "qa_entity_fraction"):
        _check(0 <= getattr(d, name) <= 1, f"data.{name}", "must be in [0, 1].")
    _check(d.filler_share + d.qa_share <= 1, "data.qa_share",
           "filler_share + qa_share must be <= 1.")
    from glam.data.world import World  # lazy: glam.data imports this module

    data_vocab = World(d).tokenizer.vocab_size
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data_vocab
    _check(data_vocab <= cfg.model.vocab_size, "model.vocab_size",
           f"{cfg.model.vocab_size} is smaller than the corpus vocabulary ({data_vocab} words); "
           "raise it or leave it unset (null) to take the corpus's.")
    for axis in ("data", "expert", "model"):
        size = getattr(cfg.mesh, axis)
        _check(size == -1 or size > 0, f"mesh.{axis}", f"must be positive or -1, got {size}.")
    validate_distributed(cfg.distributed)
    _one_of(cfg.plan.placement, ("glam", "matched"), "plan.placement")
    _check(0 < cfg.plan.tolerance < 1, "plan.tolerance", "must be in (0, 1).")
    from glam.plan import apply_placement  # lazy: glam.plan imports this module

    apply_placement(cfg)
    validate_model(cfg.model)
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
    e = cfg.eval
    _check(e.every >= 0, "eval.every", "must be >= 0 (0: evaluate at the end only).")
    _positive(e, "eval", ("max_examples", "max_answer_tokens", "batch_size"))
    _check(all(k >= 0 for k in e.shots), "eval.shots", f"shot counts must be >= 0, got {e.shots}.")
    _check(e.max_answer_tokens < cfg.model.seq_len, "eval.max_answer_tokens",
           f"must be below model.seq_len={cfg.model.seq_len}.")
    for i, task in enumerate(e.tasks):
        _one_of(task.kind, ("nlg", "nlu"), f"eval.tasks[{i}].kind")
        for name in ("path", "train_path"):
            path = getattr(task, name)
            if path is not None:
                _check(Path(path).is_file(), f"eval.tasks[{i}].{name}",
                       f"no file at {path!r}; give the path of a JSONL task file.")


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
