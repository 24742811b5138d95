"""Knowledge stored, in bits: how much of the world's facts a model holds.

The measure of Allen-Zhu & Li, "Physics of Language Models, Part 3.3: Knowledge Capacity
Scaling Laws" (ICLR 2025): a fact whose value is drawn uniformly from V_a choices carries
log2(V_a) bits; a model that gives the right value a cross-entropy of CE bits (given a fixed
prompt naming the person and the attribute) holds max(0, log2(V_a) - CE) of them. A model
that puts all its mass on the right value holds log2(V_a); one that spreads it evenly over
the V_a values (or wider) holds 0.

Facts are sampled by person (all of them when the world has at most `max_facts`), separately
in the two splits of the world: `qa_seen` (people whose QA lines are in the training text) and
`bio_only` (people known only from biographies). Each split's sum is scaled by (people in the
split / people sampled from it), so the estimate is of the whole world. The prompt of a fact is
the training text's own form, "<eos> <a template of the attribute up to the value>", as at the
start of a biography, with a template no other attribute's sentence continues
(`prompt_templates`); the value's tokens are scored in one forward pass per batch of facts (no
generation).

Metrics (`KnowledgeProbe.__call__`), overall and per split (`knowledge/<split>/...`):
- `bits`: bits stored (estimate for the whole world or split);
- `fraction`: of the world's (split's) `knowledge_bits`;
- `bits_per_param`: over the model's **total** parameters, embeddings included;
- `bits_per_activated_param`: over the parameters one token uses (embeddings included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from glam.config import ConfigError
from glam.data.world import World
from glam.distributed import fetch

SPLITS = ("qa_seen", "bio_only")


@dataclass(frozen=True)
class FactSample:
    """The facts a probe scores, as token rows.

    Attributes:
      prompts: per fact, the prompt's token ids (int).
      values: per fact, the value's token ids (int, at least one).
      max_bits: [F] float64, log2(V_a) of each fact's attribute.
      split: [F] int, index into `SPLITS`.
      scale: [len(SPLITS)] float64, people in the split / people sampled from it (0 when the
        split is empty).
      split_bits: [len(SPLITS)] float64, the knowledge bits of each whole split.
    """

    prompts: list[list[int]]
    values: list[list[int]]
    max_bits: np.ndarray
    split: np.ndarray
    scale: np.ndarray
    split_bits: np.ndarray


def _head(template: str) -> str | None:
    """A template's text before its value, the person as "{e}"; None when the value comes
    first (nothing to prompt with)."""
    head = template.split("{v}", 1)[0].strip()
    return head if head.startswith("{e}") else None


def prompt_templates(world: World) -> list[str]:
    """Per attribute, the head of the first template the training text uses (the first
    `templates_per_attribute`) that no sentence of another attribute continues: "{e} was born
    in" would be ambiguous (the birth year's "{e} was born in the year {v}" shares it, and a
    model that knows both facts still splits its mass between a city and "the"), so the birth
    city is asked as "{e} comes from".

    Raises:
      ConfigError: an attribute has no such template among those in use (names it and the
        fix).
    """
    k = world.cfg.templates_per_attribute
    used = [[t for t in templates[:k]] for _, _, templates, _ in world.attributes]
    heads = []
    for a, (name, _, templates, _) in enumerate(world.attributes):
        others = [t for b, ts in enumerate(used) if b != a for t in ts]
        head = next((h for h in map(_head, templates[:k])
                     if h and not any(t.startswith(h + " ") for t in others)), None)
        if head is None:
            raise ConfigError(f"data.templates_per_attribute: with {k}, every template of "
                              f"{name!r} in use begins like another attribute's sentence, so no "
                              "prompt asks for it alone; use at least 2 templates, or "
                              "eval.knowledge_facts=0 (no knowledge probe).")
        heads.append(head)
    return heads


def fact_prompt(world: World, person: int, attribute: int, heads: list[str]) -> str:
    """The prompt of a fact: its attribute's head (`prompt_templates`) with the person's name."""
    return heads[attribute].format(e=world.name(person))


def sample_facts(world: World, tokenizer, max_facts: int, seed: int) -> FactSample:
    """The probe's facts: every fact when the world has at most `max_facts`, else about
    `max_facts` of them, the people drawn without replacement from each split in proportion to
    its size (at least one person per non-empty split).

    Raises:
      ValueError: `max_facts` is smaller than one person's facts.
      ConfigError: see `prompt_templates`.
    """
    n_attr = len(world.attributes)
    if max_facts < n_attr:
        raise ValueError(f"eval.knowledge_facts={max_facts} is below one person's "
                         f"{n_attr} facts; use at least {n_attr}, or 0 to turn the probe off.")
    rng = np.random.default_rng([seed, 11])
    groups = (world.qa_people, world.bio_only_people)
    n_people = len(world.people)
    budget = max_facts // n_attr
    eos = tokenizer.eos_id
    bits_a = np.asarray([math.log2(len(v)) for v in world.values])
    heads = prompt_templates(world)
    prompts, values, max_bits, split = [], [], [], []
    scale = np.zeros(len(SPLITS))
    for s, people in enumerate(groups):
        if not people:
            continue
        take = len(people) if n_people <= budget else max(1, round(budget * len(people) / n_people))
        chosen = sorted(rng.choice(len(people), size=take, replace=False).tolist())
        scale[s] = len(people) / take
        for i in chosen:
            for a in range(n_attr):
                prompts.append([eos, *tokenizer.encode(fact_prompt(world, people[i], a, heads))])
                values.append(tokenizer.encode(world.value(people[i], a)))
                max_bits.append(bits_a[a])
                split.append(s)
    split_bits = np.asarray([len(people) * bits_a.sum() for people in groups])
    return FactSample(prompts, values, np.asarray(max_bits), np.asarray(split), scale,
                      split_bits)


def stored_bits(value_logp: np.ndarray, max_bits: np.ndarray) -> np.ndarray:
    """Bits each fact holds: max(0, log2(V_a) - CE), CE = -log p(value) in bits.

    Args:
      value_logp: [F] natural-log probability of each fact's value (sum over its tokens).
      max_bits: [F] log2(V_a).
    Returns: [F] float64, in [0, max_bits].
    """
    ce_bits = -np.asarray(value_logp, np.float64) / math.log(2)
    return np.clip(max_bits - ce_bits, 0.0, max_bits)


def summarize(bits: np.ndarray, sample: FactSample, total_params: int,
              activated_params: int) -> dict[str, float]:
    """The `knowledge/...` metrics from each sampled fact's stored bits ([F])."""
    metrics: dict[str, float] = {}
    totals = np.zeros(len(SPLITS))
    for s, name in enumerate(SPLITS):
        if sample.scale[s]:
            totals[s] = bits[sample.split == s].sum() * sample.scale[s]
            metrics.update(_named(f"knowledge/{name}", totals[s], sample.split_bits[s],
                                  total_params, activated_params))
    metrics.update(_named("knowledge", totals.sum(), sample.split_bits.sum(), total_params,
                          activated_params))
    return metrics


