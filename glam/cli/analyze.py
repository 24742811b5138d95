"""`glam-analyze`: runs of a study -> run table, scaling-law fits, paper-style figures, energy.

    glam-analyze --study expert_count                      # the study's newest parent run
    glam-analyze --parent <parent run id> --out figures/
    glam-analyze --experiment glam --figures compute_vs_accuracy data_efficiency
    glam-analyze --table runs.csv --out figures/           # offline, from an exported table
    glam-analyze --paper-table --hardware tpu_v4           # GLaM Table 1 from the presets
"""

from __future__ import annotations

import argparse
import os

# What the figures and the fits need (pandas, MLflow, matplotlib) is imported by
# `analysis.report` once the arguments are read: `glam-analyze --help` needs none of it.
FIGURES = ("compute_vs_accuracy", "expert_count", "knowledge_capacity", "data_efficiency",
           "routing_health", "data_quality", "design_axes")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="glam-analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--study", help="a study's name (its newest parent run)")
    src.add_argument("--parent", help="MLflow parent run id of a study")
    src.add_argument("--experiment", help="every finished run of an MLflow experiment")
    src.add_argument("--table", help="an exported run table (.csv or .parquet), offline")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI",
                                                            "sqlite:///mlflow.db"))
    p.add_argument("--out", default=None, help="output folder (default outputs/analysis/<name>)")
    p.add_argument("--figures", nargs="*", default=list(FIGURES), choices=FIGURES)
    p.add_argument("--shots", type=int, default=0, help="k-shot setting of the accuracy panels")
    p.add_argument("--export", help="also write the run table here (.csv or .parquet)")
    p.add_argument("--hardware", default="cpu",
                   help="hardware profile of the energy table, which is modelled from training "
                        "FLOPs (peak, utilisation, watts, PUE: glam.hardware), not measured")
    p.add_argument("--paper-table", action="store_true",
                   help="print GLaM Table 1 (FLOPs/token, training energy) for the paper presets")
    args = p.parse_args(argv)
    from analysis.report import report  # pandas, MLflow, matplotlib: after --help

    report(args)


if __name__ == "__main__":
    main()
