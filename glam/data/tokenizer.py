"""Word-level tokenizer over a closed vocabulary (the synthetic world's words).

Ids: 0 <pad>, 1 <unk>, 2 <eos>, then the words in the order given. Text is lower-cased and
split on whitespace; a word outside the vocabulary becomes <unk>.
"""

from __future__ import annotations

from typing import Iterable, Sequence

SPECIALS = ("<pad>", "<unk>", "<eos>")
PAD, UNK, EOS = 0, 1, 2


class WordTokenizer:
    def __init__(self, words: Iterable[str]):
        self.vocab = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        if len(self.index) != len(self.vocab):
            raise ValueError("duplicate words in the vocabulary")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, UNK) for w in text.lower().split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i != PAD)
