"""Lazy ``"module:Class"`` registries: adding a backend is one module and one table line.

The tables themselves live beside their backends (``providers.PROVIDERS``,
``database.STORES``); this module only resolves a name, importing the backend's module
(and so its SDK) when it is chosen, never before.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from jennah.errors import SettingsError


def load(table: Mapping[str, str], name: str, variable: str) -> Any:
    """Import and return the class registered under ``name`` in ``table``; ``variable`` is
    the setting that chose it (``BATCH_PROVIDER``), named by every error."""
    try:
        target = table[name]
    except KeyError:
        raise SettingsError(f"invalid settings: {variable}={name!r} "
                            f"(expected one of {', '.join(table)})") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an optional extra is not installed
        raise SettingsError(
            f"{variable}={name} needs an optional dependency that is missing ({exc.name}); "
            f"install jennah[{name}]"
        ) from exc
    return getattr(module, attr)
