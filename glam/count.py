"""`glam-count`: analytic parameter and FLOP counts of a model config, as one JSON object.

Takes the same Hydra overrides as glam-train and allocates nothing (no model, no corpus), so
paper-size presets are counted in a blink:  glam-count model=paper/glam_64b_64e
"""

from __future__ import annotations

import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from glam import accounting
from glam.config import ConfigError
from glam.resolve import load


def main(argv: list[str] | None = None) -> None:
    """Print the counts of the model that `argv` (Hydra overrides) selects, as JSON."""
    try:
        cfg = load(sys.argv[1:] if argv is None else argv, backend="cpu")  # dispatch: no count
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"glam-count: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    m = cfg.model
    out = {"model": m.name, "family": m.family, "n_experts": m.n_experts, "top_k": m.top_k,
           **accounting.count(m).as_dict()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
