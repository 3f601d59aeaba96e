"""scaling.tables: a table printed to a file or a pipe shows every cell whole; on a terminal it folds."""
from __future__ import annotations

import io
import re

from rich.table import Table

from scaling.tables import console_for, print_table

CELLS = ("completed", "0.0012345678", "diminishing returns", "early_stopped")


def _table() -> Table:
    table = Table(title="a table wider than 80 columns")
    for i, _ in enumerate(CELLS * 3):
        table.add_column(f"column {i}", justify="right")  # print_table folds, not the caller
    table.add_row(*(CELLS * 3))
    return table


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_the_tables_full_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = io.StringIO()
    print_table(console_for(out), _table())
    text = out.getvalue()
    assert "…" not in text and all(cell in text for cell in CELLS), text
    assert max(len(line) for line in text.splitlines()) > 80  # wider than COLUMNS: nothing was squeezed


def test_a_terminal_keeps_its_width_and_folds_instead_of_cutting(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = _Terminal()
    print_table(console_for(out), _table())
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # a terminal gets styles
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
