"""The vocabulary size a data config implies, known without building or preparing the corpus,
and the check that a model's matches a tokenizer's."""

from __future__ import annotations

import json
from pathlib import Path

from glam.config import ConfigError, DataConfig, DataKind
from glam.data.manifest import MANIFEST
from glam.data.tokenizer import SentencePieceTokenizer
from glam.data.world import world_vocab_size


def vocab_size(d: DataConfig) -> int:
    """The tokenizer vocabulary of the corpus `d` describes, without building or reading it.

    The world's: its word count (`world_vocab_size`). A text corpus's: a given model's size
    (`tokenizer.path`, when readable here), else the prepared manifest's, else
    `tokenizer.vocab_size` (SentencePiece trains exactly that many pieces, or fails).

    Raises:
      ConfigError: `tokenizer.path` cannot be read and nothing is prepared.
    """
    if d.kind == DataKind.world:
        return world_vocab_size(d)
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


def check_vocab(tokenizer_vocab: int, model_vocab: int | None) -> None:
    """Raises ConfigError when `model.vocab_size` is set and differs from the tokenizer's."""
    if model_vocab is not None and model_vocab != tokenizer_vocab:
        raise ConfigError(f"model.vocab_size: {model_vocab}, but the tokenizer has "
                          f"{tokenizer_vocab} pieces; set model.vocab_size=null (take the "
                          f"tokenizer's) or {tokenizer_vocab}.")
