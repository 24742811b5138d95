"""Reading a text source's files: globs to files, files to documents, bad input to errors that
name the file and line.

Formats, by file name: JSON lines (`.jsonl`, `.json`, `.ndjson`: one JSON object per line, the
text under `text_field`), `.parquet` (the `text_field` column), `.txt` (the whole file, or each
line, is a document); JSON lines and text compressed with a further `.gz`, `.bz2`, `.xz` or
`.zst` (`c4-train.00000-of-01024.json.gz`, `00.jsonl.zst`). Paths are local or fsspec URLs
(`gs://`, `s3://`, ... when that filesystem's package is installed).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from glam.config import Malformed, SourceConfig, TextUnit

# File name ending -> how it is read.
FORMATS = {".jsonl": ".jsonl", ".json": ".jsonl", ".ndjson": ".jsonl", ".parquet": ".parquet",
           ".txt": ".txt"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_ARCHIVES = (".tar", ".tgz", ".zip", ".7z")
_GLOB_CHARS = set("*?[")
SUPPORTED = ("JSON lines (.jsonl, .json, .ndjson), .parquet or .txt; JSON lines and .txt also "
             "compressed (.gz, .bz2, .xz, .zst)")


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and the fix."""


def compression(path: str) -> str | None:
    """The file's compression by its name (`.gz`, `.bz2`, `.xz`, `.zst`), or None."""
    return next((c for c in COMPRESSIONS if path.lower().endswith(c)), None)


def file_format(path: str) -> str:
    """How the file is read, from its name: `.jsonl` (JSON lines: `.jsonl`, `.json`,
    `.ndjson`), `.parquet` or `.txt`, a compression suffix aside.

    Raises:
      DataError: another extension, an archive, or a compressed parquet file; the message names
        the forms that are read and how to convert.
    """
    packed = compression(path)
    name = (path[: -len(packed)] if packed else path).lower()
    if packed and name.endswith(".parquet"):
        raise DataError(f"{path}: a compressed parquet file cannot be read in place; parquet "
                        "compresses its own pages, so store it as .parquet.")
    for ext, kind in FORMATS.items():
        if name.endswith(ext):
            return kind
    if name.endswith(_ARCHIVES) or path.lower().endswith(_ARCHIVES):
        raise DataError(f"{path}: an archive of files; unpack it and give its files (or a glob "
                        f"of them): glam reads {SUPPORTED}.")
    raise DataError(f"{path}: unsupported file type; glam reads {SUPPORTED}. Convert other "
                    'forms to JSON lines (one {"text": ...} object a line), or narrow the glob.')


@contextlib.contextmanager
def open_text_file(url: str) -> Iterator[io.BufferedIOBase]:
    """The file's bytes, decompressed by its name's compression suffix (gzip and bzip2 files of
    several members, zstd of several frames read whole).

    Raises (while reading):
      EOFError, OSError, zlib.error, lzma.LZMAError: a truncated or damaged file.
    """
    packed = compression(url)
    with fsspec.open(url, "rb") as raw:
        if packed == ".gz":
            f = gzip.GzipFile(fileobj=raw)
        elif packed == ".bz2":
            f = bz2.BZ2File(raw)
        elif packed == ".xz":
            f = lzma.LZMAFile(raw)
        elif packed == ".zst":
            import pyarrow as pa

            # Arrow's zstd stream reads every frame and raises on a truncated one.
            f = io.BufferedReader(pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd"),
                                  1 << 16)
        else:
            yield raw
            return
        with f:
            yield f


def expand(source: SourceConfig, prefix: str) -> list[str]:
    """The files of `source`, sorted, as URLs fsspec can open (local paths stay paths).

    Raises:
      DataError: a path that does not exist, a glob that matches nothing, an unsupported type;
        named with its config field (`prefix.paths[i]`).
    """
    files: list[str] = []
    for i, pattern in enumerate(source.paths):
        where = f"{prefix}.paths[{i}]"
        try:
            fs, path = fsspec.core.url_to_fs(pattern)
        except (ImportError, ValueError) as err:
            raise DataError(f"{where}: cannot open {pattern!r} ({err}); install the filesystem "
                            "package for its URL scheme (gcsfs for gs://, s3fs for s3://).") from err
        if _GLOB_CHARS & set(pattern):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not found:
                raise DataError(f"{where}: the glob {pattern!r} matches no file; check the path "
                                "(relative paths start at the working directory).")
        else:
            if not fs.isfile(path):
                raise DataError(f"{where}: no file at {pattern!r}; check the path (relative "
                                "paths start at the working directory).")
            found = [path]
        for p in found:
            url = fs.unstrip_protocol(p) if "://" in pattern else p
            file_format(url)
            files.append(url)
    return sorted(dict.fromkeys(files))


