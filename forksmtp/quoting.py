"""Text quoted for one-line messages (config errors, listen errors): a TOML basic string."""

from __future__ import annotations

import json


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string: JSON's escapes are TOML's, and what else does not
    print (a lone surrogate from a command line argument, U+2028) is escaped too, so that
    the message stays one line of what it says."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                   for c in json.dumps(text, ensure_ascii=False))
