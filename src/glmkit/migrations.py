"""Numbered schema migrations, counted in a one-row `schema_version` table: the one loop that the
conversation store (server/store.py, on SQLite or PostgreSQL) and the knowledge store
(knowledge/index.py) open their databases with, so that a database written by any earlier glmkit
opens in a later one.  Plain DB-API calls on a connection the caller gives, inside the caller's
transaction (which makes concurrent first opens take turns): no driver is imported here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence


def migrate(db, migrations: Sequence[Iterable[str] | Callable]) -> None:
    """Run on `db` each migration it has not had yet, in order: the n-th of `migrations` takes the
    schema from version n - 1 to n, as statements or as a function of `db` (for a change that
    depends on what the database holds), and n is recorded once it has run.
    `db`'s rows must be readable by column name, and its placeholder `?`."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT version FROM schema_version").fetchone()
    at = row["version"] if row else 0
    if row is None:
        db.execute("INSERT INTO schema_version VALUES (0)")
    for n, migration in enumerate(migrations[at:], start=at + 1):
        if callable(migration):
            migration(db)
        else:
            for statement in migration:
                db.execute(statement)
        db.execute("UPDATE schema_version SET version = ?", (n,))
