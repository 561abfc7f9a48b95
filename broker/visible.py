"""Make user-controlled text safe to print on an admin's terminal.

Session fields, job logs and audit entries carry text a user chose (job comments,
kill reasons, whatever their start script printed). Written raw to a terminal,
``ESC [ ...`` and friends can move the cursor, rewrite earlier lines, set the window
title or, on some emulators, answer back into the admin's shell. So every control
character is shown instead of obeyed: C0 and DEL in caret notation (``ESC`` as
``^[``), C1 (``\\x9b`` is a one-byte CSI) and the Unicode formatting characters that
reorder or hide text (bidi overrides, line separators) as ``\\xNN``/``\\uNNNN``.

Standard library only, and nothing else happens here: ``--json`` output needs none
of this (``json.dumps`` escapes every control character already).
"""

from __future__ import annotations

import re

__all__ = ["visible_line", "visible_log"]

#: Formatting characters that change how *other* text is shown: bidi embeddings,
#: overrides and isolates, zero-width marks, line/paragraph separators.
_FORMAT = [0x061C, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
           *range(0x2066, 0x206A), 0xFEFF]


def _table(keep: str) -> dict[int, str]:
    table: dict[int, str] = {c: f"^{chr(c + 64)}" for c in range(0x20)}
    table[0x7F] = "^?"
    table.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})
    table.update({c: f"\\u{c:04x}" for c in _FORMAT})
    for ch in keep:
        table.pop(ord(ch), None)
    return table


_LINE = _table("\t")
_LOG = _table("\t\n\r")
_LONE_CR = re.compile(r"\r(?!\n)")


def visible_line(text: object) -> str:
    """``text`` as one terminal line: every control character shown, newlines included."""
    return str(text).translate(_LINE)


def visible_log(text: str) -> str:
    """Log text for a terminal: lines and tabs kept, every other control character shown.

    A CR directly before LF is kept (it ends a line the way LF does); a lone CR would
    return to the start of the line and let later text hide what came before, so it is
    shown as ``^M``.
    """
    return _LONE_CR.sub("^M", text.translate(_LOG))
