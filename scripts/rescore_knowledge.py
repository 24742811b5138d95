"""Measure the knowledge of a study's finished runs again, from their exported models, with the
current probe (glam.eval.knowledge), and write the `knowledge/*` columns of its run table.

For runs whose knowledge was logged by an earlier version of the probe: the final models are
exported (`<run dir>/model/`), so their final knowledge can be measured again without training.
Histories (knowledge at earlier evaluations) cannot: they stay as logged.

    python scripts/rescore_knowledge.py outputs/studies/<study> docs/results/<study>/runs.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from flax import nnx
from omegaconf import OmegaConf

from glam import accounting
from glam.config import DataConfig, EvalConfig
from glam.data import World
from glam.eval.harness import make_score
from glam.eval.knowledge import KnowledgeProbe
from glam.export import load


def _section(config: dict, name: str, cls):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), config[name]))


def rescore(run_dir: Path) -> tuple[str, dict[str, float]]:
    """(MLflow run id, knowledge metrics) of the exported final model of `run_dir`."""
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    data, e = _section(config, "data", DataConfig), _section(config, "eval", EvalConfig)
    loaded = load(run_dir)
    m = loaded.config
    counts = accounting.count(m)
    graphdef, state = nnx.split(loaded.model)
    probe = KnowledgeProbe(make_score(graphdef), World(data), loaded.tokenizer,
                           seq_len=m.seq_len, batch_size=e.batch_size,
                           total_params=counts.total_params,
                           activated_params=counts.activated_params, max_facts=e.knowledge_facts,
                           seed=e.seed)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return run_id, probe(state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_dir", type=Path, help="outputs/studies/<study>: the runs' folders")
    p.add_argument("table", type=Path, help="the study's runs.csv, updated in place")
    args = p.parse_args()
    table = pd.read_csv(args.table)
    for run_dir in sorted(d for d in args.study_dir.iterdir() if (d / "model").is_dir()):
        run_id, metrics = rescore(run_dir)
        rows = table["run_id"] == run_id
        for key, value in metrics.items():
            table.loc[rows, key] = value
        print(f"{run_dir.name}: {metrics['knowledge/bits']:.0f} bits")
    table.to_csv(args.table, index=False)


if __name__ == "__main__":
    main()
