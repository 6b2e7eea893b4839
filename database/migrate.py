"""The ordered migration runner shared by the SQL stores.

Migrations are the ``*.sql`` files of ``database/schema/<dialect>/``, applied in name
order. Each file runs in its own transaction together with its ``schema_migrations``
row, so a file is either fully applied and recorded or not at all. Every transaction
first takes a database-wide lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL
``pg_advisory_xact_lock``) and only then reads what is applied, which makes concurrent
``migrate()`` calls from several processes safe: each file is applied exactly once.

Stores never migrate in their constructor or ``from_settings``: the worker calls
``store.migrate()`` once at start-up, so opening a store stays free of side effects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SCHEMA_DIR = Path(__file__).parent / "schema"


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


class MigrationSession(Protocol):
    """One open transaction of a store, already holding the migration lock."""

    def ensure_table(self) -> None:
        """Create ``schema_migrations(name, applied_at)`` if it is missing."""
        ...

    def applied(self) -> set[str]:
        """Names already recorded."""
        ...

    def apply(self, migration: Migration) -> None:
        """Run the file's statements and record its name."""
        ...


def load_migrations(directory: Path) -> list[Migration]:
    """The ``*.sql`` files of ``directory``, in name order."""
    files = sorted(p for p in directory.glob("*.sql") if p.is_file())
    return [Migration(p.name, p.read_text(encoding="utf-8")) for p in files]


def dialect_migrations(dialect: str) -> list[Migration]:
    return load_migrations(SCHEMA_DIR / dialect)


def run_migrations(
    migrations: Sequence[Migration],
    begin: Callable[[], AbstractContextManager[MigrationSession]],
) -> list[str]:
    """Apply the pending ``migrations`` in name order, one transaction each; return the
    names applied by this call. ``begin`` opens a locked transaction that commits when
    its block ends normally and rolls back on an exception."""
    names = [m.name for m in migrations]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate migration names in {names}")
    done_now: list[str] = []
    for migration in sorted(migrations, key=lambda m: m.name):
        with begin() as session:
            session.ensure_table()
            if migration.name in session.applied():
                continue
            session.apply(migration)
        done_now.append(migration.name)
    return done_now
