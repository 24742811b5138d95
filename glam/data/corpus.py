"""What a training run asks of its data, the same for the world and for prepared text.

`Corpus` is the one interface the trainer uses; `build` makes the corpus `data.kind` names:
`WorldData` (the generated world, `glam.data.world`) or `TextData` (prepared text,
`glam.data.text`). Each hands out the step's batches through a feed (`glam.data.feed`).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Iterator, Optional, Protocol

import jax
import numpy as np

from glam.checkpoint import Checkpointer
from glam.config import DataKind
from glam.data.feed import TextFeed, WorldFeed
from glam.data.text import TextCorpus
from glam.data.tokenizer import Tokenizer
from glam.data.world import World, WorldCorpus
from glam.data.world_text import KINDS as WORLD_SOURCES
from glam.eval import Task, read_jsonl, world_tasks
from glam.resolve import ResolvedConfig

# (tokens [B, seq_len + 1] int32, segment ids of the same shape or None)
Batch = tuple[np.ndarray, Optional[np.ndarray]]


class Feed(Protocol):
    """The global batch of every step, this process building only its own rows."""

    tokens: np.ndarray  # int64 [sources]: training tokens drawn per source (empty: one stream)

    def next(self, step: int, data_order: int) -> tuple[jax.Array, Optional[jax.Array]]:
        """(tokens [B, seq_len + 1] int32, segment ids [B, seq_len + 1] int32 or None)."""

    def drawn(self) -> dict[str, float]:
        """Step metrics on what was drawn so far (`data/tokens/<source>`, ...)."""

    def iterator_state(self) -> Optional[dict]:
        """What a checkpoint keeps to read on from here (None: a pure function of the step)."""

    def resume(self, ckpt: Checkpointer, step: int, tokens_drawn: list[int]) -> None:
        """Continue from checkpoint `step`, whose record counted `tokens_drawn`."""


class Corpus(Protocol):
    """A run's data: batches, validation sets, evaluation tasks, what MLflow records of it.

    Raises (on construction, by `build`): glam.config.ConfigError for data that cannot serve
    the run (unprepared or differently prepared text, a tokenizer of another size).
    """

    tokenizer: Tokenizer
    fingerprint: str  # equal fingerprints, equal data

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (= model.vocab_size)."""

    @property
    def world(self) -> World | None:
        """The world the data is, or renders as text (`world_*` sources); None otherwise."""

    def feed(self, sharding: jax.sharding.Sharding) -> Feed:
        """The run's batches, laid out by `sharding`."""

    def validation_sets(self) -> dict[str, Iterator[Batch]]:
        """{set name: `train.eval_batches` validation batches}, the same every call: the world's
        one stream (name ""), or each text source's held-out windows (named by source)."""

    def tasks(self) -> list[Task]:
        """The world's own evaluation tasks (with `eval.builtin`) and the user's JSONL tasks."""

    def artifacts(self) -> list[Path]:
        """Files attached to the run as they are (the prepared manifest and tokenizer...)."""

    def facts(self) -> dict:
        """The `corpus.*` params of the run: vocabulary size, then what the data says of the
        run's length (epochs, knowledge load...)."""


class _Common:
    """What both corpora share: tasks and facts from the world and the config."""

    cfg: ResolvedConfig
    tokenizer: Tokenizer
    world: World | None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def tasks(self) -> list[Task]:
        e, world = self.cfg.eval, self.world
        tasks = world_tasks(world, e.max_examples, e.seed) if e.builtin and world else []
        for spec in e.tasks:
            examples = read_jsonl(spec.path, spec.kind)[: e.max_examples]
            train = read_jsonl(spec.train_path, spec.kind) if spec.train_path else []
            tasks.append(Task(spec.name, spec.kind, examples, train))
        return tasks

    def facts(self) -> dict:
        m, t = self.cfg.model, self.cfg.train
        # tokens read: each window of seq_len inputs reads its last target too
        return {"vocab_size": self.vocab_size,
                **self.source.facts(t.steps * t.batch_size * (m.seq_len + 1))}


class WorldData(_Common):
    """The generated world: batches drawn at offsets that are a function of the step."""

    def __init__(self, cfg: ResolvedConfig):
        self.cfg, self.source = cfg, WorldCorpus(cfg.data)
        self.tokenizer, self.world = self.source.tokenizer, self.source.world

    @property
    def fingerprint(self) -> str:
        return self.source.fingerprint

    def feed(self, sharding) -> WorldFeed:
        t = self.cfg.train
        return WorldFeed(self.source, t.batch_size, self.cfg.model.seq_len + 1, t.seed, sharding)

    def validation_sets(self) -> dict[str, Iterator[Batch]]:
        t = self.cfg.train
        batches = self.source.val_batches(t.eval_batches, t.batch_size, self.cfg.model.seq_len + 1)
        return {"": ((x, None) for x in batches)}

    def artifacts(self) -> list[Path]:
        return []


class TextData(_Common):
    """Prepared text (`glam-data prepare`), its iterator's position kept by the checkpoints."""

    def __init__(self, cfg: ResolvedConfig):
        m, t = cfg.model, cfg.train
        self.cfg = cfg
        self.source = TextCorpus(cfg.data, m.seq_len + 1, t.batch_size, m.vocab_size)
        self.tokenizer, self.fingerprint = self.source.tokenizer, self.source.fingerprint

    @cached_property
    def world(self) -> World | None:
        d = self.cfg.data
        return World(d) if any(s.builtin in WORLD_SOURCES for s in d.sources) else None

    def feed(self, sharding) -> TextFeed:
        t = self.cfg.train
        return TextFeed(self.source, t.batch_size, t.seed, sharding, self.cfg.data.segment_ids)

    def validation_sets(self) -> dict[str, Iterator[Batch]]:
        n, b, seg = self.cfg.train.eval_batches, self.cfg.train.batch_size, self.cfg.data.segment_ids
        return {name: ((x["tokens"], x["tokens_segment_ids"] if seg else None)
                       for x in self.source.val_batches(name, n, b))
                for name in self.source.source_names}

    def artifacts(self) -> list[Path]:
        return self.source.artifacts()


def build(cfg: ResolvedConfig) -> Corpus:
    """The corpus `cfg.data.kind` names, checked against the model (see `Corpus`)."""
    return TextData(cfg) if cfg.data.kind == DataKind.text else WorldData(cfg)
