"""The README and SECURITY.md are the operator's reference, and must not drift from the
code: every reply constant of ``smtp/replies.py`` has its row in the README's reply
tables (code, enhanced code and text), and every test the two documents cite as
evidence exists under that name."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from forksmtp.smtp import replies as R

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "SECURITY.md")
#: ``test_x.py::test_name``, ``::test_name`` (in the file named last), or a test file's
#: name alone (which sets the file for the ``::`` references after it).
_CITATION = re.compile(r"(test_\w+\.py)(?:::(test_\w+))?|::(test_\w+)")


def _readme_section(heading: str) -> str:
    """The README's text from ``heading`` (a whole line) to the next ``## `` heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    return text[start:text.index("\n## ", start + 1)]


def test_every_reply_constant_has_its_row_in_the_readme():
    section = _readme_section("## Reply codes")
    missing = []
    for name in dir(R):
        reply = getattr(R, name)
        if not isinstance(reply, R.Reply):
            continue
        head = f"{reply.code} {reply.enhanced} {reply.text}" if reply.enhanced else f"{reply.code} {reply.text}"
        if f"`{head}`" not in section:
            missing.append(f"{name}: {head}")
    assert sum(isinstance(getattr(R, n), R.Reply) for n in dir(R)) > 60  # the loop saw them
    assert not missing, "replies without a row in README's Reply codes: " + "; ".join(missing)


def _tests_by_file() -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        found[path.name] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    return found


def cited_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for each test a document cites."""
    cited, current = [], ""
    for m in _CITATION.finditer(text):
        if m.group(1):
            current = m.group(1)
        name = m.group(2) or m.group(3)
        if name and current:
            cited.append((current, name))
    return cited


def test_every_test_the_documents_cite_exists():
    tests = _tests_by_file()
    cited = [(doc, f, name) for doc in DOCS for f, name in cited_tests((ROOT / doc).read_text())]
    assert len(cited) > 50  # the pattern still finds the citations
    missing = [f"{doc}: {f}::{name}" for doc, f, name in cited if name not in tests.get(f, set())]
    assert not missing, "cited tests that do not exist: " + "; ".join(missing)


def test_a_citation_is_read_in_the_file_named_last():
    text = "`test_a.py::test_one`, `::test_two`; `test_b.py` then `::test_three`"
    assert cited_tests(text) == [("test_a.py", "test_one"), ("test_a.py", "test_two"),
                                 ("test_b.py", "test_three")]


def test_every_test_file_has_its_row_in_the_readmes_tests_table():
    """A newcomer reads there what each file covers: a file left out is a file unread."""
    table = _readme_section("### Tests")
    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert len(files) > 40
    missing = [f for f in files if f"`{f}`" not in table]
    assert not missing, "test files with no row in the README's Tests table: " + ", ".join(missing)
