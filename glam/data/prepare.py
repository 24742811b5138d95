"""`glam-data prepare`: text sources -> a SentencePiece tokenizer, token shards and a manifest.

Stages, each on a Dask cluster (local worker processes by default, `data.engine.address` for a
running cluster; the same code either way):

1. sample: every input file contributes training sentences (lines, long ones cut into pieces)
   chosen by a seeded hash, about `tokenizer.sample_chars x weight` characters per source
   (drawn again with a higher threshold when the first draw falls short); SentencePiece trains
   on them (skipped when `tokenizer.path` names a model, or the trained one is still valid).
2. tokenize: one task per input file. Each document becomes token ids plus <eos>, goes to the
   train or the validation split by a seeded hash of its text (`val_share`), and is written as
   one ArrayRecord record (int32 ids) of `shards/<source>/<file>.<split>.array_record`.
3. manifest: documents and tokens per source and split, skipped lines, the tokenizer hash and a
   fingerprint of inputs (path, size, modification time) and settings.

Output files appear whole (written under a temporary name, then renamed); a file's shards are
done when its `.done.json` (holding the settings it was made with) exists. So a re-run skips
finished files: an interrupted run completes by running it again, and a run with the same inputs
and settings does nothing.

This module holds the driver, `prepare`; the modules it calls: `work` (the input files, and what a
worker does with one), `trained` (the tokenizer and the quality classifier), `shards` (names,
hashes, atomic writes), `manifest`, `engine` (Dask).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from glam.config import ConfigError, DataConfig, DataKind, QualityRole
from glam.data.engine import Engine
from glam.data.manifest import (MANIFEST, build_manifest, remove_unlisted, shards_exist,
                                warn_unusable)
from glam.data.shards import (file_sha, finished, json_hash, shard_key, shard_settings,
                              shard_stem, write_atomic)
from glam.data.trained import classifier_stage, tokenizer_stage
from glam.data.work import plan, tokenize_file

log = logging.getLogger("glam.data")


def prepare(d: DataConfig, model_vocab: int | None = None, progress: bool = True) -> dict:
    """Prepare the text corpus of `d` under `d.prepared_dir`; returns the manifest.

    Raises:
      ConfigError: `d.kind` is not text, or `model_vocab` differs from the tokenizer's size.
      DataError: bad input (missing file, empty glob, malformed line with `malformed=stop`,
        missing text field, not UTF-8), naming the file and line. Shards already finished stay.
    """
    if d.kind != DataKind.text:
        raise ConfigError("data.kind: glam-data prepare reads text sources; pick a text data "
                          "config (data=pydocs, data=glam_mixture, or your own).")
    out = Path(d.prepared_dir).resolve()  # remote workers write here too: no relative paths
    if out.exists() and not out.is_dir():
        raise ConfigError(f"data.prepared_dir: {out} is a file; give a folder (new or one that "
                          "glam-data prepare wrote).")
    p = plan(d)
    out.mkdir(parents=True, exist_ok=True)
    engine: Engine | None = None

    def engine_factory() -> Engine:
        nonlocal engine
        engine = engine or Engine(d.engine.address, d.engine.workers)
        return engine

    try:
        if d.engine.address:
            engine_factory()  # a cluster that does not answer is refused before any work
        tokenizer, tokenizer_file = tokenizer_stage(d, p, out, engine_factory, model_vocab)
        classifier = classifier_stage(d, p, out, engine_factory)
        classifier_sha = file_sha(classifier) if classifier else None
        settings = shard_settings(d)
        fingerprint = json_hash({"settings": settings, "inputs": p.identities,
                                 "tokenizer": tokenizer.sha256,
                                 "classifier": classifier_sha})[:16]
        manifest_path = out / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("fingerprint") == fingerprint and shards_exist(out, manifest):
                log.info("%s is up to date (fingerprint %s): nothing to do", out, fingerprint)
                return manifest
        results, jobs, order = {}, [], {}
        for source, source_settings in zip(d.sources, settings["sources"]):
            folder = out / "shards" / source.name
            folder.mkdir(parents=True, exist_ok=True)
            filtered = classifier is not None and source.quality == QualityRole.web
            quality = {"classifier": str(classifier), "cfg": d.quality} if filtered else None
            for url, identity in zip(p.files[source.name], p.identities[source.name]):
                # Shards are named by their key, so none that a manifest lists is ever rewritten.
                key = shard_key(settings, source_settings, identity, tokenizer.sha256,
                                classifier_sha if filtered else None)
                stem = shard_stem(folder, url, key)
                order[stem] = len(order)  # the files' order, whatever folder they are in
                done = {"source": source.name, "input": identity, "key": key}
                if (record := finished(stem, key)) is not None:
                    results[stem] = record
                else:
                    jobs.append((url, source, d.malformed, d.seed, str(out / tokenizer_file),
                                 stem, done, quality))
        if jobs:
            log.info("tokenizing %d files (%d already done) on %s", len(jobs), len(results),
                     d.engine.address or "local Dask workers")
            _run_tokenize(engine_factory(), jobs, results, progress)
    finally:
        if engine is not None:
            engine.__exit__(None, None, None)
    manifest = build_manifest(d, p.identities, out, tokenizer_file, tokenizer, fingerprint,
                              results, order)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    remove_unlisted(out, manifest)
    warn_unusable(d, manifest)
    return manifest


def _run_tokenize(engine: Engine, jobs: list, results: dict, progress: bool) -> None:
    """Run `tokenize_file` on every job, adding each file's done record to `results` (stem ->
    record) as it finishes; a progress bar of documents and tokens per second."""
    bar = tqdm(unit="doc", unit_scale=True, dynamic_ncols=True, disable=not progress,
               desc="tokenize")
    start, tokens, files = time.perf_counter(), 0, 0
    try:
        for result in engine.map(tokenize_file, jobs):
            results[result["stem"]] = result
            files += 1
            docs = sum(s["documents"] for s in result["splits"].values())
            tokens += sum(s["tokens"] for s in result["splits"].values())
            bar.update(docs)
            bar.set_postfix(files=f"{files}/{len(jobs)}",
                            tok_s=f"{tokens / (time.perf_counter() - start):,.0f}")
    finally:
        bar.close()
