"""Hydra finds sweepers only in the `hydra_plugins` package: glam's Optuna search
(`glam.study.search`) under the name Hydra accepts (`hydra/sweeper=glam_optuna`)."""

from glam.study.search import OptunaSearch as _OptunaSearch


class OptunaSearch(_OptunaSearch):
    __doc__ = _OptunaSearch.__doc__
