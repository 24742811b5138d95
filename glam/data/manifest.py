"""The manifest of a prepared corpus (`manifest.json`): what every source holds per split (its
shards, documents, tokens, skipped lines, quality selection), the tokenizer and the settings;
and the clean-up and warnings that follow writing it."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from glam.config import DataConfig, Selection
from glam.data import quality as quality_filter
from glam.data.shards import (FORMAT_VERSION, QUALITY_DIR, SPLITS, done_path, shard_path,
                              shard_settings, stem_of, write_atomic)

log = logging.getLogger("glam.data")

MANIFEST = "manifest.json"


def build_manifest(d: DataConfig, identities: dict[str, list[dict]], out: Path,
                   tokenizer_file: str, tokenizer, fingerprint: str, results: dict,
                   order: dict[str, int]) -> dict:
    """The manifest of the prepared folder `out` from every input file's done record (`results`:
    stem -> record); each source's shards listed in its input files' order (`order`: stem ->
    position), so the same files read from another folder give the same training order. With a
    quality selection, writes the quality samples under `out/quality/` too.

    Raises:
      OSError: the classifier's stamp (`quality/classifier.json`) cannot be read.
    """
    sources, samples = {}, []
    for source in d.sources:
        stems = sorted((k for k, r in results.items() if r["source"] == source.name),
                       key=order.__getitem__)
        splits = {split: {"documents": sum(results[k]["splits"][split]["documents"]
                                          for k in stems),
                          "tokens": sum(results[k]["splits"][split]["tokens"] for k in stems),
                          "shards": [str(shard_path(k, split).relative_to(out))
                                     for k in stems]}
                  for split in SPLITS}
        skipped: dict[str, int] = {}
        for k in stems:
            for reason, n in results[k]["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        sources[source.name] = {"files": identities[source.name], "splits": splits,
                                "skipped_lines": skipped}
        filtered = [results[k]["quality"] for k in stems if "quality" in results[k]]
        if filtered:
            sources[source.name]["quality"] = _quality_summary(filtered, d.quality.good_label)
            samples += [{"source": source.name, "decision": decision, **sample}
                        for q in filtered for decision, kept in q["samples"].items()
                        for sample in kept]
    manifest = {"format": FORMAT_VERSION, "fingerprint": fingerprint,
                "settings": shard_settings(d),
                "tokenizer": {"file": tokenizer_file, "from": d.tokenizer.path or "trained",
                              "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                              "settings": json.loads(json.dumps(asdict(d.tokenizer),
                                                                default=str))},
                "sources": sources}
    if d.quality.selection != Selection.none:
        stamp = json.loads((out / QUALITY_DIR / "classifier.json").read_text())
        samples_file = f"{QUALITY_DIR}/samples-{fingerprint}.jsonl"
        write_atomic(out / samples_file, "".join(json.dumps(x) + "\n" for x in samples).encode())
        manifest["quality"] = {"classifier": stamp["file"], "samples": samples_file,
                               **{k: stamp[k] for k in ("sha256", "train_seconds", "settings",
                                                        "metrics")}}
    return manifest


def _quality_summary(parts: list[dict], good_label: str) -> dict:
    """Kept and dropped documents of a filtered source and their score histograms; with
    labelled documents, the same per label and the filter's precision and recall for
    `good_label` (`quality.label_report`)."""
    kept, dropped = sum(q["kept"] for q in parts), sum(q["dropped"] for q in parts)
    summary = {"kept": kept, "dropped": dropped, "kept_fraction": kept / max(kept + dropped, 1),
               "histogram_bins": quality_filter.HISTOGRAM_BINS,
               "histogram_kept": np.sum([q["histogram_kept"] for q in parts], axis=0).tolist(),
               "histogram_dropped": np.sum([q["histogram_dropped"] for q in parts],
                                           axis=0).tolist()}
    labels: dict[str, dict] = {}
    for q in parts:
        for label, c in q.get("labels", {}).items():
            total = labels.setdefault(label, {"documents": 0, "kept": 0, "score_sum": 0.0,
                                              "histogram": [0] * quality_filter.HISTOGRAM_BINS})
            for key in ("documents", "kept", "score_sum"):
                total[key] += c[key]
            total["histogram"] = (np.asarray(total["histogram"]) + c["histogram"]).tolist()
    if labels:
        summary["labels"] = quality_filter.label_report(labels, good_label)
    return summary


def shards_exist(out: Path, manifest: dict) -> bool:
    """Whether every shard `manifest` lists is a file under `out`."""
    return all((out / shard).is_file() for source in manifest["sources"].values()
               for split in source["splits"].values() for shard in split["shards"])


def remove_unlisted(out: Path, manifest: dict) -> None:
    """Delete the shards, tokenizers and classifiers the new manifest does not list (earlier
    settings or inputs): only now that it replaced the manifest that listed them."""
    keep = {out / shard for source in manifest["sources"].values()
            for split in source["splits"].values() for shard in split["shards"]}
    keep |= {done_path(stem_of(path)) for path in keep}
    keep |= {out / manifest["tokenizer"]["file"]}
    keep |= {out / manifest["quality"][k] for k in ("classifier", "samples")
             if k in manifest.get("quality", {})}
    candidates = [*(out / "shards").rglob("*"), *out.glob("tokenizer-*.model"),
                  *(out / QUALITY_DIR).glob("classifier-*.npz"),
                  *(out / QUALITY_DIR).glob("samples-*.jsonl")]
    for path in candidates:
        if path.is_file() and path not in keep:
            path.unlink()


def warn_unusable(d: DataConfig, manifest: dict) -> None:
    """Say now what training would refuse later: a source of weight > 0 without training
    documents, or of val_share > 0 without validation documents (logged as warnings)."""
    for i, source in enumerate(d.sources):
        splits = manifest["sources"][source.name]["splits"]
        if source.weight > 0 and not splits["train"]["documents"]:
            log.warning("data.sources[%d] (%s): no training documents; training refuses a "
                        "source of weight > 0 without any", i, source.name)
        if source.val_share > 0 and not splits["val"]["documents"]:
            log.warning("data.sources[%d] (%s): no validation documents at val_share %g; raise "
                        "it for a val_loss/%s", i, source.name, source.val_share, source.name)
