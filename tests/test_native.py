"""Which build runs: the mypyc-compiled modules only when they match their source.

The checks that run code in a child interpreter copy the package to a temporary
directory first, so that editing a source there leaves the checkout alone.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import forksmtp
from forksmtp import _native
from helpers import copy_package

PACKAGE = Path(forksmtp.__file__).parent
COMPILED = _native.reason == ""

needs_compiled = pytest.mark.skipif(not COMPILED, reason=f"pure Python build ({_native.reason})")


def probe(root: Path, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(the build a child interpreter reports, the file its Session came from)."""
    code = ("import forksmtp, forksmtp.smtp.session as s; "
            "print(forksmtp._native.describe()); print(s.__file__)")
    full_env = {k: v for k, v in os.environ.items() if k != "FORKSMTP_PURE"}
    full_env["PYTHONPATH"] = str(root)
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, env=full_env, cwd=root, check=True).stdout
    build, session_file = out.splitlines()
    return build, session_file


def test_the_ci_build_is_the_compiled_one():
    # CI sets this after a compiled install, so that a silent fall-back to pure Python
    # (a broken compile) fails here instead of leaving the compiled code untested.
    if os.environ.get("FORKSMTP_EXPECT_COMPILED") != "1":
        pytest.skip("FORKSMTP_EXPECT_COMPILED is not set")
    import forksmtp.smtp.session as session
    assert _native.reason == ""
    assert session.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


@needs_compiled
def test_compiled_modules_are_used_when_they_match(tmp_path):
    build, session_file = probe(copy_package(tmp_path))
    assert build == "compiled with mypyc"
    assert not session_file.endswith(".py")


@needs_compiled
def test_forksmtp_pure_selects_the_source(tmp_path):
    build, session_file = probe(copy_package(tmp_path), {"FORKSMTP_PURE": "1"})
    assert build == "pure Python: FORKSMTP_PURE is set"
    assert session_file.endswith("session.py")


@needs_compiled
def test_a_source_changed_after_the_compile_is_what_runs(tmp_path):
    root = copy_package(tmp_path)
    replies = root / "forksmtp" / "smtp" / "replies.py"
    replies.write_text(replies.read_text() + "\nEDITED = True\n")
    code = ("import forksmtp, forksmtp.smtp.replies as r, forksmtp.smtp.session as s; "
            "print(forksmtp._native.describe(), r.EDITED, s.__file__.endswith('.py'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=root, check=True,
                         env={**os.environ, "PYTHONPATH": str(root), "FORKSMTP_PURE": ""}).stdout
    assert out.strip() == ("pure Python: forksmtp.smtp.replies changed after it was compiled "
                           "True True")


@needs_compiled
def test_a_c_source_changed_after_the_compile_selects_the_pure_build(tmp_path):
    root = copy_package(tmp_path)
    source = root / "forksmtp" / "smtp" / "_lftext.c"
    source.write_text(source.read_text() + "\n/* edited */\n")
    build, session_file = probe(root)
    assert build == "pure Python: forksmtp.smtp._lftext changed after it was compiled"
    assert session_file.endswith("session.py")


@needs_compiled
def test_a_c_module_that_does_not_load_selects_the_source(tmp_path):
    # A broken .so would otherwise leave the DATA reader on its Python twin, several
    # times slower, under a build that says it is compiled.
    root = copy_package(tmp_path)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        built = root / "forksmtp" / "smtp" / f"_lftext{suffix}"
        if built.exists():
            built.write_bytes(b"not a shared object")
    build, session_file = probe(root)
    assert build.startswith("pure Python: forksmtp.smtp._lftext does not load (")
    assert session_file.endswith("session.py")


@needs_compiled
@pytest.mark.parametrize("module", ["forksmtp.connection", "forksmtp.smtp._lftext"])
def test_a_missing_compiled_module_selects_the_source(tmp_path, module):
    root = copy_package(tmp_path)
    base = root.joinpath(*module.split("."))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        base.with_name(base.name + suffix).unlink(missing_ok=True)
    build, session_file = probe(root)
    assert build == f"pure Python: {module} is not compiled"
    assert session_file.endswith("session.py")


def test_without_a_stamp_nothing_compiled_is_trusted(tmp_path):
    root = copy_package(tmp_path)
    (root / "forksmtp" / _native.STAMP).unlink(missing_ok=True)
    build, session_file = probe(root)
    assert build == "pure Python: not compiled"
    assert session_file.endswith("session.py")


def test_the_whole_package_type_checks():
    # Compiled modules check argument and attribute types at run time: a caller that
    # breaks an annotation, compiled or not, would raise there instead of running on.
    pytest.importorskip("mypy", reason="mypy comes with the test extra")
    root = PACKAGE.parent
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                             str(root / "pyproject.toml"), "--cache-dir", "/dev/null", str(PACKAGE)],
                            capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stamp_names_every_compiled_module_and_its_digest():
    if not COMPILED:
        pytest.skip(f"pure Python build ({_native.reason})")
    lines = (PACKAGE / _native.STAMP).read_text(encoding="ascii").splitlines()
    recorded = dict(reversed(line.split()) for line in lines)
    assert sorted(recorded) == sorted([*_native.COMPILED, *_native.C_MODULES])
    for name, digest in recorded.items():
        source = PACKAGE.parent / _native.sources()[name]
        assert digest == _native.source_digest(str(source))


def test_every_sdist_ships_the_c_module_and_its_stub(tmp_path):
    # setup.py names the C as an extension's source only when it compiles: an sdist made
    # with FORKSMTP_PURE=1 must still carry it (MANIFEST.in), or building that sdist
    # where a compiler is found fails.  Made from a copy of the tracked files, since a
    # pure setup.py run drops the checkout's in-place stamp.
    root = PACKAGE.parent
    if not (root / "setup.py").exists() or shutil.which("git") is None:
        pytest.skip("not a source checkout")
    listed = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True,
                            text=True, timeout=30)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tree = tmp_path / "tree"
    for name in listed.stdout.splitlines():
        if (root / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, tree / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                   cwd=tree, check=True, capture_output=True, timeout=120,
                   env={**os.environ, "FORKSMTP_PURE": "1"})
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"forksmtp/smtp/_lftext.c", "forksmtp/smtp/_lftext.pyi"} <= names
