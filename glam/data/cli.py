"""`glam-data prepare`: prepare a text corpus (Hydra app on glam's config tree).

    glam-data prepare data=pydocs                    # the Python docs, no download
    glam-data prepare data=my_corpus                 # conf/data/my_corpus.yaml: your sources
    glam-data prepare data=pydocs data.engine.address=tcp://scheduler:8786

Takes the same overrides as glam-train, so `glam-data prepare X && glam-train X` trains on what
was prepared. Bad input exits with status 2 and a message naming the file and line.
"""

from __future__ import annotations

import logging
import signal
import sys

import hydra
from omegaconf import DictConfig

from glam.config import ConfigError
from glam.data.sources import DataError
from glam.interrupts import SIGNALS, Interrupted
from glam.resolve import CONF_DIR, raw

log = logging.getLogger("glam.data")
COMMANDS = ("prepare",)
USAGE = """usage: glam-data prepare [HYDRA OVERRIDES ...]

Reads the text sources of the data config (data=pydocs, data=glam_mixture, ...), trains or
loads its SentencePiece tokenizer, writes token shards and a manifest under data.prepared_dir.
Re-running with the same inputs and settings does nothing; an interrupted run completes when run
again. Runs on local Dask worker processes, or on the cluster at data.engine.address."""


def _stop(signum, frame) -> None:
    raise Interrupted(signum)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _prepare(dcfg: DictConfig) -> None:
    from glam.data.prepare import prepare

    try:
        cfg = raw(dcfg)
        for signum in SIGNALS:  # preparation is safe to stop anywhere: every file is atomic
            signal.signal(signum, _stop)
        manifest = prepare(cfg.data, cfg.model.vocab_size)
    except (ConfigError, DataError) as err:
        print(f"glam-data: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as stop:
        log.warning("%s; finished files are kept: run the same command again to complete the "
                    "preparation", stop)
        raise SystemExit(stop.exit_code) from None
    for name, source in manifest["sources"].items():
        for split, s in source["splits"].items():
            log.info("%s/%s: %d documents, %d tokens", name, split, s["documents"], s["tokens"])
        if source["skipped_lines"]:
            log.warning("%s: skipped lines %s", name, source["skipped_lines"])
    log.info("prepared %s (fingerprint %s, %d-piece tokenizer)", cfg.data.prepared_dir,
             manifest["fingerprint"], manifest["tokenizer"]["vocab_size"])


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0)
    if not args or args[0] not in COMMANDS:
        unknown = f"glam-data: unknown command {args[0]!r}\n" if args else ""
        print(unknown + USAGE, file=sys.stderr)
        raise SystemExit(2)
    # No Hydra output folder for a preparation: its outputs live in data.prepared_dir.
    sys.argv = [sys.argv[0], *args[1:], "hydra.output_subdir=null", "hydra.run.dir=.",
                "hydra/job_logging=none", "hydra/hydra_logging=none"]
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("glam").setLevel(logging.INFO)
    _prepare()


if __name__ == "__main__":
    main()
