"""Reading SQL text without parsing it: the comma-separated parts of a list."""

from __future__ import annotations


def split_commas(sql: str, start: int = 0) -> tuple[list[str], int]:
    """The comma-separated parts of `sql` from `start` to the `)` that closes the list (or to
    the end of the text), and the index of that `)` (-1 when the text ends first). Commas
    inside nested parentheses or quotes stay in their part."""
    depth = 0
    quote = ""
    parts: list[str] = []
    begin = start
    for i in range(start, len(sql)):
        ch = sql[i]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                parts.append(sql[begin:i])
                return parts, i
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(sql[begin:i])
            begin = i + 1
    parts.append(sql[begin:])
    return parts, -1
