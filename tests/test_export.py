"""Exports that are damaged, of another version, or whose parts disagree: `glam.export.load`
names the file and what is wrong, and glam-generate exits 2 without a traceback."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from glam import export
from glam.data.tokenizer import SentencePieceTokenizer, WordTokenizer
from glam.cli.generate import main as generate_main
from glam.model import GLaM
from glam.resolve import load


def _save(folder, cfg, tokenizer):
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return export.save(folder, params, cfg, tokenizer)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A word-vocabulary export of tiny_dense (509 words + 3 specials = its 512 rows)."""
    cfg = load(["model=tiny_dense", "model.vocab_size=512"], "cpu").model
    return _save(tmp_path_factory.mktemp("export") / "model", cfg,
                 WordTokenizer([f"w{i}" for i in range(509)]))


@pytest.fixture
def folder(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "model")


def _refused(source, capsys, *flags) -> str:
    """glam-generate's stderr on `source`, after checking it exited 2 without a traceback."""
    with pytest.raises(SystemExit) as exit_:
        generate_main([str(source), "--prompt", "w1 w2", *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err


def _edit_config(folder, change):
    saved = json.loads((folder / "config.json").read_text())
    change(saved)
    (folder / "config.json").write_text(json.dumps(saved))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "truncated config": ("config.json", "not valid JSON",
                         lambda f: _truncate(f / "config.json")),
    "config not an object": ("config.json", "not a glam export config",
                             lambda f: (f / "config.json").write_text("[1, 2]")),
    "key of another version": ("config.json", "unknown keys model.rotary_base",
                               lambda f: _edit_config(f, lambda c: c["model"].update(
                                   rotary_base=10000))),
    "nested key of another version": ("config.json", "model.router.expert_choice",
                                      lambda f: _edit_config(f, lambda c: c["model"]["router"]
                                                             .update(expert_choice=True))),
    "value of the wrong type": ("config.json", "d_model",
                                lambda f: _edit_config(f, lambda c: c["model"].update(
                                    d_model="wide"))),
    "value the config refuses": ("config.json", "model.n_heads",
                                 lambda f: _edit_config(f, lambda c: c["model"].update(
                                     n_heads=0))),
    "truncated parameters": ("model.safetensors", "truncated or damaged",
                             lambda f: _truncate(f / "model.safetensors")),
    "garbage parameters": ("model.safetensors", "truncated or damaged",
                           lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64)),
    "missing parameters": ("model.safetensors", "missing",
                           lambda f: (f / "model.safetensors").unlink()),
    "shapes of another config": ("model.safetensors", "does not fit",
                                 lambda f: _edit_config(f, lambda c: c["model"].update(
                                     d_ff=96))),
    "integer parameters": ("model.safetensors", "dtype int32", lambda f: save_file(
        {k: v.astype(np.int32) for k, v in load_file(str(f / "model.safetensors")).items()},
        str(f / "model.safetensors"))),
    "vocabulary longer than the embedding": ("vocab.json", "603 token ids", lambda f: (
        f / "vocab.json").write_text(json.dumps([f"w{i}" for i in range(600)]))),
    "truncated vocabulary": ("vocab.json", "not valid JSON",
                             lambda f: _truncate(f / "vocab.json")),
    "vocabulary not of words": ("vocab.json", "not a list of words",
                                lambda f: (f / "vocab.json").write_text('{"w1": 3}')),
    "missing vocabulary": ("vocab.json", "missing", lambda f: (f / "vocab.json").unlink()),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_or_foreign_export_is_refused_naming_the_file(folder, case, capsys):
    name, reason, damage = DAMAGE[case]
    damage(folder)
    with pytest.raises((export.ExportError, FileNotFoundError)) as err:
        export.load(folder)
    assert str(folder / name) in str(err.value) and reason in str(err.value), err.value
    said = _refused(folder, capsys)
    assert str(folder / name) in said and reason in said


def test_a_sentencepiece_model_must_match_the_embedding(tmp_path, capsys):
    """More pieces than embedding rows (ids would be clamped), or fewer (not the tokenizer the
    model trained with), are refused with both sizes; a damaged model file is named."""
    words = ["alpha", "beta", "gamma", "delta", "model", "expert", "token", "layer"]
    rng = np.random.default_rng(0)
    sp = SentencePieceTokenizer.train(iter(" ".join(rng.choice(words, 8)) for _ in range(400)),
                                      vocab_size=24, model_type="unigram", byte_fallback=False,
                                      character_coverage=1.0, seed=0)
    dense = load(["model=tiny_dense"], "cpu").model
    for rows in (16, 32):
        folder = _save(tmp_path / str(rows), dataclasses.replace(dense, vocab_size=rows), sp)
        said = _refused(folder, capsys)
        assert f"{folder / 'tokenizer.model'}: 24 token ids" in said
        assert f"model.vocab_size={rows}" in said
    folder = tmp_path / "16"
    (folder / "tokenizer.model").write_bytes(b"not a model")
    assert f"{folder / 'tokenizer.model'}: not a usable SentencePiece model" in _refused(
        folder, capsys)


def test_glam_generate_refuses_sampling_and_lengths_it_cannot_honour(pristine, capsys):
    for flags, named in ((["--temperature", "nan"], "--temperature"),
                         (["--temperature", "-1"], "--temperature"),
                         (["--top-p", "0"], "--top-p"), (["--top-k", "-2"], "--top-k"),
                         (["--max-new-tokens", "-1"], "--max-new-tokens"),
                         (["--max-new-tokens", "9000"], "--max-length"),
                         (["--max-new-tokens", "8", "--max-length", "6"], "--max-length")):
        assert named in _refused(pristine, capsys, *flags), flags
