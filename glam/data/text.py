"""Training on prepared text (`glam-data prepare`): a grain input pipeline with mixture weights.

Per source (train split): the document records (ArrayRecord, int32 ids ending in <eos>), this
process's share (every `process_count`-th document), shuffled by seed and repeated without end,
packed into `seq_len + 1` windows (concatenated, then split: a document may continue into the
next window; `tokens_segment_ids` number the documents of a window from 1). The sources' windows
are then mixed by weight (grain's deterministic mix: the share of windows, hence of tokens, of
each source follows the weights) and batched. The iterator's state goes into every checkpoint,
so a resumed run reads exactly the batches an uninterrupted one would.

Validation: each source's held-out documents, packed the same way without shuffling; the same
windows every time.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from glam.config import ConfigError, DataConfig
from glam.data.manifest import MANIFEST
from glam.data.shards import shard_settings
from glam.data.tokenizer import SentencePieceTokenizer

SOURCE_KEY = "source"  # the index of the source each window of a batch came from


def _decode(record: bytes) -> dict:
    return {"tokens": np.frombuffer(record, np.int32)}


def _packed(ds: grain.MapDataset, window: int) -> grain.IterDataset:
    return ConcatThenSplitIterDataset(ds.map(_decode).to_iter_dataset(),
                                      length_struct={"tokens": window})


def _differing(prepared, config, prefix: str = "data") -> list[str]:
    """Dotted names of the settings that differ (`data.sources.1.val_share`)."""
    if isinstance(prepared, dict) and isinstance(config, dict):
        return [d for k in sorted(set(prepared) | set(config))
                for d in _differing(prepared.get(k), config.get(k), f"{prefix}.{k}")]
    if isinstance(prepared, list) and isinstance(config, list) and len(prepared) == len(config):
        return [d for i, (a, b) in enumerate(zip(prepared, config))
                for d in _differing(a, b, f"{prefix}.{i}")]
    return [] if prepared == config else [prefix]


def load_manifest(d: DataConfig) -> dict:
    """The manifest of `d.prepared_dir`, checked against the config.

    Raises:
      ConfigError: no prepared data there, or data prepared with other settings (named), or a
        source to draw from without training tokens.
    """
    path = Path(d.prepared_dir) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"data.prepared_dir: no prepared data at {path.parent} (no "
                          f"{MANIFEST}); run `glam-data prepare` with the same data overrides "
                          "first.")
    manifest = json.loads(path.read_text())
    settings = json.loads(json.dumps(shard_settings(d), default=str))
    if manifest["settings"] != settings:
        diffs = _differing(manifest["settings"], settings)
        raise ConfigError(f"data: {path.parent} was prepared with other settings (differing: "
                          f"{', '.join(diffs)}); run `glam-data prepare` with this config, or "
                          "point data.prepared_dir elsewhere.")
    given = json.loads(json.dumps(asdict(d.tokenizer), default=str))
    prepared = manifest["tokenizer"]["settings"]
    if given != prepared:
        diffs = [f"{k}: prepared {prepared.get(k)!r}, config {v!r}" for k, v in given.items()
                 if prepared.get(k) != v]
        raise ConfigError(f"data.tokenizer: {path.parent} was prepared with another tokenizer "
                          f"({'; '.join(diffs)}); run `glam-data prepare` with this config, or "
                          "point data.prepared_dir elsewhere.")
    for i, source in enumerate(d.sources):
        if source.weight > 0 and not manifest["sources"][source.name]["splits"]["train"]["tokens"]:
            raise ConfigError(f"data.sources[{i}].weight: {source.name!r} has no training "
                              "documents to draw from; give it weight 0 or some text.")
    return manifest


def source_epochs(manifest: dict, sources, run_tokens: float) -> dict[str, float]:
    """{source: passes over its training split} that `run_tokens` training tokens make: the
    windows are mixed by weight, so source s supplies run_tokens x w_s / sum(w) of them.
    Sources of weight 0 are left out.

    Args:
      manifest: a prepared corpus's manifest (`load_manifest`).
      sources: the `data.sources` configs (name, weight).
      run_tokens: tokens the run reads (steps x batch x (seq_len + 1)).
    """
    total = sum(s.weight for s in sources)
    return {s.name: run_tokens * s.weight / total
            / manifest["sources"][s.name]["splits"]["train"]["tokens"]
            for s in sources if s.weight > 0}


class TextCorpus:
    """Prepared text: its tokenizer, fingerprint, training iterator and validation windows.

    Raises (on construction):
      ConfigError: see `load_manifest`; a validation split smaller than one batch; a prepared
        tokenizer whose size is not `model_vocab`.
    """

    def __init__(self, d: DataConfig, window: int, batch_size: int,
                 model_vocab: int | None = None):
        self.cfg = d
        self.root = Path(d.prepared_dir)
        self.manifest = load_manifest(d)
        self.tokenizer = SentencePieceTokenizer((self.root / self.manifest["tokenizer"]["file"])
                                                .read_bytes())
        if self.tokenizer.sha256 != self.manifest["tokenizer"]["sha256"]:
            raise ConfigError(f"data.prepared_dir: the tokenizer in {self.root} is not the one "
                              "its manifest names; run `glam-data prepare` again.")
        self.fingerprint = self.manifest["fingerprint"]
        if model_vocab is not None and model_vocab != self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {model_vocab}, but the prepared tokenizer "
                f"({self.root / self.manifest['tokenizer']['file']}) has "
                f"{self.tokenizer.vocab_size} pieces; set data.tokenizer.vocab_size (or "
                "data.tokenizer.path) to what was prepared, or prepare again.")
        self.window = window  # model.seq_len + 1
        self.source_names = [s.name for s in d.sources]
        for i, s in enumerate(d.sources):
            tokens = self.manifest["sources"][s.name]["splits"]["val"]["tokens"]
            if s.val_share > 0 and tokens // self.window < batch_size:  # full windows only
                raise ConfigError(
                    f"data.sources[{i}].val_share: {s.name!r} holds out {tokens} tokens, fewer "
                    f"than one validation batch ({batch_size} x {self.window}); raise val_share "
                    "(and prepare again) or lower train.batch_size.")

    def _shards(self, source: str, split: str) -> list[str]:
        return [str(self.root / p)
                for p in self.manifest["sources"][source]["splits"][split]["shards"]]

    def artifacts(self) -> list[Path]:
        """The manifest, the tokenizer model and, for filtered data, the quality classifier
        and the kept and dropped samples: attached to every run trained on them."""
        quality = self.manifest.get("quality", {})
        return [self.root / MANIFEST, self.root / self.manifest["tokenizer"]["file"],
                *(self.root / quality[k] for k in ("classifier", "samples") if k in quality)]

    def facts(self, run_tokens: int) -> dict:
        """Tokens per source and split, and the epochs of each source's training split that
        `run_tokens` training tokens read (`source_epochs`), for the run's parameters."""
        out = {"tokenizer_vocab": self.tokenizer.vocab_size}
        for name, s in self.manifest["sources"].items():
            for split, counts in s["splits"].items():
                out[f"{name}_{split}_tokens"] = counts["tokens"]
        for name, epochs in source_epochs(self.manifest, self.cfg.sources, run_tokens).items():
            out[f"{name}_epochs"] = round(epochs, 3)
        return out

    def train_dataset(self, rows: int, seed: int, shard_index: int = 0,
                      shard_count: int = 1) -> grain.IterDataset:
        """Batches {tokens, tokens_segment_ids, source} of `rows` windows from the documents
        of shard `shard_index` of `shard_count` (every `shard_count`-th document): one
        process's distinct rows of the global batch.

        Raises:
          ConfigError: a source to draw from has fewer training documents than shards.
        """
        parts, weights = [], []
        for i, s in enumerate(self.cfg.sources):
            if s.weight <= 0:
                continue
            docs = grain.MapDataset.source(
                grain.sources.ArrayRecordDataSource(self._shards(s.name, "train")))
            if len(docs) < shard_count:
                raise ConfigError(
                    f"data.sources[{i}]: {s.name!r} has {len(docs)} training documents, fewer "
                    f"than the {shard_count} processes that each read their own share; split "
                    "its text into more documents (txt_unit=line) or give it weight 0.")
            docs = docs[shard_index::shard_count].shuffle(seed=seed * 1009 + i).repeat(None)
            parts.append(_packed(docs, self.window).map(
                lambda x, i=i: {**x, SOURCE_KEY: np.int32(i)}))
            weights.append(s.weight)
        return grain.IterDataset.mix(parts, weights).batch(rows, drop_remainder=True)

    def val_batches(self, source: str, n_batches: int,
                    batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Up to `n_batches` full batches of `source`'s validation windows (the last, padded
        window left out: padding is no target)."""
        shards = self._shards(source, "val")
        if not shards or not n_batches:
            return
        docs = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shards))
        windows = _packed(docs, self.window).filter(lambda x: x["tokens_segment_ids"].min() > 0)
        it = iter(windows.batch(batch_size, drop_remainder=True))
        for _ in range(n_batches):
            batch = next(it, None)
            if batch is None:
                return
            yield batch
