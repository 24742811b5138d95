"""Input pipeline: the synthetic world corpus, its tokenizer, deterministic batches."""

from glam.data.tokenizer import WordTokenizer
from glam.data.world import World, WorldCorpus

__all__ = ["WordTokenizer", "World", "WorldCorpus"]
