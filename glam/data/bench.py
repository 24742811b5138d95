"""The data part of `glam-bench`: preparation throughput and memory, and the input pipeline's
cost per training step, on the Python docstrings corpus (`data=pydocs`, no download).

- prepare: the tokenize stage (tokenizer given, so no training) over 32 copies of the docstring
  corpus with 1 and 2 local Dask workers: documents/s and tokens/s, engine start included;
- memory: peak resident memory of the largest process of `glam-data prepare` (driver or
  worker) on 1x and 8x the corpus, each in a fresh child process (the stage streams: flat);
- pipeline: seconds to produce one global batch of the whole-step bench shape from grain
  (packing, mixing, segment ids, host-to-device) against that step's time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from glam.config import (BuiltinText, DataConfig, QualityRole, Selection, SourceConfig,
                         TokenizerConfig)
from glam.data import pydocs
from glam.data.prepare import prepare

COPIES = 32  # of the docstring corpus, for the throughput figures (about 17M tokens)

_CHILD = ("import json, sys; from glam.data.bench import _text_config, prepare; "
          "s = json.loads(sys.argv[1]); "
          "prepare(_text_config(s['paths'], s['out'], s['tokenizer'], s['workers'], "
          "s['filtered']), progress=False)")


def _corpus(root: Path, copies: int) -> list[str]:
    """`copies` copies of the docstring corpus's JSONL files under `root`."""
    files = pydocs.export("docstrings", root / "raw")
    out = []
    for c in range(copies):
        for f in files:
            target = root / f"x{copies}" / f"{c:02d}-{Path(f).name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            out.append(str(target))
    return out


def _text_config(paths: list[str], out: Path | str, tokenizer: str | None, workers: int,
                 filtered: bool = False) -> DataConfig:
    """The docstring copies as one source; `filtered`: as web text under GLaM's quality filter
    (Pareto, alpha 9), with the library reference topics as the curated source."""
    d = DataConfig(kind="text", sources=[SourceConfig(name="docstrings", paths=paths)],
                   prepared_dir=str(out),
                   tokenizer=TokenizerConfig(path=tokenizer, vocab_size=4096,
                                             sample_chars=1_000_000))
    if filtered:
        d.sources[0].quality = QualityRole.web
        d.sources.append(SourceConfig(name="reference", builtin=BuiltinText.reference,
                                      quality=QualityRole.curated, val_share=0.1))
        d.quality.selection = Selection.pareto
    d.engine.workers = workers
    return d


def _peak_rss_gib(paths: list[str], out: Path, tokenizer: str, workers: int,
                  filtered: bool = False) -> float:
    """Largest resident set of any process of one prepare run (a child; the Dask workers are
    its descendants, reaped before it exits)."""
    spec = json.dumps({"paths": paths, "out": str(out), "tokenizer": tokenizer,
                       "workers": workers, "filtered": filtered})
    code = ("import resource, subprocess, sys; "
            "subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, _CHILD, spec], capture_output=True,
                          text=True, check=True, timeout=1200)
    return int(done.stdout.strip().splitlines()[-1]) / 2**20


