"""The global batch of every step, each process building only its own rows, for either corpus:
`WorldFeed` (a pure function of seed, data order and step) or `TextFeed` (a grain iterator whose
state the checkpoints carry).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from glam.checkpoint import Checkpointer
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

    def resume(self, ckpt: Checkpointer, step: int, tokens_drawn: list[int]) -> None:
        """Nothing to restore: the batches are a function of the step."""

    def drawn(self) -> dict[str, float]:
        return {}


class TextFeed:
    """Batches of prepared text from grain. The iterator only moves forward: after a rollback
    the model restarts from its checkpoint while the data goes on (the batches between that
    checkpoint and the failure are not seen again, as in PaLM's restarts); a resumed run sets it
    to the checkpoint's state (`restore`).

    Raises (on construction):
      ValueError: this process's rows of the batch are not one block of equal blocks.
      glam.config.ConfigError: a source with fewer documents than blocks.
    """

    def __init__(self, corpus: TextCorpus, batch_size: int, seed: int, sharding,
                 segment_ids: bool):
        self.names = corpus.source_names
        self.global_shape = (batch_size, corpus.window)
        self.sharding, self.segment_ids = sharding, segment_ids
        block, self.blocks = row_block(sharding, self.global_shape)
        self.iterator = iter(corpus.train_dataset(batch_size // self.blocks, seed, block,
                                                  self.blocks))
        self.tokens = np.zeros(len(self.names), np.int64)  # trained on by these rows, per source

    def next(self, step: int, data_order: int) -> tuple[jax.Array, Optional[jax.Array]]:
        """(tokens [B, window] int32, segment ids [B, window] int32 or None): the next batch."""
        batch = next(self.iterator)
        np.add.at(self.tokens, batch[SOURCE_KEY], self.global_shape[1] - 1)  # targets

        def global_array(local):
            return jax.make_array_from_process_local_data(self.sharding,
                                                          np.asarray(local, np.int32),
                                                          self.global_shape)

        segments = global_array(batch["tokens_segment_ids"]) if self.segment_ids else None
        return global_array(batch["tokens"]), segments

    def iterator_state(self) -> dict:
        """The grain iterator's state (JSON), saved with each checkpoint."""
        return self.iterator.get_state()

    def resume(self, ckpt: Checkpointer, step: int, tokens_drawn: list[int]) -> None:
        """Set the iterator to its state at checkpoint `step`, and the per-source counts to
        `tokens_drawn` (that checkpoint's record).

        Raises:
          glam.checkpoint.CheckpointError: the checkpoint holds no data state for this process.
        """
        ckpt.restore_data(step, self.iterator)
        self.tokens = np.asarray(tokens_drawn, np.int64)

    def drawn(self) -> dict[str, float]:
        """Training tokens (targets) drawn per source so far (`data/tokens/<source>`; with
        several row blocks, this process's count times their number) and their shares
        (`data/mixture/<source>`)."""
        total = max(int(self.tokens.sum()), 1)
        out = {}
        for name, n in zip(self.names, self.tokens):
            out[f"data/tokens/{name}"] = float(n * self.blocks)
            out[f"data/mixture/{name}"] = float(n / total)
        return out


def row_block(sharding, global_shape: tuple[int, int]) -> tuple[int, int]:
    """(index, count) of this process's block of batch rows: the rows its devices hold form one
    of `count` equal blocks (processes that hold the same rows, along a model axis across
    hosts, read the same block).

    Raises:
      ValueError: the rows are not one such block.
    """
    starts, stops = set(), set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows = index[0]
        starts.add(rows.start or 0)
        stops.add(global_shape[0] if rows.stop is None else rows.stop)
    lo, hi = min(starts), max(stops)
    size = hi - lo
    if global_shape[0] % size or lo % size:
        raise ValueError(f"this process holds batch rows {lo}..{hi} of {global_shape[0]}, not "
                         "one of equal blocks; choose a mesh whose data axis splits the batch "
                         "evenly between processes")
    return lo // size, global_shape[0] // size
