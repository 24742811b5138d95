"""Real text: source files, glam-data prepare, SentencePiece, the grain pipeline and its mixture."""

import bz2
import gzip
import json
import lzma
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from glam.config import ConfigError, DataConfig, Malformed, SourceConfig, TokenizerConfig
from glam.data.manifest import MANIFEST
from glam.data.prepare import prepare
from glam.data.sources import DataError, ReadStats, documents, expand
from glam.data.text import SOURCE_KEY, TextCorpus
from glam.data.tokenizer import (EOS, MAX_SENTENCE_BYTES, SENTENCE_CHARS, SentencePieceTokenizer,
                                 training_sentences)
from glam.data.trained import train_tokenizer
from glam.data.work import plan, sample_documents
from glam.model import GLaM
from glam.resolve import load, load_raw, model_config

_SYLLABLES = "ka ro vin del mar to zel qua bri sen lo dra mi fen gar tho ula pex".split()
WORDS = [a + b + c for a in _SYLLABLES for b in _SYLLABLES[::2] for c in ("", "s", "ing")]


def _docs(n, seed, words=WORDS):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, int(rng.integers(20, 80)))).capitalize() + "."
            for _ in range(n)]


def _jsonl(path: Path, docs, key="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "url": "x"}) + "\n")
    return path


def _tokenizer_file(prepared_dir) -> Path:
    manifest = json.loads((Path(prepared_dir) / MANIFEST).read_text())
    return Path(prepared_dir) / manifest["tokenizer"]["file"]


def _config(tmp_path, sources, **kw) -> DataConfig:
    d = DataConfig(kind="text", sources=[SourceConfig(**s) for s in sources],
                   prepared_dir=str(tmp_path / "prepared"),
                   tokenizer=TokenizerConfig(vocab_size=kw.pop("vocab", 400), sample_chars=200_000),
                   **kw)
    d.engine.workers = 1
    d.check()
    return d


def _two_sources(tmp_path, n=300):
    _jsonl(tmp_path / "a" / "part-0.jsonl", _docs(n, 0))
    _jsonl(tmp_path / "a" / "part-1.jsonl.gz", _docs(n, 1))
    _jsonl(tmp_path / "b" / "one.jsonl", _docs(n, 2))
    return [{"name": "a", "paths": [str(tmp_path / "a" / "*")], "weight": 0.3, "val_share": 0.1},
            {"name": "b", "paths": [str(tmp_path / "b" / "one.jsonl")], "weight": 0.7,
             "val_share": 0.1}]


# -- reading sources ---------------------------------------------------------------------------
def test_every_format_reads_its_documents(tmp_path):
    docs = _docs(5, 0)
    _jsonl(tmp_path / "x.jsonl", docs)
    _jsonl(tmp_path / "x.jsonl.gz", docs, key="body")
    pq.write_table(pa.table({"content": docs}), tmp_path / "x.parquet")
    (tmp_path / "x.txt").write_text("\n".join(docs) + "\n")
    for name, extra in (("x.jsonl", {}), ("x.jsonl.gz", {"text_field": "body"}),
                        ("x.parquet", {"text_field": "content"}),
                        ("x.txt", {"txt_unit": "line"})):
        source = SourceConfig(name="s", paths=[str(tmp_path / name)], **extra)
        got = [t for _, t, _ in documents(str(tmp_path / name), source, Malformed.stop, ReadStats())]
        assert got == docs, name
    whole = SourceConfig(name="s", paths=[str(tmp_path / "x.txt")])  # txt_unit=file
    got = list(documents(str(tmp_path / "x.txt"), whole, Malformed.stop, ReadStats()))
    assert got == [(1, "\n".join(docs) + "\n", None)]


def test_a_label_field_is_read_beside_the_text(tmp_path):
    """JSONL and parquet give each document its label_field value (as a string; None where a
    line lacks it); the text is what it would be without one."""
    docs = _docs(3, 0)
    rows = [{"text": docs[0], "kind": "clean"}, {"text": docs[1], "kind": 7}, {"text": docs[2]}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"text": docs, "kind": ["clean", "7", None]}), tmp_path / "l.parquet")
    for name in ("l.jsonl", "l.parquet"):
        source = SourceConfig(name="s", paths=[str(tmp_path / name)], label_field="kind")
        got = [(t, label) for _, t, label in
               documents(str(tmp_path / name), source, Malformed.stop, ReadStats())]
        assert got == [(docs[0], "clean"), (docs[1], "7"), (docs[2], None)], name


def test_globs_expand_sorted_and_bad_paths_are_named(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.parquet"):
        (tmp_path / name).write_text("")
    source = SourceConfig(name="s", paths=[str(tmp_path / "*.jsonl"), str(tmp_path / "c.parquet")])
    assert [Path(p).name for p in expand(source, "data.sources[0]")] == \
        ["a.jsonl", "b.jsonl", "c.parquet"]
    with pytest.raises(DataError, match=r"data.sources\[1\].paths\[0\]: the glob .* matches no"):
        expand(SourceConfig(name="s", paths=[str(tmp_path / "*.json")]), "data.sources[1]")
    with pytest.raises(DataError, match=r"data.sources\[0\].paths\[1\]: no file at"):
        expand(SourceConfig(name="s", paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "zz.jsonl")]),
               "data.sources[0]")
    (tmp_path / "d.csv").write_text("")
    with pytest.raises(DataError, match="d.csv: unsupported file type"):
        expand(SourceConfig(name="s", paths=[str(tmp_path / "d.csv")]), "data.sources[0]")


