"""The README's reply tables are the operator's list of what the server can say: every
reply constant of ``smtp/replies.py`` must appear there, code, enhanced code and text,
so that a reply added or reworded without its row fails here."""
from __future__ import annotations

from pathlib import Path

from forksmtp.smtp import replies as R

README = Path(__file__).resolve().parent.parent / "README.md"


def _reply_section() -> str:
    text = README.read_text()
    start = text.index("\n## Reply codes\n")
    return text[start:text.index("\n## ", start + 1)]


def test_every_reply_constant_has_its_row_in_the_readme():
    section = _reply_section()
    missing = []
    for name in dir(R):
        reply = getattr(R, name)
        if not isinstance(reply, R.Reply):
            continue
        head = f"{reply.code} {reply.enhanced} {reply.text}" if reply.enhanced else f"{reply.code} {reply.text}"
        if f"`{head}`" not in section:
            missing.append(f"{name}: {head}")
    assert not missing, "replies without a row in README's Reply codes: " + "; ".join(missing)


def test_the_check_finds_a_reply_the_readme_lacks():
    """The check above is not vacuous: a reply never written in the README is missed."""
    reply = R.Reply(599, "5.9.9", "No such reply anywhere")
    head = f"{reply.code} {reply.enhanced} {reply.text}"
    assert f"`{head}`" not in _reply_section()
    assert sum(isinstance(getattr(R, n), R.Reply) for n in dir(R)) > 60
