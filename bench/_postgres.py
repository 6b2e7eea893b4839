"""A private PostgreSQL for a benchmark run, from the PostgreSQL 15 binaries (the same
throwaway cluster the tests use: ``tests/fixtures/postgres.py``, started with
``fsync=off``, so its figures are an upper bound for a durable server)."""

from __future__ import annotations

from tests.fixtures.postgres import _bindir, _Cluster


def private_postgres(bench: str, *, required: bool) -> _Cluster | None:
    """A started private cluster (``.url``; the caller stops it). Without the binaries:
    ``SystemExit`` if ``required``, else None (the bench then skips its PostgreSQL part)."""
    bindir = _bindir()
    if bindir is None:
        if required:
            raise SystemExit(f"{bench} needs PostgreSQL 15 binaries or --postgres-url")
        return None
    cluster = _Cluster(bindir)
    cluster.start()
    return cluster