def file_identity(url: str) -> dict:
    """What identifies a file's contents without reading it: path, size and modification time
    (or the store's checksum / ETag when it gives one)."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    keys = ("size", "mtime", "LastModified", "updated", "ETag", "etag", "md5Hash", "crc32c")
    return {"path": url, **{k: str(info[k]) for k in keys if k in info}}


@dataclass
class ReadStats:
    """What reading a file skipped, by reason (`Malformed.skip`) and where the first was."""

    skipped: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first.setdefault(reason, where)


def _bad(policy: Malformed, stats: ReadStats, reason: str, where: str, message: str) -> None:
    if policy == Malformed.stop:
        raise DataError(f"{where}: {message} (data.malformed=skip counts and skips such lines)")
    stats.skip(reason, where)


def _decode(raw: bytes, policy, stats, where: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        _bad(policy, stats, "not_utf8", where,
             f"not UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); re-encode the file "
             "as UTF-8")
        return None


def documents(url: str, source: SourceConfig, policy: Malformed,
              stats: ReadStats) -> Iterator[tuple[int, str, str | None]]:
    """(line or row number from 1, text, label) of every document of one file that holds more
    than whitespace, streamed; the label is the `label_field` value as a string (None when the
    source has no label field or the document lacks it).

    Raises:
      DataError: with `policy=stop`, the first malformed line (invalid JSON, not an object,
        missing or non-string `text_field`, not UTF-8), naming file and line; with either policy,
        a parquet file without the `text_field` column, a `.json` file holding one JSON array
        rather than JSON lines, or a file that cannot be read to its end (truncated or damaged
        compression, a damaged parquet page), naming file and line. With `policy=skip`
        malformed lines are counted in `stats` instead.
    """
    import pyarrow as pa
    import zlib

    kind = file_format(url)
    position = [0]  # the line or row being read, for an error in the middle of the file
    try:
        with open_text_file(url) as f:
            if kind == ".parquet":
                yield from _parquet(f, url, source, policy, stats, position)
            elif kind == ".txt" and source.txt_unit == TextUnit.file:
                text = _txt_file(f.read(), url, policy, stats)
                if text and text.strip():
                    yield 1, text, None
            else:
                yield from _lines(f, url, kind, source, policy, stats, position)
    except (EOFError, OSError, zlib.error, lzma.LZMAError, pa.ArrowException) as err:
        where = f"row {position[0] + 1}" if kind == ".parquet" else position[0] + 1
        raise DataError(f"{url}:{where}: cannot read the file past this point "
                        f"({type(err).__name__}: {err}); it is truncated or damaged.") from err


def _lines(f, url: str, kind: str, source: SourceConfig, policy, stats,
           position: list) -> Iterator[tuple[int, str, str | None]]:
    seen_text = False
    for n, raw in enumerate(f, start=1):
        position[0] = n - 1
        where = f"{url}:{n}"
        line = _decode(raw, policy, stats, where)
        if line is None or not line.strip():
            continue
        if kind == ".txt":
            yield n, line.rstrip("\r\n"), None
            continue
        if not seen_text:
            _refuse_json_array(line, url)
            seen_text = True
        row = _json_row(line, source.text_field, policy, stats, where)
        if row is not None and row[source.text_field].strip():
            label = row.get(source.label_field) if source.label_field else None
            yield n, row[source.text_field], None if label is None else str(label)


def _refuse_json_array(first_line: str, url: str) -> None:
    """Raise DataError when the first line opens one JSON array (`[` alone, or a list of
    objects): the file is JSON, not JSON lines."""
    line = first_line.strip()
    if not line.startswith("["):
        return
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        value = None  # an array over many lines
    if value is None or (value and all(isinstance(v, dict) for v in value)):
        raise DataError(f"{url}: one JSON array, not JSON lines (one object a line); convert "
                        f"it, e.g. `jq -c '.[]' {url} > out.jsonl`.")


def _txt_file(raw: bytes, url: str, policy, stats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return _decode(raw, policy, stats, f"{url}:{line}")


def _json_row(line: str, key: str, policy, stats, where: str) -> dict | None:
    """The JSON object of one line whose `key` holds valid text, else None (counted or raised
    by `policy`)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        _bad(policy, stats, "invalid_json", where, f"invalid JSON ({err.msg}, column {err.colno})")
        return None
    if not isinstance(row, dict):
        _bad(policy, stats, "not_an_object", where, f"a JSON {type(row).__name__}, not an object")
        return None
    if key not in row:
        _bad(policy, stats, "missing_field", where,
             f"no field {key!r} (fields: {', '.join(sorted(row)[:8])}); set the source's "
             "text_field")
        return None
    text = row[key]
    if not isinstance(text, str):
        _bad(policy, stats, "not_a_string", where,
             f"field {key!r} holds {json.dumps(text)[:40]}, not a string")
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate from a "\ud83d" escape
        _bad(policy, stats, "not_utf8", where,
             f"field {key!r} holds {text[err.start]!r} at character {err.start}, which is not "
             "valid Unicode (a lone surrogate escape); fix the escape")
        return None
    return row


def _parquet(f, url: str, source: SourceConfig, policy, stats,
             position: list) -> Iterator[tuple[int, str, str | None]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as err:  # pyarrow raises ArrowInvalid and others for a damaged file
        raise DataError(f"{url}: not a readable parquet file ({err})") from err
    columns = pf.schema_arrow.names
    if source.text_field not in columns:
        raise DataError(f"{url}: no column {source.text_field!r} (columns: "
                        f"{', '.join(columns[:8])}); set the source's text_field.")
    labelled = bool(source.label_field) and source.label_field in columns
    row = 0
    for batch in pf.iter_batches(columns=[source.text_field] + [source.label_field] * labelled,
                                 batch_size=1024):
        labels = batch.column(1).to_pylist() if labelled else [None] * batch.num_rows
        for text, label in zip(batch.column(0).to_pylist(), labels):
            position[0] = row
            row += 1
            if text is None:
                _bad(policy, stats, "missing_field", f"{url}:row {row}",
                     f"{source.text_field!r} is null")
            elif not isinstance(text, str):
                _bad(policy, stats, "not_a_string", f"{url}:row {row}",
                     f"{source.text_field!r} holds {str(text)[:40]!r}, not a string")
            elif text.strip():
                yield row, text, None if label is None else str(label)
