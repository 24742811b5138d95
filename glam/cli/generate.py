"""`glam-generate`: continue prompts with a trained glam model (`glam.generate`, imported with
JAX once the arguments are read)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    """`glam-generate SOURCE --prompt TEXT ...`: continue prompts with a trained model."""
    parser = argparse.ArgumentParser(
        prog="glam-generate", description="Continue text with a trained glam model (KV cache; "
        "greedy by default).", epilog="example: glam-generate outputs/runs/<run> --prompt "
        "'q : where does ada live ? a :' --max-new-tokens 4")
    parser.add_argument("source", help="a run directory, an export folder (model/), or an "
                                       "MLflow run id (runs:/<id>)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no limit")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int,
                        help="most tokens a prompt plus its continuation may come to (the cache "
                             "grows linearly with it; default glam.generate.MAX_LENGTH)")
    parser.add_argument("--tracking-uri", help="MLflow store of a run id (default "
                                               "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    args = parser.parse_args(argv)
    import numpy as np

    from glam.export import load  # JAX and the model: after --help
    from glam.generate import MAX_LENGTH, generate, inference_config

    max_length = MAX_LENGTH if args.max_length is None else args.max_length
    try:
        loaded = load(args.source, args.tracking_uri, transform=inference_config)
        model = loaded.model
        for text in args.prompt:
            ids = loaded.tokenizer.encode(text)
            if not ids:
                raise ValueError(f"--prompt {text!r} encodes to no tokens")
            out = generate(model, np.asarray([ids]), args.max_new_tokens, seed=args.seed,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           eos_id=loaded.tokenizer.eos_id, max_length=max_length)[0]
            new = [int(t) for t in out[len(ids):]]
            if loaded.tokenizer.eos_id in new:
                new = new[: new.index(loaded.tokenizer.eos_id)]
            print(f"{text} >>> {loaded.tokenizer.decode(new)}")
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"glam-generate: {err}", file=sys.stderr)
        raise SystemExit(2) from None



if __name__ == "__main__":
    main()
