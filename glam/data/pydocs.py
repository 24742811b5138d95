"""English prose that every Python install ships, as JSONL files: a real-text corpus with no
download (`data=pydocs`).

- `reference`: the language reference and library topics of `pydoc_data.topics` (79 documents,
  about 0.45 MB): the text `help()` shows.
- `docstrings`: the docstrings of the standard library's modules, one document per module
  (module, class and function docstrings in source order), read with `ast` from the source
  files: nothing is imported or run.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from pathlib import Path

KINDS = ("reference", "docstrings")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}


def reference() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def docstrings() -> list[str]:
    """One document per standard-library module that has docstrings, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_bytes())
            except (SyntaxError, ValueError):
                continue
            parts = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            text = "\n\n".join(p for p in parts if p)
            if text:
                docs.append(text)
    return docs


def export(kind: str, folder: Path, n_files: int = 4) -> list[str]:
    """Write the `kind` documents as `n_files` JSONL files ({"text": ...}) under `folder` (once
    per Python version: an existing complete export is kept); returns their paths.

    Raises:
      ValueError: an unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown built-in text {kind!r}; one of {', '.join(KINDS)}")
    folder = Path(folder) / f"py{sys.version_info.major}.{sys.version_info.minor}" / kind
    paths = [folder / f"part-{i:02d}.jsonl" for i in range(n_files)]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    docs = reference() if kind == "reference" else docstrings()
    for i, path in enumerate(paths):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as f:
            for text in docs[i::n_files]:
                f.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, path)  # a complete file or none
    return [str(p) for p in paths]
