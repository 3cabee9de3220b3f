"""Which modules are compiled with mypyc, and whether this process may use them.

The modules in ``COMPILED`` run for every command and every message; setup.py compiles
them with mypyc where it can (README, "Compiled build") and records the SHA-256 of each
source it compiled in ``STAMP``.  Python prefers an extension module to the source beside
it, so a compiled module that no longer matches its source would run old code without a
word.  ``select`` therefore uses the compiled modules only when every one of them is
present and was built from the source beside it, and makes the whole package load from
source otherwise, or when ``FORKSMTP_PURE`` is set.

Never compiled itself: it must run before any compiled module is imported.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys

#: Compiled by setup.py, in this order; every other module stays Python.
COMPILED = (
    "forksmtp.smtp.events",
    "forksmtp.smtp.replies",
    "forksmtp.smtp.commands",
    "forksmtp.smtp.buffer",
    "forksmtp.smtp.secure",
    "forksmtp.smtp.sessionlog",
    "forksmtp.smtp.session",
    "forksmtp.trace",
    "forksmtp.logs",
    "forksmtp.maildir",
    "forksmtp.delivery",
    "forksmtp.scoreboard",
    "forksmtp.connection",
    "forksmtp.smtp.settings",
    "forksmtp.worker",
)

#: Hand-written C built with them (module: its source, relative to the package's parent):
#: the DATA reader's per-octet pass.  Part of the same all-or-nothing build.
C_MODULES = {
    "forksmtp.smtp._lftext": os.path.join("forksmtp", "smtp", "_lftext.c"),
}

#: Written by setup.py beside the compiled modules: "<sha256>  <module>" per line.
STAMP = "compiled.sha256"

#: mypyc's group name: the shared library of all compiled modules is ``<GROUP>__mypyc``.
GROUP = "forksmtp_native"

#: Why the compiled modules are not in use ("" when they are); set by select().
reason = "not selected yet"


def select(package_dir: str) -> str:
    """Decide once, before any of COMPILED is imported; returns (and keeps) the reason
    the compiled modules are not used, or "" when they are."""
    global reason
    reason = _why_not(package_dir)
    if reason:
        sys.meta_path.insert(0, _SourceFirst)
    return reason


def describe() -> str:
    """The build in use, for ``forksmtp --version``."""
    return "compiled with mypyc" if not reason else f"pure Python: {reason}"


def pure_requested() -> bool:
    """FORKSMTP_PURE set to anything but "" or "0": at install time no compile, at run
    time the source."""
    return os.environ.get("FORKSMTP_PURE", "") not in ("", "0")


def sources() -> dict[str, str]:
    """Every module of the compiled build and its source, relative to the package's
    parent directory: the mypyc modules, then the C ones."""
    mypyc = {name: os.path.join(*name.split(".")) + ".py" for name in COMPILED}
    return {**mypyc, **C_MODULES}


def source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _why_not(package_dir: str) -> str:
    if pure_requested():
        return "FORKSMTP_PURE is set"
    try:
        with open(os.path.join(package_dir, STAMP), encoding="ascii") as f:
            recorded = {module: digest for digest, module in (line.split() for line in f)}
    except (OSError, ValueError):
        return "not compiled"
    root = os.path.dirname(package_dir)
    for name, source in sources().items():
        base = os.path.join(root, *name.split("."))
        if name not in recorded or not _has_extension(base):
            return f"{name} is not compiled"
        try:
            digest = source_digest(os.path.join(root, source))
        except FileNotFoundError:
            continue  # installed without its source: nothing to differ from
        if digest != recorded[name]:
            return f"{name} changed after it was compiled"
    if importlib.util.find_spec(GROUP + "__mypyc") is None:
        return f"{GROUP}__mypyc is missing"
    for name in C_MODULES:
        # A C module that does not load would leave its callers on their Python twins,
        # correct but several times slower, under a build that says it is compiled.
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"{name} does not load ({exc})"
    return ""


def _has_extension(base: str) -> bool:
    return any(os.path.exists(base + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


class _SourceFirst:
    """Meta-path finder that loads forksmtp's submodules from their .py files, so that
    extension modules beside them are never picked, and refuses the C modules."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if not name.startswith("forksmtp.") or not path:
            return None
        if name in C_MODULES:  # C without a Python source: the pure build has its twin
            raise ModuleNotFoundError(f"{name} is not used by the pure Python build", name=name)
        for entry in path:
            finder = importlib.machinery.FileFinder(
                entry, (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES))
            spec = finder.find_spec(name, target)
            if spec is not None:
                return spec
        return None
