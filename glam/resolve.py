"""From composed YAML to a frozen, fully derived config: `load(overrides)` and `resolve(raw)`.

Three stages, each with its own type:

1. composition (Hydra): `conf/` plus the studies in `sweeps/` -> DictConfig. Unknown keys,
   wrong types and choices outside their Enum fail here, naming the key.
2. `raw(dcfg)` -> `Config`: the schema's objects, every section's own checks run.
3. `resolve(raw, backend)` -> `ResolvedConfig`: every derived value filled in place and
   labelled in `derived.filled` (vocabulary size from the data config without generating the
   corpus, expert width from `plan.placement`, the concrete dispatch for `backend` instead of
   `auto`, the routing group size), the cross-section checks run, and the whole object frozen.

Training, counting and planning take a ResolvedConfig. Nothing here builds a corpus or a model.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from glam.config import (Balance, Config, DataKind, Dispatch, ModelConfig, Placement, Section,
                         check, doc, freeze)
from glam.data.vocab import vocab_size
from glam.data.world import ATTRIBUTES, WORLD_TASKS
from glam import accounting
from glam.placement import expert_width


def _config_roots() -> tuple[Path, Path]:
    """`conf/` and `sweeps/`: beside the package in a checkout (editable install), inside it
    (`glam/conf`, `glam/sweeps`) in a wheel."""
    package = Path(__file__).resolve().parent
    for root in (package.parent, package):
        if (root / "conf" / "config.yaml").is_file():
            return root / "conf", root / "sweeps"
    raise FileNotFoundError(f"no conf/config.yaml beside or inside {package}; reinstall glam.")


CONF_DIR, SWEEPS_DIR = _config_roots()

# conf/config.yaml puts `sweeps/` on Hydra's search path through this resolver, so studies
# compose (`+study=<name>`) from any working directory and from an installed package.
if not OmegaConf.has_resolver("glam_sweeps_dir"):
    OmegaConf.register_new_resolver("glam_sweeps_dir", lambda: str(SWEEPS_DIR))
ConfigStore.instance().store(name="base_config", node=Config)


@dataclass(frozen=True)
class Derived:
    """Facts fixed by resolution that no single config field states."""

    backend: str = doc("cpu", "JAX platform the dispatch was chosen for: cpu, gpu or tpu")
    drops_tokens: bool = doc(False, "capacity-based dispatch: assignments beyond C are dropped")
    filled: tuple[str, ...] = doc((), "dotted paths of the fields resolution filled")


@dataclass
class ResolvedConfig(Config):
    """A `Config` whose derived values are filled, checked across sections, and frozen."""

    derived: Derived = doc(None, "what resolution fixed")


def compose_config(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """Compose `conf/config.yaml` with `overrides`; inside a running Hydra app (a study's
    callback) its own config search path is used.

    Raises:
      hydra.errors.ConfigCompositionException: unknown key, wrong type or choice (key named).
    """
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides, return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


def raw(dcfg: DictConfig) -> Config:
    """A composed DictConfig as the schema's objects, each section checked.

    Raises:
      omegaconf.ValidationError: a value of the wrong type or outside its Enum (key named).
      ConfigError: a key the schema does not have (also one added with Hydra's `+`), or a
        section check failed (field named).
    """
    unknown = _unknown_keys(dcfg, Config)
    check(not unknown, unknown[0] if unknown else "", "not a field of the config schema; "
          + "; ".join(unknown[1:] or ["check the spelling (glam/config.py lists every field)"]))
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), dcfg))
    cfg.check()
    return cfg


def _unknown_keys(node, cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of `node` (a DictConfig) that `cls` has no field for; for the first, a
    suggestion follows. Hydra's `+key=value` adds keys even to a typed config, so they are
    looked for here."""
    hints = typing.get_type_hints(cls)
    unknown = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            unknown.append(path)
            if close and len(unknown) == 1:
                unknown.append(f"did you mean {prefix}{close[0]}?")
            continue
        kind, value = hints[key], node[key]
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        if isinstance(kind, type) and issubclass(kind, Section) and isinstance(value, DictConfig):
            unknown += _unknown_keys(value, kind, f"{path}.")
        elif isinstance(item, type) and issubclass(item, Section) and value is not None:
            for i, entry in enumerate(value):
                if isinstance(entry, DictConfig):
                    unknown += _unknown_keys(entry, item, f"{path}[{i}].")
    return unknown


def resolve_dispatch(dispatch: Dispatch, backend: str) -> Dispatch:
    """`auto`: dropless grouped matmuls on GPU/TPU, capacity-based gather on CPU (where gather
    measured ~1.2x a FLOP-matched dense FFN and ragged_dot 5-60x); other values unchanged."""
    if dispatch != Dispatch.auto:
        return dispatch
    return Dispatch.dropless if backend in ("gpu", "tpu", "cuda", "rocm") else Dispatch.gather


def _default_backend() -> str:
    import jax  # only here: loading a config for counting or planning need not start JAX

    return jax.default_backend()


def _fill_shape(m: ModelConfig, placement: Placement, vocab_size: int | None,
                filled: list[str]) -> ModelConfig:
    """A copy of `m` (its fields checked already) with vocabulary size, expert width and group
    size filled, checked again with them."""
    m = dataclasses.replace(m, router=dataclasses.replace(m.router))
    if m.vocab_size is None:
        check(vocab_size is not None, "model.vocab_size", "unset and no corpus to take it from.")
        m.vocab_size = vocab_size
        filled.append("model.vocab_size")
    width = expert_width(m, placement)
    if width != m.expert_d_ff:
        m.expert_d_ff = width
        filled.append("model.expert_d_ff")
    if m.router.group_size is None:
        m.router.group_size = m.seq_len
        filled.append("model.router.group_size")
    # Settings with no effect take their defaults, so a point's identity is the model it trains
    # (a dense point of a granularity sweep is the plain dense point).
    if m.family == "dense":
        _defaults(m, "model", ("granularity", "shared_experts", "expert_kind"), filled)
        _defaults(m.router, "model.router", ("balance",), filled)
    if m.router.balance == Balance.aux:
        _defaults(m.router, "model.router", ("bias_rate",), filled)
    if m.router.balance == Balance.bias and m.router.aux_loss_weight:
        m.router.aux_loss_weight = 0.0  # balancing by bias alone: the loss is logged, not added
        filled.append("model.router.aux_loss_weight")
    m.check()
    return m


def _defaults(section: Section, prefix: str, names: tuple[str, ...], filled: list[str]) -> None:
    """Set each field of `names` in `section` to its schema default, listing those changed."""
    for name in names:
        default = type(section).__dataclass_fields__[name].default
        if getattr(section, name) != default:
            setattr(section, name, default)
            filled.append(f"{prefix}.{name}")


def _fill_dispatch(m: ModelConfig, backend: str, filled: list[str]) -> None:
    if m.router.dispatch == Dispatch.auto:
        m.router.dispatch = resolve_dispatch(m.router.dispatch, backend)
        filled.append("model.router.dispatch")


def resolve_model(m: ModelConfig, backend: str | None = None,
                  placement: Placement = Placement.glam,
                  vocab_size: int | None = None) -> tuple[ModelConfig, list[str]]:
    """`m` with its derived fields filled (a new object; `m` is left as it is) and the dotted
    paths of the filled fields. `vocab_size` fills an unset `m.vocab_size`; `backend` (None:
    `jax.default_backend()`, looked up after every check) fixes `dispatch=auto`.

    Raises:
      ConfigError: a model field is invalid, or no expert width matches (`plan.placement`).
    """
    filled: list[str] = []
    m.check()
    m = _fill_shape(m, placement, vocab_size, filled)
    _fill_dispatch(m, backend or _default_backend(), filled)
    return m, filled


def model_config(backend: str | None = None, placement: Placement = Placement.glam,
                 **fields) -> ModelConfig:
    """A resolved, frozen ModelConfig from keyword fields (router fields as a dict under
    `router`; `vocab_size` required); `backend` as in `resolve_model`. For tests, benchmarks
    and notebooks.

    Raises:
      TypeError: an unknown field. ConfigError: an invalid value (field named).
    """
    router = fields.pop("router", {})
    m = ModelConfig(**fields)
    m.router = dataclasses.replace(m.router, **router)
    m, _ = resolve_model(m, backend, placement)
    freeze(m)
    return m


def resolve(cfg: Config, backend: str | None = None, *, checked: bool = False,
            before_backend: Callable[[], object] | None = None) -> ResolvedConfig:
    """Fill every derived value of `cfg`, check across sections, freeze. `cfg` is not changed.

    Args:
      cfg: a raw config (`raw`, or a `Config` built in code). A ResolvedConfig is returned as
        it is.
      backend: the JAX platform the run will use (cpu, gpu, tpu), which fixes `dispatch=auto`;
        None: `jax.default_backend()`, looked up only once every check has passed (it starts
        JAX).
      checked: `cfg`'s sections have passed their own checks already (`raw` runs them), so
        they are not run again.
      before_backend: called once every check has passed and before the backend is looked up:
        a multi-host run joins its processes there (`glam.distributed.initialize`), since JAX
        must not start before.

    Raises:
      ConfigError: a value is invalid, alone or with another section's; the field is named.
      ValueError: `cfg` is already resolved for another backend than `backend`.
    """
    if isinstance(cfg, ResolvedConfig):
        if backend is not None and backend != cfg.derived.backend:
            raise ValueError(f"this config was resolved for backend {cfg.derived.backend!r}, "
                             f"not {backend!r}; resolve its raw config again.")
        return cfg
    if not checked:
        cfg.check()
    d, t = cfg.data, cfg.train
    filled: list[str] = []
    if d.kind == DataKind.world:
        check(d.n_attributes <= len(ATTRIBUTES), "data.n_attributes",
              f"at most {len(ATTRIBUTES)} (the attribute catalogue), got {d.n_attributes}.")
        if cfg.eval.builtin:
            for i, task in enumerate(cfg.eval.tasks):
                check(task.name not in WORLD_TASKS, f"eval.tasks[{i}].name",
                      f"{task.name!r} is a built-in task's name; rename it (or "
                      "eval.builtin=false).")
        data_vocab = vocab_size(d)
        model = _fill_shape(cfg.model, cfg.plan.placement, data_vocab, filled)
        check(data_vocab <= model.vocab_size, "model.vocab_size",
              f"{model.vocab_size} is smaller than the corpus vocabulary ({data_vocab} words); "
              "raise it or leave it unset (null) to take the corpus's.")
        window = model.seq_len + 1
        for split in ("train_tokens", "val_tokens"):
            check(getattr(d, split) >= t.batch_size * window, f"data.{split}",
                  f"must hold at least one batch ({t.batch_size} x {window} tokens).")
    else:
        data_vocab = vocab_size(d)
        model = _fill_shape(cfg.model, cfg.plan.placement, data_vocab, filled)
        check(model.vocab_size == data_vocab, "model.vocab_size",
              f"{model.vocab_size}, but the tokenizer has {data_vocab} pieces; set "
              f"model.vocab_size=null (take the tokenizer's) or {data_vocab}.")
    if model.moe_layers:
        group = model.router.group_size
        for what, rows in (("train.batch_size", t.batch_size),
                           ("eval.batch_size", cfg.eval.batch_size)):
            tokens = rows * model.seq_len
            check(tokens % group == 0, "model.router.group_size",
                  f"{group} does not divide the {tokens} tokens of a batch ({what} x "
                  f"model.seq_len); pick a divisor of {tokens}.")
    check(cfg.eval.max_answer_tokens < model.seq_len, "eval.max_answer_tokens",
          f"must be below model.seq_len={model.seq_len}.")
    spent = 0.0  # training FLOPs spent before this run: the dense run an upcycled one starts from
    if t.init_from is not None:
        from glam.upcycle import check_source, read_source

        source = read_source(t.init_from, cfg.logger.tracking_uri)
        check_source(model, source.model, t.init_from)
        if t.flops_budget is not None:
            check(source.train_flops is not None, "train.flops_budget",
                  f"{t.init_from} does not record the FLOPs its training spent (an export "
                  "older than that record); give train.steps instead of a budget.")
            spent = source.train_flops
    if backend is None:
        if before_backend is not None:
            before_backend()
        backend = _default_backend()
    _fill_dispatch(model, backend, filled)
    sections = {f.name: copy.deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(Config)}
    sections["model"] = model
    if t.token_multiple != 1:
        sections["train"].steps = max(1, round(t.steps * t.token_multiple))
        filled.append("train.steps")
    if t.flops_budget is not None:  # the budget at glam's own count of training FLOPs
        check(t.flops_budget > spent, "train.flops_budget",
              f"{t.flops_budget:.4g} FLOPs, but the dense run {t.init_from} spent {spent:.4g} "
              "already; raise the budget.")
        per_step = accounting.count(model).train_flops_per_token * t.batch_size * model.seq_len
        sections["train"].steps = max(1, round((t.flops_budget - spent) / per_step))
        filled.append("train.steps")
    derived = Derived(backend=backend,
                      drops_tokens=bool(model.moe_layers)
                      and model.router.dispatch != Dispatch.dropless,
                      filled=tuple(filled))
    resolved = ResolvedConfig(**sections, derived=derived)
    freeze(resolved)
    return resolved


def load_raw(overrides: list[str]) -> Config:
    """Compose with `overrides` and check each section (no derived values)."""
    return raw(compose_config(overrides))


def load(overrides: list[str], backend: str | None = None) -> ResolvedConfig:
    """Compose `conf/config.yaml` with Hydra `overrides` and resolve it, as glam-train does.

    Raises:
      hydra.errors.ConfigCompositionException: unknown key, wrong type or choice (key named).
      ConfigError: an invalid value (field named).
    """
    return resolve(load_raw(overrides), backend, checked=True)


def to_container(cfg: Config) -> dict:
    """Plain nested dict of `cfg` (Enums as their strings; a ResolvedConfig's `derived` too)."""
    out = OmegaConf.to_container(OmegaConf.structured(_schema_view(cfg)), enum_to_str=True)
    if isinstance(cfg, ResolvedConfig):
        out["derived"] = dataclasses.asdict(cfg.derived)
        out["derived"]["filled"] = list(cfg.derived.filled)
    return out


def _schema_view(cfg: Config) -> Config:
    """`cfg`'s sections in a plain `Config` (OmegaConf cannot type the `derived` field)."""
    return Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)})
