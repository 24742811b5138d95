"""Input pipeline: corpora and deterministic batch iteration."""

from glam.data.markov import MarkovCorpus

__all__ = ["MarkovCorpus"]
