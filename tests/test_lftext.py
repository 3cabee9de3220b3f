"""The compiled build's C passes over DATA text (forksmtp/smtp/_lftext.c) against the
obvious Python: the same stored text, the same bare CR/LF verdict and the same line-limit
verdict, the same stuffed lines and end, on every short block and on random long ones,
and no trust in their arguments.

The pure build never loads it; these tests run wherever the compiled build runs (CI:
always)."""

from __future__ import annotations

import importlib.machinery
import itertools
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import forksmtp
from forksmtp import _native
from forksmtp.smtp import buffer
from helpers import copy_package

try:
    from forksmtp.smtp import _lftext as lf_text_module
    from forksmtp.smtp._lftext import find_dots, lf_text
except ImportError:
    if _native.reason == "":  # the compiled build is in use: it must be there
        raise
    pytest.skip(f"pure Python build ({_native.reason})", allow_module_level=True)


def obvious(block: bytes, carry: int, limit: int) -> tuple[bytes | None, bool]:
    """CRLF pairs cannot overlap, so removing them leaves every bare CR or LF; the line
    limit counts each line once unstuffed, the first one after its carried octets."""
    if b"\r" in block.replace(b"\r\n", b"") or b"\n" in block.replace(b"\r\n", b""):
        return None, False
    stuffed = block.replace(b"\r\n", b"\n")
    text = stuffed[1:] if stuffed[:1] == b"." and not carry else stuffed
    lines = text.replace(b"\n.", b"\n").split(b"\n")
    return stuffed, max(carry + len(lines[0]), *map(len, lines)) > limit


def python_reader(block: bytes, carry: int, limit: int) -> tuple[bytes | None, bool]:
    """What the pure build's DataReader computes with buffer.py's functions."""
    stuffed = buffer._delete_crs(block)
    if not buffer._only_crlf(block, stuffed):
        return None, False
    text = stuffed[1:] if stuffed[:1] == b"." and not carry else stuffed
    return stuffed, buffer._has_long_line(text.replace(b"\n.", b"\n"), carry, limit)


def test_the_compiled_reader_uses_it():
    assert buffer._LF_TEXT is lf_text and buffer._FIND_DOTS is find_dots


