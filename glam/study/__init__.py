"""Studies: Hydra multiruns whose points are compared at fixed activated FLOPs, in MLflow.

A study is one YAML file in `sweeps/study/` (selected with `+study=<name>`): it names the study
(`study.name`, also its MLflow experiment and its folder `outputs/studies/<name>/`), may demand
FLOP-matched points (`study.match_flops`), and lists its axes under `hydra.sweeper.params`.

- `points`: the points a study's overrides select, expanded by Hydra's own override parser and
  sweeper, exactly as `glam-train -m` launches them.
- `plan`: `glam-plan`, the table of points (sizes, FLOPs, time estimates) and the FLOP check.
- `runs`: the MLflow side: the callback that checks and opens the study's parent run before any
  job starts, each job's child-run tags, skipping finished points, and setting aside the
  checkpoints of a point whose config changed.
"""
