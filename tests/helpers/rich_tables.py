"""Reading rich tables back out of command-line output, for tests that compare them with the data."""

from __future__ import annotations


def table_rows(out: str, cells: int) -> list[list[str]]:
    """Body rows with ``cells`` cells of the rich tables printed in ``out``, each cell stripped
    (header rows use another border character and are left out)."""
    rows = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("│") and line.endswith("│"):
            row = [cell.strip() for cell in line[1:-1].split("│")]
            if len(row) == cells:
                rows.append(row)
    return rows
