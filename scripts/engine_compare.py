"""Ray Data vs Dask for `glam-data prepare`'s tokenize stage, on the same work: the same
per-file function (`glam.data.work.tokenize_file`) over 32 copies of the docstring corpus,
with 1 and 2 local workers, engine start-up timed apart.

    pip install "ray[data]"            # not a glam dependency: glam runs on Dask
    python scripts/engine_compare.py   # prints a Markdown table (docs/benchmarks.md keeps it)
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from glam.config import Malformed
from glam.data.bench import COPIES, _corpus, _text_config
from glam.data.engine import Engine
from glam.data.prepare import prepare
from glam.data.work import tokenize_file


def jobs(paths: list[str], out: Path, model: str) -> list[tuple]:
    source = _text_config(paths, out, None, 1).sources[0]
    out.mkdir(parents=True, exist_ok=True)
    return [(p, source, Malformed.stop, 1234, model, str(out / f"{i:05d}"), {"source": "d"})
            for i, p in enumerate(paths)]


def with_dask(work: list[tuple], workers: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    with Engine(None, workers) as engine:
        ready = time.perf_counter()
        docs = sum(sum(s["documents"] for s in r["splits"].values())
                   for r in engine.map(tokenize_file, work))
    return ready - start, time.perf_counter() - ready, docs


def with_ray(work: list[tuple], workers: int) -> tuple[float, float, int]:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ready = time.perf_counter()
    rows = ray.data.from_items([{"job": i} for i in range(len(work))],
                               override_num_blocks=len(work))
    counted = rows.map(lambda row: {"docs": sum(
        s["documents"] for s in tokenize_file(*work[row["job"]])["splits"].values())},
        num_cpus=1).take_all()
    seconds = time.perf_counter() - ready
    ray.shutdown()
    return ready - start, seconds, sum(r["docs"] for r in counted)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="glam-engines-") as tmp:
        root = Path(tmp)
        one, many = _corpus(root, 1), _corpus(root, COPIES)
        manifest = prepare(_text_config(one, root / "base", None, 2), progress=False)
        model = str(root / "base" / manifest["tokenizer"]["file"])
        rows = []
        for name, run in (("dask", with_dask), ("ray data", with_ray)):
            for workers in (1, 2):
                start_s, work_s, docs = run(jobs(many, root / f"{name}{workers}", model), workers)
                rows.append({"engine": name, "workers": workers, "start_s": start_s,
                             "work_s": work_s, "docs_per_s": docs / work_s})
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine())
    print(f"{time.strftime('%Y-%m-%d')}, {cpu}, python {sys.version.split()[0]}, "
          f"{COPIES} copies of the docstring corpus")
    print("| engine | workers | start s | tokenize s | documents/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['workers']} | {r['start_s']:.1f} | {r['work_s']:.1f} | "
              f"{r['docs_per_s']:,.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
