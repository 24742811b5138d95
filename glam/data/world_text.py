"""The synthetic world rendered as GLaM-like text sources with a quality axis, as JSONL.

- `world_wiki`: clean biographies (every fact right), the curated encyclopedia;
- `world_books`: the grammar's prose, several paragraphs per document;
- `world_conversations`: question-answer exchanges about the QA-split people (GLaM's
  conversations source: neither a positive nor a negative of the quality classifier);
- `world_web`: pages, clean (a biography or prose) or low quality in the shares of `data.world_sources`: `wrong_facts` (a biography whose
  values are drawn at random), `word_salad` (the world's words in random order), `boilerplate`
  (navigation and legal lines, repeated), `truncated` (a clean page cut after its first fifth
  to third), `near_duplicates` (an earlier clean page with one word changed).

Each line is {"text": ..., "kind": ...}: training reads only the text (the classifier never
sees `kind`); the kind is there to measure how the classifier and the filter treat each one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from glam.config import DataConfig, check
from glam.data.world import World

KINDS = ("world_wiki", "world_books", "world_conversations", "world_web")
LOW_QUALITY = ("wrong_facts", "word_salad", "boilerplate", "truncated", "near_duplicates")
BOILERPLATE = ("home | about us | contact | sign in | register",
               "copyright all rights reserved | privacy policy | terms of use",
               "accept cookies to continue | share this page | subscribe to our newsletter")


def _biography(world: World, rng: np.random.Generator, wrong: bool = False) -> str:
    person = world.draw_person(rng)
    if not wrong:
        return world.biography(person, rng)
    name = world.name(person)
    sentences = []
    for a in rng.permutation(len(world.attributes)):
        templates = world.attributes[a][2]
        template = templates[int(rng.integers(world.cfg.templates_per_attribute))]
        value = world.values[a][int(rng.integers(len(world.values[a])))]
        sentences.append(template.format(e=name, v=value))
    return " ".join(sentences)


def _prose(world: World, rng: np.random.Generator, paragraphs: int) -> str:
    return "\n".join(world.filler(rng) for _ in range(paragraphs))


def _conversation(world: World, rng: np.random.Generator) -> str:
    people = world.qa_people
    return "\n".join(world.qa_line(people[world.draw_person(rng, qa_only=True)],
                                   int(rng.integers(len(world.attributes))))
                     for _ in range(int(rng.integers(2, 6))))


def _clean_page(world: World, rng: np.random.Generator) -> str:
    if rng.random() < 0.6:
        return _biography(world, rng)
    return _prose(world, rng, int(rng.integers(1, 4)))


def web_page(world: World, rng: np.random.Generator, kind: str, clean_pages: list[str]) -> str:
    """One `world_web` page of `kind` ("clean" or one of LOW_QUALITY)."""
    if kind == "wrong_facts":
        return _biography(world, rng, wrong=True)
    if kind == "word_salad":
        words = [w for w in world.tokenizer.vocab[3:]]
        return " ".join(rng.choice(words, int(rng.integers(20, 60))))
    if kind == "boilerplate":
        return "\n".join(BOILERPLATE[int(i)] for i in rng.integers(len(BOILERPLATE), size=8))
    if kind == "truncated":
        words = _clean_page(world, rng).split()
        return " ".join(words[: max(2, int(len(words) * rng.uniform(0.2, 0.34)))])
    if kind == "near_duplicates" and clean_pages:
        words = clean_pages[int(rng.integers(len(clean_pages)))].split()
        words[int(rng.integers(len(words)))] = str(rng.choice(world.tokenizer.vocab[3:]))
        return " ".join(words)
    page = _clean_page(world, rng)
    clean_pages.append(page)
    return page


def documents(d: DataConfig, kind: str) -> list[tuple[str, str]]:
    """(text, kind) of every document of the world source `kind`, seeded by `data.seed`."""
    world, w = World(d), d.world_sources
    rng = np.random.default_rng([d.seed, 100 + KINDS.index(kind)])
    if kind == "world_wiki":
        return [(_biography(world, rng), "clean") for _ in range(w.wiki_documents)]
    if kind == "world_books":
        return [(_prose(world, rng, int(rng.integers(3, 7))), "clean")
                for _ in range(w.books_documents)]
    if kind == "world_conversations":
        # Only the QA-split people: the others' facts are what world_qa asks about.
        check(bool(world.qa_people), "data.qa_entity_fraction", "world_conversations holds QA "
              "lines of the QA-split people, and there are none; set it above 0.")
        return [(_conversation(world, rng), "clean") for _ in range(w.conversations_documents)]
    shares = np.asarray([getattr(w, k) for k in LOW_QUALITY])
    kinds = ["clean", *LOW_QUALITY]
    p = np.concatenate([[1 - shares.sum()], shares])
    clean_pages: list[str] = []
    out = []
    for _ in range(w.web_documents):
        page_kind = kinds[int(rng.choice(len(kinds), p=p))]
        out.append((web_page(world, rng, page_kind, clean_pages), page_kind))
    return out


def settings(d: DataConfig) -> dict:
    """The `data.*` fields that decide the world sources' documents, by field name."""
    fields = {k: v for k, v in asdict(d).items()
              if k in ("n_entities", "n_attributes", "templates_per_attribute", "filler_share",
                       "qa_share", "qa_entity_fraction", "seed", "world_sources")}
    if d.popularity:  # named only when set: uniform worlds keep the keys they had
        fields["popularity"] = d.popularity
    return fields


def export(kind: str, folder: Path, d: DataConfig, n_files: int = 4) -> list[str]:
    """Write the documents of world source `kind` as `n_files` JSONL files under `folder`, in
    a subfolder named by the settings that decide them (kept when already complete); returns
    their paths."""
    key = hashlib.sha256(json.dumps(settings(d), sort_keys=True, default=str).encode()).hexdigest()
    target = Path(folder) / f"world-{key[:12]}" / kind
    paths = [target / f"part-{i:02d}.jsonl" for i in range(n_files)]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    target.mkdir(parents=True, exist_ok=True)
    docs = documents(d, kind)
    for i, path in enumerate(paths):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as f:
            for text, page_kind in docs[i::n_files]:
                f.write(json.dumps({"text": text, "kind": page_kind}) + "\n")
        os.replace(tmp, path)
    return [str(p) for p in paths]
