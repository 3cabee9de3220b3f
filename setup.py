"""Build forksmtp, compiling its per-message modules with mypyc where the machine can.

Compiled, a worker spends about a sixth less CPU per message and the daemon takes about
a sixth more messages a second (README, "Compiled build").  The modules stay plain
Python source, tested both ways; forksmtp/_native.py lists them and decides at start-up
whether the compiled copies match the source beside them.  The same build compiles the
one hand-written C module, the DATA reader's per-octet pass (smtp/_lftext.c), whose
Python twin the pure build runs.

FORKSMTP_PURE=1 builds pure Python.  So does a machine where the compile fails (no C
compiler, no Python headers), with a warning: forksmtp then runs as it always has.
"""

import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_native():
    # forksmtp/_native.py by path: importing the package would run its start-up check.
    spec = importlib.util.spec_from_file_location(
        "_forksmtp_native", os.path.join(HERE, "forksmtp", "_native.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


native = _load_native()
SOURCES = native.sources()  # module: source path, every module of the compiled build


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python instead of failing the install, and
    records the source digests of what it compiled (native.STAMP)."""

    def run(self):
        if not self.extensions:
            return
        try:
            # Read before compiling: the digests must be those of what was compiled.
            digests = {name: native.source_digest(os.path.join(HERE, path))
                       for name, path in SOURCES.items()}
            super().run()
        except Exception as exc:  # the compiler's errors have no common base class
            self._remove_outputs()
            self.warn(f"forksmtp: compiling failed ({exc}); "
                      "installing pure Python, which runs slower")
            return
        # Beside the compiled modules: build/lib, or the source tree when in place.
        package_dir = os.path.dirname(self.get_ext_fullpath("forksmtp.trace"))
        with open(os.path.join(package_dir, native.STAMP), "w", encoding="ascii") as f:
            f.writelines(f"{digest}  {name}\n" for name, digest in digests.items())

    def build_extension(self, ext):
        # build_ext skips an extension whose output is newer than its sources, and a
        # source can carry an old time (cp -p, rsync -a, an unpacked tarball): the old
        # .so would then run under the new source's digest.  mypyc rewrites its C from
        # the .py on every build, so only the hand-written C needs forcing.
        saved = self.force
        self.force = saved or ext.name in native.C_MODULES
        try:
            super().build_extension(ext)
        finally:
            self.force = saved

    def _remove_outputs(self):
        # A half-built set must not be found next to the sources.
        saved = self.inplace
        try:
            for ext in self.extensions:
                for inplace in (0, 1):  # both build/lib and the source tree
                    self.inplace = inplace
                    path = self.get_ext_fullpath(ext.name)
                    if os.path.exists(path):
                        os.unlink(path)
        finally:
            self.inplace = saved


def ext_modules():
    if native.pure_requested():
        # Compiled modules an earlier in-place build left beside the sources lose their
        # stamp, so that forksmtp never picks them (see _native).
        stale = os.path.join(HERE, "forksmtp", native.STAMP)
        if os.path.exists(stale):
            os.unlink(stale)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("forksmtp: mypyc is not installed; installing pure Python", file=sys.stderr)
        return []
    # The build environment holds only the build requirements: the runtime dependencies
    # (setproctitle, psutil) are not there to type-check against, and need not be.
    compiled = [SOURCES[name] for name in native.COMPILED]
    # -O3 whatever Python was built with: the C's comparison loops are vectorised only
    # there (GCC 12 at Debian's -O2 leaves them scalar: 1.25 against 0.23 ms per MiB
    # for lf_text, 1.16 against 0.13 for find_dots).  Passed last, so it wins.
    hand_written = [Extension(name, [path], extra_compile_args=["-O3"])
                    for name, path in native.C_MODULES.items()]
    return mypycify(["--ignore-missing-imports", *compiled], opt_level="3",
                    group_name=native.GROUP) + hand_written


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
