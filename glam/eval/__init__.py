"""Evaluation: few-shot tasks (`tasks`), scoring (`scoring`), and the runner (`harness`)."""

from glam.eval.harness import EvalResult, Evaluator
from glam.eval.tasks import Example, Task, read_jsonl, world_tasks

__all__ = ["EvalResult", "Evaluator", "Example", "Task", "read_jsonl", "world_tasks"]
