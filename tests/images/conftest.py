"""The image tests run real containers of the built images (``make image-test``).

They carry the ``images`` marker and are deselected unless the marker expression names
it (``pytest -m images tests/images``, which ``deploy/images/build.py test`` runs after
building the images), so a plain ``pytest`` or ``make test`` never starts a container.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "images: runs containers of the built images (make image-test; -m images)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "images" in (config.getoption("markexpr") or ""):
        return  # -m decides
    keep = [item for item in items if item.get_closest_marker("images") is None]
    dropped = [item for item in items if item.get_closest_marker("images") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
