"""Job stores, registered by name and imported only when selected."""

from __future__ import annotations

from database.base import JobStore
from jennah.registry import load
from jennah.settings import StoreSettings

STORES: dict[str, str] = {
    "sqlite": "database.sqlite:SQLiteStore",
    "postgres": "database.postgres:PostgresStore",
    "memory": "database.memory:MemoryStore",
    "dynamodb": "database.dynamodb:DynamoDBStore",
    "spanner": "database.spanner:SpannerStore",
}


def create_store(settings: StoreSettings) -> JobStore:
    """Build the store named by ``settings.kind`` (``from_settings`` classmethod)."""
    cls = load(STORES, settings.kind, "job store")
    store: JobStore = cls.from_settings(settings)
    return store