def _compress(name: str, data: bytes) -> bytes:
    """`data` compressed as the name's suffix says, in two members or frames (as parallel
    compressors write them), so a reader that stops after the first is caught."""
    half = len(data) // 2
    codec = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
             ".zst": lambda b: pa.Codec("zstd").compress(b, asbytes=True)}.get(
                 Path(name).suffix.lower())
    return codec(data[:half]) + codec(data[half:]) if codec else data


_SHIPPED = ["c4-train.00000-of-01024.json.gz", "x.json", "x.ndjson", "x.jsonl.bz2", "x.jsonl.xz",
            "x.jsonl.zst", "val.json.zst", "X.JSONL.GZ", "x.txt.gz", "x.txt.bz2", "x.txt.xz",
            "x.txt.zst"]


@pytest.mark.parametrize("name", _SHIPPED)
def test_corpora_read_in_the_forms_they_ship_in(tmp_path, name):
    """JSON lines under every common name and compression, and compressed text, read whole
    (every member or frame) by the reader and by the samplers of the workers."""
    docs = _docs(40, 0)
    txt = ".txt" in name
    data = "".join(d + "\n" if txt else json.dumps({"text": d, "meta": {"url": "x"}}) + "\n"
                   for d in docs).encode()
    (tmp_path / name).write_bytes(_compress(name, data))
    source = SourceConfig(name="s", paths=[str(tmp_path / "*")], **({"txt_unit": "line"} if txt else {}))
    [url] = expand(source, "data.sources[0]")
    assert [t for _, t, _ in documents(url, source, Malformed.stop, ReadStats())] == docs
    assert sorted(t for _, t in sample_documents(url, source, Malformed.stop, 0, "q", 1.0)) \
        == sorted(docs)
    whole = SourceConfig(name="s", paths=[url])
    if txt:  # a document per file
        assert [t for _, t, _ in documents(url, whole, Malformed.stop, ReadStats())] \
            == ["\n".join(docs) + "\n"]
    if Path(name).suffix.lower() in (".gz", ".bz2", ".xz", ".zst"):
        packed = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(packed[: len(packed) * 3 // 4])
        with pytest.raises(DataError, match=r":\d+: cannot read the file past this point"):
            list(documents(url, source, Malformed.skip, ReadStats()))


@pytest.mark.parametrize("name,content,message", [
    ("d.csv", b"text\nx\n", r"d.csv: unsupported file type; glam reads JSON lines .* Convert"),
    ("d.jsonl.lz4", b"", r"unsupported file type; .*\.gz, \.bz2, \.xz, \.zst"),
    ("shards.tar.gz", b"", r"shards.tar.gz: an archive of files; unpack it"),
    ("shards.zip", b"", r"an archive of files; unpack it"),
    ("p.parquet.zst", b"", r"compressed parquet file .* store it as .parquet"),
])
def test_forms_that_are_not_read_are_refused_with_the_fix(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        expand(SourceConfig(name="s", paths=[str(tmp_path / name)]), "data.sources[0]")


@pytest.mark.parametrize("content", [
    b'[\n  {"text": "one"},\n  {"text": "two"}\n]\n',
    b'[{"text": "one"}, {"text": "two"}]\n',
])
def test_a_json_array_is_refused_with_the_conversion(tmp_path, content):
    (tmp_path / "a.json").write_bytes(content)
    source = SourceConfig(name="s", paths=[str(tmp_path / "a.json")])
    for policy in Malformed:  # not a malformed line to skip: the whole file is of another form
        with pytest.raises(DataError, match=r"a.json: one JSON array, not JSON lines.*jq -c"):
            list(documents(str(tmp_path / "a.json"), source, policy, ReadStats()))


def test_compressed_files_prepare_on_the_workers_as_their_plain_copy(tmp_path):
    """The same documents as one .jsonl and as four files of four compressions give the same
    documents and tokens, the compressed files each their own identity and shards."""
    docs = _docs(240, 3)
    _jsonl(tmp_path / "plain" / "all.jsonl", docs)
    for i, name in enumerate(["c4-train.0.json.gz", "b.jsonl.bz2", "c.jsonl.xz", "d.jsonl.zst"]):
        part = "".join(json.dumps({"text": t}) + "\n" for t in docs[i::4]).encode()
        (tmp_path / "packed").mkdir(exist_ok=True)
        (tmp_path / "packed" / name).write_bytes(_compress(name, part))
    d = _config(tmp_path, [{"name": "plain", "paths": [str(tmp_path / "plain" / "*")],
                            "val_share": 0.2},
                           {"name": "packed", "paths": [str(tmp_path / "packed" / "*")],
                            "val_share": 0.2}])
    manifest = prepare(d, progress=False)
    plain, packed = manifest["sources"]["plain"], manifest["sources"]["packed"]
    assert len(packed["files"]) == 4 and all(int(f["size"]) > 0 for f in packed["files"])
    assert len({shard for split in packed["splits"].values() for shard in split["shards"]}) == 8
    for count in ("documents", "tokens"):  # the split is salted by the source's name
        assert sum(s[count] for s in packed["splits"].values()) \
            == sum(s[count] for s in plain["splits"].values()) > 0


@pytest.mark.parametrize("line,reason,message", [
    (b'{"text": "ok", \n', "invalid_json", "invalid JSON"),
    (b'["a list"]\n', "not_an_object", "a JSON list, not an object"),
    (b'{"body": "no text field"}\n', "missing_field", "no field 'text' .fields: body.; set the source's text_field"),
    (b'{"text": 42}\n', "not_a_string", "field 'text' holds 42, not a string"),
    (b'{"text": "caf\xe9"}\n', "not_utf8", "not UTF-8"),
])
def test_a_bad_line_stops_naming_file_and_line_or_is_counted(tmp_path, line, reason, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "first"}\n\n' + line + b'{"text": "last"}\n')
    source = SourceConfig(name="s", paths=[str(path)])
    with pytest.raises(DataError, match=rf"bad.jsonl:3: {message}.*data.malformed=skip"):
        list(documents(str(path), source, Malformed.stop, ReadStats()))
    stats = ReadStats()
    got = [t for _, t, _ in documents(str(path), source, Malformed.skip, stats)]
    assert got == ["first", "last"]
    assert stats.skipped == {reason: 1} and stats.first[reason].endswith("bad.jsonl:3")


def test_parquet_without_the_text_column_and_non_utf8_txt_are_named(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    source = SourceConfig(name="s", paths=[str(tmp_path / "p.parquet")])
    with pytest.raises(DataError, match="p.parquet: no column 'text' .*columns: body"):
        list(documents(str(tmp_path / "p.parquet"), source, Malformed.skip, ReadStats()))
    (tmp_path / "t.txt").write_bytes(b"line one\nline two \xff\n")
    source = SourceConfig(name="s", paths=[str(tmp_path / "t.txt")])
    with pytest.raises(DataError, match=r"t.txt:2: not UTF-8 \(byte 0xff"):
        list(documents(str(tmp_path / "t.txt"), source, Malformed.stop, ReadStats()))


@pytest.mark.parametrize("weights,message", [
    ((-0.1, 1.0), r"data.sources\[0\].weight: must be >= 0"),
    ((0.0, 0.0), "the mixture weights are all zero"),
])
def test_negative_or_all_zero_weights_are_refused(weights, message):
    sources = [f"{{name: s{i}, paths: [x.jsonl], weight: {w}}}" for i, w in enumerate(weights)]
    with pytest.raises(ConfigError, match=message):
        load_raw(["data=pydocs", f"data.sources=[{','.join(sources)}]"])


# -- the tokenizer -----------------------------------------------------------------------------
def test_sentencepiece_round_trips_any_text_and_knows_ordinary_words(pydocs):
    cfg = load(pydocs, backend="cpu")
    tok = TextCorpus(cfg.data, 33, 4).tokenizer
    assert tok.vocab_size == cfg.model.vocab_size == 512
    assert (tok.pad_id, tok.unk_id, tok.eos_id) == (0, 1, 2)
    for text in ["Return the value of the named attribute of object.",
                 "  indented\n\tcode(x) -> 'ünïcödé' ☃ 漢字 1234", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.unk_id not in ids  # byte fallback: no <unk> at all
    with pytest.raises(ValueError, match="ids"):
        import sentencepiece as spm
        import io
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(_docs(50, 0)), model_writer=out,
                                       vocab_size=60, minloglevel=2)
        SentencePieceTokenizer(out.getvalue())  # default ids: <unk> 0, <s> 1, </s> 2


class _Serial:
    """The engine's interface, run in this process."""

    def map(self, fn, jobs):
        for job in jobs:
            yield fn(*job)


def _sample(monkeypatch, d: DataConfig) -> tuple[list[str], dict]:
    """The sentences and options `train_tokenizer` would train SentencePiece on."""
    seen = {}

    def train(sentences, **kw):
        seen.update(sentences=list(sentences), **kw)

    monkeypatch.setattr(SentencePieceTokenizer, "train", train)
    train_tokenizer(d, plan(d), _Serial())
    return seen.pop("sentences"), seen


def _write_docs(path: Path, docs, meta_chars=0):
    lines = "".join(json.dumps({"text": t, "meta": "m" * meta_chars}) + "\n" for t in docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_compress(path.name, lines.encode()))


def _words(rng, n):
    return " ".join(rng.choice(WORDS, n))


@pytest.mark.parametrize("case", ["few_huge_lines", "smaller_than_one_document", "gzipped",
                                  "heavy_metadata", "no_spaces"])
def test_the_tokenizer_sample_is_measured_in_characters(tmp_path, monkeypatch, case):
    """However the text is laid out (a few documents of one long line each, a sample smaller
    than one document, compressed files, JSON fields beside a short text, a script without
    spaces) the sample holds about `sample_chars` characters of text, or all of it when the
    corpus holds less, in sentences SentencePiece keeps (none over its max_sentence_length)."""
    rng = np.random.default_rng(0)
    name, sample_chars, meta = "c.jsonl", 10**7, 0
    if case == "no_spaces":
        docs = ["".join(rng.choice(list("漢字かなカナ𝔘"), 30_000)) for _ in range(3)]
    elif case == "heavy_metadata":  # 2,000 short documents in 1 MB of JSON
        docs, sample_chars, meta = [_words(rng, 5) for _ in range(2000)], 20_000, 500
    else:
        docs = [_words(rng, 12_000) for _ in range(6)]  # ~70,000 characters each, one line
        if case == "smaller_than_one_document":
            sample_chars = 30_000
        elif case == "gzipped":
            name, sample_chars = "c.json.gz", 150_000  # gzip shrinks these words ~4x
    _write_docs(tmp_path / name, docs, meta)
    d = _config(tmp_path, [{"name": "s", "paths": [str(tmp_path / name)]}], vocab=300)
    d.tokenizer.sample_chars = sample_chars
    sentences, options = _sample(monkeypatch, d)
    chars, corpus = sum(map(len, sentences)), sum(map(len, docs))
    if sample_chars >= corpus:
        assert chars == corpus and options["whole_corpus"]
    else:
        assert sample_chars <= chars <= sample_chars + SENTENCE_CHARS
        assert not options["whole_corpus"]
    assert max(len(s.encode()) for s in sentences) <= MAX_SENTENCE_BYTES
    if case == "smaller_than_one_document":  # pieces drawn from several documents
        assert sum(any(s in doc for s in sentences) for doc in docs) >= 2


def test_a_line_repeated_across_documents_is_sampled_in_proportion(tmp_path, monkeypatch):
    """Boilerplate (the same line in every document) takes its share of the sample, neither all
    of its copies nor none."""
    rng = np.random.default_rng(0)
    boilerplate = "Subscribe to our newsletter for more stories like this one"
    docs = [f"{_words(rng, 30)}\n{boilerplate}" for _ in range(600)]
    _write_docs(tmp_path / "c.jsonl", docs)
    d = _config(tmp_path, [{"name": "s", "paths": [str(tmp_path / "c.jsonl")]}], vocab=300)
    d.tokenizer.sample_chars = sum(map(len, docs)) // 4
    sentences, _ = _sample(monkeypatch, d)
    assert 0.5 * 600 / 4 < sentences.count(boilerplate) < 2 * 600 / 4


def test_long_lines_are_cut_into_sentences_sentencepiece_keeps():
    """Every character of a line longer than SentencePiece's max_sentence_length reaches it, in
    pieces cut before spaces (a script without spaces anywhere)."""
    line = " ".join(["word"] * 50_000)
    pieces = training_sentences(f"short line\n\n   \n{line}")
    assert pieces[0] == "short line" and "".join(pieces[1:]) == line
    assert all(len(p) <= SENTENCE_CHARS and p.startswith(" word") for p in pieces[2:])
    dense = "漢𝔘" * 40_000
    pieces = training_sentences(dense)
    assert "".join(pieces) == dense
    assert max(len(p.encode()) for p in pieces) <= MAX_SENTENCE_BYTES


def test_a_sample_too_small_for_the_vocabulary_is_refused_naming_its_field():
    with pytest.raises(ConfigError, match=r"data.tokenizer.sample_chars: 100 characters cannot "
                                          r"train 400 pieces .*raise it .*vocab_size"):
        load_raw(["data=pydocs", "data.tokenizer.vocab_size=400", "data.tokenizer.sample_chars=100"])
    TokenizerConfig(path="given.model", sample_chars=100).check()  # nothing to train


def test_refusals_of_the_sample_name_the_field_that_fixes_them(tmp_path, monkeypatch):
    """A vocabulary the whole corpus cannot fill asks for more text (not a larger sample); a
    corpus without text names the sources."""
    rng = np.random.default_rng(0)
    _write_docs(tmp_path / "c.jsonl", [_words(rng, 3000) for _ in range(3)])
    d = _config(tmp_path, [{"name": "s", "paths": [str(tmp_path / "c.jsonl")]}], vocab=3000)
    with pytest.raises(ConfigError, match=r"vocab_size: SentencePiece cannot train 3000 pieces"
                                          r".*add text to data.sources") as err:
        train_tokenizer(d, plan(d), _Serial())
    assert "raise data.tokenizer.sample_chars" not in str(err.value)
    (tmp_path / "c.jsonl").write_text('{"text": "  "}\n\n')
    with pytest.raises(DataError, match=r"^data.sources: no text to train the tokenizer on"):
        train_tokenizer(d, plan(d), _Serial())


def test_the_vocabulary_comes_from_the_tokenizer_and_a_mismatch_is_refused(pydocs):
    prepared = Path([o for o in pydocs if o.startswith("data.prepared_dir=")][0].split("=", 1)[1])
    model = _tokenizer_file(prepared)
    given = load(["data=pydocs", f"data.tokenizer.path={model}"], backend="cpu")
    assert given.model.vocab_size == 512  # read from the model file, not the shards
    assert load(["data=pydocs"], backend="cpu").model.vocab_size == 4096  # the planned size
    with pytest.raises(ConfigError, match=r"model.vocab_size: 1000, but the tokenizer has 512"):
        load(["data=pydocs", f"data.tokenizer.path={model}", "model.vocab_size=1000"],
             backend="cpu")


# -- glam-data prepare ------------------------------------------------------------------------
def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted((folder / "shards").rglob("*"))}


def test_prepare_writes_a_manifest_and_a_rerun_does_nothing(tmp_path):
    d = _config(tmp_path, _two_sources(tmp_path))
    manifest = prepare(d, progress=False)
    out = Path(d.prepared_dir)
    assert json.loads((out / MANIFEST).read_text()) == manifest
    a, b = manifest["sources"]["a"], manifest["sources"]["b"]
    assert a["splits"]["train"]["documents"] + a["splits"]["val"]["documents"] == 600
    assert 0.05 < a["splits"]["val"]["documents"] / 600 < 0.15  # val_share 0.1
    assert len(a["files"]) == 2 and len(b["files"]) == 1
    tok = SentencePieceTokenizer(_tokenizer_file(out).read_bytes())
    assert {k: v for k, v in manifest["tokenizer"].items() if k != "settings"} == {
        "file": f"tokenizer-{tok.sha256[:16]}.model", "from": "trained", "sha256": tok.sha256,
        "vocab_size": 400}
    before, manifest_time = _mtimes(out), (out / MANIFEST).stat().st_mtime_ns
    assert prepare(d, progress=False) == manifest
    assert _mtimes(out) == before and (out / MANIFEST).stat().st_mtime_ns == manifest_time
    d.sources[1].val_share = 0.2  # a settings change makes a new fingerprint
    assert prepare(d, progress=False)["fingerprint"] != manifest["fingerprint"]


def test_the_same_files_in_another_folder_give_the_same_shard_order(tmp_path):
    """Shards are listed in the input files' order, not by a hash of their paths: the same
    corpus copied elsewhere trains on the same documents in the same order."""
    from array_record.python.array_record_module import ArrayRecordReader

    records = []
    for copy in ("first", "second/deeper"):
        for i in range(5):
            _jsonl(tmp_path / copy / "raw" / f"part-{i}.jsonl", _docs(20, i))
        d = _config(tmp_path / copy, [{"name": "s", "paths": [str(tmp_path / copy / "raw" / "*")],
                                       "val_share": 0.1}], vocab=300)
        manifest = prepare(d, progress=False)
        shards = manifest["sources"]["s"]["splits"]["train"]["shards"]
        read = []
        for shard in shards:
            reader = ArrayRecordReader(str(Path(d.prepared_dir) / shard))
            read += reader.read_all()
            reader.close()
        records.append(read)
    assert len(records[0]) > 80 and records[0] == records[1]


def test_a_failed_preparation_leaves_the_previous_data_whole(tmp_path):
    """New settings that fail halfway write new files beside the old ones: the old manifest and
    every shard it lists stay as they were, and training on them still works."""
    sources = _two_sources(tmp_path)
    d = _config(tmp_path, sources)
    before = prepare(d, progress=False)
    out = Path(d.prepared_dir)
    listed = {p: p.read_bytes() for source in before["sources"].values()
              for split in source["splits"].values() for p in (out / x for x in split["shards"])}
    (tmp_path / "b" / "one.jsonl").open("a").write("not json\n")
    d.tokenizer.path = str(_tokenizer_file(out))
    with pytest.raises(DataError, match="one.jsonl:301: invalid JSON"):
        prepare(d, progress=False)
    assert json.loads((out / MANIFEST).read_text()) == before
    assert all(p.read_bytes() == data for p, data in listed.items())
    d.tokenizer.path = None
    TextCorpus(d, 17, 4)  # the previous data, as prepared
    (tmp_path / "b" / "one.jsonl").write_text("".join(
        json.dumps({"text": t}) + "\n" for t in _docs(300, 2)))  # mended, other content
    after = prepare(d, progress=False)
    assert after["fingerprint"] != before["fingerprint"]
    assert not any(p.exists() for p in listed if "/b/" in str(p))  # replaced, now removed


def test_a_failed_prepare_keeps_finished_files_and_completes_when_run_again(tmp_path):
    sources = _two_sources(tmp_path)
    first = _config(tmp_path / "first", sources, vocab=400)
    prepare(first, progress=False)
    bad = tmp_path / "a" / "part-2.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    d = _config(tmp_path, sources, vocab=400)
    d.tokenizer.path = str(_tokenizer_file(first.prepared_dir))  # trained once, reused
    with pytest.raises(DataError, match=r"part-2.jsonl:2: invalid JSON"):
        prepare(d, progress=False)
    out = Path(d.prepared_dir)
    kept = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.done.json")}
    assert not (out / MANIFEST).exists() and len(kept) >= 1  # finished files stay
    assert not list((out / "shards").rglob("*.tmp*"))  # no half-written shard left as done
    bad.write_text('{"text": "fine"}\n{"text": "mended"}\n')
    manifest = prepare(d, progress=False)
    for p, t in kept.items():
        assert p.stat().st_mtime_ns == t, p  # not redone
    a = manifest["sources"]["a"]["splits"]
    assert a["train"]["documents"] + a["val"]["documents"] == 602
    assert manifest["tokenizer"]["from"] == d.tokenizer.path


def test_skipped_lines_are_counted_in_the_manifest(tmp_path):
    sources = _two_sources(tmp_path)
    (tmp_path / "b" / "one.jsonl").open("a").write('not json\n{"text": 3}\n')
    d = _config(tmp_path, sources, malformed="skip")
    manifest = prepare(d, progress=False)
    assert manifest["sources"]["b"]["skipped_lines"] == {"invalid_json": 1, "not_a_string": 1}


def test_prepare_refuses_a_tokenizer_of_another_vocabulary(tmp_path):
    d = _config(tmp_path, _two_sources(tmp_path, n=100), vocab=350)
    with pytest.raises(ConfigError, match="model.vocab_size: 64, but the tokenizer has 350"):
        prepare(d, model_vocab=64, progress=False)
    assert not list(Path(d.prepared_dir).glob("tokenizer*"))  # refused before training


# -- the grain pipeline ------------------------------------------------------------------------
def test_the_mixture_drawn_follows_the_weights(tmp_path):
    d = _config(tmp_path, _two_sources(tmp_path), vocab=400)
    prepare(d, progress=False)
    corpus = TextCorpus(d, 17, 4)
    it = iter(corpus.train_dataset(rows=8, seed=0))
    sources = np.concatenate([next(it)[SOURCE_KEY] for _ in range(250)])
    assert abs(np.mean(sources == 0) - 0.3) < 0.02 and abs(np.mean(sources == 1) - 0.7) < 0.02
    d.sources[0].weight = 0.0  # a source of weight 0 is never drawn
    it = iter(TextCorpus(d, 17, 4).train_dataset(rows=8, seed=0))
    assert all((next(it)[SOURCE_KEY] == 1).all() for _ in range(20))


def test_packing_concatenates_documents_with_eos_and_numbers_segments(tmp_path):
    d = _config(tmp_path, _two_sources(tmp_path, n=100), vocab=400)
    prepare(d, progress=False)
    corpus = TextCorpus(d, 513, 1)
    batch = next(iter(corpus.train_dataset(rows=4, seed=3)))
    tokens, segments = batch["tokens"], batch["tokens_segment_ids"]
    assert tokens.shape == segments.shape == (4, 513) and tokens.dtype == np.int32
    for row, seg in zip(tokens, segments):
        ends = np.flatnonzero(row == EOS)
        assert len(ends) >= 1  # documents are 20-80 words: several per window
        # a new segment starts right after each <eos>
        for e in ends[ends < 512]:
            assert seg[e + 1] == seg[e] + 1
        assert (np.diff(seg) >= 0).all() and seg[0] == 1


def test_processes_read_disjoint_documents(tmp_path):
    d = _config(tmp_path, _two_sources(tmp_path), vocab=400)
    prepare(d, progress=False)
    corpus = TextCorpus(d, 2049, 1)  # one window holds many documents
    seen = []
    for index in range(2):
        batch = next(iter(corpus.train_dataset(rows=1, seed=0, shard_index=index,
                                               shard_count=2)))
        row = batch["tokens"][0]
        docs = np.split(row, np.flatnonzero(row == EOS) + 1)[1:-1]  # whole documents only
        seen.append({tuple(x) for x in docs})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_segment_ids_keep_attention_within_documents():
    """A document packed after another gives the logits it has alone (relative positions only),
    with segment ids; without them, the first document leaks into it."""
    cfg = model_config(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    first = jax.random.randint(jax.random.key(0), (1, 6), 3, 50)
    second = jax.random.randint(jax.random.key(1), (1, 10), 3, 50)
    packed = jnp.concatenate([first, second], axis=1)
    segments = jnp.asarray([[1] * 6 + [2] * 10])
    alone, _ = model(second)
    with_ids, _ = model(packed, segment_ids=segments)
    without, _ = model(packed)
    np.testing.assert_allclose(with_ids[:, 6:], alone, atol=1e-5)
    assert np.abs(without[:, 6:] - alone).max() > 1e-3


# -- evaluation with either tokenizer; the output z-loss -----------------------------------------
def test_user_tasks_use_the_runs_sentencepiece_and_answers_stop_alike(pydocs):
    from glam.data.tokenizer import WordTokenizer
    from glam.eval.harness import Evaluator, answer_text
    from glam.eval.tasks import Example, Task

    cfg = load(pydocs, backend="cpu")
    sp = TextCorpus(cfg.data, 33, 4).tokenizer
    examples = [Example(prompt=f"What does the built-in function {f} return?", answers=(a,))
                for f, a in (("len", "the length"), ("abs", "the absolute value"),
                             ("repr", "a printable representation"))]
    task = Task("trivia", "nlg", examples)
    graphdef = nnx.graphdef(GLaM(cfg.model, rngs=nnx.Rngs(0)))
    ev = Evaluator(graphdef, sp, [task], seq_len=32, batch_size=4, shots=[1],
                   max_answer_tokens=4, length_normalize=False, seed=0)
    ids = ev._encode(task, 0, 1)
    assert sp.unk_id not in ids and ids.count(sp.eos_id) == 1  # demonstration <eos> query
    assert sp.decode(ids).startswith("q: What does the built-in function")
    for tok in (sp, WordTokenizer("paris is q: a: where .".split())):
        for generated in ("paris", "paris\nq: where", "paris q: where is", "paris . q:"):
            assert answer_text(tok, tok.encode(generated)) == "paris", (tok, generated)
        assert answer_text(tok, tok.encode("paris") + [tok.eos_id] + tok.encode("is")) == "paris"
    assert answer_text(sp, sp.encode("Iraq: Baghdad")) == "Iraq: Baghdad"  # not a question


def test_the_output_z_loss_is_added_with_its_weight():
    from glam.step import loss_fn

    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 50)
    losses = {}
    for weight in (0.0, 0.5):
        cfg = model_config(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=2,
                           d_ff=64, output_z_loss_weight=weight)
        model = GLaM(cfg, rngs=nnx.Rngs(0))
        total, (lm, output_z, _) = loss_fn(model, tokens, None, cfg)
        logits, _ = model(tokens[:, :-1])
        np.testing.assert_allclose(output_z, jnp.mean(jax.nn.logsumexp(logits, -1) ** 2),
                                   rtol=1e-6)
        losses[weight] = (float(total), float(lm), float(output_z))
    assert losses[0.0][0] == pytest.approx(losses[0.0][1])
    assert losses[0.5][0] == pytest.approx(losses[0.5][1] + 0.5 * losses[0.5][2], rel=1e-6)


def test_an_iterator_restored_from_any_checkpoint_reads_what_it_would_have(tmp_path, pydocs):
    """Also from the step-0 state, where no document is partly packed (a state JSON changes)."""
    from glam.checkpoint import Checkpointer
    from glam.config import CheckpointConfig

    cfg = load(pydocs, backend="cpu")
    corpus = TextCorpus(cfg.data, 33, 4)
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every=1, keep=5, async_save=False))
    straight = iter(corpus.train_dataset(rows=4, seed=0))
    for step in range(6):
        if step in (0, 3):
            ckpt.save(step, nnx.State({"w": jnp.zeros(2)}), {"step": step}, straight.get_state())
        next(straight)
    expected = [next(straight)["tokens"] for _ in range(3)]
    for step, skip in ((0, 6), (3, 3)):
        resumed = iter(corpus.train_dataset(rows=4, seed=0))
        ckpt.restore_data(step, resumed)
        for _ in range(skip):
            next(resumed)
        got = [next(resumed)["tokens"] for _ in range(3)]
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    ckpt.close()


# -- damaged input, stale state, shapes of the batch ----------------------------------------------
def test_damaged_files_and_odd_text_are_named_or_handled(tmp_path):
    docs = _docs(200, 0)
    full = _jsonl(tmp_path / "full.jsonl.gz", docs).read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    source = SourceConfig(name="s", paths=[str(tmp_path / "cut.jsonl.gz")])
    with pytest.raises(DataError, match=r"cut.jsonl.gz:\d+: cannot read the file past this point"):
        list(documents(str(tmp_path / "cut.jsonl.gz"), source, Malformed.skip, ReadStats()))
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(DataError, match="compressed parquet"):
        expand(SourceConfig(name="s", paths=[str(tmp_path / "x.parquet.gz")]), "data.sources[0]")
    (tmp_path / "crlf.txt").write_bytes(b"line one\r\nline two\r\n")
    crlf = SourceConfig(name="s", paths=[str(tmp_path / "crlf.txt")], txt_unit="line")
    assert [t for _, t, _ in documents(str(tmp_path / "crlf.txt"), crlf, Malformed.stop,
                                    ReadStats())] == ["line one", "line two"]
    (tmp_path / "odd.jsonl").write_text('{"text": "   "}\n{"text": "a \\ud83d b"}\n{"text": "ok"}\n')
    odd = SourceConfig(name="s", paths=[str(tmp_path / "odd.jsonl")])
    with pytest.raises(DataError, match=r"odd.jsonl:2: .*not valid Unicode"):
        list(documents(str(tmp_path / "odd.jsonl"), odd, Malformed.stop, ReadStats()))
    stats = ReadStats()  # whitespace-only text is no document; the surrogate is counted
    assert [t for _, t, _ in documents(str(tmp_path / "odd.jsonl"), odd, Malformed.skip, stats)] \
        == ["ok"] and stats.skipped == {"not_utf8": 1}


def test_a_given_tokenizer_does_not_leave_a_stale_trained_one(tmp_path):
    sources = _two_sources(tmp_path, n=150)
    other = _config(tmp_path / "other", sources, vocab=350)
    prepare(other, progress=False)
    d = _config(tmp_path, sources, vocab=400)
    trained = prepare(d, progress=False)["tokenizer"]
    d.tokenizer.path = str(_tokenizer_file(other.prepared_dir))
    assert prepare(d, progress=False)["tokenizer"]["vocab_size"] == 350
    d.tokenizer.path = None  # back to the first settings: train again, not the copy
    again = prepare(d, progress=False)["tokenizer"]
    assert again["vocab_size"] == 400 and again["sha256"] == trained["sha256"]


def test_training_refuses_a_prepared_tokenizer_of_another_size(pydocs):
    cfg = load(pydocs, backend="cpu")
    with pytest.raises(ConfigError, match="model.vocab_size: 300, but the prepared tokenizer"):
        TextCorpus(cfg.data, 33, 4, model_vocab=300)
    with pytest.raises(ConfigError, match="model.vocab_size: 300, but the tokenizer has 512"):
        load([*pydocs, "model.vocab_size=300"], backend="cpu")


def test_validation_windows_are_whole_and_the_same_every_time(pydocs):
    cfg = load(pydocs, backend="cpu")
    corpus = TextCorpus(cfg.data, 33, 4)
    tokens = corpus.manifest["sources"]["reference"]["splits"]["val"]["tokens"]
    batches = list(corpus.val_batches("reference", 10_000, 4))
    assert all(b["tokens_segment_ids"].min() > 0 for b in batches)  # no padded window
    assert len(batches) == tokens // 33 // 4
    again = list(corpus.val_batches("reference", 10_000, 4))
    assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(batches, again))


