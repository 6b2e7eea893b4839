"""Print the requirements of the project and the given extras, one per line.

Run by the images' build stage (``python3 requirements.py hypercorn,gcp > requirements.txt``)
so that the dependencies are installed in a layer of their own, before the source is
copied: a change to the code then rebuilds only the small last layer. Self-references
(``jennah[...]`` inside an extra, as ``all`` has) are followed. Standard library only:
it runs on the base image's bare Python 3.11.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_SELF = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*\[([^\]]*)\]\s*$")


def requirements(pyproject: dict[str, object], extras: list[str]) -> list[str]:
    """The base dependencies, then each extra's, self-references expanded, no repeats."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    name = str(project["name"]).lower()
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(req: str) -> None:
        match = _SELF.match(req)
        if match and match.group(1).lower() == name:
            for extra in match.group(2).split(","):
                expand(extra.strip())
        elif req not in out:
            out.append(req)

    def expand(extra: str) -> None:
        if not extra or extra in seen_extras:
            return
        if extra not in optional:
            raise SystemExit(f"requirements.py: no extra {extra!r} in pyproject.toml")
        seen_extras.add(extra)
        for req in optional[extra]:
            add(req)

    for req in project.get("dependencies", []):
        add(req)
    for extra in extras:
        expand(extra)
    return out


def main(argv: list[str]) -> int:
    extras = [e.strip() for e in (argv[1] if len(argv) > 1 else "").split(",") if e.strip()]
    path = Path(argv[2]) if len(argv) > 2 else Path("pyproject.toml")
    with path.open("rb") as f:
        data = tomllib.load(f)
    print("\n".join(requirements(data, extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