def test_the_pure_build_refuses_it(tmp_path):
    code = ("import forksmtp.smtp.buffer as b; print(b._LF_TEXT)\n"
            "try:\n    import forksmtp.smtp._lftext\nexcept ImportError as e:\n    print(e)")
    env = {**os.environ, "FORKSMTP_PURE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tmp_path, check=True).stdout
    assert out.splitlines() == ["None", "forksmtp.smtp._lftext is not used by the pure Python build"]


def test_every_short_block_every_carry_every_limit():
    # Up to 7 octets over {a, ., CR, LF}: every bare CR/LF position, stuffed dots at the
    # start and after each line end, and lines at, under and over small limits.
    for n in range(8):
        for octets in itertools.product(b"a.\r\n", repeat=n):
            block = bytes(octets)
            for carry in (0, 1, 3):
                for limit in (0, 1, 2, 3, 998):
                    expected = obvious(block, carry, limit)
                    assert lf_text(block, carry, limit) == expected, (block, carry, limit)
                    assert python_reader(block, carry, limit) == expected, (block, carry, limit)


def test_random_blocks_of_real_line_lengths():
    rng = random.Random(int(os.environ.get("FORKSMTP_TEST_SEED", "5322")))
    pieces = [b"\r\n", b"\r\n.", b".", b"\r", b"\n", b"x" * 7, b"y" * 64, b"z" * 500]
    for _ in range(3000):
        block = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.6:  # mostly valid text: its verdicts are the subtle ones
            block = block.replace(b"\r\n", b"\0").replace(b"\r", b"").replace(b"\n", b"")
            block = block.replace(b"\0", b"\r\n")
        carry = rng.choice([0, 0, rng.randint(1, 1100)])
        limit = rng.choice([998, 998, rng.randint(0, 600)])
        assert lf_text(block, carry, limit) == obvious(block, carry, limit), (block, carry, limit)


@pytest.mark.parametrize("wire, carry, long", [
    (b"x" * 998 + b"\r\n", 0, False),
    (b"x" * 999 + b"\r\n", 0, True),
    (b"." + b"x" * 998 + b"\r\n", 0, False),  # the transparency dot is not counted
    (b"." + b"x" * 999 + b"\r\n", 0, True),
    (b"." + b"x" * 996 + b"\r\n", 1, False),  # a carried line's dot is text
    (b"." + b"x" * 997 + b"\r\n", 1, True),
    (b"a\r\n" + b"x" * 999, 0, True),  # an unfinished line is long once it is
    (b"a\r\n" + b"x" * 998, 0, False),
    (b"", 999, True),  # the carry alone
    (b"", 998, False),
], ids=lambda v: f"{len(v)} octets" if isinstance(v, bytes) else repr(v))
def test_the_line_limit_at_its_edges(wire, carry, long):
    stuffed, found = lf_text(wire, carry, 998)
    assert stuffed == wire.replace(b"\r\n", b"\n") and found is long


@pytest.mark.parametrize("block", [b"\n", b"a\n", b"\r", b"a\rb\r\n", b"a\r\n\n", b"\r\r\n",
                                   b"a\r\nb\r", b"x" * 5000 + b"\r\n\n"],
                         ids=["lf", "a-lf", "cr", "a-cr-b", "crlf-lf", "cr-crlf", "crlf-b-cr",
                              "long-line-lf"])
def test_a_bare_cr_or_lf_anywhere_is_refused(block):
    assert lf_text(block, 0, 998) == (None, False)


def test_a_big_block_of_mail_text():
    body = b"".join(b"line %05d " % i + b"x" * (i % 90) + b"\r\n" + b"." * (i % 7 == 0)
                    for i in range(20_000))
    block = body + b"last line, unfinished"
    assert lf_text(block, 0, 998) == obvious(block, 0, 998)
    assert lf_text(block, 0, 998)[1] is False
    assert lf_text(block + b"\n", 0, 998) == (None, False)  # a bare LF at the very end


def test_it_trusts_none_of_its_arguments():
    block = b"abc\r\n"
    for bad in (b"abc\r\n".decode(), bytearray(block), memoryview(block), None):
        with pytest.raises(TypeError):
            lf_text(bad, 0, 998)
    for args in ((block, 0), (block, 0, 998, 1), ()):
        with pytest.raises(TypeError):
            lf_text(*args)
    with pytest.raises(TypeError):
        lf_text(block, "0", 998)
    for carry, limit in ((-1, 998), (0, -1)):
        with pytest.raises(ValueError):
            lf_text(block, carry, limit)
    with pytest.raises(OverflowError):
        lf_text(block, 2 ** 64, 998)
    # The biggest carry and limit cannot overflow the count.
    assert lf_text(block, sys.maxsize, 998) == (b"abc\n", True)
    assert lf_text(block, sys.maxsize, sys.maxsize) == (b"abc\n", True)
    assert lf_text(b"\r\n", sys.maxsize, sys.maxsize) == (b"\n", False)
    assert lf_text(block, 0, sys.maxsize) == (b"abc\n", False)
    assert block == b"abc\r\n"  # never written to


# -- find_dots: stuffed lines and the end ------------------------------------------------------

def obvious_dots(block: bytes, start: int) -> tuple[int, int]:
    return block.find(b"\r\n.", start), block.find(b"\r\n.\r\n", start)


def test_find_dots_on_every_short_block_from_every_start():
    for n in range(9):
        for octets in itertools.product(b"a.\r\n", repeat=n):
            block = bytes(octets)
            for start in range(n + 2):
                expected = obvious_dots(block, start)
                assert find_dots(block, start) == expected, (block, start)
                assert buffer._find_dots(block, start) == expected, (block, start)


def test_find_dots_across_its_chunks():
    # The C tests 256 positions at a time: put the markers on and around every chunk
    # edge, alone and together, in text with and without other dots.
    rng = random.Random(int(os.environ.get("FORKSMTP_TEST_SEED", "2821")))
    for filler in (b"x", b"a.b", b"\r\n", b"\r\n.."):
        text = (filler * (1400 // len(filler) + 1))[:1400]
        for _ in range(400):
            block = bytearray(text)
            for marker in rng.sample([b"\r\n.", b"\r\n.\r\n", b"\r\n.x"], rng.randint(0, 3)):
                at = rng.choice([255, 256, 257, 510, 511, 512, 1023, 1024, rng.randrange(1400)])
                at -= rng.randint(0, 4)
                block[at:at + len(marker)] = marker
            block = bytes(block[:rng.choice([len(block), 1397, 1399, 1024, 513, 260, 258])])
            start = rng.choice([0, 0, rng.randrange(len(block) + 1)])
            assert find_dots(block, start) == obvious_dots(block, start), (bytes(block), start)


@pytest.mark.parametrize("text", [
    b"One sentence. Another one, with words. And a third.\r\n" * 3000,  # prose: dots
    (b"x" * 74 + b"\r\n") * 2000,  # base64-like: no dots
    b"\r\n" * 100_000,  # empty lines
    b"." * 200_000,
    (b"line\r\n..stuffed\r\n" * 5000) + b".\r\n" + b"after\r\n",
], ids=["prose", "no-dots", "empty-lines", "dots", "stuffed"])  # pytest would spell out each octet
def test_find_dots_on_big_blocks(text):
    for start in (0, 1, 2, len(text) // 2, len(text) - 3, len(text)):
        assert find_dots(text, start) == obvious_dots(text, start)


def test_find_dots_trusts_none_of_its_arguments():
    block = b"a\r\n.\r\n"
    for bad in (block.decode(), bytearray(block), memoryview(block), None):
        with pytest.raises(TypeError):
            find_dots(bad, 0)
    for args in ((block,), (block, 0, 1), ()):
        with pytest.raises(TypeError):
            find_dots(*args)
    with pytest.raises(TypeError):
        find_dots(block, "0")
    with pytest.raises(ValueError):
        find_dots(block, -1)
    with pytest.raises(OverflowError):
        find_dots(block, 2 ** 64)
    assert find_dots(block, sys.maxsize) == (-1, -1)
    assert find_dots(block, 0) == (1, 1)


def sanitizer_runtimes() -> list[str]:
    """The shared ASan and UBSan runtimes of the C compiler, or [] without them."""
    cc = shutil.which("gcc")
    if cc is None:
        return []
    found = []
    for name in ("libasan.so", "libubsan.so"):
        path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            return []
        found.append(path)
    return found


@pytest.mark.skipif(_native.reason != "", reason=f"pure Python build ({_native.reason})")
def test_the_reader_tests_pass_with_the_c_pass_under_asan_and_ubsan(tmp_path):
    # The C is built again with AddressSanitizer and UndefinedBehaviorSanitizer into a
    # copy of the package (its source unchanged, so the copy still counts as compiled),
    # and the reader's tests run on it: any out-of-bounds access, overflow or other
    # undefined behaviour aborts them.
    runtimes = sanitizer_runtimes()
    if not runtimes:
        pytest.skip("gcc with the ASan and UBSan runtimes is not installed")
    package = Path(forksmtp.__file__).parent
    spec = importlib.machinery.PathFinder.find_spec(_native.GROUP + "__mypyc")
    assert spec is not None and spec.origin
    root = copy_package(tmp_path)
    built = Path(lf_text_module.__file__)
    target = root / "forksmtp" / "smtp" / built.name
    subprocess.run(["gcc", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-fPIC", "-shared",
                    "-I", sysconfig.get_paths()["include"],
                    str(package / "smtp" / "_lftext.c"), "-o", str(target)],
                   check=True, capture_output=True, timeout=120)
    tests = Path(__file__).parent
    # PYTHONMALLOC=malloc: pymalloc carves small objects out of pools ASan does not
    # watch, where a read a few octets past a short block would go unseen.
    env = {**os.environ, "PYTHONPATH": str(root), "LD_PRELOAD": " ".join(runtimes),
           "ASAN_OPTIONS": "detect_leaks=0", "PYTHONMALLOC": "malloc",
           "FORKSMTP_EXPECT_COMPILED": "1"}
    env.pop("FORKSMTP_PURE", None)
    which = subprocess.run(
        [sys.executable, "-c", "import forksmtp.smtp.buffer as b; print(b._LF_TEXT.__module__, "
                               "__import__('forksmtp.smtp._lftext').smtp._lftext.__file__)"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=True).stdout
    assert which.split() == ["forksmtp.smtp._lftext", str(target)]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not asan",
         str(tests / "test_lftext.py"), str(tests / "test_buffer.py"),
         str(tests / "test_session_fuzz.py")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
