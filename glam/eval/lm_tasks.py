"""The world's few-shot tasks as lm-evaluation-harness tasks: one YAML and two JSONL files each
(`glam-data lm-eval-tasks`), read from local files (`dataset_path: json`), no hub access.

The same examples as glam's own harness (`glam.eval.tasks.world_tasks`, same `eval.seed` and
`eval.max_examples`), in the same prompt format:

- `world_facts` (multiple choice): the context, then each option after one space; accuracy
  (`acc`). glam scores an option as its summed log-probability after the context, as lm-eval's
  `acc` does, so 0-shot accuracies agree exactly (tested).
- `world_qa`, `world_qa_seen` (generation): "q: <question> a:", greedy, cut at " ." or a new
  line; exact match after the leading space (`exact_match`, filter `strip`) normalised as glam
  normalises answers (case, punctuation, articles, whitespace).

Where the formats cannot agree: k-shot demonstrations. glam draws each example's own k from the
train split with its seed and separates them by the <eos> id; the YAML keeps the <eos>
separator (`fewshot_delimiter`) and the demonstrations' form, but lm-eval draws them with its
own sampler, so k > 0 scores are not the same prompts. Task names carry a `glam_` prefix, clear of lm-eval's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from glam.data.world import ANSWER, END, QUESTION, World
from glam.eval.tasks import STOP_STRINGS, Example, Task, world_tasks

PREFIX = "glam_"


def _rows(task: Task, examples: list[Example]) -> str:
    if task.kind == "nlu":
        rows = [{"id": e.id, "context": e.prompt, "options": list(e.options), "label": e.label}
                for e in examples]
    else:
        rows = [{"id": e.id, "question": e.prompt, "answers": list(e.answers)} for e in examples]
    return "".join(json.dumps(r) + "\n" for r in rows)


def task_config(task: Task, folder: Path) -> dict:
    """The lm-eval task config of `task`, its data in `folder` (`<name>.jsonl`, the evaluated
    examples; `<name>_train.jsonl`, the demonstrations)."""
    common = {
        "task": PREFIX + task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {
            "test": str((folder / f"{task.name}.jsonl").resolve()),
            "train": str((folder / f"{task.name}_train.jsonl").resolve())}},
        "test_split": "test",
        "fewshot_split": "train",
        "fewshot_delimiter": f" {END} ",
        "target_delimiter": " ",
    }
    if task.kind == "nlu":
        return {**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}",
                "doc_to_choice": "{{options}}", "doc_to_target": "{{label}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean",
                                 "higher_is_better": True}]}
    return {**common, "output_type": "generate_until",
            "doc_to_text": f"{QUESTION} {{{{question}}}} {ANSWER}",
            "doc_to_target": "{{answers[0]}}",
            "generation_kwargs": {"until": list(STOP_STRINGS), "do_sample": False},
            # the answer without the space that follows "a:"
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                         {"function": "take_first"}]}],
            # a demonstration's answer ends " ." as in glam's prompts
            "fewshot_config": {"doc_to_target": "{{answers[0]}} ."},
            # glam's answer normalisation (glam.eval.scoring): case, punctuation, articles,
            # whitespace
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True, "ignore_case": True,
                             "ignore_punctuation": True,
                             "regexes_to_ignore": [r"(?i)\b(a|an|the)\b", r"\s+"]}]}


def write(world: World, folder: Path, max_examples: int, seed: int,
          max_answer_tokens: int) -> list[Path]:
    """Write the world's tasks into `folder` (created): per task `<name>.yaml`, `<name>.jsonl`
    and `<name>_train.jsonl`; returns the YAML files. `max_answer_tokens` bounds generation."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in world_tasks(world, max_examples, seed):
        (folder / f"{task.name}.jsonl").write_text(_rows(task, task.examples))
        (folder / f"{task.name}_train.jsonl").write_text(_rows(task, task.train or task.examples))
        config = task_config(task, folder)
        if task.kind == "nlg":
            config["generation_kwargs"]["max_gen_toks"] = max_answer_tokens
        path = folder / f"{task.name}.yaml"
        path.write_text(f"# glam-data lm-eval-tasks: glam's {task.name} task for lm-eval\n"
                        + yaml.safe_dump(config, sort_keys=False))
        written.append(path)
    return written
