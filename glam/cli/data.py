"""`glam-data prepare`: prepare a text corpus (on glam's config tree).

    glam-data prepare data=pydocs                    # the Python docs, no download
    glam-data prepare data=my_corpus                 # conf/data/my_corpus.yaml: your sources
    glam-data prepare data=pydocs data.engine.address=tcp://scheduler:8786
    glam-data prepare +study=data_quality            # every distinct corpus a study trains on

Takes the same overrides as glam-train (sweeps and a study's axes included), so
`glam-data prepare X && glam-train X` (or `glam-train -m X`) trains on what was prepared. Bad
input exits with status 2 and a message naming the file and line, or the config field.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from glam.config import Config, ConfigError, DataKind, check
from glam.data.sources import DataError
from glam.interrupts import SIGNALS, Interrupted

log = logging.getLogger("glam.data")
COMMANDS = ("prepare", "lm-eval-tasks")
USAGE = """usage: glam-data prepare [HYDRA OVERRIDES ...]
       glam-data lm-eval-tasks --out DIR [HYDRA OVERRIDES ...]

Reads the text sources of the data config (data=pydocs, data=glam_mixture, ...), trains or
loads its SentencePiece tokenizer (and the quality classifier when data.quality.selection is
not none), writes token shards and a manifest under data.prepared_dir. With a sweep or a study
(+study=data_quality), prepares every distinct data config its points use, one after another.
Re-running with the same inputs and settings does nothing; an interrupted run completes when run
again. Runs on local Dask worker processes, or on the cluster at data.engine.address.

