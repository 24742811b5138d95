"""The work of preparation, file by file: which input files there are (`plan`), and what a
worker does with one (draw a sample, or tokenize it into shards, keeping what the quality
selection keeps). The per-file functions take picklable arguments: they run on the engine's
workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glam.config import DataConfig, Malformed, SourceConfig
from glam.data import pydocs, world_text
from glam.data import quality as quality_filter
from glam.data.shards import SPLITS, done_path, shard_path, unit_hash, write_atomic
from glam.data.sources import ReadStats, documents, expand, file_identity
from glam.data.tokenizer import SentencePieceTokenizer, training_sentences

MAX_LABELS, OTHER_LABEL = 64, "(other labels)"  # distinct labels reported per file


@dataclass
class Plan:
    """Every input file of every source, before any work."""

    files: dict[str, list[str]]  # source name -> file URLs
    identities: dict[str, list[dict]]  # source name -> file identities


def plan(d: DataConfig) -> Plan:
    """Expand every source's paths (export the built-in texts first).

    Raises:
      DataError: a missing file, an empty glob or an unsupported type, naming the field.
    """
    files, identities = {}, {}
    for i, source in enumerate(d.sources):
        raw_dir = Path(d.prepared_dir).resolve() / "raw"
        if source.builtin in world_text.KINDS:
            files[source.name] = world_text.export(str(source.builtin), raw_dir, d)
        elif source.builtin is not None:
            files[source.name] = pydocs.export(str(source.builtin), raw_dir)
        else:
            files[source.name] = expand(source, f"data.sources[{i}]")
        identities[source.name] = [file_identity(u) for u in files[source.name]]
    return Plan(files, identities)


def sample_file(url: str, source: SourceConfig, policy: Malformed, seed: int,
                keep: float) -> list[tuple[float, str]]:
    """(draw, sentence) of the training sentences of one file (`training_sentences`: lines, a
    long line cut into pieces of at most SENTENCE_CHARS characters) whose seeded draw is below
    `keep`: candidates for the tokenizer's training sample (the driver keeps the lowest draws
    up to its character budget). Drawing sentences rather than documents measures the sample in
    characters however long the documents are; each sentence's draw is fixed by its document's
    text and its place there, so a line repeated across documents (boilerplate) is drawn anew
    in each rather than all its copies at once."""
    out = []
    for _, text, _ in documents(url, source, policy, ReadStats()):
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=32,
                              key=f"{seed}:sample".encode()).digest()
        for i, sentence in enumerate(training_sentences(text)):
            draw = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8, key=key).digest()
            if (u := int.from_bytes(draw, "little") / 2.0**64) < keep:
                out.append((u, sentence))
    return out


def sample_documents(url: str, source: SourceConfig, policy: Malformed, seed: int, salt: str,
                     keep: float, max_chars: int | None = 20_000) -> list[tuple[float, str]]:
    """(hash, text cut to `max_chars`) of the documents of one file whose seeded hash (salted
    with `salt`) is below `keep`: candidates for a sample (the driver keeps the lowest hashes up
    to its budget)."""
    out = []
    for _, text, _ in documents(url, source, policy, ReadStats()):
        u = unit_hash(seed, salt, text)
        if u < keep:
            out.append((u, text[:max_chars]))
    return out


def tokenize_file(url: str, source: SourceConfig, policy: Malformed, seed: int,
                  model: str, stem: str, done: dict, quality: dict | None = None) -> dict:
    """Tokenize one input file with the SentencePiece model at `model` into
    `stem.train.array_record` and `stem.val.array_record`; write `stem.done.json` (`done` plus
    the counts) last, and return it. `quality` ({"classifier": path, "cfg": QualityConfig}):
    score every document and keep those the selection keeps (a web source)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tokenizer = SentencePieceTokenizer.load(model)
    selector = _Selector(quality, seed) if quality else None
    stats = ReadStats()
    counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    paths = {split: shard_path(stem, split) for split in SPLITS}
    for leftover in Path(stem).parent.glob(f"{Path(stem).name}.*.tmp*"):  # of a killed run
        leftover.unlink()
    tmps = {split: p.with_name(f"{p.name}.tmp{os.getpid()}") for split, p in paths.items()}
    writers = {split: ArrayRecordWriter(str(tmps[split]), "group_size:1") for split in SPLITS}
    batch: list[str] = []
    labels: list[str | None] = []

    def flush():
        if selector is not None:
            batch[:] = selector(batch, labels)
        labels.clear()
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            held_out = unit_hash(seed, f"split:{source.name}", text) < source.val_share
            split = "val" if held_out else "train"
            record = np.asarray(ids + [tokenizer.eos_id], np.int32)
            writers[split].write(record.tobytes())
            counts[split]["documents"] += 1
            counts[split]["tokens"] += len(record)
        batch.clear()

    try:
        for _, text, label in documents(url, source, policy, stats):
            batch.append(text)
            labels.append(label)
            if len(batch) == 256:
                flush()
        flush()
    except BaseException:
        for split in SPLITS:
            writers[split].close()
            tmps[split].unlink(missing_ok=True)
        raise
    for w in writers.values():
        w.close()
    for split in SPLITS:
        os.replace(tmps[split], paths[split])
    result = {**done, "stem": stem, "splits": counts, "skipped": dict(stats.skipped),
              "first_skipped": stats.first}
    if selector is not None:
        result["quality"] = selector.summary()
    write_atomic(done_path(stem), json.dumps(result, indent=1).encode())
    return result


