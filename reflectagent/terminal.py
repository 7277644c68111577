"""Untrusted text made safe to print: control characters shown as escapes, never sent to the terminal raw.

Why: an id, a response or a model's analysis may hold ANSI escapes (``\\x1b[2J`` clears the screen,
colour codes hide or fake lines), BEL, a carriage return that overwrites what came before, or a bidi
override that reorders it. Printed raw they act on the terminal; printed through :func:`visible` they read as
what they are. Ordinary text, spaces and letters of any script included, passes unchanged.
"""

from __future__ import annotations

import unicodedata

# C0/C1 controls and DEL, format characters (bidi overrides, zero-width), surrogates, line/paragraph separators
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str, keep: str = "") -> str:
    """``text`` with every control, format and separator character written as its escape (``\\x1b``, ``\\u202e``),
    except those in ``keep`` (``"\\n"`` for a message of several lines). Printable text is returned as it is."""
    if text.isprintable():  # the usual case, at C speed
        return text
    return "".join(_escape(c) if c not in keep and unicodedata.category(c) in _HIDDEN else c for c in text)