lm-eval-tasks writes the world's few-shot tasks (the data config's world, eval.seed,
eval.max_examples) as lm-evaluation-harness tasks into DIR: a YAML and two JSONL files each, for
glam-eval --include_path DIR (glam.eval.lm_tasks)."""


def _stop(signum, frame) -> None:
    raise Interrupted(signum)


def _points(overrides: list[str]):
    """The raw config of every point `overrides` select (Hydra's own settings left out)."""
    from glam.resolve import load_raw
    from glam.study.points import expand

    overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    for point in expand(overrides) or [overrides]:
        yield load_raw(point)


def run_tokens(overrides: list[str]) -> dict[str, list[int]]:
    """{data.prepared_dir: the distinct counts of tokens the points that train on it read}
    (steps x token_multiple x batch x (seq_len + 1): each window reads its next-token targets
    too; points sized by a FLOP budget are left out)."""
    lengths: dict[str, set[int]] = {}
    for cfg in _points(overrides):
        t = cfg.train
        if cfg.data.kind == DataKind.text and t.flops_budget is None:
            lengths.setdefault(cfg.data.prepared_dir, set()).add(
                round(t.steps * t.token_multiple) * t.batch_size * (cfg.model.seq_len + 1))
    return {k: sorted(v) for k, v in lengths.items()}


def record_epochs(cfg: Config, manifest: dict, lengths: list[int]) -> None:
    """Write into the manifest, and log, the epochs of each source's training split that each
    run length of these points reads (`glam.data.text.source_epochs`)."""
    from glam.data.manifest import MANIFEST
    from glam.data.shards import write_atomic
    from glam.data.text import source_epochs

    new = {str(n): source_epochs(manifest, cfg.data.sources, n) for n in lengths}
    manifest["epochs"] = {**manifest.get("epochs", {}), **new}  # other sweeps' lengths kept
    for n, epochs in new.items():
        log.info("%s tokens read by training: %s", f"{int(n):,}",
                 ", ".join(f"{k} {v:.2f} epochs" for k, v in epochs.items()))
    write_atomic(Path(cfg.data.prepared_dir) / MANIFEST, json.dumps(manifest, indent=1).encode())


def corpora(overrides: list[str]) -> list[Config]:
    """One raw config per distinct data section among the points `overrides` select (a single
    point without sweeps), in the order of the points. Hydra's own settings (`hydra.*`,
    `hydra/<group>=`: a launcher's) are left out: they decide how runs launch, not their data.

    Raises:
      ConfigError: a point's config is invalid (field named), or two points with different
        data would share one `data.prepared_dir` (each preparation would replace the other's).
        Hydra's and OmegaConf's errors for overrides they cannot parse or compose.
    """
    seen: dict[str, Config] = {}
    folders: dict[str, dict] = {}
    for cfg in _points(overrides):
        data = asdict(cfg.data)
        seen.setdefault(json.dumps(data, sort_keys=True, default=str), cfg)
        if cfg.data.kind == DataKind.text:
            first = folders.setdefault(cfg.data.prepared_dir, data)
            check(first == data, "data.prepared_dir", f"{cfg.data.prepared_dir!r} would hold two "
                  "different corpora of these runs (their data settings differ); give each its "
                  "own folder.")
    return list(seen.values())


def _report(cfg: Config, manifest: dict) -> None:
    for name, source in manifest["sources"].items():
        for split, s in source["splits"].items():
            log.info("%s/%s: %d documents, %d tokens", name, split, s["documents"], s["tokens"])
        if source["skipped_lines"]:
            log.warning("%s: skipped lines %s", name, source["skipped_lines"])
        quality = source.get("quality")
        if quality:
            log.info("%s: quality filter kept %d of %d documents (%.1f%%)", name,
                     quality["kept"], quality["kept"] + quality["dropped"],
                     100 * quality["kept_fraction"])
            labels = quality.get("labels", {})
            for label, c in labels.get("by_label", {}).items():
                log.info("  %-16s %6d documents, mean score %.2f, kept %.1f%%", label,
                         c["documents"], c["mean_score"], 100 * c["kept_fraction"])
            if "selection" in labels:
                sel, clf = labels["selection"], labels["classifier"]
                log.info("  %r pages: %.0f%% of the kept (%.0f%% of all), %.1f%% of them kept; "
                         "classifier at 0.5: precision %.2f, recall %.2f, ROC AUC %.2f",
                         labels["good_label"], 100 * sel["precision"], 100 * sel["base_rate"],
                         100 * sel["recall"], clf["precision"], clf["recall"],
                         clf["roc_auc_binned"])
    log.info("prepared %s (fingerprint %s, %d-piece tokenizer)", cfg.data.prepared_dir,
             manifest["fingerprint"], manifest["tokenizer"]["vocab_size"])


def prepare_all(overrides: list[str]) -> None:
    """Prepare every distinct corpus of `overrides` (`corpora`)."""
    from glam.data.prepare import prepare

    configs = [c for c in corpora(overrides) if c.data.kind == DataKind.text]
    if not configs:
        log.info("nothing to prepare: these runs train on the generated world (data.kind=world)")
        return
    for signum in SIGNALS:  # preparation is safe to stop anywhere: every file is atomic
        signal.signal(signum, _stop)
    lengths = run_tokens(overrides)
    for i, cfg in enumerate(configs):
        if len(configs) > 1:
            log.info("corpus %d of %d: %s", i + 1, len(configs), cfg.data.prepared_dir)
        manifest = prepare(cfg.data, cfg.model.vocab_size)
        _report(cfg, manifest)
        record_epochs(cfg, manifest, lengths.get(cfg.data.prepared_dir, []))


def lm_eval_tasks(args: list[str]) -> None:
    """`glam-data lm-eval-tasks --out DIR OVERRIDES`: the world's tasks for lm-eval.

    Raises:
      ConfigError: no --out, or a data config that is not the world (`data.kind`).
    """
    if "--out" not in args or args.index("--out") + 1 >= len(args):
        raise ConfigError("--out: give the folder the task files go into (--out DIR)")
    at = args.index("--out")
    out, overrides = Path(args[at + 1]), args[:at] + args[at + 2:]
    from glam.data.world import World
    from glam.eval.lm_tasks import write
    from glam.resolve import load_raw

    cfg = load_raw(overrides)
    if cfg.data.kind != DataKind.world:
        raise ConfigError(f"data.kind: {cfg.data.kind}; the lm-eval tasks are the generated "
                          "world's (data=world or another world config)")
    for path in write(World(cfg.data), out, cfg.eval.max_examples, cfg.eval.seed,
                      cfg.eval.max_answer_tokens):
        print(path)


def main() -> None:
    args = sys.argv[1:]
    if args and (args[0] in ("-h", "--help") or args[0] in COMMANDS
                 and any(a in ("-h", "--help") for a in args[1:])):
        print(USAGE)
        raise SystemExit(0)
    if not args or args[0] not in COMMANDS:
        unknown = f"glam-data: unknown command {args[0]!r}\n" if args else ""
        print(unknown + USAGE, file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("glam").setLevel(logging.INFO)
    try:
        if args[0] == "lm-eval-tasks":
            lm_eval_tasks(args[1:])
        else:
            prepare_all(args[1:])
    except (ConfigError, DataError, HydraException, OmegaConfBaseException) as err:
        print(f"glam-data: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as stop:
        log.warning("%s; finished files are kept: run the same command again to complete the "
                    "preparation", stop)
        raise SystemExit(stop.exit_code) from None


if __name__ == "__main__":
    main()
