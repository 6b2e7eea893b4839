"""Job stores, registered by name and imported only when selected.

Adding a store is its module plus one line in :data:`STORES`. The module holds everything
about it: the store class (with ``name`` and a ``from_settings(StoreSettings)``
classmethod) and, if it has variables of its own, a frozen settings dataclass whose
``from_env(Env)`` reads and checks them, named by the class's ``settings_class`` so that
the ``load_*_settings(stores=STORES)`` functions check them at start-up. Every registered
store runs the contract suite (``tests/database/store_contract.py``; a test fails for a name
without a run).
"""

from __future__ import annotations

from database.base import JobStore
from jennah.registry import load
from jennah.settings import StoreSettings

STORES: dict[str, str] = {
    "sqlite": "database.sqlite:SQLiteStore",
    "postgres": "database.postgres:PostgresStore",
    "dynamodb": "database.dynamodb:DynamoDBStore",
    "spanner": "database.spanner:SpannerStore",
    "memory": "database.memory:MemoryStore",
}


def create_store(settings: StoreSettings) -> JobStore:
    """Build the store named by ``settings.kind`` (its ``from_settings``, which reads and
    checks the store's own variables before opening anything)."""
    cls = load(STORES, settings.kind, "DB_PROVIDER")
    store: JobStore = cls.from_settings(settings)
    return store
