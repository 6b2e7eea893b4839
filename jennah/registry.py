"""Lazy ``"module:Class"`` registries: adding a backend is one module and one table line."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from jennah.errors import SettingsError


def load(table: Mapping[str, str], name: str, what: str) -> Any:
    """Import and return the class registered under ``name`` in ``table``."""
    try:
        target = table[name]
    except KeyError:
        raise SettingsError(f"unknown {what} {name!r} (known: {', '.join(table)})") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an optional extra is not installed
        raise SettingsError(
            f"{what} {name!r} needs an optional dependency that is missing ({exc.name}); "
            f"install jennah[{name}]"
        ) from exc
    return getattr(module, attr)