def _named(prefix: str, bits: float, world_bits: float, total: int, activated: int) -> dict:
    return {f"{prefix}/bits": float(bits), f"{prefix}/fraction": float(bits / world_bits),
            f"{prefix}/bits_per_param": float(bits / total),
            f"{prefix}/bits_per_activated_param": float(bits / activated)}


def rows(sample: FactSample, window: int, pad: int) -> tuple[np.ndarray, ...]:
    """Left-padded rows of prompt + value: tokens [F, window] int32, mask [F, window] bool, and
    target [F, window] bool marking the value's tokens (scored from the position before each).

    Raises:
      ValueError: a prompt + value is longer than `window`.
    """
    n = len(sample.prompts)
    tokens = np.full((n, window), pad, np.int32)
    mask = np.zeros((n, window), bool)
    target = np.zeros((n, window), bool)
    for i, (p, v) in enumerate(zip(sample.prompts, sample.values)):
        row = p + v
        if len(row) > window:
            raise ValueError(f"a fact prompt of {len(row)} tokens exceeds the window {window}")
        tokens[i, window - len(row):] = row
        mask[i, window - len(row):] = True
        target[i, window - len(v):] = True
    return tokens, mask, target


class KnowledgeProbe:
    """Scores a model's knowledge of the world (`summarize`'s metrics), each fact a
    left-padded row of the model's window, in batches of `batch_size` rows: the shape of the
    evaluator's rank-classification batches, so the probe runs the program the evaluator has
    already compiled (`score`) and never compiles one of its own.

    Args:
      score: `glam.eval.harness.make_score(graphdef)`, (state, tokens, mask, target) ->
        (sum of log p of the target tokens [B], their count [B]).
      world, tokenizer: the world the corpus renders and the run's tokenizer.
      total_params, activated_params: the model's counts (embeddings included).
      max_facts: facts scored at most (`eval.knowledge_facts`).
    Raises:
      ValueError: a fact prompt is longer than `seq_len`, or `max_facts` is too small.
      ConfigError: see `prompt_templates`.
    """

    def __init__(self, score, world: World, tokenizer, *, seq_len: int, batch_size: int,
                 total_params: int, activated_params: int, max_facts: int, seed: int):
        self.score, self.batch_size = score, batch_size
        self.sample = sample_facts(world, tokenizer, max_facts, seed)
        self.tokens, self.mask, self.target = rows(self.sample, seq_len, tokenizer.pad_id)
        self.params = (total_params, activated_params)

    def value_logp(self, state) -> np.ndarray:
        """[F] log p (nats) of each sampled fact's value under the model `state`."""
        n, b = len(self.tokens), self.batch_size
        out = np.zeros(n)
        for lo in range(0, n, b):
            hi = min(lo + b, n)
            batch = [a[lo:hi] for a in (self.tokens, self.mask, self.target)]
            if hi - lo < b:  # one compiled shape: fill with copies of its first row
                batch = [np.concatenate([a, np.repeat(a[:1], b - (hi - lo), 0)]) for a in batch]
            total, _ = fetch(self.score(state, *batch))
            out[lo:hi] = np.asarray(total)[: hi - lo]
        return out

    def __call__(self, state) -> dict[str, float]:
        bits = stored_bits(self.value_logp(state), self.sample.max_bits)
        return summarize(bits, self.sample, *self.params)

