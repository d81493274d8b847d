"""The repository explains itself: no comment, docstring or document points outside it (to design notes that are not
in the repo), and every citation of docs/ names a file, section or numbered convention that exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_PARTS = {".git", ".venv", "build", "runs", "__pycache__", ".pytest_cache"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".txt", ".cfg", ".json", ".yml", ".yaml"}
# Built by concatenation so that this file does not cite them itself.
OUTSIDE = [name + ".md" for name in ("DESIGN", "PAPERS", "STYLE")]
CITATION = re.compile(r"docs/(\w+)\.md(?: #(\d+)(?:-(\d+))?| \"([^\"]+)\")?")


def _files() -> list[Path]:
    found = []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIP_PARTS and not d.endswith(".egg-info")]
        found += [Path(folder, name) for name in names if Path(name).suffix in TEXT_SUFFIXES]
    return found


def _headings(doc: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in doc.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def _numbered(doc: Path) -> set[int]:
    return {int(m) for m in re.findall(r"^(\d+)\. ", doc.read_text(encoding="utf-8"), flags=re.M)}


def test_the_docs_exist() -> None:
    assert (ROOT / "docs" / "design.md").is_file() and (ROOT / "docs" / "conventions.md").is_file()
    assert _numbered(ROOT / "docs" / "conventions.md") == set(range(1, 18))


@pytest.mark.parametrize("name", OUTSIDE)
def test_nothing_cites_documents_outside_the_repo(name: str) -> None:
    citing = [str(p.relative_to(ROOT)) for p in _files() if name in p.read_text(encoding="utf-8", errors="replace")]
    assert not citing, f"{name} is not in the repository, yet {citing} cite it (cite docs/ instead)"


def test_bare_convention_numbers_say_where_they_are_defined() -> None:
    bare = re.compile(r"\bconventions? \d")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in _files() if p.parent.name != "docs"
                 for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
                 if bare.search(line)]
    assert not offenders, f"cite numbered conventions as docs/conventions.md #N: {offenders}"


def test_every_citation_of_docs_resolves() -> None:
    checked = 0
    for path in _files():
        for match in CITATION.finditer(path.read_text(encoding="utf-8", errors="replace")):
            doc = ROOT / "docs" / f"{match.group(1)}.md"
            where = f"{path.relative_to(ROOT)} cites {match.group(0)}"
            assert doc.is_file(), where
            if match.group(2):
                first, last = int(match.group(2)), int(match.group(3) or match.group(2))
                assert set(range(first, last + 1)) <= _numbered(doc), where
            if match.group(4):
                assert match.group(4) in _headings(doc), where
            checked += 1
    assert checked >= 1


def test_design_lists_every_module() -> None:
    """docs/design.md's module table names every module of the package (a package by its folder, its modules by
    file name; the command modules of cli/ by the folder)."""
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", design))
    missing = []
    for path in sorted((ROOT / "ddpmctl").rglob("*.py")):
        relative = path.relative_to(ROOT / "ddpmctl")
        folder = f"{relative.parent}/" if relative.parent != Path(".") else None
        if folder == "cli/" or (relative.name == "__init__.py" and folder in named):
            continue
        if relative.name not in named and str(relative) not in named and f"ddpmctl/{relative}" not in named:
            missing.append(str(relative))
    assert not missing, f"docs/design.md does not list {missing}"
