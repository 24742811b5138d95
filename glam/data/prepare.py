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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from glam.config import (ConfigError, DataConfig, DataKind, Malformed, QualityRole, Selection,
                         SourceConfig)
from glam.data import pydocs, world_text
from glam.data import quality as quality_filter
from glam.data.sources import DataError, ReadStats, documents, expand, file_identity
from glam.data.tokenizer import SentencePieceTokenizer, training_sentences

log = logging.getLogger("glam.data")

MANIFEST = "manifest.json"
QUALITY_DIR = "quality"
MAX_LABELS, OTHER_LABEL = 64, "(other labels)"  # distinct labels reported per file
CONNECT_TIMEOUT = "15s"  # for a Dask scheduler to answer
SPLITS = ("train", "val")
FORMAT_VERSION = 1


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _unit_hash(seed: int, salt: str, text: str) -> float:
    """A uniform draw in [0, 1) fixed by (seed, salt, text): the same on every worker."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=f"{seed}:{salt}".encode()[:64]).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def shard_settings(d: DataConfig) -> dict:
    """The settings that decide the shards' contents (mixture weights do not: they are read
    when training, and reach the shards only through a trained tokenizer's sample; nor does
    what the quality report calls good), with the world's fields when a source is rendered
    from the world."""
    world = any(str(s.builtin) in world_text.KINDS for s in d.sources)
    return {"sources": [{k: v for k, v in asdict(s).items() if k != "weight"}
                        for s in d.sources],
            "malformed": str(d.malformed), "seed": d.seed, "format": FORMAT_VERSION,
            "quality": {k: v for k, v in asdict(d.quality).items() if k != "good_label"},
            **(world_text.settings(d) if world else {})}


def tokenizer_settings(d: DataConfig) -> dict:
    t = d.tokenizer
    return {**asdict(t), "weights": {s.name: s.weight for s in d.sources}, "seed": d.seed}


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` whole, or keeps what it held: written aside, then renamed."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- work done on the engine's workers (plain functions of picklable arguments) -----------------
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
        u = _unit_hash(seed, salt, text)
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
    paths = {split: Path(f"{stem}.{split}.array_record") for split in SPLITS}
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
            held_out = _unit_hash(seed, f"split:{source.name}", text) < source.val_share
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
    write_atomic(Path(f"{stem}.done.json"), json.dumps(result, indent=1).encode())
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
        uniforms = np.asarray([_unit_hash(self.seed, "pareto", t) for t in texts])
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
            item = (-_unit_hash(self.seed, "show", text), float(score), text[:2000])
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


# -- the driver --------------------------------------------------------------------------------
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


class Engine:
    """A Dask client: local worker processes, or the cluster at `address`.

    Raises (on construction):
      ConfigError: no scheduler answers at `address` within CONNECT_TIMEOUT.
    """

    def __init__(self, address: str | None, workers: int):
        # Dask logs every worker start and stop, and a task error twice; the error reaches the
        # caller anyway.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
        from dask.distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.CRITICAL)
        self.cluster = None
        if address:
            try:
                self.client = Client(address, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as err:
                raise ConfigError(f"data.engine.address: no Dask scheduler answers at "
                                  f"{address!r} ({err}); start one (`dask scheduler`) or leave "
                                  "the address null to use local worker processes.") from err
        else:
            self.cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1,
                                        threads_per_worker=1, processes=True,
                                        dashboard_address=":0")  # any free port
            self.client = Client(self.cluster)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def map(self, fn, jobs: list[tuple]):
        """Submit fn(*job) for every job; yields results as they complete (an error passes on
        once the tasks already running are cancelled)."""
        from dask.distributed import as_completed

        futures = [self.client.submit(fn, *job, pure=False) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            self.client.cancel(futures)


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


def _classifier(d: DataConfig, p: Plan, out: Path, engine_factory) -> Path | None:
    """The quality classifier's file under `out/quality/` (named by its hash; trained, or
    reused while its settings and the curated and web inputs are unchanged); None without a
    filter."""
    if d.quality.selection == Selection.none:
        return None
    q = d.quality
    folder = out / QUALITY_DIR
    folder.mkdir(exist_ok=True)
    stamp = folder / "classifier.json"
    key = _hash({"n_features": q.n_features, "ngram_max": q.ngram_max, "seed": d.seed,
                 "train_docs": q.train_docs, "holdout_share": q.holdout_share,
                 "regularization": q.regularization, "malformed": str(d.malformed),
                 "inputs": {s.name: [str(s.quality), p.identities[s.name]] for s in d.sources
                            if s.quality is not None}})
    previous = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if previous.get("key") == key and (out / previous["file"]).is_file() \
            and _file_sha(out / previous["file"]) == previous["file_sha256"]:
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


def _tokenizer(d: DataConfig, p: Plan, out: Path, engine_factory,
               model_vocab: int | None) -> tuple[SentencePieceTokenizer, str]:
    """(tokenizer, its file name under `out`): the given one, the one trained before with the
    same settings and inputs, or a newly trained one. Files are named by their hash, so a
    manifest's tokenizer is never replaced; sizes are checked before anything is written.

    Raises:
      ConfigError: its size differs from a set `model.vocab_size` (`model_vocab`).
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
        key = _hash({"settings": tokenizer_settings(d), "inputs": p.identities})
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


