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


# Every leaf field by name, section by section; a new field fails tests/test_structure.py until
# it is added here with the role it really has.
_TABLE: dict[Role, dict[str, str]] = {
    Role.STATE: {
        "model": "name vocab_size seq_len d_model n_layers n_heads d_head attn_width d_ff "
                 "ffn_kind n_experts expert_d_ff top_k granularity shared_experts expert_kind "
                 "moe_every moe_offset tie_embeddings rel_pos_buckets rel_pos_max_distance "
                 "dtype output_z_loss_weight",
        "model.router": "capacity_factor capacity_multiple group_size second_expert_policy "
                        "gate_norm jitter aux_loss_weight z_loss_weight dispatch balance "
                        "bias_rate",
        "data": "kind n_entities n_attributes templates_per_attribute filler_share qa_share "
                "qa_entity_fraction popularity train_tokens val_tokens seed sources malformed "
                "segment_ids",
        "data.tokenizer": "path model_type vocab_size byte_fallback character_coverage "
                          "sample_chars",
        "data.quality": "selection alpha threshold n_features ngram_max train_docs "
                        "holdout_share regularization samples",
        "data.world_sources": "wiki_documents books_documents conversations_documents "
                              "web_documents wrong_facts "
                              "word_salad boilerplate truncated near_duplicates",
        "optimizer": "name b1 b2 weight_decay grad_clip_norm decay_rate beta2_cap "
                     "update_clipping factored min_dim_size_to_factor "
                     "multiply_by_parameter_scale",
        "schedule": "name learning_rate warmup_steps constant_steps decay_fraction "
                    "end_lr_fraction",
        "train": "steps batch_size seed init_from",
        "derived": "drops_tokens",
    },
    Role.RESULT: {
        "train": "eval_batches",
        "stability": "max_consecutive_skips spike_factor spike_window max_rollbacks",
        "faults": "nonfinite_steps spike_steps spike_scale repeat_after_rollback",
        "eval": "every shots builtin tasks max_examples max_answer_tokens length_normalize seed "
                "knowledge_facts",
        "plan": "placement",
    },
    Role.LAYOUT: {
        "eval": "batch_size",
        "mesh": "data expert model fsdp",
        "distributed": "init coordinator_address num_processes process_id local_device_ids",
        "derived": "backend",
        # a simulated kill changes no result: the same point run again without it resumes
        "faults": "crash_at_step crash_jobs",
    },
    Role.RECORD: {
        # token_multiple and flops_budget are folded into train.steps; a cached program is
        # the same executable
        "train": "log_every progress resume token_multiple flops_budget compilation_cache_dir",
        "checkpoint": "every keep async_save",
        "plan": "tolerance",
        "study": "name match_flops",
        "data": "prepared_dir",
        "data.engine": "address workers",
        "data.quality": "good_label",  # what is reported, not what is kept
        "logger": "tracking_uri experiment run_name export register_model flush_every "
                  "outage_timeout_s",
        "derived": "filled",
    },
}
ROLES: dict[str, Role] = {f"{section}.{name}": r for r, sections in _TABLE.items()
                          for section, names in sections.items() for name in names.split()}

# Written into every checkpoint record; a record without it (or with another) predates the
# current run identity and is refused with that reason rather than with a field diff.
IDENTITY_VERSION = 3  # 3: the MoE design axes (granularity, shared experts, balance, init_from)


def role(path: str) -> Role:
    """The role of the dotted leaf field `path`.

    Raises:
      KeyError: the field is not classified.
    """
    if path not in ROLES:
        raise KeyError(f"config field {path!r} has no role in glam.identity.ROLES")
    return ROLES[path]


def all_fields() -> list[str]:
    """Every leaf field of a resolved config, as dotted paths."""
    return leaf_fields(Config) + [f"derived.{name}" for name in Derived.__dataclass_fields__]


def select(cfg: ResolvedConfig, roles: set[Role]) -> dict:
    """The nested dict of `cfg`'s fields whose role is in `roles`.

    Raises:
      KeyError: a field of `cfg` is not classified.
    """

    def keep(tree: dict, prefix: str) -> dict:
        out = {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and path not in ROLES:
                sub = keep(value, f"{path}.")
                if sub:
                    out[key] = sub
            elif role(path) in roles:
                out[key] = value
        return out

    return keep(to_container(cfg), "")


def checkpoint_identity(cfg: ResolvedConfig, data_fingerprint: str) -> dict:
    """What a checkpoint must share with the config that resumes it: the STATE fields, the
    fingerprint of the data they produced, and the identity's version."""
    return {**select(cfg, {Role.STATE}), "data_fingerprint": data_fingerprint,
            "identity_version": IDENTITY_VERSION}


def config_hash(cfg: ResolvedConfig) -> str:
    """16 hex digits identifying a study point: its STATE and RESULT fields. Code changes are not
    in it: after a fix that changes results, run the study into a new experiment
    (logger.experiment) or delete its runs."""
    core = json.dumps(select(cfg, {Role.STATE, Role.RESULT}), sort_keys=True, default=str)
    return hashlib.sha256(core.encode()).hexdigest()[:16]
