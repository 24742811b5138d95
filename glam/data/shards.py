"""The files of a prepared corpus: shard names and the hashes that fix them, the settings that
decide their contents, and atomic writes.

An input file's shards are `<stem>.<split>.array_record` (one int32 record of token ids per
document) and `<stem>.done.json` (written last: the settings they were made with and their
counts). The stem is `shards/<source>/<hash of the URL>-<hash of the settings>`, so shards made
with other settings or inputs never replace the ones a manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from glam.config import DataConfig
from glam.data import world_text

SPLITS = ("train", "val")
FORMAT_VERSION = 1
QUALITY_DIR = "quality"  # the classifier and the quality samples, under the prepared folder


def json_hash(obj) -> str:
    """The SHA-256 hex digest of `obj` as JSON (keys sorted; other types as `str`)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def unit_hash(seed: int, salt: str, text: str) -> float:
    """A uniform draw in [0, 1) fixed by (seed, salt, text): the same on every worker."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=f"{seed}:{salt}".encode()[:64]).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def file_sha(path: Path) -> str:
    """The SHA-256 hex digest of the bytes at `path`; raises OSError when it cannot be read."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` whole, or keeps what it held: written aside, then renamed."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def shard_key(settings: dict, source_settings: dict, identity: dict, tokenizer_sha: str,
              classifier_sha: str | None) -> str:
    """What decides one input file's shards (a SHA-256 hex digest): its identity, how it is read
    and split (`settings` from `shard_settings`, `source_settings` its source's entry there),
    the tokenizer and the quality filter (`classifier_sha`: None for an unfiltered source);
    not the source's other files."""
    return json_hash({"read": {k: v for k, v in source_settings.items() if k != "paths"},
                      "malformed": settings["malformed"], "seed": settings["seed"],
                      "format": FORMAT_VERSION, "input": identity, "tokenizer": tokenizer_sha,
                      "quality": [settings["quality"], classifier_sha]
                      if classifier_sha is not None else None})


def shard_stem(folder: Path, url: str, key: str) -> str:
    """The common prefix of one input file's shards in `folder`, named by its URL and key."""
    return str(folder / f"{json_hash(url)[:12]}-{key[:12]}")


def shard_path(stem: str, split: str) -> Path:
    """The ArrayRecord file of `split` ("train" or "val") of the shards at `stem`."""
    return Path(f"{stem}.{split}.array_record")


def done_path(stem: str) -> Path:
    """The record that the shards at `stem` are finished (written after them)."""
    return Path(f"{stem}.done.json")


def stem_of(shard: Path) -> str:
    """The stem of a shard file (`shard_path`'s inverse)."""
    return str(shard).rsplit(".", 2)[0]


def finished(stem: str, key: str) -> dict | None:
    """The done record of the shards at `stem` when they and it exist and were made with
    `key`; None when the file is still to tokenize."""
    stamp = done_path(stem)
    if not (stamp.is_file() and all(shard_path(stem, split).is_file() for split in SPLITS)):
        return None
    done = json.loads(stamp.read_text())
    return done if done.get("key") == key else None