def check_vocab(tokenizer_vocab: int, model_vocab: int | None) -> None:
    """Raises ConfigError when `model.vocab_size` is set and differs from the tokenizer's."""
    if model_vocab is not None and model_vocab != tokenizer_vocab:
        raise ConfigError(f"model.vocab_size: {model_vocab}, but the tokenizer has "
                          f"{tokenizer_vocab} pieces; set model.vocab_size=null (take the "
                          f"tokenizer's) or {tokenizer_vocab}.")


def planned_vocab_size(d: DataConfig) -> int:
    """The vocabulary of a text corpus's tokenizer without reading shards: a given model's size
    (`tokenizer.path`, when readable here), else the prepared manifest's, else
    `tokenizer.vocab_size` (SentencePiece trains exactly that many pieces, or fails).

    Raises:
      ConfigError: `tokenizer.path` cannot be read and nothing is prepared.
    """
    manifest = Path(d.prepared_dir) / MANIFEST
    if d.tokenizer.path:
        try:
            return SentencePieceTokenizer.load(d.tokenizer.path).vocab_size
        except (OSError, RuntimeError, ValueError) as err:
            if not manifest.is_file():
                raise ConfigError(f"data.tokenizer.path: cannot use the SentencePiece model at "
                                  f"{d.tokenizer.path!r} ({err}).") from err
    if manifest.is_file():
        return json.loads(manifest.read_text())["tokenizer"]["vocab_size"]
    return d.tokenizer.vocab_size


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
        tokenizer, tokenizer_file = _tokenizer(d, p, out, engine_factory, model_vocab)
        classifier = _classifier(d, p, out, engine_factory)
        classifier_sha = _file_sha(classifier) if classifier else None
        settings = shard_settings(d)
        fingerprint = _hash({"settings": settings, "inputs": p.identities,
                             "tokenizer": tokenizer.sha256, "classifier": classifier_sha})[:16]
        manifest_path = out / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("fingerprint") == fingerprint and _shards_exist(out, manifest):
                log.info("%s is up to date (fingerprint %s): nothing to do", out, fingerprint)
                return manifest
        results, jobs, order = {}, [], {}
        for source, source_settings in zip(d.sources, settings["sources"]):
            folder = out / "shards" / source.name
            folder.mkdir(parents=True, exist_ok=True)
            filtered = classifier is not None and source.quality == QualityRole.web
            quality = {"classifier": str(classifier), "cfg": d.quality} if filtered else None
            for url, identity in zip(p.files[source.name], p.identities[source.name]):
                # What decides this file's shards: its identity, how it is read and split, the
                # tokenizer and the filter (not the source's other files). Shards are named by
                # it, so none that a manifest lists is ever rewritten.
                key = _hash({"read": {k: v for k, v in source_settings.items() if k != "paths"},
                             "malformed": settings["malformed"], "seed": d.seed,
                             "format": FORMAT_VERSION, "input": identity,
                             "tokenizer": tokenizer.sha256,
                             "quality": [settings["quality"], classifier_sha] if filtered
                             else None})
                stem = str(folder / f"{_hash(url)[:12]}-{key[:12]}")
                order[stem] = len(order)  # the files' order, whatever folder they are in
                done = {"source": source.name, "input": identity, "key": key}
                stamp = Path(f"{stem}.done.json")
                finished = stamp.is_file() and all(
                    Path(f"{stem}.{split}.array_record").is_file() for split in SPLITS)
                if finished and json.loads(stamp.read_text()).get("key") == key:
                    results[stem] = json.loads(stamp.read_text())
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
    manifest = _manifest(d, p, out, tokenizer_file, tokenizer, fingerprint, results, order)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    _remove_unlisted(out, manifest)
    _warn_unusable(d, manifest)
    return manifest


