"""The points of a study, expanded by Hydra's own override parser and basic sweeper.

Every sweep syntax Hydra accepts (`a,b`, `range(0,3)`, `choice(...)`, `glob(...)` over a config
group, quoted lists as single values) expands here to the same points, in the same order, as
`glam-train -m` launches them: the study's `hydra.sweeper.params` first, the command line's
overrides after, a command-line key replacing the study's axis of the same key.
"""

from __future__ import annotations

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from glam.resolve import CONF_DIR, compose_config


def _parser() -> OverridesParser:
    """Hydra's override parser with a config loader, which `glob` over a group needs."""
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (a study's callback)
        loader = GlobalHydra.instance().config_loader()
    else:
        loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    return OverridesParser.create(config_loader=loader)


def expand(overrides: list[str]) -> list[list[str]]:
    """Every point (a list of `key=value` overrides) that `overrides` select: the composed
    config's `hydra.sweeper.params` and every sweep override expanded, as Hydra's BasicSweeper
    does; a single point when nothing is swept.

    Raises:
      hydra.errors.OverrideParseException: an override Hydra cannot parse.
      hydra.errors.HydraException: a sweep the basic sweeper cannot expand.

    A search sweeper's `interval(a, b)` expands to its ends a and b: the points then bound
    those the search will sample (`_ends`).
    """
    parser = _parser()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    composed = compose_config(fixed, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (composed.hydra.sweeper.params or {}).items()]
    parsed = [_ends(o) for o in parser.parse_overrides(params + overrides)]
    (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(parsed), None)
    return batch


def _ends(override) -> str:
    """An interval sweep (`interval(a,b)`, which a search sweeper such as Optuna samples) as
    its two ends, so the points checked before launch bound those it will try; any other
    override as it is."""
    if not override.is_interval_sweep():
        return override.input_line
    value = override.value()
    return f"{override.get_key_element()}={value.start!r},{value.end!r}"
