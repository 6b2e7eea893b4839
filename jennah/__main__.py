"""``python -m jennah`` is the ``jennah`` command.

This file is an entry point, not part of the shared kernel: Python runs it, nobody imports
it (the one exception the import contracts in ``pyproject.toml`` allow).
"""

from commands.cli import main

raise SystemExit(main())
