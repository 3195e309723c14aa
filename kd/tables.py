"""Plain-text and Markdown tables, for the console and for reports."""

from kd.files import printable


def _cell(text: str, markdown: bool) -> str:
    """A cell on one line: a name holding a line break or a tab (a class folder can) escaped, ``|`` in Markdown too."""
    text = printable(text)
    return text.replace("|", "\\|") if markdown else text


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool = False) -> str:
    """A plain-text (aligned) or Markdown table, every cell on one line."""
    lines = [tuple(_cell(cell, markdown) for cell in row) for row in [header, *rows]]
    if markdown:
        lines.insert(1, tuple("---" for _ in header))
        return "\n".join("| " + " | ".join(row) + " |" for row in lines)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
