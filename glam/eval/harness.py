"""Run few-shot tasks against a model: greedy generation (nlg) and rank classification (nlu).

Every batch has the fixed shape [eval.batch_size, model.seq_len]: prompts are left-padded and
the padding masked out of attention, so each of the two jitted functions compiles once.
Prompts longer than the window lose their oldest tokens (demonstrations first).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glam.data.tokenizer import Tokenizer
from glam.distributed import fetch
from glam.eval.scoring import exact_match, token_f1
from glam.eval.tasks import STOP_STRINGS, Task

log = logging.getLogger("glam.eval")


@dataclass
class EvalResult:
    metrics: dict[str, float]  # "eval/<task>/<k>shot[_f1]" and group averages, 0-100
    predictions: list[dict]


def greedy_decode(next_token, tokens: jax.Array, mask: jax.Array, new_tokens: int,
                  stop_ids: tuple[int, ...]) -> jax.Array:
    """Greedy continuation of left-padded prompts in a fixed window, stopping early.

    Args:
      next_token: (tokens [B, T] int32, mask [B, T] bool) -> [B] int32, the argmax at the last
        position.
      tokens, mask: the prompts, left-padded; the window slides left one token per step.
      new_tokens: the most tokens to generate.
      stop_ids: ids that end an answer (eos, pad).

    Returns: [B, new_tokens] int32; a row holds its tokens up to and including its first stop
    id, then stop_ids[0]. Every row is computed exactly as without early stopping (finished
    rows keep generating, so rows that share MoE routing groups see the same batch); the loop
    ends once every row has emitted a stop id, where the rest could not change any answer.
    """
    b = tokens.shape[0]
    stops = jnp.asarray(stop_ids, tokens.dtype)

    def unfinished(carry):
        step, _, _, _, done = carry
        return (step < new_tokens) & ~jnp.all(done)

    def step_fn(carry):
        step, tokens, mask, out, done = carry
        nxt = next_token(tokens, mask).astype(tokens.dtype)
        out = out.at[:, step].set(jnp.where(done, stops[0], nxt))
        done = done | jnp.isin(nxt, stops)
        tokens = jnp.concatenate([tokens[:, 1:], nxt[:, None]], axis=1)
        mask = jnp.concatenate([mask[:, 1:], jnp.ones_like(mask[:, :1])], axis=1)
        return step + 1, tokens, mask, out, done

    out = jnp.full((b, new_tokens), stops[0], tokens.dtype)
    carry = (jnp.int32(0), tokens, mask, out, jnp.zeros((b,), bool))
    return jax.lax.while_loop(unfinished, step_fn, carry)[3]


def make_generate(graphdef: nnx.GraphDef, new_tokens: int, stop_ids: tuple[int, ...]):
    """(state, tokens [B, T], mask [B, T]) -> greedy continuation [B, new_tokens]
    (`greedy_decode`: stops once every row has emitted one of `stop_ids`)."""

    def generate(state, tokens, mask):
        model = nnx.merge(graphdef, state)

        def next_token(tokens, mask):
            logits, _ = model(tokens, mask=mask)
            return jnp.argmax(logits[:, -1], axis=-1)

        return greedy_decode(next_token, tokens, mask, new_tokens, stop_ids)

    return jax.jit(generate)


def make_score(graphdef: nnx.GraphDef):
    """(state, tokens [B, T], mask [B, T], target [B, T]) -> (sum of log p of the target
    tokens, their count) per row; `target[t]` marks tokens[t] as scored."""

    def score(state, tokens, mask, target):
        model = nnx.merge(graphdef, state)
        logits, _ = model(tokens, mask=mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        hit = target[:, 1:]
        return jnp.sum(picked * hit, axis=1), jnp.sum(hit, axis=1)

    return jax.jit(score)


def _left_pad(rows: list[list[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        row = row[-length:]
        tokens[i, length - len(row):] = row
        mask[i, length - len(row):] = True
    return tokens, mask


def answer_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """A generated answer: the text before <eos> (or padding), cut at the first stop string."""
    cut = next((i for i, t in enumerate(ids) if t in (tokenizer.eos_id, tokenizer.pad_id)),
               len(ids))
    text = " " + tokenizer.decode(ids[:cut])
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text.strip()


class Evaluator:
    def __init__(self, graphdef: nnx.GraphDef, tokenizer: Tokenizer, tasks: list[Task], *,
                 seq_len: int, batch_size: int, shots: list[int], max_answer_tokens: int,
                 length_normalize: bool, seed: int):
        self.tokenizer, self.tasks = tokenizer, [t for t in tasks if t.examples]
        self.seq_len, self.batch_size, self.shots = seq_len, batch_size, shots
        self.max_answer_tokens, self.length_normalize, self.seed = (max_answer_tokens,
                                                                    length_normalize, seed)
        # An answer ends at <eos> or padding (`answer_text`): generation stops there.
        self.generate = make_generate(graphdef, max_answer_tokens,
                                      (tokenizer.eos_id, tokenizer.pad_id))
        self.score = make_score(graphdef)

    def _encode(self, task: Task, index: int, shots: int) -> list[int]:
        ids: list[int] = []
        for part in task.parts(index, shots, self.seed):
            ids += (ids and [self.tokenizer.eos_id]) + self.tokenizer.encode(part)
        return ids

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def _pad_batch(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Fill a short last batch with copies of its first row: one compiled shape."""
        missing = self.batch_size - len(arrays[0])
        return [np.concatenate([a, np.repeat(a[:1], missing, axis=0)]) for a in arrays]

    def _nlg(self, state, task: Task, shots: int):
        prompts = [self._encode(task, i, shots) for i in range(len(task.examples))]
        pad = self.tokenizer.pad_id
        window = self.seq_len - self.max_answer_tokens
        outputs: list[list[int]] = []
        for lo, hi in self._batches(len(prompts)):
            tokens, mask = self._pad_batch(list(_left_pad(prompts[lo:hi], window, pad)))
            tokens = np.concatenate([np.full((len(tokens), self.max_answer_tokens), pad, np.int32),
                                     tokens], axis=1)
            mask = np.concatenate([np.zeros((len(mask), self.max_answer_tokens), bool), mask], 1)
            out = fetch(self.generate(state, tokens, mask))[: hi - lo]
            outputs += out.tolist()
        em, f1, preds = [], [], []
        for ex, out in zip(task.examples, outputs):
            text = answer_text(self.tokenizer, out)
            em.append(exact_match(text, list(ex.answers)))
            f1.append(token_f1(text, list(ex.answers)))
            preds.append({"id": ex.id, "prediction": text, "gold": list(ex.answers),
                          "correct": bool(em[-1])})
        return {"": 100 * np.mean(em), "_f1": 100 * np.mean(f1)}, preds

    def _nlu(self, state, task: Task, shots: int):
        rows, targets, owners = [], [], []
        for i, ex in enumerate(task.examples):
            context = self._encode(task, i, shots)
            for option in ex.options:
                opt = self.tokenizer.encode(option)
                rows.append(context + opt)
                targets.append(len(opt))
                owners.append(i)
        totals, counts = [], []
        for lo, hi in self._batches(len(rows)):
            tokens, mask = _left_pad(rows[lo:hi], self.seq_len, self.tokenizer.pad_id)
            target = np.zeros_like(mask)
            for j, n in enumerate(targets[lo:hi]):
                target[j, self.seq_len - n:] = True
            tokens, mask, target = self._pad_batch([tokens, mask, target])
            total, count = fetch(self.score(state, tokens, mask, target))
            totals += total[: hi - lo].tolist()
            counts += count[: hi - lo].tolist()
        scores = np.asarray(totals) / (np.asarray(counts) if self.length_normalize else 1.0)
        correct, preds, k = [], [], 0
        for i, ex in enumerate(task.examples):
            choice = int(np.argmax(scores[k : k + len(ex.options)]))
            k += len(ex.options)
            correct.append(choice == ex.label)
            preds.append({"id": ex.id, "prediction": ex.options[choice],
                          "gold": ex.options[ex.label], "correct": bool(correct[-1])})
        return {"": 100 * np.mean(correct)}, preds

    def __call__(self, state) -> EvalResult:
        """Score every task at every shot count; `state` is the model's nnx state."""
        metrics: dict[str, float] = {}
        predictions: list[dict] = []
        done, total = 0, len(self.shots) * len(self.tasks)
        for shots in self.shots:
            groups: dict[str, list[float]] = {}
            for task in self.tasks:
                run = self._nlg if task.kind == "nlg" else self._nlu
                start = time.perf_counter()
                scores, preds = run(state, task, shots)
                done += 1
                log.info("eval %d/%d: %s %d-shot, %d examples: %.1f (%.1f s)", done, total,
                         task.name, shots, len(task.examples), scores[""],
                         time.perf_counter() - start)
                for suffix, value in scores.items():
                    metrics[f"eval/{task.name}/{shots}shot{suffix}"] = float(value)
                groups.setdefault(task.kind, []).append(float(scores[""]))
                predictions += [{"task": task.name, "shots": shots, **p} for p in preds]
            for kind, values in groups.items():
                metrics[f"eval/{kind}_avg/{shots}shot"] = float(np.mean(values))
        return EvalResult(metrics, predictions)
