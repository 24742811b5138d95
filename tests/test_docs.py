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


README_MAX_LINES = 230


def test_the_readme_reads_in_five_minutes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")


def code_map_entries(readme: str) -> list[str]:
    """The README's code map: the first fenced block under `## Code map`, as entries. An entry
    starts at a line that begins with a path (`glam/trainer.py`, `glam/data/`) and runs on
    through the indented lines after it."""
    section = readme.split("\n## Code map", 1)[1]
    block = section.split("```", 2)[1]
    entries: list[str] = []
    for line in block.splitlines()[1:]:  # [0] is the fence's info string
        if line[:1].strip():
            entries.append(line)
        elif line.strip() and entries:
            entries[-1] += "\n" + line
    return entries


def files_in_code_map(readme: str) -> set[str]:
    """The files the code map names. The rule: a file counts when the map names it by its path
    from the repository root (`glam/trainer.py`, at the head of its own entry or anywhere in an
    entry), or by its bare name (`moe.py`) in the entry of its folder, whose head is that
    folder's path (`glam/model/`) or a file in it."""
    named = set()
    for entry in code_map_entries(readme):
        head = entry.split()[0]
        folder = head if head.endswith("/") else head.rpartition("/")[0] + "/"
        named.update(re.findall(r"(?<![\w/.])((?:glam|analysis)/[\w/]+\.py)\b", entry))
        named.update(folder + name for name in re.findall(r"(?<![\w/.])(\w+\.py)\b", entry))
    return named


def test_the_readme_code_map_names_every_module():
    """Every .py file under glam/ and analysis/ (package `__init__.py` files aside) is in the
    README's code map, by the rule of `files_in_code_map`; and the map names no file that is
    gone."""
    modules = {p.relative_to(ROOT).as_posix()
               for top in ("glam", "analysis") for p in (ROOT / top).rglob("*.py")
               if p.name != "__init__.py"}
    named = files_in_code_map((ROOT / "README.md").read_text())
    missing = sorted(modules - named)
    assert not missing, f"README.md's code map does not name: {missing}"
    gone = sorted(p for p in named if p.startswith(("glam/", "analysis/")) and not (ROOT / p).exists())
    assert not gone, f"README.md's code map names files that do not exist: {gone}"