def test_a_source_with_fewer_documents_than_processes_is_refused(tmp_path):
    sources = _two_sources(tmp_path, n=150)
    (tmp_path / "book.txt").write_text(" ".join(_docs(300, 5)))
    sources.append({"name": "book", "paths": [str(tmp_path / "book.txt")], "weight": 0.1,
                    "val_share": 0.0})
    d = _config(tmp_path, sources)
    prepare(d, progress=False)
    corpus = TextCorpus(d, 17, 2)
    next(iter(corpus.train_dataset(rows=2, seed=0)))  # one process: fine
    with pytest.raises(ConfigError, match=r"data.sources\[2\]: 'book' has 1 training documents"):
        corpus.train_dataset(rows=2, seed=0, shard_index=1, shard_count=2)


def test_each_process_reads_the_row_block_its_devices_hold():
    from glam.data.feed import row_block

    class Rows:  # the part of a jax.sharding.Sharding that row_block reads
        def __init__(self, *blocks):
            self.blocks = blocks

        def addressable_devices_indices_map(self, shape):
            return {i: (slice(lo, hi), slice(None)) for i, (lo, hi) in enumerate(self.blocks)}

    assert row_block(Rows((None, None)), (8, 5)) == (0, 1)
    assert row_block(Rows((4, 6), (6, 8)), (8, 5)) == (1, 2)  # 2 devices, the second half
    assert row_block(Rows((2, 4), (2, 4)), (8, 5)) == (1, 4)  # replicated along a model axis
    with pytest.raises(ValueError, match="not one of equal blocks"):
        row_block(Rows((2, 5)), (8, 5))


