"""``python -m jennah`` is the ``jennah`` command."""

import sys

from jennah.cli import main

sys.exit(main())
