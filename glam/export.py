"""A trained model as files anyone can load: parameters as safetensors, the model config as
JSON, and the tokenizer, in one folder (`<run dir>/model/`, also the MLflow artifact `model/`).

    model.safetensors   every parameter, float32, named by its path ("blocks.0.attn.wq")
    config.json         {"model": resolved ModelConfig, "tokenizer": "word" | "sentencepiece",
                         "glam_version", "run_id", "trained": {"steps", "tokens",
                         "train_flops"} (what training spent: activated training FLOPs)}
    vocab.json          the world's word vocabulary (word tokenizer), or
    tokenizer.model     the SentencePiece model

`load(source)` reads it back from a folder, a run directory or an MLflow run id
(`runs:/<id>` or the bare id) in one call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from glam.config import ModelConfig
from glam.data.tokenizer import SentencePieceTokenizer, Tokenizer, WordTokenizer
from glam.model import GLaM, WEIGHTS
from glam.tracking import flatten

FOLDER = "model"


class ExportError(ValueError):
    """A file of an export folder is damaged, of another glam version, or does not fit the
    others; the message names the file and what is wrong."""


def _nested(flat: dict[str, np.ndarray], like: dict) -> dict:
    """`flat` arranged as the pure dict `like` (whose integer keys nnx.List uses)."""
    out = {}
    for key, value in like.items():
        if isinstance(value, dict):
            out[key] = _nested({k[len(f"{key}."):]: v for k, v in flat.items()
                                if k.startswith(f"{key}.")}, value)
        else:
            out[key] = flat.get(str(key))
    return out


def _check_params(flat: dict[str, np.ndarray], state, folder: Path) -> None:
    """Every parameter the config's model has is in the file, floating point, with its shape,
    and no other.

    Raises:
      ExportError: names the missing, extra, misshapen or non-float parameters.
    """
    want = {k: tuple(v.shape) for k, v in flatten(nnx.to_pure_dict(state)).items()}
    have = {k: tuple(v.shape) for k, v in flat.items()}
    problems = ([f"missing {k}" for k in want if k not in have]
                + [f"unexpected {k}" for k in have if k not in want]
                + [f"{k}: file {have[k]}, config {want[k]}" for k in want
                   if k in have and have[k] != want[k]]
                + [f"{k}: dtype {v.dtype}" for k, v in flat.items()
                   if not np.issubdtype(v.dtype, np.floating)])
    if problems:
        raise ExportError(f"{folder / 'model.safetensors'} does not fit "
                          f"{folder / 'config.json'}: " + "; ".join(problems[:5])
                          + ("" if len(problems) <= 5 else f"; {len(problems) - 5} more"))


def save(folder: Path, params: dict, model: ModelConfig, tokenizer: Tokenizer,
         run_id: str | None = None, trained: dict | None = None) -> Path:
    """Write the export of `params` (nnx.to_pure_dict of the model's `glam.model.WEIGHTS`:
    parameters and router biases, arrays fetched to the host) into `folder`; returns it.
    `trained`: what training spent ({"steps", "tokens", "train_flops"}), read back by sparse
    upcycling (`glam.upcycle`) to count the dense run's FLOPs.

    Raises:
      TypeError: a tokenizer of another kind than the word or SentencePiece one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: np.asarray(value, np.float32) for name, value in flatten(params).items()},
              str(folder / "model.safetensors"))
    if isinstance(tokenizer, WordTokenizer):
        kind = "word"
        (folder / "vocab.json").write_text(json.dumps(tokenizer.vocab[3:]))
    elif isinstance(tokenizer, SentencePieceTokenizer):
        kind = "sentencepiece"
        (folder / "tokenizer.model").write_bytes(tokenizer.model_bytes)
    else:
        raise TypeError(f"cannot export a {type(tokenizer).__name__}")
    config = {"model": OmegaConf.to_container(OmegaConf.structured(model), enum_to_str=True),
              "tokenizer": kind, "glam_version": metadata.version("glam"), "run_id": run_id,
              "trained": trained}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


@dataclass
class Loaded:
    """An exported model: `model` (GLaM, float32 parameters), its `config`, its `tokenizer`."""

    model: GLaM
    config: ModelConfig
    tokenizer: Tokenizer
    run_id: str | None


def resolve_source(source: str | Path, tracking_uri: str | None = None) -> Path:
    """The export folder of `source`: a folder holding config.json, a run directory (its
    `model/`), or an MLflow run (`runs:/<id>` or a 32-hex id), downloaded from `tracking_uri`
    ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).

    Raises:
      FileNotFoundError: nothing exported there (names what was looked for).
    """
    path = Path(source)
    for candidate in (path, path / FOLDER):
        if (candidate / "config.json").is_file():
            return candidate
    run_id = str(source).removeprefix("runs:/").strip("/")
    if str(source).startswith("runs:/") or (len(run_id) == 32 and run_id.isalnum()):
        import mlflow

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
        target = Path(tempfile.mkdtemp(prefix="glam-model-"))  # kept: the caller reads it
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=FOLDER,
                                                dst_path=str(target), tracking_uri=uri)
        except Exception as err:
            raise FileNotFoundError(f"MLflow run {run_id} has no {FOLDER}/ artifact at {uri} "
                                    f"({str(err).splitlines()[0]})") from None
        return target / FOLDER
    raise FileNotFoundError(f"no exported model at {source}: give a run directory (its "
                            f"{FOLDER}/ is written when training ends), an export folder, or an "
                            "MLflow run id")


