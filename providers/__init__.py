"""Batch providers, registered by name and imported only when selected."""

from __future__ import annotations

from jennah.registry import load
from jennah.settings import ProviderSettings
from providers.base import BatchProvider

PROVIDERS: dict[str, str] = {
    "local": "providers.local:LocalProvider",
    "dry": "providers.memory:DryProvider",
    "fake": "providers.memory:FakeProvider",
    "gcp": "providers.gcp:GcpBatchProvider",
    "aws": "providers.aws:AwsBatchProvider",
    "azure": "providers.azure:AzureBatchProvider",
}


def create_provider(settings: ProviderSettings) -> BatchProvider:
    """Build the provider named by ``settings.kind`` (``from_settings`` classmethod)."""
    cls = load(PROVIDERS, settings.kind, "batch provider")
    provider: BatchProvider = cls.from_settings(settings)
    return provider
