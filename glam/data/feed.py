"""The global batch of every step, each process building only its own rows, for either corpus:
`WorldFeed` (a pure function of seed, data order and step) or `TextFeed` (a grain iterator whose
state the checkpoints carry).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from glam.data.text import SOURCE_KEY, TextCorpus
from glam.data.world import WorldCorpus


class WorldFeed:
    """Windows of the world's stream at offsets drawn from (seed, data order, step): a resumed
    or rolled-back run needs no state to draw exactly the batches it should."""

    def __init__(self, corpus: WorldCorpus, batch_size: int, window: int, seed: int, sharding):
        self.corpus, self.batch_size, self.window, self.seed = corpus, batch_size, window, seed
        self.sharding = sharding
        self.tokens = np.zeros(0, np.int64)  # one stream: no per-source counts

    def next(self, step: int, data_order: int) -> tuple[jax.Array, None]:
        """(tokens [B, window] int32, no segment ids) of `step`."""
        b = self.batch_size
        tokens = jax.make_array_from_callback(
            (b, self.window), self.sharding,
            lambda index: self.corpus.train_batch(step, b, self.window, self.seed, data_order,
                                                  rows=index[0]))
        return tokens, None

    def iterator_state(self) -> None:
        return None

    def drawn(self) -> dict[str, float]:
        return {}


class TextFeed:
    """Batches of prepared text from grain. The iterator only moves forward: after a rollback
    the model restarts from its checkpoint while the data goes on (the batches between that
    checkpoint and the failure are not seen again, as in PaLM's restarts); a resumed run sets it
    to the checkpoint's state (`restore`).

    Raises (on construction):
      ValueError: `batch_size` not divisible by the number of processes.
    """

    def __init__(self, corpus: TextCorpus, batch_size: int, seed: int, sharding,
                 segment_ids: bool):
        count, index = jax.process_count(), jax.process_index()
        if batch_size % count:
            raise ValueError(f"train.batch_size {batch_size} is not divisible by the "
                             f"{count} processes")
        self.names = corpus.source_names
        self.global_shape = (batch_size, corpus.window)
        self.sharding, self.segment_ids, self.processes = sharding, segment_ids, count
        self.iterator = iter(corpus.train_dataset(batch_size // count, seed, index, count))
        self.tokens = np.zeros(len(self.names), np.int64)  # drawn by this process, per source

    def next(self, step: int, data_order: int) -> tuple[jax.Array, Optional[jax.Array]]:
        """(tokens [B, window] int32, segment ids [B, window] int32 or None): the next batch."""
        batch = next(self.iterator)
        np.add.at(self.tokens, batch[SOURCE_KEY], self.global_shape[1])

        def global_array(local):
            return jax.make_array_from_process_local_data(self.sharding,
                                                          np.asarray(local, np.int32),
                                                          self.global_shape)

        segments = global_array(batch["tokens_segment_ids"]) if self.segment_ids else None
        return global_array(batch["tokens"]), segments

    def iterator_state(self) -> dict:
        """The grain iterator's state (JSON), saved with each checkpoint."""
        return self.iterator.get_state()

    def drawn(self) -> dict[str, float]:
        """Training tokens drawn per source so far (`data/tokens/<source>`; with several
        processes, this process's count times their number) and their shares
        (`data/mixture/<source>`)."""
        total = max(int(self.tokens.sum()), 1)
        out = {}
        for name, n in zip(self.names, self.tokens):
            out[f"data/tokens/{name}"] = float(n * self.processes)
            out[f"data/mixture/{name}"] = float(n / total)
        return out