def _require(path: Path) -> None:
    """Raise FileNotFoundError naming `path` unless it is a file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the export folder; export the run again")


def _read_json(path: Path):
    """The JSON value in `path`.

    Raises:
      FileNotFoundError: `path` does not exist.
      ExportError: it is not valid JSON (truncated or damaged).
    """
    _require(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err}); the file is truncated or damaged, "
                          "export the run again") from None


def _foreign_keys(saved: dict, schema: type, prefix: str) -> tuple[list[str], list[str]]:
    """(keys of `saved` that dataclass `schema` lacks, fields of `schema` that `saved` lacks),
    as dotted paths, nested sections included."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = [f"{prefix}{k}" for k in saved if k not in fields]
    missing = [f"{prefix}{k}" for k in fields if k not in saved]
    for name, value in saved.items():
        section = getattr(fields.get(name), "default_factory", None)
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            more = _foreign_keys(value, section, f"{prefix}{name}.")
            unknown, missing = unknown + more[0], missing + more[1]
    return unknown, missing


def read_config(path: Path) -> tuple[ModelConfig, str, str | None]:
    """The checked ModelConfig, tokenizer kind and run id of an export's config.json.

    Raises:
      FileNotFoundError, ExportError: see `_read_json`; a config of another glam version
        (unknown keys, named), or a value ModelConfig refuses.
    """
    saved = _read_json(path)
    kind = saved.get("tokenizer") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict) \
            or kind not in ("word", "sentencepiece"):
        raise ExportError(f"{path}: not a glam export config (needs a \"model\" object and "
                          "\"tokenizer\": \"word\" or \"sentencepiece\")")
    unknown, missing = _foreign_keys(saved["model"], ModelConfig, "model.")
    version = saved.get("glam_version", "unknown")
    if unknown:
        raise ExportError(f"{path}: written by another glam version ({version}; this is "
                          f"{metadata.version('glam')}): unknown keys {', '.join(unknown)}; "
                          "load it with the glam version that wrote it")
    if missing:  # an export older than these fields: they take their defaults
        warnings.warn(f"{path}: no {', '.join(missing)} (glam {version}); using the defaults",
                      stacklevel=3)
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                     saved["model"]))
        config.check("model")
        if config.vocab_size is None:
            raise ExportError("model.vocab_size: null; an export records the embedding's rows")
    except (OmegaConfBaseException, ValueError) as err:
        key = getattr(err, "full_key", None)  # OmegaConf's errors name the key apart
        raise ExportError(f"{path}: {f'model.{key}: ' if key else ''}"
                          f"{str(err).splitlines()[0]}") from None
    return config, kind, saved.get("run_id")


def _read_params(path: Path) -> dict[str, np.ndarray]:
    """Every array in the safetensors file `path`.

    Raises:
      FileNotFoundError: `path` does not exist.
      ExportError: it is truncated or damaged (safetensors' reason).
    """
    _require(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({err}); the file is "
                          "truncated or damaged, export the run again") from None


def _read_tokenizer(folder: Path, kind: str, config: ModelConfig) -> Tokenizer:
    """The export's tokenizer, checked against the embedding: a word vocabulary may be smaller
    than model.vocab_size (the world's rule), a SentencePiece model must match it exactly.

    Raises:
      FileNotFoundError: the tokenizer file is missing.
      ExportError: it is damaged, or its vocabulary does not fit the embedding (both sizes named).
    """
    if kind == "word":
        path = folder / "vocab.json"
        words = _read_json(path)
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ExportError(f"{path}: not a list of words")
        try:
            tokenizer = WordTokenizer(words)
        except ValueError as err:
            raise ExportError(f"{path}: {err}") from None
        fits = tokenizer.vocab_size <= config.vocab_size
    else:
        path = folder / "tokenizer.model"
        _require(path)
        try:
            tokenizer = SentencePieceTokenizer(path.read_bytes())
        except (RuntimeError, ValueError) as err:
            raise ExportError(f"{path}: not a usable SentencePiece model "
                              f"({str(err).splitlines()[0]})") from None
        fits = tokenizer.vocab_size == config.vocab_size
    if not fits:
        raise ExportError(f"{path}: {tokenizer.vocab_size} token ids (specials included), but "
                          f"the embedding in {folder / 'config.json'} has model.vocab_size="
                          f"{config.vocab_size} rows; the tokenizer is not the one this model "
                          "was trained with")
    return tokenizer


def load(source: str | Path, tracking_uri: str | None = None,
         transform: Callable[[ModelConfig], ModelConfig] | None = None) -> Loaded:
    """Load an exported model (`resolve_source`); `transform` changes the model config before
    the model is built (`glam.generate.inference_config` for generation).

    Raises:
      FileNotFoundError: see `resolve_source`; a file of the folder is missing (named).
      ExportError (a ValueError): a file is truncated or damaged, from another glam version
        (its unknown config keys named), or does not fit the others (parameter names and
        shapes, or the tokenizer's and the embedding's sizes); the message names the file.
    """
    folder = resolve_source(source, tracking_uri)
    config, kind, run_id = read_config(folder / "config.json")
    tokenizer = _read_tokenizer(folder, kind, config)
    config = transform(config) if transform else config
    model = nnx.eval_shape(lambda: GLaM(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, WEIGHTS)
    flat = _read_params(folder / "model.safetensors")
    _check_params(flat, state, folder)
    values = _nested(flat, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, values))
    nnx.update(model, state)
    return Loaded(model, config, tokenizer, run_id)