def test_every_validation_share_zero_is_refused():
    with pytest.raises(ConfigError, match="every val_share is 0"):
        load_raw(["data=pydocs", "data.sources.0.val_share=0", "data.sources.1.val_share=0"])


def test_prepare_runs_on_a_cluster_given_its_address(tmp_path):
    """The same preparation on a running Dask scheduler (`data.engine.address`) as locally."""
    from dask.distributed import LocalCluster

    sources = _two_sources(tmp_path, n=100)
    local = _config(tmp_path / "local", sources)
    expected = prepare(local, progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster:
        remote = _config(tmp_path / "remote", sources)
        remote.engine.address = cluster.scheduler_address
        manifest = prepare(remote, progress=False)
    assert manifest["fingerprint"] == expected["fingerprint"]
    assert manifest["sources"] == expected["sources"]


def test_an_unreachable_cluster_is_refused_before_any_work(tmp_path, free_port, monkeypatch):
    monkeypatch.setattr("glam.data.engine.CONNECT_TIMEOUT", "2s")
    d = _config(tmp_path, _two_sources(tmp_path, n=20))
    d.engine.address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="data.engine.address: no Dask scheduler answers"):
        prepare(d, progress=False)
    assert not list(Path(d.prepared_dir).glob("tokenizer*"))
