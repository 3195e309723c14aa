"""Plain-text and Markdown tables, for the console and for reports."""


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool = False) -> str:
    """A plain-text (aligned) or Markdown table."""
    if markdown:
        lines = [header, tuple("---" for _ in header), *rows]
        return "\n".join("| " + " | ".join(row) + " |" for row in lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