def data_bench(step_seconds: float, batch_size: int, seq_len: int) -> dict:
    """Every data figure; `step_seconds` is the dense bench step at `batch_size` x `seq_len`."""
    import jax

    from glam.data.text import TextCorpus

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="glam-data-bench-") as tmp:
        root = Path(tmp)
        one, eight, many = _corpus(root, 1), _corpus(root, 8), _corpus(root, COPIES)
        base = _text_config(one, root / "base", None, 2)
        manifest = prepare(base, progress=False)  # trains the tokenizer used below
        tokenizer = str(root / "base" / manifest["tokenizer"]["file"])
        per_copy = manifest["sources"]["docstrings"]["splits"]
        docs = sum(s["documents"] for s in per_copy.values())
        tokens = sum(s["tokens"] for s in per_copy.values())
        results["corpus"] = {"documents": docs, "tokens": tokens,
                             "mb": sum(Path(f).stat().st_size for f in one) / 1e6}
        results["prepare"] = []
        for workers in (1, 2):
            d = _text_config(many, root / f"w{workers}", tokenizer, workers)
            start = time.perf_counter()
            prepare(d, progress=False)
            seconds = time.perf_counter() - start
            results["prepare"].append({"workers": workers, "seconds": seconds,
                                       "docs_per_s": COPIES * docs / seconds,
                                       "tokens_per_s": COPIES * tokens / seconds})
        results["memory"] = [
            {"copies": n, "peak_rss_gib": _peak_rss_gib(paths, root / f"rss{n}", tokenizer, 2)}
            for n, paths in ((1, one), (8, eight))]

        # The quality stage: the docstrings as web text, scored and Pareto-sampled.
        results["quality"] = []
        for workers in (1, 2):
            d = _text_config(many, root / f"q{workers}", tokenizer, workers, filtered=True)
            start = time.perf_counter()
            manifest = prepare(d, progress=False)
            seconds = time.perf_counter() - start - manifest["quality"]["train_seconds"]
            q = manifest["sources"]["docstrings"]["quality"]
            results["quality"].append({"workers": workers, "seconds": seconds,
                                       "docs_per_s": (q["kept"] + q["dropped"]) / seconds,
                                       "kept_fraction": q["kept_fraction"],
                                       "train_seconds": manifest["quality"]["train_seconds"],
                                       "roc_auc": manifest["quality"]["metrics"]["roc_auc"]})
        results["quality_memory"] = [
            {"copies": n, "peak_rss_gib": _peak_rss_gib(paths, root / f"qrss{n}", tokenizer, 2,
                                                        filtered=True)}
            for n, paths in ((1, one), (8, eight))]

        # The input pipeline at the step bench shape (vocabulary aside: ids are ids).
        corpus = TextCorpus(base, seq_len + 1, batch_size)
        it = iter(corpus.train_dataset(batch_size, seed=0))
        for _ in range(20):
            next(it)
        times = []
        for _ in range(200):
            start = time.perf_counter()
            batch = next(it)
            jax.block_until_ready(jax.device_put(batch["tokens"]))
            jax.block_until_ready(jax.device_put(batch["tokens_segment_ids"]))
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        results["pipeline"] = {"seconds": seconds, "step_seconds": step_seconds,
                               "share": seconds / step_seconds, "batch": [batch_size, seq_len + 1]}
    return results


def render(r: dict) -> list[str]:
    c = r["corpus"]
    one, two = r["prepare"]
    lines = ["", f"Data: `glam-data prepare` (Dask, local worker processes) tokenizing {COPIES} "
                 f"copies of "
                 f"the docstring corpus ({c['documents']:,} documents, {c['tokens']:,} tokens, "
                 f"{c['mb']:.1f} MB each), tokenizer given, engine start included:", "",
             "| workers | s | documents/s | tokens/s | vs 1 worker |", "|---|---|---|---|---|"]
    for row in r["prepare"]:
        lines.append(f"| {row['workers']} | {row['seconds']:.1f} | {row['docs_per_s']:,.0f} | "
                     f"{row['tokens_per_s']:,.0f} | {one['seconds'] / row['seconds']:.2f}x |")
    m1, m8 = r["memory"]
    q1, q8 = r["quality_memory"]
    p = r["pipeline"]
    lines += ["", f"Peak resident memory of the largest prepare process: {m1['peak_rss_gib']:.2f} "
                  f"GiB on 1x the corpus, {m8['peak_rss_gib']:.2f} GiB on 8x "
                  f"({m8['peak_rss_gib'] / m1['peak_rss_gib']:.2f}x: streamed).", "",
              f"Quality filter (the docstrings as web text, the reference topics as curated; "
              f"Pareto alpha 9): classifier trained in {r['quality'][0]['train_seconds']:.1f} s "
              f"(held-out ROC AUC {r['quality'][0]['roc_auc']:.3f}); then scored, sampled and "
              f"tokenized (kept {r['quality'][0]['kept_fraction']:.1%}):", "",
              "| workers | s | documents/s scored | vs 1 worker |", "|---|---|---|---|",
              *[f"| {q['workers']} | {q['seconds']:.1f} | {q['docs_per_s']:,.0f} | "
                f"{r['quality'][0]['seconds'] / q['seconds']:.2f}x |" for q in r["quality"]], "",
              f"Peak resident memory with the filter: {q1['peak_rss_gib']:.2f} GiB on 1x, "
              f"{q8['peak_rss_gib']:.2f} GiB on 8x ({q8['peak_rss_gib'] / q1['peak_rss_gib']:.2f}x).",
              "",
              f"Input pipeline: one global batch {p['batch'][0]} x {p['batch'][1]} (grain: "
              f"shuffle, pack, mix, segment ids, to device) in {p['seconds'] * 1e3:.2f} ms, "
              f"{p['share']:.2%} of the dense bench step ({p['step_seconds']:.3f} s)."]
    return lines
