"""`glam-count`: analytic parameter and FLOP counts of a model config, as one JSON object.

Takes the same Hydra overrides as glam-train and allocates nothing (no model, no corpus), so
paper-size presets are counted in a blink:  glam-count model=paper/glam_64b_64e
"""

from __future__ import annotations

import argparse
import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from glam import accounting
from glam.config import ConfigError
from glam.resolve import load


def main(argv: list[str] | None = None) -> None:
    """Print the counts of the model that `argv` (Hydra overrides) selects, as JSON."""
    parser = argparse.ArgumentParser(
        prog="glam-count", description="Analytic parameter and FLOP counts of a model config "
        "(glam.accounting), as one JSON object; allocates nothing.",
        epilog="examples:  glam-count model=paper/glam_64b_64e   "
               "glam-count model=ladder_s model.n_experts=16 plan.placement=matched")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides, as for glam-train (key=value, +key=value)")
    overrides = parser.parse_args(sys.argv[1:] if argv is None else argv).overrides
    try:
        cfg = load(overrides, backend="cpu")  # dispatch: no count
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"glam-count: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    m = cfg.model
    out = {"model": m.name, "family": m.family, "n_experts": m.n_experts, "top_k": m.top_k,
           **accounting.count(m).as_dict()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
