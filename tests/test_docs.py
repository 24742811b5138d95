"""Every repository path the documentation names exists.

Paths are taken from inline code (`...`) and markdown link targets in README.md, BENCHMARKS.md
and docs/**/*.md. docs/results/ is left out: each result folder records the command and paths of
the commit it was produced at.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TOP_DIRS = ("glam/", "analysis/", "conf/", "sweeps/", "scripts/", "tests/", "docs/")
TOP_FILES = ("Makefile", "pyproject.toml", "BENCHMARKS.md", "README.md")
PLACEHOLDER = re.compile(r"[<*{$]")


def doc_files() -> list[Path]:
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md")
                  if not p.is_relative_to(ROOT / "docs" / "results"))
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *docs]


def named_paths(text: str) -> set[str]:
    """Repository paths in inline code spans and link targets, cleaned of trailing punctuation,
    `:line` suffixes, `#anchors` and anything after whitespace; tokens that are placeholders or
    glob patterns (`<name>`, `*`) are skipped."""
    tokens = re.findall(r"`([^`\n]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text)
    paths = set()
    for token in tokens:
        token = (token.split() or [""])[0]
        token = re.sub(r":\d+$", "", token.rstrip(".,;:)").split("#")[0])
        if token.startswith(TOP_DIRS) or token in TOP_FILES:
            if not PLACEHOLDER.search(token):
                paths.add(token)
    return paths


def link_targets(doc: Path) -> list[str]:
    """Relative markdown link targets of `doc` (e.g. `studies.md` from docs/), anchors dropped."""
    targets = re.findall(r"\]\(([^)\s#]+)[^)]*\)", doc.read_text())
    return [t for t in targets if "://" not in t and not PLACEHOLDER.search(t)]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_named_in_the_docs_exists(doc):
    text = doc.read_text()
    missing = sorted(p for p in named_paths(text) if not (ROOT / p).exists())
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_in_the_docs_resolves_inside_the_repository(doc):
    root = ROOT.resolve()
    broken = [t for t in link_targets(doc)
              if not (doc.parent / t).resolve().is_relative_to(root) or not (doc.parent / t).exists()]
    assert not broken, f"{doc.relative_to(ROOT)} links to missing or outside paths: {broken}"
