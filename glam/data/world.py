"""The default corpus: a seeded fictional world with knowledge in it.

N people, each with `n_attributes` facts (birth city, birth year, employer, field, hobby, pet)
whose values are made-up words drawn from fixed per-attribute vocabularies. The training text
mixes three kinds of document:

- biographies: all facts of one person, in random order, each in one of
  `templates_per_attribute` sentence templates (compact: 5-8 tokens a fact);
- question-answer lines ("q: where was X born ? a: Y .") for the people of the QA split only;
- filler: sentences from a small seeded grammar, so there is plain language to model too.

So the corpus has language to learn and a known amount of knowledge to store:
`knowledge_bits` = N x sum over attributes of log2(number of values). The evaluation tasks
(`glam.eval.world_tasks`) ask about those facts.

Tokens are words; the vocabulary is closed and derived from the config (`world_vocabulary`).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from glam.config import DataConfig
from glam.data.tokenizer import SPECIALS, WordTokenizer

# name, number of values, fact templates ("{e}" person, "{v}" value), question
ATTRIBUTES = [
    ("birth_city", 64, ["{e} was born in {v} .", "{e} comes from {v} .",
                        "the hometown of {e} is {v} .", "{v} is where {e} was born ."],
     "where was {e} born ?"),
    ("birth_year", 100, ["{e} was born in the year {v} .", "the birth year of {e} is {v} .",
                         "{e} arrived in {v} .", "in {v} {e} was born ."],
     "when was {e} born ?"),
    ("employer", 64, ["{e} works for {v} .", "{e} is employed by {v} .", "{v} employs {e} .",
                      "the employer of {e} is {v} ."],
     "who does {e} work for ?"),
    ("field", 32, ["{e} studies {v} .", "{e} is an expert in {v} .",
                   "the field of {e} is {v} .", "{e} works on {v} ."],
     "what does {e} study ?"),
    ("hobby", 32, ["{e} enjoys {v} .", "in free time {e} likes {v} .",
                   "the hobby of {e} is {v} .", "{e} spends weekends on {v} ."],
     "what does {e} enjoy ?"),
    ("pet", 16, ["{e} owns a {v} .", "the pet of {e} is a {v} .", "{e} lives with a {v} .",
                 "{e} takes care of a {v} ."],
     "what pet does {e} have ?"),
]

FILLER = {
    "det": ["the", "a", "every", "some", "this", "that"],
    "adj": ["small", "old", "quiet", "bright", "cold", "green", "heavy", "quick", "strange",
            "gentle", "dark", "warm"],
    "noun": ["river", "house", "garden", "road", "window", "child", "teacher", "market",
             "forest", "letter", "bridge", "song", "winter", "tower", "boat", "village"],
    "verb": ["sees", "finds", "follows", "builds", "carries", "remembers", "opens", "crosses",
             "paints", "watches"],
    "adv": ["slowly", "often", "again", "quietly", "early", "together"],
    "prep": ["near", "under", "behind", "beyond", "across"],
}
SYLLABLES = ["ka", "ro", "vin", "del", "mar", "to", "zel", "qua", "bri", "sen", "lo", "dra",
             "mi", "fen", "gar", "tho", "ula", "pex", "nor", "wyn", "sab", "ith", "cor", "vek"]
QUESTION, ANSWER, END = "q:", "a:", "<eos>"
WORLD_TASKS = ("world_qa", "world_qa_seen", "world_facts")  # glam.eval.world_tasks, by name


def _pseudo_words(rng: np.random.Generator, n: int, syllables: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        w = "".join(rng.choice(SYLLABLES, syllables))
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


def _fixed_words(attributes: list) -> set[str]:
    """The words of the templates, questions, filler grammar and QA markers."""
    words = {w for _, _, templates, question in attributes for t in templates + [question]
             for w in t.split() if "{" not in w}
    return words | {w for ws in FILLER.values() for w in ws} | {QUESTION, ANSWER}


def _name_parts(n_entities: int) -> int:
    """First names (and last names) generated: enough distinct pairs for every person."""
    return math.ceil(math.sqrt(n_entities)) + 1


def world_vocab_size(cfg: DataConfig) -> int:
    """The tokenizer vocabulary size of `World(cfg)`, computed without building the world:
    special tokens + fixed words + every attribute value + first and last names (all generated
    words are distinct from each other and from the fixed words)."""
    attributes = ATTRIBUTES[: cfg.n_attributes]
    return (len(SPECIALS) + len(_fixed_words(attributes)) + sum(n for _, n, _, _ in attributes)
            + 2 * _name_parts(cfg.n_entities))


@dataclass(frozen=True)
class Person:
    name: tuple[str, str]
    values: tuple[int, ...]  # value index per attribute


class World:
    """The people, their facts and the vocabulary; fully determined by the data config."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        taken = {w for words in FILLER.values() for w in words}
        taken |= {w for _, _, templates, q in ATTRIBUTES for t in templates + [q] for w in t.split()}
        self.attributes = ATTRIBUTES[: cfg.n_attributes]
        self.values = []
        for name, n_values, _, _ in self.attributes:
            if name == "birth_year":
                self.values.append([str(1900 + i) for i in range(n_values)])
            else:
                self.values.append(_pseudo_words(rng, n_values, 3, taken))
        n_parts = _name_parts(cfg.n_entities)
        firsts = _pseudo_words(rng, n_parts, 2, taken)
        lasts = _pseudo_words(rng, n_parts, 2, taken)
        pairs = rng.permutation(n_parts * n_parts)[: cfg.n_entities]
        self.people = [
            Person((firsts[p // n_parts], lasts[p % n_parts]),
                   tuple(int(rng.integers(len(v))) for v in self.values))
            for p in pairs]
        n_qa = round(cfg.qa_entity_fraction * cfg.n_entities)
        self.qa_people = list(range(n_qa))  # QA lines of these people are in the training text
        self.bio_only_people = list(range(n_qa, cfg.n_entities))
        # Popularity: person p is drawn with probability ~ rank(p)^-popularity (Zipf), the
        # ranks a seeded permutation so neither split is the popular one; 0 draws uniformly.
        self.popularity = None
        if cfg.popularity:
            ranks = np.random.default_rng([cfg.seed, 3]).permutation(cfg.n_entities) + 1.0
            weights = ranks ** -cfg.popularity
            self.popularity = weights / weights.sum()
            self._cdf = {"all": np.cumsum(self.popularity),
                         "qa": np.cumsum(self.popularity[:n_qa])}
        words = _fixed_words(self.attributes)
        words |= {w for v in self.values for w in v} | set(firsts) | set(lasts)
        self.tokenizer = WordTokenizer(sorted(words))
        # Token ids of each fact and QA line, encoded once: `document_ids` assembles documents
        # from them instead of rendering and re-encoding the same sentences (1.2x faster).
        self._fact_ids = functools.cache(
            lambda p, a, t: tuple(self.tokenizer.encode(self.fact(p, a, t))))
        self._qa_ids = functools.cache(lambda p, a: tuple(self.tokenizer.encode(self.qa_line(p, a))))

    @property
    def knowledge_bits(self) -> float:
        return self.cfg.n_entities * sum(math.log2(n) for _, n, _, _ in self.attributes)

    def draw_person(self, rng: np.random.Generator, qa_only: bool = False) -> int:
        """A person drawn by popularity (uniformly when `data.popularity` is 0), from the QA
        split only when `qa_only`."""
        people = self.qa_people if qa_only else self.people
        if self.popularity is None:
            return int(rng.integers(len(people)))
        cdf = self._cdf["qa" if qa_only else "all"]
        return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")),
                   len(people) - 1)

    def exposures(self, run_tokens: float) -> np.ndarray:
        """[N, n_attributes] float64: the expected number of times each fact is stated (in a
        biography or a QA line) in `run_tokens` tokens of the training stream.

        Exact in expectation: documents are drawn independently, so a fact's rate per
        document is P(biography) x P(its person) + P(QA line) x P(its person | QA split) /
        n_attributes, and documents average `mean_document_tokens` tokens."""
        n, n_attr = len(self.people), len(self.attributes)
        pop = self.popularity if self.popularity is not None else np.full(n, 1.0 / n)
        p_filler, p_qa = self._document_shares()
        rate = np.outer((1 - p_filler - p_qa) * pop, np.ones(n_attr))
        if self.qa_people:
            qa = pop[: len(self.qa_people)]
            rate[: len(qa)] += np.outer(p_qa * qa / qa.sum() / n_attr, np.ones(n_attr))
        return rate * run_tokens / self.mean_document_tokens()

    def _document_shares(self) -> tuple[float, float]:
        """P(filler document), P(QA line) (0 without QA people: those draws are biographies)."""
        return self.cfg.filler_share, (self.cfg.qa_share if self.qa_people else 0.0)

    @functools.cached_property
    def _mean_document_tokens(self) -> float:
        # Every name is two words and every value one: a fact's (QA line's) length depends on
        # its template (attribute) only, so person 0's lengths are everyone's.
        p_filler, p_qa = self._document_shares()
        k, n_attr = self.cfg.templates_per_attribute, len(self.attributes)
        bio = sum(np.mean([len(self._fact_ids(0, a, t)) for t in range(k)]) for a in range(n_attr))
        qa = np.mean([len(self._qa_ids(0, a)) for a in range(n_attr)])
        rng = np.random.default_rng([self.cfg.seed, 4])
        filler = np.mean([len(self.filler(rng).split()) for _ in range(500)])
        return float(1 + p_filler * filler + p_qa * qa + (1 - p_filler - p_qa) * bio)

    def mean_document_tokens(self) -> float:
        """Expected tokens of one training document and its <eos> (filler: the mean of 500)."""
        return self._mean_document_tokens

    # -- text ------------------------------------------------------------------------------------
    def name(self, person: int) -> str:
        return " ".join(self.people[person].name)

    def value(self, person: int, attribute: int) -> str:
        return self.values[attribute][self.people[person].values[attribute]]

    def fact(self, person: int, attribute: int, template: int) -> str:
        templates = self.attributes[attribute][2]
        return templates[template].format(e=self.name(person), v=self.value(person, attribute))

    def question(self, person: int, attribute: int) -> str:
        return self.attributes[attribute][3].format(e=self.name(person))

    def qa_line(self, person: int, attribute: int) -> str:
        return f"{QUESTION} {self.question(person, attribute)} {ANSWER} {self.value(person, attribute)} ."

    def biography(self, person: int, rng: np.random.Generator) -> str:
        k = self.cfg.templates_per_attribute
        order = rng.permutation(len(self.attributes))
        return " ".join(self.fact(person, a, int(rng.integers(k))) for a in order)

    def filler(self, rng: np.random.Generator) -> str:
        def pick(kind):
            return FILLER[kind][int(rng.integers(len(FILLER[kind])))]

        def noun_phrase():
            return f"{pick('det')} {pick('adj')} {pick('noun')}" if rng.random() < 0.5 else \
                f"{pick('det')} {pick('noun')}"

        sentences = []
        for _ in range(int(rng.integers(2, 5))):
            tail = (f"{pick('prep')} {noun_phrase()}" if rng.random() < 0.5 else pick("adv"))
            sentences.append(f"{noun_phrase()} {pick('verb')} {noun_phrase()} {tail} .")
        return " ".join(sentences)

    def document(self, rng: np.random.Generator) -> str:
        """One training document: filler, a QA line (QA split only) or a biography."""
        u = rng.random()
        if u < self.cfg.filler_share:
            return self.filler(rng)
        if self.qa_people and u < self.cfg.filler_share + self.cfg.qa_share:
            person = self.qa_people[self.draw_person(rng, qa_only=True)]
            return self.qa_line(person, int(rng.integers(len(self.attributes))))
        return self.biography(self.draw_person(rng), rng)

    def document_ids(self, rng: np.random.Generator) -> list[int]:
        """`tokenizer.encode(document(rng))`, drawing the same numbers from `rng`, assembled
        from the cached ids of facts and QA lines (the word tokenizer splits on spaces, so a
        joined text encodes to the joined ids)."""
        u = rng.random()
        if u < self.cfg.filler_share:
            return self.tokenizer.encode(self.filler(rng))
        if self.qa_people and u < self.cfg.filler_share + self.cfg.qa_share:
            person = self.qa_people[self.draw_person(rng, qa_only=True)]
            return list(self._qa_ids(person, int(rng.integers(len(self.attributes)))))
        person = self.draw_person(rng)
        k = self.cfg.templates_per_attribute
        return [i for a in rng.permutation(len(self.attributes))
                for i in self._fact_ids(person, int(a), int(rng.integers(k)))]

    def stream(self, n_tokens: int, rng: np.random.Generator) -> np.ndarray:
        """Documents separated by <eos>, as token ids, exactly n_tokens long."""
        out: list[int] = []
        end = self.tokenizer.encode(END)
        while len(out) < n_tokens:
            out += self.document_ids(rng)
            out += end
        return np.asarray(out[:n_tokens], np.int32)


class WorldCorpus:
    """Train and validation token streams of a World; batches are pure functions of the step."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.world = World(cfg)
        self.tokenizer = self.world.tokenizer
        self.train = self.world.stream(cfg.train_tokens, np.random.default_rng([cfg.seed, 1]))
        self.val = self.world.stream(cfg.val_tokens, np.random.default_rng([cfg.seed, 2]))

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the vocabulary and both streams: equal fingerprints, equal data."""
        h = hashlib.sha256("\n".join(self.tokenizer.vocab).encode())
        h.update(self.train.tobytes())
        h.update(self.val.tobytes())
        return h.hexdigest()[:16]

    def facts(self, run_tokens: int) -> dict:
        """The world's knowledge load, the passes `run_tokens` training tokens make over the
        training stream (windows drawn at random offsets) and how often they state each fact
        (`World.exposures`), for the run's parameters."""
        exposures = self.world.exposures(run_tokens)
        return {"knowledge_bits": round(self.world.knowledge_bits, 1),
                "train_tokens_per_entity": self.cfg.train_tokens / len(self.world.people),
                "stream_epochs": round(run_tokens / self.cfg.train_tokens, 3),
                # statements of a fact in the run: the mean over facts, and the 10th
                # percentile (the long tail under a Zipf popularity)
                "fact_exposures_mean": round(float(exposures.mean()), 2),
                "fact_exposures_p10": round(float(np.percentile(exposures, 10)), 2)}

    def train_batch(self, step: int, batch_size: int, window: int, seed: int,
                    data_order: int = 0, rows: slice = slice(None)) -> np.ndarray:
        """Windows [batch_size, window] at random offsets; a pure function of
        (seed, data_order, step), so a resumed run draws exactly the batches it would have.
        `rows` picks a slice of that batch: a process builds only the rows its devices hold."""
        rng = np.random.default_rng([seed, data_order, step])
        starts = rng.integers(0, len(self.train) - window + 1, batch_size)[rows]
        return self.train[starts[:, None] + np.arange(window)]

    def val_batches(self, n_batches: int, batch_size: int, window: int):
        """Consecutive non-overlapping validation windows, the same every call; full batches only,
        so every batch has the training shape."""
        n_windows = len(self.val) // window
        windows = self.val[: n_windows * window].reshape(n_windows, window)
        for i in range(min(n_batches, n_windows // batch_size)):
            yield windows[i * batch_size : (i + 1) * batch_size]
