"""A glam model in EleutherAI's lm-evaluation-harness: `GlamLM`, registered as model `glam`.

Importing this module registers the class. lm-eval 0.4 finds models only by registration, so
the `lm_eval` command does not see it; `python -m glam.eval.lm_harness` is that command with it
registered (`--model glam --model_args path=<run> --tasks ... --include_path ...`), as are
`glam-eval` and `lm_eval.simple_evaluate(model="glam", ...)` after this import. It loads an export (`glam.export.load`: an export folder, a run
directory or an MLflow run id) with the run's own tokenizer (world words or SentencePiece), and
routes every MoE layer as generation does (`glam.generate.inference_config`: each token alone,
dropless, no jitter).

- `loglikelihood` (via lm-eval's `TemplateLM`): each context + continuation truncated from the
  left to the model's window (`model.seq_len` tokens of input), batched with left padding (the
  relative position bias makes the result independent of it), float32 log-softmax.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `seq_len` tokens, the first
  predicted from <eos>.
- `generate_until`: greedy decoding with the KV cache (`glam.generate`), `max_gen_toks` capped
  at the window less one, the context truncated from the left so both fit the window, cut at
  <eos> and at the first `until` string.

Requires the `eval` extra (`pip install 'glam[eval]'`).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from glam.export import load
from glam.generate import generate, inference_config

log = logging.getLogger("glam.eval")


def _scores(model, tokens: jax.Array, mask: jax.Array):
    """Log-probabilities [B, T] float32 of tokens[:, 1:] given what precedes them, and whether
    each is the model's greedy choice [B, T]; position t scores token t + 1."""
    logits, _ = model(tokens[:, :-1], mask=mask[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = tokens[:, 1:]
    picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1) == target


@register_model("glam")
class GlamLM(TemplateLM):
    """lm-eval's model interface over a trained glam model.

    Args (lm-eval's `--model_args`, strings from the command line):
      path: export folder, run directory or MLflow run id (`runs:/<id>` or the bare id).
      batch_size: rows scored per compiled call (lm-eval's `--batch_size`; "auto": 16).
      tracking_uri: MLflow store of a run id (default: $MLFLOW_TRACKING_URI, else
        sqlite:///mlflow.db).

    Raises:
      FileNotFoundError / glam.export.ExportError: `path` holds no usable export.
    """

    def __init__(self, path: str, batch_size: int | str = 16, tracking_uri: str | None = None,
                 **_unused):
        super().__init__()
        loaded = load(path, tracking_uri, transform=inference_config)
        self.model, self.config, self.tok = loaded.model, loaded.config, loaded.tokenizer
        self.run_id, self.window = loaded.run_id, loaded.config.seq_len
        self.rows = int(batch_size) if str(batch_size).isdigit() else 16  # lm-eval's "auto"
        graphdef, self._state = nnx.split(self.model)
        self._score = jax.jit(lambda s, t, m: _scores(nnx.merge(graphdef, s), t, m))

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        return self.tok.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[(log p of each continuation, whether it is the greedy one)] in request order."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.window:
                raise ValueError(f"a continuation of {len(continuation)} tokens is longer than "
                                 f"the model's window ({self.window}); it cannot be scored")
            whole = (list(context) + list(continuation))[-(self.window + 1):]
            rows.append((whole, len(continuation)))
        out = []
        for lo in range(0, len(rows), self.rows):
            batch = rows[lo : lo + self.rows]
            width = self.window + 1
            tokens = np.full((self.rows, width), self.tok.pad_id, np.int32)
            mask = np.zeros((self.rows, width), bool)
            for i, (whole, _) in enumerate(batch):
                tokens[i, width - len(whole):], mask[i, width - len(whole):] = whole, True
            logp, greedy = jax.device_get(self._score(self._state, tokens, mask))
            for i, (_, n) in enumerate(batch):  # the continuation: the last n targets
                last = slice(self.window - n, self.window)  # empty for n = 0: log p 0, greedy
                out.append((float(logp[i, last].sum()), bool(greedy[i, last].all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, scored in disjoint windows of the model's
        length (perplexity tasks)."""
        pieces, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(self.tok_encode(text), self.eot_token_id,
                                                self.window, 1)
            for context, continuation in map(make_disjoint_window, windows):
                pieces.append((None, context, continuation))
                owners.append(i)
        totals = np.zeros(len(requests))
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(pieces)):
            totals[owner] += logp
        return totals.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut at <eos> (or padding) and at the first of its `until`
        strings. `max_gen_toks` is capped at the window less one token of context; sampling
        settings are ignored (greedy, as glam's harness). Prompts of one length decode together,
        `batch_size` at a time (a short batch filled with copies: one compiled shape)."""
        by_length: dict[tuple, list[int]] = defaultdict(list)
        prompts = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            new = min(int(kwargs.get("max_gen_toks", 16)), self.window - 1)
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                log.warning("generate_until decodes greedily; do_sample/temperature ignored")
            ids = self.tok_encode(context)[-(self.window - new):] or [self.eot_token_id]
            prompts.append(ids)
            by_length[(len(ids), new)].append(i)
        texts = [""] * len(requests)
        stops = (self.eot_token_id, self.tok.pad_id)
        for (length, new), members in by_length.items():
            for lo in range(0, len(members), self.rows):
                chunk = members[lo : lo + self.rows]
                batch = np.asarray([prompts[i] for i in chunk]
                                   + [prompts[chunk[0]]] * (self.rows - len(chunk)), np.int32)
                out = generate(self.model, batch, new, eos_id=self.eot_token_id)
                for i, ids in zip(chunk, out.tolist()):
                    answer = ids[length:]
                    end = next((j for j, t in enumerate(answer) if t in stops), len(answer))
                    # decoded after its prompt, so a piece that starts no word gets no space
                    text = self.tok_decode(prompts[i] + answer[:end])[
                        len(self.tok_decode(prompts[i])):]
                    until = requests[i].args[1].get("until") or []
                    for stop in [until] if isinstance(until, str) else until:
                        text = text.split(stop, 1)[0] if stop else text
                    texts[i] = text
        return texts

if __name__ == "__main__":  # lm-eval's own command line, with `glam` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
