"""A trained model as files anyone can load: parameters as safetensors, the model config as
JSON, and the tokenizer, in one folder (`<run dir>/model/`, also the MLflow artifact `model/`).

    model.safetensors   every parameter, float32, named by its path ("blocks.0.attn.wq")
    config.json         {"model": resolved ModelConfig, "tokenizer": "word" | "sentencepiece",
                         "glam_version", "run_id"}
    vocab.json          the world's word vocabulary (word tokenizer), or
    tokenizer.model     the SentencePiece model

`load(source)` reads it back from a folder, a run directory or an MLflow run id
(`runs:/<id>` or the bare id) in one call.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf
from safetensors.numpy import load_file, save_file

from glam.config import ModelConfig
from glam.data.tokenizer import SentencePieceTokenizer, Tokenizer, WordTokenizer
from glam.model import GLaM
from glam.tracking import flatten

FOLDER = "model"


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


def _check_params(flat: dict[str, np.ndarray], state) -> None:
    """Every parameter the config's model has is in the file with its shape, and no other.

    Raises:
      ValueError: names the missing, extra or misshapen parameters.
    """
    want = {k: tuple(v.shape) for k, v in flatten(nnx.to_pure_dict(state)).items()}
    have = {k: tuple(v.shape) for k, v in flat.items()}
    problems = ([f"missing {k}" for k in want if k not in have]
                + [f"unexpected {k}" for k in have if k not in want]
                + [f"{k}: file {have[k]}, config {want[k]}" for k in want
                   if k in have and have[k] != want[k]])
    if problems:
        raise ValueError("model.safetensors does not fit config.json: " + "; ".join(problems[:5])
                         + ("" if len(problems) <= 5 else f"; {len(problems) - 5} more"))


def save(folder: Path, params: dict, model: ModelConfig, tokenizer: Tokenizer,
         run_id: str | None = None) -> Path:
    """Write the export of `params` (nnx.to_pure_dict of the model's nnx.Param state, arrays
    fetched to the host) into `folder`; returns it.

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
              "tokenizer": kind, "glam_version": metadata.version("glam"), "run_id": run_id}
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


def load(source: str | Path, tracking_uri: str | None = None,
         transform: Callable[[ModelConfig], ModelConfig] | None = None) -> Loaded:
    """Load an exported model (`resolve_source`); `transform` changes the model config before
    the model is built (`glam.generate.inference_config` for generation).

    Raises:
      FileNotFoundError: see `resolve_source`.
      ValueError: the parameter file does not fit the config (names the parameters).
    """
    folder = resolve_source(source, tracking_uri)
    saved = json.loads((folder / "config.json").read_text())
    schema = OmegaConf.structured(ModelConfig)
    config = OmegaConf.to_object(OmegaConf.merge(schema, saved["model"]))
    config = transform(config) if transform else config
    model = nnx.eval_shape(lambda: GLaM(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    flat = load_file(str(folder / "model.safetensors"))
    _check_params(flat, state)
    values = _nested(flat, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, values))
    nnx.update(model, state)
    tokenizer = (WordTokenizer(json.loads((folder / "vocab.json").read_text()))
                 if saved["tokenizer"] == "word"
                 else SentencePieceTokenizer((folder / "tokenizer.model").read_bytes()))
    return Loaded(model, config, tokenizer, saved.get("run_id"))
