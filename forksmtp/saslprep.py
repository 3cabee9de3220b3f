"""SASLprep (RFC 4013): the one spelling of a user name or password before it is compared.

RFC 4616 recommends it for PLAIN (and LOGIN carries the same strings): without it, a
password typed on a system that composes "é" as one code point and sent from one that
decomposes it into "e" + U+0301 is a different string, and a no-break space pasted from
a web page is not the space the user set.  Both spellings reach the same string here.

The steps are those of RFC 3454 with the profile of RFC 4013:

1. map: non-ASCII spaces (table C.1.2) become U+0020; characters "commonly mapped to
   nothing" (B.1: soft hyphen, zero-width joiners, variation selectors...) are removed;
2. normalise to NFKC, with Unicode 3.2 as stringprep requires (``unicodedata.ucd_3_2_0``),
   so that the result never depends on the Python it runs on;
3. prohibit control characters, private use, surrogates, non-characters and the other
   tables of RFC 4013 2.3;
4. check bidirectional text (RFC 3454 6);
5. unassigned code points (A.1): refused in stored strings (the password file), let
   through in queries (what a client sends), as RFC 3454 7 says.
"""

from __future__ import annotations

import stringprep
import unicodedata

# RFC 4013 2.3, in the order it lists them; C.1.2 is mapped away before this check and
# is listed so that the table stays the RFC's.
_PROHIBITED = (
    (stringprep.in_table_c12, "a non-ASCII space"),
    (stringprep.in_table_c21_c22, "a control character"),
    (stringprep.in_table_c3, "a private use character"),
    (stringprep.in_table_c4, "a non-character code point"),
    (stringprep.in_table_c5, "a surrogate code point"),
    (stringprep.in_table_c6, "a character inappropriate for plain text"),
    (stringprep.in_table_c7, "a character inappropriate for canonical representation"),
    (stringprep.in_table_c8, "a character that changes display properties or is deprecated"),
    (stringprep.in_table_c9, "a tagging character"),
)


class PrepError(ValueError):
    """The string is not allowed by SASLprep; the message names the character."""


def _name(ch: str) -> str:
    return f"U+{ord(ch):04X}"


def _mapped(text: str) -> str:
    return "".join(" " if stringprep.in_table_c12(ch) else ch
                   for ch in text if not stringprep.in_table_b1(ch))


def _check_bidi(text: str) -> None:
    """RFC 3454 6: right-to-left text holds no left-to-right character, and begins and
    ends with a right-to-left one, so that it displays (and is typed) one way only."""
    if not any(stringprep.in_table_d1(ch) for ch in text):
        return
    for ch in text:
        if stringprep.in_table_d2(ch):
            raise PrepError(f"{_name(ch)} is left-to-right text mixed with right-to-left text")
    if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
        raise PrepError("right-to-left text must begin and end with a right-to-left character")


def prepare(text: str, stored: bool = False) -> str:
    """The SASLprep form of ``text``; PrepError when it holds what the profile refuses.
    ``stored`` is for strings written to the password file, which may not hold code
    points Unicode 3.2 left unassigned (their meaning could change with a later Unicode)."""
    if text.isascii() and text.isprintable():
        return text  # printable ASCII is its own SASLprep form: the common case, at once
    return _prepare(text, stored)


def _prepare(text: str, stored: bool) -> str:
    result = unicodedata.ucd_3_2_0.normalize("NFKC", _mapped(text))
    for ch in result:
        for in_table, what in _PROHIBITED:
            if in_table(ch):
                raise PrepError(f"{_name(ch)} is {what}")
        if stored and stringprep.in_table_a1(ch):
            raise PrepError(f"{_name(ch)} is not assigned in Unicode 3.2, which SASLprep uses")
    if result:
        _check_bidi(result)
    return result