def _remove_unlisted(out: Path, manifest: dict) -> None:
    """Delete the shards, tokenizers and classifiers the new manifest does not list (earlier
    settings or inputs): only now that it replaced the manifest that listed them."""
    keep = {out / shard for source in manifest["sources"].values()
            for split in source["splits"].values() for shard in split["shards"]}
    keep |= {Path(f"{str(path).rsplit('.', 2)[0]}.done.json") for path in keep}
    keep |= {out / manifest["tokenizer"]["file"]}
    keep |= {out / manifest["quality"][k] for k in ("classifier", "samples")
             if k in manifest.get("quality", {})}
    candidates = [*(out / "shards").rglob("*"), *out.glob("tokenizer-*.model"),
                  *(out / QUALITY_DIR).glob("classifier-*.npz"),
                  *(out / QUALITY_DIR).glob("samples-*.jsonl")]
    for path in candidates:
        if path.is_file() and path not in keep:
            path.unlink()


def _warn_unusable(d: DataConfig, manifest: dict) -> None:
    """Say now what training would refuse later."""
    for i, source in enumerate(d.sources):
        splits = manifest["sources"][source.name]["splits"]
        if source.weight > 0 and not splits["train"]["documents"]:
            log.warning("data.sources[%d] (%s): no training documents; training refuses a "
                        "source of weight > 0 without any", i, source.name)
        if source.val_share > 0 and not splits["val"]["documents"]:
            log.warning("data.sources[%d] (%s): no validation documents at val_share %g; raise "
                        "it for a val_loss/%s", i, source.name, source.val_share, source.name)


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shards_exist(out: Path, manifest: dict) -> bool:
    return all((out / shard).is_file() for source in manifest["sources"].values()
               for split in source["splits"].values() for shard in split["shards"])


def _run_tokenize(engine: Engine, jobs: list, results: dict, progress: bool) -> None:
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


def _manifest(d: DataConfig, p: Plan, out: Path, tokenizer_file: str, tokenizer,
              fingerprint: str, results: dict, order: dict[str, int]) -> dict:
    """The manifest; each source's shards listed in its input files' order (`order`: stem ->
    position), so the same files read from another folder give the same training order."""
    sources, samples = {}, []
    for source in d.sources:
        stems = sorted((k for k, r in results.items() if r["source"] == source.name),
                       key=order.__getitem__)
        splits = {split: {"documents": sum(results[k]["splits"][split]["documents"]
                                          for k in stems),
                          "tokens": sum(results[k]["splits"][split]["tokens"] for k in stems),
                          "shards": [str(Path(f"{k}.{split}.array_record").relative_to(out))
                                     for k in stems]}
                  for split in SPLITS}
        skipped: dict[str, int] = {}
        for k in stems:
            for reason, n in results[k]["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        sources[source.name] = {"files": p.identities[source.name], "splits": splits,
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
