"""What counts as "the same run": every config field classified once.

Each field has one role:

- `STATE`: fixes the trained weights (model, data, optimisation, steps, batch, seed). A
  checkpoint resumes only under the same values (`checkpoint_identity`).
- `RESULT`: changes the reported results but not the weights (evaluation settings, stability and
  fault settings, the placement that chose the expert width). With `STATE`, the identity of a
  study point (`config_hash`): a finished point with the same hash is skipped.
- `LAYOUT`: where and how it runs (device mesh, processes, compiled evaluation batch, backend):
  the same point on any layout.
- `RECORD`: how it is logged, named, checkpointed or shown.

The resolved dispatch is a model field, so a point finished with capacity-based `gather` (CPU)
is not the point a GPU would run with `dropless`. `tests/test_structure.py` fails when a config
field has no role.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum

from glam.config import Config, leaf_fields
from glam.resolve import Derived, ResolvedConfig, to_container


class Role(StrEnum):
    STATE = "state"
    RESULT = "result"
    LAYOUT = "layout"
    RECORD = "record"


# Longest matching prefix wins.
ROLES: dict[str, Role] = {
    "model": Role.STATE,
    "data": Role.STATE,
    "optimizer": Role.STATE,
    "schedule": Role.STATE,
    "train.steps": Role.STATE,
    "train.batch_size": Role.STATE,
    "train.seed": Role.STATE,
    "train.eval_batches": Role.RESULT,
    "train.log_every": Role.RECORD,
    "train.progress": Role.RECORD,
    "train.resume": Role.RECORD,
    "checkpoint": Role.RECORD,
    "stability": Role.RESULT,
    "faults": Role.RESULT,
    "eval": Role.RESULT,
    "eval.batch_size": Role.LAYOUT,
    "mesh": Role.LAYOUT,
    "distributed": Role.LAYOUT,
    "plan.placement": Role.RESULT,
    "plan.tolerance": Role.RECORD,
    "study": Role.RECORD,
    "logger": Role.RECORD,
    "derived.backend": Role.LAYOUT,
    "derived.drops_tokens": Role.STATE,
    "derived.filled": Role.RECORD,
}


def role(path: str) -> Role:
    """The role of the dotted field `path` (its longest classified prefix).

    Raises:
      KeyError: the field is not classified.
    """
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in ROLES:
            return ROLES[prefix]
    raise KeyError(f"config field {path!r} has no role in glam.identity.ROLES")


def all_fields() -> list[str]:
    """Every leaf field of a resolved config, as dotted paths."""
    return leaf_fields(Config) + [f"derived.{name}" for name in Derived.__dataclass_fields__]


def select(cfg: ResolvedConfig, roles: set[Role]) -> dict:
    """The nested dict of `cfg`'s fields whose role is in `roles`."""

    def keep(tree: dict, prefix: str) -> dict:
        out = {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and any(p.startswith(f"{path}.") for p in ROLES):
                sub = keep(value, f"{path}.")
                if sub:
                    out[key] = sub
            elif role(path) in roles:
                out[key] = value
        return out

    return keep(to_container(cfg), "")


def checkpoint_identity(cfg: ResolvedConfig, data_fingerprint: str) -> dict:
    """What a checkpoint must share with the config that resumes it: the STATE fields and the
    fingerprint of the data they produced."""
    return {**select(cfg, {Role.STATE}), "data_fingerprint": data_fingerprint}


def config_hash(cfg: ResolvedConfig) -> str:
    """16 hex digits identifying a study point: its STATE and RESULT fields. Code changes are not
    in it: after a fix that changes results, run the study into a new experiment
    (logger.experiment) or delete its runs."""
    core = json.dumps(select(cfg, {Role.STATE, Role.RESULT}), sort_keys=True, default=str)
    return hashlib.sha256(core.encode()).hexdigest()[:16]
