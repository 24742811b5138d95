"""What preparation trains before tokenizing: the SentencePiece tokenizer and the quality
classifier, each on a seeded sample drawn by the engine's workers, and each reused while its
settings and inputs are unchanged (files named by their hash, beside a stamp of what made them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from glam.config import DataConfig, QualityRole, Selection
from glam.data import quality as quality_filter
from glam.data.engine import Engine
from glam.data.shards import QUALITY_DIR, file_sha, json_hash, write_atomic
from glam.data.sources import DataError
from glam.data.tokenizer import SentencePieceTokenizer
from glam.data.vocab import check_vocab
from glam.data.work import Plan, sample_documents, sample_file

log = logging.getLogger("glam.data")


def tokenizer_settings(d: DataConfig) -> dict:
    """The settings that decide a trained tokenizer: its section, the sources' weights, the
    seed."""
    t = d.tokenizer
    # sampler 2: the sample measured in characters, long lines cut into sentences; a folder
    # prepared with the line sampler before it trains its tokenizer again
    return {**asdict(t), "weights": {s.name: s.weight for s in d.sources}, "seed": d.seed,
            "sampler": 2}


def train_tokenizer(d: DataConfig, p: Plan, engine: Engine) -> SentencePieceTokenizer:
    """SentencePiece trained on a seeded sample of every source, in proportion to its weight:
    about `tokenizer.sample_chars x weight / total weight` characters of each source (all of
    its text when it holds less), drawn as training sentences.

    Raises:
      DataError: no source of weight > 0 holds any text.
      ConfigError: SentencePiece cannot train `tokenizer.vocab_size` pieces on the sample.
    """
    t = d.tokenizer
    total = sum(s.weight for s in d.sources)
    sentences: list[str] = []
    whole_corpus = True  # every source gave all its text: a larger sample_chars cannot help
    for source in d.sources:
        budget = t.sample_chars * source.weight / total
        if budget <= 0:
            continue
        # The file sizes guess the text's length: over it for JSON fields and multi-byte
        # characters, under it for compressed files. An overshoot is cut below by keeping the
        # lowest hashes; a shortfall draws again with a threshold raised to fit.
        size = sum(int(i.get("size", 0)) for i in p.identities[source.name]) or 1
        keep = min(1.0, budget / size)
        while True:
            jobs = [(u, source, d.malformed, d.seed, keep) for u in p.files[source.name]]
            candidates = sorted(c for found in engine.map(sample_file, jobs) for c in found)
            chars = sum(len(c[1]) for c in candidates)
            if chars >= budget or keep >= 1.0:
                break
            keep = min(1.0, keep * (8.0 if not chars else max(2.0, 1.25 * budget / chars)))
        whole_corpus &= chars < budget
        taken = 0
        for _, sentence in candidates:
            if taken >= budget:
                break
            sentences.append(sentence)
            taken += len(sentence)
    if not sentences:
        raise DataError("data.sources: no text to train the tokenizer on; the files of every "
                        "source of weight > 0 hold no document (check each source's paths and "
                        "text_field), or give a trained model as data.tokenizer.path.")
    log.info("training a %s tokenizer (%d pieces) on %d sentences, %d characters", t.model_type,
             t.vocab_size, len(sentences), sum(map(len, sentences)))
    return SentencePieceTokenizer.train(iter(sentences), vocab_size=t.vocab_size,
                                        model_type=str(t.model_type),
                                        byte_fallback=t.byte_fallback,
                                        character_coverage=t.character_coverage, seed=d.seed,
                                        whole_corpus=whole_corpus)


def train_classifier(d: DataConfig, p: Plan, engine: Engine) -> quality_filter.Classifier:
    """The quality classifier, trained on up to `quality.train_docs` documents of the curated
    sources and as many of the web sources (each the lowest seeded hashes).

    Raises:
      DataError: too few documents of a class to train or evaluate it.
    """
    q = d.quality
    texts = {}
    for role in QualityRole:
        sources = [s for s in d.sources if s.quality == role]
        size = sum(int(i.get("size", 0)) for s in sources for i in p.identities[s.name]) or 1
        keep = min(1.0, 2 * q.train_docs * 2000 / size)  # twice the need at ~2 KB a document
        while True:
            jobs = [(u, s, d.malformed, d.seed, f"quality:{role}", keep)
                    for s in sources for u in p.files[s.name]]
            found = sorted(c for part in engine.map(sample_documents, jobs) for c in part)
            if len(found) >= q.train_docs or keep >= 1.0:
                break
            keep = min(1.0, keep * 8)  # the documents were longer than guessed
        texts[role] = [text for _, text in found[: q.train_docs]]
    log.info("training the quality classifier on %d curated and %d web documents",
             len(texts[QualityRole.curated]), len(texts[QualityRole.web]))
    try:
        return quality_filter.train(texts[QualityRole.curated], texts[QualityRole.web], q, d.seed)
    except ValueError as err:
        raise DataError(f"data.sources: {err}") from err


def classifier_stage(d: DataConfig, p: Plan, out: Path,
                     engine_factory: Callable[[], Engine]) -> Path | None:
    """The quality classifier's file under `out/quality/` (named by its hash; trained, or
    reused while its settings and the curated and web inputs are unchanged); None without a
    filter. `engine_factory` gives the engine, started only when there is training to do.

    Raises:
      DataError: too few documents of a class to train or evaluate it.
    """
    if d.quality.selection == Selection.none:
        return None
    q = d.quality
    folder = out / QUALITY_DIR
    folder.mkdir(exist_ok=True)
    stamp = folder / "classifier.json"
    key = json_hash({"n_features": q.n_features, "ngram_max": q.ngram_max, "seed": d.seed,
                     "train_docs": q.train_docs, "holdout_share": q.holdout_share,
                     "regularization": q.regularization, "malformed": str(d.malformed),
                     "inputs": {s.name: [str(s.quality), p.identities[s.name]]
                                for s in d.sources if s.quality is not None}})
    previous = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if previous.get("key") == key and (out / previous["file"]).is_file() \
            and file_sha(out / previous["file"]) == previous["file_sha256"]:
        return out / previous["file"]
    start = time.perf_counter()
    classifier = train_classifier(d, p, engine_factory())
    seconds = time.perf_counter() - start
    data = classifier.to_bytes()
    path = folder / f"classifier-{classifier.sha256[:16]}.npz"
    write_atomic(path, data)
    write_atomic(stamp, json.dumps({"key": key, "file": str(path.relative_to(out)),
                                    "file_sha256": hashlib.sha256(data).hexdigest(),
                                    "sha256": classifier.sha256, "train_seconds": seconds,
                                    "settings": classifier.settings,
                                    "metrics": classifier.metrics}, indent=1).encode())
    m = classifier.metrics
    log.info("quality classifier: ROC AUC %.3f, accuracy %.3f on %s held-out documents (%.1f s)",
             m["roc_auc"], m["accuracy"], m["held_out_documents"], seconds)
    return path


def tokenizer_stage(d: DataConfig, p: Plan, out: Path, engine_factory: Callable[[], Engine],
                    model_vocab: int | None) -> tuple[SentencePieceTokenizer, str]:
    """(tokenizer, its file name under `out`): the given one, the one trained before with the
    same settings and inputs, or a newly trained one. Files are named by their hash, so a
    manifest's tokenizer is never replaced; sizes are checked before anything is written.
    `engine_factory` gives the engine, started only when there is training to do.

    Raises:
      ConfigError: its size differs from a set `model.vocab_size` (`model_vocab`), or
        SentencePiece cannot train that many pieces on the sample.
      DataError: `tokenizer.path` cannot be read, or no source of weight > 0 holds text.
    """
    stamp = out / "tokenizer.json"
    if d.tokenizer.path:
        try:
            tokenizer = SentencePieceTokenizer.load(d.tokenizer.path)
        except (OSError, RuntimeError, ValueError) as err:
            raise DataError(f"data.tokenizer.path: cannot use the SentencePiece model at "
                            f"{d.tokenizer.path!r} ({err}).") from err
        check_vocab(tokenizer.vocab_size, model_vocab)
    else:
        check_vocab(d.tokenizer.vocab_size, model_vocab)  # before spending time on training
        key = json_hash({"settings": tokenizer_settings(d), "inputs": p.identities})
        previous = json.loads(stamp.read_text()) if stamp.is_file() else {}
        name = previous.get("file", "")
        if previous.get("key") == key and (out / name).is_file():
            tokenizer = SentencePieceTokenizer((out / name).read_bytes())
            if tokenizer.sha256 == previous.get("sha256"):
                return tokenizer, name
        tokenizer = train_tokenizer(d, p, engine_factory())
    name = f"tokenizer-{tokenizer.sha256[:16]}.model"
    if not (out / name).is_file():
        write_atomic(out / name, tokenizer.model_bytes)  # training reads this copy
    if not d.tokenizer.path:
        write_atomic(stamp, json.dumps({"key": key, "sha256": tokenizer.sha256, "file": name,
                                        "settings": tokenizer_settings(d)},
                                       indent=1, default=str).encode())
    return tokenizer, name
