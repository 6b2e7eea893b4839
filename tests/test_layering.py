"""The layering of docs/design.md §13 covers the whole tree.

``lint-imports`` (run by ``make test``) checks the contracts in ``pyproject.toml``; these
tests check that no package escapes them: every top-level package of the product is one
of the contract's root packages and is placed in a layer, and the README's layout names
each of them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Top-level packages that are not the product: tests and benchmarks import everything.
NOT_PRODUCT = {"tests", "bench"}


def _product_packages() -> set[str]:
    return {p.parent.name for p in REPO.glob("*/__init__.py")} - NOT_PRODUCT


def _importlinter() -> dict[str, object]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    linter: dict[str, object] = config["tool"]["importlinter"]
    return linter


def test_every_package_is_a_root_of_the_import_contracts() -> None:
    roots = set(_importlinter()["root_packages"])  # type: ignore[call-overload]
    assert roots == _product_packages()


def test_every_root_package_sits_in_a_layer() -> None:
    contracts = _importlinter()["contracts"]
    # The contract over the top-level packages (the others order rooms inside one).
    [layers] = [c for c in contracts  # type: ignore[attr-defined]
                if c["type"] == "layers" and not c.get("containers")]
    placed = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    assert placed == _product_packages()


def test_the_readme_layout_names_every_package() -> None:
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("## ", 1)[0]
    listed = {line.split("/", 1)[0] for line in layout.splitlines() if "/ " in line}
    assert _product_packages() <= listed
