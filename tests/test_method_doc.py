"""docs/method.md is the repository's own statement of the method: every section the code and the
docs cite (`method.md §6.4`, the architecture table's first column) must exist in it, and nothing
cites the specification this project was built from, which users do not have."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".sh", ".ipynb", ".toml", ".cff", ".txt"}
SKIP = {".git", ".venv", ".venv-floor", "runs", "datasets", "build", "dist", "__pycache__"}
SECTION = r"\d+(?:\.\d+)?"
CITATION = re.compile(rf"method\.md §({SECTION})(?:[-–]({SECTION}))?((?:,? §{SECTION})*)")


def sections() -> set[str]:
    found = set()
    for line in METHOD.read_text(encoding="utf-8").splitlines():
        m = re.match(rf"#{{2,3}} ({SECTION})\.? ", line)
        if m:
            found.add(m.group(1))
    return found


def text_files():
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith(".venv")]
        for name in names:
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES:
                yield path.relative_to(ROOT), path.read_text(encoding="utf-8", errors="replace")


def expand(first: str, last: str | None) -> list[str]:
    """ "3.1"-"3.4" -> 3.1 .. 3.4; "3"-"5" -> 3, 4, 5; a single section as is."""
    if not last:
        return [first]
    a, b = first.split("."), last.split(".")
    if len(a) == len(b) == 1:
        return [str(n) for n in range(int(a[0]), int(b[0]) + 1)]
    if len(a) == len(b) == 2 and a[0] == b[0]:
        return [f"{a[0]}.{n}" for n in range(int(a[1]), int(b[1]) + 1)]
    return [first, last]


def test_method_doc_numbers_its_sections():
    assert {str(n) for n in range(1, 10)} <= sections()
    assert {"3.1", "3.6", "4.3", "4.4", "5.4", "6.4", "6.6", "7.4"} <= sections()


def test_every_cited_section_exists():
    known, missing, cited = sections(), [], 0
    for rel, text in text_files():
        for m in CITATION.finditer(text):
            extra = re.findall(SECTION, m.group(3) or "")
            for section in expand(m.group(1), m.group(2)) + extra:
                cited += 1
                if section not in known:
                    missing.append(f"{rel}: §{section}")
    assert cited > 50  # the code cites the method throughout
    assert not missing, missing


def test_architecture_table_cites_existing_sections():
    table = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").split("| method.md § |")[1]
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(rows) > 15
    for cell in rows:
        m = re.fullmatch(rf"({SECTION})(?:[-–]({SECTION}))?", cell)
        assert m and set(expand(m.group(1), m.group(2))) <= sections(), cell


def test_nothing_cites_the_unpublished_specification():
    word = "PROTO" + "COL"  # spelled apart so that this file does not find itself
    assert [str(rel) for rel, text in text_files() if word in text] == []
