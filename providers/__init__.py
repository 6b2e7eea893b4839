"""Batch providers, registered by name and imported only when selected.

Adding a provider is its module plus one line in :data:`PROVIDERS`. The module holds
everything about it: the provider class (with ``name``, its ``Capabilities`` and a
``from_settings(ProviderSettings)`` classmethod) and, if it has variables of its own, a
frozen settings dataclass whose ``from_env(Env)`` reads and checks them, named by the
class's ``settings_class`` so that ``load_worker_settings(providers=PROVIDERS)`` checks
them at start-up. Every registered provider runs the contract suite
(``tests/providers/provider_contract.py``; a test fails for a name without a run).
"""

from __future__ import annotations

from jennah.registry import load
from jennah.settings import ProviderSettings
from providers.base import BatchProvider

PROVIDERS: dict[str, str] = {
    "local": "providers.local:LocalProvider",
    "gcp": "providers.gcp:GcpBatchProvider",
    "aws": "providers.aws:AwsBatchProvider",
    "azure": "providers.azure:AzureBatchProvider",
    "dry": "providers.memory:DryProvider",
    "fake": "providers.memory:FakeProvider",
}


def create_provider(settings: ProviderSettings) -> BatchProvider:
    """Build the provider named by ``settings.kind`` (its ``from_settings``, which reads and
    checks the provider's own variables before creating any client)."""
    cls = load(PROVIDERS, settings.kind, "BATCH_PROVIDER")
    provider: BatchProvider = cls.from_settings(settings)
    return provider
