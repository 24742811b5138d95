"""A seeded order-n Markov corpus: language to model, with a known loss floor.

Each context of `order` previous tokens continues with one of `branching` tokens, drawn once per
context from the vocabulary, with weights from Dirichlet(concentration). The corpus records the
true model's log-loss on its own validation split (`entropy_nats`): a perfect LM reaches it.

Batches are a pure function of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import numpy as np

from glam.config import DataConfig

_CHAINS = 512  # independent chains generated side by side


class MarkovCorpus:
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        v, n, b = cfg.vocab_size, cfg.order, cfg.branching
        rng = np.random.default_rng(cfg.seed)
        n_ctx = v**n
        self.next_tokens = np.stack([rng.choice(v, b, replace=False) for _ in range(n_ctx)])
        self.next_probs = rng.dirichlet(np.full(b, cfg.concentration), size=n_ctx)
        # Separate streams: the validation split does not move when train_tokens changes.
        self.train = self._generate(cfg.train_tokens, np.random.default_rng([cfg.seed, 1]))
        self.val, val_logp = self._generate(cfg.val_tokens, np.random.default_rng([cfg.seed, 2]),
                                            with_logp=True)
        self.entropy_nats = float(-val_logp.mean())

    def _context(self, history: np.ndarray) -> np.ndarray:
        ctx = np.zeros(history.shape[0], np.int64)
        for j in range(self.cfg.order):
            ctx = ctx * self.cfg.vocab_size + history[:, j]
        return ctx

    def _generate(self, n_tokens: int, rng: np.random.Generator, with_logp: bool = False):
        length = -(-n_tokens // _CHAINS) + self.cfg.order
        out = np.empty((_CHAINS, length), np.int32)
        logp = np.zeros((_CHAINS, length), np.float64)
        out[:, : self.cfg.order] = rng.integers(0, self.cfg.vocab_size, (_CHAINS, self.cfg.order))
        cum = np.cumsum(self.next_probs, axis=1)
        for t in range(self.cfg.order, length):
            ctx = self._context(out[:, t - self.cfg.order : t])
            choice = (rng.random(_CHAINS)[:, None] > cum[ctx]).sum(1).clip(max=self.cfg.branching - 1)
            out[:, t] = self.next_tokens[ctx, choice]
            logp[:, t] = np.log(self.next_probs[ctx, choice])
        tokens = out[:, self.cfg.order :].reshape(-1)[:n_tokens]
        if with_logp:
            return tokens, logp[:, self.cfg.order :].reshape(-1)[:n_tokens]
        return tokens

    def train_batch(self, step: int, batch_size: int, window: int, seed: int,
                    data_order: int = 0) -> np.ndarray:
        """Windows [batch_size, window] at random offsets; a pure function of
        (seed, data_order, step), so a resumed run draws exactly the batches it would have."""
        rng = np.random.default_rng([seed, data_order, step])
        starts = rng.integers(0, len(self.train) - window + 1, batch_size)
        return self.train[starts[:, None] + np.arange(window)]

    def val_batches(self, n_batches: int, batch_size: int, window: int):
        """Consecutive non-overlapping validation windows, the same every call; full batches only,
        so every batch has the training shape."""
        n_windows = len(self.val) // window
        windows = self.val[: n_windows * window].reshape(n_windows, window)
        for i in range(min(n_batches, n_windows // batch_size)):
            yield windows[i * batch_size : (i + 1) * batch_size]
