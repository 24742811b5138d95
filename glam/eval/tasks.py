"""Few-shot tasks as data: examples, JSONL loading, the built-in world tasks, prompts.

Two kinds, as in the paper:
- `nlg`: a question and its gold answers; the model generates, scored by exact match and F1.
  Prompt: "q: <question> a:" after k demonstrations "q: <question> a: <answer> .".
- `nlu`: a context and options; the model picks the option of highest log-likelihood.
  Prompt: "<context>" after k demonstrations "<context> <correct option>".
Demonstrations are separated by the tokenizer's end-of-document id (<eos>), as documents are in
training; a generated answer ends at <eos> or at the first of `STOP_STRINGS` in its text, so the
rule holds for any tokenizer.

JSONL schema (one example per line; extra fields ignored):
- nlg: {"question": str, "answers": [str, ...]}; also "answer" as a string, and the TriviaQA
  forms {"Question": str, "Answer": {"Value": str, "Aliases": [str, ...]}}.
- nlu: {"context": str, "options": [str, ...], "label": int (index of the right option)};
  "choices" and "answer" are accepted for "options" and "label".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glam.data.world import ANSWER, END, QUESTION, WORLD_TASKS, World


# A generated answer ends before the first of these (searched in " " + its text, so a question
# marker only counts as a word: "Iraq:" does not stop): the end of a demonstration's answer,
# a new line, the next question.
STOP_STRINGS = (" .", "\n", f" {QUESTION}")


@dataclass(frozen=True)
class Example:
    prompt: str  # question (nlg) or context (nlu)
    answers: tuple[str, ...] = ()  # nlg: gold answers
    options: tuple[str, ...] = ()  # nlu: candidate continuations
    label: int = -1  # nlu: index of the right option
    id: str = ""

    def demonstration(self, kind: str) -> str:
        if kind == "nlg":
            return f"{QUESTION} {self.prompt} {ANSWER} {self.answers[0]} ."
        return f"{self.prompt} {self.options[self.label]}"


@dataclass
class Task:
    name: str
    kind: str  # "nlg" | "nlu"
    examples: list[Example]  # evaluated
    train: list[Example] = field(default_factory=list)  # demonstrations come from here

    def prompt(self, index: int, shots: int, seed: int) -> str:
        """The k-shot prompt of example `index` as text, <eos> between its parts."""
        return f" {END} ".join(self.parts(index, shots, seed))

    def parts(self, index: int, shots: int, seed: int) -> list[str]:
        """The demonstrations and the query of the k-shot prompt of example `index`;
        demonstrations drawn with a fixed seed from the train split, never the evaluated example
        itself (nor a copy of it). Tokenized apart and joined with the <eos> id."""
        ex = self.examples[index]
        pool = [d for d in (self.train or self.examples) if d.prompt != ex.prompt]
        rng = np.random.default_rng([seed, index, shots])
        picks = rng.choice(len(pool), size=min(shots, len(pool)), replace=False) if shots else []
        demos = [pool[i].demonstration(self.kind) for i in picks]
        query = f"{QUESTION} {ex.prompt} {ANSWER}" if self.kind == "nlg" else ex.prompt
        return demos + [query]


def _nlg_example(row: dict, i: int) -> Example:
    question = row.get("question", row.get("Question"))
    answers = row.get("answers", row.get("answer", row.get("Answer")))
    if isinstance(answers, dict):  # TriviaQA: {"Value": ..., "Aliases": [...]}
        answers = [answers.get("Value", answers.get("value"))] + list(
            answers.get("Aliases", answers.get("aliases", [])))
    if isinstance(answers, str):
        answers = [answers]
    if not question or not answers:
        raise ValueError(f"line {i + 1}: an nlg example needs 'question' and 'answers'")
    return Example(prompt=str(question), answers=tuple(str(a) for a in answers if a),
                   id=str(row.get("id", i)))


def _nlu_example(row: dict, i: int) -> Example:
    options = row.get("options", row.get("choices"))
    label = row.get("label", row.get("answer"))
    if "context" not in row or not options or not isinstance(label, int):
        raise ValueError(f"line {i + 1}: an nlu example needs 'context', 'options' and an "
                         "integer 'label'")
    if not 0 <= label < len(options):
        raise ValueError(f"line {i + 1}: label {label} is not an index of its {len(options)} options")
    return Example(prompt=str(row["context"]), options=tuple(map(str, options)), label=label,
                   id=str(row.get("id", i)))


def read_jsonl(path: str | Path, kind: str) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval task file {path} does not exist (eval.tasks[].path)")
    parse = _nlg_example if kind == "nlg" else _nlu_example
    examples = []
    with path.open() as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    examples.append(parse(json.loads(line), i))
                except (json.JSONDecodeError, ValueError) as err:
                    raise ValueError(f"{path}: {err}") from err
    return examples


def world_tasks(world: World, max_examples: int, seed: int) -> list[Task]:
    """Built-in tasks over the synthetic world's facts.

    - `world_qa` (nlg, the TriviaQA analogue): questions about people whose facts appear only in
      biographies; demonstrations are QA lines of the QA-split people.
    - `world_qa_seen` (nlg): questions whose QA lines are in the training text (recall).
    - `world_facts` (nlu): complete "<person> was born in" with the right value among 4 of the
      same attribute (chance: 25%), for the biography-only people.
    """
    rng = np.random.default_rng([seed, 7])
    n_attr = len(world.attributes)

    def qa(people):
        return [Example(prompt=world.question(p, a), answers=(world.value(p, a),), id=f"{p}:{a}")
                for p in people for a in range(n_attr)]

    def facts(people):
        out = []
        for p in people:
            for a in range(n_attr):
                context = world.fact(p, a, 0).rsplit(" ", 2)[0]  # first template ends "{v} ."
                right = world.people[p].values[a]
                wrong = [v for v in rng.permutation(len(world.values[a])) if v != right][:3]
                order = rng.permutation([right, *wrong])
                out.append(Example(prompt=context,
                                   options=tuple(f"{world.values[a][v]} ." for v in order),
                                   label=int(np.flatnonzero(order == right)[0]), id=f"{p}:{a}"))
        return out

    def sample(examples):
        keep = rng.permutation(len(examples))[:max_examples]
        return [examples[i] for i in sorted(keep)]

    seen, held_out = world.qa_people, world.bio_only_people
    return [
        Task(WORLD_TASKS[0], "nlg", sample(qa(held_out)), train=qa(seen)),
        Task(WORLD_TASKS[1], "nlg", sample(qa(seen)), train=qa(seen)),
        Task(WORLD_TASKS[2], "nlu", sample(facts(held_out)), train=facts(seen)),
    ]