class _Selector:
    """The quality stage of one file: scores, keep decisions, and what they were."""

    def __init__(self, quality: dict, seed: int):
        with open(quality["classifier"], "rb") as f:
            self.classifier = quality_filter.Classifier.from_bytes(f.read())
        self.cfg, self.seed = quality["cfg"], seed
        self.kept, self.dropped = [], []  # scores
        self.samples: dict[str, list] = {"kept": [], "dropped": []}  # (-hash, score, text) heaps
        self.labels: dict[str, dict] = {}  # label -> documents kept, scores

    def __call__(self, texts: list[str], labels: list[str | None]) -> list[str]:
        import heapq

        scores = self.classifier.scores(texts, self.cfg)
        uniforms = np.asarray([unit_hash(self.seed, "pareto", t) for t in texts])
        decisions = quality_filter.keep(scores, uniforms, self.cfg)
        for text, label, score, kept in zip(texts, labels, scores, decisions):
            (self.kept if kept else self.dropped).append(float(score))
            if label is not None:
                if label not in self.labels and len(self.labels) >= MAX_LABELS:
                    label = OTHER_LABEL  # a field of unique values (a URL) is not a label
                counts = self.labels.setdefault(label, {"kept": 0, "scores": []})
                counts["kept"] += int(kept)
                counts["scores"].append(float(score))
            heap = self.samples["kept" if kept else "dropped"]
            item = (-unit_hash(self.seed, "show", text), float(score), text[:2000])
            if len(heap) < self.cfg.samples:
                heapq.heappush(heap, item)
            elif self.cfg.samples:
                heapq.heappushpop(heap, item)
        return [t for t, kept in zip(texts, decisions) if kept]

    def summary(self) -> dict:
        return {"kept": len(self.kept), "dropped": len(self.dropped),
                "histogram_kept": quality_filter.histogram(self.kept),
                "histogram_dropped": quality_filter.histogram(self.dropped),
                "labels": {label: {"documents": len(c["scores"]), "kept": c["kept"],
                                   "score_sum": sum(c["scores"]),
                                   "histogram": quality_filter.histogram(c["scores"])}
                           for label, c in self.labels.items()},
                "samples": {k: [{"score": score, "text": text} for _, score, text in sorted(v)]
                            for k, v in self.samples.items()}}
