"""A hyperparameter search that survives a failed trial: Hydra's Optuna sweeper with a failure
budget (`override /hydra/sweeper: glam_optuna`, conf/hydra/sweeper/glam_optuna.yaml; the
`search` extra).

The released sweeper (hydra-optuna-sweeper 1.2, the last for Optuna 2) ends the whole search at
the first trial that raises. `OptunaSearch` keeps its configuration, search-space syntax and
results file, and changes one thing: a failed trial is told to Optuna as FAIL (its MLflow child
run ends FAILED with its error, `glam.tracking`), logged, and the search goes on to `n_trials`
while the failed trials number at most `max_failure_rate * n_trials`. Past that, or when no
trial completes, the first error is raised: the multirun exits non-zero and the study's parent
run ends FAILED (`glam.cli.callbacks.StudyCallback`).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

from glam.config import ConfigError

log = logging.getLogger("glam.search")


def check_failure_rate(rate: float) -> None:
    """Raises ConfigError unless `rate` (`hydra.sweeper.max_failure_rate`) is in [0, 1]."""
    if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
        raise ConfigError(f"hydra.sweeper.max_failure_rate={rate!r}: the share of trials that "
                          "may fail before the search stops; give a number in [0, 1].")


class OptunaSearch(Sweeper):
    """Hydra's `OptunaSweeper` whose trials may fail within a budget (see the module).

    Args:
      max_failure_rate: float in [0, 1], failed trials allowed as a share of `n_trials`.
      **kwargs: the `OptunaSweeper` settings (sampler, direction, n_trials, n_jobs, params...).

    Raises:
      ConfigError: `max_failure_rate` outside [0, 1], or more than one direction.
    """

    def __init__(self, max_failure_rate: float = 0.0, **kwargs: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

        check_failure_rate(max_failure_rate)
        self.max_failure_rate = max_failure_rate
        self.impl = OptunaSweeperImpl(**kwargs)

    def setup(self, **kwargs: Any) -> None:
        self.impl.setup(**kwargs)

    def sweep(self, arguments: List[str]) -> None:
        import optuna
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        s = self.impl
        s._process_searchspace_config()
        space, fixed = create_params_from_overrides(s._parse_sweeper_params_config()
                                                    + list(arguments))
        if isinstance(s.sampler, functools.partial) and s.sampler.func is optuna.samplers.GridSampler:
            grid = {name: s._to_grid_sampler_choices(d) for name, d in space.items()}
            s.sampler = s.sampler(grid)
            s.n_trials = min(s.n_trials, math.prod(len(v) for v in grid.values()))
        for name in fixed:
            space.pop(name, None)
        directions = s._get_directions()
        if len(directions) != 1:
            raise ConfigError(f"hydra.sweeper.direction={directions}: a glam search has one "
                              "objective (the validation loss); give one direction.")
        study = optuna.create_study(study_name=s.study_name, storage=s.storage,
                                    sampler=s.sampler, directions=directions,
                                    load_if_exists=True)
        allowed = int(self.max_failure_rate * s.n_trials)
        failures: list[BaseException] = []
        to_go = s.n_trials
        while to_go > 0:
            trials = [study.ask() for _ in range(min(to_go, s.n_jobs))]
            returns = s.launcher.launch(s._configure_trials(trials, space, fixed),
                                        initial_job_idx=s.job_idx)
            s.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                try:
                    value = float(ret.return_value)
                    if not math.isfinite(value):  # a diverged run, or one with no val_loss
                        raise ValueError(f"the trial's objective is {value}")
                    study.tell(trial, value)
                except Exception as err:  # the job raised, or returned no finite number
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    failures.append(err)
                    log.warning("trial %d failed (%d failed of %d allowed by "
                                "hydra.sweeper.max_failure_rate=%s): %s", trial.number,
                                len(failures), allowed, self.max_failure_rate, err)
            if len(failures) > allowed:
                raise failures[0]
            to_go -= len(trials)
        if not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            raise failures[0] if failures else RuntimeError("the search ran no trial")
        best = study.best_trial
        log.info("Best parameters: %s", best.params)
        log.info("Best value: %s", best.value)
        log.info("%d of %d trials failed", len(failures), s.n_trials)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params,
                                         "best_value": best.value,
                                         "failed_trials": len(failures)}),
                       f"{s.config.hydra.sweep.dir}/optimization_results.yaml")
