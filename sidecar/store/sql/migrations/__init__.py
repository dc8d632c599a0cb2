"""Versioned schema migrations, one folder per dialect (``sqlite/``, ``postgres/``) with the same
numbering: ``NNNN_name.sql``, statements split on ``;``, ``--`` comment lines ignored."""

from __future__ import annotations

from importlib import resources


def load(dialect: str) -> list[tuple[int, str]]:
    """``(version, sql)`` of every migration of ``dialect``, in version order."""
    folder = resources.files(__name__).joinpath(dialect)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


def statements(sql: str) -> list[str]:
    """The statements of one migration file (no ``;`` inside a statement, by convention)."""
    code = "\n".join(ln for ln in sql.splitlines() if not ln.lstrip().startswith("--"))
    return [s for s in code.split(";") if s.strip()]
