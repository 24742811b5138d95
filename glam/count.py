"""`glam-count`: analytic parameter and FLOP counts of a model config, as one JSON object.

Takes the same Hydra overrides as glam-train and allocates nothing, so paper-size presets are
counted in a blink:  glam-count model=paper/glam_64b_64e
"""

from __future__ import annotations

import json
import sys

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from glam import accounting
from glam.config import CONF_DIR, register_configs, to_config


def load(overrides: list[str]):
    """Compose `conf/config.yaml` with `overrides` and validate it, as glam-train would."""
    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (the sweep callback)
        return to_config(compose(config_name="config", overrides=overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


def main(argv: list[str] | None = None) -> None:
    cfg = load(sys.argv[1:] if argv is None else argv)
    m = cfg.model
    out = {"model": m.name, "family": m.family, "n_experts": m.n_experts, "top_k": m.top_k,
           **accounting.count(m).as_dict()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
