"""Tokenizers behind one interface: the world's closed word vocabulary, and SentencePiece.

Both use the same special ids, so padding, document ends and evaluation work alike with either:
0 <pad>, 1 <unk>, 2 <eos> (end of document); no <bos>.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Protocol, Sequence

import sentencepiece as spm

from glam.config import ConfigError

SPECIALS = ("<pad>", "<unk>", "<eos>")
PAD, UNK, EOS = 0, 1, 2
# SentencePiece's trainer drops, without a word, every sentence longer than its
# max_sentence_length (in UTF-8 bytes); training sentences are cut to SENTENCE_CHARS characters,
# which at 4 bytes a character stay within it.
MAX_SENTENCE_BYTES = 1 << 16
SENTENCE_CHARS = 4096


def training_sentences(text: str, max_chars: int = SENTENCE_CHARS) -> list[str]:
    """The sentences SentencePiece trains on from one document: its lines that hold more than
    whitespace, a line longer than `max_chars` characters cut into pieces of at most
    `max_chars` (before a space where the second half of the piece has one, else anywhere), so
    every character of a long line reaches the trainer."""
    out = []
    for line in text.splitlines():
        start = 0
        while len(line) - start > max_chars:
            cut = line.rfind(" ", start + max_chars // 2, start + max_chars + 1)
            cut = cut if cut > start else start + max_chars
            out.append(line[start:cut])
            start = cut
        out.append(line[start:])
    return [s for s in out if s.strip()]


class Tokenizer(Protocol):
    """What training and evaluation need from a tokenizer."""

    pad_id: int
    unk_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class WordTokenizer:
    """Word-level tokenizer over a closed vocabulary (the synthetic world's words).

    Ids: the specials, then the words in the order given. Text is lower-cased and split on
    whitespace; a word outside the vocabulary becomes <unk>.
    """

    pad_id, unk_id, eos_id = PAD, UNK, EOS

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
        """Words of `ids` (padding dropped); an id past the vocabulary (an embedding larger than
        the world's words) reads as UNK's word."""
        return " ".join(self.vocab[i if i < len(self.vocab) else UNK] for i in ids if i != PAD)


class SentencePieceTokenizer:
    """A SentencePiece model (Kudo & Richardson 2018) with glam's special ids.

    Raises (on construction):
      ValueError: the model's <pad>/<unk>/<eos> ids are not 0/1/2 (it was trained elsewhere
        with other ids; glam pads with 0 and ends documents with 2).
    """

    def __init__(self, model: bytes):
        self.model_bytes = model
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.eos_id())
        if ids != (PAD, UNK, EOS):
            raise ValueError(f"SentencePiece model has <pad>, <unk>, <eos> ids {ids}; glam needs "
                             f"{(PAD, UNK, EOS)} (train it with pad_id=0 unk_id=1 eos_id=2 "
                             "bos_id=-1, or let glam-data prepare train one).")
        self.pad_id, self.unk_id, self.eos_id = PAD, UNK, EOS

    @classmethod
    def load(cls, path: str) -> "SentencePieceTokenizer":
        """Read a .model file (local path or fsspec URL)."""
        import fsspec

        with fsspec.open(path, "rb") as f:
            return cls(f.read())

    @classmethod
    def train(cls, sentences: Iterator[str], *, vocab_size: int, model_type: str,
              byte_fallback: bool, character_coverage: float, seed: int,
              whole_corpus: bool = False) -> "SentencePieceTokenizer":
        """Train on `sentences` (each at most MAX_SENTENCE_BYTES of UTF-8: `training_sentences`
        cuts documents so). `seed` makes the result reproducible (SentencePiece shuffles its
        input sentences with it). `whole_corpus`: the sentences are all the corpus's text, so a
        larger sample cannot help (the refusal says so).

        Raises:
          ConfigError: SentencePiece cannot train `vocab_size` pieces on this sample (too few for
            its characters and the 256 byte pieces, or too many for so little text).
        """
        import io

        spm.set_random_generator_seed(seed)
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences, model_writer=out, vocab_size=vocab_size,
                model_type=model_type, byte_fallback=byte_fallback,
                character_coverage=character_coverage, pad_id=PAD, unk_id=UNK, eos_id=EOS,
                bos_id=-1, max_sentence_length=MAX_SENTENCE_BYTES, num_threads=1,
                split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                normalization_rule_name="identity", minloglevel=2)
        except RuntimeError as err:
            more = ("add text to data.sources (the sample already holds all the corpus's text, "
                    "so a larger data.tokenizer.sample_chars adds nothing)" if whole_corpus
                    else "raise data.tokenizer.sample_chars")
            raise ConfigError(f"data.tokenizer.vocab_size: SentencePiece cannot train {vocab_size} "
                              f"pieces on this sample ({str(err).split('] ')[-1]}). Pick another "
                              f"vocab_size (byte fallback alone takes 256), or {more}.") from err
        return cls(out.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """One thread: parallelism is the data engine's (one worker per core)."""
        return self.sp.encode(texts, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if i != PAD])

